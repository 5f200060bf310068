// The KV cache: sequence slots over a reserved virtual range on each device,
// backed by pages on demand. Every decision (slot, generation, tokens,
// look-ahead, swap handle, what to reclaim) is made once, here, under one
// lock, and every device shard (device/device_shard.h: backend, page pool,
// range, each slot's pages and fences there) is told what to map, unmap or
// copy; one device is the general case, not a special one. Over several
// devices (tensor parallelism) each holds kvHeads / devices of every layer's
// heads. The parts, each in its own file:
//
//   slot_table.h        slots, their states and transitions
//   policy/placement.h  which slot a new sequence gets (best fit on mapped pages)
//   policy/reclaim.h    which pages a growth takes from others, in what order (fence-aware)
//   page_mapper.h       taking, mapping, unmapping pages on every device; all or nothing
//   prefetcher.h        the worker thread mapping ahead of step()
//   growth.cc           grow, step, growAsync      sharing.cc   fork and prefix
//   moves.cc            swap, suspend, resume      stats.cc     statistics, read, write
//   retry.cc            what a growth or a share waits for before it refuses
//
// Threads: public methods are thread-safe. One lock guards the bookkeeping;
// driver calls of the prefetch worker and of asynchronous growth run outside
// it ("extensions", see PageMapper::runExtension), so the serving loop's calls
// are not held up by mapping they do not need. Fence waits (reclaiming a slot
// whose GPU work is still queued) and the synchronous copies of write/read
// hold the lock: the pages they touch must not change under them.
//
// Fences: release(seq, streams) records one on the slot, per device. Until it
// has passed, no page mapped in that slot is unmapped by any path (reclaim of
// a released slot, of the tail of the sequence placed there next, close):
// pages without a pending fence go first, and a fenced one only after waiting.
#pragma once

#include <array>
#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "backend/backend.h"
#include "core/page_mapper.h"
#include "core/prefetcher.h"
#include "core/state.h"
#include "core/stats.h"
#include "layout/kv_layout.h"
#include "pool/host_block_pool.h"

namespace vat {

enum class BackendKind { Cuda, Host };

struct CacheOptions {
  ModelShape shape;             // kvHeads: the whole model's (each device holds kvHeads / devices)
  uint32_t layerGroups = 0;     // tensors per kind (see GroupedLayout); 0 = one per layer
  BackendKind backend = BackendKind::Host;
  std::vector<int> devices{0};  // CUDA ordinals (logical device numbers on the host backend)
  std::vector<uint64_t> memoryBudgets{0};  // bytes per device; 0 = that device's default (defaultBudget)
  size_t pageSize = 0;          // 0 = backend default
  uint64_t prefillBytes = 0;    // pages created into each device's pool at start
  uint32_t prefetchTokens = 0;  // look-ahead of step(); 0 = no prefetch worker
  uint32_t idleGroups = 1;      // page groups the worker keeps idle (creating or reclaiming ahead); 0 = none
  uint64_t hostMemoryBudget = 0;  // bytes of host memory for swap and suspend (all devices); 0 = none may be used
  uint64_t hostMemoryPrefill = 0; // of it, page-locked at start (blocks kept for reuse)
  bool prefixCache = true;        // publish / reserve({ tokens }) find cached prefixes
  uint64_t prefixCacheMaxBytes = UINT64_MAX;  // of released slots' pages (per device), the most kept findable
};

// What the binding reads once at construction: fixed for the cache's life.
struct CacheDescription {
  std::vector<Address> bases;  // per device
  size_t pageSize = 0;
  size_t granularity = 0;
  std::string backend;
};

struct SharePlan;  // sharing.cc

class KVCache {
 public:
  explicit KVCache(const CacheOptions& options);
  ~KVCache();
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  SequenceRef reserve(std::optional<uint64_t> expectedTokens);
  // Prefix caching (prefix.cc): a new sequence starting with the longest
  // cached prefix of `ids` (whole page groups, mapped shared; tokens() says
  // how many), or an empty one as reserve() places it.
  SequenceRef reserveCached(const std::vector<uint32_t>& ids, uint64_t salt, std::optional<uint64_t> expectedTokens);
  // The first ids.size() tokens of `seq` hold the KV of these ids: findable
  // by later reserveCached calls while the pages hold them.
  void publish(SequenceRef seq, const std::vector<uint32_t>& ids, uint64_t salt);
  // Test-only: prefix hashes ANDed with `mask` (0 forces collisions).
  void setPrefixHashMask(uint64_t mask);
  // Synchronous growth on the caller's thread; all or nothing on every
  // device. Returns the pages (per device) it unmapped from other slots.
  uint64_t grow(SequenceRef seq, uint64_t tokens);
  // A decode iteration: every entry backed (all or nothing across the batch
  // and the devices), then the worker maps ahead up to tokens + prefetchTokens.
  uint64_t step(const std::vector<GrowRequest>& batch);
  // step() when every entry is backed already (the steady state); false,
  // with nothing changed, when a page is missing: stepAsync then runs step()
  // on a pool thread, so the caller's thread never maps.
  bool stepIfBacked(const std::vector<GrowRequest>& batch);
  // Growth with the driver calls off the lock (growAsync on a pool thread);
  // all or nothing; `cancel` aborts it between pages.
  void growDetached(SequenceRef seq, uint64_t tokens, const std::atomic<bool>* cancel);
  // `streams`: a fence per device (none for a device: no fence there),
  // recorded on every device before the sequence goes.
  void release(SequenceRef seq, const std::vector<std::optional<uint64_t>>& streams);
  // A new sequence, in a free slot, whose first `tokens` tokens are those of
  // `from`: the whole page groups before token `tokens` are mapped from the
  // same physical pages (no copy), the group the token falls in is copied
  // into new pages on each device's stream in `streams` (after the work
  // queued there; 0: finished on return). KV is append-only, so that copy is
  // the whole copy-on-write. With copyLast the group holding token
  // tokens - 1 is copied even when whole (fork's default: the token a step
  // backed may not be written yet). `from` may be released when
  // allowReleased and its slot still holds its pages. All or nothing.
  SequenceRef share(SequenceRef from, uint64_t tokens, bool allowReleased, std::vector<uint64_t> streams,
                    bool copyLast = false);
  // Moving KV out of device memory and back (moves.cc). Each runs on the
  // caller's thread with the lock released during the copies, so it
  // belongs on a pool thread (the binding's async tasks).
  //
  // swapOut: the sequence's tokens (each device's shard) copied to host
  // memory after the work queued on its stream, then the sequence is
  // released; returns a handle for swapIn. On failure the sequence is as it
  // was. swapIn: a new sequence holding the swapped tokens; the handle is
  // used up. On failure nothing changed and the handle still works.
  uint64_t swapOut(SequenceRef seq, const std::vector<std::optional<uint64_t>>& streams);
  SequenceRef swapIn(uint64_t handle);
  void discardSwapped(uint64_t handle);
  // The tokens swapped-out sequence `handle` holds; 0 when there is none.
  uint64_t swappedTokens(uint64_t handle);
  // suspend: every physical page back to the backends, every address kept;
  // keepHost copies the mapped bytes to host memory first. Released slots and
  // pages past active sequences' tokens are unmapped, not kept. resume:
  // backs the same addresses again (restoring the bytes when kept); all or
  // nothing, so a failed resume can be retried.
  void suspend(bool keepHost);
  void resume();

