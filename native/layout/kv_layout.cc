#include "layout/kv_layout.h"

#include <algorithm>

namespace vat {

namespace {
uint64_t divRoundUp(uint64_t a, uint64_t b) { return (a + b - 1) / b; }
}  // namespace

PerLayerLayout::PerLayerLayout(const ModelShape& shape, size_t pageSize)
    : shape_(shape),
      pageSize_(pageSize),
      tokenBytes_(uint64_t{shape.kvHeads} * shape.headDim * shape.dtypeBytes),
      slotBytes_(divRoundUp(uint64_t{shape.maxTokens} * tokenBytes_, pageSize) * pageSize),
      tensorBytes_(slotBytes_ * shape.maxSequences) {}

size_t PerLayerLayout::groupsForTokens(uint64_t tokens) const {
  return static_cast<size_t>(divRoundUp(tokens * tokenBytes_, pageSize_));
}

uint64_t PerLayerLayout::tokensInGroups(size_t groups) const {
  return std::min<uint64_t>(shape_.maxTokens, groups * pageSize_ / tokenBytes_);
}

uint64_t PerLayerLayout::pageOffset(uint32_t slot, size_t group, size_t indexInGroup) const {
  return tensorOffset(indexInGroup) + uint64_t{slot} * slotBytes_ + group * pageSize_;
}

TensorView PerLayerLayout::tensor(uint32_t layer, KVKind kind) const {
  TensorView v;
  v.offset = tensorOffset(2ull * layer + static_cast<uint32_t>(kind));
  v.shape = {shape_.maxSequences, shape_.maxTokens, shape_.kvHeads, shape_.headDim};
  v.strideElements = {slotBytes_ / shape_.dtypeBytes, uint64_t{shape_.kvHeads} * shape_.headDim, shape_.headDim, 1};
  return v;
}

uint64_t PerLayerLayout::tokenOffset(uint32_t slot, uint32_t layer, KVKind kind, uint64_t token) const {
  return tensor(layer, kind).offset + uint64_t{slot} * slotBytes_ + token * tokenBytes_;
}

}  // namespace vat
