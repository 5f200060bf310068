#include "core/prefetcher.h"

#include <algorithm>
#include <system_error>

#include "common/errors.h"
#include "common/lifetime.h"

namespace vat {

Prefetcher::~Prefetcher() {
  // The owner stops the worker before destroying it; a thread still joinable
  // here would terminate the process.
  if (worker_.joinable()) worker_.detach();
}

void Prefetcher::start() {
  if (lookAhead_ == 0) return;
  core_.shard(0).backend().injectFault(BackendOp::StartWorker, "std::thread", ErrorCode::Os);
  try {
    worker_ = std::thread([this] { run(); });
  } catch (const std::system_error& e) {
    fail(ErrorCode::Os, std::string("cannot start the prefetch thread: ") + e.what());
  }
  Lock lk(core_.lock);
  started_.wait(lk, [&] { return startedUp_; });
}

void Prefetcher::stop() {
  {
    Lock lk(core_.lock);
    wake();
    workCv_.notify_all();
  }
  if (!worker_.joinable()) return;
  if (processExiting()) worker_.detach();
  else worker_.join();
}

void Prefetcher::wake() {
  ++epoch_;
  if (sleeping_) workCv_.notify_one();
}

// True when the slot's look-ahead is not backed yet.
bool Prefetcher::raiseTarget(Slot& s, uint64_t tokens) {
  uint64_t maxTokens = core_.layout->shape().maxTokens;
  s.prefetchTarget = std::max(s.prefetchTarget, std::min<uint64_t>(maxTokens, tokens + lookAhead_));
  return core_.layout->tokensInGroups(s.groups) < s.prefetchTarget;
}

bool Prefetcher::afterStep(const std::vector<GrowRequest>& batch) {
  if (lookAhead_ == 0) return false;
  bool work = !active_;
  for (const GrowRequest& r : batch) work = raiseTarget(core_.slots[r.seq.slot], r.tokens) || work;
  active_ = true;
  // A new epoch only when there is something to map: most decode steps stay
  // inside pages already backed, and then cost no wake-up at all. A worker
  // that is busy sees the new epoch without a notification (no system call).
  if (!work) return false;
  ++epoch_;
  return sleeping_;
}

bool Prefetcher::afterGrowth(uint32_t slot, uint64_t tokens) {
  if (lookAhead_ == 0 || !raiseTarget(core_.slots[slot], tokens)) return false;
  ++epoch_;
  return sleeping_;
}

bool Prefetcher::waitForIdle(Lock& lk) {
  if (inFlight_ == 0) return false;
  ++demandWaiting_;
  core_.changed.wait(lk, [&] { return core_.closing.load() || inFlight_ == 0; });
  if (--demandWaiting_ == 0) wake();
  return true;
}

// The most urgent active slot below its prefetch target (least backed room
// left ahead of its tokens), one page group at a time, with pages that are
// free: idle or within the budget.
bool Prefetcher::plan(Extension& ext) {
  if (demandWaiting_ > 0) return false;
  const KVLayout& layout = *core_.layout;
  int best = -1;
  uint64_t bestRoom = UINT64_MAX;
  for (uint32_t i = 0; i < core_.slots.size(); ++i) {
    const Slot& s = core_.slots[i];
    if (!s.active || s.extendingNow() || s.prefetchTarget == 0) continue;
    uint64_t backed = layout.tokensInGroups(s.groups);
    if (backed >= s.prefetchTarget || s.groups >= layout.maxGroups()) continue;
    uint64_t room = backed > s.tokens ? backed - s.tokens : 0;
    if (room < bestRoom) {
      bestRoom = room;
      best = static_cast<int>(i);
    }
  }
  starved_ = false;
  if (best < 0) return false;
  uint32_t slot = static_cast<uint32_t>(best);
  if (mapper_.beginExtension(ext, slot, core_.slots[slot].groups + 1, false, Extending::Ahead)) return true;
  starved_ = true;  // memory is full: reclaimAhead may free a group for it
  return false;
}

// Memory full (no room left in the budget) and the look-ahead or the idle
// pages short: unmaps one page group of a released slot, off the lock, so the
// serving loop's step() is not held up by the unmaps. Demand growth still
// reclaims for itself when it gets there first (and waits for a retirement
// in progress when it needs its pages: waitForIdle).
bool Prefetcher::reclaimAhead(Lock& lk) {
  if (!active_ || lowWater_ == 0 || demandWaiting_ > 0) return false;
  // (a device with room in its budget creates instead: topUpPool)
  bool short_ = starved_;
  for (auto& sh : core_.shards) {
    if (sh->pool().headroom() > 0) return false;
    short_ = short_ || sh->pool().idleCount() < lowWater_;
  }
  if (!short_) return false;
  Retirement r;
  // a released slot's tail group; else a released sharer holding a cached
  // prefix (its mappings all go; it frees the pages no one else maps)
  if (!mapper_.beginRetirement(r) && !mapper_.beginDrop(r, true)) return false;
  ++inFlight_;
  mapper_.runRetirement(lk, r);
  --inFlight_;
  core_.changed.notify_all();
  return true;
}

// A released slot's mappings of shared pages (fork, prefix), dropped here
// rather than on the thread that released it.
bool Prefetcher::dropShared(Lock& lk) {
  if (demandWaiting_ > 0) return false;
  Retirement r;
  if (!mapper_.beginDrop(r)) return false;
  ++inFlight_;
  mapper_.runRetirement(lk, r);
  --inFlight_;
  core_.changed.notify_all();
  return true;
}

// Keeps a group's worth of idle pages ready while prefetch is in use, so that
// demand growth rarely pays for page creation.
// One page on the device with the fewest idle pages below the mark.
bool Prefetcher::topUpPool(Lock& lk) {
  if (!active_ || demandWaiting_ > 0) return false;
  DeviceShard* low = nullptr;
  for (auto& sh : core_.shards)
    if (sh->pool().idleCount() < lowWater_ && sh->pool().headroom() > 0 &&
        (!low || sh->pool().idleCount() < low->pool().idleCount()))
      low = sh.get();
  if (!low) return false;
  PagePool& pool = low->pool();
  if (!pool.reserveCreation()) return false;
  ++inFlight_;
  lk.unlock();
  PageHandle handle = 0;
  bool ok = true;
  try {
    handle = low->backend().createPage();
  } catch (...) {
    ok = false;
  }
  lk.lock();
  --inFlight_;
  core_.changed.notify_all();
  if (!ok) {
    pool.cancelCreation();
    errors_++;
    return false;
  }
  pool.putIdle(pool.adopt(handle));
  return true;
}

void Prefetcher::run() {
  bool bound = true;
  try {
    for (auto& sh : core_.shards) {
      sh->backend().injectFault(BackendOp::StartWorker, "binding the prefetch thread", sh->backend().ordinaryError());
      sh->backend().bindThread();
    }
  } catch (const std::exception& e) {
    bound = false;
    Lock lk(core_.lock);
    workerError_ = std::string("the prefetch worker could not bind its thread, prefetch is off: ") + e.what();
  }
  Lock lk(core_.lock);
  startedUp_ = true;
  started_.notify_all();
  if (!bound) return;  // demand still works; stats() and the 'prefetchError' event say why
  while (!core_.closing.load()) {
    if (processExiting()) return;
    uint64_t seen = epoch_;
    bool busy = false;
    try {
      Extension ext;
      if (core_.suspended) {
        // no pages to map or create until resume() (it wakes the worker)
      } else if (dropShared(lk)) {
        busy = true;
      } else if (plan(ext)) {
        busy = true;
        ++inFlight_;
        try {
          mapper_.runExtension(lk, ext, nullptr);
        } catch (...) {
          errors_++;
          core_.slots[ext.slot].prefetchTarget = 0;  // retried when the next step() asks again
        }
        --inFlight_;
        core_.changed.notify_all();
      } else {
        busy = topUpPool(lk) || reclaimAhead(lk);
      }
    } catch (...) {
      // Planning ran out of host memory (under the lock, nothing taken):
      // nothing escapes this thread; try again at the next wake-up.
      errors_++;
      busy = false;
    }
    if (busy) continue;
    sleeping_ = true;
    workCv_.wait(lk, [&] { return core_.closing.load() || epoch_ != seen; });
    sleeping_ = false;
  }
}

}  // namespace vat
