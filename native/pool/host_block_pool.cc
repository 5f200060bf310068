#include "pool/host_block_pool.h"

#include <algorithm>

#include "common/errors.h"

namespace vat {

HostBlockPool::HostBlockPool(Backend& backend, uint64_t budgetBytes, uint64_t blockBytes)
    : backend_(backend), budget_(budgetBytes), blockBytes_(blockBytes) {}

HostBlockPool::~HostBlockPool() = default;  // the owner calls teardown() while the backend lives

HostBlocks HostBlockPool::take(uint64_t bytes, const char* what) {
  HostBlocks out;
  out.bytes = bytes;
  uint64_t count = (bytes + blockBytes_ - 1) / blockBytes_;
  uint64_t fresh = 0;
  {
    std::lock_guard<std::mutex> g(lock_);
    uint64_t reuse = std::min<uint64_t>(count, idle_.size());
    fresh = count - reuse;
    uint64_t left = budget_ - held_;
    if (fresh * blockBytes_ > left) {
      uint64_t available = left / blockBytes_ * blockBytes_ + idle_.size() * blockBytes_;
      Error e(ErrorCode::OutOfMemory, std::string(what) + " needs " + std::to_string(bytes) +
                                          " bytes of host memory; " + std::to_string(available) + " of the " +
                                          std::to_string(budget_) + " in options.hostMemoryBudget are left");
      e.requestedBytes = bytes;
      e.availableBytes = available;
      throw e;
    }
    out.blocks.assign(idle_.end() - static_cast<std::ptrdiff_t>(reuse), idle_.end());
    idle_.resize(idle_.size() - reuse);
    held_ += fresh * blockBytes_;  // reserved while they are made
  }
  std::vector<void*> made;
  try {
    made.reserve(fresh);
    for (uint64_t i = 0; i < fresh; ++i) made.push_back(backend_.allocHost(blockBytes_));
  } catch (...) {
    for (void* p : made) backend_.freeHost(p);
    std::lock_guard<std::mutex> g(lock_);
    held_ -= fresh * blockBytes_;
    idle_.insert(idle_.end(), out.blocks.begin(), out.blocks.end());
    throw;
  }
  std::lock_guard<std::mutex> g(lock_);
  all_.insert(all_.end(), made.begin(), made.end());
  out.blocks.insert(out.blocks.end(), made.begin(), made.end());
  return out;
}

void HostBlockPool::give(HostBlocks& b) {
  std::lock_guard<std::mutex> g(lock_);
  idle_.insert(idle_.end(), b.blocks.begin(), b.blocks.end());
  b.blocks.clear();
  b.bytes = 0;
}

void HostBlockPool::prefill(uint64_t bytes) {
  uint64_t have = heldBytes();
  if (bytes <= have) return;
  HostBlocks b = take(std::min(bytes, budget_) - have, "options.hostMemoryPrefill");
  give(b);
}

uint64_t HostBlockPool::trim() {
  std::vector<void*> freeing;
  {
    std::lock_guard<std::mutex> g(lock_);
    freeing.swap(idle_);
    for (void* p : freeing) all_.erase(std::find(all_.begin(), all_.end(), p));
    held_ -= freeing.size() * blockBytes_;
  }
  for (void* p : freeing) backend_.freeHost(p);
  return freeing.size() * blockBytes_;
}

void HostBlockPool::teardown() {
  std::vector<void*> freeing;
  {
    std::lock_guard<std::mutex> g(lock_);
    freeing.swap(all_);
    idle_.clear();
    held_ = 0;
  }
  for (void* p : freeing) backend_.freeHost(p);
}

uint64_t HostBlockPool::heldBytes() {
  std::lock_guard<std::mutex> g(lock_);
  return held_;
}

uint64_t HostBlockPool::idleBytes() {
  std::lock_guard<std::mutex> g(lock_);
  return idle_.size() * blockBytes_;
}

void transferBlocks(Backend& backend, bool toHost, Address device, const HostBlocks& host, uint64_t offset,
                    uint64_t bytes, uint64_t blockBytes, uint64_t stream) {
  while (bytes > 0) {
    uint64_t block = offset / blockBytes, within = offset % blockBytes;
    uint64_t n = std::min(bytes, blockBytes - within);
    auto* at = static_cast<uint8_t*>(host.blocks[block]) + within;
    if (toHost) backend.copyToHost(at, device, n, stream);
    else backend.copyFromHost(device, at, n, stream);
    device += n;
    offset += n;
    bytes -= n;
  }
}

}  // namespace vat
