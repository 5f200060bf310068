// Tensor-core fragments of the decode kernel: mma.sync m16n8k16 with fp32
// accumulation, ldmatrix, and the K/V fragments of each cache type.
// Included by decode_attention.cu (one PTX module per cache type and head
// dimension); device code only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "attention_elements.cuh"

namespace vat_attention {

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

// Which head dimension each MMA column holds. With 16-bit caches, the
// natural order (ldmatrix reads 16-byte rows). With fp8 caches, an order in
// which every lane's elements are contiguous bytes, so that it reads them
// with a few 32-bit loads instead of byte by byte:
//   scores: k-step ks, MMA k index k of lane quad position t = (k % 8) / 2
//           holds dim t × D/4 + ks × 4 + (k / 8) × 2 + k % 2
//           (Q is loaded in the same order: the dot product is unchanged)
//   values: tile nd, column n holds dim n × D/8 + nd
//           (the output is written back in the natural order)
template <typename Kv, int D>
struct DimOrder {
  static constexpr bool kPermuted = Element<Kv>::kBytes == 1;
  // The first of the two adjacent dims of Q's A-fragment element (ks, khalf) for quad position t.
  __device__ static constexpr int query(int ks, int khalf, int t) {
    return kPermuted ? t * (D / 4) + ks * 4 + khalf * 2 : ks * 16 + khalf * 8 + t * 2;
  }
  // The dim of value tile nd, column n.
  __device__ static constexpr int value(int nd, int n) { return kPermuted ? n * (D / 8) + nd : nd * 8 + n; }
};

// The B fragments of the score MMA for k-step ks: b[nt][0..1] for the tiles
// of tokens 0-7 and 8-15 of the stage. K rows are the columns of Kᵀ: an
// ldmatrix of the rows as stored (16-bit), or one 32-bit load per tile (fp8,
// DimOrder) converted pairwise.
template <typename Kv, int D>
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
      const unsigned word = *reinterpret_cast<const unsigned*>(rows + (nt * 8 + g) * rowStride + t * (D / 4) + ks * 4);
      b[nt][0] = fp8PairToHalves(static_cast<unsigned short>(word & 0xffffu));
      b[nt][1] = fp8PairToHalves(static_cast<unsigned short>(word >> 16));
    }
  }
}

// The B fragments of the value MMA for dim tiles nd and nd + 1 (k = the
// stage's 16 tokens): b[j][0..1] for tile nd + j. V rows are the rows of
// the B matrix: an ldmatrix.trans of the rows as stored.
__device__ __forceinline__ void valueFragments16(const unsigned char* rows, int rowStride, int nd, int lane,
                                                 unsigned (&b)[2][2]) {
  unsigned r[4];
  const int token = (lane % 8) + ((lane / 8) % 2) * 8, chunk = nd + lane / 16;
  loadMatricesTransposed(r, rows + token * rowStride + chunk * 16);
  b[0][0] = r[0];
  b[0][1] = r[1];
  b[1][0] = r[2];
  b[1][1] = r[3];
}

// Every B fragment of the value MMA of an fp8 stage (DimOrder: lane g's
// column is dims g × D/8 .. g × D/8 + D/8 - 1 of each token row, contiguous):
// b[nd][half] pairs tokens 2t, 2t + 1 (half 0) or 8 + 2t, 9 + 2t (half 1).
template <int D>
__device__ __forceinline__ void valueFragmentsFp8(const unsigned char* rows, int rowStride, int lane,
                                                  unsigned (&b)[D / 8][2]) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int half = 0; half < 2; half++) {
    const unsigned char* even = rows + (half * 8 + t * 2) * rowStride + g * (D / 8);
    const unsigned char* odd = even + rowStride;
    if constexpr ((D / 8) % 4 == 0) {
#pragma unroll
      for (int w = 0; w < D / 32; w++) {
        const unsigned a = *reinterpret_cast<const unsigned*>(even + w * 4);
        const unsigned c = *reinterpret_cast<const unsigned*>(odd + w * 4);
        // bytes [a0 c0 a1 c1] and [a2 c2 a3 c3]: the token pairs of 4 dims
        const unsigned lo = __byte_perm(a, c, 0x5140), hi = __byte_perm(a, c, 0x7362);
        b[w * 4 + 0][half] = fp8PairToHalves(static_cast<unsigned short>(lo & 0xffffu));
        b[w * 4 + 1][half] = fp8PairToHalves(static_cast<unsigned short>(lo >> 16));
        b[w * 4 + 2][half] = fp8PairToHalves(static_cast<unsigned short>(hi & 0xffffu));
        b[w * 4 + 3][half] = fp8PairToHalves(static_cast<unsigned short>(hi >> 16));
      }
    } else {
#pragma unroll
      for (int w = 0; w < D / 16; w++) {
        const unsigned a = *reinterpret_cast<const unsigned short*>(even + w * 2);
        const unsigned c = *reinterpret_cast<const unsigned short*>(odd + w * 2);
        const unsigned pairs = __byte_perm(a, c, 0x5140);
        b[w * 2 + 0][half] = fp8PairToHalves(static_cast<unsigned short>(pairs & 0xffffu));
        b[w * 2 + 1][half] = fp8PairToHalves(static_cast<unsigned short>(pairs >> 16));
      }
    }
  }
}

}  // namespace vat_attention
