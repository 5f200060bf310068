#include "core/page_mapper.h"

#include <algorithm>
#include <string>
#include <unordered_map>

#include "common/errors.h"
#include "core/policy/reclaim.h"

namespace vat {

Error CacheCore::named(const Error& e, size_t d) const {
  if (e.device >= 0 || shards.size() == 1) return e;  // named already, or nothing to tell apart
  int ordinal = shards[d]->ordinal();
  Error out = withMessage(e, "device " + std::to_string(ordinal) + ": " + e.what());
  out.device = ordinal;
  return out;
}

void CacheCore::waitFences(uint32_t slot) {
  onEachDevice([&](size_t d) { shards[d]->slot(slot).fences.waitAll(shards[d]->backend()); });
}

Error outOfMemory(CacheCore& core, uint64_t neededPages, uint64_t obtainablePages) {
  size_t d = 0;
  for (size_t i = 1; i < core.deviceCount(); ++i)
    if (core.shard(i).freePages() < core.shard(d).freePages()) d = i;
  PagePool& pool = core.shard(d).pool();
  PoolCounts c = pool.counts();
  uint64_t pageSize = pool.pageSize();
  Error e(ErrorCode::OutOfMemory,
          "out of memory: growth needs " + std::to_string(neededPages) + " more page(s) of " +
              std::to_string(pageSize) + " bytes but only " + std::to_string(obtainablePages) +
              " can be had (budget " + std::to_string(c.budgetPages) + " pages, " + std::to_string(c.created) +
              " created, " + std::to_string(c.idle) + " idle in the pool, the rest mapped to active sequences)");
  e.requestedBytes = neededPages * pageSize;
  e.availableBytes = obtainablePages * pageSize;
  return core.named(e, d);
}

uint64_t PageMapper::freePages() const {
  uint64_t least = UINT64_MAX;
  for (const auto& d : core_.shards) least = std::min(least, d->freePages());
  return least;
}

uint64_t PageMapper::obtainablePages(const std::vector<uint32_t>& exclude, bool withLookAhead) {
  auto order = reclaimOrder(exclude);
  return freePages() + reclaimablePages(order, *core_.layout, withLookAhead);
}

// Each slot's fences are queried once: a fence passing meanwhile must not put
// a slot's tiers in different halves of the order.
static std::vector<char> fencedSlots(CacheCore& core) {
  std::vector<char> fenced(core.slots.size(), 0);
  for (uint32_t i = 0; i < core.slots.size(); ++i) {
    const Slot& s = core.slots[i];
    fenced[i] = s.groups > 0 && !s.extendingNow() && core.fencesPending(i);
  }
  return fenced;
}

std::vector<ReclaimCandidate> PageMapper::reclaimOrder(const std::vector<uint32_t>& exclude) {
  return vat::reclaimOrder(core_.slots, *core_.layout, fencedSlots(core_), core_.prefix->holders(), exclude);
}

int PageMapper::reclaimAheadCandidate() {
  return vat::reclaimAheadCandidate(core_.slots, fencedSlots(core_), core_.prefix->holders());
}

void PageMapper::retryStranded() {
  for (auto& d : core_.shards) d->retryStranded();
}

void PageMapper::growOnLock(const std::vector<std::pair<uint32_t, size_t>>& targets, uint64_t missing,
                            const std::vector<uint32_t>& exclude) {
  retryStranded();
  std::vector<TakenPages> taken = obtainPages(missing, exclude);
  size_t per = core_.pagesPerGroup();
  try {
    core_.onAllDevices([&](size_t d) {
      size_t next = 0;
      for (const auto& [i, need] : targets)
        if (need > core_.slots[i].groups) core_.shard(d).mapInto(i, need * per, taken[d].pages, next);
    });
  } catch (...) {
    // Every device, last first: each mapped what it could (unlistBeyond
    // leaves a device that mapped nothing as it is).
    for (size_t u = core_.deviceCount(); u-- > 0;)
      for (const auto& [i, need] : targets) core_.shard(u).unlistBeyond(i, core_.pagesOf(core_.slots[i]));
    giveBack(taken);
    throw;
  }
  for (const auto& [i, need] : targets) core_.slots[i].groups = std::max(core_.slots[i].groups, need);
  for (auto& sh : core_.shards) sh->counters.pagesOnDemand += missing;
}

// Pages for a growth on every device, cheapest first: idle in the pool, newly
// created within the budget, then unmapped from others (in reclaim order, on
// every device at once). All or nothing: on failure every page taken goes
// back and the error is thrown.
std::vector<TakenPages> PageMapper::obtainPages(uint64_t count, const std::vector<uint32_t>& exclude) {
  std::vector<TakenPages> taken(core_.deviceCount());
  try {
    for (TakenPages& t : taken) {
      t.pages.reserve(count);
      t.created.reserve(count);
    }
    for (;;) {
      uint64_t least = count;
      core_.onAllDevices([&](size_t d) { core_.shard(d).take(taken[d], count); });
      for (const TakenPages& t : taken) least = std::min<uint64_t>(least, t.pages.size());
      if (least == count) return taken;
      if (reclaim(count - least, exclude) == 0) throw outOfMemory(core_, count, least);
    }
  } catch (...) {
    giveBack(taken);
    throw;
  }
}

void PageMapper::giveBack(std::vector<TakenPages>& taken) noexcept {
  for (size_t d = 0; d < taken.size(); ++d) core_.shard(d).giveBack(taken[d]);
}

void PageMapper::shrinkSlot(uint32_t slot, size_t groups) noexcept {
  Slot& s = core_.slots[slot];
  if (s.groups <= groups) return;
  for (auto& d : core_.shards) d->shrinkTo(slot, groups * core_.pagesPerGroup());
  s.groups = groups;
}

void PageMapper::dropMappings(uint32_t slot) noexcept {
  for (auto& d : core_.shards) d->dropAll(slot);
  core_.slots[slot].groups = 0;
  core_.slots[slot].dropPending = false;
}

bool PageMapper::holdsSharedPages(uint32_t slot) const {
  for (const auto& d : core_.shards)
    if (d->holdsShared(slot)) return true;
  return false;
}

uint64_t PageMapper::reclaim(uint64_t pages, const std::vector<uint32_t>& exclude) {
  uint64_t done = 0;
  for (const ReclaimCandidate& c : reclaimOrder(exclude)) {
    if (done >= pages) break;
    Slot& s = core_.slots[c.slot];
    if (c.fenced) core_.waitFences(c.slot);
    while (s.groups > c.keepGroups && done < pages) {
      unmapTailGroup(c.slot);
      done += core_.pagesPerGroup();
    }
  }
  return done;
}

// Unmaps a slot's last page group on every device. On a failure the devices
// that unmapped it map it back (same physical pages: the bytes are as they
// were) and the error is thrown. When that fails too, the slot loses the
// group on every device: pages still mapped are stranded, the others idle.
void PageMapper::unmapTailGroup(uint32_t slot) {
  Slot& s = core_.slots[slot];
  size_t first = (s.groups - 1) * core_.pagesPerGroup(), end = core_.pagesOf(s);
  size_t d = 0;
  bool restored = true;
  try {
    for (; d < core_.deviceCount(); ++d) core_.onDevice(d, [&] { core_.shard(d).unmapTail(slot, first, restored); });
  } catch (...) {
    for (size_t u = 0; u < d; ++u) restored = core_.shard(u).remapTail(slot, first, end) && restored;
    if (!restored) {
      for (auto& sh : core_.shards) sh->abandonTail(slot, first);
      s.groups--;
    }
    throw;
  }
  for (auto& sh : core_.shards) {
    sh->abandonTail(slot, first);  // every page unmapped: idle
    sh->counters.reclaimedPages += core_.pagesPerGroup();
  }
  s.groups--;
}

}  // namespace vat
