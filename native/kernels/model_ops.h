// Host side of the element-wise model kernels (model_ops.cu): argument
// checks (all before any driver call), the module loaded once per context,
// the launches. Activations are 16-bit, `bf16` choosing bf16 over fp16.
#pragma once

#include <cstdint>

namespace vat::kernels {

struct GatherRowsCall {
  uint32_t rows = 0, tableRows = 0, width = 0;
  uint64_t table = 0, ids = 0, out = 0, stream = 0;
};

struct RmsNormCall {
  bool bf16 = false;
  uint32_t rows = 0, width = 0;
  float eps = 1e-5f;
  uint64_t x = 0, residual = 0, weight = 0, out = 0, stream = 0;
};

struct RotaryCall {
  bool bf16 = false;
  uint32_t rows = 0, qHeads = 0, kvHeads = 0, headDim = 0;
  uint64_t qkv = 0, positions = 0, frequencies = 0, q = 0, k = 0, v = 0, stream = 0;
};

struct SiluMulCall {
  bool bf16 = false;
  uint32_t rows = 0, width = 0;
  uint64_t gateUp = 0, out = 0, stream = 0;
};

struct ArgmaxCall {
  uint32_t rows = 0, vocab = 0;
  uint64_t stride = 0;  // elements between rows (≥ vocab)
  float temperature = 0.f;
  uint64_t seed = 0;
  uint64_t logits = 0, out = 0, stream = 0;
};

void checkGatherRows(const GatherRowsCall& c);
void checkRmsNorm(const RmsNormCall& c);
void checkRotary(const RotaryCall& c);
void checkSiluMul(const SiluMulCall& c);
void checkArgmax(const ArgmaxCall& c);

// Each checks its call, then queues one kernel on the current context.
void gatherRows(const GatherRowsCall& c);
void rmsNorm(const RmsNormCall& c);
void rotary(const RotaryCall& c);
void siluMul(const SiluMulCall& c);
void argmax(const ArgmaxCall& c);

}  // namespace vat::kernels
