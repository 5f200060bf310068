#include "backend/host_backend.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/sysinfo.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "common/errors.h"

namespace vat {
namespace {

constexpr size_t kDefaultPage = 2u << 20;

[[noreturn]] void osFail(const char* call, int err) {
  ErrorCode code = (err == ENOMEM || err == ENOSPC) ? ErrorCode::OutOfMemory : ErrorCode::Os;
  Error e(code, std::string(call) + " failed: " + std::strerror(err));
  e.status = err;
  e.statusName = err == ENOMEM ? "ENOMEM" : err == ENOSPC ? "ENOSPC" : "errno " + std::to_string(err);
  throw e;
}

void* at(Address a) { return reinterpret_cast<void*>(static_cast<uintptr_t>(a)); }

// Every mapped page is its own memory area (VMA), and mapping it into a
// PROT_NONE range can split that range: up to two areas per page. Linux caps
// areas per process at vm.max_map_count (65530 by default); past it every
// mmap in the process fails, the JS engine's included. So mapped host pages
// are capped, process-wide, well below it, and the cap is reported as
// out-of-memory like any other.
std::atomic<uint64_t> hostMappedPages{0};

uint64_t hostMappingCap() {
  static const uint64_t cap = [] {
    uint64_t limit = 65530;
    if (FILE* f = std::fopen("/proc/sys/vm/max_map_count", "r")) {
      unsigned long long v = 0;
      if (std::fscanf(f, "%llu", &v) == 1 && v > 0) limit = v;
      std::fclose(f);
    }
    return limit > 16384 ? (limit - 16384) / 2 : limit / 4;
  }();
  return cap;
}

std::mutex heldStreamsLock;
std::unordered_set<uint64_t>& heldStreams() {
  static auto* held = new std::unordered_set<uint64_t>();
  return *held;
}

bool streamHeld(uint64_t stream) {
  std::lock_guard<std::mutex> guard(heldStreamsLock);
  return heldStreams().count(stream) != 0;
}

// A held stream models a busy GPU stream: a device-to-device copy queued on
// it runs only when the stream finishes (finishHostStream) or a fence
// recorded on it is waited for, reading the memory as it is *then*, as the
// GPU would. So a test sees what a copy that outlives its pages does.
struct QueuedCopy {
  Address dst, src;
  size_t bytes;
};
std::unordered_map<uint64_t, std::vector<QueuedCopy>>& queuedCopies() {  // under heldStreamsLock
  static auto* queued = new std::unordered_map<uint64_t, std::vector<QueuedCopy>>();
  return *queued;
}

// Every host page mapped in the process (start -> bytes), so a queued copy
// can tell whether its memory is still there when it runs.
std::mutex mappedPagesLock;
std::map<Address, size_t>& mappedPages() {
  static auto* pages = new std::map<Address, size_t>();
  return *pages;
}

bool rangeMapped(Address a, size_t bytes) {  // under mappedPagesLock
  auto& pages = mappedPages();
  auto it = pages.upper_bound(a);
  if (it == pages.begin()) return false;
  --it;
  return a >= it->first && a + bytes <= it->first + it->second;
}

// Runs the copies queued on `stream` (heldStreamsLock held). A copy from
// memory no longer mapped fills its destination with 0xDB (on a GPU it
// would read whatever that address holds then, or fault); one to memory no
// longer mapped is dropped.
void runQueuedCopies(uint64_t stream) {
  auto found = queuedCopies().find(stream);
  if (found == queuedCopies().end()) return;
  std::vector<QueuedCopy> copies = std::move(found->second);
  queuedCopies().erase(found);
  std::lock_guard<std::mutex> guard(mappedPagesLock);
  for (const QueuedCopy& c : copies) {
    if (!rangeMapped(c.dst, c.bytes)) continue;
    if (rangeMapped(c.src, c.bytes)) std::memcpy(at(c.dst), at(c.src), c.bytes);
    else std::memset(at(c.dst), 0xDB, c.bytes);
  }
}

[[noreturn]] void mappingFail(const std::string& what, int err) {
  Error e(ErrorCode::Os, "host backend: " + what + " (the CUDA driver refuses this too)");
  e.status = err;
  e.statusName = err == EEXIST ? "EEXIST" : "EINVAL";
  throw e;
}

}  // namespace

void holdHostStream(uint64_t stream) {
  std::lock_guard<std::mutex> guard(heldStreamsLock);
  heldStreams().insert(stream);
}

void finishHostStream(uint64_t stream) {
  std::lock_guard<std::mutex> guard(heldStreamsLock);
  runQueuedCopies(stream);
  heldStreams().erase(stream);
}

HostBackend::HostBackend(size_t pageSize)
    : osPage_(static_cast<size_t>(sysconf(_SC_PAGESIZE))), pageSize_(pageSize == 0 ? kDefaultPage : pageSize) {
  if (pageSize_ % osPage_ != 0)
    fail(ErrorCode::InvalidArgument, "pageSize " + std::to_string(pageSize_) +
                                         " is not a multiple of the OS page size " + std::to_string(osPage_));
  fd_ = memfd_create("vattention-pages", MFD_CLOEXEC);
  if (fd_ < 0) osFail("memfd_create", errno);
}

HostBackend::~HostBackend() {
  if (fd_ >= 0) close(fd_);
}

Address HostBackend::reserveRange(size_t bytes) {
  CallScope scope(*this, BackendOp::ReserveRange);
  scope.injectFault("mmap(PROT_NONE)");
  void* p = mmap(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) osFail("mmap(PROT_NONE)", errno);
  liveResources().ranges++;
  return reinterpret_cast<uintptr_t>(p);
}

void HostBackend::freeRange(Address base, size_t bytes) {
  CallScope scope(*this, BackendOp::FreeRange);
  if (munmap(at(base), bytes) != 0) osFail("munmap", errno);
  liveResources().ranges--;
}

PageHandle HostBackend::createPage() {
  CallScope scope(*this, BackendOp::CreatePage);
  scope.injectFault("fallocate");
  std::lock_guard<std::mutex> lock(regionsLock_);
  bool fresh = freeRegions_.empty();
  PageHandle page = fresh ? nextRegion_ : freeRegions_.back();
  // fallocate commits real memory for the page, as cuMemCreate does, and
  // fails with ENOSPC/ENOMEM when there is none.
  if (fallocate(fd_, 0, offsetOf(page), static_cast<off_t>(pageSize_)) != 0) osFail("fallocate", errno);
  if (fresh) ++nextRegion_;
  else freeRegions_.pop_back();
  liveResources().pages++;
  return page;
}

void HostBackend::releasePage(PageHandle page) {
  CallScope scope(*this, BackendOp::ReleasePage);
  scope.injectFault("fallocate(PUNCH_HOLE)");
  if (fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offsetOf(page), static_cast<off_t>(pageSize_)) != 0)
    osFail("fallocate(PUNCH_HOLE)", errno);
  std::lock_guard<std::mutex> lock(regionsLock_);
  freeRegions_.push_back(page);
  liveResources().pages--;
}

