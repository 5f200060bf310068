#include "driver/cuda_driver.h"

#include <dlfcn.h>

#include <mutex>

#include "common/errors.h"

namespace vat::cu {
namespace {

// Entry points are asked for at the CUDA 12.0 ABI: cuGetProcAddress then
// hands back the _v2 variants (cuMemGetInfo_v2, cuMemcpyHtoD_v2, ...) that
// match the signatures in DriverApi. Drivers older than 12.0 are refused.
constexpr int kApiVersion = 12000;

using GetProcAddressV2 = CUresult (*)(const char*, void**, int, cuuint64_t, int*);
using GetProcAddressV1 = CUresult (*)(const char*, void**, int, cuuint64_t);

struct Loaded {
  DriverApi api{};
  DriverStatus status;
};

template <typename Fn>
bool resolve(void* lib, const char* symbol, Fn* out, std::string* problem) {
  static GetProcAddressV2 getV2 = nullptr;
  static GetProcAddressV1 getV1 = nullptr;
  if (!getV2 && !getV1) {
    getV2 = reinterpret_cast<GetProcAddressV2>(dlsym(lib, "cuGetProcAddress_v2"));
    if (!getV2) getV1 = reinterpret_cast<GetProcAddressV1>(dlsym(lib, "cuGetProcAddress"));
    if (!getV2 && !getV1) {
      *problem = "libcuda has no cuGetProcAddress (driver older than CUDA 11.3)";
      return false;
    }
  }
  void* fn = nullptr;
  CUresult r;
  if (getV2) {
    int status = 0;
    r = getV2(symbol, &fn, kApiVersion, CU_GET_PROC_ADDRESS_DEFAULT, &status);
    if (r == CUDA_SUCCESS && status != CU_GET_PROC_ADDRESS_SUCCESS) fn = nullptr;
  } else {
    r = getV1(symbol, &fn, kApiVersion, CU_GET_PROC_ADDRESS_DEFAULT);
  }
  if (r != CUDA_SUCCESS || !fn) {
    *problem = std::string("driver does not provide ") + symbol + " at API version 12.0 (cuGetProcAddress returned " +
               std::to_string(r) + ")";
    return false;
  }
  *out = reinterpret_cast<Fn>(fn);
  return true;
}

bool resolveAll(void* lib, DriverApi& a, std::string* p) {
#define VAT_RESOLVE(name) resolve(lib, #name, &a.name, p)
  return VAT_RESOLVE(cuInit) && VAT_RESOLVE(cuDriverGetVersion) && VAT_RESOLVE(cuGetErrorName) &&
         VAT_RESOLVE(cuGetErrorString) && VAT_RESOLVE(cuDeviceGetCount) && VAT_RESOLVE(cuDeviceGet) &&
         VAT_RESOLVE(cuDeviceGetName) && VAT_RESOLVE(cuDeviceGetAttribute) && VAT_RESOLVE(cuDeviceTotalMem) &&
         VAT_RESOLVE(cuDevicePrimaryCtxRetain) && VAT_RESOLVE(cuDevicePrimaryCtxRelease) &&
         VAT_RESOLVE(cuCtxGetCurrent) && VAT_RESOLVE(cuCtxSetCurrent) && VAT_RESOLVE(cuCtxSynchronize) && VAT_RESOLVE(cuCtxGetDevice) &&
         VAT_RESOLVE(cuCtxPushCurrent) && VAT_RESOLVE(cuCtxPopCurrent) && VAT_RESOLVE(cuCtxCreate) &&
         VAT_RESOLVE(cuCtxDestroy) &&
         VAT_RESOLVE(cuMemGetInfo) && VAT_RESOLVE(cuMemAlloc) && VAT_RESOLVE(cuMemFree) && VAT_RESOLVE(cuMemGetAllocationGranularity) &&
         VAT_RESOLVE(cuMemAddressReserve) && VAT_RESOLVE(cuMemAddressFree) && VAT_RESOLVE(cuMemCreate) &&
         VAT_RESOLVE(cuMemRelease) && VAT_RESOLVE(cuMemMap) && VAT_RESOLVE(cuMemUnmap) &&
         VAT_RESOLVE(cuMemSetAccess) && VAT_RESOLVE(cuMemcpyHtoD) && VAT_RESOLVE(cuMemcpyDtoH) &&
         VAT_RESOLVE(cuMemcpy2D) && VAT_RESOLVE(cuMemcpyHtoDAsync) && VAT_RESOLVE(cuMemcpyDtoDAsync) && VAT_RESOLVE(cuMemcpyDtoHAsync) &&
         VAT_RESOLVE(cuMemAllocHost) && VAT_RESOLVE(cuMemFreeHost) && VAT_RESOLVE(cuMemsetD8Async) &&
         VAT_RESOLVE(cuMemsetD32Async) && VAT_RESOLVE(cuEventCreate) && VAT_RESOLVE(cuEventRecord) &&
         VAT_RESOLVE(cuEventQuery) && VAT_RESOLVE(cuEventSynchronize) && VAT_RESOLVE(cuEventDestroy) && VAT_RESOLVE(cuEventElapsedTime) &&
         VAT_RESOLVE(cuStreamCreate) && VAT_RESOLVE(cuStreamDestroy) && VAT_RESOLVE(cuStreamSynchronize) &&
         VAT_RESOLVE(cuModuleLoadData) && VAT_RESOLVE(cuModuleUnload) && VAT_RESOLVE(cuModuleGetFunction) &&
         VAT_RESOLVE(cuFuncSetAttribute) && VAT_RESOLVE(cuOccupancyMaxActiveBlocksPerMultiprocessor) &&
         VAT_RESOLVE(cuStreamIsCapturing) && VAT_RESOLVE(cuStreamBeginCapture) && VAT_RESOLVE(cuStreamEndCapture) &&
         VAT_RESOLVE(cuGraphInstantiateWithFlags) && VAT_RESOLVE(cuGraphLaunch) && VAT_RESOLVE(cuGraphExecDestroy) &&
         VAT_RESOLVE(cuGraphDestroy) && VAT_RESOLVE(cuLaunchKernel);
#undef VAT_RESOLVE
}

Loaded load() {
  Loaded out;
  const char* soname = "libcuda.so.1";
  void* lib = dlopen(soname, RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    const char* why = dlerror();
    out.status.problem = std::string("dlopen(\"") + soname + "\") failed: " + (why ? why : "unknown reason") +
                         " (is the NVIDIA driver installed?)";
    return out;
  }
  out.status.library = soname;
  Dl_info info{};
  void* sym = dlsym(lib, "cuInit");
  if (sym && dladdr(sym, &info) && info.dli_fname) out.status.library = info.dli_fname;
  if (!resolveAll(lib, out.api, &out.status.problem)) return out;  // keep lib open: harmless
  CUresult r = out.api.cuInit(0);
  if (r != CUDA_SUCCESS) {
    out.status.problem = "cuInit failed with " + std::to_string(r) + " (no usable GPU or driver/device mismatch)";
    return out;
  }
  out.api.cuDriverGetVersion(&out.status.version);
  out.status.loaded = true;
  return out;
}

const Loaded& loaded() {
  // Never destroyed: static destructors at process exit must not touch the driver.
  static const Loaded* instance = new Loaded(load());
  return *instance;
}

}  // namespace

const DriverApi& driver() {
  const Loaded& l = loaded();
  if (!l.status.loaded) fail(ErrorCode::CudaUnavailable, "CUDA driver unavailable: " + l.status.problem);
  return l.api;
}

DriverStatus driverStatus() { return loaded().status; }

std::string resultName(CUresult result) {
  const Loaded& l = loaded();
  const char* name = nullptr;
  if (l.api.cuGetErrorName && l.api.cuGetErrorName(result, &name) == CUDA_SUCCESS && name) return name;
  return "CUresult " + std::to_string(result);
}

void check(CUresult result, const char* call) {
  if (result == CUDA_SUCCESS) return;
  std::string name = resultName(result);
  const char* text = nullptr;
  const Loaded& l = loaded();
  if (l.api.cuGetErrorString) l.api.cuGetErrorString(result, &text);
  ErrorCode code = result == CUDA_ERROR_OUT_OF_MEMORY ? ErrorCode::OutOfMemory : ErrorCode::Cuda;
  Error e(code, std::string(call) + " failed: " + name + " (" + std::to_string(result) + ")" +
                    (text ? std::string(": ") + text : std::string()));
  e.status = result;
  e.statusName = name;
  throw e;
}

}  // namespace vat::cu
