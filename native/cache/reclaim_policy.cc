#include "cache/reclaim_policy.h"

#include <algorithm>

namespace vat {

namespace {

enum class Tier { PastLookAhead, Released, LookAhead };

// The groups of slot `s` a tier offers: [keep, top), empty when none.
std::pair<size_t, size_t> tierGroups(const Slot& s, size_t mapped, const KVLayout& layout, Tier tier) {
  if (tier == Tier::Released) return s.active() ? std::pair<size_t, size_t>{0, 0} : std::pair<size_t, size_t>{0, mapped};
  if (!s.active()) return {0, 0};
  size_t tokens = layout.groupsForTokens(s.tokens);
  size_t target = std::max(tokens, std::min(mapped, layout.groupsForTokens(s.prefetchTarget)));
  return tier == Tier::PastLookAhead ? std::pair<size_t, size_t>{target, mapped} : std::pair<size_t, size_t>{tokens, target};
}

}  // namespace

std::vector<ReclaimCandidate> reclaimOrder(SlotTable& slots, const KVLayout& layout, Backend& backend,
                                           const std::vector<uint32_t>& exclude) {
  std::vector<ReclaimCandidate> order;
  auto excluded = [&](uint32_t i) { return std::find(exclude.begin(), exclude.end(), i) != exclude.end(); };
  // Active slots from the highest index down; released slots least recently
  // released first.
  std::vector<uint32_t> byIndex;
  for (uint32_t i = slots.size(); i-- > 0;) byIndex.push_back(i);
  std::vector<uint32_t> byRelease = byIndex;
  std::stable_sort(byRelease.begin(), byRelease.end(),
                   [&](uint32_t a, uint32_t b) { return slots[a].releasedAt < slots[b].releasedAt; });
  // Each slot's fences are queried once: a fence passing meanwhile must not
  // put a slot's tiers in different halves.
  std::vector<char> pending(slots.size());
  for (uint32_t i = 0; i < slots.size(); ++i)
    pending[i] = !slots[i].pages.empty() && !slots[i].extendingNow() && slots[i].fences.pending(backend);
  for (bool fenced : {false, true}) {
    for (Tier tier : {Tier::PastLookAhead, Tier::Released, Tier::LookAhead}) {
      for (uint32_t i : tier == Tier::Released ? byRelease : byIndex) {
        Slot& s = slots[i];
        if (s.extendingNow() || s.dropPending || excluded(i)) continue;
        auto [keep, top] = tierGroups(s, slots.groupsOf(s), layout, tier);
        if (top <= keep) continue;
        if (bool(pending[i]) != fenced) continue;
        order.push_back({i, keep, top, fenced, tier == Tier::LookAhead});
      }
    }
  }
  return order;
}

int reclaimAheadCandidate(SlotTable& slots, Backend& backend) {
  int best = -1;
  for (uint32_t i = 0; i < slots.size(); ++i) {
    Slot& s = slots[i];
    if (s.active() || s.extendingNow() || s.dropPending || s.pages.empty()) continue;
    if (best >= 0 && s.releasedAt >= slots[best].releasedAt) continue;
    if (s.fences.pending(backend)) continue;
    best = static_cast<int>(i);
  }
  return best;
}

uint64_t reclaimablePages(const std::vector<ReclaimCandidate>& order, const SlotTable& slots,
                          const KVLayout& layout, bool withLookAhead) {
  uint64_t n = 0;
  for (const ReclaimCandidate& c : order)
    if (withLookAhead || !c.lookAhead) n += (c.topGroups - c.keepGroups) * layout.pagesPerGroup();
  return n;
}

}  // namespace vat
