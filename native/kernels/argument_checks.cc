#include "kernels/argument_checks.h"

#include <cmath>
#include <utility>

#include "common/errors.h"
#include "kernels/kernel_modules.h"

namespace vat::kernels {

void invalid(const char* what, const std::string& message) {
  fail(ErrorCode::InvalidArgument, std::string(what) + ": " + message);
}

void checkAligned(const char* what, const char* name, uint64_t address, uint64_t alignment) {
  if (address == 0 || address % alignment != 0)
    invalid(what, std::string(name) + " must be a " + std::to_string(alignment) + "-byte aligned device address");
}

void checkCache(const char* what, KVDtype dtype, const CacheAddressing& c, uint32_t maxLength) {
  checkAligned(what, "k", c.k, 16);
  checkAligned(what, "v", c.v, 16);
  const int64_t unit = 16 / elementBytes(dtype);  // elements in 16 bytes
  for (auto [name, stride] : {std::pair{"strides.row", c.rowStride}, {"strides.token", c.tokenStride},
                              {"strides.head", c.headStride}})
    if (stride < 0 || stride % unit != 0)
      invalid(what, std::string(name) + " must be a non-negative multiple of 16 bytes (" + std::to_string(unit) +
                        " elements), got " + std::to_string(stride));
  if (c.rows != 0 && c.rows % 4 != 0) invalid(what, "rows must be an int32 device array");
  if (c.paged) {
    if (c.rows == 0) invalid(what, "paged addressing needs a block table (an int32 device array)");
    if (c.blockSize == 0 || c.maxBlocksPerSequence == 0)
      invalid(what, "paged.blockSize and paged.maxBlocksPerSequence must be at least 1");
    if (uint64_t{c.maxBlocksPerSequence} * c.blockSize < maxLength)
      invalid(what, "the block table is too short: maxBlocksPerSequence × blockSize = " +
                        std::to_string(uint64_t{c.maxBlocksPerSequence} * c.blockSize) + " tokens, less than maxLength " +
                        std::to_string(maxLength));
  }
  for (auto [name, scale] : {std::pair{"kvScale.k", c.kScale}, {"kvScale.v", c.vScale}})
    if (!(scale > 0.f) || !std::isfinite(scale)) invalid(what, std::string(name) + " must be a positive number");
  for (auto [name, address] : {std::pair{"kvScale.kPerHead", c.kScales}, {"kvScale.vPerHead", c.vScales}})
    if (address % 4 != 0) invalid(what, std::string(name) + " must be a float32 device array");
  if (dtype != KVDtype::Float8E4M3 && (c.kScale != 1.f || c.vScale != 1.f || c.kScales || c.vScales))
    invalid(what, "kvScale applies to float8_e4m3 caches only");
}

void checkTypes(const char* what, KVDtype dtype, QueryDtype query, uint32_t headDim) {
  if (headDimIndex(headDim) < 0)
    invalid(what, "headDim must be one of 64, 80, 96, 128, 192, 256, got " + std::to_string(headDim));
  if (dtype == KVDtype::Float16 && query != QueryDtype::Float16)
    invalid(what, "a float16 cache takes float16 queries");
  if (dtype == KVDtype::BFloat16 && query != QueryDtype::BFloat16)
    invalid(what, "a bfloat16 cache takes bfloat16 queries");
}

}  // namespace vat::kernels
