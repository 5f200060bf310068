// Physical pages: created once, mapped and unmapped many times, never more
// of them than the budget allows. Each page follows one state machine,
//
//   (none) --create--> Created --map--> Mapped --setAccess--> Accessible
//      ^                  |  ^                                     |
//      +-----release------+  +----------------unmap----------------+
//                            |                                     |
//                            +--unmap (retried)-- Stranded <-------+
//                                                   (an unmap failed)
//
// Suspending the cache takes an Accessible page out of memory and brings it
// back at the same addresses:
//
//   Accessible --unmap every mapping, release--> Suspended
//   Suspended  --create, map + setAccess at every address--> Accessible
//
// Both are all or nothing for the page: a failure undoes the steps taken.
// A Suspended page has no handle (but for one whose suspension failed half
// way and could not be mapped back: it keeps its memory, unmapped, and
// resume maps that again); its record keeps the addresses (address,
// sharedAt), so the slots' page lists and sharing survive a suspension.
//
// and every failure goes back along the arrows it came by, so a failed map
// leaves the page Created and a failed create leaves nothing. When going
// back fails too (an unmap during a rollback or a reclaim), the page is
// Stranded: still mapped at its address, owned by no slot, counted apart.
// Its unmap is retried before anything is mapped again and at close, so a
// later map at that address does not fail because of it.
#pragma once

#include <atomic>
#include <exception>
#include <cstdint>
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "pool/budget_account.h"

namespace vat {

enum class PageState : uint8_t { Vacant, Created, Mapped, Accessible, Stranded, Suspended };

using PageId = uint32_t;

struct Page {
  PageHandle handle = 0;
  PageState state = PageState::Vacant;
  Address address = 0;  // where it is mapped, when Mapped/Accessible
  // Further places the same physical page is mapped (sharing: fork, prefix).
  // The page is unmapped back to the pool only when the last mapping goes.
  std::vector<Address> sharedAt;
  // Held by a change that maps it with the cache's lock released (hold):
  // its mapping is not counted until the change places it, so that
  // statistics taken meanwhile add up.
  bool held = false;
};

struct PoolCounts {
  uint64_t budgetPages = 0;
  uint64_t created = 0;  // pages that exist (Created, Mapped or Accessible)
  uint64_t idle = 0;     // created, unmapped, waiting in the pool
  uint64_t mapped = 0;   // Accessible (or Mapped) somewhere
  uint64_t stranded = 0; // still mapped after a failed unmap, owned by no slot
  uint64_t suspended = 0; // given back to the backend by suspend(), to be backed again by resume()
  uint64_t held = 0;     // taken by a change mapping them off the lock, not yet any slot's
};

// Thread safety: the pool's bookkeeping (take, put, create, destroy, adopt,
// hold, place, counts) runs under the cache's lock. map/unmap of a page the
// caller holds (hold: taken from the pool, in no slot yet) may run without
// it: page records never move, and a held page's mapping changes no count
// until place() under the lock, so counts() always adds up
// (created = idle + mapped + stranded + held).
class PagePool {
 public:
  // `budget`: the account its page creations are charged to (its own, or
  // one shared with other caches: budget_account.h).
  PagePool(Backend& backend, std::shared_ptr<BudgetAccount> budget);
  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;

  size_t pageSize() const { return pageSize_; }
  uint64_t budgetPages() const { return budget_->limitPages(); }
  // Pages that can still be created without passing the budget (less when
  // other caches share it).
  uint64_t headroom() const { return budget_->availablePages(); }
  uint64_t idleCount() const { return idle_.size(); }
  PoolCounts counts() const;
  // Sharing: pages mapped at more than one address, and the mappings beyond
  // the first (each one a page's worth of memory that sharing saved).
  uint64_t sharedPages() const { return sharedPages_; }
  uint64_t extraMappings() const { return extraMappings_; }

  // An idle page, or nullopt-like kNone when the pool has none.
  static constexpr PageId kNone = UINT32_MAX;
  PageId takeIdle();
  // A newly created page; throws ERR_OUT_OF_MEMORY past the budget or when
  // the backend has no memory.
  PageId create();
  // Back to the idle list (the page must be unmapped).
  void putIdle(PageId id);
  // Gives the page's memory back to the backend (the page must be unmapped).
  void destroy(PageId id);
  // The same for an idle page with the cache's lock released: takeIdleToRelease
  // (under the lock: out of the idle list, held; kNone when there is none),
  // the backend's releasePage of its handle (off the lock), then noteReleased
  // (under the lock), or putIdle when the release failed.
  PageId takeIdleToRelease();
  void noteReleased(PageId id);

  // Created -> Mapped -> Accessible at `at`; on failure the page is Created again.
  void map(PageId id, Address at) { map(*pages_[id], at); }
  // Accessible/Mapped -> Created. Throws (page unchanged) if the backend fails.
  void unmap(PageId id) { unmap(*pages_[id]); }
  // The same on a record obtained with record() under the lock: safe off the
  // lock for a page the caller holds exclusively.
  Page* record(PageId id) { return pages_[id].get(); }
  void map(Page& page, Address at);
  void unmap(Page& page);
  // Bookkeeping of an unmap already done by the backend (off the lock, by a
  // retirement): the page is Created again.
  void noteUnmapped(Page& page);

