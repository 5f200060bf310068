// Moving KV out of device memory and back: swapOut/swapIn of one sequence,
// suspend/resume of the whole cache. The host memory both use is counted
// against CacheOptions::hostMemoryBudget and freed by close().
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
  ~TransferStream() { backend_.destroyStream(stream_); }
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

void KVCache::reserveHostBytes(uint64_t bytes, const char* what) {
  uint64_t left = hostBudget_ - hostBytes_;
  if (bytes > left) {
    Error e(ErrorCode::OutOfMemory, std::string(what) + " needs " + std::to_string(bytes) +
                                        " bytes of host memory; " + std::to_string(left) + " of the " +
                                        std::to_string(hostBudget_) + " in options.hostMemoryBudget are left");
    e.requestedBytes = bytes;
    e.availableBytes = left;
    throw e;
  }
  hostBytes_ += bytes;
}

// The slot's first `tokens` tokens of every tensor, packed on the host tensor
// after tensor: each tensor's rows of a slot are contiguous, so a layout with
// G layer groups needs 2 × G copies whatever the model.
void KVCache::copySlotTokens(uint32_t slot, uint64_t tokens, void* host, bool toHost) {
  if (tokens == 0) return;
  const KVLayout& layout = *core_->layout;
  Backend& backend = core_->backend();
  uint32_t layersPerGroup = layout.shape().layers / layout.layerGroups();
  uint64_t bytes = tokens * layout.tokenPitch();
  auto* cursor = static_cast<uint8_t*>(host);
  TransferStream stream(backend);
  for (uint32_t g = 0; g < layout.layerGroups(); ++g) {
    for (KVKind kind : {KVKind::K, KVKind::V}) {
      Address at = core_->device.base() + layout.tokenOffset(slot, g * layersPerGroup, kind, 0);
      if (toHost) backend.copyToHost(cursor, at, bytes, stream.get());
      else backend.copyFromHost(at, cursor, bytes, stream.get());
      cursor += bytes;
    }
  }
  stream.finish();
}

uint64_t KVCache::swapOut(SequenceRef seq, std::optional<uint64_t> fenceStream) {
  Lock lk(core_->lock);
  activeSlot(seq);
  checkNotSuspended();
  // The worker may be mapping the sequence's look-ahead: its pages stay.
  core_->changed.wait(lk, [&] { return core_->closing.load() || !core_->slots[seq.slot].extendingNow(); });
  Slot& s = activeSlot(seq);
  checkNotSuspended();
  Backend& backend = core_->backend();
  uint64_t tokens = s.tokens, bytes = tokens * core_->layout->bytesPerToken();
  reserveHostBytes(bytes, "swapOut");
  FenceHandle fence = 0;
  try {
    if (fenceStream) fence = backend.recordFence(*fenceStream);
  } catch (...) {
    hostBytes_ -= bytes;
    throw;
  }
  // From here the caller's reference is stale (its generation), and nothing
  // unmaps the slot (Copying) until the copy has ended either way.
  uint32_t generation = s.generation++;
  s.extending = Extending::Copying;
  lk.unlock();
  void* host = nullptr;
  try {
    if (fence) backend.waitFence(fence);
    host = backend.allocHost(bytes);
    copySlotTokens(seq.slot, tokens, host, true);
  } catch (...) {
    lk.lock();
    if (fence) backend.destroyFence(fence);
    backend.freeHost(host);
    hostBytes_ -= bytes;
    s.generation = generation;
    s.extending = Extending::No;
    core_->changed.notify_all();
    throw;
  }
  lk.lock();
  if (fence) backend.destroyFence(fence);
  s.extending = Extending::No;
  vacate(seq.slot);
  uint64_t handle = nextSwapHandle_++;
  swapped_[handle] = {host, bytes, tokens, false};
  hostStats_.swapOuts++;
  core_->changed.notify_all();
  return handle;
}

