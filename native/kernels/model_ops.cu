// The element-wise steps of a Llama-architecture layer around the GEMMs and
// the attention kernels, for the example model (examples/llama) and any
// caller with the same shapes: row gather (embedding, last-token pick),
// RMSNorm fused with the residual add, rotary embedding fused with the split
// of the Q/K/V projection, SiLU(gate)·up, and the argmax (or a
// temperature sample) of logits. 16-bit activations (fp16 or bf16, chosen per
// call), fp32 arithmetic; rows are contiguous and 16-byte aligned (the host
// checks). One PTX module (compute_80), compiled by scripts/gen-ptx.sh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "model_ops_params.h"

using namespace vat::kernels;

namespace vat_model_ops {

// Eight 16-bit values ↔ floats.
__device__ __forceinline__ void load8(const void* base, long long at, int bf16, float (&f)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(reinterpret_cast<const unsigned short*>(base) + at);
  const unsigned* w = reinterpret_cast<const unsigned*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; i++) {
    float2 v = bf16 ? __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(w + i))
                    : __half22float2(*reinterpret_cast<const __half2*>(w + i));
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

__device__ __forceinline__ void store8(void* base, long long at, int bf16, const float (&f)[8]) {
  uint4 raw;
  unsigned* w = reinterpret_cast<unsigned*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; i++) {
    if (bf16) {
      __nv_bfloat162 v = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
      w[i] = *reinterpret_cast<unsigned*>(&v);
    } else {
      __half2 v = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
      w[i] = *reinterpret_cast<unsigned*>(&v);
    }
  }
  *reinterpret_cast<uint4*>(reinterpret_cast<unsigned short*>(base) + at) = raw;
}

// The sum of `v` over the block (blockDim.x a multiple of 32, ≤ 1024).
__device__ float blockSum(float v, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < blockDim.x / 32 ? scratch[lane] : 0.f;
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

}  // namespace vat_model_ops

using namespace vat_model_ops;

// out[i] = table[ids[i]] (rows of `width` elements); an id outside the
// table gives a row of zeros. Grid (rows), any block size.
extern "C" __global__ void vat_gather_rows(GatherParams p) {
  const long long i = blockIdx.x;
  const int id = reinterpret_cast<const int*>(p.ids)[i];
  const bool inside = id >= 0 && id < p.tableRows;
  const uint4* src = reinterpret_cast<const uint4*>(p.table) + (inside ? static_cast<long long>(id) * p.width / 8 : 0);
  uint4* dst = reinterpret_cast<uint4*>(p.out) + i * p.width / 8;
  for (int c = threadIdx.x; c < p.width / 8; c += blockDim.x) dst[c] = inside ? src[c] : make_uint4(0, 0, 0, 0);
}

// Per row: h = x (+ residual, written back to residual when given);
// out = h / rms(h) × weight. Grid (rows), kNormThreads threads; the row is
// held in registers between the two passes (width ≤ 8 × kNormThreads × 4).
extern "C" __global__ void __launch_bounds__(kNormThreads) vat_rms_norm(NormParams p) {
  __shared__ float scratch[32];
  constexpr int kMaxChunks = 4;
  const long long base = static_cast<long long>(blockIdx.x) * p.width;
  float h[kMaxChunks][8];
  float squares = 0.f;
#pragma unroll
  for (int k = 0; k < kMaxChunks; k++) {
    const int c = (threadIdx.x + k * kNormThreads) * 8;
    if (c >= p.width) break;
    load8(reinterpret_cast<const void*>(p.x), base + c, p.bf16, h[k]);
    if (p.residual) {
      float r[8];
      load8(reinterpret_cast<const void*>(p.residual), base + c, p.bf16, r);
#pragma unroll
      for (int i = 0; i < 8; i++) h[k][i] += r[i];
      store8(reinterpret_cast<void*>(p.residual), base + c, p.bf16, h[k]);
      load8(reinterpret_cast<const void*>(p.residual), base + c, p.bf16, h[k]);  // normalise what was stored
    }
#pragma unroll
    for (int i = 0; i < 8; i++) squares += h[k][i] * h[k][i];
  }
  const float scale = rsqrtf(blockSum(squares, scratch) / p.width + p.eps);
#pragma unroll
  for (int k = 0; k < kMaxChunks; k++) {
    const int c = (threadIdx.x + k * kNormThreads) * 8;
    if (c >= p.width) break;
    float w[8];
    load8(reinterpret_cast<const void*>(p.weight), c, p.bf16, w);
#pragma unroll
    for (int i = 0; i < 8; i++) h[k][i] = h[k][i] * scale * w[i];
    store8(reinterpret_cast<void*>(p.out), base + c, p.bf16, h[k]);
  }
}

