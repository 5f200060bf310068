#include "testing/device_tools.h"

#include <cstring>
#include <map>
#include <mutex>

#include "common/errors.h"
#include "driver/cuda_driver.h"

namespace vat::testing {

extern const char kKernelsPtx[];

using namespace cu;

namespace {

struct DeviceKernels {
  CUcontext context = nullptr;
  CUfunction fill = nullptr;
  CUfunction spinFill = nullptr;
  CUfunction writeTokens = nullptr;
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

uint64_t createStream(int device) {
  kernels(device);
  CUstream s = nullptr;
  check(driver().cuStreamCreate(&s, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
  return reinterpret_cast<uint64_t>(s);
}

void destroyStream(int device, uint64_t stream) {
  kernels(device);
  check(driver().cuStreamDestroy(asStream(stream)), "cuStreamDestroy");
}

void synchronizeStream(int device, uint64_t stream) {
  kernels(device);
  check(driver().cuStreamSynchronize(asStream(stream)), "cuStreamSynchronize");
}

}  // namespace vat::testing
