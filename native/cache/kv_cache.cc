#include "cache/kv_cache.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <system_error>

#include "backend/cuda_backend.h"
#include "backend/host_backend.h"
#include "common/errors.h"
#include "common/lifetime.h"

namespace vat {

namespace {

std::unique_ptr<Backend> makeBackend(const CacheOptions& o) {
  if (o.backend == BackendKind::Cuda) return std::make_unique<CudaBackend>(o.device, o.pageSize);
  return std::make_unique<HostBackend>(o.pageSize);
}

Error outOfMemory(uint64_t neededPages, uint64_t obtainablePages, uint64_t pageSize, const PoolCounts& c) {
  Error e(ErrorCode::OutOfMemory,
          "out of memory: growth needs " + std::to_string(neededPages) + " more page(s) of " +
              std::to_string(pageSize) + " bytes but only " + std::to_string(obtainablePages) +
              " can be had (budget " + std::to_string(c.budgetPages) + " pages, " + std::to_string(c.created) +
              " created, " + std::to_string(c.idle) + " idle in the pool, the rest mapped to active sequences)");
  e.requestedBytes = neededPages * pageSize;
  e.availableBytes = obtainablePages * pageSize;
  return e;
}

bool contains(const std::vector<uint32_t>& v, uint32_t x) { return std::find(v.begin(), v.end(), x) != v.end(); }
bool contains(const std::vector<PageId>* v, PageId x) {
  return v && std::find(v->begin(), v->end(), x) != v->end();
}

uint64_t nowNanos() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

}  // namespace

uint64_t defaultBudget(Backend& backend) {
  MemoryInfo m = backend.memoryInfo();
  if (std::strcmp(backend.name(), "cuda") == 0) {
    uint64_t margin = m.totalBytes / 20;
    return m.freeBytes > margin ? m.freeBytes - margin : 0;
  }
  return m.freeBytes / 2;
}

KVCache::KVCache(const CacheOptions& o) : prefetchTokens_(o.prefetchTokens) {
  watchProcessExit();
  // Each step below undoes itself when it throws; members built so far
  // (backend, layout, pool) are destroyed by the language; what the range
  // and the pages hold is given back by the catch below.
  backend_ = makeBackend(o);
  layout_ = std::make_unique<PerLayerLayout>(o.shape, backend_->pageSize());
  uint64_t budget = o.memoryBudget ? o.memoryBudget : defaultBudget(*backend_);
  pool_ = std::make_unique<PagePool>(*backend_, budget);
  poolLowWater_ = layout_->pagesPerGroup();
  slots_.resize(o.shape.maxSequences);
  batchStamp_.assign(o.shape.maxSequences, 0);
  batchTarget_.assign(o.shape.maxSequences, 0);
  batchSlots_.reserve(o.shape.maxSequences);
  base_ = backend_->reserveRange(layout_->rangeBytes());
  try {
    uint64_t ps = backend_->pageSize();
    pool_->prefill(o.prefillBytes / ps + (o.prefillBytes % ps != 0));
    if (prefetchTokens_ > 0) startWorker();
  } catch (...) {
    pool_->teardown();
    try {
      backend_->freeRange(base_, layout_->rangeBytes());
    } catch (...) {
    }
    throw;
  }
}

// Starts the prefetch worker and waits until it has bound its thread, so
// that a worker that cannot run is known (stats, an event) from the start.
void KVCache::startWorker() {
  backend_->injectFault(BackendOp::StartWorker, "std::thread", ErrorCode::Os);
  try {
    worker_ = std::thread([this] { workerLoop(); });
  } catch (const std::system_error& e) {
    fail(ErrorCode::Os, std::string("cannot start the prefetch thread: ") + e.what());
  }
  Lock lk(lock_);
  started_.wait(lk, [&] { return workerStarted_; });
}

KVCache::~KVCache() { close(); }

void KVCache::checkOpen() const {
  if (closed_ || closing_.load()) fail(ErrorCode::Closed, "the KV cache is closed");
}

KVCache::Slot& KVCache::activeSlot(SequenceRef seq) {
  checkOpen();
  if (seq.slot >= slots_.size()) fail(ErrorCode::InvalidArgument, "no slot " + std::to_string(seq.slot));
  Slot& s = slots_[seq.slot];
  if (!s.active || s.generation != seq.generation)
    fail(ErrorCode::SequenceReleased, "the sequence in slot " + std::to_string(seq.slot) + " was released");
  return s;
}

// Deferred reclamation: a released slot keeps its pages, so the slot whose
// mapped pages best fit the expected length needs the fewest driver calls.
// Best fit = the fewest groups that still cover it; failing that, the most.
// Without an expected length, the slot with the most mapped pages.
// The slot keeps the fences of its previous sequence: its pages (now the new
// sequence's) are not unmapped before that GPU work is done.
SequenceRef KVCache::reserve(std::optional<uint64_t> expectedTokens) {
  Lock lk(lock_);
  checkOpen();
  size_t need = expectedTokens
                    ? layout_->groupsForTokens(std::min<uint64_t>(*expectedTokens, layout_->shape().maxTokens))
                    : SIZE_MAX;
  int best = -1;
  for (size_t i = 0; i < slots_.size(); ++i) {
    const Slot& s = slots_[i];
    if (s.active) continue;
    if (best < 0) {
      best = static_cast<int>(i);
      continue;
    }
    size_t have = groupsOf(s), bestHave = groupsOf(slots_[best]);
    bool covers = have >= need, bestCovers = bestHave >= need;
    if (covers != bestCovers ? covers : (covers ? have < bestHave : have > bestHave)) best = static_cast<int>(i);
  }
  if (best < 0)
    fail(ErrorCode::NoSlot, "every one of the " + std::to_string(slots_.size()) + " sequence slots is taken");
  Slot& s = slots_[best];
  fencesPending(s);  // drops the fences that have passed
  s.active = true;
  s.generation++;
  s.tokens = 0;
  s.prefetchTarget = 0;
  reusedPages_ += s.pages.size();
  return {static_cast<uint32_t>(best), s.generation};
}

// ---- reclaim policy --------------------------------------------------------

// The pages demand may take from other slots, in the order it takes them:
// the prefetched tails (groups beyond the tokens) of active sequences, then
// released slots (highest slot first) - first those whose fences have all
// passed, then, in the same order, those that must be waited for. A slot
// being extended is left alone. Every path that reclaims walks this list,
// and "how much can be reclaimed" is its sum: the two cannot disagree.
std::vector<KVCache::ReclaimCandidate> KVCache::reclaimOrder(const std::vector<uint32_t>& exclude) {
  std::vector<ReclaimCandidate> order;
  for (bool fenced : {false, true}) {
    for (bool active : {true, false}) {
      for (size_t i = slots_.size(); i-- > 0;) {
        Slot& s = slots_[i];
        if (s.active != active || s.extending || contains(exclude, static_cast<uint32_t>(i))) continue;
        size_t keep = s.active ? neededGroups(s) : 0;
        if (groupsOf(s) <= keep) continue;
        if (fencesPending(s) != fenced) continue;
        order.push_back({static_cast<uint32_t>(i), keep, fenced});
      }
    }
  }
  return order;
}

uint64_t KVCache::obtainablePages(const std::vector<uint32_t>& exclude) {
  uint64_t n = pool_->idleCount() + pool_->headroom();
  for (const ReclaimCandidate& c : reclaimOrder(exclude))
    n += (groupsOf(slots_[c.slot]) - c.keepGroups) * layout_->pagesPerGroup();
  return n;
}

// Unmaps tail groups, in reclaim order, until at least `pages` pages went
// back to the pool. A fenced slot is waited for first.
uint64_t KVCache::reclaimLocked(uint64_t pages, const std::vector<uint32_t>& exclude) {
  uint64_t done = 0;
  for (const ReclaimCandidate& c : reclaimOrder(exclude)) {
    if (done >= pages) break;
    Slot& s = slots_[c.slot];
    if (c.fenced) waitFences(s);
    while (groupsOf(s) > c.keepGroups && done < pages) {
      unmapTailGroup(s);
      done += layout_->pagesPerGroup();
    }
  }
  return done;
}

// True while GPU work fenced on the slot may still use its pages. Fences
// that have passed are destroyed; one whose query fails counts as pending
// (waitFences reports the failure when it matters).
bool KVCache::fencesPending(Slot& s) {
  auto& f = s.fences;
  for (size_t i = 0; i < f.size();) {
    bool done = false;
    try {
      done = backend_->fenceDone(f[i]);
    } catch (...) {
    }
    if (done) {
      backend_->destroyFence(f[i]);
      f[i] = f.back();
      f.pop_back();
    } else {
      ++i;
    }
  }
  return !f.empty();
}

// Blocks until every fence of the slot has passed. Each fence is destroyed
// and dropped as soon as it has passed, so a failure part way leaves only
// the ones not yet waited for.
void KVCache::waitFences(Slot& s) {
  auto& f = s.fences;
  while (!f.empty()) {
    backend_->waitFence(f.back());
    backend_->destroyFence(f.back());
    f.pop_back();
  }
}

// Unmaps a slot's last page group. On failure the pages this call unmapped
// are mapped back (same physical pages: the bytes are as they were) and the
// error is thrown. When even that fails, the slot is shrunk to its whole
// groups before this one, so it never lists a page that is not mapped: pages
// still mapped are stranded (retried later), the others go to the pool.
void KVCache::unmapTailGroup(Slot& s) {
  size_t perGroup = layout_->pagesPerGroup();
  size_t first = s.pages.size() - perGroup;
  size_t i = s.pages.size();
  try {
    for (; i > first; --i) pool_->unmap(s.pages[i - 1]);
  } catch (...) {
    bool restored = true;
    for (size_t j = i; j < s.pages.size(); ++j) {
      PageId id = s.pages[j];
      try {
        pool_->map(id, base_ + layout_->pageOffset(static_cast<uint32_t>(&s - slots_.data()), first / perGroup,
                                                   j - first));
      } catch (...) {
        restored = false;
      }
    }
    if (!restored) {
      for (size_t j = first; j < s.pages.size(); ++j) {
        PageId id = s.pages[j];
        if (pool_->page(id).state == PageState::Created) pool_->putIdle(id);
        else pool_->strand(id);
      }
      s.pages.resize(first);
    }
    throw;
  }
  for (size_t j = first; j < s.pages.size(); ++j) pool_->putIdle(s.pages[j]);
  s.pages.resize(first);
  reclaimedPages_ += perGroup;
}

// ---- growth ----------------------------------------------------------------

uint64_t KVCache::grow(SequenceRef seq, uint64_t tokens) {
  Lock lk(lock_);
  uint64_t before = reclaimedPages_;
  growBatch(lk, {{seq, tokens}}, false);
  return reclaimedPages_ - before;
}

uint64_t KVCache::step(const std::vector<GrowRequest>& batch) {
  Lock lk(lock_);
  uint64_t before = reclaimedPages_;
  growBatch(lk, batch, true);
  uint64_t reclaimed = reclaimedPages_ - before;
  if (prefetchTokens_ == 0) return reclaimed;
  uint64_t maxTokens = layout_->shape().maxTokens;
  bool work = !prefetchActive_;
  for (const GrowRequest& r : batch) {
    Slot& s = slots_[r.seq.slot];
    s.prefetchTarget = std::max(s.prefetchTarget, std::min<uint64_t>(maxTokens, r.tokens + prefetchTokens_));
    if (layout_->tokensInGroups(groupsOf(s)) < s.prefetchTarget) work = true;
  }
  prefetchActive_ = true;
  // Wake the worker only when there is something to map: most decode steps
  // stay inside pages already backed, and then cost no wake-up at all.
  if (work) wakeWorker();
  return reclaimed;
}

// Fills the scratch arrays with the batch's slots and their targets (a slot
// may appear twice: the larger wins; a sequence never shrinks) from the
// slots as they are now. Returns the pages missing.
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
      batchTarget_[i] = std::max(slots_[i].tokens, r.tokens);
      batchSlots_.push_back(i);
    } else {
      batchTarget_[i] = std::max(batchTarget_[i], r.tokens);
    }
  }
  uint64_t missing = 0;
  for (uint32_t i : batchSlots_) {
    size_t need = layout_->groupsForTokens(batchTarget_[i]), have = groupsOf(slots_[i]);
    if (need > have) missing += uint64_t(need - have) * layout_->pagesPerGroup();
  }
  return missing;
}

