// The sequence slots of a cache. Slot i is one contiguous range in every
// layer's K and V (see layout/kv_layout.h); a sequence holds a slot from
// reserve() to release(). A released slot keeps its pages and fences:
// deferred reclamation.
#pragma once

#include <cstdint>
#include <vector>

#include "cache/fence_list.h"
#include "pool/page_pool.h"

namespace vat {

// A sequence as the caller holds it; stale once its slot is released.
struct SequenceRef {
  uint32_t slot = 0;
  uint32_t generation = 0;
};

enum class SlotState : uint8_t {
  Vacant,  // no sequence (it may still hold the pages of the last one)
  Active,  // holds a sequence
};

// Whether groups of the slot are being mapped with the cache's lock released.
enum class Extending : uint8_t {
  No,
  OnDemand,  // growAsync: a caller waits for exactly these pages
  Ahead,     // the prefetch worker's look-ahead: demand may wait for it to end
  Copying,   // swapOut/swapIn copying its tokens, or a share mapping its pages (source and new slot),
             // with the lock released: nothing unmaps, places or reclaims it
};

struct Slot {
  SlotState state = SlotState::Vacant;
  Extending extending = Extending::No;
  uint32_t generation = 0;       // bumped at reserve and release: stale references fail
  uint64_t tokens = 0;           // grown length of the active sequence
  uint64_t prefetchTarget = 0;   // tokens the worker should have backed
  uint64_t releasedAt = 0;       // SlotTable::releaseClock when last released (reclaim-ahead order)
  uint64_t releasedTokens = 0;   // tokens when last released (prefix sharing from a released sequence)
  // Released while holding pages another slot maps too: it must not be
  // reused (a new sequence would write into the other's pages) and its
  // mappings go as soon as its fences have passed (KVCache::dropShared).
  bool dropPending = false;
  std::vector<PageId> pages;     // mapped, group-major
  FenceList fences;

  bool active() const { return state == SlotState::Active; }
  bool extendingNow() const { return extending != Extending::No; }
  // A new sequence may be placed here now: no sequence, no pages shared
  // with another slot still mapped (dropPending), no swap or share using the
  // pages off the lock (Copying), no share's copy still queued on a stream.
  // (A copy fence is seen as passed only once fences.pending() dropped it.)
  bool placeable() const {
    return !active() && !dropPending && extending != Extending::Copying && !fences.holdsCopy();
  }
};

class SlotTable {
 public:
  SlotTable(uint32_t count, size_t pagesPerGroup) : slots_(count), pagesPerGroup_(pagesPerGroup) {}

  uint32_t size() const { return static_cast<uint32_t>(slots_.size()); }
  Slot& operator[](uint32_t i) { return slots_[i]; }
  const Slot& operator[](uint32_t i) const { return slots_[i]; }
  uint32_t indexOf(const Slot& s) const { return static_cast<uint32_t>(&s - slots_.data()); }

  size_t groupsOf(const Slot& s) const { return s.pages.size() / pagesPerGroup_; }
  // The slot of a live sequence; ERR_INVALID_ARGUMENT / ERR_SEQUENCE_RELEASED otherwise.
  Slot& active(SequenceRef seq);
  bool anyExtending() const;
  uint64_t releaseClock = 0;  // bumped at every release
  // Teardown: every slot dropped (its fences must be drained first).
  void clear() { slots_.clear(); }

 private:
  std::vector<Slot> slots_;
  size_t pagesPerGroup_;
};

}  // namespace vat
