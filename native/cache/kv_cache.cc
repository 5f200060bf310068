#include "cache/kv_cache.h"

#include <algorithm>
#include <chrono>
#include <cstring>

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
  backend_ = makeBackend(o);
  layout_ = std::make_unique<PerLayerLayout>(o.shape, backend_->pageSize());
  uint64_t budget = o.memoryBudget ? o.memoryBudget : defaultBudget(*backend_);
  pool_ = std::make_unique<PagePool>(*backend_, budget);
  poolLowWater_ = layout_->pagesPerGroup();
  slots_.resize(o.shape.maxSequences);
  batchStamp_.assign(o.shape.maxSequences, 0);
  batchTarget_.assign(o.shape.maxSequences, 0);
  base_ = backend_->reserveRange(layout_->rangeBytes());
  try {
    uint64_t ps = backend_->pageSize();
    pool_->prefill((o.prefillBytes + ps - 1) / ps);
  } catch (...) {
    pool_->teardown();
    backend_->freeRange(base_, layout_->rangeBytes());
    throw;
  }
  if (prefetchTokens_ > 0) worker_ = std::thread([this] { workerLoop(); });
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
SequenceRef KVCache::reserve(std::optional<uint64_t> expectedTokens) {
  Lock lk(lock_);
  checkOpen();
  size_t need = expectedTokens ? layout_->groupsForTokens(*expectedTokens) : SIZE_MAX;
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
  dropFinishedFences(s);
  s.active = true;
  s.generation++;
  s.tokens = 0;
  s.prefetchTarget = 0;
  reusedPages_ += s.pages.size();
  return {static_cast<uint32_t>(best), s.generation};
}

// Pages demand may take from others: every page of a released slot, and the
// prefetched tail (groups beyond its tokens) of an active one.
uint64_t KVCache::reclaimablePages(const std::vector<uint32_t>& exclude) const {
  uint64_t n = 0;
  for (uint32_t i = 0; i < slots_.size(); ++i) {
    const Slot& s = slots_[i];
    if (s.extending || contains(exclude, i)) continue;
    size_t keep = s.active ? neededGroups(s) : 0;
    size_t have = groupsOf(s);
    if (have > keep) n += (have - keep) * layout_->pagesPerGroup();
  }
  return n;
}

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
  if (work) workCv_.notify_one();
  return reclaimed;
}

// Backs every request of the batch on the caller's thread, all or nothing:
// check everything, wait for extensions in flight on the slots that need
// more pages now, decide whether the pages can be had, take them, map them;
// on any failure every slot is as it was. O(batch) when nothing is missing:
// this is the serving loop's per-step path.
void KVCache::growBatch(Lock& lk, const std::vector<GrowRequest>& batch, bool fromStep) {
  uint64_t maxTokens = layout_->shape().maxTokens;
  // Per-slot target tokens (a slot may appear twice: the larger wins), kept in
  // scratch arrays stamped with this call's epoch instead of a map.
  if (++batchEpoch_ == 0) {
    std::fill(batchStamp_.begin(), batchStamp_.end(), 0);
    batchEpoch_ = 1;
  }
  std::vector<uint32_t>& unique = batchSlots_;
  unique.clear();
  for (const GrowRequest& r : batch) {
    activeSlot(r.seq);
    if (r.tokens > maxTokens)
      fail(ErrorCode::OutOfRange, "cannot grow to " + std::to_string(r.tokens) + " tokens: maxTokens is " +
                                      std::to_string(maxTokens));
    uint32_t i = r.seq.slot;
    if (batchStamp_[i] != batchEpoch_) {
      batchStamp_[i] = batchEpoch_;
      batchTarget_[i] = std::max(slots_[i].tokens, r.tokens);
      unique.push_back(i);
    } else {
      batchTarget_[i] = std::max(batchTarget_[i], r.tokens);
    }
  }
  auto needGroups = [&](uint32_t i) { return layout_->groupsForTokens(batchTarget_[i]); };
  // Only a slot that needs more pages now and is being extended is worth
  // waiting for; the worker mapping ahead for others must not hold us up.
  auto mustWait = [&] {
    for (uint32_t i : unique)
      if (slots_[i].extending && needGroups(i) > groupsOf(slots_[i])) return true;
    return false;
  };
  auto missingPages = [&] {
    uint64_t m = 0;
    for (uint32_t i : unique) {
      size_t need = needGroups(i), have = groupsOf(slots_[i]);
      if (need > have) m += uint64_t(need - have) * layout_->pagesPerGroup();
    }
    return m;
  };
  uint64_t started = 0;
  uint64_t missing = missingPages();
  if (fromStep) {
    // A miss is a slot that needed pages when the step came in.
    uint64_t misses = 0;
    if (missing > 0)
      for (uint32_t i : unique)
        if (needGroups(i) > groupsOf(slots_[i])) ++misses;
    prefetch_.misses += misses;
    prefetch_.hits += unique.size() - misses;
  }
  if (missing > 0 && mustWait()) {
    // The worker (or an async growth) is mapping exactly what we need: wait
    // for it rather than map the same groups twice.
    started = nowNanos();
    changed_.wait(lk, [&] { return !mustWait() || closing_.load(); });
    for (const GrowRequest& r : batch) activeSlot(r.seq);  // closed or released meanwhile?
    missing = missingPages();
  }
  if (missing > 0) {
    if (!started) started = nowNanos();
    uint64_t obtainable = pool_->idleCount() + pool_->headroom() + reclaimablePages(unique);
    // Decided before touching anything: a refused growth changes nothing.
    if (missing > obtainable) {
      prefetch_.stallNanos += nowNanos() - started;
      throw outOfMemory(missing, obtainable, pool_->pageSize(), pool_->counts());
    }
    std::vector<PageId> createdNow;
    std::vector<PageId> pages = obtainPages(missing, createdNow, unique);
    std::vector<std::pair<uint32_t, size_t>> grown;  // slot, pages before
    size_t next = 0;
    try {
      for (uint32_t i : unique) {
        Slot& s = slots_[i];
        size_t need = needGroups(i);
        if (need <= groupsOf(s)) continue;
        grown.emplace_back(i, s.pages.size());
        mapGroups(i, s, need, pages, next);
      }
    } catch (...) {
      for (auto it = grown.rbegin(); it != grown.rend(); ++it) unmapGroupsFrom(slots_[it->first], it->second);
      returnPages(pages, createdNow);
      prefetch_.stallNanos += nowNanos() - started;
      throw;
    }
    prefetch_.pagesOnDemand += missing;
  }
  if (started) prefetch_.stallNanos += nowNanos() - started;
  for (uint32_t i : unique) slots_[i].tokens = batchTarget_[i];
}

