#pragma once

#include <napi.h>

#include <atomic>
#include <memory>

#include "binding/js_values.h"
#include "cache/sharded_cache.h"

namespace vat {

// growAsync: the driver calls run on a libuv pool thread, off the cache's
// lock (ShardedCache::growDetached: KVCache::growDetached on each device); the promise settles on the JS thread. The
// settling uses raw Node-API calls and gives up quietly when the environment
// is being torn down (a worker thread ending, the process exiting): then no
// one is left to settle for, and throwing there would abort the process.
class GrowTask : public Napi::AsyncWorker {
 public:
  GrowTask(Napi::Env env, std::shared_ptr<ShardedCache> cache, SequenceRef seq, uint64_t tokens,
           std::shared_ptr<std::atomic<bool>> cancel)
      : Napi::AsyncWorker(env, "vattention.growAsync"),
        cache_(std::move(cache)),
        seq_(seq),
        tokens_(tokens),
        cancel_(std::move(cancel)) {
    if (napi_create_promise(env, &deferred_, &promise_) != napi_ok)
      throw Napi::Error::New(env, "cannot create the growAsync promise");
  }

  napi_value promise() const { return promise_; }

  void Execute() override {
    try {
      cache_->growDetached(seq_, tokens_, cancel_.get());
    } catch (...) {
      error_ = std::make_unique<Error>(asLibraryError(std::current_exception()));
    }
  }

  void OnWorkComplete(Napi::Env env, napi_status status) override {
    if (status != napi_cancelled) settle(env);
    Destroy();
  }

 private:
  void settle(napi_env env) noexcept {
    napi_handle_scope scope;
    if (napi_open_handle_scope(env, &scope) != napi_ok) return;
    napi_value value;
    if (error_) {
      if (rawJsError(env, *error_, &value)) napi_reject_deferred(env, deferred_, value);
    } else if (napi_get_undefined(env, &value) == napi_ok) {
      napi_resolve_deferred(env, deferred_, value);
    }
    napi_close_handle_scope(env, scope);
  }

  napi_deferred deferred_ = nullptr;
  napi_value promise_ = nullptr;
  std::shared_ptr<ShardedCache> cache_;
  SequenceRef seq_;
  uint64_t tokens_;
  std::shared_ptr<std::atomic<bool>> cancel_;
  std::unique_ptr<Error> error_;
};

}  // namespace vat
