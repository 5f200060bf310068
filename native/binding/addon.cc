// N-API binding: converts arguments and results, and errors into JS errors
// with a `code`. No policy lives here; arguments were validated in
// TypeScript (lib/options.ts) and the core checks what it must itself.
#include <napi.h>

#include <memory>
#include <atomic>
#include <set>

#include "backend/cuda_backend.h"
#include "backend/host_backend.h"
#include "cache/kv_cache.h"
#include "common/errors.h"
#include "common/lifetime.h"
#include "driver/cuda_driver.h"
#include "testing/device_tools.h"

extern "C" const int vat_cuda_types_checked;

namespace vat {
namespace {

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
  return err;
}

// Runs `body`, turning library and C++ errors into JS exceptions.
template <typename F>
auto guarded(Napi::Env env, F&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const Error& e) {
    throw toJsError(env, e);
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::bad_alloc&) {
    Napi::Error err = Napi::Error::New(env, "host out of memory (std::bad_alloc)");
    err.Set("code", "ERR_OUT_OF_MEMORY");
    throw err;
  } catch (const std::exception& e) {
    Napi::Error err = Napi::Error::New(env, std::string("internal error: ") + e.what());
    err.Set("code", "ERR_INTERNAL");
    throw err;
  }
}

uint32_t u32(const Napi::Value& v) { return v.As<Napi::Number>().Uint32Value(); }
uint64_t u64(const Napi::Value& v) {
  if (v.IsBigInt()) {
    bool lossless = true;
    return v.As<Napi::BigInt>().Uint64Value(&lossless);
  }
  return static_cast<uint64_t>(v.As<Napi::Number>().Int64Value());
}
Napi::Value num(Napi::Env env, uint64_t v) { return Napi::Number::New(env, static_cast<double>(v)); }
Napi::Value big(Napi::Env env, uint64_t v) { return Napi::BigInt::New(env, v); }

// The backend operation called `name` (fault injection); ERR_INVALID_ARGUMENT otherwise.
BackendOp opNamed(Napi::Env env, const Napi::Value& name) {
  std::string text = name.IsString() ? name.As<Napi::String>().Utf8Value() : "";
  for (size_t i = 0; i < kBackendOpCount; ++i)
    if (text == backendOpName(static_cast<BackendOp>(i))) return static_cast<BackendOp>(i);
  if (text == backendOpName(BackendOp::StartWorker)) return BackendOp::StartWorker;
  Napi::Error err = Napi::Error::New(env, "unknown backend op: " + text);
  err.Set("code", "ERR_INVALID_ARGUMENT");
  throw err;
}

class NativeCache;

// An Error as a JS error object with raw Node-API calls, which report
// failure instead of throwing or aborting: used where the environment may be
// going away. False when any call failed.
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
  *out = error;
  return true;
}

// A library Error for whatever a growth on a pool thread threw.
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

