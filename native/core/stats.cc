// Statistics, and the synchronous copies of write/read (test and tooling
// paths: the serving loop's kernels write the KV themselves).
#include <algorithm>

#include "common/errors.h"
#include "core/kv_cache.h"

namespace vat {

void KVCache::checkRange(const Slot& s, uint32_t layer, uint64_t token, uint64_t bytes) const {
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

// Under the lock: the checks a copy of whole tokens needs, and where its first
// token is on `device`.
Address KVCache::copyAddress(size_t device, SequenceRef seq, uint32_t layer, KVKind kind, uint64_t token,
                             uint64_t bytes) {
  checkDevice(device);
  Slot& s = activeSlot(seq);
  checkNotSuspended();
  checkRange(s, layer, token, bytes);
  return core_->shard(device).base() + core_->layout->tokenOffset(seq.slot, layer, kind, token);
}

void KVCache::write(size_t device, SequenceRef seq, uint32_t layer, KVKind kind, uint64_t token, const void* data,
                    uint64_t bytes) {
  Lock lk(core_->lock);
  Address at = copyAddress(device, seq, layer, kind, token, bytes);
  if (bytes == 0) return;
  const KVLayout& layout = *core_->layout;
  core_->shard(device).backend().copyIn(at, layout.tokenPitch(), data, layout.tokenBytes(), bytes / layout.tokenBytes());
}

void KVCache::read(size_t device, SequenceRef seq, uint32_t layer, KVKind kind, uint64_t token, void* out,
                   uint64_t bytes) {
  Lock lk(core_->lock);
  Address at = copyAddress(device, seq, layer, kind, token, bytes);
  if (bytes == 0) return;
  const KVLayout& layout = *core_->layout;
  core_->shard(device).backend().copyOut(out, at, layout.tokenPitch(), layout.tokenBytes(), bytes / layout.tokenBytes());
}

// Pages being retired off the lock and released sharers' pages behind a
// fence count: a growth that needs them waits for them. Over all devices:
// devices × what each can give (the same decision maps on all of them).
uint64_t KVCache::obtainableBytes(bool withLookAhead) {
  Lock lk(core_->lock);
  checkOpen();
  if (core_->suspended) return 0;
  uint64_t pages = mapper_->obtainablePages({}, withLookAhead) + mapper_->retiringToIdle() + mapper_->droppablePages();
  return pages * description_.pageSize * core_->deviceCount();
}

// Distinct pages of device d in the cached groups of released slots (a
// group a hit mapped into several slots counts once).
uint64_t KVCache::cachedPages(size_t device) {
  std::vector<PageId> pages;
  DeviceShard& sh = core_->shard(device);
  for (uint32_t i = 0; i < core_->slots.size(); ++i) {
    if (!core_->prefix->holds(i)) continue;
    const std::vector<PageId>& list = sh.slot(i).pages;
    size_t n = std::min(list.size(), core_->prefix->findable(i) * core_->pagesPerGroup());
    pages.insert(pages.end(), list.begin(), list.begin() + static_cast<std::ptrdiff_t>(n));
  }
  std::sort(pages.begin(), pages.end());
  return static_cast<uint64_t>(std::unique(pages.begin(), pages.end()) - pages.begin());
}

// The callers' side of growth and the worker's (decisions, the same on every
// device, but for the pages), and the prefix cache's.
void KVCache::prefetchFigures(size_t device, CacheStats& st) {
  DeviceShard& sh = core_->shard(device);
  static_cast<DemandStats&>(st.prefetch) = demand_;
  st.prefetch.pagesOnDemand = sh.counters.pagesOnDemand;
  st.prefetch.steps = stepCalls_.load(std::memory_order_relaxed);
  st.prefetch.stepNanos = stepNanos_.load(std::memory_order_relaxed);
  st.prefetch.pagesAhead = sh.counters.pagesMappedOffLock;
  st.prefetch.pagesReclaimedAhead = sh.counters.reclaimedAheadPages;
  st.prefetch.errors = prefetcher_->errors();
  st.prefetch.workerError = prefetcher_->workerError();
  st.prefetch.tokens = prefetcher_->lookAhead();
  st.prefixCache = core_->prefix->stats();
  const uint64_t cached = cachedPages(device);
  st.prefixCache.cachedGroups = cached / core_->pagesPerGroup();
  st.prefixCache.cachedBytes = cached * description_.pageSize;
}

CacheStats KVCache::stats(size_t device) {
  Lock lk(core_->lock);
  checkOpen();
  checkDevice(device);
  const KVLayout& layout = *core_->layout;
  DeviceShard& sh = core_->shard(device);
  PagePool& pool = sh.pool();
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
    uint64_t pages = sh.slot(i).pages.size();
    st.slots.push_back({i, s.active, s.tokens, layout.tokensInGroups(s.groups), pages});
    uint64_t mapped = pages * st.pageSize;
    if (s.active) {
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
  st.calls = sh.backend().counters();
  st.callsOnOwnerThread = sh.backend().callsOnOwnerThread();
  st.reclaimedPages = sh.counters.reclaimedPages;
  st.reusedPages = sh.counters.reusedPages;
  st.sharedPages = pool.sharedPages();
  st.bytesSavedBySharing = (pool.extraMappings() - shareNotesInFlight_) * st.pageSize;  // the listed ones
  prefetchFigures(device, st);
  st.suspended = core_->suspended;
  st.bytesSuspended = st.pages.suspended * st.pageSize;
  st.host = hostStats_;
  st.host.budgetBytes = sh.host().budgetBytes();
  st.host.bytesHeld = sh.host().heldBytes();
  st.host.bytesIdle = sh.host().idleBytes();
  st.host.swappedSequences = swapped_.size();
  for (const auto& entry : swapped_) st.host.bytesSwapped += entry.second->host[device].bytes;
  st.host.bytesSuspendCopy = suspendedCopy_[device].bytes;
  return st;
}

}  // namespace vat
