#include "device/device_shard.h"

#include <algorithm>
#include <cstring>

#include "common/errors.h"

namespace vat {

uint64_t defaultBudget(Backend& backend) {
  MemoryInfo m = backend.memoryInfo();
  if (std::strcmp(backend.name(), "cuda") == 0) {
    uint64_t margin = m.totalBytes / 20;
    return m.freeBytes > margin ? m.freeBytes - margin : 0;
  }
  return m.freeBytes / 2;
}

std::shared_ptr<BudgetAccount> budgetAccount(DeviceShard& shard, uint64_t bytes) {
  uint64_t pageSize = shard.backend().pageSize();
  if (bytes) return std::make_shared<BudgetAccount>(bytes / pageSize);
  std::string device = std::string(shard.backend().name()) + ":" + std::to_string(shard.ordinal());
  return defaultBudgetAccount(device, [&] { return defaultBudget(shard.backend()) / pageSize; });
}

DeviceShard::DeviceShard(std::unique_ptr<Backend> backend, int ordinal, const KVLayout& layout)
    : backend_(std::move(backend)), ordinal_(ordinal), layout_(layout), slots_(layout.shape().maxSequences) {}

void DeviceShard::open(std::shared_ptr<BudgetAccount> budget, uint64_t prefillBytes, uint64_t hostBudget,
                       uint64_t hostPrefill) {
  pool_ = std::make_unique<PagePool>(*backend_, std::move(budget));
  base_ = backend_->reserveRange(layout_.rangeBytes());
  rangeBytes_ = layout_.rangeBytes();
  // Host blocks of a 16th of the budget, 4 KiB to 16 MiB: few page-lockings
  // for a long sequence, little waste for a short one, and a small budget
  // still holds several swaps (one block is never the whole budget).
  uint64_t block = std::min<uint64_t>(uint64_t{16} << 20, std::max<uint64_t>(4096, hostBudget / 16 / 4096 * 4096));
  try {
    uint64_t ps = backend_->pageSize();
    pool_->prefill(prefillBytes / ps + (prefillBytes % ps != 0));  // rounds up without wrapping
    host_ = std::make_unique<HostBlockPool>(*backend_, hostBudget, block);
    host_->prefill(hostPrefill);
  } catch (...) {
    if (host_) host_->teardown();
    host_.reset();
    pool_->teardown();
    try {
      backend_->freeRange(base_, rangeBytes_);
    } catch (...) {
    }
    rangeBytes_ = 0;
    throw;
  }
}

void DeviceShard::teardown() noexcept {
  if (!backend_) return;
  backend_->disarmFault();
  for (SlotPages& s : slots_) s.fences.drain(*backend_);
  slots_.clear();
  if (host_) host_->teardown();
  host_.reset();
  if (pool_) pool_->teardown();
  if (rangeBytes_) {
    try {
      backend_->freeRange(base_, rangeBytes_);
    } catch (...) {
    }
    rangeBytes_ = 0;
  }
  pool_.reset();
  backend_.reset();
}

void DeviceShard::abandon() noexcept {
  host_.release();  // deliberately leaked: their destructors would call the driver
  pool_.release();
  backend_.release();
}

Address DeviceShard::pageAt(uint32_t slot, size_t k) const {
  size_t per = layout_.pagesPerGroup();
  return base_ + layout_.pageOffset(slot, k / per, k % per);
}

bool DeviceShard::take(TakenPages& t, uint64_t count) {
  PagePool& pool = *pool_;
  while (t.pages.size() < count) {
    PageId id = pool.takeIdle();
    if (id != PagePool::kNone) {
      t.pages.push_back(id);
      continue;
    }
    if (pool.headroom() == 0) return false;
    try {
      id = pool.create();
    } catch (const Error& e) {
      // The device is fuller than the budget assumed: the caller reclaims.
      if (e.code() != ErrorCode::OutOfMemory) throw;
      return false;
    }
    t.created.push_back(id);
    t.pages.push_back(id);
  }
  return true;
}

void DeviceShard::giveBack(TakenPages& t) noexcept {
  PagePool& pool = *pool_;
  for (PageId id : t.pages) {
    pool.place(id);  // counted as what it is now (a change held it off the lock)
    PageState state = pool.page(id).state;
    if (state == PageState::Mapped || state == PageState::Accessible) {
      pool.strand(id);
      continue;
    }
    if (state != PageState::Created) continue;
    try {
      if (std::find(t.created.begin(), t.created.end(), id) != t.created.end()) pool.destroy(id);
      else pool.putIdle(id);
    } catch (...) {
      pool.putIdle(id);
    }
  }
  t.pages.clear();
  t.created.clear();
}

void DeviceShard::mapInto(uint32_t slot, size_t toPages, const std::vector<PageId>& pages, size_t& next) {
  std::vector<PageId>& list = slots_[slot].pages;
  list.reserve(toPages);  // no allocation between a map and its record
  while (list.size() < toPages) {
    PageId id = pages[next];
    pool_->map(id, pageAt(slot, list.size()));
    list.push_back(id);
    ++next;
  }
}

void DeviceShard::shrinkTo(uint32_t slot, size_t keep) noexcept {
  std::vector<PageId>& list = slots_[slot].pages;
  while (list.size() > keep) {
    PageId id = list.back();
    try {
      pool_->unmap(id);
      pool_->putIdle(id);
    } catch (...) {
      pool_->strand(id);  // retried before the next mapping
    }
    list.pop_back();
  }
}

void DeviceShard::unlistBeyond(uint32_t slot, size_t keep) noexcept {
  std::vector<PageId>& list = slots_[slot].pages;
  while (list.size() > keep) {
    try {
      pool_->unmap(list.back());
    } catch (...) {
    }
    list.pop_back();
  }
}

void DeviceShard::unmapTail(uint32_t slot, size_t first, bool& restored) {
  std::vector<PageId>& list = slots_[slot].pages;
  size_t i = list.size();
  restored = true;
  try {
    for (; i > first; --i) pool_->unmap(list[i - 1]);
  } catch (...) {
    restored = remapTail(slot, i, list.size());
    throw;
  }
}

bool DeviceShard::remapTail(uint32_t slot, size_t first, size_t end) noexcept {
  std::vector<PageId>& list = slots_[slot].pages;
  bool all = true;
  for (size_t j = first; j < end && j < list.size(); ++j) {
    if (pool_->page(list[j]).state != PageState::Created) continue;
    try {
      pool_->map(list[j], pageAt(slot, j));
    } catch (...) {
      all = false;
    }
  }
  return all;
}

void DeviceShard::abandonTail(uint32_t slot, size_t first) noexcept {
  std::vector<PageId>& list = slots_[slot].pages;
  for (size_t j = first; j < list.size(); ++j) {
    if (pool_->page(list[j]).state == PageState::Created) pool_->putIdle(list[j]);
    else pool_->strand(list[j]);
  }
  list.resize(std::min(first, list.size()));
}

void DeviceShard::dropAll(uint32_t slot) noexcept {
  std::vector<PageId>& list = slots_[slot].pages;
  while (!list.empty()) {
    size_t k = list.size() - 1;
    PageId id = list[k];
    Address at = pageAt(slot, k);
    try {
      if (pool_->unmapAt(id, at)) pool_->putIdle(id);
    } catch (...) {
      // Still mapped here. The page's last mapping: stranded (unmapped again
      // before the next mapping); a shared page's: the record lets this
      // address go and the pool keeps it as a stray mapping, likewise retried.
      if (pool_->mappingsOf(id) <= 1) {
        pool_->strand(id);
      } else {
        pool_->forgetMappingAt(id, at);
        pool_->strayMapping(at);
      }
    }
    list.pop_back();
  }
}

bool DeviceShard::holdsShared(uint32_t slot) const {
  for (PageId id : slots_[slot].pages)
    if (pool_->mappingsOf(id) > 1) return true;
  return false;
}

void DeviceShard::retryStranded() {
  if (pool_->hasStranded()) pool_->retryStranded();
}

}  // namespace vat
