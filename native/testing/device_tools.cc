#include "testing/device_tools.h"

#include <exception>

#include <condition_variable>

#include <thread>

#include <chrono>
#include <cstring>
#include <map>
#include <mutex>

#include "common/errors.h"
#include "driver/cuda_driver.h"

namespace vat::testing {

extern const char kKernelsPtx[];
extern const char kReadKernelsPtx[];

using namespace cu;

namespace {

struct DeviceKernels {
  CUcontext context = nullptr;
  CUfunction fill = nullptr;
  CUfunction spinFill = nullptr;
  CUfunction writeTokens = nullptr;
  CUfunction spinRead = nullptr;
  CUfunction checkFill = nullptr;
  CUfunction writeRows = nullptr;
  CUfunction streamRead = nullptr;
  int multiprocessors = 0;
};

// Loaded once per device and kept for the process: the primary context stays
// retained by these tools, so memory figures compare against a live context.
DeviceKernels& kernels(int device) {
  static std::mutex lock;
  static auto* loaded = new std::map<int, DeviceKernels>();
  std::lock_guard<std::mutex> guard(lock);
  auto it = loaded->find(device);
  if (it != loaded->end()) {
    check(driver().cuCtxSetCurrent(it->second.context), "cuCtxSetCurrent");
    return it->second;
  }
  const DriverApi& d = driver();
  DeviceKernels k;
  CUdevice dev = 0;
  check(d.cuDeviceGet(&dev, device), "cuDeviceGet");
  check(d.cuDevicePrimaryCtxRetain(&k.context, dev), "cuDevicePrimaryCtxRetain");
  check(d.cuCtxSetCurrent(k.context), "cuCtxSetCurrent");
  CUmodule module = nullptr;
  check(d.cuModuleLoadData(&module, kKernelsPtx), "cuModuleLoadData");
  check(d.cuModuleGetFunction(&k.fill, module, "vat_fill_u32"), "cuModuleGetFunction");
  check(d.cuModuleGetFunction(&k.spinFill, module, "vat_spin_fill_u32"), "cuModuleGetFunction");
  check(d.cuModuleGetFunction(&k.writeTokens, module, "vat_write_tokens"), "cuModuleGetFunction");
  CUmodule readModule = nullptr;
  check(d.cuModuleLoadData(&readModule, kReadKernelsPtx), "cuModuleLoadData");
  check(d.cuModuleGetFunction(&k.spinRead, readModule, "vat_spin_then_read_u32"), "cuModuleGetFunction");
  check(d.cuModuleGetFunction(&k.checkFill, readModule, "vat_check_fill_u32"), "cuModuleGetFunction");
  check(d.cuModuleGetFunction(&k.writeRows, readModule, "vat_write_rows_u32"), "cuModuleGetFunction");
  check(d.cuModuleGetFunction(&k.streamRead, readModule, "vat_stream_read"), "cuModuleGetFunction");
  check(d.cuDeviceGetAttribute(&k.multiprocessors, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev), "cuDeviceGetAttribute");
  return (*loaded)[device] = k;
}

unsigned blocksFor(uint64_t count) {
  uint64_t blocks = (count + 255) / 256;
  return static_cast<unsigned>(blocks < 4096 ? (blocks ? blocks : 1) : 4096);
}

CUstream asStream(uint64_t s) { return reinterpret_cast<CUstream>(s); }

}  // namespace

MemoryInfo deviceMemory(int device) {
  kernels(device);
  size_t freeBytes = 0, total = 0;
  check(driver().cuMemGetInfo(&freeBytes, &total), "cuMemGetInfo");
  return {freeBytes, total};
}

void fillU32(int device, uint64_t address, uint64_t count, uint32_t seed, uint64_t stream) {
  DeviceKernels& k = kernels(device);
  void* args[] = {&address, &count, &seed};
  check(driver().cuLaunchKernel(k.fill, blocksFor(count), 1, 1, 256, 1, 1, 0, asStream(stream), args, nullptr),
        "cuLaunchKernel");
}

void spinThenFillU32(int device, uint64_t address, uint64_t count, uint32_t value, uint64_t nanoseconds,
                     uint64_t stream) {
  DeviceKernels& k = kernels(device);
  void* args[] = {&address, &count, &value, &nanoseconds};
  check(driver().cuLaunchKernel(k.spinFill, blocksFor(count), 1, 1, 256, 1, 1, 0, asStream(stream), args, nullptr),
        "cuLaunchKernel");
}

void spinThenReadU32(int device, uint64_t address, uint64_t count, uint64_t nanoseconds, uint64_t stream) {
  DeviceKernels& k = kernels(device);
  uint64_t sink = 0;
  void* args[] = {&address, &count, &nanoseconds, &sink};
  check(driver().cuLaunchKernel(k.spinRead, blocksFor(count), 1, 1, 256, 1, 1, 0, asStream(stream), args, nullptr),
        "cuLaunchKernel");
}

void streamRead(int device, uint64_t address, uint64_t bytes, uint64_t stream) {
  DeviceKernels& k = kernels(device);
  uint64_t words = bytes / 16, sink = 0;
  unsigned never = 0x9e3779b9u;
  void* args[] = {&address, &words, &never, &sink};
  // 4 blocks of 512 threads per multiprocessor: every thread slot filled.
  check(driver().cuLaunchKernel(k.streamRead, 4 * k.multiprocessors, 1, 1, 512, 1, 1, 0, asStream(stream), args, nullptr),
        "cuLaunchKernel");
}

void checkFillU32(int device, uint64_t address, uint64_t count, uint32_t seed, uint64_t counter, uint64_t stream) {
  DeviceKernels& k = kernels(device);
  void* args[] = {&address, &count, &seed, &counter};
  check(driver().cuLaunchKernel(k.checkFill, blocksFor(count), 1, 1, 256, 1, 1, 0, asStream(stream), args, nullptr),
        "cuLaunchKernel");
}

uint64_t createCounter(int device) {
  kernels(device);
  CUdeviceptr p = 0;
  check(driver().cuMemAlloc(&p, sizeof(uint32_t)), "cuMemAlloc");
  uint32_t zero = 0;
  check(driver().cuMemcpyHtoD(p, &zero, sizeof zero), "cuMemcpyHtoD");
  return p;
}

uint32_t readCounter(int device, uint64_t counter) {
  kernels(device);
  uint32_t v = 0;
  check(driver().cuMemcpyDtoH(&v, counter, sizeof v), "cuMemcpyDtoH");
  return v;
}

void destroyCounter(int device, uint64_t counter) {
  kernels(device);
  check(driver().cuMemFree(counter), "cuMemFree");
}

void writeTokens(int device, uint64_t base, uint32_t tensors, uint64_t tensorStride, uint64_t slotStride,
                 uint64_t tokenBytes, uint32_t seed, const std::vector<uint64_t>& entries, uint64_t stream) {
  if (entries.empty()) return;
  if (entries.size() > kMaxWriteEntries)
    fail(ErrorCode::InvalidArgument, "writeTokens takes at most 256 entries per launch");
  DeviceKernels& k = kernels(device);
  uint64_t table[kMaxWriteEntries] = {0};
  std::memcpy(table, entries.data(), entries.size() * sizeof(uint64_t));
  void* args[] = {&base, &tensorStride, &slotStride, &tokenBytes, &seed, table};
  check(driver().cuLaunchKernel(k.writeTokens, static_cast<unsigned>(entries.size()), tensors, 1, 128, 1, 1, 0,
                                asStream(stream), args, nullptr),
        "cuLaunchKernel");
}

void writeRowsU32(int device, uint64_t address, uint64_t stride, uint64_t rows, uint64_t rowBytes, uint32_t seed,
                  uint64_t stream) {
  if (rowBytes % 4 != 0) fail(ErrorCode::InvalidArgument, "writeRowsU32: rowBytes must be a multiple of 4");
  if (rows == 0) return;
  DeviceKernels& k = kernels(device);
  void* args[] = {&address, &stride, &rows, &rowBytes, &seed};
  unsigned blocks = static_cast<unsigned>(rows < 4096 ? rows : 4096);
  check(driver().cuLaunchKernel(k.writeRows, blocks, 1, 1, 128, 1, 1, 0, asStream(stream), args, nullptr),
        "cuLaunchKernel");
}

uint64_t createStream(int device) {
  kernels(device);
  CUstream s = nullptr;
  check(driver().cuStreamCreate(&s, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
  return reinterpret_cast<uint64_t>(s);
}

uint64_t createContext(int device) {
  const DriverApi& d = driver();
  CUdevice dev = 0;
  check(d.cuDeviceGet(&dev, device), "cuDeviceGet");
  CUcontext ctx = nullptr;
  check(d.cuCtxCreate(&ctx, nullptr, 0, 0, dev), "cuCtxCreate");
  CUcontext popped = nullptr;
  check(d.cuCtxPopCurrent(&popped), "cuCtxPopCurrent");  // cuCtxCreate made it current
  return reinterpret_cast<uint64_t>(ctx);
}

void destroyContext(uint64_t context) {
  check(driver().cuCtxDestroy(reinterpret_cast<CUcontext>(context)), "cuCtxDestroy");
}

void setCurrentContext(uint64_t context) {
  check(driver().cuCtxSetCurrent(reinterpret_cast<CUcontext>(context)), "cuCtxSetCurrent");
}

uint64_t currentContext() {
  CUcontext ctx = nullptr;
  check(driver().cuCtxGetCurrent(&ctx), "cuCtxGetCurrent");
  return reinterpret_cast<uint64_t>(ctx);
}

void destroyStream(int device, uint64_t stream) {
  kernels(device);
  check(driver().cuStreamDestroy(asStream(stream)), "cuStreamDestroy");
}

void synchronizeStream(int device, uint64_t stream) {
  kernels(device);
  check(driver().cuStreamSynchronize(asStream(stream)), "cuStreamSynchronize");
}

uint64_t allocate(int device, uint64_t bytes) {
  kernels(device);
  CUdeviceptr p = 0;
  check(driver().cuMemAlloc(&p, bytes), "cuMemAlloc");
  return p;
}

void free(int device, uint64_t address) {
  kernels(device);
  check(driver().cuMemFree(address), "cuMemFree");
}

void copyToDevice(int device, uint64_t dst, const void* src, uint64_t bytes) {
  kernels(device);
  check(driver().cuMemcpyHtoD(dst, src, bytes), "cuMemcpyHtoD");
}

void copyFromDevice(int device, void* dst, uint64_t src, uint64_t bytes) {
  kernels(device);
  check(driver().cuMemcpyDtoH(dst, src, bytes), "cuMemcpyDtoH");
}

void copyToDeviceAsync(int device, uint64_t dst, const void* src, uint64_t bytes, uint64_t stream) {
  kernels(device);
  check(driver().cuMemcpyHtoDAsync(dst, src, bytes, asStream(stream)), "cuMemcpyHtoDAsync");
}

void copyOnDevice(int device, uint64_t dst, uint64_t src, uint64_t bytes) {
  kernels(device);
  check(driver().cuMemcpyDtoDAsync(dst, src, bytes, nullptr), "cuMemcpyDtoDAsync");
  check(driver().cuStreamSynchronize(nullptr), "cuStreamSynchronize");
}

uint64_t createEvent(int device) {
  kernels(device);
  CUevent e = nullptr;
  check(driver().cuEventCreate(&e, 0), "cuEventCreate");
  return reinterpret_cast<uint64_t>(e);
}

void recordEvent(int device, uint64_t event, uint64_t stream) {
  kernels(device);
  check(driver().cuEventRecord(reinterpret_cast<CUevent>(event), asStream(stream)), "cuEventRecord");
}

float elapsedMilliseconds(int device, uint64_t start, uint64_t end) {
  kernels(device);
  check(driver().cuEventSynchronize(reinterpret_cast<CUevent>(end)), "cuEventSynchronize");
  float ms = 0;
  check(driver().cuEventElapsedTime(&ms, reinterpret_cast<CUevent>(start), reinterpret_cast<CUevent>(end)),
        "cuEventElapsedTime");
  return ms;
}

void destroyEvent(int device, uint64_t event) {
  kernels(device);
  check(driver().cuEventDestroy(reinterpret_cast<CUevent>(event)), "cuEventDestroy");
}

DeviceProperties deviceProperties(int device) {
  kernels(device);
  const DriverApi& d = driver();
  CUdevice dev = 0;
  check(d.cuDeviceGet(&dev, device), "cuDeviceGet");
  DeviceProperties p;
  check(d.cuDeviceGetAttribute(&p.multiprocessors, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev), "cuDeviceGetAttribute");
  check(d.cuDeviceGetAttribute(&p.memoryClockKHz, CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE, dev), "cuDeviceGetAttribute");
  check(d.cuDeviceGetAttribute(&p.busWidthBits, CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH, dev), "cuDeviceGetAttribute");
  check(d.cuDeviceGetAttribute(&p.l2Bytes, CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, dev), "cuDeviceGetAttribute");
  check(d.cuDeviceGetAttribute(&p.pciDomain, CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID, dev), "cuDeviceGetAttribute");
  check(d.cuDeviceGetAttribute(&p.pciBus, CU_DEVICE_ATTRIBUTE_PCI_BUS_ID, dev), "cuDeviceGetAttribute");
  check(d.cuDeviceGetAttribute(&p.pciDevice, CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID, dev), "cuDeviceGetAttribute");
  return p;
}

RawVmmTimes rawVmmLoop(int device, uint64_t pages) {
  kernels(device);
  const DriverApi& d = driver();
  CUdevice dev = 0;
  check(d.cuDeviceGet(&dev, device), "cuDeviceGet");
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = dev;
  size_t page = 0;
  check(d.cuMemGetAllocationGranularity(&page, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM),
        "cuMemGetAllocationGranularity");
  CUmemAccessDesc access{};
  access.location = prop.location;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  RawVmmTimes t;
  t.pages = pages;
  t.pageSize = page;
  CUdeviceptr base = 0;
  check(d.cuMemAddressReserve(&base, pages * page, page, 0, 0), "cuMemAddressReserve");
  std::vector<CUmemGenericAllocationHandle> handles(pages);
  using clock = std::chrono::steady_clock;
  auto since = [](clock::time_point a) {
    return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(clock::now() - a).count());
  };
  size_t made = 0, mapped = 0;
  try {
    auto t0 = clock::now();
    for (; made < pages; ++made) check(d.cuMemCreate(&handles[made], page, &prop, 0), "cuMemCreate");
    t.createNs = since(t0);
    t0 = clock::now();
    for (; mapped < pages; ++mapped) check(d.cuMemMap(base + mapped * page, page, 0, handles[mapped], 0), "cuMemMap");
    t.mapNs = since(t0);
    t0 = clock::now();
    for (size_t i = 0; i < pages; ++i) check(d.cuMemSetAccess(base + i * page, page, &access, 1), "cuMemSetAccess");
    t.setAccessNs = since(t0);
    t0 = clock::now();
    for (; mapped > 0; --mapped) check(d.cuMemUnmap(base + (mapped - 1) * page, page), "cuMemUnmap");
    t.unmapNs = since(t0);
    t0 = clock::now();
    for (; made > 0; --made) check(d.cuMemRelease(handles[made - 1]), "cuMemRelease");
    t.releaseNs = since(t0);
  } catch (...) {
    for (; mapped > 0; --mapped) d.cuMemUnmap(base + (mapped - 1) * page, page);
    for (; made > 0; --made) d.cuMemRelease(handles[made - 1]);
    d.cuMemAddressFree(base, pages * page);
    throw;
  }
  check(d.cuMemAddressFree(base, pages * page), "cuMemAddressFree");
  return t;
}

ConcurrentVmmTimes rawVmmLoopConcurrent(const std::vector<int>& devices, uint64_t pages) {
  for (int device : devices) kernels(device);  // contexts and modules first, outside the timing
  ConcurrentVmmTimes out;
  out.threads.resize(devices.size());
  std::vector<std::exception_ptr> errors(devices.size());
  std::mutex lock;
  std::condition_variable go;
  bool started = false;
  std::vector<std::thread> threads;
  for (size_t i = 0; i < devices.size(); ++i) {
    threads.emplace_back([&, i] {
      {
        std::unique_lock<std::mutex> lk(lock);
        go.wait(lk, [&] { return started; });
      }
      try {
        out.threads[i] = rawVmmLoop(devices[i], pages);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    });
  }
  auto t0 = std::chrono::steady_clock::now();
  {
    std::lock_guard<std::mutex> lk(lock);
    started = true;
  }
  go.notify_all();
  for (std::thread& t : threads) t.join();
  out.wallNs = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
  return out;
}

}  // namespace vat::testing
