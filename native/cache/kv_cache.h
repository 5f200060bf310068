// The KV cache: sequence slots over a reserved virtual range, backed by
// pages from the pool on demand. This façade holds the lock and composes the
// parts, each in its own file:
//
//   slot_table.h      slots, their states and generations
//   placement.h       which slot a new sequence gets (best fit on mapped pages)
//   reclaim_policy.h  which pages a growth takes from others, in what order (fence-aware)
//   page_mapper.h     taking, mapping, unmapping pages; all or nothing; rollback
//   prefetcher.h      the worker thread mapping ahead of step()
//   fence_list.h      GPU work that may still use a slot's pages
//   device_memory.h   backend + page pool + reserved range (one per device)
//
// Threads: public methods are thread-safe. One lock guards the bookkeeping;
// driver calls of the prefetch worker and of asynchronous growth run outside
// it ("extensions", see PageMapper::runExtension), so the serving loop's calls
// are not held up by mapping they do not need. Fence waits (reclaiming a slot
// whose GPU work is still queued) and the synchronous copies of write/read
// hold the lock: the pages they touch must not change under them.
//
// Fences: release(seq, stream) records one on the slot. Until it has passed,
// no page mapped in that slot is unmapped by any path (reclaim of a released
// slot, of the tail of the sequence placed there next, close): pages without
// a pending fence go first, and a fenced one only after waiting for it.
#pragma once

#include <array>
#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "backend/backend.h"
#include "cache/cache_core.h"
#include "cache/page_mapper.h"
#include "cache/prefetcher.h"
#include "layout/kv_layout.h"
#include "pool/host_block_pool.h"

