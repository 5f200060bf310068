#include "cache/kv_cache.h"

#include <algorithm>
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

}  // namespace

uint64_t defaultBudget(Backend& backend) {
  MemoryInfo m = backend.memoryInfo();
  if (std::strcmp(backend.name(), "cuda") == 0) {
    uint64_t margin = m.totalBytes / 20;
    return m.freeBytes > margin ? m.freeBytes - margin : 0;
  }
  return m.freeBytes / 2;
}

KVCache::KVCache(const CacheOptions& o) {
  watchProcessExit();
  backend_ = makeBackend(o);
  layout_ = std::make_unique<PerLayerLayout>(o.shape, backend_->pageSize());
  uint64_t budget = o.memoryBudget ? o.memoryBudget : defaultBudget(*backend_);
  pool_ = std::make_unique<PagePool>(*backend_, budget);
  slots_.resize(o.shape.maxSequences);
  base_ = backend_->reserveRange(layout_->rangeBytes());
  try {
    uint64_t ps = backend_->pageSize();
    pool_->prefill((o.prefillBytes + ps - 1) / ps);
  } catch (...) {
    pool_->teardown();
    backend_->freeRange(base_, layout_->rangeBytes());
    throw;
  }
}

KVCache::~KVCache() { close(); }

void KVCache::checkOpen() const {
  if (closed_) fail(ErrorCode::Closed, "the KV cache is closed");
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
  std::lock_guard<std::mutex> guard(lock_);
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
  reusedPages_ += s.pages.size();
  return {static_cast<uint32_t>(best), s.generation};
}

uint64_t KVCache::reclaimablePages() const {
  uint64_t n = 0;
  for (const Slot& s : slots_)
    if (!s.active) n += s.pages.size();
  return n;
}

void KVCache::grow(SequenceRef seq, uint64_t tokens) {
  std::lock_guard<std::mutex> guard(lock_);
  Slot& s = activeSlot(seq);
  if (tokens > layout_->shape().maxTokens)
    fail(ErrorCode::OutOfRange, "cannot grow to " + std::to_string(tokens) + " tokens: maxTokens is " +
                                    std::to_string(layout_->shape().maxTokens));
  if (tokens <= s.tokens) return;
  size_t need = layout_->groupsForTokens(tokens);
  size_t have = groupsOf(s);
  if (need > have) {
    uint64_t missing = uint64_t(need - have) * layout_->pagesPerGroup();
    // Decide before touching anything whether the growth can succeed within
    // the budget, so a refused growth changes nothing at all.
    uint64_t obtainable = pool_->idleCount() + pool_->headroom() + reclaimablePages();
    if (missing > obtainable) throw outOfMemory(missing, obtainable, pool_->pageSize(), pool_->counts());
    std::vector<PageId> createdNow;
    std::vector<PageId> pages = obtainPages(missing, createdNow);
    try {
      mapGroups(seq.slot, s, need, pages);
    } catch (...) {
      // Pages made by this call go back to the driver; the others to the pool.
      for (PageId id : pages) {
        if (pool_->page(id).state != PageState::Created) continue;  // stuck mapped: freed at close
        bool fresh = std::find(createdNow.begin(), createdNow.end(), id) != createdNow.end();
        try {
          if (fresh) pool_->destroy(id);
          else pool_->putIdle(id);
        } catch (...) {
          pool_->putIdle(id);
        }
      }
      throw;
    }
  }
  s.tokens = tokens;
}

// Pages for a growth, cheapest first: idle in the pool, newly created within
// the budget, then unmapped from released slots. All or nothing: on failure
// every page taken goes back (created ones released) and the error is thrown.
std::vector<PageId> KVCache::obtainPages(uint64_t count, std::vector<PageId>& createdNow) {
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
      uint64_t short_ = count - pages.size();
      if (reclaimLocked(short_, true) == 0) {
        PoolCounts c = pool_->counts();
        throw outOfMemory(count, pages.size(), pool_->pageSize(), c);
      }
    }
  } catch (...) {
    for (PageId id : pages) {
      bool fresh = std::find(createdNow.begin(), createdNow.end(), id) != createdNow.end();
      try {
        if (fresh) pool_->destroy(id);
        else pool_->putIdle(id);
      } catch (...) {
        pool_->putIdle(id);
      }
    }
    createdNow.clear();
    throw;
  }
  return pages;
}