// Demand wins over prefetch: when a growth would be refused while the worker
// holds pages off the lock (a look-ahead extension, a pool top-up), the
// caller waits for it to finish and decides again, and the worker starts
// nothing new meanwhile. Returns false (without waiting) when none is running.
bool KVCache::waitForPrefetchToFinish(Lock& lk) {
  if (aheadInFlight_ == 0) return false;
  ++demandWaiting_;
  changed_.wait(lk, [&] { return closing_.load() || aheadInFlight_ == 0; });
  --demandWaiting_;
  if (demandWaiting_ == 0) wakeWorker();
  return true;
}

// Backs every request of the batch on the caller's thread, all or nothing:
// check everything, wait for extensions in flight on the slots that need
// more pages now, decide whether the pages can be had, take them, map them;
// on any failure every slot is as it was. After any wait everything is
// decided again from the slots as they are then. O(batch) when nothing is
// missing: this is the serving loop's per-step path.
void KVCache::growBatch(Lock& lk, const std::vector<GrowRequest>& batch, bool fromStep) {
  uint64_t maxTokens = layout_->shape().maxTokens;
  auto checkBatch = [&] {
    for (const GrowRequest& r : batch) activeSlot(r.seq);  // closed or released (meanwhile)?
  };
  checkBatch();
  for (const GrowRequest& r : batch)
    if (r.tokens > maxTokens)
      fail(ErrorCode::OutOfRange, "cannot grow to " + std::to_string(r.tokens) + " tokens: maxTokens is " +
                                      std::to_string(maxTokens));
  auto needGroups = [&](uint32_t i) { return layout_->groupsForTokens(batchTarget_[i]); };
  // Only a slot that needs more pages now and is being extended is worth
  // waiting for; the worker mapping ahead for others must not hold us up.
  auto mustWait = [&] {
    for (uint32_t i : batchSlots_)
      if (slots_[i].extending && needGroups(i) > groupsOf(slots_[i])) return true;
    return false;
  };
  uint64_t started = 0;
  auto stalled = [&] {
    if (started) prefetch_.stallNanos += nowNanos() - started;
  };
  uint64_t missing = collectTargets(batch);
  // A miss is a slot that needed pages when the step came in.
  uint64_t misses = 0;
  if (fromStep && missing > 0)
    for (uint32_t i : batchSlots_)
      if (needGroups(i) > groupsOf(slots_[i])) ++misses;
  uint64_t entries = batchSlots_.size();
  while (missing > 0) {
    if (!started) started = nowNanos();
    if (mustWait()) {
      // The worker (or an async growth) is mapping exactly what we need: wait
      // for it rather than map the same groups twice.
      changed_.wait(lk, [&] { return closing_.load() || !mustWait(); });
      checkBatch();
      missing = collectTargets(batch);
      continue;
    }
    uint64_t obtainable = obtainablePages(batchSlots_);
    if (missing > obtainable) {
      if (waitForPrefetchToFinish(lk)) {
        checkBatch();
        missing = collectTargets(batch);
        continue;
      }
      // Decided before touching anything: a refused growth changes nothing.
      stalled();
      throw outOfMemory(missing, obtainable, pool_->pageSize(), pool_->counts());
    }
    if (pool_->hasStranded()) pool_->retryStranded();
    std::vector<PageId> createdNow;
    std::vector<PageId> pages;
    std::vector<std::pair<uint32_t, size_t>> grown;  // slot, pages before
    try {
      pages = obtainPages(missing, createdNow, batchSlots_);
      grown.reserve(batchSlots_.size());
      size_t next = 0;
      for (uint32_t i : batchSlots_) {
        Slot& s = slots_[i];
        size_t need = needGroups(i);
        if (need <= groupsOf(s)) continue;
        grown.emplace_back(i, s.pages.size());
        s.pages.reserve(need * layout_->pagesPerGroup());
        mapGroups(i, s, need, pages, next);
      }
    } catch (...) {
      for (auto it = grown.rbegin(); it != grown.rend(); ++it) unmapGroupsFrom(slots_[it->first], it->second);
      returnPages(pages, createdNow);
      stalled();
      throw;
    }
    prefetch_.pagesOnDemand += missing;
    break;
  }
  stalled();
  for (uint32_t i : batchSlots_) slots_[i].tokens = batchTarget_[i];
  if (fromStep) {
    prefetch_.misses += misses;
    prefetch_.hits += entries - misses;
  }
}