void HostBackend::map(Address a, PageHandle page) {
  CallScope scope(*this, BackendOp::Map);
  scope.injectFault("mmap(MAP_FIXED)");
  std::lock_guard<std::mutex> guard(mappedLock_);
  if (mapped_.count(a)) mappingFail("address " + std::to_string(a) + " is mapped already", EEXIST);
  if (hostMappedPages.fetch_add(1) >= hostMappingCap()) {
    hostMappedPages.fetch_sub(1);
    Error e(ErrorCode::OutOfMemory, "host backend: " + std::to_string(hostMappingCap()) +
                                        " pages are mapped in this process, the most vm.max_map_count allows "
                                        "safely; use a larger pageSize or raise vm.max_map_count");
    e.statusName = "ENOMEM";
    e.status = ENOMEM;
    throw e;
  }
  void* p = mmap(at(a), pageSize_, PROT_NONE, MAP_SHARED | MAP_FIXED, fd_, offsetOf(page));
  if (p == MAP_FAILED) {
    hostMappedPages.fetch_sub(1);
    osFail("mmap(MAP_FIXED)", errno);
  }
  mapped_.insert(a);
  {
    std::lock_guard<std::mutex> pagesGuard(mappedPagesLock);
    mappedPages()[a] = pageSize_;
  }
  liveResources().mappings++;
}

