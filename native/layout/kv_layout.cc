#include "layout/kv_layout.h"

#include <algorithm>
#include <string>

#include "common/errors.h"

namespace vat {

namespace {
uint64_t divRoundUp(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

// a * b, or ERR_INVALID_ARGUMENT naming what overflowed.
uint64_t product(uint64_t a, uint64_t b, const char* what) {
  uint64_t out = 0;
  if (__builtin_mul_overflow(a, b, &out))
    fail(ErrorCode::InvalidArgument, std::string("the model shape is too large: ") + what + " overflows 64 bits");
  return out;
}

const ModelShape& checked(const ModelShape& s, size_t pageSize, uint32_t layerGroups) {
  const std::pair<const char*, uint32_t> fields[] = {{"layers", s.layers},         {"kvHeads", s.kvHeads},
                                                     {"headDim", s.headDim},       {"dtypeBytes", s.dtypeBytes},
                                                     {"maxSequences", s.maxSequences}, {"maxTokens", s.maxTokens}};
  for (const auto& [name, value] : fields)
    if (value == 0) fail(ErrorCode::InvalidArgument, std::string(name) + " must be at least 1");
  if (pageSize == 0) fail(ErrorCode::InvalidArgument, "the page size must be at least 1 byte");
  if (layerGroups == 0 || s.layers % layerGroups != 0)
    fail(ErrorCode::InvalidArgument, "layerGroups (" + std::to_string(layerGroups) + ") must divide layers (" +
                                         std::to_string(s.layers) + ")");
  return s;
}
}  // namespace

GroupedLayout::GroupedLayout(const ModelShape& shape, size_t pageSize, uint32_t layerGroups)
    : shape_(checked(shape, pageSize, layerGroups)),
      layerGroups_(layerGroups),
      pageSize_(pageSize),
      tokenBytes_(product(product(shape.kvHeads, shape.headDim, "kvHeads x headDim"), shape.dtypeBytes,
                          "one token's bytes")),
      rowBytes_(product(tokenBytes_, shape.layers / layerGroups, "one token's bytes in a layer group")),
      slotBytes_(product(divRoundUp(product(shape.maxTokens, rowBytes_, "one slot's bytes"), pageSize), pageSize,
                         "one slot's bytes")),
      tensorBytes_(product(slotBytes_, shape.maxSequences, "one tensor's bytes")) {
  uint64_t range = product(tensorBytes_, tensorCount(), "the reserved range");
  if (range > kMaxRangeBytes)
    fail(ErrorCode::InvalidArgument, "the reserved range would be " + std::to_string(range) +
                                         " bytes, more than the 2^47 bytes of virtual address space allowed");
}

std::string GroupedLayout::name() const {
  if (layerGroups_ == shape_.layers) return "per-layer";
  if (layerGroups_ == 1) return "all-layers";
  return "layer-groups:" + std::to_string(layerGroups_);
}

// A token's row may straddle two pages when rowBytes does not divide the
// page: a token counts as backed only when all of its row is.
size_t GroupedLayout::groupsForTokens(uint64_t tokens) const {
  return static_cast<size_t>(divRoundUp(tokens * rowBytes_, pageSize_));
}

uint64_t GroupedLayout::tokensInGroups(size_t groups) const {
  return std::min<uint64_t>(shape_.maxTokens, groups * pageSize_ / rowBytes_);
}

uint64_t GroupedLayout::pageOffset(uint32_t slot, size_t group, size_t indexInGroup) const {
  return tensorOffset(indexInGroup) + uint64_t{slot} * slotBytes_ + group * pageSize_;
}

TensorView GroupedLayout::tensor(uint32_t layer, KVKind kind) const {
  uint32_t group = layer / layersPerGroup(), layerInGroup = layer % layersPerGroup();
  TensorView v;
  v.offset = tensorOffset(2ull * group + static_cast<uint32_t>(kind)) + layerInGroup * tokenBytes_;
  v.shape = {shape_.maxSequences, shape_.maxTokens, shape_.kvHeads, shape_.headDim};
  v.strideElements = {slotBytes_ / shape_.dtypeBytes, rowBytes_ / shape_.dtypeBytes, shape_.headDim, 1};
  return v;
}

uint64_t GroupedLayout::tokenOffset(uint32_t slot, uint32_t layer, KVKind kind, uint64_t token) const {
  return tensor(layer, kind).offset + uint64_t{slot} * slotBytes_ + token * rowBytes_;
}

}  // namespace vat
