#include "core/slot_table.h"

#include <string>

#include "common/errors.h"

namespace vat {

Slot& SlotTable::active(SequenceRef seq) {
  if (seq.slot >= slots_.size()) fail(ErrorCode::InvalidArgument, "no slot " + std::to_string(seq.slot));
  Slot& s = slots_[seq.slot];
  if (!s.active || s.generation != seq.generation)
    fail(ErrorCode::SequenceReleased, "the sequence in slot " + std::to_string(seq.slot) + " was released");
  return s;
}

bool SlotTable::anyExtending() const {
  for (const Slot& s : slots_)
    if (s.extendingNow()) return true;
  return false;
}

SequenceRef SlotTable::occupy(uint32_t i) {
  Slot& s = slots_[i];
  s.active = true;
  s.dropPending = false;  // (a released sharer's slot taken as it is: its own sequence now)
  s.generation++;
  s.contentEpoch++;
  s.tokens = 0;
  s.prefetchTarget = 0;
  return {i, s.generation};
}

void SlotTable::unoccupy(uint32_t i) {
  Slot& s = slots_[i];
  s.active = false;
  s.generation--;
  s.tokens = 0;
  s.prefetchTarget = 0;
}

void SlotTable::vacate(uint32_t i) {
  Slot& s = slots_[i];
  s.active = false;
  s.generation++;
  s.prefetchTarget = 0;
  s.releasedAt = ++releaseClock_;
  s.releasedTokens = s.tokens;
  s.tokens = 0;
}

void SlotTable::vacateAs(uint32_t i, uint32_t generation) {
  vacate(i);
  slots_[i].generation = generation;
  slots_[i].releasedTokens = 0;
}

}  // namespace vat
