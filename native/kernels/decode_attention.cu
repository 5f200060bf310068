// Decode attention (one query token per sequence) and the append of new
// tokens' K/V, over a KV cache in two addressing modes that differ only in
// where a token's row is:
//   strided  base + row × rowStride + token × tokenStride + head × headStride
//            (every layout of this cache, and any plain [B, T, H, D] tensor)
//   paged    base + table[b][token / blockSize] × rowStride
//            + (token % blockSize) × tokenStride + head × headStride
//            (vLLM-style blocks [numBlocks, blockSize, kvHeads, headDim])
//
// Decode: a block handles one KV head and up to 8 of the query heads that
// share it (grouped-query attention), so each K/V row is read once for them.
// Bandwidth comes from bytes in flight: each warp streams its own tokens'
// K and V rows into shared memory with cp.async, kAttentionStages tiles
// ahead of the one it computes (no block-wide barrier in the loop). fp16,
// bf16 or fp8 (e4m3) K/V, fp32 accumulation, online softmax in base 2,
// optional sliding window and logit soft-cap. The KV length of each entry is
// split evenly over `splits` blocks (flash-decoding); each writes its running
// max, sum and unnormalised output and vat_attention_reduce combines them.
// With one split the partial kernel writes the output itself.
//
// scripts/gen-ptx.sh compiles this file to PTX (decode_attention_ptx.cc) once
// per (K/V type, head dimension): compute_80 for 16-bit caches,
// compute_89 for fp8 (the hardware conversions); the driver JIT-compiles a
// module for the GPU at hand the first time it is used.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "attention_params.h"

using vat::kernels::AppendParams;
using vat::kernels::AttentionParams;
using vat::kernels::kAppendThreads;
using vat::kernels::kAttentionStages;
using vat::kernels::kAttentionThreads;
using vat::kernels::kAttentionWarps;

// A named namespace, not an anonymous one: nvcc names symbols of the
// templates below after it, and an anonymous namespace's name hashes the
// file's path, so the PTX would differ between checkouts (npm run check:kernels).
namespace vat_attention {

constexpr float kNegInf = -__builtin_huge_valf();
constexpr float kLog2e = 1.4426950408889634f;

// One byte per element, e4m3 ("fn": no infinities, ±448 at most).
struct Fp8E4M3 {};

template <typename T>
struct Element {
  static constexpr int kBytes = 2;
  using Lane = uint4;  // the 8 elements one lane holds
};
template <>
struct Element<Fp8E4M3> {
  static constexpr int kBytes = 1;
  using Lane = uint2;
};

__device__ __forceinline__ void toFloats(const uint4& raw, float (&out)[8], __half) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; i++) {
    float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void toFloats(const uint4& raw, float (&out)[8], __nv_bfloat16) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; i++) {
    float2 f = __bfloat1622float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void toFloats(const uint2& raw, float (&out)[8], Fp8E4M3) {
  const __nv_fp8x2_storage_t* pairs = reinterpret_cast<const __nv_fp8x2_storage_t*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; i++) {
    __half2 h(__nv_cvt_fp8x2_to_halfraw2(pairs[i], __NV_E4M3));
    float2 f = __half22float2(h);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// Queries and outputs are fp16 or bf16, chosen per call (p.queryBf16): one
// module per cache type, not per pair of types.
__device__ __forceinline__ void queryToFloats(const uint4& raw, float (&out)[8], int bf16) {
  if (bf16)
    toFloats(raw, out, __nv_bfloat16());
  else
    toFloats(raw, out, __half());
}
__device__ __forceinline__ void storeQueryType(void* base, long long index, float f, int bf16) {
  if (bf16)
    reinterpret_cast<__nv_bfloat16*>(base)[index] = __float2bfloat16_rn(f);
  else
    reinterpret_cast<__half*>(base)[index] = __float2half_rn(f);
}

// Eight floats in the cache's element type.
__device__ __forceinline__ uint4 fromFloats(const float (&f)[8], __half) {
  uint4 raw;
  __half2* h = reinterpret_cast<__half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; i++) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
  return raw;
}
__device__ __forceinline__ uint4 fromFloats(const float (&f)[8], __nv_bfloat16) {
  uint4 raw;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; i++) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return raw;
}
__device__ __forceinline__ uint2 fromFloats(const float (&f)[8], Fp8E4M3) {
  uint2 raw;
  __nv_fp8x2_storage_t* pairs = reinterpret_cast<__nv_fp8x2_storage_t*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; i++) pairs[i] = __nv_cvt_float2_to_fp8x2(make_float2(f[2 * i], f[2 * i + 1]), __NV_SATFINITE, __NV_E4M3);
  return raw;
}

