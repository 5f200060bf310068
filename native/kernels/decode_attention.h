// Host side of the decode-attention kernels (decode_attention.cu): checks the
// arguments, plans the split of the KV length, loads the module for the
// element type and head dimension (once per context), and launches the
// partial kernel and, with more than one split, the reduce kernel. The
// caller makes the device's context current. Used by `vattention/testing`
// and the benchmarks; the cache itself never launches kernels.
#pragma once

#include <cstdint>

#include "kernels/attention_params.h"

namespace vat::kernels {

enum class KVDtype { Float16, BFloat16 };
enum class Addressing { Strided, Paged };

struct DecodeAttentionCall {
  KVDtype dtype = KVDtype::Float16;
  Addressing addressing = Addressing::Strided;
  uint32_t batch = 0, qHeads = 0, kvHeads = 0, headDim = 0;
  uint32_t maxLength = 0;   // at least every entry's length
  uint32_t splits = 0;      // 0 = planned from the device's multiprocessors
  float scale = 0.f;        // 0 = 1 / sqrt(headDim)
  uint64_t stream = 0;
  // Addresses and strides: AttentionParams's fields of the same names.
  uint64_t q = 0, k = 0, v = 0, out = 0, lengths = 0, rows = 0;
  int64_t rowStride = 0, tokenStride = 0, headStride = 0;
  uint32_t maxBlocksPerSequence = 0, blockSize = 0;
};

struct DecodeAttentionPlan {
  uint32_t splits = 0;
  uint32_t tokensPerSplit = 0;
};

// Throws ERR_INVALID_ARGUMENT for arguments the kernels cannot take (head
// dimension not 64/128/256, qHeads / kvHeads not 1, 2, 4 or 8, misaligned
// addresses or strides), ERR_CUDA for a failed launch.
DecodeAttentionPlan decodeAttention(const DecodeAttentionCall& call);

// The plan decodeAttention would use, without launching.
DecodeAttentionPlan planDecodeAttention(const DecodeAttentionCall& call, int multiprocessors);

}  // namespace vat::kernels
