// What the parts of a KV cache share: the lock and what it guards. The
// façade (kv_cache.h) owns it; the page mapper, the prefetcher and the
// policies work on it under the lock.
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>

#include "cache/device_memory.h"
#include "cache/slot_table.h"
#include "layout/kv_layout.h"

namespace vat {

using Lock = std::unique_lock<std::mutex>;

struct CacheCore {
  CacheCore(std::unique_ptr<Backend> backend, std::unique_ptr<KVLayout> layout)
      : layout(std::move(layout)), device(std::move(backend)), slots(this->layout->shape().maxSequences,
                                                                     this->layout->pagesPerGroup()) {}

  std::mutex lock;
  // An extension or a pool top-up ended, or the cache is closing: waiters
  // decide again.
  std::condition_variable changed;
  std::atomic<bool> closing{false};
  bool closed = false;
  // suspend() gave the pages back: nothing that needs memory runs (growth
  // fails with ERR_SUSPENDED, the prefetch worker idles) until resume().
  bool suspended = false;
  std::unique_ptr<KVLayout> layout;  // fixed for the cache's life
  DeviceMemory device;
  SlotTable slots;

  Backend& backend() { return device.backend(); }
  PagePool& pool() { return device.pool(); }
  size_t groupsOf(const Slot& s) const { return slots.groupsOf(s); }
};

}  // namespace vat