// growAsync: the driver calls run on a libuv pool thread, off the cache's
// lock (KVCache::growDetached); the promise settles on the JS thread. The
// settling uses raw Node-API calls and gives up quietly when the environment
// is being torn down (a worker thread ending, the process exiting): then no
// one is left to settle for, and throwing there would abort the process.
class GrowTask : public Napi::AsyncWorker {
 public:
  GrowTask(Napi::Env env, std::shared_ptr<KVCache> cache, SequenceRef seq, uint64_t tokens,
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
  std::shared_ptr<KVCache> cache_;
  SequenceRef seq_;
  uint64_t tokens_;
  std::shared_ptr<std::atomic<bool>> cancel_;
  std::unique_ptr<Error> error_;
};

// A test-armed fault: (op name, nth call from now, kind name, delay in ms).
Fault faultFrom(const Napi::CallbackInfo& info, size_t first);

// Per-environment state (main thread and each worker thread): the live
// caches, closed when the environment is torn down.
struct AddonData {
  std::set<NativeCache*> live;
};

class NativeCache : public Napi::ObjectWrap<NativeCache> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeCache",
                       {
                           InstanceMethod<&NativeCache::Reserve>("reserve"),
                           InstanceMethod<&NativeCache::Grow>("grow"),
                           InstanceMethod<&NativeCache::Step>("step"),
                           InstanceMethod<&NativeCache::GrowAsync>("growAsync"),
                           InstanceMethod<&NativeCache::Release>("release"),
                           InstanceMethod<&NativeCache::Reclaim>("reclaim"),
                           InstanceMethod<&NativeCache::Trim>("trim"),
                           InstanceMethod<&NativeCache::Write>("write"),
                           InstanceMethod<&NativeCache::Read>("read"),
                           InstanceMethod<&NativeCache::Tokens>("tokens"),
                           InstanceMethod<&NativeCache::Stats>("stats"),
                           InstanceMethod<&NativeCache::Layout>("layout"),
                           InstanceMethod<&NativeCache::Close>("close"),
                           InstanceMethod<&NativeCache::WorkerError>("workerError"),
                           InstanceMethod<&NativeCache::InjectFault>("injectFault"),
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
    opts.device = static_cast<int>(u32(o.Get("device")));
    opts.pageSize = static_cast<size_t>(u64(o.Get("pageSize")));
    opts.memoryBudget = u64(o.Get("memoryBudget"));
    opts.prefillBytes = u64(o.Get("prefillBytes"));
    opts.prefetchTokens = u32(o.Get("prefetchTokens"));
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
    SequenceRef r = guarded(env, [&] { return cache_->reserve(expected); });
    Napi::Array out = Napi::Array::New(env, 2);
    out.Set(0u, r.slot);
    out.Set(1u, r.generation);
    return out;
  }

  Napi::Value Grow(const Napi::CallbackInfo& info) {
    return num(info.Env(), guarded(info.Env(), [&] { return cache_->grow(seq(info), u64(info[2])); }));
  }

  // step(slots: Uint32Array, generations: Uint32Array, tokens: Uint32Array, n):
  // the first n entries of reused arrays (no allocation per step on the JS side).
  Napi::Value Step(const Napi::CallbackInfo& info) {
    auto slots = info[0].As<Napi::Uint32Array>();
    auto gens = info[1].As<Napi::Uint32Array>();
    auto tokens = info[2].As<Napi::Uint32Array>();
    size_t n = std::min<size_t>(u32(info[3]), slots.ElementLength());
    batch_.resize(n);
    for (size_t i = 0; i < n; ++i) batch_[i] = {{slots[i], gens[i]}, tokens[i]};
    return num(info.Env(), guarded(info.Env(), [&] { return cache_->step(batch_); }));
  }

  // growAsync(slot, gen, tokens) -> [Promise, cancel()]
  Napi::Value GrowAsync(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto cancel = std::make_shared<std::atomic<bool>>(false);
    auto* task = new GrowTask(env, cache_, seq(info), u64(info[2]), cancel);
    napi_value promise = task->promise();
    task->Queue();
    Napi::Array out = Napi::Array::New(env, 2);
    out.Set(0u, Napi::Value(env, promise));
    out.Set(1u, Napi::Function::New(env, [cancel](const Napi::CallbackInfo&) { cancel->store(true); }));
    return out;
  }

  void Release(const Napi::CallbackInfo& info) {
    std::optional<uint64_t> stream;
    if (info.Length() > 2 && info[2].IsBigInt()) stream = u64(info[2]);
    guarded(info.Env(), [&] { cache_->release(seq(info), stream); });
  }

  Napi::Value Reclaim(const Napi::CallbackInfo& info) {
    uint64_t bytes = info.Length() > 0 && !info[0].IsUndefined() ? u64(info[0]) : UINT64_MAX;
    return num(info.Env(), guarded(info.Env(), [&] { return cache_->reclaim(bytes); }));
  }

  Napi::Value Trim(const Napi::CallbackInfo& info) {
    return num(info.Env(), guarded(info.Env(), [&] { return cache_->trim(); }));
  }