// exp2(m - mNew), 0 for a state that has seen no token (m = -inf).
__device__ __forceinline__ float rescale(float m, float mNew) { return m == kNegInf ? 0.f : exp2f(m - mNew); }

// Element offset of token t's row of KV head `head` for batch entry b.
template <typename P>
__device__ __forceinline__ long long rowOffset(const P& p, int b, int t, int head) {
  if (p.paged) {
    const int* table = reinterpret_cast<const int*>(p.rows) + static_cast<long long>(b) * p.maxBlocksPerSequence;
    long long block = __ldg(table + t / p.blockSize);
    return block * p.rowStride + static_cast<long long>(t % p.blockSize) * p.tokenStride + head * p.headStride;
  }
  long long row = p.rows ? __ldg(reinterpret_cast<const int*>(p.rows) + b) : b;
  return row * p.rowStride + static_cast<long long>(t) * p.tokenStride + head * p.headStride;
}

// The dequantisation scale of KV head `head`: per tensor × per head.
__device__ __forceinline__ float headScale(float tensorScale, unsigned long long perHead, int head) {
  return perHead ? tensorScale * __ldg(reinterpret_cast<const float*>(perHead) + head) : tensorScale;
}

// ---- cp.async -----------------------------------------------------------------

__device__ __forceinline__ unsigned sharedAddress(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
// 16 bytes global → shared through L2 only; `bytes` 0 writes zeros and reads nothing.
__device__ __forceinline__ void copy16(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sharedAddress(dst)), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void commitCopies() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void waitCopies() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// ---- online softmax -------------------------------------------------------------

// One lane's share of the G query heads' online softmax: running max m,
// sum l and unnormalised output acc over its 8 elements of the head.
template <int G>
struct SoftmaxState {
  float m[G], l[G], acc[G][8];

  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int g = 0; g < G; g++) {
      m[g] = kNegInf;
      l[g] = 0.f;
#pragma unroll
      for (int i = 0; i < 8; i++) acc[g][i] = 0.f;
    }
  }

  // The G maxima raised over the valid scores of kCount tokens: one rescale
  // of the accumulator per pass group, not per token.
  template <int kCount>
  __device__ __forceinline__ void raiseMax(const float (&s)[kCount][G], const bool (&valid)[kCount]) {
#pragma unroll
    for (int g = 0; g < G; g++) {
      float mNew = m[g];
#pragma unroll
      for (int u = 0; u < kCount; u++)
        if (valid[u]) mNew = fmaxf(mNew, s[u][g]);
      const float old = rescale(m[g], mNew);
      l[g] *= old;
#pragma unroll
      for (int i = 0; i < 8; i++) acc[g][i] *= old;
      m[g] = mNew;
    }
  }

  __device__ __forceinline__ void addValue(const float (&s)[G], const float (&vf)[8]) {
#pragma unroll
    for (int g = 0; g < G; g++) {
      const float w = exp2f(s[g] - m[g]);
      l[g] += w;
#pragma unroll
      for (int i = 0; i < 8; i++) acc[g][i] = fmaf(w, vf[i], acc[g][i]);
    }
  }

  // Merges the states of lanes `off` apart (another token group of the warp).
  __device__ __forceinline__ void mergeLanes(int off) {
#pragma unroll
    for (int g = 0; g < G; g++) {
      float mo = __shfl_xor_sync(0xffffffffu, m[g], off), lo = __shfl_xor_sync(0xffffffffu, l[g], off);
      float mNew = fmaxf(m[g], mo);
      float a = rescale(m[g], mNew), c = rescale(mo, mNew);
      l[g] = l[g] * a + lo * c;
#pragma unroll
      for (int i = 0; i < 8; i++) acc[g][i] = acc[g][i] * a + __shfl_xor_sync(0xffffffffu, acc[g][i], off) * c;
      m[g] = mNew;
    }
  }
};

