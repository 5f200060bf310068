// Where each token of each sequence lives in the reserved virtual range.
// The cache maps memory in "page groups": one group extends every tensor of a
// slot by one page, so a slot's backed length is the same in every tensor.
// A layout answers which addresses a group covers and where a token is; the
// cache, pool, prefetcher, reclaim and fences know nothing else about it.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace vat {

enum class KVKind : uint32_t { K = 0, V = 1 };

struct ModelShape {
  uint32_t layers = 0;
  uint32_t kvHeads = 0;
  uint32_t headDim = 0;
  uint32_t dtypeBytes = 0;
  uint32_t maxSequences = 0;
  uint32_t maxTokens = 0;  // per sequence
};

// One layer's K or V as a kernel sees it: byte offset from the range base,
// shape [sequences, tokens, heads, dim] and strides in elements.
struct TensorView {
  uint64_t offset = 0;
  std::array<uint64_t, 4> shape{};
  std::array<uint64_t, 4> strideElements{};
};

// Virtual bytes one cache may reserve: 128 TiB, half of a 48-bit space.
constexpr uint64_t kMaxRangeBytes = uint64_t{1} << 47;

class KVLayout {
 public:
  virtual ~KVLayout() = default;
  virtual const ModelShape& shape() const = 0;
  virtual std::string name() const = 0;              // 'per-layer', 'all-layers', 'layer-groups:N'
  virtual uint32_t layerGroups() const = 0;          // tensors per kind
  virtual uint64_t rangeBytes() const = 0;           // virtual bytes to reserve
  virtual size_t pagesPerGroup() const = 0;          // pages mapped together
  virtual size_t maxGroups() const = 0;              // groups that back a whole slot
  virtual size_t groupsForTokens(uint64_t tokens) const = 0;
  virtual uint64_t tokensInGroups(size_t groups) const = 0;
  // Whole groups that hold no byte of token `token` or later (a sequence
  // sharing its first `token` tokens can share these pages; the rest is copied).
  virtual size_t groupsBefore(uint64_t token) const = 0;
  virtual uint64_t pageOffset(uint32_t slot, size_t group, size_t indexInGroup) const = 0;
  virtual TensorView tensor(uint32_t layer, KVKind kind) const = 0;
  virtual uint64_t tokenOffset(uint32_t slot, uint32_t layer, KVKind kind, uint64_t token) const = 0;
  virtual uint64_t tokenBytes() const = 0;           // one token of one layer's K (or V): contiguous
  virtual uint64_t tokenPitch() const = 0;           // bytes from one token of a layer to the next
  virtual uint64_t bytesPerToken() const = 0;        // one token across every layer's K and V
};

// Layers in groups: `layerGroups` K tensors and as many V tensors, each
// [maxSequences, maxTokens, layers / layerGroups, kvHeads, headDim]. A page
// group is one page of each of the 2 × layerGroups tensors.
//   layerGroups == layers  vAttention's per-layer layout: a tensor per layer's
//                          K and V, each token's row contiguous per layer.
//   layerGroups == 1       "all layers" (vAttention's megacache): one K and one
//                          V tensor; a page group is 2 pages for any model, so
//                          a sequence wastes less than 2 pages.
// Slot s of a tensor is one contiguous range at s * slotBytes (maxTokens rows
// rounded up to pages). Tensors follow each other: group 0 K, group 0 V,
// group 1 K, ... Layer l's K is a strided view of its group's K tensor: token
// stride = layersPerGroup × kvHeads × headDim elements.
class GroupedLayout final : public KVLayout {
 public:
  // Throws ERR_INVALID_ARGUMENT for a zero dimension, a layerGroups that does
  // not divide layers, or a range that overflows or passes kMaxRangeBytes:
  // everything below relies on it.
  GroupedLayout(const ModelShape& shape, size_t pageSize, uint32_t layerGroups);

  const ModelShape& shape() const override { return shape_; }
  std::string name() const override;
  uint32_t layerGroups() const override { return layerGroups_; }
  uint64_t rangeBytes() const override { return tensorBytes_ * tensorCount(); }
  size_t pagesPerGroup() const override { return tensorCount(); }
  size_t maxGroups() const override { return slotBytes_ / pageSize_; }
  size_t groupsForTokens(uint64_t tokens) const override;
  uint64_t tokensInGroups(size_t groups) const override;
  size_t groupsBefore(uint64_t token) const override { return static_cast<size_t>(token * rowBytes_ / pageSize_); }
  uint64_t pageOffset(uint32_t slot, size_t group, size_t indexInGroup) const override;
  TensorView tensor(uint32_t layer, KVKind kind) const override;
  uint64_t tokenOffset(uint32_t slot, uint32_t layer, KVKind kind, uint64_t token) const override;
  uint64_t tokenBytes() const override { return tokenBytes_; }
  uint64_t tokenPitch() const override { return rowBytes_; }
  uint64_t bytesPerToken() const override { return tokenBytes_ * 2ull * shape_.layers; }

  uint64_t slotBytes() const { return slotBytes_; }

 private:
  size_t tensorCount() const { return 2ull * layerGroups_; }
  uint64_t tensorOffset(size_t tensorIndex) const { return tensorIndex * tensorBytes_; }
  uint32_t layersPerGroup() const { return shape_.layers / layerGroups_; }

  ModelShape shape_;
  uint32_t layerGroups_;
  uint64_t pageSize_;
  uint64_t tokenBytes_;   // kvHeads * headDim * dtypeBytes
  uint64_t rowBytes_;     // one token of a tensor: layersPerGroup * tokenBytes
  uint64_t slotBytes_;    // maxTokens * rowBytes rounded up to pages
  uint64_t tensorBytes_;  // slotBytes * maxSequences
};

}  // namespace vat
