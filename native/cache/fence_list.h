// GPU work that may still use a slot's pages: the events recorded by
// release(seq, { stream }). A slot keeps them across reuse (the next sequence
// placed there inherits the pages, so it inherits the fences too); no page of
// the slot is unmapped while one is pending (see reclaim_policy.h).
#pragma once

#include <vector>

#include "backend/backend.h"

namespace vat {

class FenceList {
 public:
  // Records a fence on `stream`; on failure the list is unchanged.
  void record(Backend& backend, uint64_t stream);
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
  std::vector<FenceHandle> fences_;
};

}  // namespace vat
