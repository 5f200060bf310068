// Sharing: fork and prefix. A new sequence whose first tokens are another's:
// the whole page groups before the cut are mapped from the same physical
// pages on every device (no copy), the group the cut falls in is copied into
// new pages on each device's stream. Decided once (source, destination,
// pages), then each device does its part with the lock released; a device
// that cannot has every device's steps undone, last first.
#include <algorithm>

#include "common/errors.h"
#include "core/kv_cache.h"

namespace vat {

struct SharePlan {
  uint64_t tokens = 0;
  uint32_t src = 0, dst = 0;
  bool reuse = false;      // dst maps the source's prefix already (a released sharer of it)
  size_t sharedPages = 0;  // per device: the whole groups mapped from the source
  size_t needPages = 0;    // per device: what the new sequence's tokens need
  size_t kept = 0;         // pages the child keeps where they are (reuse)
  size_t toShare = 0;      // pages to map from the source
  size_t firstFresh = 0;   // the child's first page that is new
  uint64_t freshCount = 0;
};

namespace {

// One device's part of a share, and how far it got (for its undo).
struct ShareOnDevice {
  std::vector<PageId> shared;             // the source's pages mapped into the child
  std::vector<PageHandle> sharedHandles;  // read under the lock: the page table may grow off it
  TakenPages fresh;
  std::vector<Page*> freshRecords;
  size_t noted = 0, sharedMapped = 0, freshMapped = 0, copiesQueued = 0;
  FenceHandle sourceFence = 0, childFence = 0;
};

// Under the lock: room for every record the commit makes (nothing allocates
// after the mappings exist), and the shared mappings noted in the pool
// before they are made, so the source's pages stay while they are mapped
// again, whatever happens to the source meanwhile.
void prepareOn(DeviceShard& sh, const SharePlan& p, ShareOnDevice& x, bool fenced) {
  const std::vector<PageId>& source = sh.slot(p.src).pages;
  x.shared.assign(source.begin(), source.begin() + static_cast<std::ptrdiff_t>(p.toShare));
  sh.slot(p.dst).pages.reserve(std::max(p.kept, p.needPages));
  if (fenced) {
    sh.slot(p.src).fences.reserveOne();
    sh.slot(p.dst).fences.reserveOne();
  }
  x.sharedHandles.reserve(x.shared.size());
  x.freshRecords.reserve(x.fresh.pages.size());
  for (PageId id : x.shared) x.sharedHandles.push_back(sh.pool().page(id).handle);
  for (PageId id : x.fresh.pages) {
    sh.pool().hold(id);  // mapped off the lock: counted when the child lists it
    x.freshRecords.push_back(sh.pool().record(id));
  }
  for (; x.noted < x.shared.size(); ++x.noted) sh.pool().noteMappingAt(x.shared[x.noted], sh.pageAt(p.dst, x.noted));
}

// Off the lock: when a fence cannot be recorded the stream is waited for
// instead (the copy has run: no fence needed); when even that fails, the
// share fails (its undo runs after the copy is over or the device is lost).
void fenceCopy(Backend& backend, uint64_t stream, ShareOnDevice& x) {
  try {
    x.sourceFence = backend.recordFence(stream);
    x.childFence = backend.recordFence(stream);
    return;
  } catch (...) {
    if (x.sourceFence) backend.destroyFence(x.sourceFence);
    x.sourceFence = x.childFence = 0;
  }
  backend.syncStream(stream);
}

// Off the lock: the mappings and the copy of the partial group.
void mapOn(DeviceShard& sh, const SharePlan& p, ShareOnDevice& x, uint64_t stream) {
  for (; x.sharedMapped < x.shared.size(); ++x.sharedMapped) {
    bool mapped = false;
    try {
      sh.pool().mapNoted(x.sharedHandles[x.sharedMapped], sh.pageAt(p.dst, x.sharedMapped), mapped);
    } catch (...) {
      if (mapped) ++x.sharedMapped;  // the undo unmaps it again
      throw;
    }
  }
  for (; x.freshMapped < x.freshRecords.size(); ++x.freshMapped)
    sh.pool().map(*x.freshRecords[x.freshMapped], sh.pageAt(p.dst, p.firstFresh + x.freshMapped));
  for (size_t k = p.sharedPages; k < p.needPages; ++k, ++x.copiesQueued)
    sh.backend().copyDevice(sh.pageAt(p.dst, k), sh.pageAt(p.src, k), sh.pool().pageSize(), stream);
  if (stream != 0 && p.needPages > p.sharedPages) fenceCopy(sh.backend(), stream, x);
}

// Under the lock, every step taken undone, last first. A shared mapping whose
// unmap fails is let go by the page record and kept by the pool as a stray
// mapping (unmapped again before the next mapping and at close): the child
// lists nothing, as on every other device.
void undoOn(DeviceShard& sh, const SharePlan& p, ShareOnDevice& x) noexcept {
  for (size_t i = x.freshMapped; i-- > 0;) {
    try {
      sh.pool().unmap(x.fresh.pages[i]);
    } catch (...) {
      // still mapped: giveBack strands it
    }
  }
  for (size_t k = x.sharedMapped; k-- > 0;) {
    Address at = sh.pageAt(p.dst, k);
    try {
      sh.backend().unmap(at);
    } catch (...) {
      sh.pool().strayMapping(at);
    }
  }
  for (size_t k = x.noted; k-- > 0;) sh.pool().forgetMappingAt(x.shared[k], sh.pageAt(p.dst, k));
  sh.giveBack(x.fresh);
  if (x.sourceFence) sh.backend().destroyFence(x.sourceFence);
  if (x.childFence) sh.backend().destroyFence(x.childFence);
}

void commitOn(DeviceShard& sh, const SharePlan& p, ShareOnDevice& x) noexcept {
  std::vector<PageId>& child = sh.slot(p.dst).pages;
  if (!p.reuse) child.assign(x.shared.begin(), x.shared.end());
  child.insert(child.end(), x.fresh.pages.begin(), x.fresh.pages.end());
  for (PageId id : x.fresh.pages) sh.pool().place(id);
  // The queued copy reads the source's pages and writes the child's: both
  // slots keep them mapped, and neither takes a new sequence, until it ran.
  if (x.sourceFence) sh.slot(p.src).fences.add(x.sourceFence, FenceUse::Copy);
  if (x.childFence) sh.slot(p.dst).fences.add(x.childFence, FenceUse::Copy);
  sh.counters.reusedPages += p.kept;
  sh.counters.pagesOnDemand += x.fresh.pages.size();
}

// Copies already queued must run before their pages go anywhere (the undo
// that follows gives them back).
void finishQueuedCopies(CacheCore& core, const std::vector<ShareOnDevice>& on, const std::vector<uint64_t>& streams) {
  for (size_t d = 0; d < on.size() && d < streams.size(); ++d) {
    if (on[d].copiesQueued == 0 || streams[d] == 0) continue;
    try {
      core.shard(d).backend().syncStream(streams[d]);
    } catch (...) {
      // the device is lost: nothing it runs reads the pages again
    }
  }
}

// Under the lock, after every device mapped: cannot fail.
void commitAll(CacheCore& core, const SharePlan& p, std::vector<ShareOnDevice>& on) noexcept {
  bool copyFenced = false;
  for (size_t d = 0; d < on.size(); ++d) {
    commitOn(core.shard(d), p, on[d]);
    copyFenced = copyFenced || on[d].sourceFence != 0;
  }
  Slot& source = core.slots[p.src];
  Slot& child = core.slots[p.dst];
  source.copyFenced = source.copyFenced || copyFenced;
  child.copyFenced = child.copyFenced || copyFenced;
  child.groups = std::max(p.kept, p.needPages) / core.pagesPerGroup();
}

}  // namespace

// Decided before touching anything: the slots, what is shared, kept, made.
SharePlan KVCache::planShare(Lock& lk, SequenceRef from, uint64_t tokens, bool allowReleased, bool copyLast) {
  const KVLayout& layout = *core_->layout;
  size_t per = layout.pagesPerGroup();
  SharePlan p;
  p.tokens = tokens;
  p.sharedPages = layout.groupsBefore(copyLast && tokens > 0 ? tokens - 1 : tokens) * per;
  p.needPages = layout.groupsForTokens(tokens) * per;
  chooseShareSlots(lk, p, from, allowReleased);
  p.kept = p.reuse ? core_->pagesOf(core_->slots[p.dst]) : 0;
  p.toShare = p.reuse ? 0 : p.sharedPages;
  p.firstFresh = std::max(p.kept, p.toShare);
  p.freshCount = p.needPages > p.firstFresh ? p.needPages - p.firstFresh : 0;
  // The child's own pages came back when it was cleared, the rest come from
  // the pools or others (not the source).
  uint64_t obtainable = mapper_->obtainablePages({p.src, p.dst});
  if (p.freshCount > obtainable) throw outOfMemory(*core_, p.freshCount, obtainable);
  return p;
}

SequenceRef KVCache::share(SequenceRef from, uint64_t tokens, bool allowReleased, std::vector<uint64_t> streams,
                           bool copyLast) {
  Lock lk(core_->lock);
  size_t n = core_->deviceCount();
  streams.resize(n, 0);
  SharePlan p = planShare(lk, from, tokens, allowReleased, copyLast);
  mapper_->retryStranded();
  std::vector<TakenPages> fresh = mapper_->obtainPages(p.freshCount, {p.src, p.dst});
  std::vector<ShareOnDevice> on(n);
  for (size_t d = 0; d < n; ++d) on[d].fresh = std::move(fresh[d]);
  Slot& source = core_->slots[p.src];
  Slot& child = core_->slots[p.dst];
  auto undo = [&] {
    for (size_t d = n; d-- > 0;) undoOn(core_->shard(d), p, on[d]);
    source.extending = child.extending = Extending::No;
    core_->changed.notify_all();
  };
  source.extending = child.extending = Extending::Copying;  // nothing unmaps, places or reclaims them
  struct NotesInFlight {  // counted while the lock is released, under it
    uint64_t& count;
    uint64_t notes = 0;
    ~NotesInFlight() { count -= notes; }
  } inFlight{shareNotesInFlight_};
  try {
    for (size_t d = 0; d < n; ++d) prepareOn(core_->shard(d), p, on[d], streams[d] != 0 && p.needPages > p.sharedPages);
    inFlight.notes = p.toShare;
    shareNotesInFlight_ += inFlight.notes;
    lk.unlock();
    for (size_t d = 0; d < n; ++d) core_->onDevice(d, [&] { mapOn(core_->shard(d), p, on[d], streams[d]); });
  } catch (...) {
    if (!lk.owns_lock()) {
      finishQueuedCopies(*core_, on, streams);
      lk.lock();
    }
    undo();
    throw;
  }
  lk.lock();
  commitAll(*core_, p, on);
  shareNotesInFlight_ -= inFlight.notes;  // the child lists them now
  inFlight.notes = 0;
  SequenceRef ref = core_->slots.occupy(p.dst);
  child.tokens = tokens;
  source.extending = child.extending = Extending::No;
  core_->changed.notify_all();
  // A released source now shares pages: it must not be reused (see dropIfShared).
  if (!source.active) dropIfShared(p.src);
  return ref;
}

// ---- choosing the slots ------------------------------------------------------------

Slot& KVCache::shareSource(SequenceRef from, uint64_t tokens, bool allowReleased) {
  SlotTable& slots = core_->slots;
  if (from.slot < slots.size() && allowReleased) {
    Slot& p = slots[from.slot];
    // released, and nothing placed there since: generation + 1 (release bumps it)
    // (a released sharer only while it holds a cached prefix: its mappings
    // stay until a refusal needs them, see dropIfShared)
    if (!p.active && p.generation == from.generation + 1 && (!p.dropPending || core_->prefix->holds(from.slot))) {
      if (tokens > 0 && p.releasedTokens == 0)
        fail(ErrorCode::SequenceReleased, "the released sequence's tokens are gone (its slot was written since)");
      if (tokens > p.releasedTokens)
        fail(ErrorCode::OutOfRange, "cannot share " + std::to_string(tokens) + " tokens: the sequence had " +
                                        std::to_string(p.releasedTokens));
      if (p.extendingNow() || core_->layout->tokensInGroups(p.groups) < tokens)
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

// The source (whose pages must not be changing: the worker mapping its
// look-ahead) and the destination: a free slot that maps the same prefix
// already (a released sharer of it: no mapping needed), else the free slot
// with the fewest pages, its deferred pages unmapped first with the lock
// released (a retirement: the serving loop's step() does not wait for them).
// After any wait everything is decided again.
void KVCache::chooseShareSlots(Lock& lk, SharePlan& p, SequenceRef from, bool allowReleased) {
  for (;;) {
    checkOpen();
    checkNotSuspended();
    core_->changed.wait(lk, [&] {
      return core_->closing.load() || !shareSource(from, p.tokens, allowReleased).extendingNow();
    });
    checkOpen();
    p.src = from.slot;
    shareSource(from, p.tokens, allowReleased);
    int reuse = slotMappingPrefix(p.src, p.sharedPages);
    if (reuse >= 0) {
      p.dst = static_cast<uint32_t>(reuse);
      p.reuse = true;
      return;
    }
    int free = freeSlotForShare(p.src);
    if (free >= 0 && core_->slots[free].groups == 0) {
      p.dst = static_cast<uint32_t>(free);
      p.reuse = false;
      return;
    }
    if (free >= 0) {
      core_->waitFences(static_cast<uint32_t>(free));
      Retirement r;
      mapper_->detachAll(r, static_cast<uint32_t>(free));
      mapper_->runRetirement(lk, r);
      continue;
    }
    if (!waitBeforeRefusing(lk, Short::Slot))
      fail(ErrorCode::NoSlot, "every one of the " + std::to_string(core_->slots.size()) + " sequence slots is taken");
  }
}

// The placeable slot with the fewest mapped pages (they are unmapped first), or -1.
int KVCache::freeSlotForShare(uint32_t source) {
  sweepDropPending(false);
  settleCopyFences(false);
  int best = -1;
  for (uint32_t i = 0; i < core_->slots.size(); ++i) {
    const Slot& s = core_->slots[i];
    if (i == source || !s.placeable() || s.extendingNow()) continue;
    if (best < 0 || s.groups < core_->slots[best].groups) best = static_cast<int>(i);
  }
  return best;
}

// Whether free slot `slot`'s first `sharedPages` pages are the source's on
// every device, mapped at the same places, and its other pages its own
// (mapped nowhere else).
bool KVCache::mapsPrefix(uint32_t slot, uint32_t source, size_t sharedPages) {
  const Slot& s = core_->slots[slot];
  if (sharedPages == 0 || slot == source || s.active || s.extendingNow() || s.copyFenced ||
      core_->pagesOf(s) < sharedPages)
    return false;
  for (auto& sh : core_->shards) {
    const std::vector<PageId>& want = sh->slot(source).pages;
    const std::vector<PageId>& have = sh->slot(slot).pages;
    if (!std::equal(want.begin(), want.begin() + static_cast<std::ptrdiff_t>(sharedPages), have.begin())) return false;
    for (size_t k = sharedPages; k < have.size(); ++k)
      if (sh->pool().mappingsOf(have[k]) != 1) return false;
  }
  return true;
}

int KVCache::slotMappingPrefix(uint32_t source, size_t sharedPages) {
  for (uint32_t i = 0; i < core_->slots.size(); ++i)
    if (mapsPrefix(i, source, sharedPages)) return static_cast<int>(i);
  return -1;
}

// ---- released sharers -----------------------------------------------------------------

// A released slot that maps pages another slot maps too must not be reused
// (its next sequence would write into them): its mappings go now, or, while
// GPU work may still read them, once its fences have passed.
void KVCache::dropIfShared(uint32_t slot) {
  Slot& s = core_->slots[slot];
  if (!mapper_->holdsSharedPages(slot)) return;
  s.dropPending = true;
  // Being shared from off the lock (Copying): dropped when that ends.
  if (s.extendingNow() || core_->fencesPending(slot)) return;
  // A cached prefix (prefix_cache.h): kept for later hits until a refusal
  // needs the slot or its pages (waitBeforeRefusing sweeps it then).
  if (core_->prefix->holds(slot)) return;
  // The worker unmaps them off this thread (and a share of the same prefix
  // may take the slot as it is before that).
  if (prefetcher_->running()) return;
  mapper_->dropMappings(slot);
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
    if (!force && core_->prefix->holds(i)) continue;  // a cached prefix: only when a refusal needs it
    if (core_->fencesPending(i)) {
      if (!wait) continue;
      core_->waitFences(i);
    }
    if (mapper_->holdsSharedPages(i)) mapper_->dropMappings(i);
    else s.dropPending = false;  // its sharers went first: an ordinary released slot again
    dropped = true;
  }
  return dropped;
}

}  // namespace vat
