// What a refusal waits for first: the one ladder, in one order, for every
// path that would refuse for want of pages (grow, step, growAsync, share's
// fresh pages) or of a slot (reserve, share). Each rung either finds nothing
// to wait for (false: the next rung) or waits / frees something and returns
// true: the caller decides again from the slots as they are then. Only when
// every rung is empty is the refusal final.
#include "core/kv_cache.h"

namespace vat {

bool KVCache::waitBeforeRefusing(Lock& lk, Short what, uint64_t missing, uint64_t obtainable) {
  // 1. The worker holds pages or a slot off the lock. Demand wins: it
  //    starts nothing new while a caller waits here.
  if (prefetcher_->waitForIdle(lk)) return true;
  // 2. Pages being unmapped off the lock (retirements) come back idle.
  if (mapper_->waitForRetirements(lk)) return true;
  // 3. Released sharers whose fences passed drop their mappings here rather
  //    than on the worker (a slot: after waiting for their fences).
  if (sweepDropPending(what == Short::Slot, true)) return true;
  // 4. GPU work: pages — released sharers' fences, when their pages would
  //    make up the shortfall; a slot — a share's copy still queued.
  if (what == Short::Pages) return waitForDroppable(missing, obtainable);
  return settleCopyFences(true);
}

// A growth short of pages: when the released sharers' pages (their fences
// pending) would make up the difference, waits for those fences and drops
// the mappings; true when it did.
bool KVCache::waitForDroppable(uint64_t missing, uint64_t obtainable) {
  uint64_t droppable = mapper_->droppablePages();
  if (droppable == 0 || missing > obtainable + droppable) return false;
  return sweepDropPending(true, true);
}

}  // namespace vat
