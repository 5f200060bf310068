// The façade's own part: setup and teardown, placement, release, reclaim.
// Growth, sharing, moves and statistics are in the files named in kv_cache.h.
#include "core/kv_cache.h"

#include <algorithm>
#include <cstdlib>

#include "backend/cuda_backend.h"
#include "backend/host_backend.h"
#include "common/errors.h"
#include "common/lifetime.h"
#include "core/policy/placement.h"

namespace vat {

namespace {

std::unique_ptr<Backend> makeBackend(const CacheOptions& o, int device) {
  if (o.backend == BackendKind::Cuda) return std::make_unique<CudaBackend>(device, o.pageSize);
  return std::make_unique<HostBackend>(o.pageSize);
}

void checkDevices(const CacheOptions& o) {
  if (o.devices.empty()) fail(ErrorCode::InvalidArgument, "options.devices: at least one device");
  if (o.memoryBudgets.size() != o.devices.size())
    fail(ErrorCode::InvalidArgument, "a memory budget per device: " + std::to_string(o.memoryBudgets.size()) +
                                         " for " + std::to_string(o.devices.size()) + " devices");
  if (o.shape.kvHeads % o.devices.size() != 0)
    fail(ErrorCode::InvalidArgument, "options.kvHeads (" + std::to_string(o.shape.kvHeads) +
                                         ") must divide evenly over the " + std::to_string(o.devices.size()) +
                                         " devices");
}

}  // namespace

// Setup order: per device its backend (the first one's page size makes the
// layout), then its pool, range and host memory; then the prefetch worker.
// A step that throws gives back what it took; devices set up before it are
// torn down in reverse.
KVCache::KVCache(const CacheOptions& o) : ordinals_(o.devices) {
  watchProcessExit();
  checkDevices(o);
  ModelShape shape = o.shape;
  shape.kvHeads /= static_cast<uint32_t>(o.devices.size());
  std::unique_ptr<Backend> first = makeBackend(o, o.devices[0]);
  auto layout = std::make_unique<GroupedLayout>(shape, first->pageSize(), o.layerGroups ? o.layerGroups : shape.layers);
  description_.pageSize = first->pageSize();
  description_.granularity = first->granularity();
  description_.backend = first->name();
  core_ = std::make_unique<CacheCore>(std::move(layout));
  uint64_t groupBytes = core_->layout->pagesPerGroup() * description_.pageSize;
  uint64_t maxGroups = o.prefixCacheMaxBytes == UINT64_MAX ? UINT64_MAX : o.prefixCacheMaxBytes / groupBytes;
  core_->prefix = std::make_unique<PrefixCache>(core_->slots, *core_->layout, o.prefixCache, maxGroups);
  const char* parallel = std::getenv("VATTENTION_PARALLEL_DEVICES");  // see CacheCore::parallelDevices
  core_->parallelDevices = parallel != nullptr && parallel[0] == '1';
  core_->shards.push_back(std::make_unique<DeviceShard>(std::move(first), o.devices[0], *core_->layout));
  mapper_ = std::make_unique<PageMapper>(*core_);
  prefetcher_ = std::make_unique<Prefetcher>(*core_, *mapper_, o.prefetchTokens, o.idleGroups);
  batchStamp_.assign(shape.maxSequences, 0);
  batchTarget_.assign(shape.maxSequences, 0);
  batchSlots_.reserve(shape.maxSequences);
  batchGroups_.reserve(shape.maxSequences);
  suspendedPages_.resize(o.devices.size());
  suspendedCopy_.resize(o.devices.size());
  resumedUnrestored_.resize(o.devices.size());
  openShards(o);
  try {
    prefetcher_->start();
  } catch (...) {
    teardown();
    throw;
  }
}

void KVCache::openShards(const CacheOptions& o) {
  size_t n = o.devices.size();
  uint64_t groupPages = core_->pagesPerGroup();
  for (size_t d = 0; d < n; ++d) {
    try {
      if (d > 0) {
        core_->shards.push_back(
            std::make_unique<DeviceShard>(makeBackend(o, o.devices[d]), o.devices[d], *core_->layout));
        if (core_->shard(d).backend().pageSize() != description_.pageSize)
          fail(ErrorCode::InvalidArgument, "the devices' page sizes differ");
      }
      DeviceShard& sh = core_->shard(d);
      uint64_t budget = o.memoryBudgets[d];
      if (budget && budget < groupPages * description_.pageSize)
        fail(ErrorCode::InvalidArgument, "options.memoryBudget: " + std::to_string(budget) +
                                             " bytes is less than one page group (" + std::to_string(groupPages) +
                                             " pages of " + std::to_string(description_.pageSize) +
                                             " bytes): no sequence could ever grow");
      // Host memory (swap, suspend with keep: 'host') is one budget for the cache, split evenly.
      sh.open(budgetAccount(sh, budget), o.prefillBytes, o.hostMemoryBudget / n, o.hostMemoryPrefill / n);
      description_.bases.push_back(sh.base());
    } catch (const Error& e) {
      Error named = core_->named(e, d);
      teardown();  // (a shard whose open failed gave back what it took: only its backend is left)
      throw named;
    } catch (...) {
      teardown();
      throw;
    }
  }
}

KVCache::~KVCache() { close(); }

void KVCache::checkOpen() const {
  if (core_->closed || core_->closing.load()) fail(ErrorCode::Closed, "the KV cache is closed");
}

void KVCache::checkNotSuspended() const {
  if (core_->suspended) fail(ErrorCode::Suspended, "the KV cache is suspended: resume() it first");
}

void KVCache::checkDevice(size_t device) const {
  if (device >= core_->deviceCount())
    fail(ErrorCode::InvalidArgument, "device index " + std::to_string(device) + ": the cache has " +
                                         std::to_string(core_->deviceCount()) + " devices");
}

Slot& KVCache::activeSlot(SequenceRef seq) {
  checkOpen();
  return core_->slots.active(seq);
}

// The slot keeps the fences of its previous sequence: its pages (now the new
// sequence's) are not unmapped before that GPU work is done.
SequenceRef KVCache::reserve(std::optional<uint64_t> expectedTokens) {
  Lock lk(core_->lock);
  const KVLayout& layout = *core_->layout;
  std::optional<size_t> groups;
  if (expectedTokens) groups = layout.groupsForTokens(std::min<uint64_t>(*expectedTokens, layout.shape().maxTokens));
  for (;;) {
    checkOpen();
    sweepDropPending(false);
    settleCopyFences(false);
    try {
      return occupy(placeSequence(core_->slots, groups, core_->prefix->holders()));
    } catch (const Error& e) {
      // Slots still waiting to drop shared pages (a fence, the worker) or
      // for a share's queued copy: wait for them, then decide again.
      if (e.code() != ErrorCode::NoSlot || !waitBeforeRefusing(lk, Short::Slot)) throw;
    }
  }
}

// Free slots held by a share's copy still queued on a stream: their fences
// that have passed are dropped, or with `wait` waited for. True when a slot
// became placeable.
bool KVCache::settleCopyFences(bool wait) {
  bool freed = false;
  for (uint32_t i = 0; i < core_->slots.size(); ++i) {
    Slot& s = core_->slots[i];
    if (s.active || !s.copyFenced) continue;
    if (wait) core_->waitFences(i);
    else core_->fencesPending(i);
    bool holds = false;
    for (auto& sh : core_->shards) holds = holds || sh->slot(i).fences.holdsCopy();
    s.copyFenced = holds;
    freed = freed || !holds;
  }
  return freed;
}

SequenceRef KVCache::occupy(uint32_t index) {
  core_->fencesPending(index);  // drops the fences that have passed
  for (auto& sh : core_->shards) sh->counters.reusedPages += core_->pagesOf(core_->slots[index]);
  return core_->slots.occupy(index);
}

void KVCache::unoccupy(uint32_t index) noexcept {
  for (auto& sh : core_->shards)
    sh->counters.reusedPages -= std::min<uint64_t>(sh->counters.reusedPages, core_->pagesOf(core_->slots[index]));
  core_->slots.unoccupy(index);
  prefetcher_->wake();
  core_->changed.notify_all();
}

// The fence on every device first: if one fails the sequence stays active
// (fences recorded on the devices before stay; they pass with their work).
// Nothing after them can fail.
void KVCache::release(SequenceRef seq, const std::vector<std::optional<uint64_t>>& streams) {
  if (streams.size() > core_->deviceCount())
    fail(ErrorCode::InvalidArgument, std::to_string(streams.size()) + " streams for " +
                                         std::to_string(core_->deviceCount()) + " devices");
  Lock lk(core_->lock);
  Slot& s = activeSlot(seq);
  if (s.groups > 0)
    for (size_t d = 0; d < streams.size(); ++d)
      if (streams[d]) core_->onDevice(d, [&] { core_->shard(d).slot(seq.slot).fences.record(core_->shard(d).backend(), *streams[d]); });
  vacate(seq.slot);
}

// The slot's sequence ends; its pages stay (deferred reclamation) unless
// they are shared or the cache is suspended. Never throws.
void KVCache::vacate(uint32_t slot) {
  core_->slots.vacate(slot);
  if (pagesMoving_) core_->slots[slot].settling = true;  // a suspend or resume may be at its pages: settled after
  else settleVacated(slot);
  prefetcher_->wake();  // pages may have become reclaimable for a waiting plan
}

void KVCache::settleVacated(uint32_t slot) {
  bool fenced = core_->fencesPending(slot);
  if (core_->suspended && !fenced) mapper_->dropMappings(slot);  // resume() need not back them
  else dropIfShared(slot);
}

uint64_t KVCache::reclaim(uint64_t bytes) {
  Lock lk(core_->lock);
  checkOpen();
  if (core_->suspended) return 0;  // nothing is backed
  // `bytes` counts the whole cache: every group taken frees a page on each
  // device, so each device gives up its share of them.
  uint64_t ps = description_.pageSize;
  uint64_t perPage = ps * core_->deviceCount();
  uint64_t pages = bytes == UINT64_MAX ? UINT64_MAX : bytes / perPage + (bytes % perPage != 0);
  // reclaim() takes only from released slots (not prefetched tails): every
  // active slot is left out of the order.
  std::vector<uint32_t> active;
  for (uint32_t i = 0; i < core_->slots.size(); ++i)
    if (core_->slots[i].active) active.push_back(i);
  return mapper_->reclaim(pages, active) * ps * core_->deviceCount();
}

uint64_t KVCache::trim() {
  Lock lk(core_->lock);
  checkOpen();
  if (pagesMoving_) return 0;  // a suspend or resume owns the pools meanwhile
  prefetcher_->pause();  // no pool top-up until the next step()
  mapper_->retryStranded();
  uint64_t bytes = 0;
  for (auto& sh : core_->shards) bytes += sh->pool().trim(UINT64_MAX) * sh->pool().pageSize() + sh->host().trim();
  return bytes;
}

uint64_t KVCache::tokens(SequenceRef seq) {
  Lock lk(core_->lock);
  return activeSlot(seq).tokens;
}

void KVCache::armFault(size_t device, const Fault& fault) {
  Lock lk(core_->lock);
  checkOpen();
  checkDevice(device);
  core_->shard(device).backend().armFault(fault);
}

std::string KVCache::workerError() {
  Lock lk(core_->lock);
  return prefetcher_->workerError();
}

// ---- teardown ------------------------------------------------------------------

void KVCache::close() {
  Lock lk(core_->lock);
  if (core_->closed || core_->closing.load()) {
    core_->changed.wait(lk, [&] { return core_->closed; });
    return;
  }
  core_->closing.store(true);
  core_->changed.notify_all();
  lk.unlock();
  prefetcher_->stop();
  lk.lock();
  core_->changed.wait(lk, [&] { return !core_->slots.anyExtending() && !pagesMoving_; });
  core_->closed = true;
  teardown();
  core_->changed.notify_all();
}

// Reverse order of setup: host buffers, then each device (fences, mappings,
// pages, range, backend), the last first. Best effort. Once the process is
// exiting the driver may be gone, so nothing is called and the memory goes
// back with the process.
void KVCache::teardown() {
  bool exiting = processExiting();
  if (!exiting) freeHostMemory();
  for (size_t d = core_->deviceCount(); d-- > 0;) {
    if (exiting) core_->shard(d).abandon();
    else core_->shard(d).teardown();
  }
}

}  // namespace vat
