// `vattention/kernels`: the attention kernels' N-API functions. The TS layer
// (lib/kernels.ts) validates and flattens each call into one object of
// numbers, strings and bigints; this file only converts and forwards.
#pragma once

#include <napi.h>

namespace vat {

// Adds `kernels` to the addon's exports.
void addKernels(Napi::Env env, Napi::Object exports);

// Adds the model kernels (model_ops_binding.cc) to the `kernels` object.
void addModelOps(Napi::Env env, Napi::Object kernels);

}  // namespace vat
