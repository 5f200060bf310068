// What one block of the attention kernels works on (decode_attention.cu):
// its batch entry, KV head, query heads and tokens (the rows of its
// tensor-core tiles), the K/V tokens it reads, and in prefill each row's
// causal limits. Device code only.
#pragma once

#include "attention_elements.cuh"

namespace vat_attention {

// What one block works on: `tokens` query tokens (1 in decode) × `heads`
// query heads of one KV head, at most 16 rows; row r is token firstToken +
// r / heads, head firstHead + r % heads.
struct BlockWork {
  int b, kvHead, firstHead, heads, split;  // heads: query heads per token (≤ 16)
  int firstToken, tokens;                  // query tokens of this block (rows of q past the entry's count: padding)
  int count, length;                       // the entry's new tokens (prefill) and its length
  int begin, end;                          // K/V tokens this block reads
};

// Index of row r's query vector in q / out, -1 past the block's rows.
__device__ __forceinline__ long long queryIndex(const AttentionParams& p, const BlockWork& w, int r) {
  if (r >= w.heads * w.tokens) return -1;
  const long long token = static_cast<long long>(w.b) * p.queryTokens + w.firstToken + r / w.heads;
  return token * p.qHeads + w.firstHead + r % w.heads;
}

__device__ __forceinline__ BlockWork blockWork(const AttentionParams& p, int blockTokens) {
  BlockWork w;
  const int queryChunk = blockIdx.x % p.queryChunks;
  w.split = blockIdx.x / p.queryChunks;
  w.kvHead = blockIdx.y;
  w.b = blockIdx.z;
  w.firstHead = w.kvHead * p.group + queryChunk * vat::kernels::kHeadsPerBlock;
  w.heads = min(vat::kernels::kHeadsPerBlock, p.group - queryChunk * vat::kernels::kHeadsPerBlock);
  w.firstToken = 0;
  w.tokens = 1;
  const int length = __ldg(reinterpret_cast<const int*>(p.lengths) + w.b);
  w.count = 1;
  w.length = length;
  const int first = p.window > 0 ? max(0, length - p.window) : 0;
  // Each entry's tokens split evenly over the splits, in whole block tiles:
  // a short entry leaves its last splits empty, none is dropped.
  int perSplit = (length - first + p.splits - 1) / p.splits;
  perSplit = (perSplit + blockTokens - 1) / blockTokens * blockTokens;
  const long long begin = first + static_cast<long long>(w.split) * perSplit;
  w.begin = static_cast<int>(begin < length ? begin : length);
  w.end = static_cast<int>(begin + perSplit < length ? begin + perSplit : length);
  return w;
}

// Causal prefill, one split: grid (tokenChunks × queryChunks, kvHeads,
// batch). The block's new tokens are the last `count` of the entry's
// `length` (already appended); it reads K/V from the first token its
// earliest row may see (window) to its last row's position.
__device__ __forceinline__ BlockWork prefillWork(const AttentionParams& p) {
  BlockWork w;
  const int queryChunk = blockIdx.x % p.queryChunks;
  w.split = 0;
  w.kvHead = blockIdx.y;
  w.b = blockIdx.z;
  w.firstHead = w.kvHead * p.group + queryChunk * vat::kernels::kHeadsPerBlock;
  w.heads = min(vat::kernels::kHeadsPerBlock, p.group - queryChunk * vat::kernels::kHeadsPerBlock);
  w.firstToken = blockIdx.x / p.queryChunks * p.tokensPerBlock;
  w.tokens = min(p.tokensPerBlock, p.queryTokens - w.firstToken);
  w.length = __ldg(reinterpret_cast<const int*>(p.lengths) + w.b);
  const int count = p.counts ? __ldg(reinterpret_cast<const int*>(p.counts) + w.b) : p.queryTokens;
  w.count = max(0, min(min(count, p.queryTokens), w.length));
  const int live = min(w.tokens, w.count - w.firstToken);  // rows with a token
  w.begin = w.end = 0;
  if (live > 0) {
    const int firstPosition = w.length - w.count + w.firstToken;
    w.end = firstPosition + live;
    w.begin = p.window > 0 ? max(0, firstPosition + 1 - p.window) : 0;
  }
  return w;
}

// The K/V tokens [start, end) rows g and g + 8 of this thread attend:
// a prefill row its causal prefix (the last `window` of it), nothing for a
// padding row.
struct RowLimits {
  int start[2], end[2];
};

__device__ __forceinline__ RowLimits rowLimits(const AttentionParams& p, const BlockWork& w, int lane) {
  RowLimits lim;
#pragma unroll
  for (int r = 0; r < 2; r++) {
    const int row = lane / 4 + r * 8;
    const int token = w.firstToken + row / w.heads;
    const bool live = row < w.heads * w.tokens && token < w.count;
    lim.end[r] = live ? w.length - w.count + token + 1 : 0;
    lim.start[r] = live && p.window > 0 ? max(0, lim.end[r] - p.window) : 0;
  }
  return lim;
}

}  // namespace vat_attention
