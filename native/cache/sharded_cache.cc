#include "cache/sharded_cache.h"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <system_error>
#include <thread>

#include "common/errors.h"

namespace vat {

namespace {

// The error of device `ordinal`, saying so (the code and figures kept).
std::exception_ptr onDevice(std::exception_ptr error, int ordinal) {
  try {
    std::rethrow_exception(error);
  } catch (const Error& e) {
    Error named(e.code(), "device " + std::to_string(ordinal) + ": " + e.what());
    named.status = e.status;
    named.statusName = e.statusName;
    named.requestedBytes = e.requestedBytes;
    named.availableBytes = e.availableBytes;
    named.device = ordinal;
    return std::make_exception_ptr(named);
  } catch (...) {
    return std::current_exception();
  }
}

}  // namespace

ShardedCache::ShardedCache(const CacheOptions& options, const std::vector<int>& devices,
                           const std::vector<uint64_t>& budgets)
    : ordinals_(devices) {
  // The devices' work runs one after the other on the calling thread: the
  // driver serialises virtual-memory calls across the GPUs (and threads) of a
  // process, so a thread per device only adds contention (bench/mapping.mjs
  // --devices: on 2 H200s, two raw loops at once take 2.07x one loop, one
  // after the other 2.05x; grow() with a thread per device 2.15x, serially
  // 2.01x). VATTENTION_PARALLEL_DEVICES=1 brings the threads back, to measure
  // that again on another driver.
  const char* parallel = std::getenv("VATTENTION_PARALLEL_DEVICES");
  parallelDevices_ = parallel != nullptr && parallel[0] == '1';
  if (devices.empty()) fail(ErrorCode::InvalidArgument, "options.devices: at least one device");
  if (budgets.size() != devices.size())
    fail(ErrorCode::InvalidArgument, "a memory budget per device: " + std::to_string(budgets.size()) + " for " +
                                         std::to_string(devices.size()) + " devices");
  uint32_t n = static_cast<uint32_t>(devices.size());
  if (options.shape.kvHeads % n != 0)
    fail(ErrorCode::InvalidArgument, "options.kvHeads (" + std::to_string(options.shape.kvHeads) +
                                         ") must divide evenly over the " + std::to_string(n) + " devices");
  // Built in order, torn down in reverse (the members' destructors) if one fails.
  shards_.reserve(n);
  for (uint32_t d = 0; d < n; ++d) {
    CacheOptions shard = options;
    shard.shape.kvHeads = options.shape.kvHeads / n;
    shard.device = devices[d];
    shard.memoryBudget = budgets[d];
    // Host memory (swap, suspend with keep: 'host') is one budget for the cache.
    shard.hostMemoryBudget = options.hostMemoryBudget / n;
    shard.hostMemoryPrefill = options.hostMemoryPrefill / n;
    try {
      shards_.push_back(std::make_unique<KVCache>(shard));
    } catch (...) {
      std::exception_ptr error = n > 1 ? onDevice(std::current_exception(), devices[d]) : std::current_exception();
      for (auto it = shards_.rbegin(); it != shards_.rend(); ++it) (*it)->close();
      std::rethrow_exception(error);
    }
  }
  claims_ = std::make_unique<GrowthClaims>(options.shape.maxSequences);
}

ShardedCache::~ShardedCache() { close(); }

// Each device's part: one after the other on this thread (see the
// constructor), or with VATTENTION_PARALLEL_DEVICES the first here and the
// others on threads of their own (a thread that cannot start runs its part
// here instead). Every device's error is kept, named.
std::vector<std::exception_ptr> ShardedCache::onEachDevice(const std::vector<size_t>& devices,
                                                           const std::function<void(size_t)>& fn) {
  std::vector<std::exception_ptr> errors(shards_.size());
  auto run = [&](size_t d) {
    try {
      fn(d);
    } catch (...) {
      errors[d] = shards_.size() > 1 ? onDevice(std::current_exception(), ordinals_[d]) : std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  std::vector<size_t> inline_;
  if (!parallelDevices_) inline_.assign(devices.begin() + (devices.empty() ? 0 : 1), devices.end());
  for (size_t i = 1; i < devices.size() && parallelDevices_; ++i) {
    try {
      threads.emplace_back(run, devices[i]);
    } catch (...) {
      // no thread (system_error) or no memory for it (bad_alloc): that
      // device's part runs here; nothing may leave with threads joinable
      inline_.push_back(devices[i]);
    }
  }
  if (!devices.empty()) run(devices[0]);
  for (size_t d : inline_) run(d);
  for (std::thread& t : threads) t.join();
  return errors;
}

void ShardedCache::rethrowFirst(const std::vector<std::exception_ptr>& errors) {
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
  fail(ErrorCode::Internal, "rethrowFirst without an error");
}

SequenceRef ShardedCache::reserve(std::optional<uint64_t> expectedTokens) {
  if (shards_.size() == 1) return shards_[0]->reserve(expectedTokens);
  std::lock_guard<std::mutex> hold(placement_);
  SequenceRef first = shards_[0]->reserve(expectedTokens);
  for (size_t d = 1; d < shards_.size(); ++d) {
    std::optional<SequenceRef> taken;
    try {
      taken = shards_[d]->reserveAt(first.slot);
      if (taken->generation != first.generation)
        fail(ErrorCode::Internal, "slot " + std::to_string(first.slot) + " is at generation " +
                                      std::to_string(taken->generation) + " on this device and " +
                                      std::to_string(first.generation) + " on the first");
    } catch (...) {
      std::exception_ptr error = onDevice(std::current_exception(), ordinals_[d]);
      // the slot as it was on every device that took it, generation included
      if (taken) shards_[d]->cancelReserve(*taken);
      for (size_t u = d; u-- > 0;) shards_[u]->cancelReserve(first);
      std::rethrow_exception(error);
    }
  }
  return first;
}

void ShardedCache::GrowthClaims::claim(const std::vector<GrowRequest>& batch) {
  std::unique_lock<std::mutex> lk(lock_);
  // a slot out of range is the devices' to refuse (ERR_INVALID_ARGUMENT): not claimed
  auto free = [&] {
    for (const GrowRequest& r : batch)
      if (r.seq.slot < busy_.size() && busy_[r.seq.slot]) return false;
    return true;
  };
  freed_.wait(lk, free);
  for (const GrowRequest& r : batch)
    if (r.seq.slot < busy_.size()) busy_[r.seq.slot] = 1;
}

void ShardedCache::GrowthClaims::unclaim(const std::vector<GrowRequest>& batch) {
  {
    std::lock_guard<std::mutex> lk(lock_);
    for (const GrowRequest& r : batch)
      if (r.seq.slot < busy_.size()) busy_[r.seq.slot] = 0;
  }
  freed_.notify_all();
}

std::vector<size_t> ShardedCache::allDevices() const {
  std::vector<size_t> all(shards_.size());
  for (size_t d = 0; d < all.size(); ++d) all[d] = d;
  return all;
}

uint64_t ShardedCache::growAll(std::vector<size_t> devices, const std::vector<GrowRequest>& batch,
                               const std::vector<std::vector<KVCache::GrowthMark>>& marks,
                               const std::function<uint64_t(size_t)>& grow, const std::function<void()>& undoOthers) {
  uint64_t reclaimed = 0;
  std::vector<size_t> grown;
  auto undoGrown = [&] {
    for (size_t d : grown) shards_[d]->undoGrowth(marks[d], true);
    undoOthers();
  };
  for (auto it = devices.begin(); it != devices.end();) {
    bool short_ = false;
    try {
      short_ = !shards_[*it]->couldBack(batch);
      if (short_) reclaimed += grow(*it);
    } catch (...) {
      std::exception_ptr error = onDevice(std::current_exception(), ordinals_[*it]);
      undoGrown();
      std::rethrow_exception(error);
    }
    if (short_) {
      grown.push_back(*it);
      it = devices.erase(it);
    } else {
      ++it;
    }
  }
  std::vector<uint64_t> each(shards_.size(), 0);
  auto errors = onEachDevice(devices, [&](size_t d) { each[d] = grow(d); });
  bool failed = false;
  for (size_t d : devices) {
    if (errors[d]) failed = true;
    else grown.push_back(d);
  }
  if (failed) {
    undoGrown();
    rethrowFirst(errors);
  }
  for (uint64_t r : each) reclaimed += r;
  return reclaimed;
}

uint64_t ShardedCache::grow(SequenceRef seq, uint64_t tokens) {
  if (shards_.size() == 1) return shards_[0]->grow(seq, tokens);
  std::vector<GrowRequest> one{{seq, tokens}};
  Claim claim(*claims_, one);
  std::vector<std::vector<KVCache::GrowthMark>> marks(shards_.size());
  for (size_t d = 0; d < shards_.size(); ++d) marks[d] = shards_[d]->markGrowth(one);
  return growAll(allDevices(), one, marks, [&](size_t d) { return shards_[d]->grow(seq, tokens); }, [] {});
}

bool ShardedCache::stepIfBacked(const std::vector<GrowRequest>& batch) {
  if (shards_.size() == 1) return shards_[0]->stepIfBacked(batch);
  Claim claim(*claims_, batch);
  // The first device gives the tokens before the step (everyone's): a later
  // device that is not backed, or that throws, undoes the devices before it.
  std::vector<KVCache::GrowthMark> before;
  size_t stepped = 0;
  try {
    while (stepped < shards_.size() && shards_[stepped]->stepIfBacked(batch, stepped == 0 ? &before : nullptr)) ++stepped;
  } catch (...) {
    std::exception_ptr error = onDevice(std::current_exception(), ordinals_[stepped]);
    for (size_t u = 0; u < stepped; ++u) shards_[u]->undoGrowth(before, false);
    std::rethrow_exception(error);
  }
  if (stepped == shards_.size()) return true;
  for (size_t u = 0; u < stepped; ++u) shards_[u]->undoGrowth(before, false);
  return false;
}

// The steady state costs what one device's step costs per device: each one's
// stepIfBacked, on this thread, no driver call. When some device is short,
// those devices step at once (their mapping in parallel); any failure undoes
// every device.
uint64_t ShardedCache::step(const std::vector<GrowRequest>& batch) {
  if (shards_.size() == 1) return shards_[0]->step(batch);
  Claim claim(*claims_, batch);
  // before: the tokens before this step, from the first device (all equal).
  std::vector<KVCache::GrowthMark> before;
  size_t backed = 0;
  auto undoBacked = [&] {
    for (size_t u = 0; u < backed; ++u) shards_[u]->undoGrowth(before, false);
  };
  try {
    while (backed < shards_.size() && shards_[backed]->stepIfBacked(batch, backed == 0 ? &before : nullptr)) ++backed;
  } catch (...) {
    std::exception_ptr error = onDevice(std::current_exception(), ordinals_[backed]);
    undoBacked();
    std::rethrow_exception(error);
  }
  if (backed == shards_.size()) return 0;
  std::vector<std::vector<KVCache::GrowthMark>> marks(shards_.size());
  std::vector<size_t> rest;
  for (size_t d = backed; d < shards_.size(); ++d) {
    try {
      marks[d] = shards_[d]->markGrowth(batch);
    } catch (...) {
      std::exception_ptr error = onDevice(std::current_exception(), ordinals_[d]);
      undoBacked();
      std::rethrow_exception(error);
    }
    rest.push_back(d);
  }
  return growAll(rest, batch, marks, [&](size_t d) { return shards_[d]->step(batch); }, undoBacked);
}

void ShardedCache::growDetached(SequenceRef seq, uint64_t tokens, const std::atomic<bool>* cancel) {
  if (shards_.size() == 1) return shards_[0]->growDetached(seq, tokens, cancel);
  std::vector<GrowRequest> one{{seq, tokens}};
  Claim claim(*claims_, one);
  std::vector<std::vector<KVCache::GrowthMark>> marks(shards_.size());
  for (size_t d = 0; d < shards_.size(); ++d) marks[d] = shards_[d]->markGrowth(one);
  growAll(allDevices(), one, marks, [&](size_t d) {
    shards_[d]->growDetached(seq, tokens, cancel);
    return uint64_t{0};
  }, [] {});
}

void ShardedCache::release(SequenceRef seq, const std::vector<std::optional<uint64_t>>& streams) {
  if (streams.size() > shards_.size())
    fail(ErrorCode::InvalidArgument, std::to_string(streams.size()) + " streams for " +
                                         std::to_string(shards_.size()) + " devices");
  auto streamOf = [&](size_t d) { return d < streams.size() ? streams[d] : std::nullopt; };
  if (shards_.size() == 1) return shards_[0]->release(seq, streamOf(0));
  std::lock_guard<std::mutex> hold(placement_);
  for (size_t d = 0; d < shards_.size(); ++d) {
    try {
      if (streamOf(d)) shards_[d]->recordFence(seq, *streamOf(d));
      else shards_[d]->tokens(seq);  // the same checks (open, live sequence) before anything changes
    } catch (...) {
      std::rethrow_exception(onDevice(std::current_exception(), ordinals_[d]));
    }
  }
  // Fences recorded: release cannot fail now (the sequence was checked live
  // on every device under the placement lock, which every release takes).
  for (size_t d = 0; d < shards_.size(); ++d) shards_[d]->release(seq, std::nullopt);
}

SequenceRef ShardedCache::share(SequenceRef from, uint64_t tokens, bool allowReleased,
                                const std::vector<uint64_t>& streams, bool copyLast) {
  auto streamOf = [&](size_t d) { return d < streams.size() ? streams[d] : uint64_t{0}; };
  if (shards_.size() == 1) return shards_[0]->share(from, tokens, allowReleased, streamOf(0), copyLast);
  std::lock_guard<std::mutex> hold(placement_);
  std::vector<KVCache::ShareUndo> undo(shards_.size());
  SequenceRef first;
  try {
    first = shards_[0]->share(from, tokens, allowReleased, streamOf(0), std::nullopt, &undo[0], copyLast);
  } catch (...) {
    std::rethrow_exception(onDevice(std::current_exception(), ordinals_[0]));
  }
  std::vector<size_t> rest;
  for (size_t d = 1; d < shards_.size(); ++d) rest.push_back(d);
  std::vector<SequenceRef> refs(shards_.size(), first);
  auto errors = onEachDevice(rest, [&](size_t d) {
    refs[d] = shards_[d]->share(from, tokens, allowReleased, streamOf(d), first.slot, &undo[d], copyLast);
    if (refs[d].generation != first.generation)
      fail(ErrorCode::Internal, "slot " + std::to_string(first.slot) + " is at generation " +
                                    std::to_string(refs[d].generation) + " on this device and " +
                                    std::to_string(first.generation) + " on the first");
  });
  bool failed = std::any_of(errors.begin(), errors.end(), [](const std::exception_ptr& e) { return bool(e); });
  if (!failed) return first;
  for (size_t d = 0; d < shards_.size(); ++d)
    if (!errors[d] || refs[d].generation != first.generation) shards_[d]->cancelShare(refs[d], undo[d]);
  rethrowFirst(errors);
}

uint64_t ShardedCache::swapOut(SequenceRef seq, const std::vector<std::optional<uint64_t>>& streams) {
  auto streamOf = [&](size_t d) { return d < streams.size() ? streams[d] : std::nullopt; };
  if (shards_.size() == 1) return shards_[0]->swapOut(seq, streamOf(0));
  std::vector<uint64_t> handles(shards_.size(), 0);
  auto errors = onEachDevice(allDevices(), [&](size_t d) { handles[d] = shards_[d]->swapOut(seq, streamOf(d), true); });
  bool failed = std::any_of(errors.begin(), errors.end(), [](const std::exception_ptr& e) { return bool(e); });
  if (failed) {
    for (size_t d = 0; d < shards_.size(); ++d) {
      if (errors[d]) continue;
      try {
        shards_[d]->cancelSwapOut(handles[d]);
      } catch (...) {
        // out of memory giving the blocks back: they stay allocated, the error below is the one to report
      }
    }
    rethrowFirst(errors);
  }
  release(seq, {});  // every copy made (after its fence): nothing left to fence
  std::lock_guard<std::mutex> hold(swappedLock_);
  uint64_t handle = nextSwapHandle_++;
  swapped_[handle] = std::move(handles);
  return handle;
}

uint64_t ShardedCache::swappedTokens(uint64_t handle) {
  if (shards_.size() == 1) return shards_[0]->swappedTokens(handle);
  std::vector<uint64_t> handles;
  {
    std::lock_guard<std::mutex> hold(swappedLock_);
    auto it = swapped_.find(handle);
    if (it == swapped_.end()) return 0;
    handles = it->second;
  }
  uint64_t tokens = UINT64_MAX;
  for (size_t d = 0; d < shards_.size(); ++d) tokens = std::min(tokens, shards_[d]->swappedTokens(handles[d]));
  return tokens;
}

SequenceRef ShardedCache::swapIn(uint64_t handle) {
  if (shards_.size() == 1) return shards_[0]->swapIn(handle);
  std::vector<uint64_t> handles;
  {
    std::lock_guard<std::mutex> hold(swappedLock_);
    auto it = swapped_.find(handle);
    if (it == swapped_.end())
      fail(ErrorCode::InvalidArgument, "swapped: this swapped-out sequence was swapped in or discarded already");
    handles = it->second;
  }
  std::lock_guard<std::mutex> hold(placement_);
  SequenceRef first;
  try {
    first = shards_[0]->swapIn(handles[0], std::nullopt, true);
  } catch (...) {
    std::rethrow_exception(onDevice(std::current_exception(), ordinals_[0]));
  }
  std::vector<size_t> rest;
  for (size_t d = 1; d < shards_.size(); ++d) rest.push_back(d);
  std::vector<std::optional<SequenceRef>> refs(shards_.size());
  refs[0] = first;
  auto errors = onEachDevice(rest, [&](size_t d) {
    refs[d] = shards_[d]->swapIn(handles[d], first.slot, true);
    if (refs[d]->generation != first.generation)
      fail(ErrorCode::Internal, "slot " + std::to_string(first.slot) + " is at generation " +
                                    std::to_string(refs[d]->generation) + " on this device and " +
                                    std::to_string(first.generation) + " on the first");
  });
  bool failed = std::any_of(errors.begin(), errors.end(), [](const std::exception_ptr& e) { return bool(e); });
  if (failed) {
    for (size_t d = 0; d < shards_.size(); ++d)
      if (refs[d]) shards_[d]->cancelSwapIn(*refs[d]);
    rethrowFirst(errors);
  }
  // every device has its tokens back: the host copies go
  for (size_t d = 0; d < shards_.size(); ++d) {
    try {
      shards_[d]->discardSwapped(handles[d]);
    } catch (...) {
    }
  }
  std::lock_guard<std::mutex> hold2(swappedLock_);
  swapped_.erase(handle);
  return first;
}

void ShardedCache::discardSwapped(uint64_t handle) {
  if (shards_.size() == 1) return shards_[0]->discardSwapped(handle);
  std::vector<uint64_t> handles;
  {
    std::lock_guard<std::mutex> hold(swappedLock_);
    auto it = swapped_.find(handle);
    if (it == swapped_.end()) return;  // swapped in or discarded already
    handles = it->second;
  }
  for (size_t d = 0; d < shards_.size(); ++d) shards_[d]->discardSwapped(handles[d]);  // refused while a swapIn runs
  std::lock_guard<std::mutex> hold(swappedLock_);
  swapped_.erase(handle);
}

void ShardedCache::suspend(bool keepHost) {
  if (shards_.size() == 1) return shards_[0]->suspend(keepHost);
  std::lock_guard<std::mutex> hold(placement_);
  auto errors = onEachDevice(allDevices(), [&](size_t d) { shards_[d]->suspend(keepHost); });
  bool failed = std::any_of(errors.begin(), errors.end(), [](const std::exception_ptr& e) { return bool(e); });
  if (!failed) return;
  if (!keepHost) {
    // The devices that suspended dropped their KV: resuming them would hand
    // back memory whose bytes are gone as if nothing had happened. They stay
    // suspended, and so does the cache (in part): resume() backs every
    // device again, with undefined contents, as after any keep: 'none'.
    std::string which;
    for (size_t d = 0; d < shards_.size(); ++d)
      if (!errors[d]) which += (which.empty() ? "" : ", ") + std::to_string(ordinals_[d]);
    for (const std::exception_ptr& e : errors) {
      if (!e) continue;
      try {
        std::rethrow_exception(e);
      } catch (const Error& err) {
        Error partial(err.code(), std::string(err.what()) + "; the cache is suspended in part (device(s) " + which +
                                      " dropped their KV): resume() backs every device again");
        partial.status = err.status;
        partial.statusName = err.statusName;
        partial.device = err.device;
        throw partial;
      }
    }
  }
  // keep: 'host': the devices that suspended hold their bytes on the host,
  // so resuming them puts the cache back as it was (all or nothing).
  for (size_t d = 0; d < shards_.size(); ++d) {
    if (errors[d]) continue;
    try {
      shards_[d]->resume();
    } catch (...) {
      // That device stays suspended; resume() retries it.
    }
  }
  rethrowFirst(errors);
}

void ShardedCache::resume() {
  if (shards_.size() == 1) return shards_[0]->resume();
  std::lock_guard<std::mutex> hold(placement_);
  // A device not suspended (resumed by an earlier, partly failed call) is
  // skipped; the others back their pages; the first failure is reported and
  // resume() can be called again.
  auto errors = onEachDevice(allDevices(), [&](size_t d) {
    if (shards_[d]->stats().suspended) shards_[d]->resume();
  });
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
}

uint64_t ShardedCache::tokens(SequenceRef seq) {
  uint64_t least = shards_[0]->tokens(seq);
  for (size_t d = 1; d < shards_.size(); ++d) least = std::min(least, shards_[d]->tokens(seq));
  return least;
}

// `bytes` of the whole cache: each device holds 1/n of every sequence, so
// each gives its share (rounded up).
uint64_t ShardedCache::reclaim(uint64_t bytes) {
  uint64_t n = shards_.size();
  uint64_t each = bytes == UINT64_MAX ? bytes : bytes / n + (bytes % n != 0);
  uint64_t total = 0;
  for (auto& s : shards_) total += s->reclaim(each);
  return total;
}

uint64_t ShardedCache::trim() {
  uint64_t total = 0;
  for (auto& s : shards_) total += s->trim();
  return total;
}

uint64_t ShardedCache::obtainableBytes(bool withLookAhead) {
  uint64_t least = UINT64_MAX;
  for (auto& s : shards_) least = std::min(least, s->obtainableBytes(withLookAhead));
  return least == UINT64_MAX ? least : least * shards_.size();
}

void ShardedCache::close() {
  for (auto it = shards_.rbegin(); it != shards_.rend(); ++it) (*it)->close();
}

std::string ShardedCache::workerError() {
  for (size_t d = 0; d < shards_.size(); ++d) {
    std::string why = shards_[d]->workerError();
    if (!why.empty()) return shards_.size() > 1 ? "device " + std::to_string(ordinals_[d]) + ": " + why : why;
  }
  return "";
}

}  // namespace vat
