// Moving KV out of device memory and back: swapOut/swapIn of one sequence,
// suspend/resume of the whole cache. The host memory both use is counted
// against CacheOptions::hostMemoryBudget (pool/host_block_pool.h: blocks kept
// for reuse) and freed by trim() and close().
//
// Copies run with the cache's lock released (a swap of a long sequence takes
// milliseconds; the serving loop's step() must not wait for it): the slot
// being copied is marked Extending::Copying, which keeps every path that
// unmaps, places or closes away from it, as an extension does.
#include <algorithm>

#include "cache/kv_cache.h"
#include "common/errors.h"

namespace vat {

namespace {

// A stream of the backend's own for one operation's transfers.
class TransferStream {
 public:
  explicit TransferStream(Backend& backend) : backend_(backend), stream_(backend.createStream()) {}
  // Also on a failure path: the copies queued so far run to their end before
  // the host blocks, pages or slot they use are given back by the caller's undo.
  ~TransferStream() {
    try {
      backend_.syncStream(stream_);
    } catch (...) {
      // the device is lost (a sticky CUDA error): nothing runs on it any more
    }
    backend_.destroyStream(stream_);
  }
  TransferStream(const TransferStream&) = delete;
  TransferStream& operator=(const TransferStream&) = delete;
  uint64_t get() const { return stream_; }
  void finish() { backend_.syncStream(stream_); }

