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

const ModelShape& checked(const ModelShape& s, size_t pageSize) {
  const std::pair<const char*, uint32_t> fields[] = {{"layers", s.layers},         {"kvHeads", s.kvHeads},
                                                     {"headDim", s.headDim},       {"dtypeBytes", s.dtypeBytes},
                                                     {"maxSequences", s.maxSequences}, {"maxTokens", s.maxTokens}};
  for (const auto& [name, value] : fields)
    if (value == 0) fail(ErrorCode::InvalidArgument, std::string(name) + " must be at least 1");
  if (pageSize == 0) fail(ErrorCode::InvalidArgument, "the page size must be at least 1 byte");
  return s;
}
}  // namespace

PerLayerLayout::PerLayerLayout(const ModelShape& shape, size_t pageSize)
    : shape_(checked(shape, pageSize)),
      pageSize_(pageSize),
      tokenBytes_(product(product(shape.kvHeads, shape.headDim, "kvHeads x headDim"), shape.dtypeBytes,
                          "one token's bytes")),
      slotBytes_(product(divRoundUp(product(shape.maxTokens, tokenBytes_, "one slot's bytes"), pageSize), pageSize,
                         "one slot's bytes")),
      tensorBytes_(product(slotBytes_, shape.maxSequences, "one tensor's bytes")) {
  uint64_t range = product(tensorBytes_, 2ull * shape.layers, "the reserved range");
  if (range > kMaxRangeBytes)
    fail(ErrorCode::InvalidArgument, "the reserved range would be " + std::to_string(range) +
                                         " bytes, more than the 2^47 bytes of virtual address space allowed");
}

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