// Pages for a growth, cheapest first: idle in the pool, newly created within
// the budget, then unmapped from others (in reclaim order). All or nothing:
// on failure every page taken goes back and the error is thrown. Pages it
// reclaimed before failing stay in the pool, idle.
std::vector<PageId> KVCache::obtainPages(uint64_t count, std::vector<PageId>& createdNow,
                                         const std::vector<uint32_t>& exclude) {
  std::vector<PageId> pages;
  try {
    pages.reserve(count);
    createdNow.reserve(count);
    while (pages.size() < count) {
      PageId id = pool_->takeIdle();
      if (id != PagePool::kNone) {
        pages.push_back(id);
        continue;
      }
      if (pool_->headroom() > 0) {
        try {
          id = pool_->create();
          createdNow.push_back(id);
          pages.push_back(id);
          continue;
        } catch (const Error& e) {
          // The device is fuller than the budget assumed: fall back to reclaiming.
          if (e.code() != ErrorCode::OutOfMemory) throw;
        }
      }
      if (reclaimLocked(count - pages.size(), exclude) == 0)
        throw outOfMemory(count, pages.size(), pool_->pageSize(), pool_->counts());
    }
  } catch (...) {
    returnPages(pages, createdNow);
    createdNow.clear();
    throw;
  }
  return pages;
}

