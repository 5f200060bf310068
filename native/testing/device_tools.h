// GPU helpers for tests and benchmarks (exported as `vattention/testing`):
// small kernels, JIT-compiled by the driver from PTX (kernels_ptx.cc), that
// touch cache memory exactly as a real kernel would, plus stream and
// memory-info utilities. Not part of the cache itself.
#pragma once

#include <cstdint>
#include <vector>

#include "backend/backend.h"

namespace vat::testing {

MemoryInfo deviceMemory(int device);
// out[i] = i * 0x9E3779B1 + seed for i < count (u32), queued on `stream`.
void fillU32(int device, uint64_t address, uint64_t count, uint32_t seed, uint64_t stream);
// Spins on the GPU for `nanoseconds`, then out[i] = value for i < count.
void spinThenFillU32(int device, uint64_t address, uint64_t count, uint32_t value, uint64_t nanoseconds,
                     uint64_t stream);
// Spins for `nanoseconds`, then reads in[i] for i < count (u32): a late reader.
void spinThenReadU32(int device, uint64_t address, uint64_t count, uint64_t nanoseconds, uint64_t stream);
// Reads `bytes` (16-byte aligned) as fast as the GPU can: the streaming-read ceiling.
void streamRead(int device, uint64_t address, uint64_t bytes, uint64_t stream);
// Adds to the u32 at `counter` the words of in[0, count) that differ from
// fillU32's pattern with `seed`.
void checkFillU32(int device, uint64_t address, uint64_t count, uint32_t seed, uint64_t counter, uint64_t stream);
// A zeroed u32 in device memory (cuMemAlloc), read back synchronously.
uint64_t createCounter(int device);
uint32_t readCounter(int device, uint64_t counter);
void destroyCounter(int device, uint64_t counter);
// A decode step's KV write: for each entry (slot << 32 | token), one token of
// every tensor (`tensors` of them, `tensorStride` apart) gets written.
void writeTokens(int device, uint64_t base, uint32_t tensors, uint64_t tensorStride, uint64_t slotStride,
                 uint64_t tokenBytes, uint32_t seed, const std::vector<uint64_t>& entries, uint64_t stream);
// Writes `rows` rows of `rowBytes` (multiple of 4) `stride` bytes apart: a
// kernel writing through a strided tensor view (see read_kernels.cu).
void writeRowsU32(int device, uint64_t address, uint64_t stride, uint64_t rows, uint64_t rowBytes, uint32_t seed,
                  uint64_t stream);
uint64_t createStream(int device);
void destroyStream(int device, uint64_t stream);
// CUDA graphs: capture what is queued on `stream` (not the legacy stream)
// between begin and end into an instantiated graph; launch; destroy.
void beginCapture(int device, uint64_t stream);
uint64_t endCapture(int device, uint64_t stream);
void launchGraph(int device, uint64_t graph, uint64_t stream);
void destroyGraph(int device, uint64_t graph);
void synchronizeStream(int device, uint64_t stream);
constexpr size_t kMaxWriteEntries = 256;

// Contexts other than the primary one, to check that a cache works in its own
// context whatever the calling thread has current (and leaves it so).
uint64_t createContext(int device);  // the thread's current context is unchanged
void destroyContext(uint64_t context);
void setCurrentContext(uint64_t context);
uint64_t currentContext();

// Plain device memory (cuMemAlloc) and synchronous copies, for inputs and
// outputs of kernels under test and the baselines of benchmarks.
uint64_t allocate(int device, uint64_t bytes);
void free(int device, uint64_t address);
void copyToDevice(int device, uint64_t dst, const void* src, uint64_t bytes);
void copyFromDevice(int device, void* dst, uint64_t src, uint64_t bytes);
// Queued on `stream`; `src` is copied to a staging buffer before it returns.
void copyToDeviceAsync(int device, uint64_t dst, const void* src, uint64_t bytes, uint64_t stream);
// Device to device on the legacy stream, finished on return.
void copyOnDevice(int device, uint64_t dst, uint64_t src, uint64_t bytes);

// Timing events (cuEventElapsedTime waits for `end`).
uint64_t createEvent(int device);
void recordEvent(int device, uint64_t event, uint64_t stream);
float elapsedMilliseconds(int device, uint64_t start, uint64_t end);
void destroyEvent(int device, uint64_t event);

struct DeviceProperties {
  int multiprocessors = 0;
  int memoryClockKHz = 0;
  int busWidthBits = 0;
  int l2Bytes = 0;
  int pciDomain = 0;
  int pciBus = 0;
  int pciDevice = 0;
};
DeviceProperties deviceProperties(int device);

// Decode attention (native/kernels) on `device`'s primary context.

// The raw driver loop the library is measured against: cuMemCreate,
// cuMemMap, cuMemSetAccess, cuMemUnmap, cuMemRelease over `pages` pages of
// the allocation granularity, each timed as a whole loop (nanoseconds).
struct RawVmmTimes {
  uint64_t pages = 0;
  uint64_t pageSize = 0;
  uint64_t createNs = 0, mapNs = 0, setAccessNs = 0, unmapNs = 0, releaseNs = 0;
};
RawVmmTimes rawVmmLoop(int device, uint64_t pages);
// The same loop on one thread per entry of `devices`, all started together
// (a device may be listed twice: two threads on one device). wallNs: from
// the start to the last thread's end. Whether the driver runs virtual-memory
// calls for several GPUs (or threads) of a process at once.
struct ConcurrentVmmTimes {
  uint64_t wallNs = 0;
  std::vector<RawVmmTimes> threads;
};
ConcurrentVmmTimes rawVmmLoopConcurrent(const std::vector<int>& devices, uint64_t pages);

}  // namespace vat::testing
