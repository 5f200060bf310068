// Decode attention (one query token per sequence) over a KV cache, in two
// addressing modes that differ only in where a token's row is:
//   strided  base + row × rowStride + token × tokenStride + head × headStride
//            (every layout of this cache, and any plain [B, T, H, D] tensor)
//   paged    base + table[b][token / blockSize] × rowStride
//            + (token % blockSize) × tokenStride + head × headStride
//            (vLLM-style blocks [numBlocks, blockSize, kvHeads, headDim])
// Grouped-query attention: a block handles one KV head and the G query heads
// that share it, so each K/V row is read once. fp16 or bf16 K/V, fp32
// accumulation, online (numerically safe) softmax in base 2. The KV length is
// split over blocks (flash-decoding): each split writes its running max, sum
// and unnormalised output; vat_attention_reduce combines them. With one
// split the partial kernel writes the output itself.
//
// scripts/gen-ptx.sh compiles this file to PTX (decode_attention_ptx.cc) for
// compute_80, once per element type and head dimension (64, 128, 256); the
// driver JIT-compiles a module for the GPU at hand the first time it is used.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention_params.h"

using vat::kernels::AttentionParams;
using vat::kernels::kAttentionThreads;

// A named namespace, not an anonymous one: nvcc names the shared arrays of
// the templates below after it, and an anonymous namespace's name hashes the
// file's path, so the PTX would differ between checkouts (npm run check:kernels).
namespace vat_attention {

constexpr float kNegInf = -__builtin_huge_valf();

// Eight elements of a 16-byte load, as floats.
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

__device__ __forceinline__ __half fromFloat(float f, __half) { return __float2half_rn(f); }
__device__ __forceinline__ __nv_bfloat16 fromFloat(float f, __nv_bfloat16) { return __float2bfloat16_rn(f); }

// exp2(m - mNew), 0 for a state that has seen no token (m = -inf).
__device__ __forceinline__ float rescale(float m, float mNew) { return m == kNegInf ? 0.f : exp2f(m - mNew); }

// Element offset of token t's row of KV head `head` for batch entry b.
template <bool Paged>
__device__ __forceinline__ long long rowOffset(const AttentionParams& p, int b, int t, int head) {
  if (Paged) {
    const int* table = reinterpret_cast<const int*>(p.rows) + static_cast<long long>(b) * p.maxBlocksPerSequence;
    long long block = __ldg(table + t / p.blockSize);
    return block * p.rowStride + static_cast<long long>(t % p.blockSize) * p.tokenStride + head * p.headStride;
  }
  long long row = p.rows ? __ldg(reinterpret_cast<const int*>(p.rows) + b) : b;
  return row * p.rowStride + static_cast<long long>(t) * p.tokenStride + head * p.headStride;
}

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

  // The G maxima raised over the valid scores of kUnroll tokens: one rescale
  // of the accumulator per pass, not per token.
  template <int kUnroll>
  __device__ __forceinline__ void raiseMax(const float (&s)[kUnroll][G], const bool (&valid)[kUnroll]) {
#pragma unroll
    for (int g = 0; g < G; g++) {
      float mNew = m[g];
#pragma unroll
      for (int u = 0; u < kUnroll; u++)
        if (valid[u]) mNew = fmaxf(mNew, s[u][g]);
      const float old = rescale(m[g], mNew);
      l[g] *= old;
#pragma unroll
      for (int i = 0; i < 8; i++) acc[g][i] *= old;
      m[g] = mNew;
    }
  }