// ---- decode -----------------------------------------------------------------------

// What one block of the decode kernel works on.
struct BlockWork {
  int b, kvHead, firstHead, heads, split;  // heads: query heads of this block (≤ G)
  int begin, end;                          // tokens of this split
};

__device__ __forceinline__ BlockWork blockWork(const AttentionParams& p, int headsPerBlock, int blockTokens) {
  BlockWork w;
  const int queryChunk = blockIdx.x % p.queryChunks;
  w.split = blockIdx.x / p.queryChunks;
  w.kvHead = blockIdx.y;
  w.b = blockIdx.z;
  w.firstHead = w.kvHead * p.group + queryChunk * headsPerBlock;
  w.heads = min(headsPerBlock, p.group - queryChunk * headsPerBlock);
  const int length = __ldg(reinterpret_cast<const int*>(p.lengths) + w.b);
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

// This lane's 8 elements of the block's query heads, scaled so that a dot
// product with a stored K row is the logit (soft-capped: in natural units,
// else already in base 2). Heads past the block's count and idle lanes read 0.
template <int D, int G>
__device__ __forceinline__ void loadQuery(const AttentionParams& p, const BlockWork& w, int chunk, bool active,
                                          float (&q)[G][8]) {
  const float kScale = headScale(p.kScale, p.kScales, w.kvHead);
  const float factor = p.scale * kScale * (p.softcap > 0.f ? 1.f : kLog2e);
#pragma unroll
  for (int g = 0; g < G; g++) {
    if (g < w.heads && active) {
      const uint4* row = reinterpret_cast<const uint4*>(p.q) + (static_cast<long long>(w.b) * p.qHeads + w.firstHead + g) * (D / 8);
      queryToFloats(__ldg(row + chunk), q[g], p.queryBf16);
#pragma unroll
      for (int i = 0; i < 8; i++) q[g][i] *= factor;
    } else {
#pragma unroll
      for (int i = 0; i < 8; i++) q[g][i] = 0.f;
    }
  }
}

// The G logits (base 2) of one token: a dot product over the kLanes lanes of its row.
template <typename Kv, int G, int kLanes>
__device__ __forceinline__ void scoreToken(const AttentionParams& p, const float (&q)[G][8],
                                           const typename Element<Kv>::Lane& kRaw, float (&s)[G]) {
  float kf[8];
  toFloats(kRaw, kf, Kv());
#pragma unroll
  for (int g = 0; g < G; g++) {
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < 8; i++) dot = fmaf(q[g][i], kf[i], dot);
#pragma unroll
    for (int off = kLanes / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    s[g] = p.softcap > 0.f ? p.softcap * kLog2e * tanhf(dot / p.softcap) : dot;
  }
}

// Queues the copies of one warp's stage: its kWarpTokens rows of K and of V
// from token t0 on, rows at or past `end` zero-filled.
template <typename Kv, int D>
__device__ __forceinline__ void loadStage(const AttentionParams& p, const BlockWork& w, int t0, int lane,
                                          unsigned char* kDst, unsigned char* vDst) {
  constexpr auto kT = vat::kernels::tilingFor(D, Element<Kv>::kBytes);
  constexpr int kRowChunks = kT.rowBytes / 16;
  constexpr int kChunks = kT.warpTokens * kRowChunks;
  // Lane i finds row i's offset once; the copies take it by shuffle.
  long long offset = 0;
  const int t = t0 + lane;
  const bool mine = lane < kT.warpTokens && t < w.end;
  if (mine) offset = rowOffset(p, w.b, t, w.kvHead) * Element<Kv>::kBytes;
  const unsigned char* kSrc = reinterpret_cast<const unsigned char*>(p.k);
  const unsigned char* vSrc = reinterpret_cast<const unsigned char*>(p.v);
#pragma unroll
  for (int base = 0; base < kChunks; base += 32) {
    const int i = base + lane;
    const int r = min(i / kRowChunks, kT.warpTokens - 1), c = i % kRowChunks;
    const long long at = __shfl_sync(0xffffffffu, offset, r) + c * 16;
    const bool valid = __shfl_sync(0xffffffffu, mine, r);
    if (i < kChunks) {
      const int bytes = valid ? 16 : 0;
      copy16(kDst + r * kT.rowBytes + c * 16, valid ? kSrc + at : kSrc, bytes);
      copy16(vDst + r * kT.rowBytes + c * 16, valid ? vSrc + at : vSrc, bytes);
    }
  }
}

// Scores and accumulates one warp's stage of K/V rows (in shared memory).
template <typename Kv, int D, int G>
__device__ __forceinline__ void computeStage(const AttentionParams& p, SoftmaxState<G>& st, const float (&q)[G][8],
                                             const unsigned char* kRows, const unsigned char* vRows, int t0, int end,
                                             int sub, int chunk, bool active) {
  constexpr auto kT = vat::kernels::tilingFor(D, Element<Kv>::kBytes);
  constexpr int kGroup = 4;  // tokens' passes per raise of the maxima
  using Lane = typename Element<Kv>::Lane;
  const int laneBytes = chunk * 8 * Element<Kv>::kBytes;
#pragma unroll
  for (int first = 0; first < kT.unroll; first += kGroup) {
    float s[kGroup][G];
    bool valid[kGroup];
#pragma unroll
    for (int u = 0; u < kGroup; u++) {
      const int row = (first + u) * kT.tokensAtOnce + sub;
      valid[u] = t0 + row < end;
      Lane raw{};
      if (active) raw = *reinterpret_cast<const Lane*>(kRows + row * kT.rowBytes + laneBytes);
      scoreToken<Kv, G, kT.lanes>(p, q, raw, s[u]);
    }
    st.template raiseMax<kGroup>(s, valid);
#pragma unroll
    for (int u = 0; u < kGroup; u++) {
      if (!valid[u] || !active) continue;
      const int row = (first + u) * kT.tokensAtOnce + sub;
      float vf[8];
      toFloats(*reinterpret_cast<const Lane*>(vRows + row * kT.rowBytes + laneBytes), vf, Kv());
      st.addValue(s[u], vf);
    }
  }
}

// Merges the warps' states through shared memory (the pipeline's, drained)
// and writes the split's result: the output itself with one split, else its
// partial state. V's dequantisation scale applies here (it is linear).
template <int D, int G>
__device__ __forceinline__ void storeSplit(const AttentionParams& p, const SoftmaxState<G>& st, const BlockWork& w,
                                           int warp, int sub, int chunk, bool active, unsigned char* shared) {
  float* sAcc = reinterpret_cast<float*>(shared);             // [kWarps][G][D]
  float* sMax = sAcc + kAttentionWarps * G * D;                // [kWarps][G]
  float* sSum = sMax + kAttentionWarps * G;                    // [kWarps][G]
  if (sub == 0 && active) {
#pragma unroll
    for (int g = 0; g < G; g++) {
#pragma unroll
      for (int i = 0; i < 8; i++) sAcc[(warp * G + g) * D + chunk * 8 + i] = st.acc[g][i];
      if (chunk == 0) {
        sMax[warp * G + g] = st.m[g];
        sSum[warp * G + g] = st.l[g];
      }
    }
  }
  __syncthreads();
  const float vScale = headScale(p.vScale, p.vScales, w.kvHead);
  for (int idx = threadIdx.x; idx < w.heads * D; idx += kAttentionThreads) {
    const int g = idx / D, d = idx % D;
    float mAll = kNegInf;
#pragma unroll
    for (int k = 0; k < kAttentionWarps; k++) mAll = fmaxf(mAll, sMax[k * G + g]);
    float sum = 0.f, value = 0.f;
#pragma unroll
    for (int k = 0; k < kAttentionWarps; k++) {
      const float c = rescale(sMax[k * G + g], mAll);
      sum += sSum[k * G + g] * c;
      value += sAcc[(k * G + g) * D + d] * c;
    }
    value *= vScale;
    const long long head = static_cast<long long>(w.b) * p.qHeads + w.firstHead + g;
    if (p.splits == 1) {
      storeQueryType(reinterpret_cast<void*>(p.out), head * D + d, sum > 0.f ? value / sum : 0.f, p.queryBf16);
    } else {
      reinterpret_cast<float*>(p.partialAcc)[(head * p.splits + w.split) * D + d] = value;
      if (d == 0) reinterpret_cast<float2*>(p.partialMaxSum)[head * p.splits + w.split] = make_float2(mAll, sum);
    }
  }
}

// One split of one (entry, KV head, query-head chunk): grid (splits ×
// queryChunks, kvHeads, batch), chunks of one split adjacent so that they
// read the same rows close together (the second from L2).
template <typename Kv, int D, int G>
__device__ void partialAttention(const AttentionParams& p) {
  constexpr auto kT = vat::kernels::tilingFor(D, Element<Kv>::kBytes);
  static_assert(D % 16 == 0 && D / 8 <= 32, "head dim must be a multiple of 16, at most 256");
  extern __shared__ __align__(16) unsigned char shared[];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub = lane / kT.lanes, chunk = lane % kT.lanes;
  const bool active = chunk < D / 8;
  const BlockWork w = blockWork(p, G, kT.blockTokens);

  float q[G][8];
  loadQuery<D, G>(p, w, chunk, active, q);
  SoftmaxState<G> st;
  st.clear();

  unsigned char* kStages = shared + warp * kAttentionStages * 2 * kT.stageBytes;
  unsigned char* vStages = kStages + kAttentionStages * kT.stageBytes;
  const int tiles = (w.end - w.begin + kT.blockTokens - 1) / kT.blockTokens;
  const int warpFirst = w.begin + warp * kT.warpTokens;  // this warp's first token of tile 0
  // Prologue: kAttentionStages - 1 tiles in flight. A group is committed
  // even when empty, so that wait_group counts the same in every warp.
#pragma unroll
  for (int s = 0; s < kAttentionStages - 1; s++) {
    if (s < tiles)
      loadStage<Kv, D>(p, w, warpFirst + s * kT.blockTokens, lane, kStages + s * kT.stageBytes, vStages + s * kT.stageBytes);
    commitCopies();
  }
  for (int tile = 0; tile < tiles; tile++) {
    waitCopies<kAttentionStages - 2>();
    __syncwarp();
    const int stage = tile % kAttentionStages;
    const int t0 = warpFirst + tile * kT.blockTokens;
    computeStage<Kv, D, G>(p, st, q, kStages + stage * kT.stageBytes, vStages + stage * kT.stageBytes, t0, w.end, sub,
                           chunk, active);
    __syncwarp();  // every lane is done with the stage the next copy overwrites
    const int next = tile + kAttentionStages - 1;
    if (next < tiles) {
      const int ns = next % kAttentionStages;
      loadStage<Kv, D>(p, w, warpFirst + next * kT.blockTokens, lane, kStages + ns * kT.stageBytes,
                       vStages + ns * kT.stageBytes);
    }
    commitCopies();
  }
  waitCopies<0>();

  // Merge the tokens-at-once groups of the warp (lanes kT.lanes apart).
#pragma unroll
  for (int off = kT.lanes; off < 32; off *= 2) st.mergeLanes(off);
  __syncthreads();  // every warp is done with the pipeline's buffers
  storeSplit<D, G>(p, st, w, warp, sub, chunk, active, shared);
}

// Combines the splits of one (entry, query head): grid (qHeads, batch), D threads.
template <int D>
__device__ void reduceSplits(const AttentionParams& p) {
  const long long head = static_cast<long long>(blockIdx.y) * p.qHeads + blockIdx.x;
  const float2* ms = reinterpret_cast<const float2*>(p.partialMaxSum) + head * p.splits;
  const float* acc = reinterpret_cast<const float*>(p.partialAcc) + head * p.splits * D;
  const int d = threadIdx.x;
  float mAll = kNegInf;
  for (int s = 0; s < p.splits; s++) mAll = fmaxf(mAll, ms[s].x);
  float sum = 0.f, value = 0.f;
  for (int s = 0; s < p.splits; s++) {
    float c = rescale(ms[s].x, mAll);
    sum += ms[s].y * c;
    value += acc[s * D + d] * c;
  }
  storeQueryType(reinterpret_cast<void*>(p.out), head * D + d, sum > 0.f ? value / sum : 0.f, p.queryBf16);
}

// ---- append -------------------------------------------------------------------------

// Writes new tokens' K and V ([batch, newTokens, kvHeads, D], query type)
// into the cache at each entry's position, converted to the cache's type
// (fp8: divided by the dequantisation scale, saturated). One thread per 8
// elements of K and the same 8 of V; grid (ceil(chunks / threads)).
template <typename Kv, int D>
__device__ void appendTokens(const AppendParams& p) {
  constexpr int kChunksPerRow = D / 8;
  const long long i = static_cast<long long>(blockIdx.x) * kAppendThreads + threadIdx.x;
  if (i >= p.chunks) return;
  const int c = static_cast<int>(i % kChunksPerRow);
  const long long rowIndex = i / kChunksPerRow;  // (b, n, head)
  const int head = static_cast<int>(rowIndex % p.kvHeads);
  const long long token = rowIndex / p.kvHeads;
  const int n = static_cast<int>(token % p.newTokens), b = static_cast<int>(token / p.newTokens);
  const int count = p.counts ? __ldg(reinterpret_cast<const int*>(p.counts) + b) : p.newTokens;
  if (n >= count) return;
  const int t = __ldg(reinterpret_cast<const int*>(p.positions) + b) + n;
  if (t < 0 || t >= p.maxLength) return;
  const long long at = rowOffset(p, b, t, head) + c * 8;
  const uint4* kIn = reinterpret_cast<const uint4*>(p.kNew) + i;
  const uint4* vIn = reinterpret_cast<const uint4*>(p.vNew) + i;
  using Lane = typename Element<Kv>::Lane;
  Lane* kOut = reinterpret_cast<Lane*>(reinterpret_cast<unsigned char*>(p.k) + at * Element<Kv>::kBytes);
  Lane* vOut = reinterpret_cast<Lane*>(reinterpret_cast<unsigned char*>(p.v) + at * Element<Kv>::kBytes);
  float kf[8], vf[8];
  queryToFloats(__ldg(kIn), kf, p.queryBf16);
  queryToFloats(__ldg(vIn), vf, p.queryBf16);
  const float kInv = 1.f / headScale(p.kScale, p.kScales, head), vInv = 1.f / headScale(p.vScale, p.vScales, head);
#pragma unroll
  for (int e = 0; e < 8; e++) {
    kf[e] *= kInv;
    vf[e] *= vInv;
  }
  *kOut = fromFloats(kf, Kv());
  *vOut = fromFloats(vf, Kv());
}

}  // namespace vat_attention

