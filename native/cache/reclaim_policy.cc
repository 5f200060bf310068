#include "cache/reclaim_policy.h"

#include <algorithm>

namespace vat {

std::vector<ReclaimCandidate> reclaimOrder(SlotTable& slots, const KVLayout& layout, Backend& backend,
                                           const std::vector<uint32_t>& exclude) {
  std::vector<ReclaimCandidate> order;
  auto excluded = [&](uint32_t i) { return std::find(exclude.begin(), exclude.end(), i) != exclude.end(); };
  // Active slots from the highest index down; released slots least recently
  // released first (those released last are the likeliest to be reused).
  std::vector<uint32_t> byAge;
  for (uint32_t i = slots.size(); i-- > 0;) byAge.push_back(i);
  std::vector<uint32_t> released = byAge;
  std::stable_sort(released.begin(), released.end(),
                   [&](uint32_t a, uint32_t b) { return slots[a].releasedAt < slots[b].releasedAt; });
  for (bool fenced : {false, true}) {
    for (bool active : {true, false}) {
      for (uint32_t i : active ? byAge : released) {
        Slot& s = slots[i];
        if (s.active() != active || s.extendingNow() || excluded(i)) continue;
        size_t keep = s.active() ? layout.groupsForTokens(s.tokens) : 0;
        if (slots.groupsOf(s) <= keep) continue;
        if (s.fences.pending(backend) != fenced) continue;
        order.push_back({i, keep, fenced});
      }
    }
  }
  return order;
}

int reclaimAheadCandidate(SlotTable& slots, Backend& backend) {
  int best = -1;
  for (uint32_t i = 0; i < slots.size(); ++i) {
    Slot& s = slots[i];
    if (s.active() || s.extendingNow() || s.pages.empty()) continue;
    if (best >= 0 && s.releasedAt >= slots[best].releasedAt) continue;
    if (s.fences.pending(backend)) continue;
    best = static_cast<int>(i);
  }
  return best;
}

uint64_t reclaimablePages(const std::vector<ReclaimCandidate>& order, const SlotTable& slots,
                          const KVLayout& layout) {
  uint64_t n = 0;
  for (const ReclaimCandidate& c : order) n += (slots.groupsOf(slots[c.slot]) - c.keepGroups) * layout.pagesPerGroup();
  return n;
}

}  // namespace vat