  // write(slot, gen, layer, kind, token, Uint8Array)
  void Write(const Napi::CallbackInfo& info) {
    Napi::Uint8Array data = info[5].As<Napi::Uint8Array>();
    guarded(info.Env(), [&] {
      cache_->write(seq(info), u32(info[2]), static_cast<KVKind>(u32(info[3])), u64(info[4]), data.Data(),
                    data.ByteLength());
    });
  }

  void Read(const Napi::CallbackInfo& info) {
    Napi::Uint8Array out = info[5].As<Napi::Uint8Array>();
    guarded(info.Env(), [&] {
      cache_->read(seq(info), u32(info[2]), static_cast<KVKind>(u32(info[3])), u64(info[4]), out.Data(),
                   out.ByteLength());
    });
  }

  Napi::Value Tokens(const Napi::CallbackInfo& info) {
    return num(info.Env(), guarded(info.Env(), [&] { return cache_->tokens(seq(info)); }));
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    CacheStats st = guarded(env, [&] { return cache_->stats(); });
    Napi::Object o = Napi::Object::New(env);
    o.Set("backend", st.backend);
    o.Set("pageSize", num(env, st.pageSize));
    o.Set("budgetBytes", num(env, st.budgetBytes));
    o.Set("pagesCreated", num(env, st.pages.created));
    o.Set("pagesMapped", num(env, st.pages.mapped));
    o.Set("pagesPooled", num(env, st.pages.idle));
    o.Set("pagesStranded", num(env, st.pages.stranded));
    o.Set("bytesBacked", num(env, st.bytesBacked));
    o.Set("bytesUsed", num(env, st.bytesUsed));
    o.Set("activeSequences", num(env, st.activeSequences));
    o.Set("reservedVirtualBytes", num(env, st.reservedVirtualBytes));
    o.Set("pagesReclaimed", num(env, st.reclaimedPages));
    o.Set("pagesReused", num(env, st.reusedPages));
    o.Set("driverCallsOnJsThread", num(env, st.callsOnOwnerThread));
    Napi::Object pf = Napi::Object::New(env);
    pf.Set("tokens", cache_->prefetchTokens());
    pf.Set("hits", num(env, st.prefetch.hits));
    pf.Set("misses", num(env, st.prefetch.misses));
    pf.Set("pagesAhead", num(env, st.prefetch.pagesAhead));
    pf.Set("pagesOnDemand", num(env, st.prefetch.pagesOnDemand));
    pf.Set("stallNanoseconds", num(env, st.prefetch.stallNanos));
    pf.Set("errors", num(env, st.prefetch.errors));
    pf.Set("workerError", st.prefetch.workerError.empty() ? env.Null() : Napi::String::New(env, st.prefetch.workerError));
    o.Set("prefetch", pf);
    Napi::Array slots = Napi::Array::New(env, st.slots.size());
    for (size_t i = 0; i < st.slots.size(); ++i) {
      const SlotStats& s = st.slots[i];
      Napi::Object so = Napi::Object::New(env);
      so.Set("slot", s.slot);
      so.Set("active", s.active);
      so.Set("tokens", num(env, s.tokens));
      so.Set("backedTokens", num(env, s.backedTokens));
      so.Set("mappedPages", num(env, s.mappedPages));
      slots.Set(static_cast<uint32_t>(i), so);
    }
    o.Set("slots", slots);
    Napi::Object calls = Napi::Object::New(env);
    for (size_t i = 0; i < kBackendOpCount; ++i) {
      Napi::Object c = Napi::Object::New(env);
      c.Set("calls", num(env, st.calls[i].calls));
      c.Set("nanoseconds", num(env, st.calls[i].nanos));
      calls.Set(backendOpName(static_cast<BackendOp>(i)), c);
    }
    o.Set("driverCalls", calls);
    return o;
  }

