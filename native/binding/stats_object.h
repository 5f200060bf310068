// CacheStats as a JS object, field by field from the one list of names
// (CacheStats::fields in core/stats.h): adding a figure there is enough.
#pragma once

#include <napi.h>

#include <array>
#include <string>
#include <type_traits>
#include <vector>

#include "binding/js_values.h"
#include "core/stats.h"

namespace vat {

class StatsObject {
 public:
  explicit StatsObject(Napi::Env env) : env_(env), object_(Napi::Object::New(env)) {}

  template <class Stats> static Napi::Object of(Napi::Env env, const Stats& stats) {
    StatsObject out(env);
    stats.fields(out);
    return out.object_;
  }

  void operator()(const char* name, uint64_t v) { object_.Set(name, num(env_, v)); }
  void operator()(const char* name, uint32_t v) { object_.Set(name, num(env_, v)); }
  void operator()(const char* name, bool v) { object_.Set(name, v); }
  void operator()(const char* name, const std::string& v) { object_.Set(name, v); }
  // An optional text: null when absent.
  void operator()(const char* name, const std::string* v) {
    object_.Set(name, v ? Napi::Value(Napi::String::New(env_, *v)) : env_.Null());
  }
  template <class Nested, class = decltype(&Nested::template fields<StatsObject&>)>
  void operator()(const char* name, const Nested& nested) {
    object_.Set(name, of(env_, nested));
  }
  template <class Item> void operator()(const char* name, const std::vector<Item>& items) {
    Napi::Array a = Napi::Array::New(env_, items.size());
    for (size_t i = 0; i < items.size(); ++i) a.Set(static_cast<uint32_t>(i), of(env_, items[i]));
    object_.Set(name, a);
  }
  // Driver calls by operation: { [op]: { calls, nanoseconds } }.
  void operator()(const char* name, const std::array<OpCounter, kBackendOpCount>& calls) {
    Napi::Object byOp = Napi::Object::New(env_);
    for (size_t i = 0; i < kBackendOpCount; ++i) {
      Napi::Object c = Napi::Object::New(env_);
      c.Set("calls", num(env_, calls[i].calls));
      c.Set("nanoseconds", num(env_, calls[i].nanos));
      byOp.Set(backendOpName(static_cast<BackendOp>(i)), c);
    }
    object_.Set(name, byOp);
  }

 private:
  Napi::Env env_;
  Napi::Object object_;
};

}  // namespace vat