  // Sharing. noteMappingAt (under the lock): records one more mapping of an
  // Accessible page at `at` before it is made, so the page cannot go while
  // it is being mapped there; then mapNoted (off the lock: backend calls
  // only, map + setAccess, undone on failure) makes it; forgetMappingAt
  // (under the lock) takes back a note whose mapping is not there (never
  // made, or unmapped by the caller). unmapAt: drops the mapping at `at`;
  // true when it was the last one (the page is Created again, for the caller
  // to put idle). Throws, leaving the mapping, when the backend fails.
  void noteMappingAt(PageId id, Address at);
  // Bookkeeping of an unmap at `at` already done by the backend (off the
  // lock): true when it was the page's last mapping (the page is Created
  // again, for the caller to put idle).
  bool noteUnmappedAt(PageId id, Address at);
  // `handle`: the page's, read under the lock (the page table may grow
  // meanwhile). `mapped` says, also when it throws, whether the mapping is
  // there (a failed setAccess whose unmap failed too leaves it).
  void mapNoted(PageHandle handle, Address at, bool& mapped);
  void forgetMappingAt(PageId id, Address at);
  // A Suspended page loses the address from its record (no backend call);
  // with its last address the record goes too, and unmapAt returns false
  // (there is no page to put idle).
  bool unmapAt(PageId id, Address at);
  uint32_t mappingsOf(PageId id) const;

  // Suspend and resume one page (see the state machine above). suspendPage
  // needs an Accessible page; resumePage a Suspended one and room in the
  // budget. Either throws with the page as it was.
  void suspendPage(PageId id);
  void resumePage(PageId id);
  bool isSuspended(PageId id) const { return pages_[id]->state == PageState::Suspended; }

  // The same in three steps, for suspend() and resume() to run the backend's
  // part with the cache's lock released (the cache is suspended and its pages
  // are moving: nothing else reaches them). begin* (under the lock) checks
  // the page (and resume charges the budget); *Memory (off the lock) makes
  // the backend calls on the page's record, which it only reads; note* (under
  // the lock) records the outcome (the page's state and handle, the counts,
  // the mappings a failed undo left) and rethrows a failure.
  struct Move {
    bool done = false;      // the backend's part succeeded
    bool memoryKept = false;  // failed, and memory stayed that the record must keep (see suspendPage/resumePage)
    PageHandle handle = 0;  // resume: the page's memory
    std::exception_ptr error;
    std::vector<Address> strays;
  };
  void beginSuspend(PageId id) const;
  Move suspendMemory(const Page& p) const noexcept;
  void noteSuspended(PageId id, Move& move);
  bool beginResume(PageId id);  // true: the page kept its memory (no charge)
  Move resumeMemory(const Page& p, bool kept) const noexcept;
  void noteResumed(PageId id, bool kept, Move& move);

  // A page that a failed unmap left mapped: kept out of the pool until its
  // unmap succeeds (retryStranded, teardown).
  void strand(PageId id);
  // An address left mapped that no page record lists any more (an unmap
  // failed while undoing): unmapped again with the stranded pages, and at close.
  void strayMapping(Address at) noexcept;
  bool hasStranded() const { return !stranded_.empty() || !strays_.empty(); }
  size_t strayMappings() const { return strays_.size(); }
  // Unmaps stranded pages again; those that go are idle. Returns how many
  // are still stranded. Never throws for a failed unmap.
  size_t retryStranded();

  // Under the lock: the page (taken or adopted for a change that maps it off
  // the lock) leaves the counts until place(), which counts it as what it
  // is then (mapped, or not). place() of a page not held does nothing.
  void hold(PageId id);
  void place(PageId id);

  // Creating a page off the lock: reserve room in the budget and a page
  // record (under the lock), create with the backend (no lock), then adopt
  // it (under the lock; never allocates, never throws) or cancel the
  // reservation.
  bool reserveCreation();
  void cancelCreation() {
    --pendingCreations_;
    budget_->refund();
  }
  PageId adopt(PageHandle handle);

  // Creates pages until `pages` are idle or created (bounded by the budget).
  void prefill(uint64_t pages);
  // Destroys up to `maxPages` idle pages; returns how many.
  uint64_t trim(uint64_t maxPages);
  // Close: unmaps and destroys every page, best effort: a page it cannot
  // unmap or release keeps its charge on the budget account.
  void teardown();

  const Page& page(PageId id) const { return *pages_[id]; }

 private:
  void forgetSuspendedAt(Page& p, PageId id, Address at);
  // The record of one of a shared page's extra addresses goes (the page
  // keeps its others).
  void dropSharedAddress(Page& p, Address at);
  bool remapAll(PageHandle handle, const std::vector<Address>& all, size_t count, std::vector<Address>& strays) const;

  Backend& backend_;
  size_t pageSize_;
  std::shared_ptr<BudgetAccount> budget_;  // charged for each created or pending page
  std::atomic<uint64_t> created_{0};
  std::atomic<uint64_t> mapped_{0};
  uint64_t pendingCreations_ = 0;
  uint64_t sharedPages_ = 0;
  uint64_t extraMappings_ = 0;
  uint64_t suspended_ = 0;
  uint64_t held_ = 0;
  std::vector<std::unique_ptr<Page>> pages_;  // records never move
  std::vector<PageId> vacant_;  // records in pages_ free for reuse
  std::vector<PageId> idle_;    // created, unmapped; LIFO
  std::vector<PageId> stranded_;
  std::vector<Address> strays_;
};

}  // namespace vat
