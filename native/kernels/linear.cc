#include "kernels/linear.h"

#include <dlfcn.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>

#include "common/errors.h"
#include "driver/cuda_driver.h"
#include "kernels/argument_checks.h"
#include "kernels/kernel_modules.h"

namespace vat::kernels {

using namespace cu;

namespace {

// The parts of cublasLt.h this file uses (the toolkit's headers are not
// needed to build): opaque handles, the algorithm blob and the enum values.
using Handle = void*;
using Desc = void*;
using Layout = void*;
using Preference = void*;
struct Algo {
  uint64_t data[8];
};
struct HeuristicResult {
  Algo algo;
  size_t workspaceSize;
  int state;
  float wavesCount;
  int reserved[4];
};
constexpr int kComputeFloat32 = 68;                       // CUBLAS_COMPUTE_32F
constexpr int kRealFloat32 = 0, kRealFloat16 = 2, kRealBFloat16 = 14;  // cudaDataType
constexpr int kTransA = 3, kTransB = 4;                   // CUBLASLT_MATMUL_DESC_TRANS{A,B}
constexpr int kOpN = 0, kOpT = 1;
constexpr int kPrefMaxWorkspace = 1;                      // CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES
constexpr uint64_t kWorkspaceBytes = 32ull << 20;

struct Api {
  int (*create)(Handle*);
  int (*descCreate)(Desc*, int, int);
  int (*descSet)(Desc, int, const void*, size_t);
  int (*layoutCreate)(Layout*, int, uint64_t, uint64_t, int64_t);
  int (*prefCreate)(Preference*);
  int (*prefSet)(Preference, int, const void*, size_t);
  int (*heuristic)(Handle, Desc, Layout, Layout, Layout, Layout, Preference, int, HeuristicResult*, int*);
  int (*matmul)(Handle, Desc, const void*, const void*, Layout, const void*, Layout, const void*, const void*, Layout,
                void*, Layout, const Algo*, void*, size_t, void*);
  int (*destroy)(Handle);
  int (*descDestroy)(Desc);
  int (*layoutDestroy)(Layout);
  int (*prefDestroy)(Preference);
};

struct Library {
  Api api{};
  bool loaded = false;
  std::string status;
};

bool resolve(void* lib, Api& a) {
  auto get = [&](auto& fn, const char* name) {
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
    return fn != nullptr;
  };
  return get(a.create, "cublasLtCreate") && get(a.descCreate, "cublasLtMatmulDescCreate") &&
         get(a.descSet, "cublasLtMatmulDescSetAttribute") && get(a.layoutCreate, "cublasLtMatrixLayoutCreate") &&
         get(a.prefCreate, "cublasLtMatmulPreferenceCreate") &&
         get(a.prefSet, "cublasLtMatmulPreferenceSetAttribute") &&
         get(a.heuristic, "cublasLtMatmulAlgoGetHeuristic") && get(a.matmul, "cublasLtMatmul") &&
         get(a.destroy, "cublasLtDestroy") && get(a.descDestroy, "cublasLtMatmulDescDestroy") &&
         get(a.layoutDestroy, "cublasLtMatrixLayoutDestroy") && get(a.prefDestroy, "cublasLtMatmulPreferenceDestroy");
}

Library load() {
  Library l;
  std::string tried;
  const char* configured = std::getenv("VATTENTION_CUBLASLT");
  for (const char* name : {configured, "libcublasLt.so.13", "libcublasLt.so.12"}) {
    if (!name || !*name) continue;
    void* lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* why = dlerror();
      tried += std::string(tried.empty() ? "" : "; ") + name + ": " + (why ? why : "not found");
      continue;
    }
    if (!resolve(lib, l.api)) {
      tried += std::string(tried.empty() ? "" : "; ") + name + ": a cublasLt function is missing";
      continue;
    }
    l.loaded = true;
    l.status = name;
    return l;
  }
  l.status = "cuBLASLt unavailable (" + tried +
             "); install the CUDA toolkit's or the nvidia-cublas package's libcublasLt, or set VATTENTION_CUBLASLT";
  return l;
}

const Library& library() {
  static const Library* instance = new Library(load());  // never destroyed: no driver work at exit
  return *instance;
}

void checkStatus(int status, const char* what) {
  if (status != 0) fail(ErrorCode::Cuda, std::string("cuBLASLt ") + what + " failed with status " + std::to_string(status));
}

// A shape's descriptors and algorithm, made on its first call.
struct Plan {
  Desc desc = nullptr;
  Layout a = nullptr, b = nullptr, c = nullptr;
  Algo algo{};
};

struct ContextState {
  Handle handle = nullptr;
  CUdeviceptr workspace = 0;
  std::map<std::tuple<int, bool, uint32_t, uint32_t, uint32_t>, Plan> plans;
};

// Per (context, stream): calls on two streams never share a workspace. The
// lock is held through each call's enqueue, and through a release.
struct States {
  std::mutex lock;
  std::map<std::pair<CUcontext, uint64_t>, ContextState> byStream;
};

States& states() {
  static auto* s = new States();  // never destroyed: no driver work at exit
  return *s;
}

// cuBLASLt's destroy functions fail only for handles that are not its own.
void destroyPlan(const Api& api, Plan& p) noexcept {
  if (p.c) api.layoutDestroy(p.c);
  if (p.b) api.layoutDestroy(p.b);
  if (p.a) api.layoutDestroy(p.a);
  if (p.desc) api.descDestroy(p.desc);
  p = Plan{};
}

// The descriptors, layouts and the heuristic's algorithm of one shape, into
// `p` and `pref` (the caller destroys what was made, also on failure).
void fillPlan(const Api& api, const ContextState& s, const LinearCall& c, int in, int out, Plan& p, Preference& pref) {
  // Column-major view: weight is [in × out] (ld in), transposed; input [in ×
  // rows] (ld in); output [out × rows] (ld out).
  checkStatus(api.descCreate(&p.desc, kComputeFloat32, kRealFloat32), "matmul descriptor");
  const int opT = kOpT, opN = kOpN;
  checkStatus(api.descSet(p.desc, kTransA, &opT, sizeof opT), "descriptor attribute");
  checkStatus(api.descSet(p.desc, kTransB, &opN, sizeof opN), "descriptor attribute");
  checkStatus(api.layoutCreate(&p.a, in, c.inFeatures, c.outFeatures, c.inFeatures), "layout");
  checkStatus(api.layoutCreate(&p.b, in, c.inFeatures, c.rows, c.inFeatures), "layout");
  checkStatus(api.layoutCreate(&p.c, out, c.outFeatures, c.rows, c.outFeatures), "layout");
  checkStatus(api.prefCreate(&pref), "preference");
  checkStatus(api.prefSet(pref, kPrefMaxWorkspace, &kWorkspaceBytes, sizeof kWorkspaceBytes), "preference attribute");
  HeuristicResult result{};
  int found = 0;
  checkStatus(api.heuristic(s.handle, p.desc, p.a, p.b, p.c, p.c, pref, 1, &result, &found), "heuristic");
  if (found == 0) fail(ErrorCode::InvalidArgument, "linear: cuBLASLt has no algorithm for this shape and type");
  p.algo = result.algo;
}

// A shape's plan; nothing of it left behind when it cannot be made.
Plan makePlan(const Api& api, const ContextState& s, const LinearCall& c) {
  const int in = c.dtype == ActivationDtype::BFloat16 ? kRealBFloat16 : kRealFloat16;
  const int out = c.outputFloat32 ? kRealFloat32 : in;
  Plan p;
  Preference pref = nullptr;
  try {
    fillPlan(api, s, c, in, out, p, pref);
  } catch (...) {
    if (pref) api.prefDestroy(pref);
    destroyPlan(api, p);
    throw;
  }
  api.prefDestroy(pref);
  return p;
}

}  // namespace

