// The cuda backend: pages are cuMemCreate'd physical allocations on one
// device, mapped into ranges reserved with cuMemAddressReserve.
#pragma once

#include <vector>

#include "backend/backend.h"
#include "driver/cuda_types.h"

namespace vat {

struct CudaDeviceInfo {
  int ordinal = 0;
  std::string name;
  uint64_t totalBytes = 0;
  int computeMajor = 0;
  int computeMinor = 0;
  bool vmmSupported = false;
  uint64_t granularity = 0;  // 0 when VMM is unsupported
};

// Devices visible to the driver; throws ERR_CUDA_UNAVAILABLE without a driver.
std::vector<CudaDeviceInfo> listCudaDevices();

class CudaBackend final : public Backend {
 public:
  // pageSize 0 = the allocation granularity; else a multiple of it.
  CudaBackend(int device, size_t pageSize);
  ~CudaBackend() override;

  const char* name() const override { return "cuda"; }
  size_t granularity() const override { return granularity_; }
  size_t pageSize() const override { return pageSize_; }
  void bindThread() override;

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
  ErrorCode ordinaryError() const override { return ErrorCode::Cuda; }

  int device() const { return ordinal_; }

 private:
  // Makes this backend's context current for one call, restoring the
  // caller's after it (see the .cc).
  class ContextScope {
   public:
    explicit ContextScope(const CudaBackend& backend);
    ~ContextScope();
    ContextScope(const ContextScope&) = delete;
    ContextScope& operator=(const ContextScope&) = delete;

   private:
    bool pushed_ = false;
  };

  int ordinal_;
  cu::CUdevice device_ = 0;
  cu::CUcontext context_ = nullptr;
  cu::CUmemAllocationProp prop_{};
  cu::CUmemAccessDesc access_{};
  size_t granularity_ = 0;
  size_t pageSize_ = 0;
};

}  // namespace vat
