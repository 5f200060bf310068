// Host side of the attention kernels (decode_attention.cu), the
// `vattention/kernels` entry point: checks the arguments (every check before
// any driver call), plans the split of the KV length from the live lengths,
// loads the module for the cache's element type and head dimension (once per
// context), and launches. The caller makes the device's context current
// (useDevice). The cache itself never launches kernels.
#pragma once

#include <cstdint>

#include "kernels/attention_params.h"

namespace vat::kernels {

enum class KVDtype { Float16, BFloat16, Float8E4M3 };
enum class QueryDtype { Float16, BFloat16 };

// Where K and V rows are; shared by decode and append.
struct CacheAddressing {
  bool paged = false;
  uint64_t k = 0, v = 0;
  uint64_t rows = 0;  // strided: int32 [batch] rows (0 = entry i is row i); paged: the block table
  int64_t rowStride = 0, tokenStride = 0, headStride = 0;  // elements
  uint32_t maxBlocksPerSequence = 0, blockSize = 0;        // paged
  // fp8: dequantisation scales (stored × scale = value): per tensor, and
  // optionally per KV head (float32 [kvHeads] device arrays, 0 = none).
  float kScale = 1.f, vScale = 1.f;
  uint64_t kScales = 0, vScales = 0;
};

// A device buffer the caller owns for the splits' partial results.
struct Workspace {
  uint64_t address = 0;
  uint64_t bytes = 0;
};

struct DecodeAttentionCall {
  KVDtype dtype = KVDtype::Float16;
  QueryDtype queryDtype = QueryDtype::Float16;
  uint32_t batch = 0, qHeads = 0, kvHeads = 0, headDim = 0;
  uint32_t maxLength = 0;       // at least every entry's length
  uint32_t longestLength = 0;   // the longest live length, for the plan (≤ maxLength)
  uint32_t splits = 0;          // 0 = planned
  uint32_t window = 0;          // 0 = attend every token
  float scale = 0.f;            // 0 = 1 / sqrt(headDim)
  float softcap = 0.f;          // 0 = none
  uint64_t stream = 0;
  uint64_t q = 0, out = 0, lengths = 0;
  // Causal prefill when above 1: q and out hold [batch, queryTokens, qHeads,
  // headDim], entry b's new tokens the last counts[b] (int32 device array; 0
  // = all queryTokens) of its lengths[b]; one split, no workspace.
  uint32_t queryTokens = 1;
  uint64_t counts = 0;
  CacheAddressing cache;
  Workspace workspace;  // address 0: the stream's own (grown on first need)
};

struct DecodeAttentionPlan {
  uint32_t splits = 0;
  uint32_t tokensPerSplit = 0;   // of the longest entry
  uint32_t headsPerBlock = 0;    // query heads one block computes (≤ 16)
  uint64_t workspaceBytes = 0;
};

struct AppendKVCall {
  KVDtype dtype = KVDtype::Float16;
  QueryDtype queryDtype = QueryDtype::Float16;
  uint32_t batch = 0, newTokens = 0, kvHeads = 0, headDim = 0;
  uint32_t maxLength = 0;  // no token is written at or past it
  uint64_t stream = 0;
  uint64_t kNew = 0, vNew = 0, positions = 0, counts = 0;
  CacheAddressing cache;
};

// Throws ERR_INVALID_ARGUMENT for arguments the kernels cannot take (head
// dimension outside the set, misaligned addresses or strides, a block table
// shorter than maxLength, a workspace too small, ...) before any driver
// call; ERR_INVALID_STATE when the stream's workspace must grow while the
// stream is being captured; ERR_CUDA for a failed launch.
DecodeAttentionPlan decodeAttention(const DecodeAttentionCall& call);

// The plan decodeAttention would use on the current device, without launching.
DecodeAttentionPlan planDecodeAttention(const DecodeAttentionCall& call);

// Checks a decode call as decodeAttention does, without the driver.
void checkDecodeAttention(const DecodeAttentionCall& call);

void appendKV(const AppendKVCall& call);
void checkAppendKV(const AppendKVCall& call);

// Makes the primary context of `device` current on this thread (retained
// once for the process).
void useDevice(int device);

// The default workspace decodeAttention keeps for `stream` on the current
// context goes, after the stream's work: false when it keeps none for it.
// attentionKeepsStreams: whether it keeps any (no driver call).
bool releaseAttentionStream(uint64_t stream);
bool attentionKeepsStreams();

// Device buffers for caller-owned workspaces.
uint64_t allocateWorkspace(uint64_t bytes);
void freeWorkspace(uint64_t address);

}  // namespace vat::kernels