// Pages of a failed growth: those still mapped (their unmap failed) are
// stranded; of the others, those it created go back to the driver, the rest
// to the pool.
void KVCache::returnPages(const std::vector<PageId>& pages, const std::vector<PageId>& createdNow) {
  for (PageId id : pages) {
    PageState state = pool_->page(id).state;
    if (state == PageState::Mapped || state == PageState::Accessible) {
      pool_->strand(id);
      continue;
    }
    if (state != PageState::Created) continue;
    bool fresh = contains(&createdNow, id);
    try {
      if (fresh) pool_->destroy(id);
      else pool_->putIdle(id);
    } catch (...) {
      pool_->putIdle(id);
    }
  }
}

// Maps the slot's groups up to `toGroups` from pages[next...], advancing next.
// The slot's page list has room for them (no allocation between a map and
// its record).
void KVCache::mapGroups(uint32_t slotIndex, Slot& s, size_t toGroups, const std::vector<PageId>& pages,
                        size_t& next) {
  size_t perGroup = layout_->pagesPerGroup();
  for (size_t g = groupsOf(s); g < toGroups; ++g) {
    for (size_t i = 0; i < perGroup; ++i) {
      PageId id = pages[next];
      pool_->map(id, base_ + layout_->pageOffset(slotIndex, g, i));
      s.pages.push_back(id);
      ++next;
    }
  }
}

