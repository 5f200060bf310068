// One device's share of a cache: the backend (CUDA driver or host mmap), the
// page pool over it and the virtual range reserved on it. Set up in that
// order and torn down in reverse. A cache over several GPUs will hold one per
// device.
#pragma once

#include <memory>

#include "backend/backend.h"
#include "pool/page_pool.h"

namespace vat {

class DeviceMemory {
 public:
  explicit DeviceMemory(std::unique_ptr<Backend> backend) : backend_(std::move(backend)) {}
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;

  // Creates the pool, reserves the range and prefills the pool. On failure
  // gives back what it took (the backend stays, for its owner to destroy).
  void open(uint64_t rangeBytes, uint64_t budgetBytes, uint64_t prefillBytes);
  // Reverse order of setup: pages (unmapped, destroyed), range, backend (its
  // context reference, its file descriptor). Best effort: a failing step does
  // not stop the ones after it.
  void teardown() noexcept;
  // The process is exiting and the driver may be gone: nothing is called,
  // the memory goes back with the process.
  void abandon() noexcept;

  Backend& backend() { return *backend_; }
  PagePool& pool() { return *pool_; }
  Address base() const { return base_; }

 private:
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<PagePool> pool_;
  Address base_ = 0;
  uint64_t rangeBytes_ = 0;
};

// Budget when none is given: cuda, the device's free memory less 5% of its
// total; host, half of the free RAM.
uint64_t defaultBudget(Backend& backend);

}  // namespace vat