// Maps groups [groupsOf(s), toGroups) of the slot, consuming `pages`. On
// failure unmaps what it mapped, leaving the slot as it was; the caller puts
// the pages back.
void KVCache::mapGroups(uint32_t slotIndex, Slot& s, size_t toGroups, std::vector<PageId>& pages) {
  size_t perGroup = layout_->pagesPerGroup();
  size_t before = s.pages.size();
  size_t next = 0;
  try {
    for (size_t g = groupsOf(s); g < toGroups; ++g) {
      for (size_t i = 0; i < perGroup; ++i) {
        PageId id = pages[next];
        pool_->map(id, base_ + layout_->pageOffset(slotIndex, g, i));
        s.pages.push_back(id);
        ++next;
      }
    }
  } catch (...) {
    while (s.pages.size() > before) {
      PageId id = s.pages.back();
      try {
        pool_->unmap(id);
      } catch (...) {
        // Still mapped: teardown unmaps it at close.
      }
      s.pages.pop_back();
    }
    throw;
  }
}

void KVCache::release(SequenceRef seq, std::optional<uint64_t> fenceStream) {
  std::lock_guard<std::mutex> guard(lock_);
  Slot& s = activeSlot(seq);
  // Record the fence first: if that fails the sequence stays active.
  if (fenceStream && !s.pages.empty()) s.fences.push_back(backend_->recordFence(*fenceStream));
  s.active = false;
  s.generation++;
  s.tokens = 0;
  dropFinishedFences(s);
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

// Unmaps tail groups of released slots, highest slot first, until at least
// `pages` pages went back to the pool. Slots whose GPU work has finished go
// first; with waitForFences, the others are waited for.
uint64_t KVCache::reclaimLocked(uint64_t pages, bool waitForFences) {
  uint64_t done = 0;
  for (int pass = 0; pass < 2 && done < pages; ++pass) {
    for (size_t i = slots_.size(); i-- > 0 && done < pages;) {
      Slot& s = slots_[i];
      if (s.active || s.pages.empty()) continue;
      dropFinishedFences(s);
      if (!s.fences.empty()) {
        if (pass == 0 || !waitForFences) continue;
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
  std::lock_guard<std::mutex> guard(lock_);
  checkOpen();
  uint64_t ps = pool_->pageSize();
  uint64_t pages = bytes == UINT64_MAX ? UINT64_MAX : (bytes + ps - 1) / ps;
  return reclaimLocked(pages, true) * ps;
}

uint64_t KVCache::trim() {
  std::lock_guard<std::mutex> guard(lock_);
  checkOpen();
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
  std::lock_guard<std::mutex> guard(lock_);
  Slot& s = activeSlot(seq);
  checkRange(s, layer, token, bytes);
  if (bytes == 0) return;
  backend_->copyIn(base_ + layout_->tokenOffset(seq.slot, layer, kind, token), data, bytes);
}

void KVCache::read(SequenceRef seq, uint32_t layer, KVKind kind, uint64_t token, void* out, uint64_t bytes) {
  std::lock_guard<std::mutex> guard(lock_);
  Slot& s = activeSlot(seq);
  checkRange(s, layer, token, bytes);
  if (bytes == 0) return;
  backend_->copyOut(out, base_ + layout_->tokenOffset(seq.slot, layer, kind, token), bytes);
}

uint64_t KVCache::tokens(SequenceRef seq) {
  std::lock_guard<std::mutex> guard(lock_);
  return activeSlot(seq).tokens;
}

CacheStats KVCache::stats() {
  std::lock_guard<std::mutex> guard(lock_);
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
    size_t groups = groupsOf(s);
    st.slots.push_back({i, s.active, s.tokens, layout_->tokensInGroups(groups), s.pages.size()});
    if (s.active) {
      st.activeSequences++;
      st.bytesUsed += s.tokens * layout_->bytesPerToken();
    }
  }
  st.calls = backend_->counters();
  st.reclaimedPages = reclaimedPages_;
  st.reusedPages = reusedPages_;
  return st;
}

void KVCache::armFault(BackendOp op, uint64_t nth, bool outOfMemory) {
  std::lock_guard<std::mutex> guard(lock_);
  checkOpen();
  backend_->armFault(op, nth, outOfMemory);
}

bool KVCache::closed() {
  std::lock_guard<std::mutex> guard(lock_);
  return closed_;
}

void KVCache::close() {
  std::lock_guard<std::mutex> guard(lock_);
  if (closed_) return;
  closed_ = true;
  teardown();
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