  Napi::Value Layout(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const KVLayout& l = cache_->layout();
    const ModelShape& shape = l.shape();
    Napi::Object o = Napi::Object::New(env);
    const CacheDescription& d = cache_->description();
    o.Set("base", big(env, d.base));
    o.Set("pageSize", num(env, d.pageSize));
    o.Set("granularity", num(env, d.granularity));
    o.Set("backend", d.backend);
    o.Set("tokenBytes", num(env, l.tokenBytes()));
    o.Set("bytesPerToken", num(env, l.bytesPerToken()));
    o.Set("pagesPerGroup", num(env, l.pagesPerGroup()));
    o.Set("rangeBytes", num(env, l.rangeBytes()));
    Napi::Array tensors = Napi::Array::New(env);
    uint32_t n = 0;
    for (uint32_t layer = 0; layer < shape.layers; ++layer) {
      for (KVKind kind : {KVKind::K, KVKind::V}) {
        TensorView v = l.tensor(layer, kind);
        Napi::Object t = Napi::Object::New(env);
        t.Set("offset", big(env, v.offset));
        Napi::Array strides = Napi::Array::New(env, 4);
        for (uint32_t d = 0; d < 4; ++d) strides.Set(d, num(env, v.strideElements[d]));
        t.Set("strideElements", strides);
        tensors.Set(n++, t);
      }
    }
    o.Set("tensors", tensors);
    return o;
  }

  void Close(const Napi::CallbackInfo&) {
    if (cache_) cache_->close();
  }

  // Why the prefetch worker could not start, or null.
  Napi::Value WorkerError(const Napi::CallbackInfo& info) {
    std::string why = guarded(info.Env(), [&] { return cache_->workerError(); });
    return why.empty() ? info.Env().Null() : Napi::String::New(info.Env(), why);
  }

  // Test-only: injectFault(op name, nth call from now, kind, delayMs)
  void InjectFault(const Napi::CallbackInfo& info) {
    Fault fault = faultFrom(info, 0);
    guarded(info.Env(), [&] { cache_->armFault(fault); });
  }

  std::shared_ptr<KVCache> cache_;  // shared with GrowTasks in flight
  std::vector<GrowRequest> batch_;  // reused by step() to avoid an allocation per call
  AddonData* data_ = nullptr;
};

// driverInfo(): what loading the driver found, and the devices.
Napi::Value DriverInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  cu::DriverStatus st = cu::driverStatus();
  Napi::Object o = Napi::Object::New(env);
  o.Set("loaded", st.loaded);
  o.Set("library", st.library);
  o.Set("problem", st.problem);
  o.Set("version", st.version);
  o.Set("typesCheckedAgainst", vat_cuda_types_checked);
  Napi::Array devices = Napi::Array::New(env);
  if (st.loaded) {
    std::vector<CudaDeviceInfo> list = guarded(env, [] { return listCudaDevices(); });
    for (uint32_t i = 0; i < list.size(); ++i) {
      Napi::Object d = Napi::Object::New(env);
      d.Set("ordinal", list[i].ordinal);
      d.Set("name", list[i].name);
      d.Set("totalBytes", num(env, list[i].totalBytes));
      d.Set("computeCapability", std::to_string(list[i].computeMajor) + "." + std::to_string(list[i].computeMinor));
      d.Set("vmmSupported", list[i].vmmSupported);
      d.Set("granularity", num(env, list[i].granularity));
      devices.Set(i, d);
    }
  }
  o.Set("devices", devices);
  return o;
}

// --- vattention/testing: GPU helpers for tests and benchmarks -------------

int dev(const Napi::CallbackInfo& info) { return static_cast<int>(u32(info[0])); }

Napi::Value TestingDeviceMemory(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  MemoryInfo m = guarded(env, [&] { return testing::deviceMemory(dev(info)); });
  Napi::Object o = Napi::Object::New(env);
  o.Set("freeBytes", num(env, m.freeBytes));
  o.Set("totalBytes", num(env, m.totalBytes));
  return o;
}

