#include "core/policy/placement.h"

#include <string>

#include "common/errors.h"

namespace vat {

uint32_t placeSequence(const SlotTable& slots, std::optional<size_t> expectedGroups) {
  size_t need = expectedGroups ? *expectedGroups : SIZE_MAX;
  int best = -1;
  for (uint32_t i = 0; i < slots.size(); ++i) {
    const Slot& s = slots[i];
    if (!s.placeable()) continue;
    if (best < 0) {
      best = static_cast<int>(i);
      continue;
    }
    size_t have = s.groups, bestHave = slots[best].groups;
    bool covers = have >= need, bestCovers = bestHave >= need;
    if (covers != bestCovers ? covers : (covers ? have < bestHave : have > bestHave)) best = static_cast<int>(i);
  }
  if (best < 0)
    fail(ErrorCode::NoSlot, "every one of the " + std::to_string(slots.size()) + " sequence slots is taken");
  return static_cast<uint32_t>(best);
}

}  // namespace vat
