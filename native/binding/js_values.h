// Between library values and JS values: errors with a `code`, and the
// conversions of arguments and results. No policy lives in the binding.
#pragma once

#include <napi.h>

#include <exception>
#include <optional>
#include <string>
#include <vector>

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

// The copy streams of share: one bigint, or an array with one per device.
inline std::vector<uint64_t> shareStreams(const Napi::Value& v) {
  std::vector<uint64_t> out;
  if (v.IsBigInt()) out.push_back(u64(v));
  if (v.IsArray()) {
    Napi::Array a = v.As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); ++i) out.push_back(a.Get(i).IsBigInt() ? u64(a.Get(i)) : 0);
  }
  return out;
}

// An optional array of per-device streams (undefined entries: none there).
inline std::vector<std::optional<uint64_t>> streamList(const Napi::CallbackInfo& info, size_t at) {
  std::vector<std::optional<uint64_t>> streams;
  if (info.Length() > at && info[at].IsArray()) {
    Napi::Array a = info[at].As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); ++i) {
      Napi::Value v = a.Get(i);
      streams.push_back(v.IsBigInt() ? std::optional<uint64_t>(u64(v)) : std::nullopt);
    }
  }
  return streams;
}

}  // namespace vat