void TestingFillU32(const Napi::CallbackInfo& info) {
  guarded(info.Env(), [&] {
    testing::fillU32(dev(info), u64(info[1]), u64(info[2]), u32(info[3]), u64(info[4]));
  });
}

void TestingSpinThenFillU32(const Napi::CallbackInfo& info) {
  guarded(info.Env(), [&] {
    testing::spinThenFillU32(dev(info), u64(info[1]), u64(info[2]), u32(info[3]), u64(info[4]), u64(info[5]));
  });
}

void TestingSpinThenReadU32(const Napi::CallbackInfo& info) {
  guarded(info.Env(), [&] { testing::spinThenReadU32(dev(info), u64(info[1]), u64(info[2]), u64(info[3]), u64(info[4])); });
}

// writeTokens(device, base, tensors, tensorStride, slotStride, tokenBytes, seed, entries: BigUint64Array, stream)
void TestingWriteTokens(const Napi::CallbackInfo& info) {
  Napi::TypedArrayOf<uint64_t> entries = info[7].As<Napi::TypedArrayOf<uint64_t>>();
  std::vector<uint64_t> list(entries.Data(), entries.Data() + entries.ElementLength());
  guarded(info.Env(), [&] {
    testing::writeTokens(dev(info), u64(info[1]), u32(info[2]), u64(info[3]), u64(info[4]), u64(info[5]),
                         u32(info[6]), list, u64(info[8]));
  });
}

Napi::Value TestingCreateStream(const Napi::CallbackInfo& info) {
  return big(info.Env(), guarded(info.Env(), [&] { return testing::createStream(dev(info)); }));
}

void TestingDestroyStream(const Napi::CallbackInfo& info) {
  guarded(info.Env(), [&] { testing::destroyStream(dev(info), u64(info[1])); });
}

void TestingSynchronizeStream(const Napi::CallbackInfo& info) {
  guarded(info.Env(), [&] { testing::synchronizeStream(dev(info), u64(info[1])); });
}

Napi::Value TestingCreateContext(const Napi::CallbackInfo& info) {
  return big(info.Env(), guarded(info.Env(), [&] { return testing::createContext(dev(info)); }));
}

void TestingDestroyContext(const Napi::CallbackInfo& info) {
  guarded(info.Env(), [&] { testing::destroyContext(u64(info[0])); });
}

void TestingSetCurrentContext(const Napi::CallbackInfo& info) {
  guarded(info.Env(), [&] { testing::setCurrentContext(u64(info[0])); });
}

Napi::Value TestingCurrentContext(const Napi::CallbackInfo& info) {
  return big(info.Env(), guarded(info.Env(), [&] { return testing::currentContext(); }));
}

Napi::Value TestingRawVmmLoop(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  testing::RawVmmTimes t = guarded(env, [&] { return testing::rawVmmLoop(dev(info), u64(info[1])); });
  Napi::Object o = Napi::Object::New(env);
  o.Set("pages", num(env, t.pages));
  o.Set("pageSize", num(env, t.pageSize));
  o.Set("createNs", num(env, t.createNs));
  o.Set("mapNs", num(env, t.mapNs));
  o.Set("setAccessNs", num(env, t.setAccessNs));
  o.Set("unmapNs", num(env, t.unmapNs));
  o.Set("releaseNs", num(env, t.releaseNs));
  return o;
}

