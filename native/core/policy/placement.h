// Placement policy: which free slot a new sequence gets.
#pragma once

#include <cstddef>
#include <optional>
#include <vector>

#include "core/slot_table.h"

namespace vat {

// Deferred reclamation: a released slot keeps its pages, so the slot whose
// mapped groups best fit the expected length needs the fewest driver calls.
// Best fit = the fewest groups that still cover it; failing that, the most.
// Without an expected length, the slot with the most mapped groups.
// Prefix caching: a slot holding cached prefix groups (cached[i], see
// core/prefix_cache.h) is taken only when no other is placeable (placing a
// sequence there evicts them), by the same best fit, the least recently
// released of equal fits first. (Best fit, not plain LRU: with every released
// slot caching something — a workload with no hits — placement is what it is
// without the cache, and costs no extra mapping.)
// Throws ERR_NO_SLOT when every slot holds a sequence.
uint32_t placeSequence(const SlotTable& slots, std::optional<size_t> expectedGroups, const std::vector<char>& cached);

}  // namespace vat