// Rolls a slot back to its first `keepPages` pages, unmapping the rest. A
// page whose unmap fails stays mapped; the caller's returnPages strands it.
void KVCache::unmapGroupsFrom(Slot& s, size_t keepPages) {
  while (s.pages.size() > keepPages) {
    try {
      pool_->unmap(s.pages.back());
    } catch (...) {
    }
    s.pages.pop_back();
  }
}

void KVCache::growDetached(SequenceRef seq, uint64_t tokens, const std::atomic<bool>* cancel) {
  Lock lk(lock_);
  activeSlot(seq);
  if (tokens > layout_->shape().maxTokens)
    fail(ErrorCode::OutOfRange, "cannot grow to " + std::to_string(tokens) + " tokens: maxTokens is " +
                                    std::to_string(layout_->shape().maxTokens));
  for (;;) {
    // closing_ first: once closed, slots_ is gone.
    changed_.wait(lk, [&] { return closing_.load() || !slots_[seq.slot].extending; });
    Slot& s = activeSlot(seq);
    abortIfStopping(cancel);
    size_t need = layout_->groupsForTokens(tokens);
    if (need <= groupsOf(s)) break;
    uint64_t missing = uint64_t(need - groupsOf(s)) * layout_->pagesPerGroup();
    uint64_t obtainable = obtainablePages({seq.slot});
    if (missing > obtainable) {
      if (waitForPrefetchToFinish(lk)) continue;
      throw outOfMemory(missing, obtainable, pool_->pageSize(), pool_->counts());
    }
    if (pool_->hasStranded()) pool_->retryStranded();
    Extension ext;
    if (!beginExtension(ext, seq.slot, need, true, false)) {
      // Reclaiming came up short (pages of slots being extended cannot be taken).
      uint64_t now = pool_->idleCount() + pool_->headroom();
      throw outOfMemory(missing, now, pool_->pageSize(), pool_->counts());
    }
    runExtension(lk, ext, cancel);
    break;
  }
  Slot& after = activeSlot(seq);  // released while mapping: ERR_SEQUENCE_RELEASED (pages stay with the slot)
  after.tokens = std::max(after.tokens, tokens);
}

// Takes the pages of an extension (idle, reserved creations, and with
// mayReclaim pages unmapped from others) and marks the slot as extending.
// Returns false, taking nothing, when they cannot all be had.
bool KVCache::beginExtension(Extension& ext, uint32_t slot, size_t toGroups, bool mayReclaim, bool ahead) {
  Slot& s = slots_[slot];
  ext.slot = slot;
  ext.ahead = ahead;
  ext.fromGroup = groupsOf(s);
  ext.toGroup = toGroups;
  size_t count = (toGroups - ext.fromGroup) * layout_->pagesPerGroup();
  if (mayReclaim) {
    uint64_t have = pool_->idleCount() + pool_->headroom();
    if (count > have) reclaimLocked(count - have, {slot});
  }
  if (pool_->idleCount() + pool_->headroom() < count) return false;
  // Room for everything the extension will record, so that nothing between
  // marking the slot and committing (or rolling back) allocates.
  ext.pages.reserve(count);
  ext.created.reserve(count);
  ext.handles.resize(count);
  ext.records.resize(count);
  s.pages.reserve(s.pages.size() + count);
  while (ext.pages.size() < count) {
    PageId id = pool_->takeIdle();
    if (id == PagePool::kNone) break;
    ext.pages.push_back(id);
  }
  try {
    while (ext.pages.size() + ext.creations < count && pool_->reserveCreation()) ++ext.creations;
  } catch (...) {
    for (size_t i = 0; i < ext.creations; ++i) pool_->cancelCreation();
    for (PageId id : ext.pages) pool_->putIdle(id);
    throw;
  }
  s.extending = true;
  s.extendingAhead = ahead;
  if (ahead) ++aheadInFlight_;
  return true;
}

