// GPU work that may still use a slot's pages: the events recorded by
// release(seq, { stream }). A slot keeps them across reuse (the next sequence
// placed there inherits the pages, so it inherits the fences too); no page of
// the slot is unmapped while one is pending (see reclaim_policy.h).
#pragma once

#include <vector>

#include "backend/backend.h"

namespace vat {

// Why a fence is on the list.
enum class FenceUse : uint8_t {
  Release,  // release(seq, { stream }): GPU work reads the pages
  Copy,     // a share's copy queued on a stream reads or writes the pages: until it
            // has run, no new sequence may be placed in the slot either (it would
            // write where the copy reads, or be overwritten by it)
};

class FenceList {
 public:
  // Records a fence on `stream`; on failure the list is unchanged.
  void record(Backend& backend, uint64_t stream, FenceUse use = FenceUse::Release);
  // Adds a fence recorded already (off the lock); never throws once
  // reserve() made room for it.
  void reserveOne() { fences_.reserve(fences_.size() + 1); }
  void add(FenceHandle fence, FenceUse use) noexcept { fences_.push_back({fence, use}); }
  // A Copy fence is on the list (as of the last pending() or waitAll()).
  bool holdsCopy() const {
    for (const Entry& e : fences_)
      if (e.use == FenceUse::Copy) return true;
    return false;
  }
  // True while a fence has not passed. Fences that have passed are destroyed
  // and dropped; one whose query fails counts as pending (waitAll reports the
  // failure where it matters). Never throws.
  bool pending(Backend& backend) noexcept;
  // Blocks until every fence has passed. Each is destroyed and dropped as
  // soon as it has passed, so a failure part way leaves only those not yet
  // waited for (none is ever destroyed twice).
  void waitAll(Backend& backend);
  // Teardown: waits for each (best effort) and destroys it. Never throws.
  void drain(Backend& backend) noexcept;
  size_t size() const { return fences_.size(); }

 private:
  struct Entry {
    FenceHandle fence;
    FenceUse use;
  };
  std::vector<Entry> fences_;
};

}  // namespace vat
