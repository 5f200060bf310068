// What the parts of the cache core share: the lock and what it guards (the
// slot table, the flags) and the device shards. The façade (kv_cache.h) owns
// it; the page mapper, the prefetcher and the recipes work on it under the
// lock. The device shards never see it: they are told what to do.
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <vector>

#include "common/errors.h"
#include "core/slot_table.h"
#include "device/device_shard.h"
#include "layout/kv_layout.h"

namespace vat {

using Lock = std::unique_lock<std::mutex>;

struct CacheCore {
  CacheCore(std::unique_ptr<KVLayout> layout) : layout(std::move(layout)), slots(this->layout->shape().maxSequences) {}

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
  std::vector<std::unique_ptr<DeviceShard>> shards;  // one per device, in the order of options.devices
  SlotTable slots;

  size_t deviceCount() const { return shards.size(); }
  DeviceShard& shard(size_t d) { return *shards[d]; }
  size_t pagesPerGroup() const { return layout->pagesPerGroup(); }
  size_t pagesOf(const Slot& s) const { return s.groups * layout->pagesPerGroup(); }

  // The slot's fences on every device: true while one has not passed (each
  // device drops those that have). Never throws.
  bool fencesPending(uint32_t slot) noexcept {
    bool any = false;
    for (auto& d : shards) any = d->slot(slot).fences.pending(d->backend()) || any;
    return any;
  }
  // Waits for every fence of the slot on every device.
  void waitFences(uint32_t slot);
  // Runs fn(d) for each device in order; an Error of device d is rethrown
  // naming it (over several devices), figures kept.
  template <class F>
  void onEachDevice(F&& fn) {
    for (size_t d = 0; d < shards.size(); ++d) onDevice(d, [&] { fn(d); });
  }
  template <class F>
  auto onDevice(size_t d, F&& fn) -> decltype(fn()) {
    try {
      return fn();
    } catch (const Error& e) {
      if (shards.size() == 1) throw;
      throw named(e, d);
    }
  }
  // The error of device d, saying so (the code and figures kept).
  Error named(const Error& e, size_t d) const;
};

}  // namespace vat
