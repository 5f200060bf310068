// The KV cache: sequence slots over a reserved virtual range, backed by
// pages from the pool on demand. This is where a sequence grows (pages get
// mapped), is released (pages stay: deferred reclamation) and gives pages
// back under memory pressure, and where the prefetch worker maps ahead.
//
// Threads: public methods are thread-safe. One lock guards the bookkeeping;
// driver calls of the prefetch worker and of asynchronous growth run outside
// it ("extensions", see runExtension), so the serving loop's calls are not
// held up by mapping they do not need. Fence waits (reclaiming a slot whose
// GPU work is still queued) and the synchronous copies of write/read hold the
// lock: the pages they touch must not change under them.
//
// Fences: release(seq, stream) records one on the slot. Until it has passed,
// no page mapped in that slot is unmapped by any path (reclaim of a released
// slot, of the tail of the sequence placed there next, close): pages without
// a pending fence go first, and a fenced one only after waiting for it.
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "backend/backend.h"
#include "layout/kv_layout.h"
#include "pool/page_pool.h"

namespace vat {

enum class BackendKind { Cuda, Host };

struct CacheOptions {
  ModelShape shape;
  BackendKind backend = BackendKind::Host;
  int device = 0;
  size_t pageSize = 0;          // 0 = backend default
  uint64_t memoryBudget = 0;    // 0 = default (see defaultBudget)
  uint64_t prefillBytes = 0;    // pages created into the pool at start
  uint32_t prefetchTokens = 0;  // look-ahead of step(); 0 = no prefetch worker
};

// A sequence as the caller holds it; stale once its slot is released.
struct SequenceRef {
  uint32_t slot = 0;
  uint32_t generation = 0;
};

struct GrowRequest {
  SequenceRef seq;
  uint64_t tokens = 0;
};

struct SlotStats {
  uint32_t slot;
  bool active;
  uint64_t tokens;        // grown length (active) or 0
  uint64_t backedTokens;  // tokens the mapped pages hold
  uint64_t mappedPages;
};

struct PrefetchStats {
  uint64_t hits = 0;              // step() entries already backed: no work on the caller's thread
  uint64_t misses = 0;            // step() entries that mapped or waited on the caller's thread
  uint64_t pagesAhead = 0;        // pages mapped by the worker / async growth
  uint64_t pagesOnDemand = 0;     // pages mapped on the caller's thread (grow, step)
  uint64_t stallNanos = 0;        // caller time spent mapping or waiting in grow/step
  uint64_t errors = 0;            // worker extensions that failed (retried at the next step)
  std::string workerError;        // why the worker could not start (prefetch off), or empty
};

struct CacheStats {
  std::string backend;
  uint64_t pageSize = 0;
  uint64_t budgetBytes = 0;
  PoolCounts pages;
  uint64_t bytesBacked = 0;  // mapped pages * page size
  uint64_t bytesUsed = 0;    // tokens of active sequences * bytes per token
  uint32_t activeSequences = 0;
  uint64_t reservedVirtualBytes = 0;
  std::vector<SlotStats> slots;
  std::array<OpCounter, kBackendOpCount> calls{};
  uint64_t callsOnOwnerThread = 0;
  uint64_t reclaimedPages = 0;  // pages unmapped from released slots or prefetched tails, ever
  uint64_t reusedPages = 0;     // mapped pages a new sequence found in its slot, ever
  PrefetchStats prefetch;
};

class KVCache {
 public:
  explicit KVCache(const CacheOptions& options);
  ~KVCache();
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  SequenceRef reserve(std::optional<uint64_t> expectedTokens);
  // Synchronous growth on the caller's thread; all or nothing. Returns the
  // pages it unmapped from other slots to make room (0 when none).
  uint64_t grow(SequenceRef seq, uint64_t tokens);
  // A decode iteration: every entry backed (all or nothing across the batch),
  // then the worker maps ahead up to tokens + prefetchTokens.
  uint64_t step(const std::vector<GrowRequest>& batch);
  // Growth with the driver calls off the lock (for growAsync on a pool
  // thread); all or nothing; `cancel` aborts it between pages.
  void growDetached(SequenceRef seq, uint64_t tokens, const std::atomic<bool>* cancel);
  void release(SequenceRef seq, std::optional<uint64_t> fenceStream);
  uint64_t reclaim(uint64_t bytes);
  uint64_t trim();
  void write(SequenceRef seq, uint32_t layer, KVKind kind, uint64_t token, const void* data, uint64_t bytes);
  void read(SequenceRef seq, uint32_t layer, KVKind kind, uint64_t token, void* out, uint64_t bytes);
  uint64_t tokens(SequenceRef seq);
  CacheStats stats();
  // Stops the worker, waits for extensions in flight (they stop early and
  // roll back), then tears everything down and gives every driver/OS
  // resource back (the backend too). Idempotent.
  void close();
  bool closed();
  // Why the prefetch worker could not start (prefetch is then off), or "".
  std::string workerError();

  // Fixed for the cache's life; safe without the lock.
  const KVLayout& layout() const { return *layout_; }
  Address base() const { return base_; }
  Backend& backend() { return *backend_; }
  uint32_t prefetchTokens() const { return prefetchTokens_; }