// The slot is no longer being extended: waiters decide again.
void KVCache::endExtension(const Extension& ext) {
  Slot& s = slots_[ext.slot];
  s.extending = false;
  s.extendingAhead = false;
  if (ext.ahead) --aheadInFlight_;
  changed_.notify_all();
}

void KVCache::abortIfStopping(const std::atomic<bool>* cancel) const {
  // Checked before every driver call of an extension: once the process is
  // exiting the driver may be tearing down, so no further call is made.
  if (closing_.load() || processExiting())
    fail(ErrorCode::Closed, "the KV cache was closed while the growth was in progress");
  if (cancel && cancel->load()) fail(ErrorCode::Aborted, "the growth was aborted");
}

// Creates and maps an extension's pages with the lock released, then commits
// them to the slot, or rolls everything back and rethrows. Called and
// returns with the lock held. Nothing between the re-locks allocates (room
// was made in beginExtension), so the slot always stops extending.
void KVCache::runExtension(Lock& lk, Extension& ext, const std::atomic<bool>* cancel) {
  std::exception_ptr error;
  std::vector<PageHandle>& handles = ext.handles;
  std::vector<Page*>& records = ext.records;
  size_t made = 0;
  lk.unlock();
  try {
    for (; made < ext.creations; ++made) {
      abortIfStopping(cancel);
      handles[made] = backend_->createPage();
    }
  } catch (...) {
    error = std::current_exception();
  }
  lk.lock();
  for (size_t i = 0; i < ext.creations; ++i) {
    if (i < made) {
      PageId id = pool_->adopt(handles[i]);
      ext.created.push_back(id);
      ext.pages.push_back(id);
    } else {
      pool_->cancelCreation();
    }
  }
  for (size_t i = 0; i < ext.pages.size(); ++i) records[i] = pool_->record(ext.pages[i]);
  size_t mapped = 0;
  if (!error) {
    lk.unlock();
    size_t perGroup = layout_->pagesPerGroup();
    try {
      for (size_t g = ext.fromGroup; g < ext.toGroup; ++g) {
        for (size_t i = 0; i < perGroup; ++i) {
          abortIfStopping(cancel);
          pool_->map(*records[mapped], base_ + layout_->pageOffset(ext.slot, g, i));
          ++mapped;
        }
      }
    } catch (...) {
      error = std::current_exception();
      while (mapped > 0) {
        try {
          pool_->unmap(*records[mapped - 1]);  // a failure leaves it mapped: returnPages strands it
        } catch (...) {
        }
        --mapped;
      }
    }
    lk.lock();
  }
  Slot& s = slots_[ext.slot];
  if (!error) {
    s.pages.insert(s.pages.end(), ext.pages.begin(), ext.pages.end());
    prefetch_.pagesAhead += ext.pages.size();
  } else {
    returnPages(ext.pages, ext.created);
  }
  endExtension(ext);
  if (error) std::rethrow_exception(error);
}

void KVCache::release(SequenceRef seq, std::optional<uint64_t> fenceStream) {
  Lock lk(lock_);
  Slot& s = activeSlot(seq);
  // Record the fence first: if that fails the sequence stays active. Nothing
  // after it can fail.
  if (fenceStream && !s.pages.empty()) {
    s.fences.reserve(s.fences.size() + 1);
    s.fences.push_back(backend_->recordFence(*fenceStream));
  }
  s.active = false;
  s.generation++;
  s.tokens = 0;
  s.prefetchTarget = 0;
  fencesPending(s);
  wakeWorker();  // pages may have become reclaimable for a waiting plan
}