  // `bytes` on each device; returns the bytes freed on all of them.
  uint64_t reclaim(uint64_t bytes);
  uint64_t trim();
  void write(size_t device, SequenceRef seq, uint32_t layer, KVKind kind, uint64_t token, const void* data,
             uint64_t bytes);
  void read(size_t device, SequenceRef seq, uint32_t layer, KVKind kind, uint64_t token, void* out, uint64_t bytes);
  uint64_t tokens(SequenceRef seq);
  // Bytes a growth could get now on all devices together (idle, within the
  // budget, reclaimable from prefetched tails and released slots): what a
  // scheduler checks before admitting a sequence. Without `withLookAhead`,
  // less the running sequences' look-ahead.
  uint64_t obtainableBytes(bool withLookAhead = true);
  CacheStats stats(size_t device);
  // Stops the worker, waits for extensions in flight (they stop early and
  // roll back), then tears everything down and gives every driver/OS
  // resource back (the backends too), devices in reverse order. Idempotent.
  void close();
  std::string workerError();

  // Fixed for the cache's life; safe without the lock, also after close.
  size_t deviceCount() const { return ordinals_.size(); }
  int deviceOrdinal(size_t d) const { return ordinals_[d]; }
  const KVLayout& layout() const { return *core_->layout; }
  const CacheDescription& description() const { return description_; }
  uint32_t prefetchTokens() const { return prefetcher_->lookAhead(); }

  // Test-only fault injection on device d's backend.
  void armFault(size_t device, const Fault& fault);