Napi::Object TestingExports(Napi::Env env) {
  Napi::Object t = Napi::Object::New(env);
  t.Set("deviceMemory", Napi::Function::New<TestingDeviceMemory>(env));
  t.Set("fillU32", Napi::Function::New<TestingFillU32>(env));
  t.Set("spinThenFillU32", Napi::Function::New<TestingSpinThenFillU32>(env));
  t.Set("writeTokens", Napi::Function::New<TestingWriteTokens>(env));
  t.Set("spinThenReadU32", Napi::Function::New<TestingSpinThenReadU32>(env));
  t.Set("createStream", Napi::Function::New<TestingCreateStream>(env));
  t.Set("destroyStream", Napi::Function::New<TestingDestroyStream>(env));
  t.Set("synchronizeStream", Napi::Function::New<TestingSynchronizeStream>(env));
  t.Set("rawVmmLoop", Napi::Function::New<TestingRawVmmLoop>(env));
  t.Set("createContext", Napi::Function::New<TestingCreateContext>(env));
  t.Set("destroyContext", Napi::Function::New<TestingDestroyContext>(env));
  t.Set("setCurrentContext", Napi::Function::New<TestingSetCurrentContext>(env));
  t.Set("currentContext", Napi::Function::New<TestingCurrentContext>(env));
  return t;
}

// Test-only: live driver/OS resources of the process, and a fault armed for
// the next cache constructed.
Napi::Value LiveResourceCounts(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  LiveResources& live = liveResources();
  Napi::Object o = Napi::Object::New(env);
  o.Set("ranges", Napi::Number::New(env, static_cast<double>(live.ranges.load())));
  o.Set("pages", Napi::Number::New(env, static_cast<double>(live.pages.load())));
  o.Set("mappings", Napi::Number::New(env, static_cast<double>(live.mappings.load())));
  o.Set("fences", Napi::Number::New(env, static_cast<double>(live.fences.load())));
  o.Set("contexts", Napi::Number::New(env, static_cast<double>(live.contexts.load())));
  return o;
}

Fault faultFrom(const Napi::CallbackInfo& info, size_t first) {
  Napi::Env env = info.Env();
  Fault f;
  f.op = opNamed(env, info[first]);
  f.countdown = u64(info[first + 1]);
  std::string kind = info[first + 2].IsString() ? info[first + 2].As<Napi::String>().Utf8Value() : "";
  if (kind == "outOfMemory") f.kind = FaultKind::OutOfMemory;
  else if (kind == "error") f.kind = FaultKind::Error;
  else if (kind == "hostAlloc") f.kind = FaultKind::HostAlloc;
  else if (kind == "delay") f.kind = FaultKind::Delay;
  else {
    Napi::Error err = Napi::Error::New(env, "unknown fault kind: " + kind);
    err.Set("code", "ERR_INVALID_ARGUMENT");
    throw err;
  }
  f.delayMs = info.Length() > first + 3 && info[first + 3].IsNumber() ? u32(info[first + 3]) : 0;
  return f;
}

void InjectNextCacheFault(const Napi::CallbackInfo& info) { armNextBackendFault(faultFrom(info, 0)); }

// Test-only: hold / finish a host-backend stream (see holdHostStream).
void HoldHostStream(const Napi::CallbackInfo& info) { holdHostStream(u64(info[0])); }
void FinishHostStream(const Napi::CallbackInfo& info) { finishHostStream(u64(info[0])); }

void CloseAllInEnv(void* arg) {
  auto* data = static_cast<AddonData*>(arg);
  for (NativeCache* c : data->live) c->closeFromCleanupHook();
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  watchProcessExit();
  auto* data = new AddonData();
  env.SetInstanceData<AddonData>(data);
  napi_add_env_cleanup_hook(env, CloseAllInEnv, data);
  exports.Set("NativeCache", NativeCache::Define(env));
  exports.Set("driverInfo", Napi::Function::New<DriverInfo>(env, "driverInfo"));
  exports.Set("testing", TestingExports(env));
  exports.Set("liveResources", Napi::Function::New<LiveResourceCounts>(env));
  exports.Set("injectNextCacheFault", Napi::Function::New<InjectNextCacheFault>(env));
  exports.Set("holdHostStream", Napi::Function::New<HoldHostStream>(env));
  exports.Set("finishHostStream", Napi::Function::New<FinishHostStream>(env));
  return exports;
}

}  // namespace
}  // namespace vat

static Napi::Object InitVattention(Napi::Env env, Napi::Object exports) { return vat::Init(env, exports); }
NODE_API_MODULE(vattention, InitVattention)