  __device__ __forceinline__ void addValue(float (&s)[G], const float (&vf)[8]) {
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

// This lane's 8 elements of the G query heads, scaled by log2(e) / sqrt(D).
template <typename T, int D, int G>
__device__ __forceinline__ void loadQuery(const AttentionParams& p, int b, int kvHead, int chunk, float (&q)[G][8]) {
#pragma unroll
  for (int g = 0; g < G; g++) {
    const T* qRow = reinterpret_cast<const T*>(p.q) + (static_cast<long long>(b) * p.qHeads + kvHead * G + g) * D;
    toFloats(__ldg(reinterpret_cast<const uint4*>(qRow) + chunk), q[g], T());
#pragma unroll
    for (int i = 0; i < 8; i++) q[g][i] *= p.scaleLog2;
  }
}

// The G scores of one token: a dot product over the kLanes lanes of its row.
template <typename T, int G, int kLanes>
__device__ __forceinline__ void scoreToken(const float (&q)[G][8], const uint4& kRaw, float (&s)[G]) {
  float kf[8];
  toFloats(kRaw, kf, T());
#pragma unroll
  for (int g = 0; g < G; g++) {
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < 8; i++) dot = fmaf(q[g][i], kf[i], dot);
#pragma unroll
    for (int off = kLanes / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    s[g] = dot;
  }
}

// Merges the warps' states through shared memory and writes the split's
// result: the output itself with one split, else its partial state.
template <typename T, int D, int G, int kWarps>
__device__ __forceinline__ void storeSplit(const AttentionParams& p, const SoftmaxState<G>& st, int warp, int sub,
                                           int chunk, int b, int kvHead, int split) {
  __shared__ float sAcc[kWarps][G][D];
  __shared__ float sMax[kWarps][G], sSum[kWarps][G];
  if (sub == 0) {
#pragma unroll
    for (int g = 0; g < G; g++) {
#pragma unroll
      for (int i = 0; i < 8; i++) sAcc[warp][g][chunk * 8 + i] = st.acc[g][i];
      if (chunk == 0) {
        sMax[warp][g] = st.m[g];
        sSum[warp][g] = st.l[g];
      }
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < G * D; idx += kAttentionThreads) {
    const int g = idx / D, d = idx % D;
    float mAll = kNegInf;
#pragma unroll
    for (int w = 0; w < kWarps; w++) mAll = fmaxf(mAll, sMax[w][g]);
    float sum = 0.f, value = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; w++) {
      float c = rescale(sMax[w][g], mAll);
      sum += sSum[w][g] * c;
      value += sAcc[w][g][d] * c;
    }
    const long long head = static_cast<long long>(b) * p.qHeads + kvHead * G + g;
    if (p.splits == 1) {
      reinterpret_cast<T*>(p.out)[head * D + d] = fromFloat(sum > 0.f ? value / sum : 0.f, T());
    } else {
      reinterpret_cast<float*>(p.partialAcc)[(head * p.splits + split) * D + d] = value;
      if (d == 0) reinterpret_cast<float2*>(p.partialMaxSum)[head * p.splits + split] = make_float2(mAll, sum);
    }
  }
}

// One split of one (entry, KV head): grid (splits, kvHeads, batch).
// Lanes: a token's row of D elements is read by D / 8 lanes (16 bytes each);
// a warp reads 32 / (D / 8) tokens at once, U times over, before using them.
template <typename T, int D, int G, bool Paged>
__device__ void partialAttention(const AttentionParams& p) {
  constexpr int kLanes = D / 8;
  constexpr int kTokensPerWarp = 32 / kLanes;
  constexpr int kUnroll = 4;
  constexpr int kWarps = kAttentionThreads / 32;
  static_assert(D % 8 == 0 && kLanes <= 32 && 32 % kLanes == 0, "head dim must be 64, 128 or 256");

  const int split = blockIdx.x, kvHead = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub = lane / kLanes, chunk = lane % kLanes;
  const int length = __ldg(reinterpret_cast<const int*>(p.lengths) + b);
  const int begin = split * p.tokensPerSplit;
  const int end = min(length, begin + p.tokensPerSplit);
  const T* kBase = reinterpret_cast<const T*>(p.k);
  const T* vBase = reinterpret_cast<const T*>(p.v);

  float q[G][8];
  loadQuery<T, D, G>(p, b, kvHead, chunk, q);
  SoftmaxState<G> st;
  st.clear();

  for (int first = begin + warp * kTokensPerWarp * kUnroll; first < end; first += kWarps * kTokensPerWarp * kUnroll) {
    uint4 kRaw[kUnroll], vRaw[kUnroll];
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; u++) {
      int t = first + u * kTokensPerWarp + sub;
      valid[u] = t < end;
      if (valid[u]) {
        long long at = rowOffset<Paged>(p, b, t, kvHead) + chunk * 8;
        kRaw[u] = __ldg(reinterpret_cast<const uint4*>(kBase + at));
        vRaw[u] = __ldg(reinterpret_cast<const uint4*>(vBase + at));
      } else {
        kRaw[u] = vRaw[u] = make_uint4(0, 0, 0, 0);
      }
    }
    float s[kUnroll][G];
#pragma unroll
    for (int u = 0; u < kUnroll; u++) scoreToken<T, G, kLanes>(q, kRaw[u], s[u]);
    st.template raiseMax<kUnroll>(s, valid);
#pragma unroll
    for (int u = 0; u < kUnroll; u++) {
      if (!valid[u]) continue;
      float vf[8];
      toFloats(vRaw[u], vf, T());
      st.addValue(s[u], vf);
    }
  }

  // Merge the tokens-at-once groups of the warp (lanes kLanes apart).
#pragma unroll
  for (int off = kLanes; off < 32; off *= 2) st.mergeLanes(off);
  storeSplit<T, D, G, kWarps>(p, st, warp, sub, chunk, b, kvHead, split);
}

// Combines the splits of one (entry, query head): grid (qHeads, batch), D threads.
template <typename T, int D>
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
  reinterpret_cast<T*>(p.out)[head * D + d] = fromFloat(sum > 0.f ? value / sum : 0.f, T());
}

}  // namespace vat_attention