bool cublasLtLoaded() { return library().loaded; }
std::string cublasLtStatus() { return library().status; }

void checkLinear(const LinearCall& c) {
  const char* what = "linear";
  if (c.rows == 0 || c.inFeatures == 0 || c.outFeatures == 0) invalid(what, "rows and features must be at least 1");
  if (c.inFeatures % 8 != 0 || c.outFeatures % 8 != 0) invalid(what, "features must be multiples of 8");
  checkAligned(what, "input", c.input, 16);
  checkAligned(what, "weight", c.weight, 16);
  checkAligned(what, "output", c.output, 16);
  // part of the check, before the device is touched: without cuBLASLt a call says so on any machine
  if (!library().loaded) fail(ErrorCode::LibraryUnavailable, library().status);
}

void linear(const LinearCall& c) {
  checkLinear(c);
  const Library& lib = library();
  States& all = states();
  std::lock_guard<std::mutex> guard(all.lock);
  const std::pair<CUcontext, uint64_t> at{currentContext(), c.stream};
  if (!all.byStream.count(at)) {
    ContextState fresh;  // into the map only once whole
    checkStatus(lib.api.create(&fresh.handle), "create");
    CUresult r = driver().cuMemAlloc(&fresh.workspace, kWorkspaceBytes);
    if (r != CUDA_SUCCESS) lib.api.destroy(fresh.handle);
    check(r, "cuMemAlloc");
    all.byStream.emplace(at, std::move(fresh));
  }
  ContextState& s = all.byStream.at(at);
  auto key = std::make_tuple(static_cast<int>(c.dtype), c.outputFloat32, c.rows, c.inFeatures, c.outFeatures);
  auto it = s.plans.find(key);
  if (it == s.plans.end()) it = s.plans.emplace(key, makePlan(lib.api, s, c)).first;
  const Plan& p = it->second;
  const float alpha = 1.f, beta = 0.f;
  checkStatus(lib.api.matmul(s.handle, p.desc, &alpha, reinterpret_cast<const void*>(c.weight), p.a,
                             reinterpret_cast<const void*>(c.input), p.b, &beta, reinterpret_cast<void*>(c.output), p.c,
                             reinterpret_cast<void*>(c.output), p.c, &p.algo, reinterpret_cast<void*>(s.workspace),
                             kWorkspaceBytes, reinterpret_cast<void*>(c.stream)),
              "matmul");
}

bool linearKeepsStreams() {
  States& all = states();
  std::lock_guard<std::mutex> guard(all.lock);
  return !all.byStream.empty();
}

bool releaseLinearStream(uint64_t stream) {
  States& all = states();
  std::lock_guard<std::mutex> guard(all.lock);
  auto it = all.byStream.find({currentContext(), stream});
  if (it == all.byStream.end()) return false;
  // Its matmuls may still run: they read the workspace. A failed wait keeps everything.
  check(driver().cuStreamSynchronize(reinterpret_cast<CUstream>(stream)), "cuStreamSynchronize");
  ContextState s = std::move(it->second);
  all.byStream.erase(it);
  const Api& api = library().api;
  for (auto& [shape, plan] : s.plans) destroyPlan(api, plan);
  api.destroy(s.handle);
  check(driver().cuMemFree(s.workspace), "cuMemFree");
  return true;
}

}  // namespace vat::kernels
