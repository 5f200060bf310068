// Arguments of the element-wise model kernels (model_ops.cu), shared by the
// CUDA source and the host launchers (model_ops.cc): plain fixed-width
// fields only, so both compilers lay them out the same way.
#pragma once

namespace vat::kernels {

constexpr int kNormThreads = 256;
constexpr int kNormMaxWidth = 8 * kNormThreads * 4;  // the row a norm block holds in registers
constexpr int kArgmaxThreads = 1024;
constexpr int kSiluThreads = 256;

struct GatherParams {
  unsigned long long table;  // [tableRows, width] 16-bit
  unsigned long long ids;    // int32 [rows]
  unsigned long long out;    // [rows, width]
  int tableRows;
  int width;
};

struct NormParams {
  unsigned long long x;         // [rows, width]
  unsigned long long residual;  // [rows, width], x added into it first; 0 = none
  unsigned long long weight;    // [width]
  unsigned long long out;       // [rows, width]
  float eps;
  int width;
  int bf16;
  int pad;
};

struct RotaryParams {
  unsigned long long qkv;          // [rows, (qHeads + 2 kvHeads) × headDim]
  unsigned long long positions;    // int32 [rows]
  unsigned long long frequencies;  // float [headDim / 2]
  unsigned long long q;            // [rows, qHeads, headDim]
  unsigned long long k;            // [rows, kvHeads, headDim]
  unsigned long long v;            // [rows, kvHeads, headDim]
  int qHeads;
  int kvHeads;
  int headDim;
  int bf16;
};

struct SiluMulParams {
  unsigned long long gateUp;  // [rows, 2 × width]: gate, then up
  unsigned long long out;     // [rows, width]
  long long rows;
  int width;
  int bf16;
};

struct ArgmaxParams {
  unsigned long long logits;  // float [rows, stride]
  unsigned long long out;     // int32 [rows]
  unsigned long long seed;
  long long stride;
  int vocab;
  float temperature;  // 0 = greedy
};

}  // namespace vat::kernels
