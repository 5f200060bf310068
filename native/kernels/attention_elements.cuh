// Element types of the attention kernels (fp16, bf16, fp8 e4m3), their
// conversions, cache addressing and cp.async. Included by
// decode_attention.cu (one PTX module per cache type and head dimension);
// device code only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "attention_params.h"

using vat::kernels::AppendParams;
using vat::kernels::AttentionParams;
using vat::kernels::kAppendThreads;
using vat::kernels::kAttentionThreads;
using vat::kernels::kAttentionWarps;

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

}  // namespace vat_attention
