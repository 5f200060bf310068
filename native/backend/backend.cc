#include "backend/backend.h"

#include "common/errors.h"

#include <mutex>

namespace vat {

LiveResources& liveResources() {
  static LiveResources* live = new LiveResources();
  return *live;
}

namespace {
std::mutex nextFaultLock;
struct {
  bool armed = false;
  BackendOp op = BackendOp::CreatePage;
  uint64_t nth = 0;
  bool outOfMemory = false;
} nextFault;
}  // namespace

void armNextBackendFault(BackendOp op, uint64_t nth, bool outOfMemory) {
  std::lock_guard<std::mutex> guard(nextFaultLock);
  nextFault.armed = true;
  nextFault.op = op;
  nextFault.nth = nth;
  nextFault.outOfMemory = outOfMemory;
}

Backend::Backend() : owner_(std::this_thread::get_id()) {
  std::lock_guard<std::mutex> guard(nextFaultLock);
  if (nextFault.armed) {
    nextFault.armed = false;
    armFault(nextFault.op, nextFault.nth, nextFault.outOfMemory);
  }
}

const char* backendOpName(BackendOp op) {
  switch (op) {
    case BackendOp::ReserveRange: return "reserveRange";
    case BackendOp::FreeRange: return "freeRange";
    case BackendOp::CreatePage: return "createPage";
    case BackendOp::ReleasePage: return "releasePage";
    case BackendOp::Map: return "map";
    case BackendOp::SetAccess: return "setAccess";
    case BackendOp::Unmap: return "unmap";
    case BackendOp::CopyIn: return "copyIn";
    case BackendOp::CopyOut: return "copyOut";
    case BackendOp::Fence: return "fence";
    case BackendOp::kCount: break;
  }
  return "unknown";
}

std::array<OpCounter, kBackendOpCount> Backend::counters() const {
  std::array<OpCounter, kBackendOpCount> out{};
  for (size_t i = 0; i < kBackendOpCount; ++i) {
    out[i].calls = calls_[i].load(std::memory_order_relaxed);
    out[i].nanos = nanos_[i].load(std::memory_order_relaxed);
  }
  return out;
}

void Backend::armFault(BackendOp op, uint64_t nth, bool outOfMemory) {
  faults_.op = op;
  faults_.countdown = nth;
  faults_.outOfMemory = outOfMemory;
  faults_.armed.store(true, std::memory_order_release);
}

Backend::CallScope::CallScope(Backend& backend, BackendOp op)
    : backend_(backend), op_(op), start_(std::chrono::steady_clock::now()) {}

Backend::CallScope::~CallScope() {
  auto i = static_cast<size_t>(op_);
  auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start_).count();
  backend_.calls_[i].fetch_add(1, std::memory_order_relaxed);
  backend_.nanos_[i].fetch_add(static_cast<uint64_t>(ns), std::memory_order_relaxed);
  if (std::this_thread::get_id() == backend_.owner_) backend_.ownerCalls_.fetch_add(1, std::memory_order_relaxed);
}

void Backend::CallScope::injectFault(const char* call) {
  FaultPlan& plan = backend_.faults_;
  if (!plan.armed.load(std::memory_order_acquire) || plan.op != op_) return;
  if (plan.countdown > 0) {
    --plan.countdown;
    return;
  }
  plan.armed.store(false, std::memory_order_relaxed);
  Error e(plan.outOfMemory ? ErrorCode::OutOfMemory : backend_.ordinaryError(),
          std::string(call) + " failed: injected fault (" + (plan.outOfMemory ? "out of memory" : "error") + ")");
  e.statusName = "INJECTED";
  throw e;
}

}  // namespace vat
