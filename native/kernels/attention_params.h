// The one argument of the decode-attention kernels, shared by the CUDA source
// (decode_attention.cu) and the host launcher (decode_attention.cc): plain
// fixed-width fields only, so both compilers lay it out the same way.
#pragma once

namespace vat::kernels {

struct AttentionParams {
  unsigned long long q;              // [batch, qHeads, headDim], contiguous, K/V's dtype
  unsigned long long k;              // K base address
  unsigned long long v;              // V base address (same strides as K)
  unsigned long long out;            // [batch, qHeads, headDim], contiguous
  unsigned long long partialAcc;     // float [batch, qHeads, splits, headDim] (splits > 1)
  unsigned long long partialMaxSum;  // float2 [batch, qHeads, splits]: running max (log2 units) and sum
  unsigned long long lengths;        // int32 [batch]: tokens of each entry
  // strided: int32 [batch], the row (cache slot) of each entry; 0 = entry i is row i.
  // paged: int32 [batch, maxBlocksPerSequence] block table.
  unsigned long long rows;
  // Element strides. strided: rowStride = a sequence's, tokenStride = a
  // token's. paged: rowStride = a block's, tokenStride = a token's in a block.
  long long rowStride;
  long long tokenStride;
  long long headStride;
  int maxBlocksPerSequence;  // paged
  int blockSize;             // paged
  int qHeads;
  int kvHeads;
  int splits;
  int tokensPerSplit;
  float scaleLog2;  // softmax scale × log2(e): scores are taken in base 2
  int pad;
};

// Threads per block of the partial kernel (4 warps).
constexpr int kAttentionThreads = 128;

}  // namespace vat::kernels
