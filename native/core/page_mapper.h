// The page mapper: every change to the pages of the cache's slots, on every
// device shard, all or nothing. It takes physical pages (idle, newly created
// within the budget, reclaimed from other slots in the reclaim policy's
// order), maps them on the lock or off it, and commits or undoes; it is the
// one place where pages are unmapped from slots. Each decision (which slot,
// how many groups, which tail to reclaim) is made once, from the slot table;
// each device shard is then told to do its part, and a shard that cannot
// has the others' steps undone, last first.
//
// Undo rule: a failure is undone along the way it came. Where undoing fails
// too (an unmap), the page is stranded in its pool (still mapped, owned by
// no slot, retried before the next mapping); a slot never lists a page that
// is not mapped, and lists as many pages on every device.
#pragma once

#include <atomic>
#include <cstdint>
#include <utility>
#include <vector>

#include "core/policy/reclaim.h"
#include "core/state.h"

namespace vat {

// Groups [fromGroup, toGroup) of a slot being mapped with the lock released.
struct Extension {
  uint32_t slot = 0;
  Extending kind = Extending::OnDemand;
  size_t fromGroup = 0;
  size_t toGroup = 0;
  struct OnDevice {
    TakenPages taken;                 // idle pages taken, then those created
    size_t creations = 0;             // pages to create off the lock (budget reserved)
    std::vector<PageHandle> handles;  // room for the pages created off the lock
    std::vector<Page*> records;       // room for the page records mapped off the lock
    size_t mapped = 0;
  };
  std::vector<OnDevice> on;
};

// Pages leaving a slot, unmapped with the lock released (reclaim ahead of
// need by the worker, a growAsync's room, a released sharer's drop).
struct Retirement {
  uint32_t slot = 0;
  bool ahead = false;  // by the prefetch worker (counted apart in the stats)
  struct OnDevice {
    std::vector<PageId> pages;
    std::vector<Address> addresses;
  };
  std::vector<OnDevice> on;
  uint64_t pages = 0;   // per device
  uint64_t toIdle = 0;  // of them, those whose last mapping this is (idle once unmapped)
};

class PageMapper {
 public:
  explicit PageMapper(CacheCore& core) : core_(core) {}

  // Pages every device can give now without taking from a slot: the least
  // device's idle + headroom.
  uint64_t freePages() const;
  // Pages a growth could have now on every device: free, plus reclaimable
  // (fenced ones included: the growth waits for them). `exclude`: slots not
  // to take from (the growing ones).
  uint64_t obtainablePages(const std::vector<uint32_t>& exclude, bool withLookAhead = true);

  // On the lock: maps every slot's groups up to its target on every device,
  // all or nothing; `missing` pages per device in all. On failure every slot
  // is as it was and the error is thrown (naming the device); pages it
  // reclaimed before failing stay idle in the pools.
  void growOnLock(const std::vector<std::pair<uint32_t, size_t>>& targets, uint64_t missing,
                  const std::vector<uint32_t>& exclude);
  // Pages for a new mapping on every device (a share's): idle, created,
  // reclaimed (not from `exclude`), all or nothing. giveBack on failure.
  std::vector<TakenPages> obtainPages(uint64_t count, const std::vector<uint32_t>& exclude);
  void giveBack(std::vector<TakenPages>& taken) noexcept;

  // Unmaps tail groups on every device, in reclaim order, until at least
  // `pages` pages per device went back to the pools; a fenced slot is waited
  // for first. Returns the pages (per device).
  uint64_t reclaim(uint64_t pages, const std::vector<uint32_t>& exclude);
  // On the lock: the slot's groups past the first `groups` unmapped on every
  // device (pages idle, or stranded where an unmap fails): the undo of a
  // growth. The slot must not be extending.
  void shrinkSlot(uint32_t slot, size_t groups) noexcept;
  // Every mapping of the slot dropped on every device (fences passed).
  void dropMappings(uint32_t slot) noexcept;
  bool holdsSharedPages(uint32_t slot) const;

  // Off the lock. begin: takes the extension's pages on every device (idle,
  // reserved creations; with mayReclaim, reclaimed from others) and marks
  // the slot as extending; false, taking nothing, when they cannot all be
  // had. run: creates and maps with the lock released, then commits or
  // undoes and rethrows. Called and returns with the lock held; the slot
  // always stops extending and waiters are woken.
  bool beginExtension(Extension& ext, uint32_t slot, size_t toGroups, bool mayReclaim, Extending kind);
  void runExtension(Lock& lk, Extension& ext, const std::atomic<bool>* cancel);

  // Retirements (off the lock, see Retirement). beginRetirement: the tail
  // group of the released slot the policy picks for reclaim ahead;
  // beginDemandRetirement: the first unfenced candidate of the reclaim
  // order (`exclude` left alone); beginDrop: every mapping of a released
  // sharer whose fences passed; detachAll: every page of a free slot. Each
  // false, taking nothing, when there is none. run unmaps with the lock
  // released; the pages go idle, or stranded where an unmap failed.
  bool beginRetirement(Retirement& r);
  bool beginDemandRetirement(Retirement& r, const std::vector<uint32_t>& exclude);
  // (a released sharer holding a cached prefix only with `cachedToo`, the
  // least recently released first: memory is short).
  bool beginDrop(Retirement& r, bool cachedToo = false);
  void detachAll(Retirement& r, uint32_t slot) { detachFrom(r, slot, 0); }
  // The slot's groups past its first `keep` (suspend: what it does not keep).
  void detachBeyond(Retirement& r, uint32_t slot, size_t keep) { detachFrom(r, slot, keep); }
  void runRetirement(Lock& lk, Retirement& r);
  // While pages are being retired: waits until they are idle and returns
  // true (the caller decides again); false at once when none are.
  bool waitForRetirements(Lock& lk);
  // Pages detached by retirements and not back yet (per device): still
  // mapped, counted with the released slots' bytes; of them, those that go idle.
  uint64_t retiringPages() const { return retiringPages_; }
  uint64_t retiringToIdle() const { return retiringToIdle_; }
  // Pages that would go idle once the released sharers drop their mappings
  // (those mapped only in such slots): a growth short of pages waits for
  // their fences rather than fail.
  uint64_t droppablePages();

  // Unmaps stranded pages again before anything is mapped (cheap when none).
  void retryStranded();
  // The reclaim policy's order and reclaim-ahead pick over the slot table as
  // it is now (fences queried once per slot, on every device).
  std::vector<ReclaimCandidate> reclaimOrder(const std::vector<uint32_t>& exclude);
  int reclaimAheadCandidate();

 private:
  void unmapTailGroup(uint32_t slot);
  void detachFrom(Retirement& r, uint32_t slot, size_t firstGroup);
  bool takeForExtension(Extension& ext, size_t count);
  void createOffLock(Lock& lk, Extension& ext, const std::atomic<bool>* cancel, std::exception_ptr& error);
  void mapOffLock(Lock& lk, Extension& ext, const std::atomic<bool>* cancel, std::exception_ptr& error);
  void abortIfStopping(const std::atomic<bool>* cancel) const;

  CacheCore& core_;
  uint64_t retiringPages_ = 0;   // detached by retirements in progress (per device)
  uint64_t retiringToIdle_ = 0;  // of them, going idle
};

// ERR_OUT_OF_MEMORY with the figures of the device that is shortest.
Error outOfMemory(CacheCore& core, uint64_t neededPages, uint64_t obtainablePages);

}  // namespace vat