SequenceRef KVCache::swapIn(uint64_t handle) {
  Lock lk(core_->lock);
  checkOpen();
  checkNotSuspended();
  auto it = swapped_.find(handle);
  if (it == swapped_.end())
    fail(ErrorCode::InvalidArgument, "swapped: this swapped-out sequence was swapped in or discarded already");
  if (it->second.swappingIn) fail(ErrorCode::InvalidArgument, "swapped: a swapIn of it is already running");
  it->second.swappingIn = true;
  SwappedSequence moved = it->second;
  lk.unlock();
  std::optional<SequenceRef> seq;
  try {
    seq = reserve(moved.tokens);
    growDetached(*seq, moved.tokens, nullptr);
    lk.lock();
    Slot& s = activeSlot(*seq);
    checkNotSuspended();
    s.extending = Extending::Copying;
    lk.unlock();
    try {
      copySlotTokens(seq->slot, moved.tokens, moved.host, false);
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
      if (s.active() && s.generation == seq->generation) vacate(seq->slot);
    }
    auto again = swapped_.find(handle);
    if (again != swapped_.end()) again->second.swappingIn = false;
    core_->changed.notify_all();
    throw;
  }
  // Freed under the lock: once it is released, close() may tear the backend down.
  core_->backend().freeHost(moved.host);
  hostBytes_ -= moved.bytes;
  swapped_.erase(handle);
  hostStats_.swapIns++;
  core_->changed.notify_all();
  return *seq;
}

void KVCache::discardSwapped(uint64_t handle) {
  Lock lk(core_->lock);
  checkOpen();
  auto it = swapped_.find(handle);
  if (it == swapped_.end()) return;  // swapped in or discarded already: nothing to free
  if (it->second.swappingIn) fail(ErrorCode::InvalidArgument, "swapped: a swapIn of it is running");
  core_->backend().freeHost(it->second.host);
  hostBytes_ -= it->second.bytes;
  swapped_.erase(it);
}

uint64_t KVCache::swappedTokens(uint64_t handle) {
  Lock lk(core_->lock);
  auto it = swapped_.find(handle);
  return it == swapped_.end() ? 0 : it->second.tokens;
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
      uint64_t bytes = suspendedPages_.size() * pool.pageSize();
      reserveHostBytes(bytes, "suspend({ keep: 'host' })");
      suspendedCopyBytes_ = bytes;
      suspendedCopy_ = backend.allocHost(bytes);
      TransferStream stream(backend);
      auto* at = static_cast<uint8_t*>(suspendedCopy_);
      for (PageId id : suspendedPages_) {
        backend.copyToHost(at, pool.page(id).address, pool.pageSize(), stream.get());
        at += pool.pageSize();
      }
      stream.finish();
    }
    // Failing from here leaves the cache suspended in part: resume() backs
    // what went (and restores it from the host copy).
    pagesGoing = true;
    for (PageId id : suspendedPages_) pool.suspendPage(id);
  } catch (...) {
    if (!pagesGoing) {
      backend.freeHost(suspendedCopy_);
      suspendedCopy_ = nullptr;
      hostBytes_ -= suspendedCopyBytes_;
      suspendedCopyBytes_ = 0;
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
  std::vector<size_t> resumed;  // indexes into suspendedPages_
  try {
    for (size_t k = 0; k < suspendedPages_.size(); ++k) {
      PageId id = suspendedPages_[k];
      // A page whose sequences were all released while suspended is gone.
      if (!pool.isSuspended(id)) continue;
      pool.resumePage(id);
      resumed.push_back(k);
    }
    if (suspendedCopy_ && !resumed.empty()) {
      TransferStream stream(backend);
      const auto* copy = static_cast<const uint8_t*>(suspendedCopy_);
      for (size_t k : resumed)
        backend.copyFromHost(pool.page(suspendedPages_[k]).address, copy + k * pool.pageSize(), pool.pageSize(),
                             stream.get());
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
  backend.freeHost(suspendedCopy_);
  suspendedCopy_ = nullptr;
  hostBytes_ -= suspendedCopyBytes_;
  suspendedCopyBytes_ = 0;
  suspendedPages_.clear();
  core_->suspended = false;
  prefetcher_->wake();
  core_->changed.notify_all();
}

// Teardown (under the lock): every host buffer goes back.
void KVCache::freeHostMemory() {
  Backend& backend = core_->backend();
  for (auto& entry : swapped_) backend.freeHost(entry.second.host);
  swapped_.clear();
  backend.freeHost(suspendedCopy_);
  suspendedCopy_ = nullptr;
  suspendedPages_.clear();
  hostBytes_ = suspendedCopyBytes_ = 0;
}

}  // namespace vat
