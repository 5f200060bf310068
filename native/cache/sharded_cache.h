// A cache over the GPUs of a host (tensor parallelism): each device holds
// kvHeads / devices of every layer's KV heads, in a KVCache of its own (its
// virtual range, page pool, budget and prefetch worker). This class makes
// every decision once and applies it to each device, so the shards never
// fall out of step:
//
//   placement   the first device places a sequence; the others take the same
//               slot (KVCache::reserveAt)
//   growth      all or nothing across devices: each device grows (one after
//               the other: the driver serialises mapping across GPUs), and
//               if any fails the others are undone (tokens back, the pages they mapped unmapped) and
//               the error names the device
//   release     fences recorded on every device first, then every device
//               releases: the sequence is gone everywhere or nowhere
//
// With one device every call goes straight to its KVCache. The binding holds
// one of these whatever the number of devices.
#pragma once

#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include "cache/kv_cache.h"

namespace vat {

class ShardedCache {
 public:
  // `devices`: CUDA ordinals (or logical device numbers on the host backend);
  // `budgets`: bytes per device (0 = that device's default). The options'
  // kvHeads is the whole model's: each device gets kvHeads / devices.
  ShardedCache(const CacheOptions& options, const std::vector<int>& devices, const std::vector<uint64_t>& budgets);
  ~ShardedCache();
  ShardedCache(const ShardedCache&) = delete;
  ShardedCache& operator=(const ShardedCache&) = delete;

  size_t deviceCount() const { return shards_.size(); }
  int deviceOrdinal(size_t d) const { return ordinals_[d]; }
  KVCache& shard(size_t d) { return *shards_[d]; }
  const KVLayout& layout() const { return shards_[0]->layout(); }
  uint32_t prefetchTokens() const { return shards_[0]->prefetchTokens(); }

  SequenceRef reserve(std::optional<uint64_t> expectedTokens);
  uint64_t grow(SequenceRef seq, uint64_t tokens);
  uint64_t step(const std::vector<GrowRequest>& batch);
  bool stepIfBacked(const std::vector<GrowRequest>& batch);
  void growDetached(SequenceRef seq, uint64_t tokens, const std::atomic<bool>* cancel);
  // `streams`: a fence per device (or none for a device: no fence there).
  void release(SequenceRef seq, const std::vector<std::optional<uint64_t>>& streams);

  // fork / reserve({ prefix }): the first device shares into a slot of its
  // choosing, the others into the same slot at once; all or nothing (the
  // devices that shared are cancelled when one cannot). `streams`: the copy
  // of the partial group on each device (0: finished on return).
  SequenceRef share(SequenceRef from, uint64_t tokens, bool allowReleased, const std::vector<uint64_t>& streams,
                    bool copyLast = false);
  // swapOut: every device copies its shard to host memory (at once, after
  // the work queued on its stream), and only when all have, the sequence is
  // released everywhere; a failure discards the copies made and leaves the
  // sequence as it was. swapIn: the first device places and backs it, the
  // others the same slot at once; the host copies go once every device has
  // its tokens back (a failure cancels the devices that did; retryable).
  uint64_t swapOut(SequenceRef seq, const std::vector<std::optional<uint64_t>>& streams);
  SequenceRef swapIn(uint64_t handle);
  // The tokens a swapped-out sequence holds (0 when the handle is gone).
  uint64_t swappedTokens(uint64_t handle);
  void discardSwapped(uint64_t handle);

  // Every device, all or nothing (a device that suspended is resumed again
  // when another fails; resume likewise).
  void suspend(bool keepHost);
  void resume();

  // `bytes` on each device; returns the bytes freed on all of them.
  uint64_t reclaim(uint64_t bytes);
  uint64_t trim();
  // The tokens backed on every device: the least of them (a growth commits
  // on one device before another, and is undone there if another fails).
  uint64_t tokens(SequenceRef seq);
  // What every device could give a growth, in bytes of the whole cache (all
  // devices): devices × the smallest device's figure, so that dividing by the
  // cache's bytes per token gives the tokens a growth could get.
  uint64_t obtainableBytes(bool withLookAhead);
  void close();
  std::string workerError();

 private:
  bool parallelDevices_ = false;  // a thread per device (see the constructor)
  std::vector<std::exception_ptr> onEachDevice(const std::vector<size_t>& devices, const std::function<void(size_t)>& fn);
  [[noreturn]] void rethrowFirst(const std::vector<std::exception_ptr>& errors);
  // Grows `devices` (each with grow(d)), all or nothing: a device that could
  // not back the batch goes first on its own (its refusal then changes
  // nothing anywhere), the rest at once; on any failure every device that
  // grew is undone to `marks`. Returns the pages reclaimed.
  uint64_t growAll(std::vector<size_t> devices, const std::vector<GrowRequest>& batch,
                   const std::vector<std::vector<KVCache::GrowthMark>>& marks,
                   const std::function<uint64_t(size_t)>& grow, const std::function<void()>& undoOthers);
  std::vector<size_t> allDevices() const;

  // Growths of one sequence across devices one at a time: a growth that fails
  // on one device undoes the others to the tokens it found, which must not
  // undo another growth of the same sequence made meanwhile (a step and a
  // growAsync of it at once) on some devices only. Growths of different
  // sequences do not wait for each other; a step waits only for a growth of
  // one of its own sequences.
  class GrowthClaims {
   public:
    explicit GrowthClaims(size_t slots) : busy_(slots, 0) {}
    void claim(const std::vector<GrowRequest>& batch);
    void unclaim(const std::vector<GrowRequest>& batch);

   private:
    std::mutex lock_;
    std::condition_variable freed_;
    std::vector<uint8_t> busy_;
  };
  struct Claim {
    GrowthClaims& claims;
    const std::vector<GrowRequest>& batch;
    Claim(GrowthClaims& c, const std::vector<GrowRequest>& b) : claims(c), batch(b) { claims.claim(batch); }
    ~Claim() { claims.unclaim(batch); }
  };

  std::vector<std::unique_ptr<KVCache>> shards_;
  std::vector<int> ordinals_;
  // Placement and release are decided once for every device: one at a time.
  // Growth takes no lock here (each device's cache has its own) beyond its
  // sequences' claims.
  std::mutex placement_;
  // A swapped-out sequence of several devices: each device's own handle.
  std::mutex swappedLock_;
  std::unordered_map<uint64_t, std::vector<uint64_t>> swapped_;
  uint64_t nextSwapHandle_ = 1;
  std::unique_ptr<GrowthClaims> claims_;
};

}  // namespace vat
