// The attention kernels' modules: the PTX of a cache type and head
// dimension loaded once per context, its functions and their occupancy; the
// device's primary context made current.
#pragma once

#include <cstdint>

#include "driver/cuda_types.h"
#include "kernels/decode_attention.h"

namespace vat::kernels {

struct Functions {
  cu::CUfunction partial = nullptr;
  int blocksPerMultiprocessor = 0;  // of `partial`, with its shared memory
  cu::CUfunction prefill = nullptr;
  cu::CUfunction reduce = nullptr;
  cu::CUfunction append = nullptr;
  int multiprocessors = 0;
};

// Index of a supported head dimension in 64, 80, 96, 128, 192, 256; -1 otherwise.
int headDimIndex(uint32_t headDim);
int elementBytes(KVDtype dtype);

// The current context (ERR_INTERNAL when there is none).
cu::CUcontext currentContext();

// The functions for (current context, dtype, headDim), loaded on first use
// and kept for the process. ERR_INVALID_ARGUMENT for fp8 on a GPU older
// than compute capability 8.9.
const Functions& functionsFor(KVDtype dtype, uint32_t headDim);

}  // namespace vat::kernels
