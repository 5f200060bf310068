// One device's physical side of a cache: its backend (CUDA driver or host
// mmap), page pool, reserved virtual range, host memory (swap, suspend) and,
// for each slot, the pages mapped there on this device and the fences of GPU
// work that may still read them. It knows no sequence, no generation, no
// token: the core (core/) decides once and tells every shard what to map,
// unmap or copy. Set up in the order backend, pool, range, prefill, host
// memory, and torn down in reverse.
//
// Invariant kept by the core: at every point where the cache's lock is held,
// each slot lists the same number of pages on every shard (its page groups,
// Slot::groups); a listed page is mapped at the slot's address.
#pragma once

#include <memory>
#include <vector>

#include "backend/backend.h"
#include "device/fence_list.h"
#include "layout/kv_layout.h"
#include "pool/host_block_pool.h"
#include "pool/page_pool.h"

namespace vat {

// A slot's pages on one device, group-major, and its fences there.
struct SlotPages {
  std::vector<PageId> pages;
  FenceList fences;
};

// Pages of one device a change took (idle, or created for it): given back
// with giveBack() when the change does not commit.
struct TakenPages {
  std::vector<PageId> pages;
  std::vector<PageId> created;  // of them, those created for it (destroyed on giveBack)
};

// Physical counters, kept by the shard (RMM: statistics kept by the resource).
struct ShardCounters {
  uint64_t reclaimedPages = 0;       // unmapped from released slots or prefetched tails, ever
  uint64_t reclaimedAheadPages = 0;  // of them, by the prefetch worker ahead of need
  uint64_t pagesMappedOffLock = 0;   // committed by extensions (worker, growAsync)
  uint64_t pagesOnDemand = 0;        // mapped on the caller's thread (grow, step, share)
  uint64_t reusedPages = 0;          // mapped pages a new sequence found in its slot
};

class DeviceShard {
 public:
  DeviceShard(std::unique_ptr<Backend> backend, int ordinal, const KVLayout& layout);
  DeviceShard(const DeviceShard&) = delete;
  DeviceShard& operator=(const DeviceShard&) = delete;

  // Creates the pool, reserves the range, prefills the pool and the host
  // memory. On failure gives back what it took (the backend stays, for
  // teardown or the destructor).
  void open(std::shared_ptr<BudgetAccount> budget, uint64_t prefillBytes, uint64_t hostBudget, uint64_t hostPrefill);
  // Reverse order of setup: fences drained, host memory, pages (unmapped,
  // destroyed), range, backend. Best effort: a failing step does not stop
  // the ones after it. Never throws.
  void teardown() noexcept;
  // The process is exiting and the driver may be gone: nothing is called,
  // the memory goes back with the process.
  void abandon() noexcept;

  int ordinal() const { return ordinal_; }
  Backend& backend() { return *backend_; }
  PagePool& pool() { return *pool_; }
  HostBlockPool& host() { return *host_; }
  Address base() const { return base_; }
  SlotPages& slot(uint32_t i) { return slots_[i]; }
  const SlotPages& slot(uint32_t i) const { return slots_[i]; }
  uint32_t slotCount() const { return static_cast<uint32_t>(slots_.size()); }
  // Where page k of slot `slot` is mapped (k counts group-major).
  Address pageAt(uint32_t slot, size_t k) const;
  ShardCounters counters;

  // ---- pages (under the cache's lock unless said otherwise)
  // Pages free to take now: idle plus what the budget still allows.
  uint64_t freePages() const { return pool_->idleCount() + pool_->headroom(); }
  // Tops `t` up to `count` pages: idle first, then created within the budget
  // (a creation the device refuses for memory ends it). False when short.
  bool take(TakenPages& t, uint64_t count);
  // Pages of a change that did not commit: those still mapped (an unmap
  // failed) are stranded, created ones destroyed, the others idle. `t` empty after.
  void giveBack(TakenPages& t) noexcept;
  // Maps pages[next...] as the slot's next pages until it lists `toPages`,
  // advancing `next`. Throws with those mapped so far listed.
  void mapInto(uint32_t slot, size_t toPages, const std::vector<PageId>& pages, size_t& next);
  // Unmaps the slot's pages past its first `keep` (an undo): a page whose
  // unmap fails is stranded. Never throws.
  void shrinkTo(uint32_t slot, size_t keep) noexcept;
  // The same for pages a change took and mapped (still in its TakenPages):
  // they leave the list unmapped, or mapped where the unmap fails, for
  // giveBack to return (or strand). Never throws.
  void unlistBeyond(uint32_t slot, size_t keep) noexcept;
  // Unmaps the slot's pages [first, end), last first, leaving them listed
  // (abandonTail then lets them go idle, remapTail maps them back). On a
  // failure the pages it unmapped are mapped back (same physical pages: the
  // bytes are as they were), `restored` says whether that worked, and the
  // error is thrown.
  void unmapTail(uint32_t slot, size_t first, bool& restored);
  // After another shard's unmapTail failed: the tail this shard unmapped
  // maps again. False when a page cannot be (the caller abandons the tail).
  bool remapTail(uint32_t slot, size_t first, size_t end) noexcept;
  // Lets the slot's pages [first, end) go whatever their state: unmapped
  // ones idle, mapped ones stranded (unmapped again later). Never throws.
  void abandonTail(uint32_t slot, size_t first) noexcept;
  // Every mapping of the slot, last page first: a shared page loses this
  // mapping, the others go idle. One whose unmap fails is recorded (stranded
  // or a stray mapping), never left listed. Never throws.
  void dropAll(uint32_t slot) noexcept;
  // Whether a page of the slot is mapped at another slot too (sharing).
  bool holdsShared(uint32_t slot) const;
  void retryStranded();

 private:
  std::unique_ptr<Backend> backend_;
  int ordinal_;
  const KVLayout& layout_;
  std::unique_ptr<PagePool> pool_;
  std::unique_ptr<HostBlockPool> host_;
  std::vector<SlotPages> slots_;
  Address base_ = 0;
  uint64_t rangeBytes_ = 0;
};

// Budget when none is given: cuda, the device's free memory less 5% of its
// total; host, half of the free RAM (or of the cgroup's limit).
uint64_t defaultBudget(Backend& backend);
// The account a shard's pool charges: a budget of its own (`bytes`), or with
// 0 the default budget of its device, shared by every cache of the process
// that took it (budget_account.h).
std::shared_ptr<BudgetAccount> budgetAccount(DeviceShard& shard, uint64_t bytes);

}  // namespace vat
