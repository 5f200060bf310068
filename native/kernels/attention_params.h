// The arguments of the attention kernels, shared by the CUDA sources
// (decode_attention.cu) and the host launchers (decode_attention.cc,
// append_kv.cc): plain fixed-width fields only, so both compilers lay them out
// the same way; and the tiling of the decode kernel, which the host needs for
// its shared-memory size and its plan.
#pragma once

#ifdef __CUDACC__
#define VAT_HOST_DEVICE __host__ __device__
#else
#define VAT_HOST_DEVICE
#endif

namespace vat::kernels {

struct AttentionParams {
  unsigned long long q;              // [batch, qHeads, headDim], contiguous, in the query type
  unsigned long long k;              // K base address
  unsigned long long v;              // V base address (same strides as K)
  unsigned long long out;            // [batch, qHeads, headDim], contiguous, in the query type
  unsigned long long partialAcc;     // float [batch, qHeads, splits, headDim] (splits > 1)
  unsigned long long partialMaxSum;  // float2 [batch, qHeads, splits]: running max (log2 units) and sum
  unsigned long long lengths;        // int32 [batch]: tokens of each entry
  // strided: int32 [batch], the row (cache slot) of each entry; 0 = entry i is row i.
  // paged: int32 [batch, maxBlocksPerSequence] block table.
  unsigned long long rows;
  unsigned long long kScales;  // float [kvHeads] per-head dequantisation scales of K (fp8), 0 = none
  unsigned long long vScales;  // the same for V
  // Prefill (queryTokens > 1): int32 [batch], new tokens of each entry (≤
  // queryTokens, the last of its `lengths` tokens); 0 = all queryTokens.
  unsigned long long counts;
  // Element strides. strided: rowStride = a sequence's, tokenStride = a
  // token's. paged: rowStride = a block's, tokenStride = a token's in a block.
  long long rowStride;
  long long tokenStride;
  long long headStride;
  int paged;
  int maxBlocksPerSequence;  // paged
  int blockSize;             // paged
  int qHeads;
  int kvHeads;
  int group;        // qHeads / kvHeads
  int queryChunks;  // blocks per KV head: ceil(group / the kernel's heads per block)
  int splits;
  int window;       // attend the last `window` tokens only; 0 = all
  float scale;      // softmax scale
  float softcap;    // logits = softcap × tanh(logits / softcap); 0 = none
  float kScale;     // per-tensor dequantisation scales (fp8; 1 otherwise)
  float vScale;
  int queryBf16;  // q and out: 1 = bf16, 0 = fp16
  // Query tokens per entry: 1 = decode; more = causal prefill, q and out
  // [batch, queryTokens, qHeads, headDim], each token attending the tokens
  // up to its own position.
  int queryTokens;
  int tokensPerBlock;  // prefill: query tokens one block computes (16 / min(group, 16))
};

struct AppendParams {
  unsigned long long kNew;       // [batch, newTokens, kvHeads, headDim], contiguous, in the query type
  unsigned long long vNew;
  unsigned long long k;          // cache bases, as in AttentionParams
  unsigned long long v;
  unsigned long long positions;  // int32 [batch]: where entry b's first new token goes
  unsigned long long counts;     // int32 [batch]: new tokens of entry b (≤ newTokens); 0 = all newTokens
  unsigned long long rows;       // as in AttentionParams
  unsigned long long kScales;    // as in AttentionParams (the cache's dequantisation scales)
  unsigned long long vScales;
  long long rowStride;
  long long tokenStride;
  long long headStride;
  long long chunks;  // batch × newTokens × kvHeads × headDim / 8
  int paged;
  int maxBlocksPerSequence;
  int blockSize;
  int newTokens;
  int kvHeads;
  int maxLength;  // no token is written at or past it
  float kScale;
  float vScale;
  int queryBf16;  // kNew and vNew: 1 = bf16, 0 = fp16
  int pad;
};

// Threads per block of the decode kernel (4 warps) and of the append kernel.
constexpr int kAttentionThreads = 128;
constexpr int kAttentionWarps = kAttentionThreads / 32;
constexpr int kAppendThreads = 256;
// Query heads one block computes: the 16 rows of a tensor-core tile (a
// group of up to 16 reads each K/V row once; larger groups take several
// blocks per KV head, adjacent so that the second read hits L2).
constexpr int kHeadsPerBlock = 16;
// Tokens one warp loads per pipeline stage: two 8-token tiles of the
// score MMA, one 16-token step of the value MMA.
constexpr int kWarpTokens = 16;

// How the decode kernel stages K and V in shared memory for head dimension D
// and elements of `elementBytes`: rows padded by 16 bytes (so the 8 rows an
// ldmatrix reads fall in different banks), `stages` tiles per warp in flight
// (cp.async groups), as many as fit in 26 KiB per warp (two blocks of 4
// warps to a multiprocessor's 227 KiB for head dim 128), 2 to 4.
struct Tiling {
  int rowBytes, rowStride, stageBytes, stages, blockTokens, pipelineBytes;
};

VAT_HOST_DEVICE constexpr Tiling tilingFor(int headDim, int elementBytes) {
  const int rowBytes = headDim * elementBytes;
  const int rowStride = rowBytes + 16;
  const int stageBytes = kWarpTokens * rowStride;  // of K (and again of V), one warp
  const int fit = 26624 / (2 * stageBytes);
  const int stages = fit < 2 ? 2 : fit > 4 ? 4 : fit;
  return {rowBytes, rowStride, stageBytes, stages, kAttentionWarps * kWarpTokens,
          kAttentionWarps * stages * 2 * stageBytes};
}

// Dynamic shared memory of the decode kernel: the pipeline's buffers, reused
// at the end to merge the warps' states.
VAT_HOST_DEVICE constexpr int attentionSharedBytes(int headDim, int elementBytes) {
  const int merge = kAttentionWarps * kHeadsPerBlock * (headDim + 2) * 4;
  const int pipeline = tilingFor(headDim, elementBytes).pipelineBytes;
  return pipeline > merge ? pipeline : merge;
}

}  // namespace vat::kernels