  // Test-only fault injection on the backend.
  void armFault(const Fault& fault);

 private:
  using Lock = std::unique_lock<std::mutex>;

  struct Slot {
    bool active = false;
    bool extending = false;             // an extension is mapping its next groups off the lock
    bool extendingAhead = false;        // ... and it is the prefetch worker's
    uint32_t generation = 0;
    uint64_t tokens = 0;
    uint64_t prefetchTarget = 0;        // tokens the worker should have backed
    std::vector<PageId> pages;          // mapped, group-major
    std::vector<FenceHandle> fences;    // GPU work that may still use the pages
  };

  // Groups [fromGroup, toGroup) of a slot being mapped off the lock.
  struct Extension {
    uint32_t slot = 0;
    bool ahead = false;             // the prefetch worker's (demand may wait for it)
    size_t fromGroup = 0;
    size_t toGroup = 0;
    std::vector<PageId> pages;      // idle pages taken for it
    size_t creations = 0;           // pages to create (budget reserved)
    std::vector<PageId> created;    // pages created for it (destroyed on rollback)
    std::vector<PageHandle> handles;  // room for the pages created off the lock
    std::vector<Page*> records;       // room for the page records mapped off the lock
  };

  // One entry of the reclaim order (see reclaimOrder).
  struct ReclaimCandidate {
    uint32_t slot;
    size_t keepGroups;  // groups that stay mapped (the tokens of an active sequence)
    bool fenced;        // GPU work may still use its pages: wait before unmapping
  };

  void checkOpen() const;
  Slot& activeSlot(SequenceRef seq);
  size_t groupsOf(const Slot& s) const { return s.pages.size() / layout_->pagesPerGroup(); }
  size_t neededGroups(const Slot& s) const { return layout_->groupsForTokens(s.tokens); }

  void growBatch(Lock& lk, const std::vector<GrowRequest>& batch, bool fromStep);
  uint64_t collectTargets(const std::vector<GrowRequest>& batch);
  uint64_t obtainablePages(const std::vector<uint32_t>& exclude);
  bool waitForPrefetchToFinish(Lock& lk);
  std::vector<PageId> obtainPages(uint64_t count, std::vector<PageId>& createdNow,
                                  const std::vector<uint32_t>& exclude);
  void returnPages(const std::vector<PageId>& pages, const std::vector<PageId>& createdNow);
  void mapGroups(uint32_t slotIndex, Slot& s, size_t toGroups, const std::vector<PageId>& pages, size_t& next);
  void unmapGroupsFrom(Slot& s, size_t keepPages);

  bool beginExtension(Extension& ext, uint32_t slot, size_t toGroups, bool mayReclaim, bool ahead);
  void runExtension(Lock& lk, Extension& ext, const std::atomic<bool>* cancel);
  void endExtension(const Extension& ext);
  void abortIfStopping(const std::atomic<bool>* cancel) const;

  std::vector<ReclaimCandidate> reclaimOrder(const std::vector<uint32_t>& exclude);
  uint64_t reclaimLocked(uint64_t pages, const std::vector<uint32_t>& exclude);
  void unmapTailGroup(Slot& s);
  bool fencesPending(Slot& s);
  void waitFences(Slot& s);
  void checkRange(Slot& s, uint32_t layer, uint64_t token, uint64_t bytes) const;

  void startWorker();
  void wakeWorker();
  void workerLoop();
  bool planPrefetch(Extension& ext);
  bool topUpPool(Lock& lk);
  void teardown();

  std::mutex lock_;
  std::condition_variable changed_;   // an extension or a top-up finished, or the cache closed
  std::condition_variable workCv_;    // work for the prefetch worker, or stop
  std::condition_variable started_;   // the worker bound its thread (or failed to)
  bool closed_ = false;
  std::atomic<bool> closing_{false};
  bool prefetchActive_ = false;       // step() has run since the last trim()
  uint64_t workEpoch_ = 0;            // bumped with every wake-up of the worker (its wait predicate)
  uint32_t demandWaiting_ = 0;        // callers waiting for prefetch to finish: the worker starts nothing new
  uint32_t aheadInFlight_ = 0;        // worker extensions and pool top-ups running off the lock
  bool workerStarted_ = false;
  std::string workerError_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<KVLayout> layout_;
  std::unique_ptr<PagePool> pool_;
  Address base_ = 0;
  std::vector<Slot> slots_;
  uint32_t prefetchTokens_ = 0;
  uint64_t poolLowWater_ = 0;         // idle pages the worker keeps ready while prefetch is active
  uint64_t reclaimedPages_ = 0;
  uint64_t reusedPages_ = 0;
  PrefetchStats prefetch_;
  // growBatch scratch, indexed by slot (see collectTargets). Filled again
  // after every wait, so callers on other threads may use it meanwhile.
  std::vector<uint32_t> batchStamp_;
  std::vector<uint64_t> batchTarget_;
  std::vector<uint32_t> batchSlots_;
  uint32_t batchEpoch_ = 0;
  std::thread worker_;
};

// Budget when none is given: cuda, the device's free memory less 5% of its
// total; host, half of the free RAM.
uint64_t defaultBudget(Backend& backend);

}  // namespace vat