// Entry points with plain names for cuModuleGetFunction, per module:
//   vat_attention_g<G>     G query heads per block (1, 2, 4, 8)
//   vat_attention_reduce   the splits' combination
//   vat_append_kv          appendKV
#ifndef VAT_HEAD_DIM_VALUE
#define VAT_HEAD_DIM_VALUE 128
#endif
#if defined(VAT_KV_FP8)
using KvType = vat_attention::Fp8E4M3;
#elif defined(VAT_KV_BF16)
using KvType = __nv_bfloat16;
#else
using KvType = __half;
#endif
constexpr int kHeadDim = VAT_HEAD_DIM_VALUE;

#define VAT_PARTIAL(G)                                                                   \
  extern "C" __global__ void __launch_bounds__(kAttentionThreads) vat_attention_g##G(AttentionParams p) { \
    vat_attention::partialAttention<KvType, kHeadDim, G>(p);                  \
  }
VAT_PARTIAL(1)
VAT_PARTIAL(2)
VAT_PARTIAL(4)
VAT_PARTIAL(8)

extern "C" __global__ void vat_attention_reduce(AttentionParams p) { vat_attention::reduceSplits<kHeadDim>(p); }

extern "C" __global__ void __launch_bounds__(kAppendThreads) vat_append_kv(AppendParams p) {
  vat_attention::appendTokens<KvType, kHeadDim>(p);
}
