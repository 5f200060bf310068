#include "cache/slot_table.h"

#include <string>

#include "common/errors.h"

namespace vat {

Slot& SlotTable::active(SequenceRef seq) {
  if (seq.slot >= slots_.size()) fail(ErrorCode::InvalidArgument, "no slot " + std::to_string(seq.slot));
  Slot& s = slots_[seq.slot];
  if (!s.active() || s.generation != seq.generation)
    fail(ErrorCode::SequenceReleased, "the sequence in slot " + std::to_string(seq.slot) + " was released");
  return s;
}

bool SlotTable::anyExtending() const {
  for (const Slot& s : slots_)
    if (s.extendingNow()) return true;
  return false;
}

}  // namespace vat
