#include "cache/device_memory.h"

#include <cstring>

namespace vat {

uint64_t defaultBudget(Backend& backend) {
  MemoryInfo m = backend.memoryInfo();
  if (std::strcmp(backend.name(), "cuda") == 0) {
    uint64_t margin = m.totalBytes / 20;
    return m.freeBytes > margin ? m.freeBytes - margin : 0;
  }
  return m.freeBytes / 2;
}

void DeviceMemory::open(uint64_t rangeBytes, uint64_t budgetBytes, uint64_t prefillBytes) {
  pool_ = std::make_unique<PagePool>(*backend_, budgetBytes);
  base_ = backend_->reserveRange(rangeBytes);
  rangeBytes_ = rangeBytes;
  try {
    uint64_t ps = backend_->pageSize();
    pool_->prefill(prefillBytes / ps + (prefillBytes % ps != 0));  // rounds up without wrapping
  } catch (...) {
    pool_->teardown();
    try {
      backend_->freeRange(base_, rangeBytes_);
    } catch (...) {
    }
    rangeBytes_ = 0;
    throw;
  }
}

void DeviceMemory::teardown() noexcept {
  if (!backend_) return;
  backend_->disarmFault();
  if (pool_) pool_->teardown();
  if (rangeBytes_) {
    try {
      backend_->freeRange(base_, rangeBytes_);
    } catch (...) {
    }
    rangeBytes_ = 0;
  }
  pool_.reset();
  backend_.reset();
}

void DeviceMemory::abandon() noexcept {
  pool_.release();     // deliberately leaked: their destructors would call the driver
  backend_.release();
}

}  // namespace vat