namespace vat {

enum class BackendKind { Cuda, Host };

struct CacheOptions {
  ModelShape shape;
  uint32_t layerGroups = 0;     // tensors per kind (see GroupedLayout); 0 = one per layer
  BackendKind backend = BackendKind::Host;
  int device = 0;
  size_t pageSize = 0;          // 0 = backend default
  uint64_t memoryBudget = 0;    // 0 = default (see defaultBudget)
  uint64_t prefillBytes = 0;    // pages created into the pool at start
  uint32_t prefetchTokens = 0;  // look-ahead of step(); 0 = no prefetch worker
  uint32_t idleGroups = 1;      // page groups the worker keeps idle (creating or reclaiming ahead); 0 = none
  uint64_t hostMemoryBudget = 0;  // bytes of host memory for swap and suspend; 0 = none may be used
  uint64_t hostMemoryPrefill = 0; // of it, page-locked at start (blocks kept for reuse)
};

// Host memory the cache holds: swapped-out sequences and a suspended
// cache's bytes, within CacheOptions::hostMemoryBudget.
struct HostStats {
  uint64_t budgetBytes = 0;
  uint64_t bytesHeld = 0;        // page-locked now: in use, idle (kept for reuse), being made
  uint64_t bytesIdle = 0;        // of them, kept for the next swap or suspend
  uint64_t bytesSwapped = 0;     // swapped-out sequences' tokens
  uint64_t swappedSequences = 0;
  uint64_t bytesSuspendCopy = 0; // a suspended cache's pages kept on the host (keep: 'host')
  uint64_t swapOuts = 0;         // completed, ever
  uint64_t swapIns = 0;
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
  uint64_t pagesReclaimedAhead = 0;  // pages the worker unmapped from released slots ahead of need
  uint64_t stallNanos = 0;        // caller time spent mapping or waiting in grow/step
  uint64_t lockWaits = 0;         // step() calls that found the cache's lock held by another thread
  uint64_t lockWaitNanos = 0;     // and the time they waited for it
  uint64_t steps = 0;             // step() calls (stepAsync's first look included), done or failed
  uint64_t stepNanos = 0;         // and the time they took in the library, lock and mapping included
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
  HostStats host;
  bool suspended = false;
  uint64_t bytesSuspended = 0;  // physical pages suspend() gave back, that resume() backs again
};

// What the binding reads once at construction: fixed for the cache's life.
struct CacheDescription {
  Address base = 0;
  size_t pageSize = 0;
  size_t granularity = 0;
  std::string backend;
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
  // stepIfBacked(batch): step() when every entry is backed already (the
  // steady state); false, with nothing changed, when a page is missing:
  // stepAsync then runs step() on a pool thread, so the caller's thread
  // never maps. Declared below, with GrowthMark.
  // Growth with the driver calls off the lock (for growAsync on a pool
  // thread); all or nothing; `cancel` aborts it between pages.
  void growDetached(SequenceRef seq, uint64_t tokens, const std::atomic<bool>* cancel);
  void release(SequenceRef seq, std::optional<uint64_t> fenceStream);
  // A new sequence, in a free slot, whose first `tokens` tokens are those of
  // `from`: the whole page groups before token `tokens` are mapped from the
  // same physical pages (no copy), the group the token falls in is copied
  // into new pages on `stream` (after the work queued there; 0: finished on
  // return). KV is append-only, so that copy is the whole copy-on-write.
  // `from` may be released when allowReleased and its slot still holds its
  // pages. All or nothing.
  // With copyLast the group holding token tokens - 1 is copied even when it
  // is whole (fork's default: the token a step backed may not be written yet).
  SequenceRef share(SequenceRef from, uint64_t tokens, bool allowReleased, uint64_t stream, bool copyLast = false) {
    return share(from, tokens, allowReleased, stream, std::nullopt, nullptr, copyLast);
  }
  // The same into slot `intoSlot` (a cache over several devices: the slot the
  // first device chose); `undo` receives what cancelShare needs to put the
  // slot back as it was when another device cannot match the share.
  struct ShareUndo {
    uint32_t generation = 0;
  };
  SequenceRef share(SequenceRef from, uint64_t tokens, bool allowReleased, uint64_t stream,
                    std::optional<uint32_t> intoSlot, ShareUndo* undo, bool copyLast = false);
  // The new sequence goes (its mappings dropped as a release drops them) and
  // the slot's generation and released length are as before the share.
  void cancelShare(SequenceRef seq, const ShareUndo& undo) noexcept;
  // Moving KV out of device memory and back (kv_cache_moves.cc). Each runs
  // on the caller's thread with the lock released during the copies, so it
  // belongs on a pool thread (the binding's async tasks).
  //
  // swapOut: the sequence's tokens (every layer's K and V, tokens ×
  // bytesPerToken bytes) copied to host memory after the work queued on
  // `fenceStream` (if any), then the sequence is released; returns a handle
  // for swapIn. On failure the sequence is as it was.
  // With keepSequence the sequence stays as it was (a cache over several
  // devices releases it once every device has its copy).
  uint64_t swapOut(SequenceRef seq, std::optional<uint64_t> fenceStream, bool keepSequence = false);
  // swapIn: a new sequence (any free slot) holding the swapped tokens; the
  // handle is used up. On failure nothing changed and the handle still works.
  // intoSlot: the slot the first device chose (several devices); with
  // keepCopy the host copy stays (discardSwapped frees it) so that the
  // swapIn can be cancelled (cancelReserve-like: cancelSwapIn).
  SequenceRef swapIn(uint64_t handle, std::optional<uint32_t> intoSlot = std::nullopt, bool keepCopy = false);
  // A swapIn into a slot that another device could not match: the new
  // sequence goes, the slot's generation is as before the swapIn.
  void cancelSwapIn(SequenceRef seq) noexcept;
  // Frees a swapped sequence's host memory without swapping it in.
  // Undoes a swapOut(keepSequence) that another device could not follow:
  // the copy freed and not counted as a swap-out.
  void cancelSwapOut(uint64_t handle);
  void discardSwapped(uint64_t handle);
  // The tokens swapped-out sequence `handle` holds; 0 when there is none.
  uint64_t swappedTokens(uint64_t handle);
  // suspend: every physical page back to the backend, every address kept;
  // keepHost copies the mapped bytes to host memory first. Released slots and
  // pages past active sequences' tokens are unmapped, not kept. resume:
  // backs the same addresses again (restoring the bytes when kept); all or
  // nothing, so a failed resume can be retried.
  void suspend(bool keepHost);
  void resume();

  // ---- for a cache over several devices (sharded_cache.h): one KVCache per
  // device, every decision made once and applied to each.
  //
  // reserve() into the given slot (the one the first device placed the
  // sequence in); ERR_NO_SLOT when that slot is not free here.
  SequenceRef reserveAt(uint32_t slot);
  // Undoes a reserve (or reserveAt) that another device could not match:
  // the slot goes back to how it was, its generation included, so that the
  // devices' generations stay equal. Nothing grown yet; never throws.
  void cancelReserve(SequenceRef seq) noexcept;
  // The tokens and mapped page groups of each entry before a growth, and the
  // undo: each entry back to its tokens and, with unmapGrown, its mapped
  // groups beyond the mark unmapped (pages idle in the pool again) unless the
  // worker is mapping that slot now. Entries released meanwhile are left.
  struct GrowthMark {
    SequenceRef seq;
    uint64_t tokens = 0;
    size_t groups = 0;
  };
  std::vector<GrowthMark> markGrowth(const std::vector<GrowRequest>& batch);
  // With `before` (a cache over several devices), when it steps, each
  // entry's mark from before the step (under the same lock): the undo if a
  // later device fails.
  bool stepIfBacked(const std::vector<GrowRequest>& batch, std::vector<GrowthMark>* before = nullptr);
  void undoGrowth(const std::vector<GrowthMark>& marks, bool unmapGrown) noexcept;
  // Whether the pages the batch is missing could be had now (idle, within
  // the budget, reclaimable): a device that cannot is asked first, so that
  // its refusal costs the other devices nothing. A hint (other threads may
  // change it); the growth itself decides.
  bool couldBack(const std::vector<GrowRequest>& batch);
  // The fence of release(seq, stream) on its own: recorded on every device
  // before any device releases, so a failure leaves the sequence everywhere.
  void recordFence(SequenceRef seq, uint64_t stream);

