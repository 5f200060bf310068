// Decode attention (one query token per sequence) and the append of new
// tokens' K/V, over a KV cache in two addressing modes that differ only in
// where a token's row is:
//   strided  base + row × rowStride + token × tokenStride + head × headStride
//            (every layout of this cache, and any plain [B, T, H, D] tensor)
//   paged    base + table[b][token / blockSize] × rowStride
//            + (token % blockSize) × tokenStride + head × headStride
//            (vLLM-style blocks [numBlocks, blockSize, kvHeads, headDim])
//
// Prefill (vat_attention_prefill): the same kernel with several query
// tokens per entry, the rows of a block being (token, head) pairs (16 / group
// tokens of a GQA group), each row masked to its causal prefix.
//
// Decode: a block handles one KV head and up to 16 of the query heads that
// share it (grouped-query attention), so each K/V row is read once for them;
// the heads are the rows of tensor-core tiles (attention_mma.cuh). Bandwidth
// comes from bytes in flight: each warp streams its own 16-token stages of K
// and V rows into shared memory with cp.async, the next ones in flight while
// it computes one (no block-wide barrier in the loop). fp16,
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
#include "append_kv.cuh"
#include "attention_elements.cuh"
#include "attention_mma.cuh"
#include "attention_work.cuh"


// A named namespace, not an anonymous one: nvcc names symbols of the
// templates below after it, and an anonymous namespace's name hashes the
// file's path, so the PTX would differ between checkouts (npm run check:kernels).
namespace vat_attention {

// ---- decode -----------------------------------------------------------------------

// The A fragments of Q (rows: the block's heads; unused rows zero), in the MMA's type.
template <typename Kv, typename M, int D>
__device__ __forceinline__ void queryFragments(const AttentionParams& p, const BlockWork& w, int lane,
                                               unsigned (&a)[D / 16][4]) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int ks = 0; ks < D / 16; ks++) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int row = g + (i % 2) * 8, col = DimOrder<Kv, D>::query(ks, i / 2, t);
      unsigned raw = 0;
      const long long index = queryIndex(p, w, row);
      if (index >= 0) {
        const long long at = index * D + col;
        raw = __ldg(reinterpret_cast<const unsigned*>(p.q) + at / 2);
        // fp8 caches compute in fp16: a bf16 query converts
        if (sizeof(M) == 2 && p.queryBf16 && !__is_same(M, __nv_bfloat16)) {
          float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw));
          raw = pack(f.x, f.y, __half());
        }
      }
      a[ks][i] = raw;
    }
  }
}

// Queues the copies of one warp's stage: its kWarpTokens rows of K and of V
// from token t0 on, rows at or past `end` zero-filled.
template <typename Kv, int D>
__device__ __forceinline__ void loadStage(const AttentionParams& p, const BlockWork& w, int t0, int lane,
                                          unsigned char* kDst, unsigned char* vDst) {
  constexpr auto kT = vat::kernels::tilingFor(D, Element<Kv>::kBytes);
  constexpr int kRowChunks = kT.rowBytes / 16;
  constexpr int kChunks = vat::kernels::kWarpTokens * kRowChunks;
  // Lane i finds row i's offset once; the copies take it by shuffle.
  long long offset = 0;
  const int t = t0 + lane;
  const bool mine = lane < vat::kernels::kWarpTokens && t < w.end;
  if (mine) offset = rowOffset(p, w.b, t, w.kvHead) * Element<Kv>::kBytes;
  const unsigned char* kSrc = reinterpret_cast<const unsigned char*>(p.k);
  const unsigned char* vSrc = reinterpret_cast<const unsigned char*>(p.v);
#pragma unroll
  for (int base = 0; base < kChunks; base += 32) {
    const int i = base + lane;
    const int r = min(i / kRowChunks, vat::kernels::kWarpTokens - 1), c = i % kRowChunks;
    const long long at = __shfl_sync(0xffffffffu, offset, r) + c * 16;
    const bool valid = __shfl_sync(0xffffffffu, mine, r);
    if (i < kChunks) {
      const int bytes = valid ? 16 : 0;
      copy16(kDst + r * kT.rowStride + c * 16, valid ? kSrc + at : kSrc, bytes);
      copy16(vDst + r * kT.rowStride + c * 16, valid ? vSrc + at : vSrc, bytes);
    }
  }
}

// One warp's running softmax over its tokens: rows g and g + 8 of the
// block's heads (max m and this thread's part of the sum l) and its
// accumulator tiles of O.
template <int D>
struct WarpState {
  float m[2], l[2], o[D / 8][4];
};

