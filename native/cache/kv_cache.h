// The KV cache: sequence slots over a reserved virtual range, backed by
// pages from the pool on demand. This is where a sequence grows (pages get
// mapped), is released (pages stay: deferred reclamation) and gives pages
// back under memory pressure. All public methods are thread-safe.
#pragma once

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "layout/kv_layout.h"
#include "pool/page_pool.h"

namespace vat {

enum class BackendKind { Cuda, Host };

struct CacheOptions {
  ModelShape shape;
  BackendKind backend = BackendKind::Host;
  int device = 0;
  size_t pageSize = 0;          // 0 = backend default
  uint64_t memoryBudget = 0;    // 0 = default (see defaultBudget)
  uint64_t prefillBytes = 0;    // pages created into the pool at start
};

// A sequence as the caller holds it; stale once its slot is released.
struct SequenceRef {
  uint32_t slot = 0;
  uint32_t generation = 0;
};

struct SlotStats {
  uint32_t slot;
  bool active;
  uint64_t tokens;        // grown length (active) or 0
  uint64_t backedTokens;  // tokens the mapped pages hold
  uint64_t mappedPages;
};

struct CacheStats {
  std::string backend;
  uint64_t pageSize = 0;
  uint64_t budgetBytes = 0;
  PoolCounts pages;
  uint64_t bytesBacked = 0;  // mapped pages * page size
  uint64_t bytesUsed = 0;    // tokens of active sequences * bytes per token
  uint32_t activeSequences = 0;
  uint64_t reservedVirtualBytes = 0;
  std::vector<SlotStats> slots;
  std::array<OpCounter, kBackendOpCount> calls{};
  uint64_t reclaimedPages = 0;  // pages unmapped from released slots, ever
  uint64_t reusedPages = 0;     // mapped pages a new sequence found in its slot, ever
};

class KVCache {
 public:
  explicit KVCache(const CacheOptions& options);
  ~KVCache();
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  SequenceRef reserve(std::optional<uint64_t> expectedTokens);
  void grow(SequenceRef seq, uint64_t tokens);
  void release(SequenceRef seq, std::optional<uint64_t> fenceStream);
  uint64_t reclaim(uint64_t bytes);
  uint64_t trim();
  void write(SequenceRef seq, uint32_t layer, KVKind kind, uint64_t token, const void* data, uint64_t bytes);
  void read(SequenceRef seq, uint32_t layer, KVKind kind, uint64_t token, void* out, uint64_t bytes);
  uint64_t tokens(SequenceRef seq);
  CacheStats stats();
  void close();
  bool closed();

  // Fixed for the cache's life; safe without the lock.
  const KVLayout& layout() const { return *layout_; }
  Address base() const { return base_; }
  Backend& backend() { return *backend_; }

  // Test-only fault injection on the backend.
  void armFault(BackendOp op, uint64_t nth, bool outOfMemory);

 private:
  struct Slot {
    bool active = false;
    uint32_t generation = 0;
    uint64_t tokens = 0;
    std::vector<PageId> pages;          // mapped, group-major
    std::vector<FenceHandle> fences;    // GPU work that may still use the pages
  };

  void checkOpen() const;
  Slot& activeSlot(SequenceRef seq);
  size_t groupsOf(const Slot& s) const { return s.pages.size() / layout_->pagesPerGroup(); }
  uint64_t reclaimablePages() const;
  std::vector<PageId> obtainPages(uint64_t count, std::vector<PageId>& createdNow);
  void mapGroups(uint32_t slotIndex, Slot& s, size_t toGroups, std::vector<PageId>& pages);
  uint64_t reclaimLocked(uint64_t pages, bool waitForFences);
  void unmapTailGroup(Slot& s);
  void dropFinishedFences(Slot& s);
  void waitFences(Slot& s);
  void checkRange(Slot& s, uint32_t layer, uint64_t token, uint64_t bytes) const;
  void teardown();

  std::mutex lock_;
  bool closed_ = false;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<KVLayout> layout_;
  std::unique_ptr<PagePool> pool_;
  Address base_ = 0;
  std::vector<Slot> slots_;
  uint64_t reclaimedPages_ = 0;
  uint64_t reusedPages_ = 0;
};

// Budget when none is given: cuda, the device's free memory less 5% of its
// total; host, half of the free RAM.
uint64_t defaultBudget(Backend& backend);

}  // namespace vat
