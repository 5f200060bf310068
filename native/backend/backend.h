// One interface over the two kinds of memory vattention manages:
//   cuda: the CUDA driver's virtual memory API on a GPU;
//   host: the same semantics with Linux mmap over a memfd (CI, no GPU).
// A backend offers the primitive steps of a page's life; the pool
// (pool/page_pool.h) strings them together as a state machine.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <mutex>
#include <thread>
#include <vector>

#include "common/errors.h"

namespace vat {

using PageHandle = uint64_t;  // CUmemGenericAllocationHandle, or memfd offset index + 1
using Address = uint64_t;     // device (or host) virtual address
using FenceHandle = uint64_t; // CUevent, or 0 where nothing needs waiting for

// The calls a backend makes, for statistics and fault injection.
enum class BackendOp : int {
  ReserveRange,
  FreeRange,
  CreatePage,
  ReleasePage,
  Map,
  SetAccess,
  Unmap,
  CopyIn,
  CopyOut,
  CopyDevice,  // device-to-device copy (fork: the partial page group)
  CopyToHost,    // a transfer queued to host memory (swap out, suspend)
  CopyFromHost,  // a transfer queued from host memory (swap in, resume)
  AllocHost,     // page-locked host memory for transfers
  Fence,       // record a fence (cuEventCreate + cuEventRecord)
  FenceQuery,  // has it passed? (cuEventQuery)
  FenceWait,   // block until it has (cuEventSynchronize)
  kCount,
  // Not backend calls, but failures a test can inject the same way:
  StartWorker,  // starting the cache's prefetch thread
};
const char* backendOpName(BackendOp op);
constexpr size_t kBackendOpCount = static_cast<size_t>(BackendOp::kCount);

struct OpCounter {
  uint64_t calls = 0;
  uint64_t nanos = 0;
};

// Test-only: how an injected fault fails.
enum class FaultKind : uint8_t {
  OutOfMemory,  // ERR_OUT_OF_MEMORY, as the driver/OS reports it
  Error,        // an ordinary driver/OS error (ERR_CUDA / ERR_OS)
  HostAlloc,    // std::bad_alloc, as a full host heap would throw
  Delay,        // no failure: the call only sleeps delayMs first (a slow driver)
};

struct Fault {
  BackendOp op = BackendOp::CreatePage;
  uint64_t countdown = 0;  // fail when it reaches 0
  FaultKind kind = FaultKind::Error;
  uint32_t delayMs = 0;    // the failing call first sleeps this long (races in tests)
  bool inClose = false;    // kept by the disarm close begins with: a failure of close's own calls
};

// Test-only: make the n-th future call of some ops fail; several faults may
// be armed at once (a failure and then the failure of its rollback). Costs
// one relaxed load per call when nothing is armed.
class FaultPlan {
 public:
  void arm(const Fault& f);
  // Drops the armed faults but those meant for close (inClose).
  void disarm();
  // Consumes the fault armed for this call of `op`, if any.
  bool take(BackendOp op, Fault& out);
  // Applies a taken fault: sleeps its delay, then throws unless it is a Delay.

 private:
  std::atomic<bool> armed_{false};
  std::mutex lock_;
  std::vector<Fault> faults_;
};
// Sleeps the fault's delay, then throws the error it stands for (a Delay
// fault returns instead).
void applyFault(const Fault& f, ErrorCode ordinary, const char* call);

// Live driver/OS resources of every backend in the process, for leak tests:
// they return to zero when every cache is closed.
struct LiveResources {
  std::atomic<int64_t> ranges{0};
  std::atomic<int64_t> pages{0};
  std::atomic<int64_t> mappings{0};
  std::atomic<int64_t> fences{0};    // recorded and not yet destroyed
  std::atomic<int64_t> contexts{0};  // CUDA primary-context references held
};
LiveResources& liveResources();

// Test-only: a fault armed here is moved into the next backend constructed,
// so failures inside a cache's constructor can be injected too.
void armNextBackendFault(const Fault& fault);

struct MemoryInfo {
  uint64_t freeBytes = 0;
  uint64_t totalBytes = 0;
};

class Backend {
 public:
  Backend();
  virtual ~Backend() = default;

