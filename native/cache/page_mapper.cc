#include "cache/page_mapper.h"

#include <algorithm>
#include <string>
#include <unordered_map>

#include "cache/reclaim_policy.h"
#include "common/errors.h"
#include "common/lifetime.h"

namespace vat {

namespace {
bool contains(const std::vector<PageId>& v, PageId x) { return std::find(v.begin(), v.end(), x) != v.end(); }
}  // namespace

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

uint64_t PageMapper::obtainablePages(const std::vector<uint32_t>& exclude, bool withLookAhead) {
  PagePool& pool = core_.pool();
  auto order = reclaimOrder(core_.slots, *core_.layout, core_.backend(), exclude);
  return pool.idleCount() + pool.headroom() + reclaimablePages(order, core_.slots, *core_.layout, withLookAhead);
}

void PageMapper::retryStranded() {
  if (core_.pool().hasStranded()) core_.pool().retryStranded();
}

void PageMapper::growOnLock(const std::vector<std::pair<uint32_t, size_t>>& targets, uint64_t missing,
                            const std::vector<uint32_t>& exclude) {
  retryStranded();
  std::vector<PageId> createdNow;
  std::vector<PageId> pages;
  std::vector<std::pair<uint32_t, size_t>> grown;  // slot, pages before
  try {
    pages = obtainPages(missing, createdNow, exclude);
    grown.reserve(targets.size());
    size_t next = 0;
    for (const auto& [i, need] : targets) {
      Slot& s = core_.slots[i];
      if (need <= core_.groupsOf(s)) continue;
      grown.emplace_back(i, s.pages.size());
      s.pages.reserve(need * core_.layout->pagesPerGroup());
      mapGroups(i, s, need, pages, next);
    }
  } catch (...) {
    for (auto it = grown.rbegin(); it != grown.rend(); ++it) unmapGroupsFrom(core_.slots[it->first], it->second);
    returnPages(pages, createdNow);
    throw;
  }
}

// Pages for a growth, cheapest first: idle in the pool, newly created within
// the budget, then unmapped from others (in reclaim order). All or nothing:
// on failure every page taken goes back and the error is thrown.
std::vector<PageId> PageMapper::obtainPages(uint64_t count, std::vector<PageId>& createdNow,
                                            const std::vector<uint32_t>& exclude) {
  PagePool& pool = core_.pool();
  std::vector<PageId> pages;
  try {
    pages.reserve(count);
    createdNow.reserve(count);
    while (pages.size() < count) {
      PageId id = pool.takeIdle();
      if (id != PagePool::kNone) {
        pages.push_back(id);
        continue;
      }
      if (pool.headroom() > 0) {
        try {
          id = pool.create();
          createdNow.push_back(id);
          pages.push_back(id);
          continue;
        } catch (const Error& e) {
          // The device is fuller than the budget assumed: fall back to reclaiming.
          if (e.code() != ErrorCode::OutOfMemory) throw;
        }
      }
      if (reclaim(count - pages.size(), exclude) == 0)
        throw outOfMemory(count, pages.size(), pool.pageSize(), pool.counts());
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
void PageMapper::returnPages(const std::vector<PageId>& pages, const std::vector<PageId>& createdNow) {
  PagePool& pool = core_.pool();
  for (PageId id : pages) {
    PageState state = pool.page(id).state;
    if (state == PageState::Mapped || state == PageState::Accessible) {
      pool.strand(id);
      continue;
    }
    if (state != PageState::Created) continue;
    try {
      if (contains(createdNow, id)) pool.destroy(id);
      else pool.putIdle(id);
    } catch (...) {
      pool.putIdle(id);
    }
  }
}

// Maps the slot's groups up to `toGroups` from pages[next...], advancing
// next. The slot's page list has room for them (no allocation between a map
// and its record).
void PageMapper::mapGroups(uint32_t slotIndex, Slot& s, size_t toGroups, const std::vector<PageId>& pages,
                           size_t& next) {
  size_t perGroup = core_.layout->pagesPerGroup();
  Address base = core_.device.base();
  for (size_t g = core_.groupsOf(s); g < toGroups; ++g) {
    for (size_t i = 0; i < perGroup; ++i) {
      PageId id = pages[next];
      core_.pool().map(id, base + core_.layout->pageOffset(slotIndex, g, i));
      s.pages.push_back(id);
      ++next;
    }
  }
}

// Rolls a slot back to its first `keepPages` pages. A page whose unmap fails
// stays mapped; the caller's returnPages strands it.
void PageMapper::shrinkSlot(uint32_t slot, size_t groups) noexcept {
  Slot& s = core_.slots[slot];
  PagePool& pool = core_.pool();
  size_t keep = groups * core_.layout->pagesPerGroup();
  while (s.pages.size() > keep) {
    PageId id = s.pages.back();
    try {
      pool.unmap(id);
      pool.putIdle(id);
    } catch (...) {
      pool.strand(id);  // retried before the next mapping
    }
    s.pages.pop_back();
  }
}

void PageMapper::unmapGroupsFrom(Slot& s, size_t keepPages) {
  while (s.pages.size() > keepPages) {
    try {
      core_.pool().unmap(s.pages.back());
    } catch (...) {
    }
    s.pages.pop_back();
  }
}

uint64_t PageMapper::reclaim(uint64_t pages, const std::vector<uint32_t>& exclude) {
  uint64_t done = 0;
  for (const ReclaimCandidate& c : reclaimOrder(core_.slots, *core_.layout, core_.backend(), exclude)) {
    if (done >= pages) break;
    Slot& s = core_.slots[c.slot];
    if (c.fenced) s.fences.waitAll(core_.backend());
    while (core_.groupsOf(s) > c.keepGroups && done < pages) {
      unmapTailGroup(s);
      done += core_.layout->pagesPerGroup();
    }
  }
  return done;
}

// Unmaps a slot's last page group. On failure the pages this call unmapped
// are mapped back (same physical pages: the bytes are as they were) and the
// error is thrown. When even that fails, the slot is shrunk to its whole
// groups before this one: pages still mapped are stranded, the others go to
// the pool.
void PageMapper::unmapTailGroup(Slot& s) {
  PagePool& pool = core_.pool();
  size_t perGroup = core_.layout->pagesPerGroup();
  size_t first = s.pages.size() - perGroup;
  size_t i = s.pages.size();
  try {
    for (; i > first; --i) pool.unmap(s.pages[i - 1]);
  } catch (...) {
    bool restored = true;
    uint32_t slot = core_.slots.indexOf(s);
    for (size_t j = i; j < s.pages.size(); ++j) {
      try {
        pool.map(s.pages[j], core_.device.base() + core_.layout->pageOffset(slot, first / perGroup, j - first));
      } catch (...) {
        restored = false;
      }
    }
    if (!restored) {
      for (size_t j = first; j < s.pages.size(); ++j) {
        if (pool.page(s.pages[j]).state == PageState::Created) pool.putIdle(s.pages[j]);
        else pool.strand(s.pages[j]);
      }
      s.pages.resize(first);
    }
    throw;
  }
  for (size_t j = first; j < s.pages.size(); ++j) pool.putIdle(s.pages[j]);
  s.pages.resize(first);
  reclaimedPages_ += perGroup;
}

bool PageMapper::beginRetirement(Retirement& r) {
  int candidate = reclaimAheadCandidate(core_.slots, core_.backend());
  if (candidate < 0) return false;
  r.ahead = true;
  detachTailGroup(r, static_cast<uint32_t>(candidate));
  return true;
}

bool PageMapper::beginDemandRetirement(Retirement& r, const std::vector<uint32_t>& exclude) {
  for (const ReclaimCandidate& c : reclaimOrder(core_.slots, *core_.layout, core_.backend(), exclude)) {
    if (c.fenced) return false;  // unfenced candidates come first: none left
    r.ahead = false;
    detachTailGroup(r, c.slot);
    return true;
  }
  return false;
}

bool PageMapper::waitForRetirements(Lock& lk) {
  if (retiringPages_ == 0) return false;
  core_.changed.wait(lk, [&] { return core_.closing.load() || retiringPages_ == 0; });
  return true;
}

void PageMapper::detachTailGroup(Retirement& r, uint32_t slot) {
  detachFrom(r, slot, core_.slots[slot].pages.size() - core_.layout->pagesPerGroup());
}

// Pages [first, end) of the slot leave it, to be unmapped off the lock at the
// slot's addresses (a shared page is mapped at others too).
void PageMapper::detachFrom(Retirement& r, uint32_t slot, size_t first) {
  r.slot = slot;
  Slot& s = core_.slots[r.slot];
  const KVLayout& layout = *core_.layout;
  size_t per = layout.pagesPerGroup();
  r.pages.assign(s.pages.begin() + static_cast<std::ptrdiff_t>(first), s.pages.end());
  r.addresses.clear();
  for (size_t k = first; k < s.pages.size(); ++k)
    r.addresses.push_back(core_.device.base() + layout.pageOffset(slot, k / per, k % per));
  s.pages.resize(first);
  s.extending = Extending::Ahead;
  retiringPages_ += r.pages.size();
  r.toIdle = 0;
  for (PageId id : r.pages) r.toIdle += core_.pool().mappingsOf(id) == 1;
  retiringToIdle_ += r.toIdle;
}

bool PageMapper::beginDrop(Retirement& r) {
  for (uint32_t i = 0; i < core_.slots.size(); ++i) {
    Slot& s = core_.slots[i];
    if (!s.dropPending || s.active() || s.extendingNow() || s.fences.pending(core_.backend())) continue;
    s.dropPending = false;  // no page left to share once detached: placeable again
    r.ahead = true;
    detachFrom(r, i, 0);
    return true;
  }
  return false;
}

void PageMapper::runRetirement(Lock& lk, Retirement& r) {
  Backend& backend = core_.backend();
  std::vector<char> unmapped(r.pages.size(), 0);
  lk.unlock();
  for (size_t i = r.pages.size(); i-- > 0;) {
    try {
      backend.unmap(r.addresses[i]);
      unmapped[i] = 1;
    } catch (...) {
      // left mapped: stranded below, unmapped again before the next mapping
    }
  }
  lk.lock();
  PagePool& pool = core_.pool();
  uint64_t done = 0;
  for (size_t i = 0; i < r.pages.size(); ++i) {
    if (unmapped[i]) {
      if (pool.noteUnmappedAt(r.pages[i], r.addresses[i])) {
        pool.putIdle(r.pages[i]);
        ++done;
      }
    } else if (pool.mappingsOf(r.pages[i]) == 1) {
      pool.strand(r.pages[i]);
    } else {
      // A shared page's mapping at this (free again) slot stayed: the page
      // record lets it go, the pool keeps it as a stray, unmapped again
      // before the next mapping (else the next growth here fails "mapped already").
      pool.forgetMappingAt(r.pages[i], r.addresses[i]);
      pool.strayMapping(r.addresses[i]);
    }
  }
  retiringPages_ -= r.pages.size();
  retiringToIdle_ -= r.toIdle;
  reclaimedPages_ += done;
  if (r.ahead) reclaimedAheadPages_ += done;
  core_.slots[r.slot].extending = Extending::No;
  core_.changed.notify_all();
}

// Pages that would go idle once the released sharers (dropPending) drop
// their mappings: those mapped only in such slots. A growth short of pages
// waits for their fences rather than fail (they count as obtainable).
uint64_t PageMapper::droppablePages() {
  PagePool& pool = core_.pool();
  std::unordered_map<PageId, uint32_t> inDropping;
  for (uint32_t i = 0; i < core_.slots.size(); ++i) {
    const Slot& s = core_.slots[i];
    if (!s.dropPending || s.active() || s.extendingNow()) continue;
    for (PageId id : s.pages) ++inDropping[id];
  }
  uint64_t n = 0;
  for (const auto& [id, count] : inDropping) n += pool.mappingsOf(id) == count;
  return n;
}

bool PageMapper::beginExtension(Extension& ext, uint32_t slot, size_t toGroups, bool mayReclaim, Extending kind) {
  PagePool& pool = core_.pool();
  retryStranded();  // a stray mapping left where this extension maps would fail it
  Slot& s = core_.slots[slot];
  ext.slot = slot;
  ext.kind = kind;
  ext.fromGroup = core_.groupsOf(s);
  ext.toGroup = toGroups;
  size_t count = (toGroups - ext.fromGroup) * core_.layout->pagesPerGroup();
  if (mayReclaim) {
    uint64_t have = pool.idleCount() + pool.headroom();
    if (count > have) reclaim(count - have, {slot});
  }
  if (pool.idleCount() + pool.headroom() < count) return false;
  // Room for everything the extension will record, so that nothing between
  // marking the slot and committing (or rolling back) allocates.
  ext.pages.reserve(count);
  ext.created.reserve(count);
  ext.handles.resize(count);
  ext.records.resize(count);
  s.pages.reserve(s.pages.size() + count);
  while (ext.pages.size() < count) {
    PageId id = pool.takeIdle();
    if (id == PagePool::kNone) break;
    ext.pages.push_back(id);
  }
  try {
    while (ext.pages.size() + ext.creations < count && pool.reserveCreation()) ++ext.creations;
  } catch (...) {
    for (size_t i = 0; i < ext.creations; ++i) pool.cancelCreation();
    for (PageId id : ext.pages) pool.putIdle(id);
    throw;
  }
  s.extending = kind;
  return true;
}

void PageMapper::endExtension(const Extension& ext) {
  core_.slots[ext.slot].extending = Extending::No;
  core_.changed.notify_all();
}

void PageMapper::abortIfStopping(const std::atomic<bool>* cancel) const {
  // Checked before every driver call of an extension: once the process is
  // exiting the driver may be tearing down, so no further call is made.
  if (core_.closing.load() || processExiting())
    fail(ErrorCode::Closed, "the KV cache was closed while the growth was in progress");
  if (cancel && cancel->load()) fail(ErrorCode::Aborted, "the growth was aborted");
}

void PageMapper::runExtension(Lock& lk, Extension& ext, const std::atomic<bool>* cancel) {
  PagePool& pool = core_.pool();
  Backend& backend = core_.backend();
  std::exception_ptr error;
  size_t made = 0;
  lk.unlock();
  try {
    for (; made < ext.creations; ++made) {
      abortIfStopping(cancel);
      ext.handles[made] = backend.createPage();
    }
  } catch (...) {
    error = std::current_exception();
  }
  lk.lock();
  for (size_t i = 0; i < ext.creations; ++i) {
    if (i < made) {
      PageId id = pool.adopt(ext.handles[i]);
      ext.created.push_back(id);
      ext.pages.push_back(id);
    } else {
      pool.cancelCreation();
    }
  }
  for (size_t i = 0; i < ext.pages.size(); ++i) ext.records[i] = pool.record(ext.pages[i]);
  size_t mapped = 0;
  if (!error) {
    lk.unlock();
    size_t perGroup = core_.layout->pagesPerGroup();
    Address base = core_.device.base();
    try {
      for (size_t g = ext.fromGroup; g < ext.toGroup; ++g) {
        for (size_t i = 0; i < perGroup; ++i) {
          abortIfStopping(cancel);
          pool.map(*ext.records[mapped], base + core_.layout->pageOffset(ext.slot, g, i));
          ++mapped;
        }
      }
    } catch (...) {
      error = std::current_exception();
      while (mapped > 0) {
        try {
          pool.unmap(*ext.records[mapped - 1]);  // a failure leaves it mapped: returnPages strands it
        } catch (...) {
        }
        --mapped;
      }
    }
    lk.lock();
  }
  Slot& s = core_.slots[ext.slot];
  if (!error) {
    s.pages.insert(s.pages.end(), ext.pages.begin(), ext.pages.end());
    pagesMappedOffLock_ += ext.pages.size();
  } else {
    returnPages(ext.pages, ext.created);
  }
  endExtension(ext);
  if (error) std::rethrow_exception(error);
}

}  // namespace vat