  uint64_t reclaim(uint64_t bytes);
  uint64_t trim();
  void write(SequenceRef seq, uint32_t layer, KVKind kind, uint64_t token, const void* data, uint64_t bytes);
  void read(SequenceRef seq, uint32_t layer, KVKind kind, uint64_t token, void* out, uint64_t bytes);
  uint64_t tokens(SequenceRef seq);
  // Bytes a growth could get now (idle, within the budget, reclaimable from
  // prefetched tails and released slots): what a scheduler checks before
  // admitting or re-admitting a sequence.
  // Without `withLookAhead`, less the running sequences' look-ahead: what
  // the prefetch worker can still map ahead without taking from another.
  uint64_t obtainableBytes(bool withLookAhead = true);
  CacheStats stats();
  // Stops the worker, waits for extensions in flight (they stop early and
  // roll back), then tears everything down and gives every driver/OS
  // resource back (the backend too). Idempotent.
  void close();
  bool closed();
  // Why the prefetch worker could not start (prefetch is then off), or "".
  std::string workerError();

  // Fixed for the cache's life; safe without the lock, also after close.
  const KVLayout& layout() const { return *core_->layout; }
  const CacheDescription& description() const { return description_; }
  uint32_t prefetchTokens() const { return prefetcher_->lookAhead(); }

  // Test-only fault injection on the backend.
  void armFault(const Fault& fault);

 private:
  void checkOpen() const;
  void checkNotSuspended() const;
  SequenceRef occupy(uint32_t index);
  void unoccupy(uint32_t index) noexcept;
  Lock stepLock();
  struct SwappedSequence {
    HostBlocks host;
    uint64_t tokens = 0;
    bool swappingIn = false;
  };
  void copySlotTokens(uint32_t slot, uint64_t tokens, const HostBlocks& host, bool toHost);
  void waitForQuiet(Lock& lk);
  void dropUnkeptPages();
  void resumePages(std::vector<PageId>& resumed);
  std::vector<PageId> distinctMappedPages(PageState state);
  void freeHostMemory();
  Slot& activeSlot(SequenceRef seq);
  bool growBatch(Lock& lk, const std::vector<GrowRequest>& batch, bool fromStep, bool onlyIfBacked = false);
  uint64_t collectTargets(const std::vector<GrowRequest>& batch);
  void checkRange(Slot& s, uint32_t layer, uint64_t token, uint64_t bytes) const;
  void teardown();
  Slot& shareSource(SequenceRef from, uint64_t tokens, bool allowReleased);
  int freeSlotForShare(uint32_t source);
  void fenceShareCopy(uint64_t stream, FenceHandle& sourceFence, FenceHandle& childFence);
  bool settleCopyFences(bool wait);
  bool waitForDroppable(uint64_t missing, uint64_t obtainable);
  bool holdsSharedPages(const Slot& s);
  void dropMappings(uint32_t slot);
  void dropIfShared(uint32_t slot);
  void vacate(uint32_t slot);
  bool sweepDropPending(bool wait, bool force = false);
  int slotMappingPrefix(uint32_t source, size_t sharedPages);
  bool mapsPrefix(uint32_t slot, uint32_t source, size_t sharedPages);

  std::unique_ptr<CacheCore> core_;
  std::unique_ptr<PageMapper> mapper_;
  std::unique_ptr<Prefetcher> prefetcher_;
  CacheDescription description_;
  uint64_t reusedPages_ = 0;
  PrefetchStats demand_;  // hits, misses, pages on demand, stall: the callers' side
  // step() calls and their time: counted after the lock is released, hence atomic
  std::atomic<uint64_t> stepCalls_{0}, stepNanos_{0};
  struct StepTimer;
  // growBatch scratch, indexed by slot (see collectTargets). Filled again
  // after every wait, so callers on other threads may use it meanwhile.
  std::vector<uint32_t> batchStamp_;
  std::vector<uint64_t> batchTarget_;
  std::vector<uint32_t> batchSlots_;
  std::vector<std::pair<uint32_t, size_t>> batchGroups_;
  uint32_t batchEpoch_ = 0;
  bool asyncGrowthMapping_ = false;  // a growDetached holds the mapping turn (see there)
  // Host memory (kv_cache_moves.cc); the rest under the lock.
  std::unique_ptr<HostBlockPool> hostPool_;
  std::unordered_map<uint64_t, SwappedSequence> swapped_;
  uint64_t nextSwapHandle_ = 1;
  HostStats hostStats_;
  HostBlocks suspendedCopy_;  // keep: 'host': page k of suspendedPages_ at byte k × page size
  std::vector<PageId> suspendedPages_;
};

}  // namespace vat
