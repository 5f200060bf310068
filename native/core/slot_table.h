// The sequence slots of a cache: the decisions about them, made once for
// every device. Slot i is one contiguous range in every layer's K and V on
// each device (layout/kv_layout.h); a sequence holds a slot from reserve() to
// release(). A released slot keeps its pages (on every device) for the next
// sequence: deferred reclamation. The pages themselves and their fences are
// each device shard's (device/device_shard.h); a slot holds how many page
// groups are mapped, the same on every device.
//
// A slot's state is one of
//
//   Free      no sequence, no page mapped
//   Retained  no sequence, pages kept (deferred reclamation; reclaimable)
//   Shared    no sequence, pages mapped that another slot maps too
//             (a released sharer): not placeable until its mappings are dropped
//   Active    holds a sequence
//
// and, apart, what runs on it with the lock released (Busy). state() derives
// the first from the fields below; only the transitions in slot_table.cc
// (occupy, vacate, unoccupy) change `active` and `generation`.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace vat {

// A sequence as the caller holds it; stale once its slot is released.
struct SequenceRef {
  uint32_t slot = 0;
  uint32_t generation = 0;
};

// A growth target: the first `tokens` tokens of `seq` backed.
struct GrowRequest {
  SequenceRef seq;
  uint64_t tokens = 0;
};

enum class SlotState : uint8_t { Free, Retained, Shared, Active };

// Work on the slot's pages with the cache's lock released.
enum class Extending : uint8_t {
  No,
  OnDemand,  // growAsync: a caller waits for exactly these pages
  Ahead,     // the prefetch worker's look-ahead or retirement: demand may wait for it to end
  Copying,   // swapOut/swapIn copying its tokens, or a share mapping its pages (source and new slot):
             // nothing unmaps, places or reclaims it
};

struct Slot {
  bool active = false;
  Extending extending = Extending::No;
  uint32_t generation = 0;       // bumped at reserve and release: stale references fail
  uint64_t tokens = 0;           // grown length of the active sequence
  uint64_t prefetchTarget = 0;   // tokens the worker should have backed
  uint64_t releasedAt = 0;       // SlotTable::releaseClock when last released (reclaim-ahead order)
  uint64_t releasedTokens = 0;   // tokens when last released (prefix sharing from a released sequence)
  size_t groups = 0;             // page groups mapped, on every device
  uint32_t contentEpoch = 0;     // bumped when a sequence is placed: what the pages held before is gone
  // Released while holding pages another slot maps too: it must not be
  // reused (a new sequence would write into the other's pages) and its
  // mappings go as soon as its fences have passed.
  bool dropPending = false;
  // A share's copy queued on a stream reads or writes its pages (a Copy
  // fence on some device): no new sequence here until it ran. Cleared by
  // KVCache::settleCopyFences once no device holds one.
  bool copyFenced = false;
  // Released while a suspend or resume moved pages (KVCache::vacate): what
  // a release does to its pages waits for the move's end, and so does a new
  // sequence here.
  bool settling = false;

  SlotState state() const {
    if (active) return SlotState::Active;
    if (dropPending) return SlotState::Shared;
    return groups > 0 ? SlotState::Retained : SlotState::Free;
  }
  bool extendingNow() const { return extending != Extending::No; }
  // The one definition of "a new sequence may be placed here now" (placement,
  // reserve into a chosen slot, share): no sequence, no shared mappings left,
  // nothing copying its pages off the lock, no share's copy still queued, no
  // release waiting for a move's end.
  bool placeable() const {
    SlotState s = state();
    return (s == SlotState::Free || s == SlotState::Retained) && extending != Extending::Copying && !copyFenced &&
           !settling;
  }
};

class SlotTable {
 public:
  explicit SlotTable(uint32_t count) : slots_(count) {}

  uint32_t size() const { return static_cast<uint32_t>(slots_.size()); }
  Slot& operator[](uint32_t i) { return slots_[i]; }
  const Slot& operator[](uint32_t i) const { return slots_[i]; }

  // The slot of a live sequence; ERR_INVALID_ARGUMENT / ERR_SEQUENCE_RELEASED otherwise.
  Slot& active(SequenceRef seq);
  bool anyExtending() const;

  // ---- transitions (the only writers of `active` and `generation`)
  // A new sequence in slot i: active, tokens 0; returns its reference.
  SequenceRef occupy(uint32_t i);
  // The undo of occupy(): vacant again with the generation it had, as if no
  // sequence had been placed.
  void unoccupy(uint32_t i);
  // The sequence ends: vacant, released length and time noted.
  void vacate(uint32_t i);
  // After a change wrote into the slot's pages (a cancelled share or swapIn):
  // vacant with generation `generation`, and no released sequence to share from.
  void vacateAs(uint32_t i, uint32_t generation);

 private:
  std::vector<Slot> slots_;
  uint64_t releaseClock_ = 0;  // bumped at every release
};

}  // namespace vat
