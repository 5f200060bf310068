#include "core/policy/reclaim.h"

#include <algorithm>

namespace vat {

namespace {

enum class Tier { PastLookAhead, Released, LookAhead };

// The groups of slot `s` a tier offers: [keep, top), empty when none.
std::pair<size_t, size_t> tierGroups(const Slot& s, const KVLayout& layout, Tier tier) {
  size_t mapped = s.groups;
  if (tier == Tier::Released) return s.active ? std::pair<size_t, size_t>{0, 0} : std::pair<size_t, size_t>{0, mapped};
  if (!s.active) return {0, 0};
  size_t tokens = layout.groupsForTokens(s.tokens);
  size_t target = std::max(tokens, std::min(mapped, layout.groupsForTokens(s.prefetchTarget)));
  return tier == Tier::PastLookAhead ? std::pair<size_t, size_t>{target, mapped} : std::pair<size_t, size_t>{tokens, target};
}

}  // namespace

std::vector<ReclaimCandidate> reclaimOrder(const SlotTable& slots, const KVLayout& layout,
                                           const std::vector<char>& fenced, const std::vector<char>& cached,
                                           const std::vector<uint32_t>& exclude) {
  std::vector<ReclaimCandidate> order;
  auto excluded = [&](uint32_t i) { return std::find(exclude.begin(), exclude.end(), i) != exclude.end(); };
  // Active slots from the highest index down; released slots least recently
  // released first.
  std::vector<uint32_t> byIndex;
  for (uint32_t i = slots.size(); i-- > 0;) byIndex.push_back(i);
  std::vector<uint32_t> byRelease = byIndex;
  std::stable_sort(byRelease.begin(), byRelease.end(), [&](uint32_t a, uint32_t b) {
    if (cached[a] != cached[b]) return !cached[a];
    return slots[a].releasedAt < slots[b].releasedAt;
  });
  for (bool waits : {false, true}) {
    for (Tier tier : {Tier::PastLookAhead, Tier::Released, Tier::LookAhead}) {
      for (uint32_t i : tier == Tier::Released ? byRelease : byIndex) {
        const Slot& s = slots[i];
        if (s.extendingNow() || s.dropPending || excluded(i)) continue;
        auto [keep, top] = tierGroups(s, layout, tier);
        if (top <= keep || bool(fenced[i]) != waits) continue;
        order.push_back({i, keep, top, waits, tier == Tier::LookAhead});
      }
    }
  }
  return order;
}

int reclaimAheadCandidate(const SlotTable& slots, const std::vector<char>& fenced, const std::vector<char>& cached) {
  int best = -1;
  for (uint32_t i = 0; i < slots.size(); ++i) {
    const Slot& s = slots[i];
    if (s.active || s.extendingNow() || s.dropPending || s.groups == 0 || fenced[i]) continue;
    if (best >= 0) {
      bool sooner = cached[i] != cached[best] ? !cached[i] : s.releasedAt < slots[best].releasedAt;
      if (!sooner) continue;
    }
    best = static_cast<int>(i);
  }
  return best;
}

uint64_t reclaimablePages(const std::vector<ReclaimCandidate>& order, const KVLayout& layout, bool withLookAhead) {
  uint64_t n = 0;
  for (const ReclaimCandidate& c : order)
    if (withLookAhead || !c.lookAhead) n += (c.topGroups - c.keepGroups) * layout.pagesPerGroup();
  return n;
}

}  // namespace vat
