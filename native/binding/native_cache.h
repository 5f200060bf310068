// The cache object JavaScript holds (lib/native.ts; lib/kv-cache.ts wraps it
// in KVCache): converts arguments and results, nothing more. Arguments were
// validated in TypeScript (lib/options.ts); the core checks what it relies on.
#pragma once

#include <napi.h>

#include <memory>
#include <set>
#include <vector>

#include "binding/cache_task.h"
#include "binding/js_values.h"
#include "binding/layout_object.h"
#include "binding/stats_object.h"
#include "binding/test_hooks.h"
#include "core/kv_cache.h"

namespace vat {

class NativeCache;

// Per-environment state (main thread and each worker thread): the live
// caches, closed when the environment is torn down.
struct AddonData {
  std::set<NativeCache*> live;
};

// Closes every cache of an environment being torn down (a worker thread
// ending, the main thread exiting).
void closeAllInEnv(void* addonData);

class NativeCache : public Napi::ObjectWrap<NativeCache> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeCache",
                       {
                           InstanceMethod<&NativeCache::Reserve>("reserve"),
                           InstanceMethod<&NativeCache::ReserveCached>("reserveCached"),
                           InstanceMethod<&NativeCache::ReserveCachedAsync>("reserveCachedAsync"),
                           InstanceMethod<&NativeCache::Publish>("publish"),
                           InstanceMethod<&NativeCache::Grow>("grow"),
                           InstanceMethod<&NativeCache::Step>("step"),
                           InstanceMethod<&NativeCache::StepIfBacked>("stepIfBacked"),
                           InstanceMethod<&NativeCache::StepAsync>("stepAsync"),
                           InstanceMethod<&NativeCache::GrowAsync>("growAsync"),
                           InstanceMethod<&NativeCache::Release>("release"),
                           InstanceMethod<&NativeCache::Share>("share"),
                           InstanceMethod<&NativeCache::ShareAsync>("shareAsync"),
                           InstanceMethod<&NativeCache::SwapOut>("swapOut"),
                           InstanceMethod<&NativeCache::SwapIn>("swapIn"),
                           InstanceMethod<&NativeCache::DiscardSwapped>("discardSwapped"),
                           InstanceMethod<&NativeCache::Suspend>("suspend"),
                           InstanceMethod<&NativeCache::Resume>("resume"),
                           InstanceMethod<&NativeCache::Reclaim>("reclaim"),
                           InstanceMethod<&NativeCache::Trim>("trim"),
                           InstanceMethod<&NativeCache::Write>("write"),
                           InstanceMethod<&NativeCache::Read>("read"),
                           InstanceMethod<&NativeCache::Tokens>("tokens"),
                           InstanceMethod<&NativeCache::Stats>("stats"),
                           InstanceMethod<&NativeCache::ObtainableBytes>("obtainableBytes"),
                           InstanceMethod<&NativeCache::Layout>("layout"),
                           InstanceMethod<&NativeCache::Close>("close"),
                           InstanceMethod<&NativeCache::WorkerError>("workerError"),
                           InstanceMethod<&NativeCache::InjectFault>("injectFault"),
                           InstanceMethod<&NativeCache::PrefixHashMask>("prefixHashMask"),
                       });
  }

  NativeCache(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeCache>(info) {
    Napi::Env env = info.Env();
    Napi::Object o = info[0].As<Napi::Object>();
    CacheOptions opts;
    opts.shape.layers = u32(o.Get("layers"));
    opts.shape.kvHeads = u32(o.Get("kvHeads"));
    opts.shape.headDim = u32(o.Get("headDim"));
    opts.shape.dtypeBytes = u32(o.Get("dtypeBytes"));
    opts.shape.maxSequences = u32(o.Get("maxSequences"));
    opts.shape.maxTokens = u32(o.Get("maxTokens"));
    opts.backend = o.Get("backend").As<Napi::String>().Utf8Value() == "cuda" ? BackendKind::Cuda : BackendKind::Host;
    // devices: ordinals (kvHeads split over them); memoryBudgets: bytes per
    // device (0: that device's default).
    opts.devices.clear();
    opts.memoryBudgets.clear();
    Napi::Array ds = o.Get("devices").As<Napi::Array>();
    Napi::Array bs = o.Get("memoryBudgets").As<Napi::Array>();
    for (uint32_t i = 0; i < ds.Length(); ++i) opts.devices.push_back(static_cast<int>(u32(ds.Get(i))));
    for (uint32_t i = 0; i < bs.Length(); ++i) opts.memoryBudgets.push_back(u64(bs.Get(i)));
    opts.pageSize = static_cast<size_t>(u64(o.Get("pageSize")));
    opts.prefillBytes = u64(o.Get("prefillBytes"));
    opts.prefetchTokens = u32(o.Get("prefetchTokens"));
    opts.layerGroups = u32(o.Get("layerGroups"));
    opts.idleGroups = u32(o.Get("idlePageGroups"));
    opts.hostMemoryBudget = u64(o.Get("hostMemoryBudget"));
    opts.hostMemoryPrefill = u64(o.Get("hostMemoryPrefill"));
    // prefixCacheMaxBytes: a number, or undefined for no bound
    opts.prefixCache = o.Get("prefixCache").ToBoolean().Value();
    if (o.Get("prefixCacheMaxBytes").IsNumber() || o.Get("prefixCacheMaxBytes").IsBigInt())
      opts.prefixCacheMaxBytes = u64(o.Get("prefixCacheMaxBytes"));
    cache_ = guarded(env, [&] { return std::make_shared<KVCache>(opts); });
    data_ = env.GetInstanceData<AddonData>();
    data_->live.insert(this);
  }

  ~NativeCache() override {
    if (data_) data_->live.erase(this);
    // Collected without close(): free everything now (close() makes no
    // driver call once the process is exiting).
    if (cache_) cache_->close();
  }

  void closeFromCleanupHook() {
    if (cache_) cache_->close();
  }

 private:
  SequenceRef seq(const Napi::CallbackInfo& info) { return {u32(info[0]), u32(info[1])}; }

  Napi::Value Reserve(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    std::optional<uint64_t> expected;
    if (info.Length() > 0 && info[0].IsNumber()) expected = u64(info[0]);
    return pair(env, guarded(env, [&] { return cache_->reserve(expected); }));
  }

  // reserveCached(ids: Uint32Array, salt: bigint, expectedTokens?) -> [slot, generation]
  Napi::Value ReserveCached(const Napi::CallbackInfo& info) {
    std::vector<uint32_t> ids = idList(info[0]);
    std::optional<uint64_t> expected;
    if (info.Length() > 2 && info[2].IsNumber()) expected = u64(info[2]);
    return pair(info.Env(), guarded(info.Env(), [&] { return cache_->reserveCached(ids, u64(info[1]), expected); }));
  }

  // reserveCachedAsync(ids, salt, expectedTokens?) -> Promise<[slot, generation]>
  Napi::Value ReserveCachedAsync(const Napi::CallbackInfo& info) {
    std::optional<uint64_t> expected;
    if (info.Length() > 2 && info[2].IsNumber()) expected = u64(info[2]);
    auto cache = cache_;
    return queue(info.Env(), "vattention.reserveCached", [cache, ids = idList(info[0]), salt = u64(info[1]), expected] {
      SequenceRef r = cache->reserveCached(ids, salt, expected);
      return CacheTask::Result{r.slot, r.generation, 2};
    });
  }

  // publish(slot, gen, ids: Uint32Array, salt: bigint)
  void Publish(const Napi::CallbackInfo& info) {
    std::vector<uint32_t> ids = idList(info[2]);
    guarded(info.Env(), [&] { cache_->publish(seq(info), ids, u64(info[3])); });
  }

  static std::vector<uint32_t> idList(const Napi::Value& v) {
    Napi::Uint32Array a = v.As<Napi::Uint32Array>();
    return std::vector<uint32_t>(a.Data(), a.Data() + a.ElementLength());
  }

  static Napi::Array pair(Napi::Env env, SequenceRef r) {
    Napi::Array out = Napi::Array::New(env, 2);
    out.Set(0u, r.slot);
    out.Set(1u, r.generation);
    return out;
  }

  // share(slot, gen, tokens, allowReleased, stream | streams, copyLast) -> [slot, generation]
  Napi::Value Share(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    bool allowReleased = info[3].ToBoolean().Value();
    std::vector<uint64_t> streams = shareStreams(info[4]);
    bool copyLast = info.Length() > 5 && info[5].ToBoolean().Value();
    return pair(env, guarded(env, [&] { return cache_->share(seq(info), u64(info[2]), allowReleased, streams, copyLast); }));
  }

  Napi::Value queue(Napi::Env env, const char* name, std::function<CacheTask::Result()> work) {
    auto* task = new CacheTask(env, name, std::move(work));
    napi_value promise = task->promise();
    task->Queue();
    return Napi::Value(env, promise);
  }

  // shareAsync(slot, gen, tokens, allowReleased, stream | streams, copyLast) -> Promise<[slot, generation]>
  Napi::Value ShareAsync(const Napi::CallbackInfo& info) {
    bool allowReleased = info[3].ToBoolean().Value();
    std::vector<uint64_t> streams = shareStreams(info[4]);
    bool copyLast = info.Length() > 5 && info[5].ToBoolean().Value();
    SequenceRef from = seq(info);
    uint64_t tokens = u64(info[2]);
    auto cache = cache_;
    return queue(info.Env(), "vattention.share", [cache, from, tokens, allowReleased, streams, copyLast] {
      SequenceRef r = cache->share(from, tokens, allowReleased, streams, copyLast);
      return CacheTask::Result{r.slot, r.generation, 2};
    });
  }

  // swapOut(slot, gen, streams?: (bigint | undefined)[]) -> Promise<[handle, tokens]>
  // (the tokens the copy holds: a growth that ended first counts)
  Napi::Value SwapOut(const Napi::CallbackInfo& info) {
    std::vector<std::optional<uint64_t>> streams = streamList(info, 2);
    SequenceRef s = seq(info);
    auto cache = cache_;
    return queue(info.Env(), "vattention.swapOut", [cache, s, streams] {
      uint64_t handle = cache->swapOut(s, streams);
      return CacheTask::Result{handle, cache->swappedTokens(handle), 2};
    });
  }

  // swapIn(handle) -> Promise<[slot, generation]>
  Napi::Value SwapIn(const Napi::CallbackInfo& info) {
    uint64_t handle = u64(info[0]);
    auto cache = cache_;
    return queue(info.Env(), "vattention.swapIn", [cache, handle] {
      SequenceRef r = cache->swapIn(handle);
      return CacheTask::Result{r.slot, r.generation, 2};
    });
  }

  void DiscardSwapped(const Napi::CallbackInfo& info) {
    guarded(info.Env(), [&] { cache_->discardSwapped(u64(info[0])); });
  }

  // suspend(keepHost) -> Promise<void>
  Napi::Value Suspend(const Napi::CallbackInfo& info) {
    bool keepHost = info[0].ToBoolean().Value();
    auto cache = cache_;
    return queue(info.Env(), "vattention.suspend", [cache, keepHost] {
      cache->suspend(keepHost);
      return CacheTask::Result{};
    });
  }

  Napi::Value Resume(const Napi::CallbackInfo& info) {
    auto cache = cache_;
    return queue(info.Env(), "vattention.resume", [cache] {
      cache->resume();
      return CacheTask::Result{};
    });
  }

  Napi::Value Grow(const Napi::CallbackInfo& info) {
    return num(info.Env(), guarded(info.Env(), [&] { return cache_->grow(seq(info), u64(info[2])); }));
  }

  // step(slots: Uint32Array, generations: Uint32Array, tokens: Uint32Array, n):
  // the first n entries of reused arrays (no allocation per step on the JS side).
  Napi::Value Step(const Napi::CallbackInfo& info) {
    fillBatch(info);
    return num(info.Env(), guarded(info.Env(), [&] { return cache_->step(batch_); }));
  }

  // stepIfBacked(slots, generations, tokens, n) -> boolean (see KVCache::stepIfBacked)
  Napi::Value StepIfBacked(const Napi::CallbackInfo& info) {
    fillBatch(info);
    return Napi::Boolean::New(info.Env(), guarded(info.Env(), [&] { return cache_->stepIfBacked(batch_); }));
  }

  // stepAsync(slots, generations, tokens, n) -> Promise<pages reclaimed>: the
  // batch is copied now (the arrays are reused by the caller).
  Napi::Value StepAsync(const Napi::CallbackInfo& info) {
    fillBatch(info);
    auto cache = cache_;
    return queue(info.Env(), "vattention.stepAsync", [cache, batch = batch_] {
      return CacheTask::Result{cache->step(batch), 0, 1};
    });
  }

  void fillBatch(const Napi::CallbackInfo& info) {
    auto slots = info[0].As<Napi::Uint32Array>();
    auto gens = info[1].As<Napi::Uint32Array>();
    auto tokens = info[2].As<Napi::Uint32Array>();
    size_t n = std::min<size_t>(u32(info[3]), slots.ElementLength());
    batch_.resize(n);
    for (size_t i = 0; i < n; ++i) batch_[i] = {{slots[i], gens[i]}, tokens[i]};
  }

  // growAsync(slot, gen, tokens) -> [Promise, cancel()]
  Napi::Value GrowAsync(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto cancel = std::make_shared<std::atomic<bool>>(false);
    auto cache = cache_;
    SequenceRef s = seq(info);
    uint64_t tokens = u64(info[2]);
    Napi::Value promise = queue(env, "vattention.growAsync", [cache, s, tokens, cancel] {
      cache->growDetached(s, tokens, cancel.get());
      return CacheTask::Result{};
    });
    Napi::Array out = Napi::Array::New(env, 2);
    out.Set(0u, promise);
    out.Set(1u, Napi::Function::New(env, [cancel](const Napi::CallbackInfo&) { cancel->store(true); }));
    return out;
  }

  // release(slot, gen, streams?: (bigint | undefined)[]): a fence per device.
  void Release(const Napi::CallbackInfo& info) {
    std::vector<std::optional<uint64_t>> streams = streamList(info, 2);
    guarded(info.Env(), [&] { cache_->release(seq(info), streams); });
  }

  // The device index (0 ..< devices) of a per-device call.
  size_t deviceArg(const Napi::CallbackInfo& info, size_t at) {
    size_t d = info.Length() > at && info[at].IsNumber() ? u32(info[at]) : 0;
    if (d >= cache_->deviceCount()) {
      Napi::Error err = Napi::Error::New(info.Env(), "device index " + std::to_string(d) + " is past the cache's " +
                                                         std::to_string(cache_->deviceCount()) + " devices");
      err.Set("code", "ERR_INVALID_ARGUMENT");
      throw err;
    }
    return d;
  }

  Napi::Value Reclaim(const Napi::CallbackInfo& info) {
    uint64_t bytes = info.Length() > 0 && !info[0].IsUndefined() ? u64(info[0]) : UINT64_MAX;
    return num(info.Env(), guarded(info.Env(), [&] { return cache_->reclaim(bytes); }));
  }

  Napi::Value Trim(const Napi::CallbackInfo& info) {
    return num(info.Env(), guarded(info.Env(), [&] { return cache_->trim(); }));
  }

  // write(slot, gen, layer, kind, token, Uint8Array, device)
  void Write(const Napi::CallbackInfo& info) {
    Napi::Uint8Array data = info[5].As<Napi::Uint8Array>();
    size_t d = deviceArg(info, 6);
    guarded(info.Env(), [&] {
      cache_->write(d, seq(info), u32(info[2]), static_cast<KVKind>(u32(info[3])), u64(info[4]), data.Data(),
                    data.ByteLength());
    });
  }

  void Read(const Napi::CallbackInfo& info) {
    Napi::Uint8Array out = info[5].As<Napi::Uint8Array>();
    size_t d = deviceArg(info, 6);
    guarded(info.Env(), [&] {
      cache_->read(d, seq(info), u32(info[2]), static_cast<KVKind>(u32(info[3])), u64(info[4]), out.Data(),
                   out.ByteLength());
    });
  }

  Napi::Value Tokens(const Napi::CallbackInfo& info) {
    return num(info.Env(), guarded(info.Env(), [&] { return cache_->tokens(seq(info)); }));
  }

  Napi::Value ObtainableBytes(const Napi::CallbackInfo& info) {
    bool withLookAhead = info.Length() == 0 || info[0].ToBoolean().Value();
    return num(info.Env(), guarded(info.Env(), [&] { return cache_->obtainableBytes(withLookAhead); }));
  }

  // stats(device): that device's figures (the TypeScript side adds them up).
  Napi::Value Stats(const Napi::CallbackInfo& info) {
    size_t d = deviceArg(info, 0);
    return StatsObject::of(info.Env(), guarded(info.Env(), [&] { return cache_->stats(d); }));
  }

  Napi::Value Layout(const Napi::CallbackInfo& info) { return layoutObject(info.Env(), *cache_); }

  void Close(const Napi::CallbackInfo&) {
    if (cache_) cache_->close();
  }

  // Why the prefetch worker could not start, or null.
  Napi::Value WorkerError(const Napi::CallbackInfo& info) {
    std::string why = guarded(info.Env(), [&] { return cache_->workerError(); });
    return why.empty() ? info.Env().Null() : Napi::String::New(info.Env(), why);
  }

  // Test-only: injectFault(op name, nth call from now, kind, delayMs, device)
  void InjectFault(const Napi::CallbackInfo& info) {
    Fault fault = faultFrom(info, 0);
    size_t d = deviceArg(info, 4);
    guarded(info.Env(), [&] { cache_->armFault(d, fault); });
  }

  // Test-only: prefixHashMask(mask: bigint), 0n forces every hash to collide.
  void PrefixHashMask(const Napi::CallbackInfo& info) { cache_->setPrefixHashMask(u64(info[0])); }

  std::shared_ptr<KVCache> cache_;  // shared with the async tasks in flight
  std::vector<GrowRequest> batch_;  // reused by step() to avoid an allocation per call
  AddonData* data_ = nullptr;
};

}  // namespace vat