  virtual const char* name() const = 0;
  // Smallest page the backend can make (CUDA allocation granularity, OS page).
  virtual size_t granularity() const = 0;
  // Size of every page this backend creates.
  virtual size_t pageSize() const = 0;

  // Checks that the backend is usable on the calling thread (CUDA: its
  // context can be made current there). Every call below makes its own
  // context current for the call and restores the caller's afterwards.
  virtual void bindThread() {}

  virtual Address reserveRange(size_t bytes) = 0;
  virtual void freeRange(Address base, size_t bytes) = 0;

  // Page life: create -> map -> setAccess ... unmap -> release.
  virtual PageHandle createPage() = 0;                    // throws ERR_OUT_OF_MEMORY when none left
  virtual void releasePage(PageHandle page) = 0;
  virtual void map(Address at, PageHandle page) = 0;      // no access yet
  virtual void setAccess(Address at) = 0;                 // read-write for the device
  virtual void unmap(Address at) = 0;

  // Synchronous copies between host memory and backed virtual memory: `rows`
  // rows of `rowBytes`, packed on the host side, `pitch` bytes apart in the
  // range (a layer's tokens in a grouped layout are not adjacent).
  virtual void copyIn(Address dst, uint64_t pitch, const void* src, size_t rowBytes, size_t rows) = 0;
  virtual void copyOut(void* dst, Address src, uint64_t pitch, size_t rowBytes, size_t rows) = 0;
  // Copies `bytes` between two backed addresses, queued on `stream` (after
  // the work already there); with stream 0 it has finished on return.
  virtual void copyDevice(Address dst, Address src, size_t bytes, uint64_t stream) = 0;

  // Transfers between backed memory and host memory from allocHost, queued
  // on a stream of the backend's own (createStream: one per operation, so
  // that two transfers on two threads do not wait for each other), finished
  // by syncStream. The cuda backend queues DMA copies on a non-blocking
  // stream (they never wait for, or hold up, work on the caller's streams);
  // the host backend copies at once.
  virtual void* allocHost(size_t bytes) = 0;  // page-locked; throws ERR_OUT_OF_MEMORY
  virtual void freeHost(void* p) = 0;
  virtual uint64_t createStream() = 0;
  virtual void destroyStream(uint64_t stream) = 0;
  virtual void syncStream(uint64_t stream) = 0;
  virtual void copyToHost(void* dst, Address src, size_t bytes, uint64_t stream) = 0;
  virtual void copyFromHost(Address dst, const void* src, size_t bytes, uint64_t stream) = 0;

  // Fences: work queued on `stream` so far; done() never blocks, wait() does.
  virtual FenceHandle recordFence(uint64_t stream) = 0;
  virtual bool fenceDone(FenceHandle fence) = 0;
  virtual void waitFence(FenceHandle fence) = 0;
  virtual void destroyFence(FenceHandle fence) = 0;

  virtual MemoryInfo memoryInfo() = 0;

  // Error code for a failed call that is not out-of-memory (ERR_CUDA, ERR_OS).
  virtual ErrorCode ordinaryError() const = 0;

  // Statistics kept by the backend itself.
  std::array<OpCounter, kBackendOpCount> counters() const;
  // Calls made on the thread that created the backend (the JS thread): the
  // ones on a serving loop's critical path.
  uint64_t callsOnOwnerThread() const { return ownerCalls_.load(std::memory_order_relaxed); }
  void armFault(const Fault& fault) { faults_.arm(fault); }
  void disarmFault() { faults_.disarm(); }
  // For failures the cache itself can be made to inject (StartWorker);
  // `ordinary` is the code a real failure there has.
  void injectFault(BackendOp op, const char* what, ErrorCode ordinary);

 protected:
  // Times one call and counts it; returns true when a fault must be injected.
  class CallScope {
   public:
    CallScope(Backend& backend, BackendOp op);
    ~CallScope();
    // Throws the injected fault when this call was chosen to fail.
    void injectFault(const char* call);

   private:
    Backend& backend_;
    BackendOp op_;
    std::chrono::steady_clock::time_point start_;
  };

 private:
  std::array<std::atomic<uint64_t>, kBackendOpCount> calls_{};
  std::array<std::atomic<uint64_t>, kBackendOpCount> nanos_{};
  std::atomic<uint64_t> ownerCalls_{0};
  std::thread::id owner_;
  FaultPlan faults_;
};

}  // namespace vat
