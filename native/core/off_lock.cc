// The page mapper's changes that run their driver calls with the cache's
// lock released: extensions (growAsync, the prefetch worker) and retirements
// (reclaim ahead, room for a growAsync, a released sharer's drop). See
// page_mapper.h.
#include <algorithm>
#include <unordered_map>

#include "common/errors.h"
#include "common/lifetime.h"
#include "core/page_mapper.h"

namespace vat {

bool PageMapper::beginExtension(Extension& ext, uint32_t slot, size_t toGroups, bool mayReclaim, Extending kind) {
  retryStranded();  // a stray mapping left where this extension maps would fail it
  Slot& s = core_.slots[slot];
  ext.slot = slot;
  ext.kind = kind;
  ext.fromGroup = s.groups;
  ext.toGroup = toGroups;
  size_t count = (toGroups - ext.fromGroup) * core_.pagesPerGroup();
  if (mayReclaim && count > freePages()) reclaim(count - freePages(), {slot});
  if (freePages() < count) return false;
  if (!takeForExtension(ext, count)) return false;
  s.extending = kind;
  return true;
}

// Room for everything the extension will record on each device, so that
// nothing between marking the slot and committing (or undoing) allocates;
// then idle pages and reserved creations. All or nothing.
bool PageMapper::takeForExtension(Extension& ext, size_t count) {
  ext.on.resize(core_.deviceCount());
  size_t d = 0;
  try {
    for (; d < core_.deviceCount(); ++d) {
      Extension::OnDevice& on = ext.on[d];
      PagePool& pool = core_.shard(d).pool();
      on.taken.pages.reserve(count);
      on.taken.created.reserve(count);
      on.handles.resize(count);
      on.records.resize(count);
      core_.shard(d).slot(ext.slot).pages.reserve(core_.pagesOf(core_.slots[ext.slot]) + count);
      while (on.taken.pages.size() < count) {
        PageId id = pool.takeIdle();
        if (id == PagePool::kNone) break;
        on.taken.pages.push_back(id);
        pool.hold(id);  // mapped off the lock: counted when placed
      }
      while (on.taken.pages.size() + on.creations < count && pool.reserveCreation()) ++on.creations;
    }
  } catch (...) {
    for (size_t u = std::min(d + 1, ext.on.size()); u-- > 0;) {
      PagePool& pool = core_.shard(u).pool();
      for (; ext.on[u].creations > 0; --ext.on[u].creations) pool.cancelCreation();
      for (PageId id : ext.on[u].taken.pages) pool.putIdle(id);
      ext.on[u].taken.pages.clear();
    }
    throw;
  }
  return true;
}

void PageMapper::abortIfStopping(const std::atomic<bool>* cancel) const {
  // Checked before every driver call of an extension: once the process is
  // exiting the driver may be tearing down, so no further call is made.
  if (core_.closing.load() || processExiting())
    fail(ErrorCode::Closed, "the KV cache was closed while the growth was in progress");
  if (cancel && cancel->load()) fail(ErrorCode::Aborted, "the growth was aborted");
}

// Creates each device's pages with the lock released; adopts them (or gives
// the reservations back) under it.
void PageMapper::createOffLock(Lock& lk, Extension& ext, const std::atomic<bool>* cancel, std::exception_ptr& error) {
  std::vector<size_t> made(ext.on.size(), 0);
  lk.unlock();
  try {
    for (size_t d = 0; d < ext.on.size(); ++d)
      core_.onDevice(d, [&] {
        for (; made[d] < ext.on[d].creations; ++made[d]) {
          abortIfStopping(cancel);
          ext.on[d].handles[made[d]] = core_.shard(d).backend().createPage();
        }
      });
  } catch (...) {
    error = std::current_exception();
  }
  lk.lock();
  for (size_t d = 0; d < ext.on.size(); ++d) {
    Extension::OnDevice& on = ext.on[d];
    PagePool& pool = core_.shard(d).pool();
    for (size_t i = 0; i < on.creations; ++i) {
      if (i >= made[d]) {
        pool.cancelCreation();
        continue;
      }
      PageId id = pool.adopt(on.handles[i]);
      pool.hold(id);
      on.taken.created.push_back(id);
      on.taken.pages.push_back(id);
    }
    on.creations = 0;
    for (size_t i = 0; i < on.taken.pages.size(); ++i) on.records[i] = pool.record(on.taken.pages[i]);
  }
}

// Maps each device's pages with the lock released; on a failure unmaps every
// device's again (an unmap that fails leaves the page mapped: giveBack strands it).
void PageMapper::mapOffLock(Lock& lk, Extension& ext, const std::atomic<bool>* cancel, std::exception_ptr& error) {
  size_t first = ext.fromGroup * core_.pagesPerGroup(), end = ext.toGroup * core_.pagesPerGroup();
  lk.unlock();
  try {
    for (size_t d = 0; d < ext.on.size(); ++d)
      core_.onDevice(d, [&] {
        DeviceShard& sh = core_.shard(d);
        for (Extension::OnDevice& on = ext.on[d]; first + on.mapped < end; ++on.mapped) {
          abortIfStopping(cancel);
          sh.pool().map(*on.records[on.mapped], sh.pageAt(ext.slot, first + on.mapped));
        }
      });
  } catch (...) {
    error = std::current_exception();
    for (size_t d = ext.on.size(); d-- > 0;)
      for (Extension::OnDevice& on = ext.on[d]; on.mapped > 0; --on.mapped) {
        try {
          core_.shard(d).pool().unmap(*on.records[on.mapped - 1]);
        } catch (...) {
        }
      }
  }
  lk.lock();
}

void PageMapper::runExtension(Lock& lk, Extension& ext, const std::atomic<bool>* cancel) {
  std::exception_ptr error;
  createOffLock(lk, ext, cancel, error);
  if (!error) mapOffLock(lk, ext, cancel, error);
  Slot& s = core_.slots[ext.slot];
  for (size_t d = 0; d < ext.on.size(); ++d) {
    DeviceShard& sh = core_.shard(d);
    if (error) {
      sh.giveBack(ext.on[d].taken);
      continue;
    }
    std::vector<PageId>& list = sh.slot(ext.slot).pages;
    list.insert(list.end(), ext.on[d].taken.pages.begin(), ext.on[d].taken.pages.end());
    for (PageId id : ext.on[d].taken.pages) sh.pool().place(id);
    sh.counters.pagesMappedOffLock += ext.on[d].taken.pages.size();
  }
  if (!error) s.groups = ext.toGroup;
  s.extending = Extending::No;
  core_.changed.notify_all();
  if (error) std::rethrow_exception(error);
}

// ---- retirements ----------------------------------------------------------------

bool PageMapper::beginRetirement(Retirement& r) {
  int candidate = reclaimAheadCandidate();
  if (candidate < 0) return false;
  r.ahead = true;
  detachFrom(r, static_cast<uint32_t>(candidate), core_.slots[candidate].groups - 1);
  return true;
}

bool PageMapper::beginDemandRetirement(Retirement& r, const std::vector<uint32_t>& exclude) {
  for (const ReclaimCandidate& c : reclaimOrder(exclude)) {
    if (c.fenced) return false;  // unfenced candidates come first: none left
    r.ahead = false;
    detachFrom(r, c.slot, core_.slots[c.slot].groups - 1);
    return true;
  }
  return false;
}

bool PageMapper::beginDrop(Retirement& r, bool cachedToo) {
  int pick = -1;
  for (uint32_t i = 0; i < core_.slots.size(); ++i) {
    Slot& s = core_.slots[i];
    if (!s.dropPending || s.active || s.extendingNow() || core_.fencesPending(i)) continue;
    // A cached prefix: kept until memory is short, then the least recently used first.
    bool cached = core_.prefix->holds(i);
    if (cached && !cachedToo) continue;
    if (!cached) {
      pick = static_cast<int>(i);
      break;
    }
    if (pick < 0 || s.releasedAt < core_.slots[pick].releasedAt) pick = static_cast<int>(i);
  }
  if (pick < 0) return false;
  core_.slots[pick].dropPending = false;  // no page left to share once detached: placeable again
  r.ahead = true;
  detachFrom(r, static_cast<uint32_t>(pick), 0);
  return true;
}

bool PageMapper::waitForRetirements(Lock& lk) {
  if (retiringPages_ == 0) return false;
  core_.changed.wait(lk, [&] { return core_.closing.load() || retiringPages_ == 0; });
  return true;
}

// Groups [firstGroup, end) of the slot leave it on every device, to be
// unmapped off the lock at the slot's addresses (a shared page is mapped at
// others too). The slot is marked extending meanwhile: nothing maps there.
void PageMapper::detachFrom(Retirement& r, uint32_t slot, size_t firstGroup) {
  r.slot = slot;
  r.on.resize(core_.deviceCount());
  size_t first = firstGroup * core_.pagesPerGroup();
  r.toIdle = UINT64_MAX;
  for (size_t d = 0; d < core_.deviceCount(); ++d) {
    DeviceShard& sh = core_.shard(d);
    std::vector<PageId>& list = sh.slot(slot).pages;
    Retirement::OnDevice& on = r.on[d];
    on.pages.assign(list.begin() + static_cast<std::ptrdiff_t>(first), list.end());
    on.addresses.clear();
    for (size_t k = first; k < list.size(); ++k) on.addresses.push_back(sh.pageAt(slot, k));
    list.resize(first);
    uint64_t toIdle = 0;
    for (PageId id : on.pages) toIdle += sh.pool().mappingsOf(id) == 1;
    r.toIdle = std::min(r.toIdle, toIdle);
  }
  r.pages = r.on.empty() ? 0 : r.on[0].pages.size();
  core_.slots[slot].groups = firstGroup;
  core_.slots[slot].extending = Extending::Ahead;
  retiringPages_ += r.pages;
  retiringToIdle_ += r.toIdle;
}

void PageMapper::runRetirement(Lock& lk, Retirement& r) {
  std::vector<std::vector<char>> unmapped(r.on.size());
  for (size_t d = 0; d < r.on.size(); ++d) unmapped[d].assign(r.on[d].pages.size(), 0);
  lk.unlock();
  for (size_t d = 0; d < r.on.size(); ++d)
    for (size_t i = r.on[d].pages.size(); i-- > 0;) {
      try {
        core_.shard(d).backend().unmap(r.on[d].addresses[i]);
        unmapped[d][i] = 1;
      } catch (...) {
        // left mapped: recorded below, unmapped again before the next mapping
      }
    }
  lk.lock();
  for (size_t d = 0; d < r.on.size(); ++d) {
    DeviceShard& sh = core_.shard(d);
    PagePool& pool = sh.pool();
    uint64_t done = 0;
    for (size_t i = 0; i < r.on[d].pages.size(); ++i) {
      PageId id = r.on[d].pages[i];
      Address at = r.on[d].addresses[i];
      if (unmapped[d][i]) {
        if (pool.noteUnmappedAt(id, at)) {
          pool.putIdle(id);
          ++done;
        }
      } else if (pool.mappingsOf(id) == 1) {
        pool.strand(id);
      } else {
        // A shared page's mapping at this (free again) slot stayed: the page
        // record lets it go, the pool keeps it as a stray, unmapped again
        // before the next mapping (else the next growth here fails "mapped already").
        pool.forgetMappingAt(id, at);
        pool.strayMapping(at);
      }
    }
    sh.counters.reclaimedPages += done;
    if (r.ahead) sh.counters.reclaimedAheadPages += done;
  }
  retiringPages_ -= r.pages;
  retiringToIdle_ -= r.toIdle;
  core_.slots[r.slot].extending = Extending::No;
  core_.changed.notify_all();
}

uint64_t PageMapper::droppablePages() {
  uint64_t least = UINT64_MAX;
  for (auto& sh : core_.shards) {
    std::unordered_map<PageId, uint32_t> inDropping;
    for (uint32_t i = 0; i < core_.slots.size(); ++i) {
      const Slot& s = core_.slots[i];
      if (!s.dropPending || s.active || s.extendingNow()) continue;
      for (PageId id : sh->slot(i).pages) ++inDropping[id];
    }
    uint64_t n = 0;
    for (const auto& [id, count] : inDropping) n += sh->pool().mappingsOf(id) == count;
    least = std::min(least, n);
  }
  return least == UINT64_MAX ? 0 : least;
}

}  // namespace vat
