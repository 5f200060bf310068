// Test-only exports: `vattention/testing` (GPU kernels over cache memory,
// streams, contexts, raw driver loops), live resource counts, fault
// injection and held host streams. Not part of the cache itself.
#pragma once

#include <napi.h>

#include "backend/backend.h"

namespace vat {

// A test-armed fault from (op name, nth call from now, kind name, delay ms)
// at info[first...]; ERR_INVALID_ARGUMENT for an unknown op or kind.
Fault faultFrom(const Napi::CallbackInfo& info, size_t first);

// Adds `testing`, `liveResources`, `injectNextCacheFault`, `holdHostStream`
// and `finishHostStream` to the addon's exports.
void addTestHooks(Napi::Env env, Napi::Object exports);

}  // namespace vat
