// appendKV: new tokens' K and V written into the cache.
// Included by decode_attention.cu (one PTX module per cache type and head
// dimension); device code only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "attention_elements.cuh"

namespace vat_attention {

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
