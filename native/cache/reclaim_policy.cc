#include "cache/reclaim_policy.h"

#include <algorithm>

namespace vat {

std::vector<ReclaimCandidate> reclaimOrder(SlotTable& slots, const KVLayout& layout, Backend& backend,
                                           const std::vector<uint32_t>& exclude) {
  std::vector<ReclaimCandidate> order;
  auto excluded = [&](uint32_t i) { return std::find(exclude.begin(), exclude.end(), i) != exclude.end(); };
  for (bool fenced : {false, true}) {
    for (bool active : {true, false}) {
      for (uint32_t i = slots.size(); i-- > 0;) {
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

uint64_t reclaimablePages(const std::vector<ReclaimCandidate>& order, const SlotTable& slots,
                          const KVLayout& layout) {
  uint64_t n = 0;
  for (const ReclaimCandidate& c : order) n += (slots.groupsOf(slots[c.slot]) - c.keepGroups) * layout.pagesPerGroup();
  return n;
}

}  // namespace vat
