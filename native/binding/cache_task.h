#pragma once

#include <napi.h>

#include <functional>
#include <memory>

#include "binding/js_values.h"
#include "core/kv_cache.h"

namespace vat {

// Every asynchronous operation (growAsync, stepAsync, shareAsync, swapOut,
// swapIn, suspend, resume) is one of these: the work runs on a libuv pool
// thread (it maps, copies and makes driver calls for milliseconds; a cancel
// flag, where the operation takes one, is captured by the work), the promise
// settles on the JS thread with up to two numbers (a handle, or a slot and
// generation). The settling uses raw Node-API calls and gives up quietly
// when the environment is being torn down (a worker thread ending, the
// process exiting): then no one is left to settle for, and throwing there
// would abort the process.
class CacheTask : public Napi::AsyncWorker {
 public:
  struct Result {
    uint64_t first = 0;
    uint64_t second = 0;
    int count = 0;  // how many of the two the promise resolves with (0: undefined, 1: a number, 2: an array)
  };

  CacheTask(Napi::Env env, const char* name, std::function<Result()> work)
      : Napi::AsyncWorker(env, name), work_(std::move(work)) {
    if (napi_create_promise(env, &deferred_, &promise_) != napi_ok)
      throw Napi::Error::New(env, std::string("cannot create the promise of ") + name);
  }

  napi_value promise() const { return promise_; }

  void Execute() override {
    try {
      result_ = work_();
    } catch (...) {
      error_ = std::make_unique<Error>(asLibraryError(std::current_exception()));
    }
  }

  void OnWorkComplete(Napi::Env env, napi_status status) override {
    if (status != napi_cancelled) settle(env);
    Destroy();
  }

 private:
  bool value(napi_env env, napi_value* out) const {
    if (result_.count == 0) return napi_get_undefined(env, out) == napi_ok;
    napi_value a, b;
    if (napi_create_double(env, static_cast<double>(result_.first), &a) != napi_ok) return false;
    if (result_.count == 1) {
      *out = a;
      return true;
    }
    if (napi_create_double(env, static_cast<double>(result_.second), &b) != napi_ok) return false;
    if (napi_create_array_with_length(env, 2, out) != napi_ok) return false;
    return napi_set_element(env, *out, 0, a) == napi_ok && napi_set_element(env, *out, 1, b) == napi_ok;
  }

  void settle(napi_env env) noexcept {
    napi_handle_scope scope;
    if (napi_open_handle_scope(env, &scope) != napi_ok) return;
    napi_value v;
    if (error_) {
      if (rawJsError(env, *error_, &v)) napi_reject_deferred(env, deferred_, v);
    } else if (value(env, &v)) {
      napi_resolve_deferred(env, deferred_, v);
    }
    napi_close_handle_scope(env, scope);
  }

  napi_deferred deferred_ = nullptr;
  napi_value promise_ = nullptr;
  std::function<Result()> work_;
  Result result_;
  std::unique_ptr<Error> error_;
};

}  // namespace vat
