#include "binding/js_values.h"

#include <new>

namespace vat {

Napi::Error toJsError(Napi::Env env, const Error& e) {
  Napi::Error err = Napi::Error::New(env, e.what());
  err.Set("code", errorCodeName(e.code()));
  if (!e.statusName.empty()) {
    err.Set("status", Napi::Number::New(env, e.status));
    err.Set("statusName", e.statusName);
  }
  if (e.code() == ErrorCode::OutOfMemory) {
    err.Set("requestedBytes", Napi::Number::New(env, static_cast<double>(e.requestedBytes)));
    err.Set("availableBytes", Napi::Number::New(env, static_cast<double>(e.availableBytes)));
  }
  if (e.device >= 0) err.Set("device", Napi::Number::New(env, e.device));
  return err;
}

bool rawJsError(napi_env env, const Error& e, napi_value* out) {
  napi_value message, code, error;
  if (napi_create_string_utf8(env, e.what(), NAPI_AUTO_LENGTH, &message) != napi_ok) return false;
  if (napi_create_string_utf8(env, errorCodeName(e.code()), NAPI_AUTO_LENGTH, &code) != napi_ok) return false;
  if (napi_create_error(env, nullptr, message, &error) != napi_ok) return false;
  if (napi_set_named_property(env, error, "code", code) != napi_ok) return false;
  auto setNumber = [&](const char* name, double v) {
    napi_value n;
    return napi_create_double(env, v, &n) == napi_ok && napi_set_named_property(env, error, name, n) == napi_ok;
  };
  if (!e.statusName.empty()) {
    napi_value name;
    if (!setNumber("status", e.status)) return false;
    if (napi_create_string_utf8(env, e.statusName.c_str(), NAPI_AUTO_LENGTH, &name) != napi_ok ||
        napi_set_named_property(env, error, "statusName", name) != napi_ok)
      return false;
  }
  if (e.code() == ErrorCode::OutOfMemory &&
      !(setNumber("requestedBytes", static_cast<double>(e.requestedBytes)) &&
        setNumber("availableBytes", static_cast<double>(e.availableBytes))))
    return false;
  if (e.device >= 0 && !setNumber("device", e.device)) return false;
  *out = error;
  return true;
}

Error asLibraryError(std::exception_ptr thrown) {
  try {
    std::rethrow_exception(thrown);
  } catch (const Error& e) {
    return e;
  } catch (const std::bad_alloc&) {
    return Error(ErrorCode::OutOfMemory, "host out of memory (std::bad_alloc)");
  } catch (const std::exception& e) {
    return Error(ErrorCode::Internal, std::string("internal error: ") + e.what());
  } catch (...) {
    return Error(ErrorCode::Internal, "internal error: unknown exception");
  }
}

}  // namespace vat
