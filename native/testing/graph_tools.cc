// CUDA graph tools of vattention/testing: a capture of the attention
// kernels, replayed (the kernels' graph-capture test).
#include "common/errors.h"
#include "driver/cuda_driver.h"
#include "kernels/decode_attention.h"
#include "testing/device_tools.h"

namespace vat::testing {

using namespace cu;

namespace {
CUstream asStream(uint64_t stream) { return reinterpret_cast<CUstream>(stream); }
}  // namespace

void beginCapture(int device, uint64_t stream) {
  kernels::useDevice(device);
  check(driver().cuStreamBeginCapture(asStream(stream), CU_STREAM_CAPTURE_MODE_THREAD_LOCAL), "cuStreamBeginCapture");
}

uint64_t endCapture(int device, uint64_t stream) {
  kernels::useDevice(device);
  const DriverApi& d = driver();
  CUgraph graph = nullptr;
  check(d.cuStreamEndCapture(asStream(stream), &graph), "cuStreamEndCapture");
  CUgraphExec exec = nullptr;
  CUresult r = d.cuGraphInstantiateWithFlags(&exec, graph, 0);
  d.cuGraphDestroy(graph);
  check(r, "cuGraphInstantiateWithFlags");
  return reinterpret_cast<uint64_t>(exec);
}

void launchGraph(int device, uint64_t graph, uint64_t stream) {
  kernels::useDevice(device);
  check(driver().cuGraphLaunch(reinterpret_cast<CUgraphExec>(graph), asStream(stream)), "cuGraphLaunch");
}

void destroyGraph(int device, uint64_t graph) {
  kernels::useDevice(device);
  check(driver().cuGraphExecDestroy(reinterpret_cast<CUgraphExec>(graph)), "cuGraphExecDestroy");
}

}  // namespace vat::testing