uint64_t KVCache::reclaim(uint64_t bytes) {
  Lock lk(lock_);
  checkOpen();
  uint64_t ps = pool_->pageSize();
  uint64_t pages = bytes == UINT64_MAX ? UINT64_MAX : bytes / ps + (bytes % ps != 0);
  // reclaim() takes only from released slots (not prefetched tails): every
  // active slot is left out of the order.
  std::vector<uint32_t> active;
  for (uint32_t i = 0; i < slots_.size(); ++i)
    if (slots_[i].active) active.push_back(i);
  return reclaimLocked(pages, active) * ps;
}

uint64_t KVCache::trim() {
  Lock lk(lock_);
  checkOpen();
  prefetchActive_ = false;  // the worker stops topping the pool up until the next step()
  if (pool_->hasStranded()) pool_->retryStranded();
  return pool_->trim(UINT64_MAX) * pool_->pageSize();
}

void KVCache::checkRange(Slot& s, uint32_t layer, uint64_t token, uint64_t bytes) const {
  const ModelShape& shape = layout_->shape();
  if (layer >= shape.layers)
    fail(ErrorCode::OutOfRange, "layer " + std::to_string(layer) + " does not exist (layers: " +
                                    std::to_string(shape.layers) + ")");
  uint64_t tb = layout_->tokenBytes();
  if (bytes % tb != 0)
    fail(ErrorCode::InvalidArgument, "byte length " + std::to_string(bytes) + " is not a whole number of tokens (" +
                                         std::to_string(tb) + " bytes each)");
  uint64_t count = bytes / tb;
  if (token > s.tokens || count > s.tokens - token)
    fail(ErrorCode::OutOfRange, "tokens [" + std::to_string(token) + ", " + std::to_string(token + count) +
                                    ") are past the sequence's " + std::to_string(s.tokens) + " backed tokens");
}

void KVCache::write(SequenceRef seq, uint32_t layer, KVKind kind, uint64_t token, const void* data, uint64_t bytes) {
  Lock lk(lock_);
  Slot& s = activeSlot(seq);
  checkRange(s, layer, token, bytes);
  if (bytes == 0) return;
  backend_->copyIn(base_ + layout_->tokenOffset(seq.slot, layer, kind, token), data, bytes);
}

void KVCache::read(SequenceRef seq, uint32_t layer, KVKind kind, uint64_t token, void* out, uint64_t bytes) {
  Lock lk(lock_);
  Slot& s = activeSlot(seq);
  checkRange(s, layer, token, bytes);
  if (bytes == 0) return;
  backend_->copyOut(out, base_ + layout_->tokenOffset(seq.slot, layer, kind, token), bytes);
}

uint64_t KVCache::tokens(SequenceRef seq) {
  Lock lk(lock_);
  return activeSlot(seq).tokens;
}

CacheStats KVCache::stats() {
  Lock lk(lock_);
  checkOpen();
  CacheStats st;
  st.backend = backend_->name();
  st.pageSize = pool_->pageSize();
  st.budgetBytes = pool_->budgetPages() * pool_->pageSize();
  st.pages = pool_->counts();
  st.bytesBacked = st.pages.mapped * st.pageSize;
  st.reservedVirtualBytes = layout_->rangeBytes();
  st.slots.reserve(slots_.size());
  for (uint32_t i = 0; i < slots_.size(); ++i) {
    const Slot& s = slots_[i];
    st.slots.push_back({i, s.active, s.tokens, layout_->tokensInGroups(groupsOf(s)), s.pages.size()});
    if (s.active) {
      st.activeSequences++;
      st.bytesUsed += s.tokens * layout_->bytesPerToken();
    }
  }
  st.calls = backend_->counters();
  st.callsOnOwnerThread = backend_->callsOnOwnerThread();
  st.reclaimedPages = reclaimedPages_;
  st.reusedPages = reusedPages_;
  st.prefetch = prefetch_;
  st.prefetch.workerError = workerError_;
  return st;
}

void KVCache::armFault(const Fault& fault) {
  Lock lk(lock_);
  checkOpen();
  backend_->armFault(fault);
}

bool KVCache::closed() {
  Lock lk(lock_);
  return closed_;
}

std::string KVCache::workerError() {
  Lock lk(lock_);
  return workerError_;
}

// ---- prefetch worker -------------------------------------------------------

void KVCache::wakeWorker() {
  ++workEpoch_;
  workCv_.notify_one();
}

