// Where each token of each sequence lives in the reserved virtual range.
// The cache maps memory in "page groups": one group extends every tensor of a
// slot by one page, so a slot's backed length is the same in every layer's K
// and V. A layout answers which addresses a group covers; the cache does not
// know the tensor arrangement beyond that. PerLayerLayout is vAttention's
// layout; another (e.g. all layers in one tensor) can implement KVLayout.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

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

// A tensor of the layout: byte offset from the range base, shape and strides.
struct TensorView {
  uint64_t offset = 0;
  std::array<uint64_t, 4> shape{};           // [sequences, tokens, heads, dim]
  std::array<uint64_t, 4> strideElements{};  // per dimension
};

// Virtual bytes one cache may reserve: 128 TiB, half of a 48-bit space.
constexpr uint64_t kMaxRangeBytes = uint64_t{1} << 47;

class KVLayout {
 public:
  virtual ~KVLayout() = default;
  virtual const ModelShape& shape() const = 0;
  virtual uint64_t rangeBytes() const = 0;           // virtual bytes to reserve
  virtual size_t pagesPerGroup() const = 0;          // pages mapped together
  virtual size_t maxGroups() const = 0;              // groups that back a whole slot
  virtual size_t groupsForTokens(uint64_t tokens) const = 0;
  virtual uint64_t tokensInGroups(size_t groups) const = 0;
  virtual uint64_t pageOffset(uint32_t slot, size_t group, size_t indexInGroup) const = 0;
  virtual TensorView tensor(uint32_t layer, KVKind kind) const = 0;
  virtual uint64_t tokenOffset(uint32_t slot, uint32_t layer, KVKind kind, uint64_t token) const = 0;
  virtual uint64_t tokenBytes() const = 0;           // one token of one tensor, contiguous
  virtual uint64_t bytesPerToken() const = 0;        // one token across every tensor
};

// vAttention's layout: for every layer a K and a V tensor
// [maxSequences, maxTokens, kvHeads, headDim]; slot s of a tensor is one
// contiguous range starting at s * slotBytes (maxTokens rounded up to pages).
// Tensors follow each other: layer 0 K, layer 0 V, layer 1 K, ...
class PerLayerLayout final : public KVLayout {
 public:
  // Throws ERR_INVALID_ARGUMENT for a zero dimension or a range that
  // overflows or passes kMaxRangeBytes: everything below relies on it.
  PerLayerLayout(const ModelShape& shape, size_t pageSize);

  const ModelShape& shape() const override { return shape_; }
  uint64_t rangeBytes() const override { return tensorBytes_ * tensorCount(); }
  size_t pagesPerGroup() const override { return tensorCount(); }
  size_t maxGroups() const override { return slotBytes_ / pageSize_; }
  size_t groupsForTokens(uint64_t tokens) const override;
  uint64_t tokensInGroups(size_t groups) const override;
  uint64_t pageOffset(uint32_t slot, size_t group, size_t indexInGroup) const override;
  TensorView tensor(uint32_t layer, KVKind kind) const override;
  uint64_t tokenOffset(uint32_t slot, uint32_t layer, KVKind kind, uint64_t token) const override;
  uint64_t tokenBytes() const override { return tokenBytes_; }
  uint64_t bytesPerToken() const override { return tokenBytes_ * tensorCount(); }

  uint64_t slotBytes() const { return slotBytes_; }

 private:
  size_t tensorCount() const { return 2ull * shape_.layers; }
  uint64_t tensorOffset(size_t tensorIndex) const { return tensorIndex * tensorBytes_; }

  ModelShape shape_;
  uint64_t pageSize_;
  uint64_t tokenBytes_;   // kvHeads * headDim * dtypeBytes
  uint64_t slotBytes_;    // maxTokens * tokenBytes rounded up to pages
  uint64_t tensorBytes_;  // slotBytes * maxSequences
};

}  // namespace vat
