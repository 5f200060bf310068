// Growth: grow and step on the caller's thread (one transaction, all or
// nothing across the batch and the devices), growAsync with the driver calls
// off the lock. A growth decides everything from the slot table before it
// touches a page: a refused one changes nothing on any device.
#include <algorithm>
#include <chrono>

#include "common/errors.h"
#include "core/kv_cache.h"

namespace vat {

namespace {

uint64_t nowNanos() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

}  // namespace

uint64_t KVCache::grow(SequenceRef seq, uint64_t tokens) {
  Lock lk(core_->lock);
  uint64_t before = core_->shard(0).counters.reclaimedPages;
  growBatch(lk, {{seq, tokens}}, false);
  return core_->shard(0).counters.reclaimedPages - before;
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
  uint64_t before = core_->shard(0).counters.reclaimedPages;
  growBatch(lk, batch, true);
  bool notify = prefetcher_->afterStep(batch);
  uint64_t reclaimed = core_->shard(0).counters.reclaimedPages - before;
  lk.unlock();
  if (notify) prefetcher_->notifyWorker();
  return reclaimed;
}

bool KVCache::stepIfBacked(const std::vector<GrowRequest>& batch) {
  StepTimer timer{*this};
  Lock lk = stepLock();
  if (!growBatch(lk, batch, true, true)) return false;
  bool notify = prefetcher_->afterStep(batch);
  lk.unlock();
  if (notify) prefetcher_->notifyWorker();
  return true;
}

// Closed, released (meanwhile), suspended, or past maxTokens: refused.
void KVCache::checkTargets(const std::vector<GrowRequest>& batch) {
  uint64_t maxTokens = core_->layout->shape().maxTokens;
  for (const GrowRequest& r : batch) activeSlot(r.seq);
  checkNotSuspended();
  for (const GrowRequest& r : batch)
    if (r.tokens > maxTokens)
      fail(ErrorCode::OutOfRange, "cannot grow to " + std::to_string(r.tokens) + " tokens: maxTokens is " +
                                      std::to_string(maxTokens));
}

// Fills the scratch arrays with the batch's slots and their targets (a slot
// may appear twice: the larger wins; a sequence never shrinks) from the slots
// as they are now. Returns the pages missing (per device).
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
    size_t need = core_->layout->groupsForTokens(batchTarget_[i]), have = core_->slots[i].groups;
    if (need > have) missing += uint64_t(need - have) * core_->pagesPerGroup();
  }
  return missing;
}

// Only a slot that needs more pages now and is being extended is worth
// waiting for; the worker mapping ahead for others must not hold us up.
bool KVCache::mustWaitForExtension() {
  for (uint32_t i : batchSlots_)
    if (core_->slots[i].extendingNow() && core_->layout->groupsForTokens(batchTarget_[i]) > core_->slots[i].groups)
      return true;
  return false;
}

void KVCache::mapBatch(uint64_t missing) {
  batchGroups_.clear();
  for (uint32_t i : batchSlots_) batchGroups_.emplace_back(i, core_->layout->groupsForTokens(batchTarget_[i]));
  mapper_->growOnLock(batchGroups_, missing, batchSlots_);
}

// Backs every request of the batch on the caller's thread, all or nothing:
// check everything, wait for extensions in flight on the slots that need more
// pages now, decide whether the pages can be had on every device, take them,
// map them; on any failure every slot is as it was on every device. After any
// wait everything is decided again. O(batch) when nothing is missing: this is
// the serving loop's per-step path.
bool KVCache::growBatch(Lock& lk, const std::vector<GrowRequest>& batch, bool fromStep, bool onlyIfBacked) {
  checkTargets(batch);
  uint64_t missing = collectTargets(batch);
  if (onlyIfBacked && missing > 0) return false;
  // A miss is a slot that needed pages when the step came in; counted only when the step succeeds.
  uint64_t misses = 0;
  for (uint32_t i : batchSlots_)
    misses += fromStep && missing > 0 && core_->layout->groupsForTokens(batchTarget_[i]) > core_->slots[i].groups;
  uint64_t entries = batchSlots_.size(), started = missing > 0 ? nowNanos() : 0;
  struct Stall {
    uint64_t& total;
    uint64_t started;
    ~Stall() {
      if (started) total += nowNanos() - started;
    }
  } stall{demand_.stallNanos, started};
  while (missing > 0) {
    if (mustWaitForExtension()) {
      // The worker (or an async growth) is mapping exactly what we need: wait
      // for it rather than map the same groups twice.
      core_->changed.wait(lk, [&] { return core_->closing.load() || !mustWaitForExtension(); });
    } else if (uint64_t obtainable = mapper_->obtainablePages(batchSlots_); missing > obtainable) {
      if (!waitBeforeRefusing(lk, Short::Pages, missing, obtainable)) throw outOfMemory(*core_, missing, obtainable);
    } else {
      mapBatch(missing);
      break;
    }
    checkTargets(batch);
    missing = collectTargets(batch);
  }
  for (uint32_t i : batchSlots_) core_->slots[i].tokens = batchTarget_[i];
  if (fromStep) {
    demand_.misses += misses;
    demand_.hits += entries - misses;
  }
  return true;
}

