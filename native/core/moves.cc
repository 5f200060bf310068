// Moving KV out of device memory and back: swapOut/swapIn of one sequence,
// suspend/resume of the whole cache. Each device's shard goes to (and comes
// from) that device's host memory, within its part of hostMemoryBudget
// (pool/host_block_pool.h: blocks kept for reuse), freed by trim() and close().
//
// Copies run with the cache's lock released (a swap of a long sequence takes
// milliseconds; the serving loop's step() must not wait for it): the slot
// being copied is marked Extending::Copying, which keeps every path that
// unmaps, places or closes away from it, as an extension does.
#include <algorithm>

#include "common/errors.h"
#include "core/kv_cache.h"
#include "core/transfer_stream.h"

namespace vat {


void KVCache::takeHost(std::vector<HostBlocks>& host, uint64_t bytesPerDevice, const char* what) {
  host.resize(core_->deviceCount());
  try {
    core_->onEachDevice([&](size_t d) { host[d] = core_->shard(d).host().take(bytesPerDevice, what); });
  } catch (...) {
    giveHost(host);
    throw;
  }
}

void KVCache::giveHost(std::vector<HostBlocks>& host) noexcept {
  for (size_t d = 0; d < host.size(); ++d) core_->shard(d).host().give(host[d]);
}

// The slot's first `tokens` tokens of every tensor, on every device, packed
// on the host tensor after tensor: each tensor's rows of a slot are
// contiguous, so a layout with G layer groups needs 2 × G copies per device.
// Every device's copies are queued before any is waited for.
void KVCache::copySlotTokens(uint32_t slot, uint64_t tokens, const std::vector<HostBlocks>& host, bool toHost) {
  if (tokens == 0) return;
  const KVLayout& layout = *core_->layout;
  uint32_t layersPerGroup = layout.shape().layers / layout.layerGroups();
  uint64_t bytes = tokens * layout.tokenPitch();
  std::vector<std::unique_ptr<TransferStream>> streams;
  core_->onEachDevice([&](size_t d) {
    DeviceShard& sh = core_->shard(d);
    streams.push_back(std::make_unique<TransferStream>(sh.backend()));
    uint64_t offset = 0;
    for (uint32_t g = 0; g < layout.layerGroups(); ++g) {
      for (KVKind kind : {KVKind::K, KVKind::V}) {
        Address at = sh.base() + layout.tokenOffset(slot, g * layersPerGroup, kind, 0);
        transferBlocks(sh.backend(), toHost, at, host[d], offset, bytes, sh.host().blockBytes(), streams[d]->get());
        offset += bytes;
      }
    }
  });
  core_->onEachDevice([&](size_t d) { streams[d]->finish(); });
}

uint64_t KVCache::swapOut(SequenceRef seq, const std::vector<std::optional<uint64_t>>& fenceStreams) {
  if (fenceStreams.size() > core_->deviceCount())
    fail(ErrorCode::InvalidArgument, std::to_string(fenceStreams.size()) + " streams for " +
                                         std::to_string(core_->deviceCount()) + " devices");
  Lock lk(core_->lock);
  activeSlot(seq);
  checkNotSuspended();
  // The worker may be mapping the sequence's look-ahead: its pages stay.
  core_->changed.wait(lk, [&] { return core_->closing.load() || !core_->slots[seq.slot].extendingNow(); });
  Slot& s = activeSlot(seq);
  checkNotSuspended();
  uint64_t tokens = s.tokens, bytes = tokens * core_->layout->bytesPerToken();
  std::vector<FenceHandle> fences(core_->deviceCount(), 0);
  auto dropFences = [&] {
    for (size_t d = 0; d < fences.size(); ++d)
      if (fences[d]) core_->shard(d).backend().destroyFence(fences[d]);
  };
  try {
    for (size_t d = 0; d < fenceStreams.size(); ++d)
      if (fenceStreams[d]) fences[d] = core_->onDevice(d, [&] { return core_->shard(d).backend().recordFence(*fenceStreams[d]); });
  } catch (...) {
    dropFences();
    throw;
  }
  // From here the caller's reference is stale (its generation), and nothing
  // unmaps the slot (Copying) until the copy has ended either way.
  uint32_t generation = s.generation++;
  s.extending = Extending::Copying;
  lk.unlock();
  auto entry = std::make_unique<SwappedSequence>();
  entry->tokens = tokens;
  try {
    takeHost(entry->host, bytes, "swapOut");
    core_->onEachDevice([&](size_t d) {
      if (fences[d]) core_->shard(d).backend().waitFence(fences[d]);
    });
    copySlotTokens(seq.slot, tokens, entry->host, true);
  } catch (...) {
    giveHost(entry->host);
    lk.lock();
    dropFences();
    s.generation = generation;
    s.extending = Extending::No;
    core_->changed.notify_all();
    throw;
  }
  lk.lock();
  dropFences();
  s.extending = Extending::No;
  vacate(seq.slot);
  uint64_t handle = nextSwapHandle_++;
  swapped_[handle] = std::move(entry);
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
  if (it->second->swappingIn) fail(ErrorCode::InvalidArgument, "swapped: a swapIn of it is already running");
  SwappedSequence& entry = *it->second;  // stays put: the entry is not erased while swappingIn
  entry.swappingIn = true;
  lk.unlock();
  std::optional<SequenceRef> seq;
  try {
    seq = reserve(entry.tokens);
    growDetached(*seq, entry.tokens, nullptr);
    lk.lock();
    // The growth asked the worker for the look-ahead, which it may be
    // mapping now: the slot becomes ours (Copying) only once that ended.
    core_->changed.wait(lk, [&] { return core_->closing.load() || !core_->slots[seq->slot].extendingNow(); });
    Slot& s = activeSlot(*seq);
    checkNotSuspended();
    s.extending = Extending::Copying;
    lk.unlock();
    struct EndCopy {
      CacheCore& core;
      Lock& lk;
      Slot& s;
      ~EndCopy() {
        if (!lk.owns_lock()) lk.lock();
        s.extending = Extending::No;
        core.changed.notify_all();
      }
    } endCopy{*core_, lk, s};
    copySlotTokens(seq->slot, entry.tokens, entry.host, false);
  } catch (...) {
    if (!lk.owns_lock()) lk.lock();
    if (seq) undoSwapIn(*seq);
    entry.swappingIn = false;
    core_->changed.notify_all();
    throw;
  }
  giveHost(entry.host);
  swapped_.erase(handle);
  hostStats_.swapIns++;
  core_->changed.notify_all();
  return *seq;
}

// Under the lock: a swapIn that failed. Refused before anything was copied
// (no memory), the slot is as it was, generation and released sequence
// included; otherwise the copy wrote part of the swapped tokens there, so
// what a released sequence left in the slot is gone (no prefix source).
void KVCache::undoSwapIn(SequenceRef seq) noexcept {
  if (core_->closed || seq.slot >= core_->slots.size()) return;
  Slot& s = core_->slots[seq.slot];
  if (!s.active || s.generation != seq.generation) return;
  if (s.tokens == 0) {
    unoccupy(seq.slot);
    return;
  }
  vacate(seq.slot);
  s.releasedTokens = 0;
}

uint64_t KVCache::swappedTokens(uint64_t handle) {
  Lock lk(core_->lock);
  auto it = swapped_.find(handle);
  return it == swapped_.end() ? 0 : it->second->tokens;
}

void KVCache::discardSwapped(uint64_t handle) {
  Lock lk(core_->lock);
  checkOpen();
  auto it = swapped_.find(handle);
  if (it == swapped_.end()) return;  // swapped in or discarded already: nothing to free
  if (it->second->swappingIn) fail(ErrorCode::InvalidArgument, "swapped: a swapIn of it is running");
  giveHost(it->second->host);
  swapped_.erase(it);
}

}  // namespace vat
