// The figures stats(device) reports. Physical ones (pages, bytes, driver
// calls, host memory) are one device's; decisions (hits, misses, steps,
// stalls) are the cache's, made once, the same in every device's report.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/prefix_cache.h"
#include "pool/page_pool.h"

namespace vat {

// Host memory the device's share of the cache holds: swapped-out sequences
// and a suspended cache's bytes, within its part of hostMemoryBudget.
struct HostStats {
  uint64_t budgetBytes = 0;
  uint64_t bytesHeld = 0;        // page-locked now: in use, idle (kept for reuse), being made
  uint64_t bytesIdle = 0;        // of them, kept for the next swap or suspend
  uint64_t bytesSwapped = 0;     // swapped-out sequences' tokens
  uint64_t swappedSequences = 0;
  uint64_t bytesSuspendCopy = 0; // a suspended cache's pages kept on the host (keep: 'host')
  uint64_t swapOuts = 0;         // completed, ever
  uint64_t swapIns = 0;

  template <class F> void fields(F&& f) const {
    f("budgetBytes", budgetBytes);
    f("bytesHeld", bytesHeld);
    f("bytesIdle", bytesIdle);
    f("bytesSwapped", bytesSwapped);
    f("swappedSequences", swappedSequences);
    f("bytesSuspendCopy", bytesSuspendCopy);
    f("swapOuts", swapOuts);
    f("swapIns", swapIns);
  }
};

struct SlotStats {
  uint32_t slot;
  bool active;
  uint64_t tokens;        // grown length (active) or 0
  uint64_t backedTokens;  // tokens the mapped pages hold
  uint64_t mappedPages;

  template <class F> void fields(F&& f) const {
    f("slot", slot);
    f("active", active);
    f("tokens", tokens);
    f("backedTokens", backedTokens);
    f("mappedPages", mappedPages);
  }
};

// The callers' side of growth, once per cache.
struct DemandStats {
  uint64_t hits = 0;           // step() entries already backed: no work on the caller's thread
  uint64_t misses = 0;         // step() entries that mapped or waited on the caller's thread
  uint64_t stallNanos = 0;     // caller time spent mapping or waiting in grow/step
  uint64_t lockWaits = 0;      // step() calls that found the cache's lock held by another thread
  uint64_t lockWaitNanos = 0;  // and the time they waited for it

  template <class F> void fields(F&& f) const {
    f("hits", hits);
    f("misses", misses);
    f("stallNanoseconds", stallNanos);
    f("lockWaits", lockWaits);
    f("lockWaitNanoseconds", lockWaitNanos);
  }
};

struct PrefetchStats : DemandStats {
  uint64_t pagesAhead = 0;           // pages mapped by the worker / async growth (this device)
  uint64_t pagesOnDemand = 0;        // pages mapped on the caller's thread (grow, step, share; this device)
  uint64_t pagesReclaimedAhead = 0;  // pages the worker unmapped from released slots ahead of need
  uint64_t steps = 0;                // step() calls (stepAsync's first look included), done or failed
  uint64_t stepNanos = 0;            // and the time they took in the library, lock and mapping included
  uint64_t errors = 0;               // worker extensions that failed (retried at the next step)
  std::string workerError;           // why the worker could not start (prefetch off), or empty
  uint32_t tokens = 0;               // the look-ahead (prefetchTokens)

  template <class F> void fields(F&& f) const {
    DemandStats::fields(f);
    f("tokens", tokens);
    f("pagesAhead", pagesAhead);
    f("pagesReclaimedAhead", pagesReclaimedAhead);
    f("pagesOnDemand", pagesOnDemand);
    f("steps", steps);
    f("stepNanoseconds", stepNanos);
    f("errors", errors);
    f("workerError", workerError.empty() ? nullptr : &workerError);
  }
};

struct CacheStats {
  std::string backend;
  uint64_t pageSize = 0;
  uint64_t budgetBytes = 0;
  PoolCounts pages;
  uint64_t bytesBacked = 0;  // mapped pages * page size
  uint64_t bytesUsed = 0;    // tokens of active sequences * bytes per token
  // Where the backed bytes are: bytesUsed + bytesBeyondTokens + bytesInReleasedSlots = bytesBacked.
  uint64_t bytesBeyondTokens = 0;     // mapped to active sequences past their tokens: the two below
  uint64_t bytesPageRounding = 0;     // of the page groups the tokens need, past the tokens (internal fragmentation)
  uint64_t bytesSpareGroups = 0;      // whole page groups past what the tokens need (look-ahead, inherited tails)
  uint64_t bytesInReleasedSlots = 0;  // kept mapped by released slots (deferred reclamation; reclaimable)
  uint64_t bytesPooled = 0;           // idle pages in the pool (not mapped)
  uint32_t activeSequences = 0;
  uint64_t reservedVirtualBytes = 0;
  std::vector<SlotStats> slots;
  std::array<OpCounter, kBackendOpCount> calls{};
  uint64_t callsOnOwnerThread = 0;
  uint64_t reclaimedPages = 0;  // pages unmapped from released slots or prefetched tails, ever
  uint64_t reusedPages = 0;     // mapped pages a new sequence found in its slot, ever
  uint64_t sharedPages = 0;     // physical pages mapped in more than one slot (fork, prefix)
  uint64_t bytesSavedBySharing = 0;  // mappings beyond a page's first, in bytes: the slots' mapped
                                     // bytes add up to bytesBacked + this
  PrefetchStats prefetch;
  PrefixCacheStats prefixCache;
  HostStats host;
  bool suspended = false;
  uint64_t bytesSuspended = 0;  // physical pages suspend() gave back, that resume() backs again

  // Every figure with the name the API reports it under: the one list of
  // names (the binding walks it; lib/stats.ts types it).
  template <class F> void fields(F&& f) const {
    f("backend", backend);
    f("pageSize", pageSize);
    f("budgetBytes", budgetBytes);
    f("pagesCreated", pages.created);
    f("pagesMapped", pages.mapped);
    f("pagesPooled", pages.idle);
    f("pagesStranded", pages.stranded);
    f("pagesSuspended", pages.suspended);
    f("pagesInFlight", pages.held);
    f("bytesBacked", bytesBacked);
    f("bytesUsed", bytesUsed);
    f("bytesBeyondTokens", bytesBeyondTokens);
    f("bytesPageRounding", bytesPageRounding);
    f("bytesSpareGroups", bytesSpareGroups);
    f("bytesInReleasedSlots", bytesInReleasedSlots);
    f("bytesPooled", bytesPooled);
    f("activeSequences", activeSequences);
    f("reservedVirtualBytes", reservedVirtualBytes);
    f("pagesReclaimed", reclaimedPages);
    f("pagesReused", reusedPages);
    f("pagesShared", sharedPages);
    f("bytesSavedBySharing", bytesSavedBySharing);
    f("driverCallsOnJsThread", callsOnOwnerThread);
    f("suspended", suspended);
    f("bytesSuspended", bytesSuspended);
    f("host", host);
    f("prefetch", prefetch);
    f("prefixCache", prefixCache);
    f("slots", slots);
    f("driverCalls", calls);
  }
};

}  // namespace vat