// The online softmax of one stage: scores s (MMA accumulators: rows g and
// g + 8, tokens t0 + 8 nt + 2t + i % 2) to logits in base 2, masked past
// `end`; the rows' maxima over the quad raised; the sums and O rescaled;
// s replaced by the weights exp2(logit - max).
// Decode masks tokens past `end`; prefill (kCausal) each row to its own limits.
template <int D, bool kCausal>
__device__ __forceinline__ void foldScores(const AttentionParams& p, WarpState<D>& st, float (&s)[2][4], int t0,
                                           int end, const RowLimits& lim, int t, float scoreScale) {
  float mx[2] = {kNegInf, kNegInf};
#pragma unroll
  for (int nt = 0; nt < 2; nt++)
#pragma unroll
    for (int i = 0; i < 4; i++) {
      float x = s[nt][i] * scoreScale;
      if (p.softcap > 0.f) x = p.softcap * kLog2e * tanhf(x / p.softcap);
      const int token = t0 + nt * 8 + t * 2 + (i % 2);
      const bool keep = kCausal ? token >= lim.start[i / 2] && token < lim.end[i / 2] : token < end;
      s[nt][i] = keep ? x : kNegInf;
      mx[i / 2] = fmaxf(mx[i / 2], s[nt][i]);
    }
  float alpha[2];
#pragma unroll
  for (int r = 0; r < 2; r++) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float mNew = fmaxf(st.m[r], mx[r]);
    alpha[r] = rescale(st.m[r], mNew);
    st.m[r] = mNew;
    st.l[r] *= alpha[r];
  }
#pragma unroll
  for (int nd = 0; nd < D / 8; nd++) {
    st.o[nd][0] *= alpha[0];
    st.o[nd][1] *= alpha[0];
    st.o[nd][2] *= alpha[1];
    st.o[nd][3] *= alpha[1];
  }
#pragma unroll
  for (int nt = 0; nt < 2; nt++)
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const float m = st.m[i / 2];
      const float e = m == kNegInf ? 0.f : exp2f(s[nt][i] - m);
      st.l[i / 2] += e;
      s[nt][i] = e;
    }
}

// Scores one warp's stage of 16 tokens (rows of K/V in shared memory) and
// folds it into the state: S = Q·Kᵀ, online softmax, O += P·V.
template <typename Kv, int D, bool kCausal>
__device__ __forceinline__ void computeStage(const AttentionParams& p, WarpState<D>& st, const unsigned (&qa)[D / 16][4],
                                             const unsigned char* kRows, const unsigned char* vRows, int t0, int end,
                                             const RowLimits& lim, int lane, float scoreScale) {
  using M = typename MmaType<Kv>::Type;
  constexpr int kStride = vat::kernels::tilingFor(D, Element<Kv>::kBytes).rowStride;
  float s[2][4] = {};
#pragma unroll
  for (int ks = 0; ks < D / 16; ks++) {
    unsigned b[2][2];
    keyFragments<Kv, D>(kRows, kStride, ks, lane, b);
    mma(s[0], qa[ks], b[0][0], b[0][1], M());
    mma(s[1], qa[ks], b[1][0], b[1][1], M());
  }
  foldScores<D, kCausal>(p, st, s, t0, end, lim, lane % 4, scoreScale);
  // P as the A fragment of the value MMA (k = the 16 tokens).
  const unsigned pa[4] = {pack(s[0][0], s[0][1], M()), pack(s[0][2], s[0][3], M()), pack(s[1][0], s[1][1], M()),
                          pack(s[1][2], s[1][3], M())};
  if constexpr (Element<Kv>::kBytes == 2) {
#pragma unroll
    for (int nd = 0; nd < D / 8; nd += 2) {
      unsigned b[2][2];
      valueFragments16(vRows, kStride, nd, lane, b);
      mma(st.o[nd], pa, b[0][0], b[0][1], M());
      mma(st.o[nd + 1], pa, b[1][0], b[1][1], M());
    }
  } else {
    unsigned b[D / 8][2];
    valueFragmentsFp8<D>(vRows, kStride, lane, b);
#pragma unroll
    for (int nd = 0; nd < D / 8; nd++) mma(st.o[nd], pa, b[nd][0], b[nd][1], M());
  }
}

