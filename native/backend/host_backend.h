// The host backend: the same page semantics on Linux host memory, for
// machines without a GPU. A physical page is a region of one memfd; mapping
// puts that region (MAP_SHARED | MAP_FIXED) at a virtual address; unmapping
// puts PROT_NONE anonymous memory back. Bytes written through one mapping are
// in the page and show wherever the page is mapped next.
#pragma once

#include <mutex>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "backend/backend.h"

namespace vat {

// Test-only: host memory has no asynchronous work, so a fence recorded on a
// host stream has passed at once, unless a test holds that stream: its fences
// then stay pending until waited for (waitFence stands for the wait a GPU
// would need) or the stream is finished. Lets the host suite check that every
// path that unmaps consults fences, and in what order.
void holdHostStream(uint64_t stream);
void finishHostStream(uint64_t stream);

class HostBackend final : public Backend {
 public:
  // pageSize 0 = 2 MiB; else a multiple of the OS page size.
  explicit HostBackend(size_t pageSize);
  ~HostBackend() override;

  const char* name() const override { return "host"; }
  size_t granularity() const override { return osPage_; }
  size_t pageSize() const override { return pageSize_; }

  Address reserveRange(size_t bytes) override;
  void freeRange(Address base, size_t bytes) override;
  PageHandle createPage() override;
  void releasePage(PageHandle page) override;
  void map(Address at, PageHandle page) override;
  void setAccess(Address at) override;
  void unmap(Address at) override;
  void copyIn(Address dst, uint64_t pitch, const void* src, size_t rowBytes, size_t rows) override;
  void copyOut(void* dst, Address src, uint64_t pitch, size_t rowBytes, size_t rows) override;
  void copyDevice(Address dst, Address src, size_t bytes, uint64_t stream) override;
  void* allocHost(size_t bytes) override;
  void freeHost(void* p) override;
  uint64_t createStream() override;
  void destroyStream(uint64_t stream) override;
  void syncStream(uint64_t stream) override;
  void copyToHost(void* dst, Address src, size_t bytes, uint64_t stream) override;
  void copyFromHost(Address dst, const void* src, size_t bytes, uint64_t stream) override;
  FenceHandle recordFence(uint64_t stream) override;
  bool fenceDone(FenceHandle fence) override;
  void waitFence(FenceHandle fence) override;
  void destroyFence(FenceHandle fence) override;
  MemoryInfo memoryInfo() override;
  ErrorCode ordinaryError() const override { return ErrorCode::Os; }

 private:
  off_t offsetOf(PageHandle page) const { return static_cast<off_t>((page - 1) * pageSize_); }

  size_t osPage_;
  size_t pageSize_;
  int fd_ = -1;
  std::mutex regionsLock_;         // createPage/releasePage may run on two threads
  std::vector<PageHandle> freeRegions_;  // memfd regions given back, reused first
  PageHandle nextRegion_ = 1;      // regions [1, nextRegion_) have been handed out once
  // Addresses mapped now: mapping over one (or unmapping a hole) fails as
  // it does with the CUDA driver, instead of MAP_FIXED silently replacing it.
  std::mutex mappedLock_;
  std::unordered_set<Address> mapped_;
  struct PendingFence {
    uint64_t stream;
    bool waited;
  };
  std::mutex fencesLock_;
  std::unordered_map<FenceHandle, PendingFence> fences_;
  FenceHandle nextFence_ = 1;
  std::atomic<uint64_t> nextStream_{1u << 30};  // apart from the test hooks' stream numbers
};

}  // namespace vat
