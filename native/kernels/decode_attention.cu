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

// ---- tensor-core fragments (mma.sync m16n8k16, fp32 accumulation) ------------
//
// A block's query heads are the 16 rows of the MMA tiles (unused rows read
// zeros): scores S = Q·Kᵀ as [16 heads × 8 tokens] tiles, output O += P·V as
// [16 heads × 8 dims] tiles. In each thread: g = lane / 4 and t = lane % 4;
// an accumulator holds rows g and g + 8, columns 2t and 2t + 1.

// The MMA's input type: the cache's for 16-bit caches, fp16 for fp8 (its
// values convert exactly).
template <typename Kv>
struct MmaType {
  using Type = Kv;
};
template <>
struct MmaType<Fp8E4M3> {
  using Type = __half;
};

__device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1, __half) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1, __nv_bfloat16) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8×8 matrices of 16-bit elements; lane i gives the address of row i % 8 of matrix i / 8.
__device__ __forceinline__ void loadMatrices(unsigned (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(sharedAddress(row)));
}
__device__ __forceinline__ void loadMatricesTransposed(unsigned (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(sharedAddress(row)));
}

__device__ __forceinline__ unsigned pack(float lo, float hi, __half) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}
__device__ __forceinline__ unsigned pack(float lo, float hi, __nv_bfloat16) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}
// Two e4m3 bytes (lo, hi) as an fp16 pair.
__device__ __forceinline__ unsigned fp8PairToHalves(unsigned short pair) {
  __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
  return static_cast<unsigned>(h.x) | (static_cast<unsigned>(h.y) << 16);
}

// The B fragments of the score MMA for k-step ks (dims 16 ks..16 ks + 15):
// b[nt][0..1] for the tiles of tokens 0-7 and 8-15 of the stage. K rows are
// the columns of Kᵀ: an ldmatrix of the rows as stored.
template <typename Kv>
__device__ __forceinline__ void keyFragments(const unsigned char* rows, int rowStride, int ks, int lane,
                                             unsigned (&b)[2][2]) {
  if constexpr (Element<Kv>::kBytes == 2) {
    unsigned r[4];
    const int token = (lane % 8) + (lane / 16) * 8, chunk = ks * 2 + (lane / 8) % 2;
    loadMatrices(r, rows + token * rowStride + chunk * 16);
    b[0][0] = r[0];
    b[0][1] = r[1];
    b[1][0] = r[2];
    b[1][1] = r[3];
  } else {
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int nt = 0; nt < 2; nt++) {
      const unsigned char* row = rows + (nt * 8 + g) * rowStride + ks * 16 + t * 2;
      b[nt][0] = fp8PairToHalves(*reinterpret_cast<const unsigned short*>(row));
      b[nt][1] = fp8PairToHalves(*reinterpret_cast<const unsigned short*>(row + 8));
    }
  }
}

// The B fragments of the value MMA for dim tiles nd and nd + 1 (k = the
// stage's 16 tokens): b[j][0..1] for tile nd + j. V rows are the rows of
// the B matrix: an ldmatrix.trans of the rows as stored.
template <typename Kv>
__device__ __forceinline__ void valueFragments(const unsigned char* rows, int rowStride, int nd, int lane,
                                               unsigned (&b)[2][2]) {
  if constexpr (Element<Kv>::kBytes == 2) {
    unsigned r[4];
    const int token = (lane % 8) + ((lane / 8) % 2) * 8, chunk = nd + lane / 16;
    loadMatricesTransposed(r, rows + token * rowStride + chunk * 16);
    b[0][0] = r[0];
    b[0][1] = r[1];
    b[1][0] = r[2];
    b[1][1] = r[3];
  } else {
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int j = 0; j < 2; j++) {
      const int dim = (nd + j) * 8 + g;
#pragma unroll
      for (int half = 0; half < 2; half++) {
        const unsigned char* row = rows + (half * 8 + t * 2) * rowStride + dim;
        const unsigned short pair = static_cast<unsigned short>(row[0] | (row[rowStride] << 8));
        b[j][half] = fp8PairToHalves(pair);
      }
    }
  }
}

// ---- decode -----------------------------------------------------------------------

// What one block of the decode kernel works on.
struct BlockWork {
  int b, kvHead, firstHead, heads, split;  // heads: query heads of this block (≤ 16)
  int begin, end;                          // tokens of this split
};

