// What the parts of the cache core share: the lock and what it guards (the
// slot table, the flags) and the device shards. The façade (kv_cache.h) owns
// it; the page mapper, the prefetcher and the recipes work on it under the
// lock. The device shards never see it: they are told what to do.
#pragma once

#include <atomic>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "common/errors.h"
#include "core/prefix_cache.h"
#include "core/slot_table.h"
#include "device/device_shard.h"
#include "layout/kv_layout.h"

namespace vat {

using Lock = std::unique_lock<std::mutex>;

// The lock released for a scope (driver work others need not wait for),
// taken again when the scope ends, also by an exception.
class Unlocked {
 public:
  explicit Unlocked(Lock& lk) : lk_(lk) { lk_.unlock(); }
  ~Unlocked() { lk_.lock(); }
  Unlocked(const Unlocked&) = delete;
  Unlocked& operator=(const Unlocked&) = delete;

 private:
  Lock& lk_;
};

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
  std::unique_ptr<PrefixCache> prefix;  // which slot holds which published token ids (prefix_cache.h)
  // Demand growth maps every device one after the other on the calling
  // thread: the driver serialises virtual-memory calls across the GPUs (and
  // threads) of a process, so a thread per device only adds contention
  // (bench/mapping.mjs --devices: on 2 H200s, two raw loops at once take
  // 2.07x one loop, one after the other 2.05x; grow() with a thread per
  // device 2.15x, serially 2.01x). VATTENTION_PARALLEL_DEVICES=1, read when
  // the cache is made, brings the threads back, to measure that again.
  bool parallelDevices = false;

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
      throw named(e, d);
    }
  }
  // Runs fn(d) for every device, each even when another failed (one after
  // the other, or with parallelDevices the others on threads of their own),
  // then rethrows the first device's error, named. For steps each device
  // can take apart and its caller undoes on every device.
  template <class F>
  void onAllDevices(F&& fn) {
    std::vector<std::exception_ptr> errors(shards.size());
    auto run = [&](size_t d) {
      try {
        onDevice(d, [&] { fn(d); });
      } catch (...) {
        errors[d] = std::current_exception();
      }
    };
    if (shards.empty()) return;
    std::vector<std::thread> threads;
    std::vector<size_t> here{0};
    for (size_t d = 1; d < shards.size(); ++d) {
      if (parallelDevices) {
        try {
          threads.emplace_back(run, d);
          continue;
        } catch (...) {
          // no thread could start: that device's part runs here
        }
      }
      here.push_back(d);
    }
    for (size_t d : here) run(d);
    for (std::thread& t : threads) t.join();
    for (const std::exception_ptr& e : errors)
      if (e) std::rethrow_exception(e);
  }
  // The error of device d, saying so when the cache has several (the code
  // and figures kept); over one device the error as it is.
  Error named(const Error& e, size_t d) const;
};

}  // namespace vat
