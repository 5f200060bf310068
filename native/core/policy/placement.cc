#include "core/policy/placement.h"

#include <string>

#include "common/errors.h"

namespace vat {

namespace {

// Whether slot a is a better place than slot b (both placeable).
bool better(const SlotTable& slots, uint32_t a, uint32_t b, size_t need, const std::vector<char>& cached) {
  if (cached[a] != cached[b]) return !cached[a];
  size_t have = slots[a].groups, bestHave = slots[b].groups;
  bool covers = have >= need, bestCovers = bestHave >= need;
  if (covers != bestCovers) return covers;
  if (have != bestHave) return covers ? have < bestHave : have > bestHave;
  // an equal fit among cached slots: evict the least recently used
  return cached[a] && slots[a].releasedAt < slots[b].releasedAt;
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
