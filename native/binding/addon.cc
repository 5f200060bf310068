// N-API entry point: the module's exports and its per-environment state.
// The cache object is in native_cache.h, every async operation in cache_task.h, errors and
// conversions in js_values.h, test-only exports in test_hooks.h.
#include <napi.h>

#include "backend/cuda_backend.h"
#include "binding/js_values.h"
#include "binding/native_cache.h"
#include "binding/kernels_binding.h"
#include "binding/test_hooks.h"
#include "common/lifetime.h"
#include "driver/cuda_driver.h"

extern "C" const int vat_cuda_types_checked;

namespace vat {
namespace {

// driverInfo(): what loading the driver found, and the devices.
Napi::Value DriverInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  cu::DriverStatus st = cu::driverStatus();
  Napi::Object o = Napi::Object::New(env);
  o.Set("loaded", st.loaded);
  o.Set("library", st.library);
  o.Set("problem", st.problem);
  o.Set("version", st.version);
  o.Set("typesCheckedAgainst", vat_cuda_types_checked);
  Napi::Array devices = Napi::Array::New(env);
  if (st.loaded) {
    std::vector<CudaDeviceInfo> list = guarded(env, [] { return listCudaDevices(); });
    for (uint32_t i = 0; i < list.size(); ++i) {
      Napi::Object d = Napi::Object::New(env);
      d.Set("ordinal", list[i].ordinal);
      d.Set("name", list[i].name);
      d.Set("totalBytes", num(env, list[i].totalBytes));
      d.Set("computeCapability", std::to_string(list[i].computeMajor) + "." + std::to_string(list[i].computeMinor));
      d.Set("vmmSupported", list[i].vmmSupported);
      d.Set("granularity", num(env, list[i].granularity));
      devices.Set(i, d);
    }
  }
  o.Set("devices", devices);
  return o;
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  watchProcessExit();
  auto* data = new AddonData();
  env.SetInstanceData<AddonData>(data);
  napi_add_env_cleanup_hook(env, closeAllInEnv, data);
  exports.Set("NativeCache", NativeCache::Define(env));
  exports.Set("driverInfo", Napi::Function::New<DriverInfo>(env, "driverInfo"));
  addKernels(env, exports);
  addTestHooks(env, exports);
  return exports;
}

}  // namespace
}  // namespace vat

static Napi::Object InitVattention(Napi::Env env, Napi::Object exports) { return vat::Init(env, exports); }
NODE_API_MODULE(vattention, InitVattention)
