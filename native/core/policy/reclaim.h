// Reclaim policy: which mapped page groups a growth may take from other
// slots, and in what order. Every path that unmaps pages of a slot walks this
// order (growth on the caller's thread, growAsync, reclaim()), and "how much
// could be reclaimed" is its sum, so the two cannot disagree. Pure: it reads
// the slot table and which slots are fenced (GPU work pending on any device),
// and changes nothing.
#pragma once

#include <cstdint>
#include <vector>

#include "core/slot_table.h"
#include "layout/kv_layout.h"

namespace vat {

struct ReclaimCandidate {
  uint32_t slot;
  size_t keepGroups;  // groups that stay mapped
  size_t topGroups;   // the candidate covers groups [keepGroups, topGroups)
  bool fenced;        // GPU work may still use its pages: wait before unmapping
  bool lookAhead = false;  // the look-ahead of a running sequence (the last tier)
};

// The order, least useful pages first:
//   1. groups of active sequences past their look-ahead (a tail inherited
//      from a longer sequence that held the slot before): no step needs them;
//   2. released slots, least recently released first (those released last
//      are the likeliest to be reused by the next sequences), those holding
//      cached prefix groups (cached[i], core/prefix_cache.h) after all the
//      others: eviction of the prefix cache, least recently used first, a
//      slot's tail (leaf) groups before the groups its chain depends on;
//   3. the look-ahead of active sequences (groups past the tokens, up to the
//      prefetch target): taking it only moves the mapping to the next steps,
//      and the worker would map it again at once, so it goes last.
// First every candidate that is not fenced, then, in the same order, those
// that must be waited for. Slots being extended, released sharers
// (dropPending) and those in `exclude` are left alone. fenced[i]: slot i's
// fences have not all passed, on some device.
std::vector<ReclaimCandidate> reclaimOrder(const SlotTable& slots, const KVLayout& layout,
                                           const std::vector<char>& fenced, const std::vector<char>& cached,
                                           const std::vector<uint32_t>& exclude);

// Reclaim ahead of need (the prefetch worker, memory full): the released slot
// least recently released that is not fenced (never waited for), one without
// cached prefix groups first, or -1.
int reclaimAheadCandidate(const SlotTable& slots, const std::vector<char>& fenced, const std::vector<char>& cached);

// Pages (per device) the order could give back; without the running
// sequences' look-ahead unless `withLookAhead`.
uint64_t reclaimablePages(const std::vector<ReclaimCandidate>& order, const KVLayout& layout, bool withLookAhead = true);

}  // namespace vat
