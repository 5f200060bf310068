// The prefetcher: one worker thread per cache (whatever the number of
// devices: the driver serialises mapping across the GPUs of a process) that maps, while the GPU
// computes, the look-ahead step() asks for (tokens + lookAhead of each
// stepped sequence), one page group at a time, and keeps `idleGroups` page
// groups idle in the pool: creating pages within the budget, or — when the
// budget is full (the normal state of a busy server, deferred reclamation
// keeping released slots mapped) — reclaiming released slots ahead of need,
// least recently released first, only those whose fences have passed (it
// never waits for a fence). So the serving loop's step() finds pages ready
// instead of unmapping on its own thread. It never holds demand up: a growth
// that would be refused while the worker holds pages off the lock waits for
// it (waitForIdle), and the worker starts nothing new meanwhile.
//
// Every wait of the worker has its predicate (closing, or a new wake-up
// epoch), so a wake-up sent while it was off the lock is never lost.
#pragma once

#include <condition_variable>
#include <string>
#include <thread>
#include <vector>

#include "core/page_mapper.h"
#include "core/state.h"

namespace vat {

class Prefetcher {
 public:
  Prefetcher(CacheCore& core, PageMapper& mapper, uint32_t lookAheadTokens, uint32_t idleGroups)
      : core_(core), mapper_(mapper), lookAhead_(lookAheadTokens), lowWater_(uint64_t{idleGroups} * core.layout->pagesPerGroup()) {}
  ~Prefetcher();

  // Starts the worker and waits until it has bound its thread. Throws ERR_OS
  // when the thread cannot start. No-op with a look-ahead of 0.
  void start();
  // Stops the worker (the lock must not be held). Once the process is
  // exiting the worker may be inside a driver call: it is detached.
  void stop();

  // Under the lock. After a step: raises the batch's targets and, when there
  // is something to map (most steps: nothing), gives the worker a new epoch.
  // True when the worker sleeps and must be notified: the caller does it
  // with notifyWorker() after unlocking, so the woken thread does not run
  // into the lock the serving thread still holds.
  [[nodiscard]] bool afterStep(const std::vector<GrowRequest>& batch);
  // A growth on another thread (growAsync) backed `tokens`: the sequence is
  // about to decode, so the worker maps its look-ahead from now on rather
  // than from its first step. Same return as afterStep.
  [[nodiscard]] bool afterGrowth(uint32_t slot, uint64_t tokens);
  // Without the lock, after afterStep/afterGrowth returned true.
  void notifyWorker() { workCv_.notify_one(); }
  // Under the lock: something changed that may give the worker work.
  void wake();
  // Under the lock: the pool was trimmed; no top-up until the next step.
  void pause() { active_ = false; }
  // Under the lock. Demand wins: while the worker holds pages off the lock,
  // waits until it is done and returns true (the caller decides again);
  // returns false at once when it holds none.
  bool waitForIdle(Lock& lk);

  uint32_t lookAhead() const { return lookAhead_; }
  uint64_t errors() const { return errors_; }
  const std::string& workerError() const { return workerError_; }

  // No extension, top-up or reclaim of the worker runs off the lock now.
  bool idle() const { return inFlight_ == 0; }
  // The worker runs (prefetch on, its thread bound): released slots' shared
  // mappings can be left to it.
  bool running() const { return lookAhead_ > 0 && startedUp_ && workerError_.empty(); }

 private:
  void run();
  bool plan(Extension& ext);
  bool raiseTarget(Slot& s, uint64_t tokens);
  bool topUpPool(Lock& lk);
  bool reclaimAhead(Lock& lk);
  bool dropShared(Lock& lk);

  CacheCore& core_;
  PageMapper& mapper_;
  uint32_t lookAhead_;
  uint64_t lowWater_;             // idle pages kept ready while prefetch is active
  bool starved_ = false;          // the last plan wanted a group and found no free pages
  std::condition_variable workCv_;
  std::condition_variable started_;
  std::thread worker_;
  bool startedUp_ = false;
  bool sleeping_ = false;         // the worker waits on workCv_ (a wake-up must notify it)
  bool active_ = false;           // step() has run since the last pause()
  uint64_t epoch_ = 0;            // bumped with every wake-up (the worker's wait predicate)
  uint32_t demandWaiting_ = 0;    // callers in waitForIdle: the worker starts nothing new
  uint32_t inFlight_ = 0;         // worker extensions and top-ups running off the lock
  uint64_t errors_ = 0;           // extensions and top-ups that failed (retried at the next step)
  std::string workerError_;       // why the worker could not start (prefetch off), or empty
};

}  // namespace vat
