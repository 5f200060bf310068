#include "cache/kv_cache.h"

#include <algorithm>
#include <chrono>
#include <thread>

#include "backend/cuda_backend.h"
#include "backend/host_backend.h"
#include "cache/placement.h"
#include "common/errors.h"
#include "common/lifetime.h"

namespace vat {

namespace {

std::unique_ptr<Backend> makeBackend(const CacheOptions& o) {
  if (o.backend == BackendKind::Cuda) return std::make_unique<CudaBackend>(o.device, o.pageSize);
  return std::make_unique<HostBackend>(o.pageSize);
}

uint64_t nowNanos() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

}  // namespace

// Setup order: backend, layout (checks the shape), pool and range, prefetch
// worker. A step that throws gives back what it took; what the steps before
// it built is destroyed with the members (the backend releases its context).
KVCache::KVCache(const CacheOptions& o) {
  watchProcessExit();
  std::unique_ptr<Backend> backend = makeBackend(o);
  auto layout = std::make_unique<GroupedLayout>(o.shape, backend->pageSize(), o.layerGroups ? o.layerGroups : o.shape.layers);
  uint64_t budget = o.memoryBudget ? o.memoryBudget : defaultBudget(*backend);
  uint64_t groupBytes = layout->pagesPerGroup() * backend->pageSize();
  if (o.memoryBudget && budget < groupBytes)
    fail(ErrorCode::InvalidArgument, "options.memoryBudget: " + std::to_string(budget) +
                                         " bytes is less than one page group (" + std::to_string(layout->pagesPerGroup()) +
                                         " pages of " + std::to_string(backend->pageSize()) +
                                         " bytes): no sequence could ever grow");
  description_.pageSize = backend->pageSize();
  description_.granularity = backend->granularity();
  description_.backend = backend->name();
  core_ = std::make_unique<CacheCore>(std::move(backend), std::move(layout));
  mapper_ = std::make_unique<PageMapper>(*core_);
  prefetcher_ = std::make_unique<Prefetcher>(*core_, *mapper_, o.prefetchTokens, o.idleGroups);
  batchStamp_.assign(o.shape.maxSequences, 0);
  batchTarget_.assign(o.shape.maxSequences, 0);
  batchSlots_.reserve(o.shape.maxSequences);
  batchGroups_.reserve(o.shape.maxSequences);
  core_->device.open(core_->layout->rangeBytes(), budget, o.prefillBytes);
  description_.base = core_->device.base();
  // Blocks of a 16th of the budget, 4 KiB to 16 MiB: few page-lockings for a
  // long sequence, little waste for a short one, and a small budget still
  // holds several swaps (one block is never the whole budget).
  uint64_t block = std::min<uint64_t>(uint64_t{16} << 20, std::max<uint64_t>(4096, o.hostMemoryBudget / 16 / 4096 * 4096));
  hostPool_ = std::make_unique<HostBlockPool>(core_->backend(), o.hostMemoryBudget, block);
  try {
    hostPool_->prefill(o.hostMemoryPrefill);
  } catch (...) {
    hostPool_->teardown();
    core_->device.teardown();
    throw;
  }
  try {
    prefetcher_->start();
  } catch (...) {
    hostPool_->teardown();
    core_->device.teardown();
    throw;
  }
}

KVCache::~KVCache() { close(); }

void KVCache::checkOpen() const {
  if (core_->closed || core_->closing.load()) fail(ErrorCode::Closed, "the KV cache is closed");
}

Slot& KVCache::activeSlot(SequenceRef seq) {
  checkOpen();
  return core_->slots.active(seq);
}

// The slot keeps the fences of its previous sequence: its pages (now the new
// sequence's) are not unmapped before that GPU work is done.
SequenceRef KVCache::reserve(std::optional<uint64_t> expectedTokens) {
  Lock lk(core_->lock);
  checkOpen();
  const KVLayout& layout = *core_->layout;
  std::optional<size_t> groups;
  if (expectedTokens) groups = layout.groupsForTokens(std::min<uint64_t>(*expectedTokens, layout.shape().maxTokens));
  sweepDropPending(false);
  settleCopyFences(false);
  uint32_t index;
  try {
    index = placeSequence(core_->slots, groups);
  } catch (const Error& e) {
    // Slots still waiting to drop shared pages (a fence, the worker) or for a
    // share's queued copy: wait for them here.
    if (e.code() != ErrorCode::NoSlot) throw;
    settleCopyFences(true);
    sweepDropPending(true, true);
    index = placeSequence(core_->slots, groups);
  }
  return occupy(index);
}

// Free slots held by a share's copy still queued on a stream (FenceUse::Copy):
// their fences that have passed are dropped, or with `wait` waited for.
// True when a slot became placeable.
bool KVCache::settleCopyFences(bool wait) {
  bool freed = false;
  for (uint32_t i = 0; i < core_->slots.size(); ++i) {
    Slot& s = core_->slots[i];
    if (s.active() || !s.fences.holdsCopy()) continue;
    if (wait) s.fences.waitAll(core_->backend());
    else s.fences.pending(core_->backend());
    freed = freed || !s.fences.holdsCopy();
  }
  return freed;
}

SequenceRef KVCache::occupy(uint32_t index) {
  Slot& s = core_->slots[index];
  s.fences.pending(core_->backend());  // drops the fences that have passed
  s.state = SlotState::Active;
  s.generation++;
  s.tokens = 0;
  s.prefetchTarget = 0;
  reusedPages_ += s.pages.size();
  return {index, s.generation};
}

SequenceRef KVCache::reserveAt(uint32_t index) {
  Lock lk(core_->lock);
  checkOpen();
  if (index >= core_->slots.size())
    fail(ErrorCode::InvalidArgument, "slot " + std::to_string(index) + " does not exist");
  Slot& s = core_->slots[index];
  if (!s.active() && s.fences.holdsCopy()) s.fences.waitAll(core_->backend());  // a share's queued copy
  if (!s.placeable()) {
    sweepDropPending(true, true);  // a released sharer's mappings still to drop
    if (!s.placeable())
      fail(ErrorCode::NoSlot, "slot " + std::to_string(index) + " is not free on this device");
  }
  return occupy(index);
}

void KVCache::cancelReserve(SequenceRef seq) noexcept {
  Lock lk(core_->lock);
  if (core_->closed || seq.slot >= core_->slots.size()) return;
  Slot& s = core_->slots[seq.slot];
  // An extension of the slot (the worker) ends first: cancelled under it,
  // the slot would be left active on this device alone.
  core_->changed.wait(lk, [&] { return core_->closing.load() || !s.extendingNow(); });
  if (core_->closed || !s.active() || s.generation != seq.generation || s.tokens != 0) return;
  unoccupy(seq.slot);
}

// The undo of occupy(): the slot vacant again with the generation, released
// length and release time it had, as if no sequence had been placed.
void KVCache::unoccupy(uint32_t index) noexcept {
  Slot& s = core_->slots[index];
  s.state = SlotState::Vacant;
  s.generation--;
  s.tokens = 0;
  s.prefetchTarget = 0;
  reusedPages_ -= std::min<uint64_t>(reusedPages_, s.pages.size());
  prefetcher_->wake();
  core_->changed.notify_all();
}

std::vector<KVCache::GrowthMark> KVCache::markGrowth(const std::vector<GrowRequest>& batch) {
  Lock lk(core_->lock);
  std::vector<GrowthMark> marks;
  marks.reserve(batch.size());
  for (const GrowRequest& r : batch) {
    const Slot& s = activeSlot(r.seq);
    marks.push_back({r.seq, s.tokens, core_->groupsOf(s)});
  }
  return marks;
}

void KVCache::undoGrowth(const std::vector<GrowthMark>& marks, bool unmapGrown) noexcept {
  Lock lk(core_->lock);
  if (core_->closed) return;
  for (const GrowthMark& m : marks) {
    Slot& s = core_->slots[m.seq.slot];
    if (!s.active() || s.generation != m.seq.generation) continue;
    s.tokens = std::min(s.tokens, m.tokens);
    s.prefetchTarget = std::min(s.prefetchTarget, m.tokens);
    if (unmapGrown && !s.extendingNow() && core_->groupsOf(s) > m.groups) mapper_->shrinkSlot(m.seq.slot, m.groups);
  }
  core_->changed.notify_all();
}

bool KVCache::couldBack(const std::vector<GrowRequest>& batch) {
  Lock lk(core_->lock);
  checkOpen();
  for (const GrowRequest& r : batch) activeSlot(r.seq);
  uint64_t missing = collectTargets(batch);
  if (missing == 0) return true;
  if (core_->suspended) return false;
  return mapper_->obtainablePages(batchSlots_) >= missing;
}

void KVCache::recordFence(SequenceRef seq, uint64_t stream) {
  Lock lk(core_->lock);
  Slot& s = activeSlot(seq);
  if (!s.pages.empty()) s.fences.record(core_->backend(), stream);
}

// ---- growth: one transaction for grow and step on the caller's thread, and
// for growAsync with the driver calls off the lock -------------------------

uint64_t KVCache::grow(SequenceRef seq, uint64_t tokens) {
  Lock lk(core_->lock);
  uint64_t before = mapper_->reclaimedPages();
  growBatch(lk, {{seq, tokens}}, false);
  return mapper_->reclaimedPages() - before;
}

// The lock for step(): taken at once in the steady state; when another
// thread holds it (the worker's bookkeeping, a growAsync's), the wait is
// counted, so that a step() tail from contention shows in stats().
Lock KVCache::stepLock() {
  Lock lk(core_->lock, std::try_to_lock);
  if (lk.owns_lock()) return lk;
  uint64_t t0 = nowNanos();
  lk.lock();
  demand_.lockWaits++;
  demand_.lockWaitNanos += nowNanos() - t0;
  return lk;
}

// Adds one step() call and its time (to its return or throw) to the stats.
struct KVCache::StepTimer {
  KVCache& cache;
  uint64_t start = nowNanos();
  ~StepTimer() {
    cache.stepNanos_.fetch_add(nowNanos() - start, std::memory_order_relaxed);
    cache.stepCalls_.fetch_add(1, std::memory_order_relaxed);
  }
};

uint64_t KVCache::step(const std::vector<GrowRequest>& batch) {
  StepTimer timer{*this};
  Lock lk = stepLock();
  uint64_t before = mapper_->reclaimedPages();
  growBatch(lk, batch, true);
  bool notify = prefetcher_->afterStep(batch);
  uint64_t reclaimed = mapper_->reclaimedPages() - before;
  lk.unlock();
  if (notify) prefetcher_->notifyWorker();
  return reclaimed;
}

bool KVCache::stepIfBacked(const std::vector<GrowRequest>& batch, std::vector<GrowthMark>* before) {
  StepTimer timer{*this};
  Lock lk = stepLock();
  if (before) {
    before->clear();
    before->reserve(batch.size());
    for (const GrowRequest& r : batch) {
      const Slot& s = activeSlot(r.seq);
      before->push_back({r.seq, s.tokens, core_->groupsOf(s)});
    }
  }
  if (!growBatch(lk, batch, true, true)) return false;
  bool notify = prefetcher_->afterStep(batch);
  lk.unlock();
  if (notify) prefetcher_->notifyWorker();
  return true;
}

// Fills the scratch arrays with the batch's slots and their targets (a slot
// may appear twice: the larger wins; a sequence never shrinks) from the slots
// as they are now. Returns the pages missing.
uint64_t KVCache::collectTargets(const std::vector<GrowRequest>& batch) {
  if (++batchEpoch_ == 0) {
    std::fill(batchStamp_.begin(), batchStamp_.end(), 0);
    batchEpoch_ = 1;
  }
  batchSlots_.clear();
  for (const GrowRequest& r : batch) {
    uint32_t i = r.seq.slot;
    if (batchStamp_[i] != batchEpoch_) {
      batchStamp_[i] = batchEpoch_;
      batchTarget_[i] = std::max(core_->slots[i].tokens, r.tokens);
      batchSlots_.push_back(i);
    } else {
      batchTarget_[i] = std::max(batchTarget_[i], r.tokens);
    }
  }
  uint64_t missing = 0;
  for (uint32_t i : batchSlots_) {
    size_t need = core_->layout->groupsForTokens(batchTarget_[i]), have = core_->groupsOf(core_->slots[i]);
    if (need > have) missing += uint64_t(need - have) * core_->layout->pagesPerGroup();
  }
  return missing;
}

// Backs every request of the batch on the caller's thread, all or nothing:
// check everything, wait for extensions in flight on the slots that need more
// pages now, decide whether the pages can be had, take them, map them; on any
// failure every slot is as it was. After any wait everything is decided again
// from the slots as they are then. O(batch) when nothing is missing: this is
// the serving loop's per-step path.
bool KVCache::growBatch(Lock& lk, const std::vector<GrowRequest>& batch, bool fromStep, bool onlyIfBacked) {
  const KVLayout& layout = *core_->layout;
  uint64_t maxTokens = layout.shape().maxTokens;
  auto checkBatch = [&] {
    for (const GrowRequest& r : batch) activeSlot(r.seq);  // closed or released (meanwhile)?
    checkNotSuspended();
  };
  checkBatch();
  for (const GrowRequest& r : batch)
    if (r.tokens > maxTokens)
      fail(ErrorCode::OutOfRange, "cannot grow to " + std::to_string(r.tokens) + " tokens: maxTokens is " +
                                      std::to_string(maxTokens));
  auto needGroups = [&](uint32_t i) { return layout.groupsForTokens(batchTarget_[i]); };
  // Only a slot that needs more pages now and is being extended is worth
  // waiting for; the worker mapping ahead for others must not hold us up.
  auto mustWait = [&] {
    for (uint32_t i : batchSlots_)
      if (core_->slots[i].extendingNow() && needGroups(i) > core_->groupsOf(core_->slots[i])) return true;
    return false;
  };
  uint64_t started = 0;
  auto stalled = [&] {
    if (started) demand_.stallNanos += nowNanos() - started;
  };
  uint64_t missing = collectTargets(batch);
  if (onlyIfBacked && missing > 0) return false;
  // A miss is a slot that needed pages when the step came in; counted only
  // when the step succeeds.
  uint64_t misses = 0;
  if (fromStep && missing > 0)
    for (uint32_t i : batchSlots_)
      if (needGroups(i) > core_->groupsOf(core_->slots[i])) ++misses;
  uint64_t entries = batchSlots_.size();
  while (missing > 0) {
    if (!started) started = nowNanos();
    if (mustWait()) {
      // The worker (or an async growth) is mapping exactly what we need: wait
      // for it rather than map the same groups twice.
      core_->changed.wait(lk, [&] { return core_->closing.load() || !mustWait(); });
      checkBatch();
      missing = collectTargets(batch);
      continue;
    }
    uint64_t obtainable = mapper_->obtainablePages(batchSlots_);
    if (missing > obtainable) {
      // (released sharers' own pages count once their mappings are dropped)
      if (prefetcher_->waitForIdle(lk) || mapper_->waitForRetirements(lk) || sweepDropPending(false, true) ||
          waitForDroppable(missing, obtainable)) {
        checkBatch();
        missing = collectTargets(batch);
        continue;
      }
      // Decided before touching anything: a refused growth changes nothing.
      stalled();
      PagePool& pool = core_->pool();
      throw outOfMemory(missing, obtainable, pool.pageSize(), pool.counts());
    }
    batchGroups_.clear();
    for (uint32_t i : batchSlots_) batchGroups_.emplace_back(i, needGroups(i));
    try {
      mapper_->growOnLock(batchGroups_, missing, batchSlots_);
    } catch (...) {
      stalled();
      throw;
    }
    demand_.pagesOnDemand += missing;
    break;
  }
  stalled();
  for (uint32_t i : batchSlots_) core_->slots[i].tokens = batchTarget_[i];
  if (fromStep) {
    demand_.misses += misses;
    demand_.hits += entries - misses;
  }
  return true;
}

void KVCache::growDetached(SequenceRef seq, uint64_t tokens, const std::atomic<bool>* cancel) {
  Lock lk(core_->lock);
  activeSlot(seq);
  const KVLayout& layout = *core_->layout;
  if (tokens > layout.shape().maxTokens)
    fail(ErrorCode::OutOfRange, "cannot grow to " + std::to_string(tokens) + " tokens: maxTokens is " +
                                    std::to_string(layout.shape().maxTokens));
  // One asynchronous growth maps at a time: the driver serialises mapping
  // calls on a device, so several prompts mapping at once only make each
  // call wait longer - the prefetch worker's look-ahead, which the next
  // step needs, included. The turn is taken once the growth has work to do.
  bool myTurn = false;
  struct TurnGuard {
    KVCache& cache;
    Lock& lk;
    bool& mine;
    // Under the lock, whatever way the growth ends: a waiter checks the turn
    // under the lock, so giving it back without the lock could lose the wake-up.
    ~TurnGuard() {
      if (!mine) return;
      if (!lk.owns_lock()) lk.lock();
      cache.asyncGrowthMapping_ = false;
      cache.core_->changed.notify_all();
    }
  } turn{*this, lk, myTurn};
  for (;;) {
    // closing first: once closed, the slots are gone.
    core_->changed.wait(lk, [&] {
      return core_->closing.load() || (!core_->slots[seq.slot].extendingNow() && (myTurn || !asyncGrowthMapping_));
    });
    Slot& s = activeSlot(seq);
    checkNotSuspended();
    if (cancel && cancel->load()) fail(ErrorCode::Aborted, "the growth was aborted");
    size_t need = layout.groupsForTokens(tokens);
    if (need <= core_->groupsOf(s)) break;
    if (!myTurn) myTurn = asyncGrowthMapping_ = true;
    uint64_t missing = uint64_t(need - core_->groupsOf(s)) * layout.pagesPerGroup();
    uint64_t obtainable = mapper_->obtainablePages({seq.slot});
    PagePool& pool = core_->pool();
    if (missing > obtainable) {
      if (prefetcher_->waitForIdle(lk) || mapper_->waitForRetirements(lk) || sweepDropPending(false, true) ||
          waitForDroppable(missing, obtainable))
        continue;
      throw outOfMemory(missing, obtainable, pool.pageSize(), pool.counts());
    }
    mapper_->retryStranded();
    if (pool.idleCount() + pool.headroom() < missing) {
      // Make room one page group at a time, unmapping with the lock released
      // (a retirement): a long prompt's reclaim must not hold the serving
      // thread's step() up. Fenced candidates, when only those are left, are
      // waited for and unmapped on the lock. Everything is decided again after.
      Retirement r;
      if (mapper_->beginDemandRetirement(r, {seq.slot})) {
        mapper_->runRetirement(lk, r);
        continue;
      }
      if (mapper_->reclaim(layout.pagesPerGroup(), {seq.slot}) > 0) continue;
    }
    Extension ext;
    if (!mapper_->beginExtension(ext, seq.slot, need, true, Extending::OnDemand)) {
      // Reclaiming came up short (pages of slots being extended cannot be taken).
      throw outOfMemory(missing, pool.idleCount() + pool.headroom(), pool.pageSize(), pool.counts());
    }
    mapper_->runExtension(lk, ext, cancel);
    break;
  }
  Slot& after = activeSlot(seq);  // released while mapping: ERR_SEQUENCE_RELEASED (pages stay with the slot)
  after.tokens = std::max(after.tokens, tokens);
  bool notify = prefetcher_->afterGrowth(seq.slot, after.tokens);
  if (myTurn) {
    asyncGrowthMapping_ = false;
    myTurn = false;
    core_->changed.notify_all();
  }
  lk.unlock();
  if (notify) prefetcher_->notifyWorker();
}

// ---- release, reclaim, trim --------------------------------------------------

void KVCache::release(SequenceRef seq, std::optional<uint64_t> fenceStream) {
  Lock lk(core_->lock);
  Slot& s = activeSlot(seq);
  // Record the fence first: if that fails the sequence stays active. Nothing
  // after it can fail.
  if (fenceStream && !s.pages.empty()) s.fences.record(core_->backend(), *fenceStream);
  vacate(seq.slot);
}

// The slot's sequence ends; its pages stay (deferred reclamation) unless
// they are shared or the cache is suspended. Never throws.
void KVCache::vacate(uint32_t slot) {
  Slot& s = core_->slots[slot];
  s.state = SlotState::Vacant;
  s.generation++;
  s.prefetchTarget = 0;
  s.releasedAt = ++core_->slots.releaseClock;
  s.releasedTokens = s.tokens;
  s.tokens = 0;
  s.fences.pending(core_->backend());
  if (core_->suspended && !s.fences.pending(core_->backend())) {
    // Nothing to keep for the next sequence: resume() need not back them.
    try {
      dropMappings(slot);
    } catch (...) {
    }
  } else {
    dropIfShared(slot);
  }
  prefetcher_->wake();  // pages may have become reclaimable for a waiting plan
}

// ---- sharing: fork and prefix --------------------------------------------------

bool KVCache::holdsSharedPages(const Slot& s) {
  PagePool& pool = core_->pool();
  for (PageId id : s.pages)
    if (pool.mappingsOf(id) > 1) return true;
  return false;
}

// Unmaps every mapping of the slot, last page first: a shared page loses one
// mapping, the others go idle. Its fences must have passed. A backend failure
// stops it with the slot holding the pages not yet unmapped (still mapped).
void KVCache::dropMappings(uint32_t slot) {
  Slot& s = core_->slots[slot];
  PagePool& pool = core_->pool();
  const KVLayout& layout = *core_->layout;
  size_t per = layout.pagesPerGroup();
  while (!s.pages.empty()) {
    size_t k = s.pages.size() - 1;
    PageId id = s.pages[k];
    if (pool.unmapAt(id, core_->device.base() + layout.pageOffset(slot, k / per, k % per))) pool.putIdle(id);
    s.pages.pop_back();
  }
  s.dropPending = false;
}

// A released slot that maps pages another slot maps too must not be reused
// (its next sequence would write into them): its mappings go now, or, while
// GPU work may still read them, once its fences have passed.
void KVCache::dropIfShared(uint32_t slot) {
  Slot& s = core_->slots[slot];
  if (!holdsSharedPages(s)) return;
  s.dropPending = true;
  // Being shared from off the lock (Copying): dropped when that ends.
  if (s.extendingNow() || s.fences.pending(core_->backend())) return;
  // The worker unmaps them off this thread (and a share of the same prefix
  // may take the slot as it is before that).
  if (prefetcher_->running()) return;
  try {
    dropMappings(slot);
  } catch (...) {
    // left pending: retried at the next reserve()
  }
}

// Drops the mappings of released slots waiting to (dropPending) whose fences
// have passed, or with `wait` all of them after waiting. Without `force` a
// running worker is only woken: it drops them off this thread. Returns true
// when a slot changed here (dropped, or placeable again).
bool KVCache::sweepDropPending(bool wait, bool force) {
  bool any = false, dropped = false;
  for (uint32_t i = 0; i < core_->slots.size() && !any; ++i) any = core_->slots[i].dropPending;
  if (!any) return false;
  if (!force && prefetcher_->running()) {
    prefetcher_->wake();
    return false;
  }
  for (uint32_t i = 0; i < core_->slots.size(); ++i) {
    Slot& s = core_->slots[i];
    if (!s.dropPending || s.extendingNow()) continue;
    if (s.fences.pending(core_->backend())) {
      if (!wait) continue;
      s.fences.waitAll(core_->backend());
    }
    try {
      if (holdsSharedPages(s)) {
        dropMappings(i);
        dropped = true;
      } else {
        s.dropPending = false;  // its sharers went first: an ordinary released slot again
        dropped = true;         // (a slot placeable again all the same)
      }
    } catch (...) {
      if (wait) throw;
    }
  }
  return dropped;
}

Slot& KVCache::shareSource(SequenceRef from, uint64_t tokens, bool allowReleased) {
  SlotTable& slots = core_->slots;
  if (from.slot < slots.size() && allowReleased) {
    Slot& p = slots[from.slot];
    // released, and nothing placed there since: generation + 1 (release bumps it)
    if (!p.active() && p.generation == from.generation + 1 && !p.dropPending) {
      if (tokens > 0 && p.releasedTokens == 0)
        fail(ErrorCode::SequenceReleased, "the released sequence's tokens are gone (its slot was written since)");
      if (tokens > p.releasedTokens)
        fail(ErrorCode::OutOfRange, "cannot share " + std::to_string(tokens) + " tokens: the sequence had " +
                                        std::to_string(p.releasedTokens));
      if (p.extendingNow() || core_->layout->tokensInGroups(core_->groupsOf(p)) < tokens)
        fail(ErrorCode::SequenceReleased, "the released sequence's pages were reclaimed: its tokens are gone");
      return p;
    }
  }
  Slot& p = slots.active(from);
  if (tokens > p.tokens)
    fail(ErrorCode::OutOfRange, "cannot share " + std::to_string(tokens) + " tokens: the sequence has " +
                                    std::to_string(p.tokens));
  return p;
}

// The free slot with the fewest mapped pages (they are unmapped first), or -1.
int KVCache::freeSlotForShare(uint32_t source) {
  sweepDropPending(false);
  settleCopyFences(false);
  int best = -1;
  for (uint32_t i = 0; i < core_->slots.size(); ++i) {
    const Slot& s = core_->slots[i];
    if (i == source || !s.placeable() || s.extendingNow()) continue;
    if (best < 0 || s.pages.size() < core_->slots[best].pages.size()) best = static_cast<int>(i);
  }
  return best;
}

// The mapping runs with the lock released: both slots are marked Copying
// meanwhile (nothing unmaps, places, reclaims or closes them), and the shared
// mappings are noted in the pool before they are made, so the source's pages
// stay while they are mapped again, whatever happens to the source.
SequenceRef KVCache::share(SequenceRef from, uint64_t tokens, bool allowReleased, uint64_t stream,
                           std::optional<uint32_t> intoSlot, ShareUndo* undoInfo, bool copyLast) {
  Lock lk(core_->lock);
  const KVLayout& layout = *core_->layout;
  size_t per = layout.pagesPerGroup();
  uint64_t wholeBefore = copyLast && tokens > 0 ? tokens - 1 : tokens;
  size_t sharedPages = layout.groupsBefore(wholeBefore) * per, needPages = layout.groupsForTokens(tokens) * per;
  uint32_t src = 0, dst = 0;
  int reuse = -1;
  for (;;) {
    checkOpen();
    checkNotSuspended();
    // The source's pages must not be changing (the worker mapping its look-ahead).
    core_->changed.wait(lk, [&] {
      if (core_->closing.load()) return true;
      return !shareSource(from, tokens, allowReleased).extendingNow();
    });
    checkOpen();
    src = core_->slots.indexOf(shareSource(from, tokens, allowReleased));
    int free = -1;
    if (intoSlot) {
      // The slot another device chose: taken as it is when it maps the same
      // prefix, else cleared (a sharer's mappings dropped first).
      if (*intoSlot >= core_->slots.size() || *intoSlot == src)
        fail(ErrorCode::InvalidArgument, "slot " + std::to_string(*intoSlot) + " cannot take the share");
      Slot& s = core_->slots[*intoSlot];
      if (!s.active() && s.fences.holdsCopy()) s.fences.waitAll(core_->backend());  // a share's queued copy
      if (s.active() || s.extending == Extending::Copying)
        fail(ErrorCode::NoSlot, "slot " + std::to_string(*intoSlot) + " is not free on this device");
      if (s.extendingNow()) {
        core_->changed.wait(lk, [&] { return core_->closing.load() || !s.extendingNow(); });
        continue;
      }
      if (mapsPrefix(*intoSlot, src, sharedPages)) {
        reuse = static_cast<int>(*intoSlot);
        dst = *intoSlot;
        break;
      }
      if (s.dropPending) {
        // on this thread: the slot must be clear now (after the GPU work that may read it)
        if (s.fences.pending(core_->backend())) s.fences.waitAll(core_->backend());
        dropMappings(*intoSlot);
        continue;
      }
      free = static_cast<int>(*intoSlot);
    } else {
      // A free slot that already maps the same pages first (a released sharer
      // of the same prefix) needs no mapping for them: deferred reclamation for
      // shared prefixes. Otherwise the free slot with the fewest pages, cleared.
      reuse = slotMappingPrefix(src, sharedPages);
      if (reuse >= 0) {
        dst = static_cast<uint32_t>(reuse);
        break;
      }
      free = freeSlotForShare(src);
    }
    if (free >= 0) {
      Slot& s = core_->slots[free];
      if (s.pages.empty()) {
        dst = static_cast<uint32_t>(free);
        break;
      }
      // Its deferred pages go idle first, unmapped with the lock released (a
      // retirement): the serving loop's step() does not wait for them. Then
      // everything is decided again.
      if (s.fences.pending(core_->backend())) s.fences.waitAll(core_->backend());
      Retirement r;
      mapper_->detachAll(r, static_cast<uint32_t>(free));
      mapper_->runRetirement(lk, r);
      continue;
    }
    // Slots still dropping shared mappings (a fence, the worker): decide again after them.
    if (sweepDropPending(true, true) || prefetcher_->waitForIdle(lk) || mapper_->waitForRetirements(lk) ||
        settleCopyFences(true))
      continue;
    fail(ErrorCode::NoSlot, "every one of the " + std::to_string(core_->slots.size()) + " sequence slots is taken");
  }
  PagePool& pool = core_->pool();  // (only once open: a closed cache has none)
  Backend& backend = core_->backend();
  Slot& source = core_->slots[src];
  Slot& child = core_->slots[dst];
  size_t kept = reuse >= 0 ? child.pages.size() : 0;  // pages the child keeps where they are
  size_t toShare = reuse >= 0 ? 0 : sharedPages;       // pages to map from the source
  size_t firstFresh = std::max(kept, toShare);
  uint64_t freshCount = needPages > firstFresh ? needPages - firstFresh : 0;
  // Decided before touching anything: the child's own pages come back when
  // it is cleared, the rest from the pool or others (not the source).
  uint64_t obtainable = mapper_->obtainablePages({src, dst});
  if (freshCount > obtainable) throw outOfMemory(freshCount, obtainable, pool.pageSize(), pool.counts());
  mapper_->retryStranded();
  std::vector<PageId> createdNow;
  std::vector<PageId> fresh = mapper_->obtainPagesFor(freshCount, createdNow, {src, dst});
  Address base = core_->device.base();
  auto at = [&](uint32_t slot, size_t k) { return base + layout.pageOffset(slot, k / per, k % per); };
  size_t noted = 0, sharedMapped = 0, freshMapped = 0, copiesQueued = 0;
  bool fenced = stream != 0 && needPages > sharedPages;  // a copy queued on the caller's stream
  FenceHandle sourceFence = 0, childFence = 0;
  std::vector<PageId> shared(source.pages.begin(), source.pages.begin() + static_cast<std::ptrdiff_t>(toShare));
  // What is mapped off the lock is read here, under it: the pool's page
  // table may grow (another thread creating pages) while the lock is released.
  std::vector<PageHandle> sharedHandles;
  std::vector<Page*> freshRecords;
  // Every step taken is undone, last first (under the lock). A shared
  // mapping whose unmap fails stays recorded (in the pool and in the child's
  // page list, the child a released sharer dropped later), never forgotten.
  auto undo = [&] {
    for (size_t i = freshMapped; i-- > 0;) {
      try {
        pool.unmap(fresh[i]);
      } catch (...) {
        // still mapped: giveBack strands it (unmapped again before the next mapping)
      }
    }
    size_t stillMapped = 0;
    for (size_t k = sharedMapped; k-- > 0;) {
      try {
        backend.unmap(at(dst, k));
      } catch (...) {
        stillMapped = k + 1;  // pages [0, k] stay mapped and noted
        break;
      }
    }
    for (size_t k = noted; k-- > stillMapped;) pool.forgetMappingAt(shared[k], at(dst, k));
    mapper_->giveBack(fresh, createdNow);
    if (stillMapped > 0) {
      child.pages.assign(shared.begin(), shared.begin() + static_cast<std::ptrdiff_t>(stillMapped));
      child.dropPending = true;  // released sharer: its mappings go when they can
    }
    source.extending = child.extending = Extending::No;
    core_->changed.notify_all();
  };
  source.extending = child.extending = Extending::Copying;
  try {
    child.pages.reserve(needPages);
    if (fenced) {
      source.fences.reserveOne();
      child.fences.reserveOne();
    }
    sharedHandles.reserve(toShare);
    freshRecords.reserve(fresh.size());
    for (PageId id : shared) sharedHandles.push_back(pool.page(id).handle);
    for (PageId id : fresh) freshRecords.push_back(pool.record(id));
    for (; noted < toShare; ++noted) pool.noteMappingAt(shared[noted], at(dst, noted));
  } catch (...) {
    undo();
    throw;
  }
  lk.unlock();
  try {
    for (; sharedMapped < toShare; ++sharedMapped) {
      bool mapped = false;
      try {
        pool.mapNoted(sharedHandles[sharedMapped], at(dst, sharedMapped), mapped);
      } catch (...) {
        if (mapped) ++sharedMapped;  // the undo unmaps it again
        throw;
      }
    }
    for (; freshMapped < fresh.size(); ++freshMapped) pool.map(*freshRecords[freshMapped], at(dst, firstFresh + freshMapped));
    for (size_t k = sharedPages; k < needPages; ++k, ++copiesQueued)
      backend.copyDevice(at(dst, k), at(src, k), pool.pageSize(), stream);
    if (fenced) fenceShareCopy(stream, sourceFence, childFence);
  } catch (...) {
    // Copies already queued must run before their pages go anywhere.
    if (copiesQueued > 0 && stream != 0) {
      try {
        backend.syncStream(stream);
      } catch (...) {
      }
    }
    lk.lock();
    undo();
    throw;
  }
  lk.lock();
  if (undoInfo) *undoInfo = {child.generation};
  if (reuse < 0) child.pages.assign(shared.begin(), shared.end());
  else reusedPages_ += kept;
  child.pages.insert(child.pages.end(), fresh.begin(), fresh.end());
  // The queued copy reads the source's pages and writes the child's: both
  // slots keep them mapped, and neither takes a new sequence, until it ran.
  if (sourceFence) source.fences.add(sourceFence, FenceUse::Copy);
  if (childFence) child.fences.add(childFence, FenceUse::Copy);
  child.dropPending = false;  // (a released sharer's slot reused as it was: its own sequence now)
  child.state = SlotState::Active;
  child.generation++;
  child.tokens = tokens;
  child.prefetchTarget = 0;
  source.extending = child.extending = Extending::No;
  demand_.pagesOnDemand += fresh.size();
  core_->changed.notify_all();
  // A released source now shares pages: it must not be reused (see dropIfShared).
  if (!source.active()) dropIfShared(src);
  return {dst, child.generation};
}

// Off the lock, after a share queued its copy on `stream`: a fence for the
// source's slot and one for the child's. When one cannot be recorded the
// stream is waited for instead (the copy has run: no fence needed); when
// even that fails, the share fails (its undo runs after the copy is over or
// the device is lost).
void KVCache::fenceShareCopy(uint64_t stream, FenceHandle& sourceFence, FenceHandle& childFence) {
  Backend& backend = core_->backend();
  try {
    sourceFence = backend.recordFence(stream);
    childFence = backend.recordFence(stream);
    return;
  } catch (...) {
    if (sourceFence) backend.destroyFence(sourceFence);
    sourceFence = childFence = 0;
  }
  backend.syncStream(stream);
}

// Whether free slot `slot`'s first `sharedPages` pages are the source's,
// mapped at the same places, and its other pages its own (mapped nowhere else).
bool KVCache::mapsPrefix(uint32_t slot, uint32_t source, size_t sharedPages) {
  const Slot& s = core_->slots[slot];
  if (sharedPages == 0 || slot == source || s.active() || s.extendingNow() || s.fences.holdsCopy() ||
      s.pages.size() < sharedPages)
    return false;
  const std::vector<PageId>& want = core_->slots[source].pages;
  if (!std::equal(want.begin(), want.begin() + static_cast<std::ptrdiff_t>(sharedPages), s.pages.begin())) return false;
  PagePool& pool = core_->pool();
  for (size_t k = sharedPages; k < s.pages.size(); ++k)
    if (pool.mappingsOf(s.pages[k]) != 1) return false;
  return true;
}

// A free slot that maps the source's prefix (mapsPrefix), or -1.
int KVCache::slotMappingPrefix(uint32_t source, size_t sharedPages) {
  for (uint32_t i = 0; i < core_->slots.size(); ++i)
    if (mapsPrefix(i, source, sharedPages)) return static_cast<int>(i);
  return -1;
}

void KVCache::cancelShare(SequenceRef seq, const ShareUndo& undo) noexcept {
  Lock lk(core_->lock);
  if (core_->closed || seq.slot >= core_->slots.size()) return;
  Slot& s = core_->slots[seq.slot];
  core_->changed.wait(lk, [&] { return core_->closing.load() || !s.extendingNow(); });
  if (core_->closed || !s.active() || s.generation != seq.generation || s.extendingNow()) return;
  vacate(seq.slot);  // its shared mappings are dropped as a release drops them
  // The generation as before (the devices' generations stay equal), but not
  // the released sequence that lived here: the share wrote into its pages,
  // so its stale handle must not become a prefix source again.
  s.generation = undo.generation;
  s.releasedTokens = 0;
}

uint64_t KVCache::reclaim(uint64_t bytes) {
  Lock lk(core_->lock);
  checkOpen();
  if (core_->suspended) return 0;  // nothing is backed
  uint64_t ps = core_->pool().pageSize();
  uint64_t pages = bytes == UINT64_MAX ? UINT64_MAX : bytes / ps + (bytes % ps != 0);
  // reclaim() takes only from released slots (not prefetched tails): every
  // active slot is left out of the order.
  std::vector<uint32_t> active;
  for (uint32_t i = 0; i < core_->slots.size(); ++i)
    if (core_->slots[i].active()) active.push_back(i);
  return mapper_->reclaim(pages, active) * ps;
}

uint64_t KVCache::trim() {
  Lock lk(core_->lock);
  checkOpen();
  prefetcher_->pause();  // no pool top-up until the next step()
  mapper_->retryStranded();
  PagePool& pool = core_->pool();
  return pool.trim(UINT64_MAX) * pool.pageSize() + hostPool_->trim();
}

// ---- copies and statistics ----------------------------------------------------

void KVCache::checkRange(Slot& s, uint32_t layer, uint64_t token, uint64_t bytes) const {
  const KVLayout& layout = *core_->layout;
  if (layer >= layout.shape().layers)
    fail(ErrorCode::OutOfRange, "layer " + std::to_string(layer) + " does not exist (layers: " +
                                    std::to_string(layout.shape().layers) + ")");
  uint64_t tb = layout.tokenBytes();
  if (bytes % tb != 0)
    fail(ErrorCode::InvalidArgument, "byte length " + std::to_string(bytes) + " is not a whole number of tokens (" +
                                         std::to_string(tb) + " bytes each)");
  uint64_t count = bytes / tb;
  if (token > s.tokens || count > s.tokens - token)
    fail(ErrorCode::OutOfRange, "tokens [" + std::to_string(token) + ", " + std::to_string(token + count) +
                                    ") are past the sequence's " + std::to_string(s.tokens) + " backed tokens");
}

void KVCache::write(SequenceRef seq, uint32_t layer, KVKind kind, uint64_t token, const void* data, uint64_t bytes) {
  Lock lk(core_->lock);
  Slot& s = activeSlot(seq);
  checkNotSuspended();
  checkRange(s, layer, token, bytes);
  if (bytes == 0) return;
  const KVLayout& layout = *core_->layout;
  core_->backend().copyIn(core_->device.base() + layout.tokenOffset(seq.slot, layer, kind, token), layout.tokenPitch(),
                          data, layout.tokenBytes(), bytes / layout.tokenBytes());
}

void KVCache::read(SequenceRef seq, uint32_t layer, KVKind kind, uint64_t token, void* out, uint64_t bytes) {
  Lock lk(core_->lock);
  Slot& s = activeSlot(seq);
  checkNotSuspended();
  checkRange(s, layer, token, bytes);
  if (bytes == 0) return;
  const KVLayout& layout = *core_->layout;
  core_->backend().copyOut(out, core_->device.base() + layout.tokenOffset(seq.slot, layer, kind, token),
                           layout.tokenPitch(), layout.tokenBytes(), bytes / layout.tokenBytes());
}

uint64_t KVCache::tokens(SequenceRef seq) {
  Lock lk(core_->lock);
  return activeSlot(seq).tokens;
}

// Pages being retired off the lock and released sharers' pages behind a
// fence count: a growth that needs them waits for them.
uint64_t KVCache::obtainableBytes(bool withLookAhead) {
  Lock lk(core_->lock);
  checkOpen();
  if (core_->suspended) return 0;
  uint64_t pages = mapper_->obtainablePages({}, withLookAhead) + mapper_->retiringToIdle() + mapper_->droppablePages();
  return pages * core_->pool().pageSize();
}

// A growth short of pages: when the released sharers' pages (their fences
// pending) would make up the difference, waits for those fences and drops
// the mappings; true when it did (the caller decides again).
bool KVCache::waitForDroppable(uint64_t missing, uint64_t obtainable) {
  uint64_t droppable = mapper_->droppablePages();
  if (droppable == 0 || missing > obtainable + droppable) return false;
  return sweepDropPending(true, true);
}

CacheStats KVCache::stats() {
  Lock lk(core_->lock);
  checkOpen();
  const KVLayout& layout = *core_->layout;
  PagePool& pool = core_->pool();
  CacheStats st;
  st.backend = description_.backend;
  st.pageSize = pool.pageSize();
  st.budgetBytes = pool.budgetPages() * pool.pageSize();
  st.pages = pool.counts();
  st.bytesBacked = st.pages.mapped * st.pageSize;
  st.bytesPooled = st.pages.idle * st.pageSize;
  st.reservedVirtualBytes = layout.rangeBytes();
  st.slots.reserve(core_->slots.size());
  for (uint32_t i = 0; i < core_->slots.size(); ++i) {
    const Slot& s = core_->slots[i];
    st.slots.push_back({i, s.active(), s.tokens, layout.tokensInGroups(core_->groupsOf(s)), s.pages.size()});
    uint64_t mapped = s.pages.size() * st.pageSize;
    if (s.active()) {
      st.activeSequences++;
      uint64_t used = s.tokens * layout.bytesPerToken();
      uint64_t needed = layout.groupsForTokens(s.tokens) * layout.pagesPerGroup() * st.pageSize;
      st.bytesUsed += used;
      st.bytesBeyondTokens += mapped - used;
      st.bytesPageRounding += needed - used;
      st.bytesSpareGroups += mapped - needed;
    } else {
      st.bytesInReleasedSlots += mapped;
    }
  }
  st.bytesInReleasedSlots += mapper_->retiringPages() * st.pageSize;  // detached for unmapping, still mapped
  st.calls = core_->backend().counters();
  st.callsOnOwnerThread = core_->backend().callsOnOwnerThread();
  st.reclaimedPages = mapper_->reclaimedPages();
  st.reusedPages = reusedPages_;
  st.sharedPages = pool.sharedPages();
  st.bytesSavedBySharing = pool.extraMappings() * st.pageSize;
  st.prefetch = demand_;
  st.prefetch.steps = stepCalls_.load(std::memory_order_relaxed);
  st.prefetch.stepNanos = stepNanos_.load(std::memory_order_relaxed);
  st.prefetch.pagesAhead = mapper_->pagesMappedOffLock();
  st.prefetch.pagesReclaimedAhead = mapper_->reclaimedAheadPages();
  st.prefetch.errors = prefetcher_->errors();
  st.prefetch.workerError = prefetcher_->workerError();
  st.suspended = core_->suspended;
  st.bytesSuspended = st.pages.suspended * st.pageSize;
  st.host = hostStats_;
  st.host.budgetBytes = hostPool_->budgetBytes();
  st.host.bytesHeld = hostPool_->heldBytes();
  st.host.bytesIdle = hostPool_->idleBytes();
  st.host.swappedSequences = swapped_.size();
  for (const auto& entry : swapped_) st.host.bytesSwapped += entry.second.host.bytes;
  st.host.bytesSuspendCopy = suspendedCopy_.bytes;
  return st;
}

void KVCache::armFault(const Fault& fault) {
  Lock lk(core_->lock);
  checkOpen();
  core_->backend().armFault(fault);
}

bool KVCache::closed() {
  Lock lk(core_->lock);
  return core_->closed;
}

std::string KVCache::workerError() {
  Lock lk(core_->lock);
  return prefetcher_->workerError();
}

// ---- teardown ------------------------------------------------------------------

void KVCache::close() {
  Lock lk(core_->lock);
  if (core_->closed || core_->closing.load()) {
    core_->changed.wait(lk, [&] { return core_->closed; });
    return;
  }
  core_->closing.store(true);
  core_->changed.notify_all();
  lk.unlock();
  prefetcher_->stop();
  lk.lock();
  core_->changed.wait(lk, [&] { return !core_->slots.anyExtending(); });
  core_->closed = true;
  teardown();
  core_->changed.notify_all();
}

// Reverse order of setup: fences, then the device part (mappings, pages,
// range, backend). Best effort. Once the process is exiting the driver may be
// gone, so nothing is called and the memory goes back with the process.
void KVCache::teardown() {
  if (processExiting()) {
    core_->device.abandon();
    return;
  }
  core_->backend().disarmFault();
  freeHostMemory();
  for (uint32_t i = 0; i < core_->slots.size(); ++i) core_->slots[i].fences.drain(core_->backend());
  core_->slots.clear();
  core_->device.teardown();
}

}  // namespace vat