 private:
  // kv_cache.cc
  void openShards(const CacheOptions& o);
  void checkOpen() const;
  void checkNotSuspended() const;
  void checkDevice(size_t device) const;
  Slot& activeSlot(SequenceRef seq);
  SequenceRef occupy(uint32_t index);
  void unoccupy(uint32_t index) noexcept;
  void vacate(uint32_t slot);
  void settleVacated(uint32_t slot);
  bool settleCopyFences(bool wait);
  void teardown();
  // retry.cc: the one ladder of what a refusal waits for first
  enum class Short { Pages, Slot };
  bool waitBeforeRefusing(Lock& lk, Short what, uint64_t missing = 0, uint64_t obtainable = 0);
  // growth.cc
  Lock stepLock();
  struct StepTimer;
  void checkTargets(const std::vector<GrowRequest>& batch);
  uint64_t collectTargets(const std::vector<GrowRequest>& batch);
  bool growBatch(Lock& lk, const std::vector<GrowRequest>& batch, bool fromStep, bool onlyIfBacked = false);
  bool mustWaitForExtension();
  void mapBatch(uint64_t missing);
  bool makeRoomOffLock(Lock& lk, uint32_t slot, uint64_t missing);
  // sharing.cc
  Slot& shareSource(SequenceRef from, uint64_t tokens, bool allowReleased);
  SharePlan planShare(Lock& lk, SequenceRef from, uint64_t tokens, bool allowReleased, bool copyLast);
  void chooseShareSlots(Lock& lk, SharePlan& plan, SequenceRef from, bool allowReleased);
  int freeSlotForShare(uint32_t source);
  bool mapsPrefix(uint32_t slot, uint32_t source, size_t sharedPages);
  int slotMappingPrefix(uint32_t source, size_t sharedPages);
  void dropIfShared(uint32_t slot);
  bool sweepDropPending(bool wait, bool force = false);
  bool waitForDroppable(uint64_t missing, uint64_t obtainable);
  // moves.cc
  struct SwappedSequence {
    std::vector<HostBlocks> host;  // per device
    uint64_t tokens = 0;
    bool swappingIn = false;
  };
  void copySlotTokens(uint32_t slot, uint64_t tokens, const std::vector<HostBlocks>& host, bool toHost);
  void takeHost(std::vector<HostBlocks>& host, uint64_t bytesPerDevice, const char* what);
  void giveHost(std::vector<HostBlocks>& host) noexcept;
  void undoSwapIn(SequenceRef seq) noexcept;
  void waitForQuiet(Lock& lk);
  void dropUnkeptPages(Lock& lk);
  std::vector<PageId> distinctMappedPages(size_t device, PageState state);
  void copySuspended(bool toHost, const std::vector<std::vector<size_t>>* only);
  void freeHostMemory();
  void undoSuspend();
  void waitForStillPages(Lock& lk);
  void endMove() noexcept;
  void suspendOffLock(Lock& lk, size_t device, PageId id);
  void resumeOffLock(Lock& lk, size_t device, PageId id);
  void noteUnrestored(size_t device, size_t k) noexcept;
  // stats.cc
  void checkRange(const Slot& s, uint32_t layer, uint64_t token, uint64_t bytes) const;
  Address copyAddress(size_t device, SequenceRef seq, uint32_t layer, KVKind kind, uint64_t token, uint64_t bytes);
  uint64_t cachedPages(size_t device);
  void prefetchFigures(size_t device, CacheStats& st);
  // prefix.cc
  bool inPlace(const PrefixCache::Hit& hit, bool lastResort);
  SequenceRef takeInPlace(const PrefixCache::Hit& hit, const std::vector<uint32_t>& ids, uint64_t salt);

  std::unique_ptr<CacheCore> core_;
  std::unique_ptr<PageMapper> mapper_;
  std::unique_ptr<Prefetcher> prefetcher_;
  std::vector<int> ordinals_;
  CacheDescription description_;
  DemandStats demand_;  // hits, misses, stall, lock waits: the callers' side, once per cache
  // step() calls and their time: counted after the lock is released, hence atomic
  std::atomic<uint64_t> stepCalls_{0}, stepNanos_{0};
  // growBatch scratch, indexed by slot (see collectTargets). Filled again
  // after every wait, so callers on other threads may use it meanwhile.
  std::vector<uint32_t> batchStamp_;
  std::vector<uint64_t> batchTarget_;
  std::vector<uint32_t> batchSlots_;
  std::vector<std::pair<uint32_t, size_t>> batchGroups_;
  uint32_t batchEpoch_ = 0;
  bool asyncGrowthMapping_ = false;  // a growDetached holds the mapping turn (see there)
  // Mappings of shares in progress (per device), noted in the pools but not
  // yet listed by their child: stats() leaves them out of the savings until
  // the child lists them, so that its figures add up meanwhile.
  uint64_t shareNotesInFlight_ = 0;
  // Host side of swap and suspend (moves.cc); under the lock.
  std::unordered_map<uint64_t, std::unique_ptr<SwappedSequence>> swapped_;
  uint64_t nextSwapHandle_ = 1;
  HostStats hostStats_;
  // suspend({ keep: 'host' }), per device: page k of suspendedPages_[d] at
  // byte k × page size of suspendedCopy_[d].
  std::vector<std::vector<PageId>> suspendedPages_;
  std::vector<HostBlocks> suspendedCopy_;
  // Per device, indexes into suspendedPages_[d] of pages a failed resume
  // backed and could not suspend again (its undo failed): mapped, their
  // bytes not yet restored; the next resume copies them back too.
  std::vector<std::vector<size_t>> resumedUnrestored_;
  // A suspend or resume moves pages with the lock released (one page at a
  // time, and the host copy): meanwhile the cache is suspended, another
  // suspend or resume and close wait, and a released slot's pages stay where
  // they are (the mover may be at them; Slot::settling) until the move ends.
  bool pagesMoving_ = false;
};

}  // namespace vat
