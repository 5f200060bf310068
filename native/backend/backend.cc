#include "backend/backend.h"

#include "common/errors.h"

#include <algorithm>
#include <mutex>
#include <new>
#include <thread>

namespace vat {

LiveResources& liveResources() {
  static LiveResources* live = new LiveResources();
  return *live;
}

namespace {
std::mutex nextFaultLock;
std::vector<Fault> nextFaults;
}  // namespace

void armNextBackendFault(const Fault& fault) {
  std::lock_guard<std::mutex> guard(nextFaultLock);
  nextFaults.push_back(fault);
}

Backend::Backend() : owner_(std::this_thread::get_id()) {
  std::lock_guard<std::mutex> guard(nextFaultLock);
  for (const Fault& f : nextFaults) faults_.arm(f);
  nextFaults.clear();
}

void FaultPlan::arm(const Fault& f) {
  std::lock_guard<std::mutex> guard(lock_);
  faults_.push_back(f);
  armed_.store(true, std::memory_order_release);
}

void FaultPlan::disarm() {
  std::lock_guard<std::mutex> guard(lock_);
  faults_.erase(std::remove_if(faults_.begin(), faults_.end(), [](const Fault& f) { return !f.inClose; }), faults_.end());
  armed_.store(!faults_.empty(), std::memory_order_release);
}

bool FaultPlan::take(BackendOp op, Fault& out) {
  if (!armed_.load(std::memory_order_acquire)) return false;
  std::lock_guard<std::mutex> guard(lock_);
  for (size_t i = 0; i < faults_.size(); ++i) {
    Fault& f = faults_[i];
    if (f.op != op) continue;
    if (f.countdown > 0) {
      --f.countdown;
      return false;  // the earliest fault armed for an op counts down first
    }
    out = f;
    faults_.erase(faults_.begin() + static_cast<std::ptrdiff_t>(i));
    if (faults_.empty()) armed_.store(false, std::memory_order_release);
    return true;
  }
  return false;
}

void applyFault(const Fault& f, ErrorCode ordinary, const char* call) {
  if (f.delayMs) std::this_thread::sleep_for(std::chrono::milliseconds(f.delayMs));
  if (f.kind == FaultKind::Delay) return;
  if (f.kind == FaultKind::HostAlloc) throw std::bad_alloc();
  bool oom = f.kind == FaultKind::OutOfMemory;
  Error e(oom ? ErrorCode::OutOfMemory : ordinary,
          std::string(call) + " failed: injected fault (" + (oom ? "out of memory" : "error") + ")");
  e.statusName = "INJECTED";
  throw e;
}

void Backend::injectFault(BackendOp op, const char* what, ErrorCode ordinary) {
  Fault f;
  if (faults_.take(op, f)) applyFault(f, ordinary, what);
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
    case BackendOp::CopyDevice: return "copyDevice";
    case BackendOp::CopyToHost: return "copyToHost";
    case BackendOp::CopyFromHost: return "copyFromHost";
    case BackendOp::AllocHost: return "allocHost";
    case BackendOp::Fence: return "fence";
    case BackendOp::FenceQuery: return "fenceQuery";
    case BackendOp::FenceWait: return "fenceWait";
    case BackendOp::StartWorker: return "startWorker";
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
  Fault f;
  if (backend_.faults_.take(op_, f)) applyFault(f, backend_.ordinaryError(), call);
}

}  // namespace vat