__device__ __forceinline__ BlockWork blockWork(const AttentionParams& p, int blockTokens) {
  BlockWork w;
  const int queryChunk = blockIdx.x % p.queryChunks;
  w.split = blockIdx.x / p.queryChunks;
  w.kvHead = blockIdx.y;
  w.b = blockIdx.z;
  w.firstHead = w.kvHead * p.group + queryChunk * vat::kernels::kHeadsPerBlock;
  w.heads = min(vat::kernels::kHeadsPerBlock, p.group - queryChunk * vat::kernels::kHeadsPerBlock);
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

// The A fragments of Q (rows: the block's heads; unused rows zero), in the MMA's type.
template <typename M, int D>
__device__ __forceinline__ void queryFragments(const AttentionParams& p, const BlockWork& w, int lane,
                                               unsigned (&a)[D / 16][4]) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int ks = 0; ks < D / 16; ks++) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int row = g + (i % 2) * 8, col = ks * 16 + (i / 2) * 8 + t * 2;
      unsigned raw = 0;
      if (row < w.heads) {
        const long long at = (static_cast<long long>(w.b) * p.qHeads + w.firstHead + row) * D + col;
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

// Scores one warp's stage of 16 tokens (rows of K/V in shared memory) and
// folds it into the state: S = Q·Kᵀ, online softmax, O += P·V.
template <typename Kv, int D>
__device__ __forceinline__ void computeStage(const AttentionParams& p, WarpState<D>& st, const unsigned (&qa)[D / 16][4],
                                             const unsigned char* kRows, const unsigned char* vRows, int t0, int end,
                                             int lane, float scoreScale) {
  using M = typename MmaType<Kv>::Type;
  constexpr int kStride = vat::kernels::tilingFor(D, Element<Kv>::kBytes).rowStride;
  const int t = lane % 4;
  float s[2][4] = {};
#pragma unroll
  for (int ks = 0; ks < D / 16; ks++) {
    unsigned b[2][2];
    keyFragments<Kv>(kRows, kStride, ks, lane, b);
    mma(s[0], qa[ks], b[0][0], b[0][1], M());
    mma(s[1], qa[ks], b[1][0], b[1][1], M());
  }
  // Logits in base 2, masked past the split's end; the rows' maxima over the quad.
  float mx[2] = {kNegInf, kNegInf};
#pragma unroll
  for (int nt = 0; nt < 2; nt++)
#pragma unroll
    for (int i = 0; i < 4; i++) {
      float x = s[nt][i] * scoreScale;
      if (p.softcap > 0.f) x = p.softcap * kLog2e * tanhf(x / p.softcap);
      s[nt][i] = t0 + nt * 8 + t * 2 + (i % 2) < end ? x : kNegInf;
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
  // P as the A fragment of the value MMA (k = the 16 tokens).
  const unsigned pa[4] = {pack(s[0][0], s[0][1], M()), pack(s[0][2], s[0][3], M()), pack(s[1][0], s[1][1], M()),
                          pack(s[1][2], s[1][3], M())};
#pragma unroll
  for (int nd = 0; nd < D / 8; nd += 2) {
    unsigned b[2][2];
    valueFragments<Kv>(vRows, kStride, nd, lane, b);
    mma(st.o[nd], pa, b[0][0], b[0][1], M());
    mma(st.o[nd + 1], pa, b[1][0], b[1][1], M());
  }
}

// Merges the warps' states through shared memory (the pipeline's, drained)
// and writes the split's result: the output itself with one split, else its
// partial state. V's dequantisation scale applies here (it is linear).
template <int D>
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
      sAcc[(warp * R + row) * D + nd * 8 + t * 2] = st.o[nd][r * 2];
      sAcc[(warp * R + row) * D + nd * 8 + t * 2 + 1] = st.o[nd][r * 2 + 1];
    }
    if (t == 0) {
      sMax[warp * R + row] = st.m[r];
      sSum[warp * R + row] = st.l[r];
    }
  }
  __syncthreads();
  const float vScale = headScale(p.vScale, p.vScales, w.kvHead);
  for (int idx = threadIdx.x; idx < w.heads * D; idx += kAttentionThreads) {
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
    const long long head = static_cast<long long>(w.b) * p.qHeads + w.firstHead + row;
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
template <typename Kv, int D>
__device__ void partialAttention(const AttentionParams& p) {
  using M = typename MmaType<Kv>::Type;
  constexpr auto kT = vat::kernels::tilingFor(D, Element<Kv>::kBytes);
  static_assert(D % 16 == 0 && D <= 256, "head dim must be a multiple of 16, at most 256");
  extern __shared__ __align__(16) unsigned char shared[];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const BlockWork w = blockWork(p, kT.blockTokens);
  unsigned qa[D / 16][4];
  queryFragments<M, D>(p, w, lane, qa);
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
      computeStage<Kv, D>(p, st, qa, kStages + stage * kT.stageBytes, vStages + stage * kT.stageBytes, t0, w.end, lane,
                          scoreScale);
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
  storeSplit<D>(p, st, w, warp, lane, shared);
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
//   vat_attention_partial  the partial (split) kernel
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
  vat_attention::partialAttention<KvType, kHeadDim>(p);
}

extern "C" __global__ void vat_attention_reduce(AttentionParams p) { vat_attention::reduceSplits<kHeadDim>(p); }

extern "C" __global__ void __launch_bounds__(kAppendThreads) vat_append_kv(AppendParams p) {
  vat_attention::appendTokens<KvType, kHeadDim>(p);
}