// Merges the warps' states through shared memory (the pipeline's, drained)
// and writes the split's result: the output itself with one split, else its
// partial state. V's dequantisation scale applies here (it is linear).
template <typename Kv, int D>
__device__ __forceinline__ void storeSplit(const AttentionParams& p, const WarpState<D>& st, const BlockWork& w,
                                           int warp, int lane, unsigned char* shared) {
  constexpr int R = vat::kernels::kHeadsPerBlock;
  float* sAcc = reinterpret_cast<float*>(shared);  // [kWarps][R][D]
  float* sMax = sAcc + kAttentionWarps * R * D;     // [kWarps][R]
  float* sSum = sMax + kAttentionWarps * R;         // [kWarps][R]
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; r++) {
    const int row = g + r * 8;
#pragma unroll
    for (int nd = 0; nd < D / 8; nd++) {
      sAcc[(warp * R + row) * D + DimOrder<Kv, D>::value(nd, t * 2)] = st.o[nd][r * 2];
      sAcc[(warp * R + row) * D + DimOrder<Kv, D>::value(nd, t * 2 + 1)] = st.o[nd][r * 2 + 1];
    }
    if (t == 0) {
      sMax[warp * R + row] = st.m[r];
      sSum[warp * R + row] = st.l[r];
    }
  }
  __syncthreads();
  const float vScale = headScale(p.vScale, p.vScales, w.kvHead);
  for (int idx = threadIdx.x; idx < w.heads * w.tokens * D; idx += kAttentionThreads) {
    const int row = idx / D, d = idx % D;
    float mAll = kNegInf;
#pragma unroll
    for (int k = 0; k < kAttentionWarps; k++) mAll = fmaxf(mAll, sMax[k * R + row]);
    float sum = 0.f, value = 0.f;
#pragma unroll
    for (int k = 0; k < kAttentionWarps; k++) {
      const float c = rescale(sMax[k * R + row], mAll);
      sum += sSum[k * R + row] * c;
      value += sAcc[(k * R + row) * D + d] * c;
    }
    value *= vScale;
    const long long head = queryIndex(p, w, row);
    if (p.splits == 1) {
      storeQueryType(reinterpret_cast<void*>(p.out), head * D + d, sum > 0.f ? value / sum : 0.f, p.queryBf16);
    } else {
      reinterpret_cast<float*>(p.partialAcc)[(head * p.splits + w.split) * D + d] = value;
      if (d == 0) reinterpret_cast<float2*>(p.partialMaxSum)[head * p.splits + w.split] = make_float2(mAll, sum);
    }
  }
}

// One split of one (entry, KV head, 16-head chunk of its group): grid
// (splits × queryChunks, kvHeads, batch), chunks of one split adjacent so
// that they read the same rows close together (the second from L2). Each
// warp streams its own 16-token stages (no block-wide barrier in the loop).
template <typename Kv, int D, bool kCausal>
__device__ void partialAttention(const AttentionParams& p) {
  using M = typename MmaType<Kv>::Type;
  constexpr auto kT = vat::kernels::tilingFor(D, Element<Kv>::kBytes);
  static_assert(D % 16 == 0 && D <= 256, "head dim must be a multiple of 16, at most 256");
  extern __shared__ __align__(16) unsigned char shared[];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const BlockWork w = kCausal ? prefillWork(p) : blockWork(p, kT.blockTokens);
  const RowLimits lim = kCausal ? rowLimits(p, w, lane) : RowLimits{};
  unsigned qa[D / 16][4];
  queryFragments<Kv, M, D>(p, w, lane, qa);
  // Scores come out of the MMA unscaled: scale (× K's fp8 scale) × log2(e),
  // or natural units when soft-capped (the cap applies before base 2).
  const float scoreScale = p.scale * headScale(p.kScale, p.kScales, w.kvHead) * (p.softcap > 0.f ? 1.f : kLog2e);
  WarpState<D> st;
  st.m[0] = st.m[1] = kNegInf;
  st.l[0] = st.l[1] = 0.f;
#pragma unroll
  for (int nd = 0; nd < D / 8; nd++) st.o[nd][0] = st.o[nd][1] = st.o[nd][2] = st.o[nd][3] = 0.f;

  unsigned char* kStages = shared + warp * kT.stages * 2 * kT.stageBytes;
  unsigned char* vStages = kStages + kT.stages * kT.stageBytes;
  const int tiles = (w.end - w.begin + kT.blockTokens - 1) / kT.blockTokens;
  const int warpFirst = w.begin + warp * vat::kernels::kWarpTokens;  // this warp's first token of tile 0
  // Prologue: stages - 1 tiles in flight. A group is committed even when
  // empty, so that wait_group counts the same in every warp.
#pragma unroll
  for (int s = 0; s < kT.stages - 1; s++) {
    if (s < tiles)
      loadStage<Kv, D>(p, w, warpFirst + s * kT.blockTokens, lane, kStages + s * kT.stageBytes, vStages + s * kT.stageBytes);
    commitCopies();
  }
  for (int tile = 0; tile < tiles; tile++) {
    waitCopies<kT.stages - 2>();
    __syncwarp();
    const int stage = tile % kT.stages;
    const int t0 = warpFirst + tile * kT.blockTokens;
    if (t0 < w.end)
      computeStage<Kv, D, kCausal>(p, st, qa, kStages + stage * kT.stageBytes, vStages + stage * kT.stageBytes, t0,
                                   w.end, lim, lane, scoreScale);
    __syncwarp();  // every lane is done with the stage the next copy overwrites
    const int next = tile + kT.stages - 1;
    if (next < tiles) {
      const int ns = next % kT.stages;
      loadStage<Kv, D>(p, w, warpFirst + next * kT.blockTokens, lane, kStages + ns * kT.stageBytes,
                       vStages + ns * kT.stageBytes);
    }
    commitCopies();
  }
  waitCopies<0>();
  // The rows' sums over the quad (each thread summed its own columns).
#pragma unroll
  for (int r = 0; r < 2; r++) {
    st.l[r] += __shfl_xor_sync(0xffffffffu, st.l[r], 1);
    st.l[r] += __shfl_xor_sync(0xffffffffu, st.l[r], 2);
  }
  __syncthreads();  // every warp is done with the pipeline's buffers
  storeSplit<Kv, D>(p, st, w, warp, lane, shared);
}

