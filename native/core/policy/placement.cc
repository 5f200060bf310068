#include "core/policy/placement.h"

#include <string>

#include "common/errors.h"

namespace vat {

namespace {

// Whether slot a is a better place than slot b (both placeable).
bool better(const SlotTable& slots, uint32_t a, uint32_t b, size_t need, const std::vector<char>& cached) {
  if (cached[a] != cached[b]) return !cached[a];
  if (cached[a]) return slots[a].releasedAt < slots[b].releasedAt;  // evict the least recently used
  size_t have = slots[a].groups, bestHave = slots[b].groups;
  bool covers = have >= need, bestCovers = bestHave >= need;
  return covers != bestCovers ? covers : (covers ? have < bestHave : have > bestHave);
}

}  // namespace

uint32_t placeSequence(const SlotTable& slots, std::optional<size_t> expectedGroups, const std::vector<char>& cached) {
  size_t need = expectedGroups ? *expectedGroups : SIZE_MAX;
  int best = -1;
  for (uint32_t i = 0; i < slots.size(); ++i) {
    if (!slots[i].placeable()) continue;
    if (best < 0 || better(slots, i, static_cast<uint32_t>(best), need, cached)) best = static_cast<int>(i);
  }
  if (best < 0)
    fail(ErrorCode::NoSlot, "every one of the " + std::to_string(slots.size()) + " sequence slots is taken");
  return static_cast<uint32_t>(best);
}

}  // namespace vat