// Pages for a growth, cheapest first: idle in the pool, newly created within
// the budget, then unmapped from others (prefetched tails, released slots).
// All or nothing: on failure every page taken goes back and the error is thrown.
std::vector<PageId> KVCache::obtainPages(uint64_t count, std::vector<PageId>& createdNow,
                                         const std::vector<uint32_t>& exclude) {
  std::vector<PageId> pages;
  pages.reserve(count);
  try {
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
      if (reclaimLocked(count - pages.size(), true, exclude) == 0)
        throw outOfMemory(count, pages.size(), pool_->pageSize(), pool_->counts());
    }
  } catch (...) {
    returnPages(pages, createdNow);
    createdNow.clear();
    throw;
  }
  return pages;
}

// Unmapped pages of a failed growth: those it created go back to the driver,
// the others to the pool. A page still mapped (its unmap failed) stays out of
// the pool and is freed at close.
void KVCache::returnPages(const std::vector<PageId>& pages, const std::vector<PageId>& createdNow) {
  for (PageId id : pages) {
    if (pool_->page(id).state != PageState::Created) continue;
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

// Rolls a slot back to its first `keepPages` pages (unmapping the rest, which
// the caller returns to the pool).
void KVCache::unmapGroupsFrom(Slot& s, size_t keepPages) {
  while (s.pages.size() > keepPages) {
    try {
      pool_->unmap(s.pages.back());
    } catch (...) {
      // Still mapped: teardown unmaps it at close.
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
  changed_.wait(lk, [&] { return !slots_[seq.slot].extending || closing_.load(); });
  Slot& s = activeSlot(seq);
  abortIfStopping(cancel);
  size_t need = layout_->groupsForTokens(tokens);
  if (need > groupsOf(s)) {
    uint64_t missing = uint64_t(need - groupsOf(s)) * layout_->pagesPerGroup();
    uint64_t obtainable = pool_->idleCount() + pool_->headroom() + reclaimablePages({seq.slot});
    if (missing > obtainable) throw outOfMemory(missing, obtainable, pool_->pageSize(), pool_->counts());
    Extension ext;
    if (!beginExtension(ext, seq.slot, need, true)) {
      // Reclaiming came up short (pages of slots being extended cannot be taken).
      uint64_t now = pool_->idleCount() + pool_->headroom();
      throw outOfMemory(missing, now, pool_->pageSize(), pool_->counts());
    }
    runExtension(lk, ext, cancel);
  }
  Slot& after = activeSlot(seq);  // released while mapping: ERR_SEQUENCE_RELEASED (pages stay with the slot)
  after.tokens = std::max(after.tokens, tokens);
}

// Takes the pages of an extension (idle, reserved creations, and with
// mayReclaim pages unmapped from others) and marks the slot as extending.
// Returns false, changing nothing, when they cannot all be had.
bool KVCache::beginExtension(Extension& ext, uint32_t slot, size_t toGroups, bool mayReclaim) {
  Slot& s = slots_[slot];
  ext.slot = slot;
  ext.fromGroup = groupsOf(s);
  ext.toGroup = toGroups;
  size_t count = (toGroups - ext.fromGroup) * layout_->pagesPerGroup();
  if (mayReclaim) {
    uint64_t short_ = count > pool_->idleCount() + pool_->headroom()
                          ? count - pool_->idleCount() - pool_->headroom()
                          : 0;
    if (short_ > 0) reclaimLocked(short_, true, {slot});
  }
  if (pool_->idleCount() + pool_->headroom() < count) return false;
  while (ext.pages.size() < count) {
    PageId id = pool_->takeIdle();
    if (id == PagePool::kNone) break;
    ext.pages.push_back(id);
  }
  while (ext.pages.size() + ext.creations < count && pool_->reserveCreation()) ++ext.creations;
  s.extending = true;
  return true;
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
// returns with the lock held.
void KVCache::runExtension(Lock& lk, Extension& ext, const std::atomic<bool>* cancel) {
  std::exception_ptr error;
  std::vector<PageHandle> handles;
  lk.unlock();
  try {
    backend_->bindThread();
    for (size_t i = 0; i < ext.creations; ++i) {
      abortIfStopping(cancel);
      handles.push_back(backend_->createPage());
    }
  } catch (...) {
    error = std::current_exception();
  }
  lk.lock();
  for (size_t i = 0; i < ext.creations; ++i) {
    if (i < handles.size()) {
      PageId id = pool_->adopt(handles[i]);
      ext.created.push_back(id);
      ext.pages.push_back(id);
    } else {
      pool_->cancelCreation();
    }
  }
  std::vector<Page*> records;
  for (PageId id : ext.pages) records.push_back(pool_->record(id));
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
          pool_->unmap(*records[mapped - 1]);
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
  s.extending = false;
  changed_.notify_all();
  if (error) std::rethrow_exception(error);
}

void KVCache::release(SequenceRef seq, std::optional<uint64_t> fenceStream) {
  Lock lk(lock_);
  Slot& s = activeSlot(seq);
  // Record the fence first: if that fails the sequence stays active.
  if (fenceStream && !s.pages.empty()) s.fences.push_back(backend_->recordFence(*fenceStream));
  s.active = false;
  s.generation++;
  s.tokens = 0;
  s.prefetchTarget = 0;
  dropFinishedFences(s);
  workCv_.notify_one();  // pages may have become reclaimable for a waiting plan
}

void KVCache::dropFinishedFences(Slot& s) {
  auto& f = s.fences;
  for (size_t i = 0; i < f.size();) {
    if (backend_->fenceDone(f[i])) {
      backend_->destroyFence(f[i]);
      f[i] = f.back();
      f.pop_back();
    } else {
      ++i;
    }
  }
}

void KVCache::waitFences(Slot& s) {
  for (FenceHandle f : s.fences) {
    backend_->waitFence(f);
    backend_->destroyFence(f);
  }
  s.fences.clear();
}

void KVCache::unmapTailGroup(Slot& s) {
  size_t perGroup = layout_->pagesPerGroup();
  size_t first = s.pages.size() - perGroup;
  std::vector<Address> where;
  for (size_t j = first; j < s.pages.size(); ++j) where.push_back(pool_->page(s.pages[j]).address);
  size_t i = s.pages.size();
  try {
    for (; i > first; --i) pool_->unmap(s.pages[i - 1]);
  } catch (...) {
    // Keep the slot's groups whole: map back what this call unmapped (same
    // physical pages, so the bytes are as they were) and report the failure.
    for (size_t j = i; j < s.pages.size(); ++j) {
      try {
        pool_->map(s.pages[j], where[j - first]);
      } catch (...) {
      }
    }
    throw;
  }
  for (size_t j = first; j < s.pages.size(); ++j) pool_->putIdle(s.pages[j]);
  s.pages.resize(first);
  reclaimedPages_ += perGroup;
}

// Unmaps tail groups until at least `pages` pages went back to the pool:
// first the prefetched, unused tails of active sequences, then released
// slots, highest slot first. Released slots whose GPU work is done go
// before those that must be waited for (only with waitForFences).
uint64_t KVCache::reclaimLocked(uint64_t pages, bool waitForFences, const std::vector<uint32_t>& exclude) {
  uint64_t done = 0;
  for (int pass = 0; pass < 3 && done < pages; ++pass) {
    for (size_t i = slots_.size(); i-- > 0 && done < pages;) {
      Slot& s = slots_[i];
      if (s.extending || s.pages.empty() || contains(exclude, static_cast<uint32_t>(i))) continue;
      if (pass == 0) {
        if (!s.active) continue;
        while (groupsOf(s) > neededGroups(s) && done < pages) {
          unmapTailGroup(s);
          done += layout_->pagesPerGroup();
        }
        continue;
      }
      if (s.active) continue;
      dropFinishedFences(s);
      if (!s.fences.empty()) {
        if (pass == 1 || !waitForFences) continue;
        waitFences(s);
      }
      while (!s.pages.empty() && done < pages) {
        unmapTailGroup(s);
        done += layout_->pagesPerGroup();
      }
    }
  }
  return done;
}

uint64_t KVCache::reclaim(uint64_t bytes) {
  Lock lk(lock_);
  checkOpen();
  uint64_t ps = pool_->pageSize();
  uint64_t pages = bytes == UINT64_MAX ? UINT64_MAX : (bytes + ps - 1) / ps;
  // reclaim() takes only from released slots (not prefetched tails): skip pass 0
  // by excluding every active slot.
  std::vector<uint32_t> active;
  for (uint32_t i = 0; i < slots_.size(); ++i)
    if (slots_[i].active) active.push_back(i);
  return reclaimLocked(pages, true, active) * ps;
}

uint64_t KVCache::trim() {
  Lock lk(lock_);
  checkOpen();
  prefetchActive_ = false;  // the worker stops topping the pool up until the next step()
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
  return st;
}

void KVCache::armFault(BackendOp op, uint64_t nth, bool outOfMemory) {
  Lock lk(lock_);
  checkOpen();
  backend_->armFault(op, nth, outOfMemory);
}

bool KVCache::closed() {
  Lock lk(lock_);
  return closed_;
}

// ---- prefetch worker -------------------------------------------------------

// The most urgent active slot below its prefetch target (least backed room
// left ahead of its tokens), one page group at a time, with pages that are
// free: idle or within the budget. Prefetch never reclaims: demand does, and
// takes prefetched tails first.
bool KVCache::planPrefetch(Extension& ext) {
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
  return beginExtension(ext, static_cast<uint32_t>(best), groupsOf(slots_[best]) + 1, false);
}

// Keeps a group's worth of idle pages ready while prefetch is in use, so that
// demand growth rarely pays for cuMemCreate.
bool KVCache::topUpPool(Lock& lk) {
  if (!prefetchActive_ || pool_->idleCount() >= poolLowWater_ || !pool_->reserveCreation()) return false;
  lk.unlock();
  PageHandle handle = 0;
  bool ok = true;
  try {
    handle = backend_->createPage();
  } catch (...) {
    ok = false;
  }
  lk.lock();
  if (!ok) {
    pool_->cancelCreation();
    prefetch_.errors++;
    return false;
  }
  pool_->putIdle(pool_->adopt(handle));
  return true;
}

void KVCache::workerLoop() {
  try {
    backend_->bindThread();
  } catch (...) {
    return;  // no context on this thread: prefetch stays off, demand still works
  }
  Lock lk(lock_);
  while (!closing_.load()) {
    if (processExiting()) return;
    Extension ext;
    if (planPrefetch(ext)) {
      try {
        runExtension(lk, ext, nullptr);
      } catch (...) {
        prefetch_.errors++;
        slots_[ext.slot].prefetchTarget = 0;  // retried when the next step() asks again
      }
      continue;
    }
    if (topUpPool(lk)) continue;
    workCv_.wait(lk);
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

// Reverse order of setup: fences, mappings, pages, address range, backend.
// Best effort: a failing step does not stop the ones after it. Once the
// process is exiting the driver may be gone, so nothing is called and the
// memory goes back with the process.
void KVCache::teardown() {
  if (processExiting()) {
    backend_.release();  // deliberately leaked: its destructor would call the driver
    return;
  }
  backend_->disarmFault();
  try {
    backend_->bindThread();
  } catch (...) {
  }
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
}

}  // namespace vat
