// Linear layers through cuBLASLt: out[rows, outFeatures] = input[rows,
// inFeatures] · weight[outFeatures, inFeatures]ᵀ (the [out, in] layout of
// checkpoints), 16-bit inputs, fp32 accumulation, a 16-bit or fp32 output.
// libcublasLt is loaded at run time (VATTENTION_CUBLASLT, then
// libcublasLt.so.13, then .so.12), never linked: without it a call is
// ERR_LIBRARY_UNAVAILABLE naming what was tried. One handle, one 32 MiB
// workspace and one algorithm per shape, per (context, stream), kept until
// releaseLinearStream (kernels.releaseStream);
// a call queues one matmul and allocates nothing (capturable in a graph
// after its shape's first call).
#pragma once

#include <cstdint>
#include <string>

namespace vat::kernels {

enum class ActivationDtype { Float16, BFloat16 };

struct LinearCall {
  ActivationDtype dtype = ActivationDtype::Float16;
  bool outputFloat32 = false;
  uint32_t rows = 0, inFeatures = 0, outFeatures = 0;
  uint64_t input = 0, weight = 0, output = 0, stream = 0;
};

// The arguments, then that cuBLASLt is there (ERR_LIBRARY_UNAVAILABLE): no driver call.
void checkLinear(const LinearCall& call);
// On the current context (useDevice).
void linear(const LinearCall& call);

// What linear keeps for `stream` on the current context (its cuBLASLt
// handle, workspace and plans) goes, after the stream's work: false when it
// keeps nothing for it. linearKeepsStreams: whether it keeps anything at all
// (no driver call).
bool releaseLinearStream(uint64_t stream);
bool linearKeepsStreams();

// Loads libcublasLt on first use: whether it loaded, and from where or why not.
bool cublasLtLoaded();
std::string cublasLtStatus();

}  // namespace vat::kernels