// Entry points with plain names for cuModuleGetFunction:
// vat_attention_<dtype>_d<D>_g<G>_<mode> and vat_attention_reduce_<dtype>_d<D>.
#define VAT_PARTIAL(T, tname, D, G)                                                                        \
  extern "C" __global__ void __launch_bounds__(kAttentionThreads)                                          \
      vat_attention_##tname##_d##D##_g##G##_strided(AttentionParams p) {                                   \
    vat_attention::partialAttention<T, D, G, false>(p);                                                                   \
  }                                                                                                        \
  extern "C" __global__ void __launch_bounds__(kAttentionThreads)                                          \
      vat_attention_##tname##_d##D##_g##G##_paged(AttentionParams p) {                                     \
    vat_attention::partialAttention<T, D, G, true>(p);                                                                    \
  }
#define VAT_HEAD_DIM(T, tname, D)                                                                           \
  VAT_PARTIAL(T, tname, D, 1)                                                                              \
  VAT_PARTIAL(T, tname, D, 2)                                                                              \
  VAT_PARTIAL(T, tname, D, 4)                                                                              \
  VAT_PARTIAL(T, tname, D, 8)                                                                              \
  extern "C" __global__ void vat_attention_reduce_##tname##_d##D(AttentionParams p) { vat_attention::reduceSplits<T, D>(p); }

// One module per element type and head dimension (VAT_DTYPE_BF16, VAT_HEAD_DIM
// set by scripts/gen-ptx.sh), so a process JIT-compiles only what it uses.
#ifndef VAT_HEAD_DIM_VALUE
#define VAT_HEAD_DIM_VALUE 128
#endif
#define VAT_EXPAND(T, tname, D) VAT_HEAD_DIM(T, tname, D)
#ifdef VAT_DTYPE_BF16
VAT_EXPAND(__nv_bfloat16, bf16, VAT_HEAD_DIM_VALUE)
#else
VAT_EXPAND(__half, f16, VAT_HEAD_DIM_VALUE)
#endif