// The most urgent active slot below its prefetch target (least backed room
// left ahead of its tokens), one page group at a time, with pages that are
// free: idle or within the budget. Prefetch never reclaims: demand does, and
// takes prefetched tails first. Nothing new starts while demand waits.
bool KVCache::planPrefetch(Extension& ext) {
  if (demandWaiting_ > 0) return false;
  int best = -1;
  uint64_t bestRoom = UINT64_MAX;
  for (uint32_t i = 0; i < slots_.size(); ++i) {
    const Slot& s = slots_[i];
    if (!s.active || s.extending || s.prefetchTarget == 0) continue;
    uint64_t backed = layout_->tokensInGroups(groupsOf(s));
    if (backed >= s.prefetchTarget || groupsOf(s) >= layout_->maxGroups()) continue;
    uint64_t room = backed > s.tokens ? backed - s.tokens : 0;
    if (room < bestRoom) {
      bestRoom = room;
      best = static_cast<int>(i);
    }
  }
  if (best < 0) return false;
  return beginExtension(ext, static_cast<uint32_t>(best), groupsOf(slots_[best]) + 1, false, true);
}

// Keeps a group's worth of idle pages ready while prefetch is in use, so that
// demand growth rarely pays for cuMemCreate.
bool KVCache::topUpPool(Lock& lk) {
  if (!prefetchActive_ || demandWaiting_ > 0 || pool_->idleCount() >= poolLowWater_ || !pool_->reserveCreation())
    return false;
  ++aheadInFlight_;
  lk.unlock();
  PageHandle handle = 0;
  bool ok = true;
  try {
    handle = backend_->createPage();
  } catch (...) {
    ok = false;
  }
  lk.lock();
  --aheadInFlight_;
  changed_.notify_all();
  if (!ok) {
    pool_->cancelCreation();
    prefetch_.errors++;
    return false;
  }
  pool_->putIdle(pool_->adopt(handle));
  return true;
}

void KVCache::workerLoop() {
  bool bound = true;
  try {
    backend_->injectFault(BackendOp::StartWorker, "binding the prefetch thread", backend_->ordinaryError());
    backend_->bindThread();
  } catch (const std::exception& e) {
    bound = false;
    Lock lk(lock_);
    workerError_ = std::string("the prefetch worker could not bind its thread, prefetch is off: ") + e.what();
  }
  Lock lk(lock_);
  workerStarted_ = true;
  started_.notify_all();
  if (!bound) return;  // demand still works; stats() and the 'prefetchError' event say why
  while (!closing_.load()) {
    if (processExiting()) return;
    uint64_t seen = workEpoch_;
    bool busy = false;
    try {
      Extension ext;
      if (planPrefetch(ext)) {
        busy = true;
        try {
          runExtension(lk, ext, nullptr);
        } catch (...) {
          prefetch_.errors++;
          slots_[ext.slot].prefetchTarget = 0;  // retried when the next step() asks again
        }
      } else {
        busy = topUpPool(lk);
      }
    } catch (...) {
      // Planning ran out of host memory (under the lock, nothing taken):
      // nothing escapes this thread; try again at the next wake-up.
      prefetch_.errors++;
      busy = false;
    }
    if (busy) continue;
    // Every wait has its predicate: a wake-up sent while the worker was off
    // the lock (close() among them) is not lost.
    workCv_.wait(lk, [&] { return closing_.load() || workEpoch_ != seen; });
  }
}

// ---- teardown --------------------------------------------------------------

void KVCache::close() {
  Lock lk(lock_);
  if (closed_ || closing_.load()) {
    changed_.wait(lk, [&] { return closed_; });
    return;
  }
  closing_.store(true);
  wakeWorker();
  workCv_.notify_all();
  changed_.notify_all();
  lk.unlock();
  if (worker_.joinable()) {
    if (processExiting()) worker_.detach();
    else worker_.join();
  }
  lk.lock();
  changed_.wait(lk, [&] {
    for (const Slot& s : slots_)
      if (s.extending) return false;
    return true;
  });
  closed_ = true;
  teardown();
  changed_.notify_all();
}

// Reverse order of setup: fences, mappings, pages, address range, backend
// (its context reference, its file descriptor). Best effort: a failing step
// does not stop the ones after it. Once the process is exiting the driver may
// be gone, so nothing is called and the memory goes back with the process.
void KVCache::teardown() {
  if (processExiting()) {
    backend_.release();  // deliberately leaked: its destructor would call the driver
    return;
  }
  backend_->disarmFault();
  for (Slot& s : slots_) {
    for (FenceHandle f : s.fences) {
      try {
        backend_->waitFence(f);
      } catch (...) {
      }
      backend_->destroyFence(f);
    }
    s.fences.clear();
    s.pages.clear();
    s.active = false;
  }
  pool_->teardown();
  try {
    backend_->freeRange(base_, layout_->rangeBytes());
  } catch (...) {
  }
  slots_.clear();
  pool_.reset();
  backend_.reset();
}

}  // namespace vat