 private:
  Backend& backend_;
  uint64_t stream_;
};

}  // namespace

void KVCache::checkNotSuspended() const {
  if (core_->suspended) fail(ErrorCode::Suspended, "the KV cache is suspended: resume() it first");
}

// The slot's first `tokens` tokens of every tensor, packed on the host tensor
// after tensor: each tensor's rows of a slot are contiguous, so a layout with
// G layer groups needs 2 × G copies whatever the model.
void KVCache::copySlotTokens(uint32_t slot, uint64_t tokens, const HostBlocks& host, bool toHost) {
  if (tokens == 0) return;
  const KVLayout& layout = *core_->layout;
  Backend& backend = core_->backend();
  uint32_t layersPerGroup = layout.shape().layers / layout.layerGroups();
  uint64_t bytes = tokens * layout.tokenPitch();
  uint64_t offset = 0;
  TransferStream stream(backend);
  for (uint32_t g = 0; g < layout.layerGroups(); ++g) {
    for (KVKind kind : {KVKind::K, KVKind::V}) {
      Address at = core_->device.base() + layout.tokenOffset(slot, g * layersPerGroup, kind, 0);
      transferBlocks(backend, toHost, at, host, offset, bytes, hostPool_->blockBytes(), stream.get());
      offset += bytes;
    }
  }
  stream.finish();
}

uint64_t KVCache::swapOut(SequenceRef seq, std::optional<uint64_t> fenceStream, bool keepSequence) {
  Lock lk(core_->lock);
  activeSlot(seq);
  checkNotSuspended();
  // The worker may be mapping the sequence's look-ahead: its pages stay.
  core_->changed.wait(lk, [&] { return core_->closing.load() || !core_->slots[seq.slot].extendingNow(); });
  Slot& s = activeSlot(seq);
  checkNotSuspended();
  Backend& backend = core_->backend();
  uint64_t tokens = s.tokens, bytes = tokens * core_->layout->bytesPerToken();
  FenceHandle fence = 0;
  if (fenceStream) fence = backend.recordFence(*fenceStream);
  // From here the caller's reference is stale (its generation), and nothing
  // unmaps the slot (Copying) until the copy has ended either way.
  uint32_t generation = s.generation++;
  s.extending = Extending::Copying;
  lk.unlock();
  HostBlocks host;
  try {
    host = hostPool_->take(bytes, "swapOut");
    if (fence) backend.waitFence(fence);
    copySlotTokens(seq.slot, tokens, host, true);
  } catch (...) {
    hostPool_->give(host);
    lk.lock();
    if (fence) backend.destroyFence(fence);
    s.generation = generation;
    s.extending = Extending::No;
    core_->changed.notify_all();
    throw;
  }
  lk.lock();
  if (fence) backend.destroyFence(fence);
  s.extending = Extending::No;
  if (keepSequence) s.generation = generation;
  else vacate(seq.slot);
  uint64_t handle = nextSwapHandle_++;
  swapped_[handle] = {std::move(host), tokens, false};
  hostStats_.swapOuts++;
  core_->changed.notify_all();
  return handle;
}

SequenceRef KVCache::swapIn(uint64_t handle, std::optional<uint32_t> intoSlot, bool keepCopy) {
  Lock lk(core_->lock);
  checkOpen();
  checkNotSuspended();
  auto it = swapped_.find(handle);
  if (it == swapped_.end())
    fail(ErrorCode::InvalidArgument, "swapped: this swapped-out sequence was swapped in or discarded already");
  if (it->second.swappingIn) fail(ErrorCode::InvalidArgument, "swapped: a swapIn of it is already running");
  it->second.swappingIn = true;
  const HostBlocks& host = it->second.host;  // stays put: the entry is not erased while swappingIn
  uint64_t tokens = it->second.tokens;
  lk.unlock();
  std::optional<SequenceRef> seq;
  try {
    seq = intoSlot ? reserveAt(*intoSlot) : reserve(tokens);
    growDetached(*seq, tokens, nullptr);
    lk.lock();
    // The growth asked the worker for the look-ahead, which it may be
    // mapping now: the slot becomes ours (Copying) only once that ended.
    core_->changed.wait(lk, [&] { return core_->closing.load() || !core_->slots[seq->slot].extendingNow(); });
    Slot& s = activeSlot(*seq);
    checkNotSuspended();
    s.extending = Extending::Copying;
    lk.unlock();
    try {
      copySlotTokens(seq->slot, tokens, host, false);
    } catch (...) {
      lk.lock();
      s.extending = Extending::No;
      core_->changed.notify_all();
      throw;
    }
    lk.lock();
    s.extending = Extending::No;
  } catch (...) {
    if (!lk.owns_lock()) lk.lock();
    if (seq && core_->slots.size() > seq->slot) {
      Slot& s = core_->slots[seq->slot];
      if (s.active() && s.generation == seq->generation) {
        if (s.tokens == 0) {
          // Refused before anything was copied (no memory): the slot as it
          // was, generation and released sequence included.
          unoccupy(seq->slot);
        } else {
          vacate(seq->slot);
          // the copy wrote part of the swapped tokens here: what a released
          // sequence left in the slot is gone (no prefix source any more)
          s.releasedTokens = 0;
          // a cache over several devices (keepCopy): the slot's generation as
          // before, as on the other devices (cancelSwapIn)
          if (keepCopy) s.generation = seq->generation - 1;
        }
      }
    }
    auto again = swapped_.find(handle);
    if (again != swapped_.end()) again->second.swappingIn = false;
    core_->changed.notify_all();
    throw;
  }
  auto done = swapped_.find(handle);
  if (keepCopy) {
    done->second.swappingIn = false;
  } else {
    hostPool_->give(done->second.host);
    swapped_.erase(done);
  }
  hostStats_.swapIns++;
  core_->changed.notify_all();
  return *seq;
}

void KVCache::cancelSwapIn(SequenceRef seq) noexcept {
  Lock lk(core_->lock);
  if (core_->closed || seq.slot >= core_->slots.size()) return;
  Slot& s = core_->slots[seq.slot];
  // the prefetch worker may be mapping its look-ahead (the growth raised it): let it end
  core_->changed.wait(lk, [&] { return core_->closing.load() || !s.extendingNow(); });
  if (core_->closed || !s.active() || s.generation != seq.generation || s.extendingNow()) return;
  vacate(seq.slot);  // its pages stay mapped there (deferred reclamation)
  s.generation = seq.generation - 1;
  s.releasedTokens = 0;  // they hold the swapped tokens now, not a released sequence's
  hostStats_.swapIns--;
}

void KVCache::cancelSwapOut(uint64_t handle) {
  Lock lk(core_->lock);
  auto it = swapped_.find(handle);
  if (it == swapped_.end() || it->second.swappingIn) return;
  hostStats_.swapOuts--;
  HostBlocks host = std::move(it->second.host);
  swapped_.erase(it);
  hostPool_->give(host);
}

uint64_t KVCache::swappedTokens(uint64_t handle) {
  Lock lk(core_->lock);
  auto it = swapped_.find(handle);
  return it == swapped_.end() ? 0 : it->second.tokens;
}

void KVCache::discardSwapped(uint64_t handle) {
  Lock lk(core_->lock);
  checkOpen();
  auto it = swapped_.find(handle);
  if (it == swapped_.end()) return;  // swapped in or discarded already: nothing to free
  if (it->second.swappingIn) fail(ErrorCode::InvalidArgument, "swapped: a swapIn of it is running");
  hostPool_->give(it->second.host);
  swapped_.erase(it);
}

// ---- suspend and resume --------------------------------------------------------

// Waits until no extension, retirement, copy or worker task runs off the lock.
void KVCache::waitForQuiet(Lock& lk) {
  core_->changed.wait(lk, [&] {
    return core_->closing.load() || (!core_->slots.anyExtending() && prefetcher_->idle());
  });
  checkOpen();
}

// What a suspended cache does not keep: released slots' pages (deferred
// reclamation: no live token), active sequences' pages past their tokens
// (look-ahead), idle pages. Fences have passed.
void KVCache::dropUnkeptPages() {
  const KVLayout& layout = *core_->layout;
  PagePool& pool = core_->pool();
  size_t per = layout.pagesPerGroup();
  for (uint32_t i = 0; i < core_->slots.size(); ++i) {
    Slot& s = core_->slots[i];
    if (!s.active()) {
      dropMappings(i);
      continue;
    }
    size_t keep = layout.groupsForTokens(s.tokens) * per;
    while (s.pages.size() > keep) {
      size_t k = s.pages.size() - 1;
      PageId id = s.pages[k];
      if (pool.unmapAt(id, core_->device.base() + layout.pageOffset(i, k / per, k % per))) pool.putIdle(id);
      s.pages.pop_back();
      s.prefetchTarget = 0;
    }
  }
  pool.trim(UINT64_MAX);
}

// Each physical page in `state` mapped by a slot, once (a shared page is in
// several slots' lists).
std::vector<PageId> KVCache::distinctMappedPages(PageState state) {
  PagePool& pool = core_->pool();
  std::vector<PageId> out;
  for (uint32_t i = 0; i < core_->slots.size(); ++i)
    for (PageId id : core_->slots[i].pages)
      if (pool.page(id).state == state) out.push_back(id);
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

void KVCache::suspend(bool keepHost) {
  Lock lk(core_->lock);
  checkOpen();
  checkNotSuspended();
  core_->suspended = true;  // from here growth fails and the worker idles
  Backend& backend = core_->backend();
  PagePool& pool = core_->pool();
  bool pagesGoing = false;
  try {
    waitForQuiet(lk);
    for (uint32_t i = 0; i < core_->slots.size(); ++i) core_->slots[i].fences.waitAll(backend);
    mapper_->retryStranded();
    dropUnkeptPages();
    suspendedPages_ = distinctMappedPages(PageState::Accessible);
    if (keepHost && !suspendedPages_.empty()) {
      suspendedCopy_ = hostPool_->take(suspendedPages_.size() * pool.pageSize(), "suspend({ keep: 'host' })");
      TransferStream stream(backend);
      for (size_t k = 0; k < suspendedPages_.size(); ++k)
        transferBlocks(backend, true, pool.page(suspendedPages_[k]).address, suspendedCopy_, k * pool.pageSize(),
                       pool.pageSize(), hostPool_->blockBytes(), stream.get());
      stream.finish();
    }
    // Failing from here leaves the cache suspended in part: resume() backs
    // what went (and restores it from the host copy).
    pagesGoing = true;
    for (PageId id : suspendedPages_) pool.suspendPage(id);
  } catch (...) {
    if (!pagesGoing) {
      hostPool_->give(suspendedCopy_);
      suspendedPages_.clear();
      core_->suspended = false;
      prefetcher_->wake();
    }
    core_->changed.notify_all();
    throw;
  }
}

void KVCache::resume() {
  Lock lk(core_->lock);
  checkOpen();
  if (!core_->suspended) return;
  Backend& backend = core_->backend();
  PagePool& pool = core_->pool();
  mapper_->retryStranded();  // a mapping an earlier resume's undo left where this one maps
  std::vector<size_t> resumed;  // indexes into suspendedPages_
  try {
    for (size_t k = 0; k < suspendedPages_.size(); ++k) {
      PageId id = suspendedPages_[k];
      // A page whose sequences were all released while suspended is gone.
      if (!pool.isSuspended(id)) continue;
      pool.resumePage(id);
      resumed.push_back(k);
    }
    if (!suspendedCopy_.blocks.empty() && !resumed.empty()) {
      TransferStream stream(backend);
      for (size_t k : resumed)
        transferBlocks(backend, false, pool.page(suspendedPages_[k]).address, suspendedCopy_, k * pool.pageSize(),
                       pool.pageSize(), hostPool_->blockBytes(), stream.get());
      stream.finish();
    }
  } catch (...) {
    for (size_t j = resumed.size(); j-- > 0;) {
      try {
        pool.suspendPage(suspendedPages_[resumed[j]]);
      } catch (...) {
      }
    }
    throw;
  }
  hostPool_->give(suspendedCopy_);
  suspendedPages_.clear();
  core_->suspended = false;
  prefetcher_->wake();
  core_->changed.notify_all();
}

// Teardown (under the lock): every host buffer goes back.
void KVCache::freeHostMemory() {
  swapped_.clear();
  suspendedCopy_ = {};
  suspendedPages_.clear();
  hostPool_->teardown();
}

}  // namespace vat
