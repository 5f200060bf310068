// Host memory for moving KV out of the device (swap, suspend): page-locked
// blocks of a fixed size from the backend, made on demand within a budget
// and kept for reuse, since page-locking is the slow part (2-3 GB/s on an
// H100 host: 175-275 ms for 512 MiB, against 10 ms for the copy itself) and
// freeing page-locked memory is slow too. trim() and teardown give idle
// blocks back.
//
// Thread safety: every method may be called from any thread; allocation and
// freeing run outside the pool's own lock (a reservation keeps the budget).
#pragma once

#include <cstdint>
#include <mutex>
#include <vector>

#include "backend/backend.h"

namespace vat {

// Where a transfer's host side lies: `bytes` bytes over blocks of a fixed size.
struct HostBlocks {
  std::vector<void*> blocks;
  uint64_t bytes = 0;
};

class HostBlockPool {
 public:
  HostBlockPool(Backend& backend, uint64_t budgetBytes, uint64_t blockBytes);
  ~HostBlockPool();
  HostBlockPool(const HostBlockPool&) = delete;
  HostBlockPool& operator=(const HostBlockPool&) = delete;

  uint64_t blockBytes() const { return blockBytes_; }
  uint64_t budgetBytes() const { return budget_; }

  // Blocks holding `bytes`: idle ones first, new ones within the budget. All
  // or nothing: ERR_OUT_OF_MEMORY (naming `what`) past the budget or when the
  // backend has no memory, with nothing taken.
  HostBlocks take(uint64_t bytes, const char* what);
  // Back to the idle list; `b` is empty afterwards.
  void give(HostBlocks& b);
  // Creates idle blocks until `bytes` are held (bounded by the budget).
  void prefill(uint64_t bytes);
  // Frees every idle block; returns the bytes freed.
  uint64_t trim();
  // Close: frees every block, idle or not (the caller gave up the others).
  void teardown();

  uint64_t heldBytes();  // made and not freed: in use + idle + being made
  uint64_t idleBytes();

 private:
  Backend& backend_;
  uint64_t budget_;
  uint64_t blockBytes_;
  std::mutex lock_;
  uint64_t held_ = 0;  // blocks made or being made
  std::vector<void*> idle_;
  std::vector<void*> all_;  // every block made and not freed (teardown)
};

// Copies `bytes` between the device range at `device` and the host blocks
// from byte `offset` on, split at block boundaries, queued on `stream`.
void transferBlocks(Backend& backend, bool toHost, Address device, const HostBlocks& host, uint64_t offset,
                    uint64_t bytes, uint64_t blockBytes, uint64_t stream);

}  // namespace vat