// Combines the splits of one (entry, query head): grid (qHeads, batch), D
// threads. The splits' weights are computed once into shared memory, then
// each thread sums its dimension over them with independent loads.
template <int D>
__device__ void reduceSplits(const AttentionParams& p) {
  constexpr int kMaxSplits = 64;  // the plan's limit (≤ D threads); larger explicit splits go in chunks
  __shared__ float sWeight[kMaxSplits];
  __shared__ float sMax;
  const long long head = static_cast<long long>(blockIdx.y) * p.qHeads + blockIdx.x;
  const float2* ms = reinterpret_cast<const float2*>(p.partialMaxSum) + head * p.splits;
  const float* acc = reinterpret_cast<const float*>(p.partialAcc) + head * p.splits * D;
  const int d = threadIdx.x;
  if (d < 32) {
    float m = kNegInf;
    for (int s = d; s < p.splits; s += 32) m = fmaxf(m, ms[s].x);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    if (d == 0) sMax = m;
  }
  __syncthreads();
  const float mAll = sMax;
  float value = 0.f, sum = 0.f;
  for (int first = 0; first < p.splits; first += kMaxSplits) {
    const int count = min(kMaxSplits, p.splits - first);
    if (d < count) sWeight[d] = rescale(ms[first + d].x, mAll);
    __syncthreads();
#pragma unroll 8
    for (int s = 0; s < count; s++) {
      value += acc[(first + s) * D + d] * sWeight[s];
      sum += ms[first + s].y * sWeight[s];
    }
    __syncthreads();
  }
  storeQueryType(reinterpret_cast<void*>(p.out), head * D + d, sum > 0.f ? value / sum : 0.f, p.queryBf16);
}

}  // namespace vat_attention

// Entry points with plain names for cuModuleGetFunction, per module:
//   vat_attention_partial  the partial (split) kernel
//   vat_attention_prefill  causal prefill (several query tokens per entry, one split)
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

extern "C" __global__ void __launch_bounds__(kAttentionThreads) vat_attention_partial(AttentionParams p) {
  vat_attention::partialAttention<KvType, kHeadDim, false>(p);
}

extern "C" __global__ void __launch_bounds__(kAttentionThreads) vat_attention_prefill(AttentionParams p) {
  vat_attention::partialAttention<KvType, kHeadDim, true>(p);
}

extern "C" __global__ void vat_attention_reduce(AttentionParams p) { vat_attention::reduceSplits<kHeadDim>(p); }

extern "C" __global__ void __launch_bounds__(kAppendThreads) vat_append_kv(AppendParams p) {
  vat_attention::appendTokens<KvType, kHeadDim>(p);
}
