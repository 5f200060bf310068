// suspend / resume of the whole cache, on every device: every physical page
// back to the backends, every address kept (see moves.cc for the host side
// and pool/page_pool.h for a page's Suspended state).
#include <algorithm>

#include "common/errors.h"
#include "core/kv_cache.h"
#include "core/transfer_stream.h"

namespace vat {

// Waits until no extension, retirement, copy or worker task runs off the lock.
void KVCache::waitForQuiet(Lock& lk) {
  core_->changed.wait(lk, [&] {
    return core_->closing.load() || (!core_->slots.anyExtending() && prefetcher_->idle());
  });
  checkOpen();
}

// What a suspended cache does not keep: released slots' pages (deferred
// reclamation: no live token), active sequences' pages past their tokens
// (look-ahead), idle pages. Fences have passed. The unmaps (retirements)
// and the releases run with the lock released.
void KVCache::dropUnkeptPages(Lock& lk) {
  const KVLayout& layout = *core_->layout;
  for (uint32_t i = 0; i < core_->slots.size(); ++i) {
    Slot& s = core_->slots[i];
    size_t keep = s.active ? layout.groupsForTokens(s.tokens) : 0;
    if (!s.active) s.dropPending = false;  // nothing of it is shared once its pages went
    if (s.groups <= keep) continue;
    if (s.active) s.prefetchTarget = 0;
    Retirement r;
    mapper_->detachBeyond(r, i, keep);
    mapper_->runRetirement(lk, r);
  }
  for (auto& sh : core_->shards) {
    PagePool& pool = sh->pool();
    for (PageId id; (id = pool.takeIdleToRelease()) != PagePool::kNone;) {
      PageHandle handle = pool.page(id).handle;
      try {
        Unlocked off(lk);
        sh->backend().releasePage(handle);
      } catch (...) {
        pool.putIdle(id);  // kept, idle: the suspend is refused
        throw;
      }
      pool.noteReleased(id);
    }
  }
}

// Each physical page of device d in `state` mapped by a slot, once (a shared
// page is in several slots' lists).
std::vector<PageId> KVCache::distinctMappedPages(size_t device, PageState state) {
  DeviceShard& sh = core_->shard(device);
  std::vector<PageId> out;
  for (uint32_t i = 0; i < core_->slots.size(); ++i)
    for (PageId id : sh.slot(i).pages)
      if (sh.pool().page(id).state == state) out.push_back(id);
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

// The suspended pages' bytes to the host copy (suspend: every page) or back
// (resume: pages `only[d]`, indexes into suspendedPages_[d]), every device's
// copies queued before any is waited for. Page k is at byte k × page size.
void KVCache::copySuspended(bool toHost, const std::vector<std::vector<size_t>>* only) {
  std::vector<std::unique_ptr<TransferStream>> streams(core_->deviceCount());
  core_->onEachDevice([&](size_t d) {
    DeviceShard& sh = core_->shard(d);
    if (suspendedCopy_[d].blocks.empty()) return;
    streams[d] = std::make_unique<TransferStream>(sh.backend());
    uint64_t ps = sh.pool().pageSize();
    auto copy = [&](size_t k) {
      transferBlocks(sh.backend(), toHost, sh.pool().page(suspendedPages_[d][k]).address, suspendedCopy_[d], k * ps,
                     ps, sh.host().blockBytes(), streams[d]->get());
    };
    if (only) {
      for (size_t k : (*only)[d]) copy(k);
    } else {
      for (size_t k = 0; k < suspendedPages_[d].size(); ++k) copy(k);
    }
  });
  core_->onEachDevice([&](size_t d) {
    if (streams[d]) streams[d]->finish();
  });
}

// suspend and resume hold the lock only between pages: the driver work of
// each page and the host copy run with it released, so that stats(),
// reserve() and release() on other threads (the JS thread) wait for one
// page at most, not for the whole cache.
void KVCache::suspend(bool keepHost) {
  Lock lk(core_->lock);
  waitForStillPages(lk);
  checkOpen();
  checkNotSuspended();
  core_->suspended = true;  // from here growth fails and the worker idles
  pagesMoving_ = true;
  struct EndMove {
    KVCache& cache;
    ~EndMove() { cache.endMove(); }  // under the lock: every path below holds it when it leaves
  } end{*this};
  bool pagesGoing = false;
  try {
    waitForQuiet(lk);
    for (uint32_t i = 0; i < core_->slots.size(); ++i) core_->waitFences(i);
    mapper_->retryStranded();
    dropUnkeptPages(lk);
    for (size_t d = 0; d < core_->deviceCount(); ++d) suspendedPages_[d] = distinctMappedPages(d, PageState::Accessible);
    if (keepHost) {
      core_->onEachDevice([&](size_t d) {
        DeviceShard& sh = core_->shard(d);
        if (!suspendedPages_[d].empty())
          suspendedCopy_[d] = sh.host().take(suspendedPages_[d].size() * sh.pool().pageSize(), "suspend({ keep: 'host' })");
      });
      Unlocked off(lk);  // the pages stay put: nothing maps, unmaps or writes while suspended
      copySuspended(true, nullptr);
    }
    // Failing from here leaves the cache suspended in part: resume() backs
    // what went (and restores it from the host copy).
    pagesGoing = true;
    if (!keepHost) core_->prefix->clear();  // the KV goes: nothing published holds any more
    core_->onEachDevice([&](size_t d) {
      for (PageId id : suspendedPages_[d]) suspendOffLock(lk, d, id);
    });
  } catch (const Error& e) {
    core_->changed.notify_all();
    if (!pagesGoing) {
      undoSuspend();
      throw;
    }
    // Some pages went (with their bytes, under keep: 'none'): resuming as if
    // whole would hand back memory whose contents are gone.
    throw withMessage(e, std::string(e.what()) + "; the cache is suspended in part" +
                             (keepHost ? "" : " (pages that went dropped their KV)") +
                             ": resume() backs every device again");
  } catch (...) {
    core_->changed.notify_all();
    if (!pagesGoing) undoSuspend();
    throw;
  }
}

// A suspend refused before any page went: the cache is as it was.
void KVCache::undoSuspend() {
  giveHost(suspendedCopy_);
  for (auto& pages : suspendedPages_) pages.clear();
  core_->suspended = false;
  prefetcher_->wake();
}

// Another suspend or resume is moving pages: it ends first (or the cache closes).
void KVCache::waitForStillPages(Lock& lk) {
  core_->changed.wait(lk, [&] { return core_->closing.load() || !pagesMoving_; });
}

// Under the lock: the slots released while pages moved get what a release
// gives them now (suspended: their pages dropped; else kept or, shared, dropped).
void KVCache::endMove() noexcept {
  pagesMoving_ = false;
  for (uint32_t i = 0; i < core_->slots.size(); ++i) {
    Slot& s = core_->slots[i];
    if (!s.settling) continue;
    s.settling = false;
    settleVacated(i);
  }
  core_->changed.notify_all();
}

// One page of device d: checked and recorded under the lock, its driver
// calls without it. Stops when the cache is closing (close waits for the move).
void KVCache::suspendOffLock(Lock& lk, size_t device, PageId id) {
  if (core_->closing.load()) fail(ErrorCode::Closed, "the KV cache was closed while it was being suspended");
  PagePool& pool = core_->shard(device).pool();
  pool.beginSuspend(id);
  const Page& page = *pool.record(id);
  PagePool::Move move;
  {
    Unlocked off(lk);
    move = pool.suspendMemory(page);
  }
  pool.noteSuspended(id, move);
}

void KVCache::resumeOffLock(Lock& lk, size_t device, PageId id) {
  if (core_->closing.load()) fail(ErrorCode::Closed, "the KV cache was closed while it was being resumed");
  PagePool& pool = core_->shard(device).pool();
  bool kept = pool.beginResume(id);
  const Page& page = *pool.record(id);
  PagePool::Move move;
  {
    Unlocked off(lk);
    move = pool.resumeMemory(page, kept);
  }
  pool.noteResumed(id, kept, move);
}

void KVCache::resume() {
  Lock lk(core_->lock);
  waitForStillPages(lk);
  checkOpen();
  if (!core_->suspended) return;
  pagesMoving_ = true;
  struct EndMove {
    KVCache& cache;
    ~EndMove() { cache.endMove(); }
  } end{*this};
  mapper_->retryStranded();  // a mapping an earlier resume's undo left where this one maps
  std::vector<std::vector<size_t>> resumed(core_->deviceCount());  // indexes into suspendedPages_[d]
  try {
    for (size_t d = 0; d < resumed.size(); ++d) resumed[d].reserve(suspendedPages_[d].size());
    core_->onEachDevice([&](size_t d) {
      PagePool& pool = core_->shard(d).pool();
      for (size_t k = 0; k < suspendedPages_[d].size(); ++k) {
        // A page whose sequences were all released while suspended is gone.
        if (!pool.isSuspended(suspendedPages_[d][k])) continue;
        resumeOffLock(lk, d, suspendedPages_[d][k]);
        resumed[d].push_back(k);
      }
    });
    // Backed by an earlier resume whose undo could not suspend them: their
    // bytes come back with the others' (unless released since).
    for (size_t d = 0; d < resumed.size(); ++d)
      for (size_t k : resumedUnrestored_[d])
        if (core_->shard(d).pool().page(suspendedPages_[d][k]).state == PageState::Accessible) resumed[d].push_back(k);
    Unlocked off(lk);
    copySuspended(false, &resumed);
  } catch (...) {
    for (size_t d = resumed.size(); d-- > 0;) {
      PagePool& pool = core_->shard(d).pool();
      for (size_t j = resumed[d].size(); j-- > 0;) {
        size_t k = resumed[d][j];
        PageId id = suspendedPages_[d][k];
        if (pool.page(id).state != PageState::Accessible) continue;
        try {
          pool.suspendPage(id);
        } catch (...) {
          // Still mapped, bytes not restored: recorded for the next resume
          // (a page the suspend kept, memoryKept, is Suspended and resumes as any).
          if (pool.page(id).state == PageState::Accessible) noteUnrestored(d, k);
        }
      }
    }
    throw;
  }
  giveHost(suspendedCopy_);
  for (auto& pages : suspendedPages_) pages.clear();
  for (auto& pages : resumedUnrestored_) pages.clear();
  core_->suspended = false;
  prefetcher_->wake();
  core_->changed.notify_all();
}

void KVCache::noteUnrestored(size_t device, size_t k) noexcept {
  std::vector<size_t>& list = resumedUnrestored_[device];
  if (std::find(list.begin(), list.end(), k) != list.end()) return;
  try {
    list.push_back(k);
  } catch (...) {
    // No memory for the record: the page stays mapped with the bytes the
    // failed resume left; nothing else can be done without memory.
  }
}

// Teardown (under the lock): the records of host memory go; the blocks
// themselves go back with each shard's host pool.
void KVCache::freeHostMemory() {
  swapped_.clear();
  for (HostBlocks& b : suspendedCopy_) b = {};
  for (auto& pages : suspendedPages_) pages.clear();
  for (auto& pages : resumedUnrestored_) pages.clear();
}

}  // namespace vat
