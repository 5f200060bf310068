// The page mapper: takes physical pages for a slot's page groups (idle in the
// pool, newly created within the budget, reclaimed from other slots in the
// reclaim policy's order), maps them on the lock or off it, and commits or
// rolls back. This is the one place where "all or nothing" is enforced and
// where pages are unmapped from slots.
//
// Rollback rule: a failure is undone along the way it came. Where undoing
// fails too (an unmap), the page is stranded in the pool (still mapped, owned
// by no slot, retried before the next mapping), and a slot never lists a page
// that is not mapped.
#pragma once

#include <atomic>
#include <cstdint>
#include <utility>
#include <vector>

#include "cache/cache_core.h"

namespace vat {

// Groups [fromGroup, toGroup) of a slot being mapped with the lock released.
struct Extension {
  uint32_t slot = 0;
  Extending kind = Extending::OnDemand;
  size_t fromGroup = 0;
  size_t toGroup = 0;
  std::vector<PageId> pages;        // idle pages taken for it
  size_t creations = 0;             // pages to create (budget reserved)
  std::vector<PageId> created;      // pages created for it (destroyed on rollback)
  std::vector<PageHandle> handles;  // room for the pages created off the lock
  std::vector<Page*> records;       // room for the page records mapped off the lock
};

// A released slot's tail page group being unmapped with the lock released
// (reclaim ahead of need, by the prefetch worker).
struct Retirement {
  uint32_t slot = 0;
  bool ahead = false;  // by the prefetch worker (counted apart in the stats)
  std::vector<PageId> pages;
  std::vector<Address> addresses;
  uint64_t toIdle = 0;  // of the pages, those whose last mapping this is (idle once unmapped)
};

class PageMapper {
 public:
  explicit PageMapper(CacheCore& core) : core_(core) {}

  // Pages a growth could have now: idle, within the budget, reclaimable
  // (fenced ones included: the growth waits for them). `exclude`: slots not
  // to take from (the growing ones).
  uint64_t obtainablePages(const std::vector<uint32_t>& exclude, bool withLookAhead = true);

  // On the lock: maps every slot's groups up to its target, all or nothing.
  // `missing` pages in all. On failure every slot is as it was and the error
  // is thrown; pages it reclaimed before failing stay idle in the pool.
  void growOnLock(const std::vector<std::pair<uint32_t, size_t>>& targets, uint64_t missing,
                  const std::vector<uint32_t>& exclude);

  // Unmaps tail groups, in reclaim order, until at least `pages` pages went
  // back to the pool; a fenced slot is waited for first. Returns the pages.
  uint64_t reclaim(uint64_t pages, const std::vector<uint32_t>& exclude);

  // Off the lock. begin: takes the extension's pages (idle, reserved
  // creations; with mayReclaim, reclaimed from others) and marks the slot as
  // extending; false, taking nothing, when they cannot all be had.
  bool beginExtension(Extension& ext, uint32_t slot, size_t toGroups, bool mayReclaim, Extending kind);
  // run: creates and maps with the lock released, then commits to the slot
  // or rolls back and rethrows. Called and returns with the lock held; the
  // slot always stops extending and waiters are woken.
  void runExtension(Lock& lk, Extension& ext, const std::atomic<bool>* cancel);

  // For the prefetch worker: the tail page group of the released slot the
  // reclaim policy picks (reclaimAheadCandidate) is detached from the slot
  // (which shrinks to its whole groups before it and is marked extending, so
  // nothing maps there meanwhile) and unmapped off the lock; the pages go
  // idle, or stranded where an unmap failed. begin is false, taking nothing,
  // when no released slot can give a group without a fence wait. Called and
  // returns with the lock held.
  bool beginRetirement(Retirement& r);
  // The same for a growth that needs room (growAsync's thread): the first
  // candidate of the reclaim order without a pending fence (a prefetched
  // tail or a released slot), `exclude` left alone. False when only fenced
  // candidates are left (reclaim() waits for those, on the lock).
  bool beginDemandRetirement(Retirement& r, const std::vector<uint32_t>& exclude);
  // On the lock: while pages are being retired, waits until they are idle and
  // returns true (the caller decides again); false at once when none are.
  bool waitForRetirements(Lock& lk);
  // For the prefetch worker: every mapping of a released slot that holds
  // pages other slots map too (dropPending, fences passed) is detached and
  // unmapped off the lock, so a release never unmaps on the caller's thread;
  // a page goes idle with its last mapping. False when there is none.
  bool beginDrop(Retirement& r);
  // Every page of a free slot, for runRetirement (the slot must not be extending).
  void detachAll(Retirement& r, uint32_t slot) { detachFrom(r, slot, 0); }
  void runRetirement(Lock& lk, Retirement& r);
  // Pages detached by a retirement and not yet back: still mapped, counted
  // with the released slots' bytes.
  uint64_t retiringPages() const { return retiringPages_; }
  // Of them, those that will be idle (their last mapping goes): obtainable.
  uint64_t retiringToIdle() const { return retiringToIdle_; }
  uint64_t droppablePages();

  // Pages for a new mapping (fork's copies): idle, created, reclaimed (not
  // from `exclude`), all or nothing; giveBack returns them on failure.
  std::vector<PageId> obtainPagesFor(uint64_t count, std::vector<PageId>& createdNow,
                                     const std::vector<uint32_t>& exclude) {
    return obtainPages(count, createdNow, exclude);
  }
  void giveBack(const std::vector<PageId>& pages, const std::vector<PageId>& createdNow) {
    returnPages(pages, createdNow);
  }

  // On the lock: unmaps the slot's groups past the first `groups` (pages go
  // idle, or stranded where an unmap fails): the undo of a growth that
  // another device could not match. The slot must not be extending.
  void shrinkSlot(uint32_t slot, size_t groups) noexcept;

  // Unmaps stranded pages again before anything is mapped (cheap when none).
  void retryStranded();

  uint64_t reclaimedPages() const { return reclaimedPages_; }
  uint64_t reclaimedAheadPages() const { return reclaimedAheadPages_; }
  uint64_t pagesMappedOffLock() const { return pagesMappedOffLock_; }

 private:
  void detachTailGroup(Retirement& r, uint32_t slot);
  void detachFrom(Retirement& r, uint32_t slot, size_t first);
  std::vector<PageId> obtainPages(uint64_t count, std::vector<PageId>& createdNow,
                                  const std::vector<uint32_t>& exclude);
  void returnPages(const std::vector<PageId>& pages, const std::vector<PageId>& createdNow);
  void mapGroups(uint32_t slotIndex, Slot& s, size_t toGroups, const std::vector<PageId>& pages, size_t& next);
  void unmapGroupsFrom(Slot& s, size_t keepPages);
  void unmapTailGroup(Slot& s);
  void endExtension(const Extension& ext);
  void abortIfStopping(const std::atomic<bool>* cancel) const;

  CacheCore& core_;
  uint64_t reclaimedPages_ = 0;      // pages unmapped from other slots, ever
  uint64_t reclaimedAheadPages_ = 0; // of those, by the prefetch worker ahead of need
  uint64_t retiringPages_ = 0;       // detached by retirements in progress
  uint64_t retiringToIdle_ = 0;      // of them, going idle
  uint64_t pagesMappedOffLock_ = 0;  // pages committed by extensions (worker, growAsync), ever
};

// ERR_OUT_OF_MEMORY with the figures.
Error outOfMemory(uint64_t neededPages, uint64_t obtainablePages, uint64_t pageSize, const PoolCounts& c);

}  // namespace vat
