// Between library values and JS values: errors with a `code`, and the
// conversions of arguments and results. No policy lives in the binding.
#pragma once

#include <napi.h>

#include <exception>
#include <string>

#include "common/errors.h"

namespace vat {

Napi::Error toJsError(Napi::Env env, const Error& e);

// The same with raw Node-API calls, which report failure instead of throwing
// or aborting: for where the environment may be going away. False when any
// call failed.
bool rawJsError(napi_env env, const Error& e, napi_value* out);

// A library Error for whatever was thrown (bad_alloc: ERR_OUT_OF_MEMORY;
// anything unexpected: ERR_INTERNAL).
Error asLibraryError(std::exception_ptr thrown);

// Runs `body`, turning library and C++ errors into JS exceptions.
template <typename F>
auto guarded(Napi::Env env, F&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const Napi::Error&) {
    throw;
  } catch (...) {
    throw toJsError(env, asLibraryError(std::current_exception()));
  }
}

inline uint32_t u32(const Napi::Value& v) { return v.As<Napi::Number>().Uint32Value(); }
inline uint64_t u64(const Napi::Value& v) {
  if (v.IsBigInt()) {
    bool lossless = true;
    return v.As<Napi::BigInt>().Uint64Value(&lossless);
  }
  return static_cast<uint64_t>(v.As<Napi::Number>().Int64Value());
}
inline Napi::Value num(Napi::Env env, uint64_t v) { return Napi::Number::New(env, static_cast<double>(v)); }
inline Napi::Value big(Napi::Env env, uint64_t v) { return Napi::BigInt::New(env, v); }

}  // namespace vat
