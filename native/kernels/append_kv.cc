#include "common/errors.h"
#include "driver/cuda_driver.h"
#include "kernels/argument_checks.h"
#include "kernels/decode_attention.h"
#include "kernels/kernel_modules.h"

namespace vat::kernels {

using namespace cu;

void checkAppendKV(const AppendKVCall& c) {
  const char* what = "appendKV";
  checkTypes(what, c.dtype, c.queryDtype, c.headDim);
  if (c.batch == 0 || c.batch > 65535) invalid(what, "batch must be between 1 and 65535");
  if (c.kvHeads == 0 || c.kvHeads > 65535) invalid(what, "kvHeads must be between 1 and 65535");
  if (c.newTokens == 0 || c.newTokens > 0x7fffffffu) invalid(what, "newTokens must be at least 1");
  if (c.maxLength > 0x7fffffffu) invalid(what, "maxLength must be below 2^31");
  checkAligned(what, "kNew", c.kNew, 16);
  checkAligned(what, "vNew", c.vNew, 16);
  checkAligned(what, "positions", c.positions, 4);
  if (c.counts % 4 != 0) invalid(what, "counts must be an int32 device array");
  checkCache(what, c.dtype, c.cache, c.maxLength);
}

void appendKV(const AppendKVCall& c) {
  checkAppendKV(c);
  const Functions& f = functionsFor(c.dtype, c.headDim);
  AppendParams p{};
  p.kNew = c.kNew;
  p.vNew = c.vNew;
  p.k = c.cache.k;
  p.v = c.cache.v;
  p.positions = c.positions;
  p.counts = c.counts;
  p.rows = c.cache.rows;
  p.kScales = c.cache.kScales;
  p.vScales = c.cache.vScales;
  p.rowStride = c.cache.rowStride;
  p.tokenStride = c.cache.tokenStride;
  p.headStride = c.cache.headStride;
  p.chunks = static_cast<long long>(uint64_t{c.batch} * c.newTokens * c.kvHeads * (c.headDim / 8));
  p.paged = c.cache.paged ? 1 : 0;
  p.maxBlocksPerSequence = static_cast<int>(c.cache.maxBlocksPerSequence);
  p.blockSize = static_cast<int>(c.cache.blockSize);
  p.newTokens = static_cast<int>(c.newTokens);
  p.kvHeads = static_cast<int>(c.kvHeads);
  p.maxLength = static_cast<int>(c.maxLength);
  p.kScale = c.cache.kScale;
  p.vScale = c.cache.vScale;
  p.queryBf16 = c.queryDtype == QueryDtype::BFloat16 ? 1 : 0;
  const uint64_t blocks = (static_cast<uint64_t>(p.chunks) + kAppendThreads - 1) / kAppendThreads;
  if (blocks > 0x7fffffffu) invalid("appendKV", "too many new tokens for one call");
  void* args[] = {&p};
  check(driver().cuLaunchKernel(f.append, static_cast<unsigned>(blocks), 1, 1, kAppendThreads, 1, 1, 0,
                                reinterpret_cast<CUstream>(c.stream), args, nullptr),
        "cuLaunchKernel");
}

}  // namespace vat::kernels