// Splits a fused projection row [q heads | k heads | v heads] into q, k, v
// ([rows, heads, headDim] each), rotating q and k by the row's position (the
// halves convention: element i pairs with i + headDim / 2) with angles
// position × inverse frequency (float [headDim / 2]). A negative position
// leaves a row unrotated. Grid (rows), any block size.
extern "C" __global__ void vat_rotary(RotaryParams p) {
  const long long row = blockIdx.x;
  const int position = reinterpret_cast<const int*>(p.positions)[row];
  const int half = p.headDim / 2;
  const int width = (p.qHeads + 2 * p.kvHeads) * p.headDim;
  const unsigned short* src = reinterpret_cast<const unsigned short*>(p.qkv) + row * width;
  const float* frequencies = reinterpret_cast<const float*>(p.frequencies);
  const int pairs = (p.qHeads + p.kvHeads) * half;
  for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
    const int head = i / half, d = i % half;
    float c = 1.f, s = 0.f;
    if (position >= 0) sincosf(static_cast<float>(position) * frequencies[d], &s, &c);
    const long long at = static_cast<long long>(head) * p.headDim + d;
    float a, b;
    if (p.bf16) {
      a = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(src)[at]);
      b = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(src)[at + half]);
    } else {
      a = __half2float(reinterpret_cast<const __half*>(src)[at]);
      b = __half2float(reinterpret_cast<const __half*>(src)[at + half]);
    }
    const float ra = a * c - b * s, rb = b * c + a * s;
    const bool isQuery = head < p.qHeads;
    unsigned short* dst = reinterpret_cast<unsigned short*>(isQuery ? p.q : p.k);
    const int heads = isQuery ? p.qHeads : p.kvHeads;
    const long long out = (row * heads + (isQuery ? head : head - p.qHeads)) * p.headDim + d;
    if (p.bf16) {
      reinterpret_cast<__nv_bfloat16*>(dst)[out] = __float2bfloat16_rn(ra);
      reinterpret_cast<__nv_bfloat16*>(dst)[out + half] = __float2bfloat16_rn(rb);
    } else {
      reinterpret_cast<__half*>(dst)[out] = __float2half_rn(ra);
      reinterpret_cast<__half*>(dst)[out + half] = __float2half_rn(rb);
    }
  }
  const int vChunks = p.kvHeads * p.headDim / 8;
  const uint4* vSrc = reinterpret_cast<const uint4*>(src + (p.qHeads + p.kvHeads) * p.headDim);
  uint4* vDst = reinterpret_cast<uint4*>(p.v) + row * vChunks;
  for (int c = threadIdx.x; c < vChunks; c += blockDim.x) vDst[c] = vSrc[c];
}

// out[r, i] = silu(gate[r, i]) × up[r, i] over a fused row [gate | up].
// Grid (ceil(rows × width / 8 / 256)), 256 threads.
extern "C" __global__ void vat_silu_mul(SiluMulParams p) {
  const long long chunk = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long long chunksPerRow = p.width / 8;
  if (chunk >= p.rows * chunksPerRow) return;
  const long long row = chunk / chunksPerRow, c = chunk % chunksPerRow * 8;
  float g[8], u[8];
  load8(reinterpret_cast<const void*>(p.gateUp), row * 2 * p.width + c, p.bf16, g);
  load8(reinterpret_cast<const void*>(p.gateUp), row * 2 * p.width + p.width + c, p.bf16, u);
#pragma unroll
  for (int i = 0; i < 8; i++) g[i] = g[i] / (1.f + __expf(-g[i])) * u[i];
  store8(reinterpret_cast<void*>(p.out), row * p.width + c, p.bf16, g);
}

namespace vat_model_ops {

// A uniform (0, 1) from (seed, row, index): a counter-based hash, so a
// sample depends on nothing but its arguments.
__device__ __forceinline__ float uniform(unsigned long long seed, long long row, int index) {
  unsigned long long x = seed ^ (static_cast<unsigned long long>(row) << 32) ^ static_cast<unsigned>(index);
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  x ^= x >> 31;
  return (static_cast<float>(x >> 40) + 0.5f) * (1.f / 16777216.f);
}

}  // namespace vat_model_ops

// Per row of float logits: the index of the largest (the first of equals),
// or with temperature > 0 a sample of softmax(logits / temperature) by the
// Gumbel-max rule (argmax of logits / t − log(−log u)). Grid (rows),
// kArgmaxThreads threads.
extern "C" __global__ void __launch_bounds__(kArgmaxThreads) vat_argmax(ArgmaxParams p) {
  __shared__ float bestValue[kArgmaxThreads / 32];
  __shared__ int bestIndex[kArgmaxThreads / 32];
  const long long row = blockIdx.x;
  const float* logits = reinterpret_cast<const float*>(p.logits) + row * p.stride;
  float best = -__builtin_huge_valf();
  int index = 0x7fffffff;
  for (int i = threadIdx.x; i < p.vocab; i += kArgmaxThreads) {
    float v = logits[i];
    if (p.temperature > 0.f) v = v / p.temperature - __logf(-__logf(uniform(p.seed, row, i)));
    if (v > best || (v == best && i < index)) {
      best = v;
      index = i;
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, off);
    const int oi = __shfl_xor_sync(0xffffffffu, index, off);
    if (ov > best || (ov == best && oi < index)) {
      best = ov;
      index = oi;
    }
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    bestValue[warp] = best;
    bestIndex[warp] = index;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kArgmaxThreads / 32; w++)
      if (bestValue[w] > best || (bestValue[w] == best && bestIndex[w] < index)) {
        best = bestValue[w];
        index = bestIndex[w];
      }
    // every logit NaN: token 0 rather than an index past the vocabulary
    reinterpret_cast<int*>(p.out)[row] = index == 0x7fffffff ? 0 : index;
  }
}
