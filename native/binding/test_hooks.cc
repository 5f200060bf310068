#include "binding/test_hooks.h"

#include <chrono>
#include <cstdio>
#include <ctime>
#include <thread>

#include <sys/resource.h>

#include "backend/host_backend.h"
#include "binding/js_values.h"
#include "testing/device_tools.h"

namespace vat {

namespace {

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

// vattention/testing: GPU helpers for tests and benchmarks.

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

void TestingBeginCapture(const Napi::CallbackInfo& info) {
  guarded(info.Env(), [&] { testing::beginCapture(dev(info), u64(info[1])); });
}
Napi::Value TestingEndCapture(const Napi::CallbackInfo& info) {
  return big(info.Env(), guarded(info.Env(), [&] { return testing::endCapture(dev(info), u64(info[1])); }));
}
void TestingLaunchGraph(const Napi::CallbackInfo& info) {
  guarded(info.Env(), [&] { testing::launchGraph(dev(info), u64(info[1]), u64(info[2])); });
}
void TestingDestroyGraph(const Napi::CallbackInfo& info) {
  guarded(info.Env(), [&] { testing::destroyGraph(dev(info), u64(info[1])); });
}

void TestingStreamRead(const Napi::CallbackInfo& info) {
  guarded(info.Env(), [&] { testing::streamRead(dev(info), u64(info[1]), u64(info[2]), u64(info[3])); });
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

void TestingWriteRowsU32(const Napi::CallbackInfo& info) {
  guarded(info.Env(), [&] {
    testing::writeRowsU32(dev(info), u64(info[1]), u64(info[2]), u64(info[3]), u64(info[4]), u32(info[5]), u64(info[6]));
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

void TestingCheckFillU32(const Napi::CallbackInfo& info) {
  guarded(info.Env(), [&] {
    testing::checkFillU32(dev(info), u64(info[1]), u64(info[2]), u32(info[3]), u64(info[4]), u64(info[5]));
  });
}

Napi::Value TestingCreateCounter(const Napi::CallbackInfo& info) {
  return big(info.Env(), guarded(info.Env(), [&] { return testing::createCounter(dev(info)); }));
}

Napi::Value TestingReadCounter(const Napi::CallbackInfo& info) {
  return num(info.Env(), guarded(info.Env(), [&] { return testing::readCounter(dev(info), u64(info[1])); }));
}

void TestingDestroyCounter(const Napi::CallbackInfo& info) {
  guarded(info.Env(), [&] { testing::destroyCounter(dev(info), u64(info[1])); });
}

// Bytes of a TypedArray / DataView argument (the TS layer checked its type).
std::pair<uint8_t*, size_t> bytesOf(const Napi::Value& v) {
  if (v.IsDataView()) {
    Napi::DataView d = v.As<Napi::DataView>();
    return {static_cast<uint8_t*>(d.ArrayBuffer().Data()) + d.ByteOffset(), d.ByteLength()};
  }
  Napi::TypedArray t = v.As<Napi::TypedArray>();
  return {static_cast<uint8_t*>(t.ArrayBuffer().Data()) + t.ByteOffset(), t.ByteLength()};
}

Napi::Value TestingAllocate(const Napi::CallbackInfo& info) {
  return big(info.Env(), guarded(info.Env(), [&] { return testing::allocate(dev(info), u64(info[1])); }));
}

void TestingFree(const Napi::CallbackInfo& info) {
  guarded(info.Env(), [&] { testing::free(dev(info), u64(info[1])); });
}

// copyToDevice(device, dst, bytes, stream | undefined): async on a stream when one is given.
void TestingCopyToDevice(const Napi::CallbackInfo& info) {
  auto [data, size] = bytesOf(info[2]);
  guarded(info.Env(), [&] {
    if (info[3].IsUndefined()) testing::copyToDevice(dev(info), u64(info[1]), data, size);
    else testing::copyToDeviceAsync(dev(info), u64(info[1]), data, size, u64(info[3]));
  });
}

// copyOnDevice(device, dst, src, bytes)
void TestingCopyOnDevice(const Napi::CallbackInfo& info) {
  guarded(info.Env(), [&] { testing::copyOnDevice(dev(info), u64(info[1]), u64(info[2]), u64(info[3])); });
}

void TestingCopyFromDevice(const Napi::CallbackInfo& info) {
  auto [data, size] = bytesOf(info[1]);
  guarded(info.Env(), [&] { testing::copyFromDevice(dev(info), data, u64(info[2]), size); });
}

Napi::Value TestingCreateEvent(const Napi::CallbackInfo& info) {
  return big(info.Env(), guarded(info.Env(), [&] { return testing::createEvent(dev(info)); }));
}

void TestingRecordEvent(const Napi::CallbackInfo& info) {
  guarded(info.Env(), [&] { testing::recordEvent(dev(info), u64(info[1]), u64(info[2])); });
}

Napi::Value TestingElapsedMilliseconds(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), guarded(info.Env(), [&] {
                             return testing::elapsedMilliseconds(dev(info), u64(info[1]), u64(info[2]));
                           }));
}

void TestingDestroyEvent(const Napi::CallbackInfo& info) {
  guarded(info.Env(), [&] { testing::destroyEvent(dev(info), u64(info[1])); });
}

Napi::Value TestingDeviceProperties(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  testing::DeviceProperties p = guarded(env, [&] { return testing::deviceProperties(dev(info)); });
  Napi::Object o = Napi::Object::New(env);
  o.Set("multiprocessors", p.multiprocessors);
  o.Set("memoryClockKHz", p.memoryClockKHz);
  o.Set("busWidthBits", p.busWidthBits);
  o.Set("l2Bytes", p.l2Bytes);
  char bus[32];
  std::snprintf(bus, sizeof bus, "%04x:%02x:%02x.0", p.pciDomain, p.pciBus, p.pciDevice);
  o.Set("pciBusId", std::string(bus));
  return o;
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

Napi::Object rawTimesObject(Napi::Env env, const testing::RawVmmTimes& t) {
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

Napi::Value TestingRawVmmLoop(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return rawTimesObject(env, guarded(env, [&] { return testing::rawVmmLoop(dev(info), u64(info[1])); }));
}

// rawVmmLoopConcurrent(devices: number[], pages) -> { wallNs, threads: RawVmmTimes[] }
Napi::Value TestingRawVmmLoopConcurrent(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array list = info[0].As<Napi::Array>();
  std::vector<int> devices;
  for (uint32_t i = 0; i < list.Length(); ++i) devices.push_back(static_cast<int>(u32(list.Get(i))));
  testing::ConcurrentVmmTimes t = guarded(env, [&] { return testing::rawVmmLoopConcurrent(devices, u64(info[1])); });
  Napi::Object o = Napi::Object::New(env);
  o.Set("wallNs", num(env, t.wallNs));
  Napi::Array threads = Napi::Array::New(env, t.threads.size());
  for (uint32_t i = 0; i < t.threads.size(); ++i) threads.Set(i, rawTimesObject(env, t.threads[i]));
  o.Set("threads", threads);
  return o;
}

// threadUsage() -> [cpuNs, minorFaults, voluntarySwitches, involuntarySwitches]
// of the calling thread: CLOCK_THREAD_CPUTIME_ID is exact (the kernel brings
// the running task's time up to date), unlike /proc's tick-based figures.
Napi::Value TestingThreadUsage(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  timespec cpu{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu);
  rusage usage{};
  getrusage(RUSAGE_THREAD, &usage);
  Napi::Array out = Napi::Array::New(env, 4);
  out.Set(0u, num(env, uint64_t(cpu.tv_sec) * 1000000000ull + uint64_t(cpu.tv_nsec)));
  out.Set(1u, num(env, uint64_t(usage.ru_minflt)));
  out.Set(2u, num(env, uint64_t(usage.ru_nvcsw)));
  out.Set(3u, num(env, uint64_t(usage.ru_nivcsw)));
  return out;
}

Napi::Object TestingExports(Napi::Env env) {
  Napi::Object t = Napi::Object::New(env);
  t.Set("deviceMemory", Napi::Function::New<TestingDeviceMemory>(env));
  t.Set("fillU32", Napi::Function::New<TestingFillU32>(env));
  t.Set("spinThenFillU32", Napi::Function::New<TestingSpinThenFillU32>(env));
  t.Set("writeTokens", Napi::Function::New<TestingWriteTokens>(env));
  t.Set("spinThenReadU32", Napi::Function::New<TestingSpinThenReadU32>(env));
  t.Set("streamRead", Napi::Function::New<TestingStreamRead>(env));
  t.Set("beginCapture", Napi::Function::New<TestingBeginCapture>(env));
  t.Set("endCapture", Napi::Function::New<TestingEndCapture>(env));
  t.Set("launchGraph", Napi::Function::New<TestingLaunchGraph>(env));
  t.Set("destroyGraph", Napi::Function::New<TestingDestroyGraph>(env));
  t.Set("createStream", Napi::Function::New<TestingCreateStream>(env));
  t.Set("destroyStream", Napi::Function::New<TestingDestroyStream>(env));
  t.Set("synchronizeStream", Napi::Function::New<TestingSynchronizeStream>(env));
  t.Set("rawVmmLoop", Napi::Function::New<TestingRawVmmLoop>(env));
  t.Set("rawVmmLoopConcurrent", Napi::Function::New<TestingRawVmmLoopConcurrent>(env));
  t.Set("threadUsage", Napi::Function::New<TestingThreadUsage>(env));
  t.Set("createContext", Napi::Function::New<TestingCreateContext>(env));
  t.Set("checkFillU32", Napi::Function::New<TestingCheckFillU32>(env));
  t.Set("createCounter", Napi::Function::New<TestingCreateCounter>(env));
  t.Set("readCounter", Napi::Function::New<TestingReadCounter>(env));
  t.Set("destroyCounter", Napi::Function::New<TestingDestroyCounter>(env));
  t.Set("destroyContext", Napi::Function::New<TestingDestroyContext>(env));
  t.Set("setCurrentContext", Napi::Function::New<TestingSetCurrentContext>(env));
  t.Set("currentContext", Napi::Function::New<TestingCurrentContext>(env));
  t.Set("allocate", Napi::Function::New<TestingAllocate>(env));
  t.Set("writeRowsU32", Napi::Function::New<TestingWriteRowsU32>(env));
  t.Set("free", Napi::Function::New<TestingFree>(env));
  t.Set("copyToDevice", Napi::Function::New<TestingCopyToDevice>(env));
  t.Set("copyOnDevice", Napi::Function::New<TestingCopyOnDevice>(env));
  t.Set("copyFromDevice", Napi::Function::New<TestingCopyFromDevice>(env));
  t.Set("createEvent", Napi::Function::New<TestingCreateEvent>(env));
  t.Set("recordEvent", Napi::Function::New<TestingRecordEvent>(env));
  t.Set("elapsedMilliseconds", Napi::Function::New<TestingElapsedMilliseconds>(env));
  t.Set("destroyEvent", Napi::Function::New<TestingDestroyEvent>(env));
  t.Set("deviceProperties", Napi::Function::New<TestingDeviceProperties>(env));
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

// The ThreadSanitizer run's mutation (scripts/test-tsan.sh): a data race on a
// libuv pool thread, written on purpose. A work item increments a counter on
// a pool thread while this thread increments it too, with nothing ordering
// the two. TSan must report it: a suppression file that hides races on pool
// threads (as one matching uv_* did: every pool thread is created by libuv)
// hides this one too.
uint64_t racyCounter = 0;

class RacyWork : public Napi::AsyncWorker {
 public:
  explicit RacyWork(Napi::Env env) : Napi::AsyncWorker(env, "vattention.racePoolThread") {}
  void Execute() override { ++racyCounter; }
};

void RacePoolThread(const Napi::CallbackInfo& info) {
  (new RacyWork(info.Env()))->Queue();
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // the pool thread runs meanwhile
  ++racyCounter;
}

void InjectNextCacheFault(const Napi::CallbackInfo& info) { armNextBackendFault(faultFrom(info, 0)); }

// Test-only: hold / finish a host-backend stream (see holdHostStream).
void HoldHostStream(const Napi::CallbackInfo& info) { holdHostStream(u64(info[0])); }
void FinishHostStream(const Napi::CallbackInfo& info) { finishHostStream(u64(info[0])); }

}  // namespace

Fault faultFrom(const Napi::CallbackInfo& info, size_t first) {
  Napi::Env env = info.Env();
  Fault f;
  f.op = opNamed(env, info[first]);
  f.countdown = u64(info[first + 1]);
  std::string kind = info[first + 2].IsString() ? info[first + 2].As<Napi::String>().Utf8Value() : "";
  if (kind == "outOfMemory") f.kind = FaultKind::OutOfMemory;
  else if (kind == "error") f.kind = FaultKind::Error;
  else if (kind == "errorInClose") f.kind = FaultKind::Error, f.inClose = true;
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

void addTestHooks(Napi::Env env, Napi::Object exports) {
  exports.Set("testing", TestingExports(env));
  exports.Set("liveResources", Napi::Function::New<LiveResourceCounts>(env));
  exports.Set("injectNextCacheFault", Napi::Function::New<InjectNextCacheFault>(env));
  exports.Set("racePoolThread", Napi::Function::New<RacePoolThread>(env));
  exports.Set("holdHostStream", Napi::Function::New<HoldHostStream>(env));
  exports.Set("finishHostStream", Napi::Function::New<FinishHostStream>(env));
}

}  // namespace vat