// growAsync's room: one page group at a time unmapped with the lock released
// (a retirement), so a long prompt's reclaim does not hold the serving
// thread's step() up; fenced candidates, when only those are left, waited for
// and unmapped on the lock. False when nothing could be freed.
bool KVCache::makeRoomOffLock(Lock& lk, uint32_t slot, uint64_t missing) {
  if (mapper_->freePages() >= missing) return false;
  Retirement r;
  if (mapper_->beginDemandRetirement(r, {slot})) {
    mapper_->runRetirement(lk, r);
    return true;
  }
  return mapper_->reclaim(core_->pagesPerGroup(), {slot}) > 0;
}

void KVCache::growDetached(SequenceRef seq, uint64_t tokens, const std::atomic<bool>* cancel) {
  Lock lk(core_->lock);
  checkTargets({{seq, tokens}});
  // One asynchronous growth maps at a time: the driver serialises mapping
  // calls, so several prompts mapping at once only make each call wait
  // longer - the prefetch worker's look-ahead, which the next step needs,
  // included. The turn is taken once the growth has work to do, and given
  // back under the lock whatever way it ends (a waiter checks it under the lock).
  struct Turn {
    KVCache& cache;
    bool mine = false;
    ~Turn() {
      if (!mine) return;
      cache.asyncGrowthMapping_ = false;
      cache.core_->changed.notify_all();
    }
  } turn{*this};
  size_t need = core_->layout->groupsForTokens(tokens);
  for (;;) {
    // closing first: once closed, the slots are gone.
    core_->changed.wait(lk, [&] {
      return core_->closing.load() || (!core_->slots[seq.slot].extendingNow() && (turn.mine || !asyncGrowthMapping_));
    });
    Slot& s = activeSlot(seq);
    checkNotSuspended();
    if (cancel && cancel->load()) fail(ErrorCode::Aborted, "the growth was aborted");
    if (need <= s.groups) break;
    if (!turn.mine) turn.mine = asyncGrowthMapping_ = true;
    uint64_t missing = uint64_t(need - s.groups) * core_->pagesPerGroup();
    uint64_t obtainable = mapper_->obtainablePages({seq.slot});
    if (missing > obtainable) {
      if (waitBeforeRefusing(lk, Short::Pages, missing, obtainable)) continue;
      throw outOfMemory(*core_, missing, obtainable);
    }
    mapper_->retryStranded();
    if (makeRoomOffLock(lk, seq.slot, missing)) continue;  // everything is decided again after
    Extension ext;
    // (reclaiming came up short: pages of slots being extended cannot be taken)
    if (!mapper_->beginExtension(ext, seq.slot, need, true, Extending::OnDemand))
      throw outOfMemory(*core_, missing, mapper_->freePages());
    mapper_->runExtension(lk, ext, cancel);
    break;
  }
  Slot& after = activeSlot(seq);  // released while mapping: ERR_SEQUENCE_RELEASED (pages stay with the slot)
  after.tokens = std::max(after.tokens, tokens);
  bool notify = prefetcher_->afterGrowth(seq.slot, after.tokens);
  if (turn.mine) {
    asyncGrowthMapping_ = false;
    turn.mine = false;
    core_->changed.notify_all();
  }
  lk.unlock();
  if (notify) prefetcher_->notifyWorker();
}

}  // namespace vat