void HostBackend::setAccess(Address a) {
  CallScope scope(*this, BackendOp::SetAccess);
  scope.injectFault("mprotect");
  if (mprotect(at(a), pageSize_, PROT_READ | PROT_WRITE) != 0) osFail("mprotect", errno);
}

void HostBackend::unmap(Address a) {
  CallScope scope(*this, BackendOp::Unmap);
  scope.injectFault("mmap(PROT_NONE, MAP_FIXED)");
  std::lock_guard<std::mutex> guard(mappedLock_);
  if (!mapped_.count(a)) mappingFail("address " + std::to_string(a) + " is not mapped", EINVAL);
  void* p = mmap(at(a), pageSize_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
  if (p == MAP_FAILED) osFail("mmap(PROT_NONE, MAP_FIXED)", errno);
  mapped_.erase(a);
  {
    std::lock_guard<std::mutex> pagesGuard(mappedPagesLock);
    mappedPages().erase(a);
  }
  hostMappedPages.fetch_sub(1);
  liveResources().mappings--;
}

void HostBackend::copyIn(Address dst, uint64_t pitch, const void* src, size_t rowBytes, size_t rows) {
  CallScope scope(*this, BackendOp::CopyIn);
  scope.injectFault("memcpy");
  const auto* from = static_cast<const uint8_t*>(src);
  for (size_t r = 0; r < rows; r++) std::memcpy(at(dst + r * pitch), from + r * rowBytes, rowBytes);
}

void HostBackend::copyDevice(Address dst, Address src, size_t bytes, uint64_t stream) {
  // Done at once, unless a test holds the stream (see QueuedCopy).
  CallScope scope(*this, BackendOp::CopyDevice);
  scope.injectFault("memcpy");
  {
    std::lock_guard<std::mutex> guard(heldStreamsLock);
    if (heldStreams().count(stream) != 0) {
      queuedCopies()[stream].push_back({dst, src, bytes});
      return;
    }
  }
  std::memcpy(at(dst), at(src), bytes);
}

void HostBackend::copyOut(void* dst, Address src, uint64_t pitch, size_t rowBytes, size_t rows) {
  CallScope scope(*this, BackendOp::CopyOut);
  scope.injectFault("memcpy");
  auto* to = static_cast<uint8_t*>(dst);
  for (size_t r = 0; r < rows; r++) std::memcpy(to + r * rowBytes, at(src + r * pitch), rowBytes);
}

// Host transfers are memcpy at once; "streams" are numbers with nothing
// queued on them.
void* HostBackend::allocHost(size_t bytes) {
  CallScope scope(*this, BackendOp::AllocHost);
  scope.injectFault("malloc");
  void* p = std::malloc(bytes ? bytes : 1);
  if (!p) {
    Error e(ErrorCode::OutOfMemory, "malloc(" + std::to_string(bytes) + ") failed: host memory exhausted");
    e.requestedBytes = bytes;
    throw e;
  }
  return p;
}

void HostBackend::freeHost(void* p) { std::free(p); }

uint64_t HostBackend::createStream() { return nextStream_.fetch_add(1) + 1; }

void HostBackend::destroyStream(uint64_t) {}

void HostBackend::syncStream(uint64_t stream) {
  // waiting for a held stream runs what was queued on it (as a fence wait does)
  std::lock_guard<std::mutex> guard(heldStreamsLock);
  runQueuedCopies(stream);
}

void HostBackend::copyToHost(void* dst, Address src, size_t bytes, uint64_t) {
  CallScope scope(*this, BackendOp::CopyToHost);
  scope.injectFault("memcpy");
  std::memcpy(dst, at(src), bytes);
}

void HostBackend::copyFromHost(Address dst, const void* src, size_t bytes, uint64_t) {
  CallScope scope(*this, BackendOp::CopyFromHost);
  scope.injectFault("memcpy");
  std::memcpy(at(dst), src, bytes);
}

// Host memory has no asynchronous writers: a fence has passed as soon as it
// is recorded, unless a test holds its stream (see holdHostStream).
FenceHandle HostBackend::recordFence(uint64_t stream) {
  CallScope scope(*this, BackendOp::Fence);
  scope.injectFault("recordFence");
  std::lock_guard<std::mutex> guard(fencesLock_);
  FenceHandle id = nextFence_++;
  fences_[id] = {stream, false};
  liveResources().fences++;
  return id;
}

bool HostBackend::fenceDone(FenceHandle fence) {
  CallScope scope(*this, BackendOp::FenceQuery);
  scope.injectFault("queryFence");
  std::lock_guard<std::mutex> guard(fencesLock_);
  auto it = fences_.find(fence);
  if (it == fences_.end()) fail(ErrorCode::Internal, "host backend: query of an unknown fence");
  return it->second.waited || !streamHeld(it->second.stream);
}

void HostBackend::waitFence(FenceHandle fence) {
  CallScope scope(*this, BackendOp::FenceWait);
  scope.injectFault("waitFence");
  std::lock_guard<std::mutex> guard(fencesLock_);
  auto it = fences_.find(fence);
  if (it == fences_.end()) fail(ErrorCode::Internal, "host backend: wait on an unknown fence");
  {
    // what was queued on the stream before the fence has run once it passed
    std::lock_guard<std::mutex> heldGuard(heldStreamsLock);
    runQueuedCopies(it->second.stream);
  }
  it->second.waited = true;
}

void HostBackend::destroyFence(FenceHandle fence) {
  std::lock_guard<std::mutex> guard(fencesLock_);
  fences_.erase(fence);
  // Counted even for an unknown fence: one destroyed twice shows as a
  // negative count in the leak tests instead of hiding.
  liveResources().fences--;
}

namespace {

// A number from a cgroup file ("max" or missing: none).
std::optional<uint64_t> cgroupValue(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "r");
  if (!f) return std::nullopt;
  char text[64] = {};
  bool read = std::fgets(text, sizeof text, f) != nullptr;
  std::fclose(f);
  if (!read || std::strncmp(text, "max", 3) == 0) return std::nullopt;
  char* end = nullptr;
  unsigned long long v = std::strtoull(text, &end, 10);
  if (end == text) return std::nullopt;
  return static_cast<uint64_t>(v);
}

// The memory limit of this process's cgroup and what it uses (v2, then v1),
// so that in a container the default budget is taken from what the
// container may use, not the host's RAM (past it the process is killed,
// not refused). VATTENTION_CGROUP_ROOT points elsewhere (tests).
std::optional<std::pair<uint64_t, uint64_t>> cgroupMemory() {
  const char* root = std::getenv("VATTENTION_CGROUP_ROOT");
  std::string base = root ? root : "/sys/fs/cgroup";
  auto limit = cgroupValue(base + "/memory.max");
  auto used = cgroupValue(base + "/memory.current");
  if (!limit) {
    limit = cgroupValue(base + "/memory/memory.limit_in_bytes");
    used = cgroupValue(base + "/memory/memory.usage_in_bytes");
    // v1 reports "no limit" as a huge number (a page-rounded 2^63)
    if (limit && *limit >= (uint64_t{1} << 60)) limit.reset();
  }
  if (!limit) return std::nullopt;
  return std::make_pair(*limit, used.value_or(0));
}

}  // namespace

MemoryInfo HostBackend::memoryInfo() {
  struct sysinfo si {};
  if (sysinfo(&si) != 0) osFail("sysinfo", errno);
  uint64_t unit = si.mem_unit ? si.mem_unit : 1;
  MemoryInfo m{(static_cast<uint64_t>(si.freeram) + si.bufferram) * unit, static_cast<uint64_t>(si.totalram) * unit};
  if (auto cg = cgroupMemory()) {
    auto [limit, used] = *cg;
    m.totalBytes = std::min(m.totalBytes, limit);
    m.freeBytes = std::min(m.freeBytes, limit > used ? limit - used : 0);
  }
  return m;
}

}  // namespace vat
