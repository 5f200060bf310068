#include "backend/cuda_backend.h"

#include "common/errors.h"
#include "driver/cuda_driver.h"

namespace vat {

using namespace cu;

namespace {

CUmemAllocationProp pinnedOn(CUdevice device) {
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  return prop;
}

CudaDeviceInfo describe(const DriverApi& d, int ordinal) {
  CudaDeviceInfo info;
  info.ordinal = ordinal;
  CUdevice dev = 0;
  check(d.cuDeviceGet(&dev, ordinal), "cuDeviceGet");
  char name[256] = {0};
  check(d.cuDeviceGetName(name, sizeof(name) - 1, dev), "cuDeviceGetName");
  info.name = name;
  size_t total = 0;
  check(d.cuDeviceTotalMem(&total, dev), "cuDeviceTotalMem");
  info.totalBytes = total;
  check(d.cuDeviceGetAttribute(&info.computeMajor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
        "cuDeviceGetAttribute");
  check(d.cuDeviceGetAttribute(&info.computeMinor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev),
        "cuDeviceGetAttribute");
  int vmm = 0;
  check(d.cuDeviceGetAttribute(&vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev),
        "cuDeviceGetAttribute");
  info.vmmSupported = vmm != 0;
  if (info.vmmSupported) {
    CUmemAllocationProp prop = pinnedOn(dev);
    size_t g = 0;
    check(d.cuMemGetAllocationGranularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM),
          "cuMemGetAllocationGranularity");
    info.granularity = g;
  }
  return info;
}

}  // namespace

std::vector<CudaDeviceInfo> listCudaDevices() {
  const DriverApi& d = driver();
  int count = 0;
  check(d.cuDeviceGetCount(&count), "cuDeviceGetCount");
  std::vector<CudaDeviceInfo> out;
  for (int i = 0; i < count; ++i) out.push_back(describe(d, i));
  return out;
}

CudaBackend::CudaBackend(int device, size_t pageSize) : ordinal_(device) {
  const DriverApi& d = driver();
  int count = 0;
  check(d.cuDeviceGetCount(&count), "cuDeviceGetCount");
  if (count == 0) fail(ErrorCode::CudaUnavailable, "CUDA driver loaded but it reports no device");
  if (device < 0 || device >= count)
    fail(ErrorCode::CudaUnavailable,
         "CUDA device " + std::to_string(device) + " requested but the driver reports " + std::to_string(count) +
             " device(s)");
  CudaDeviceInfo info = describe(d, device);
  if (!info.vmmSupported)
    fail(ErrorCode::CudaUnavailable, "CUDA device " + std::to_string(device) + " (" + info.name +
                                         ") does not support virtual memory management "
                                         "(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 0)");
  check(d.cuDeviceGet(&device_, device), "cuDeviceGet");
  granularity_ = info.granularity;
  pageSize_ = pageSize == 0 ? granularity_ : pageSize;
  if (pageSize_ % granularity_ != 0) {
    Error e(ErrorCode::InvalidArgument, "pageSize " + std::to_string(pageSize_) +
                                            " is not a multiple of the device's allocation granularity " +
                                            std::to_string(granularity_));
    throw e;
  }
  prop_ = pinnedOn(device_);
  access_.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access_.location.id = device_;
  access_.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  // The last step that can fail: nothing to undo before it, and the
  // destructor releases it from here on.
  check(d.cuDevicePrimaryCtxRetain(&context_, device_), "cuDevicePrimaryCtxRetain");
  liveResources().contexts++;
}

CudaBackend::~CudaBackend() {
  // The owner only destroys a backend while the process is alive (see
  // cache/kv_cache.cc); releasing the primary context is then safe.
  if (context_) {
    driver().cuDevicePrimaryCtxRelease(device_);
    liveResources().contexts--;
  }
}

// Every driver call of this backend runs in its own context, whatever the
// calling thread had current (another cache's device, another CUDA addon),
// and leaves that thread's context as it found it. When the context is
// already current (the worker thread, a single-device server) this costs one
// cuCtxGetCurrent.
CudaBackend::ContextScope::ContextScope(const CudaBackend& backend) {
  const DriverApi& d = driver();
  CUcontext current = nullptr;
  d.cuCtxGetCurrent(&current);
  if (current == backend.context_) return;
  check(d.cuCtxPushCurrent(backend.context_), "cuCtxPushCurrent");
  pushed_ = true;
}

CudaBackend::ContextScope::~ContextScope() {
  if (!pushed_) return;
  CUcontext popped = nullptr;
  driver().cuCtxPopCurrent(&popped);
}

void CudaBackend::bindThread() {
  const DriverApi& d = driver();
  CUcontext current = nullptr;
  d.cuCtxGetCurrent(&current);
  if (current != context_) check(d.cuCtxSetCurrent(context_), "cuCtxSetCurrent");
}

Address CudaBackend::reserveRange(size_t bytes) {
  ContextScope context(*this);
  CallScope scope(*this, BackendOp::ReserveRange);
  scope.injectFault("cuMemAddressReserve");
  CUdeviceptr base = 0;
  check(driver().cuMemAddressReserve(&base, bytes, pageSize_, 0, 0), "cuMemAddressReserve");
  liveResources().ranges++;
  return base;
}

void CudaBackend::freeRange(Address base, size_t bytes) {
  ContextScope context(*this);
  CallScope scope(*this, BackendOp::FreeRange);
  check(driver().cuMemAddressFree(base, bytes), "cuMemAddressFree");
  liveResources().ranges--;
}

PageHandle CudaBackend::createPage() {
  ContextScope context(*this);
  CallScope scope(*this, BackendOp::CreatePage);
  scope.injectFault("cuMemCreate");
  CUmemGenericAllocationHandle handle = 0;
  check(driver().cuMemCreate(&handle, pageSize_, &prop_, 0), "cuMemCreate");
  liveResources().pages++;
  return handle;
}

void CudaBackend::releasePage(PageHandle page) {
  ContextScope context(*this);
  CallScope scope(*this, BackendOp::ReleasePage);
  scope.injectFault("cuMemRelease");
  check(driver().cuMemRelease(page), "cuMemRelease");
  liveResources().pages--;
}

void CudaBackend::map(Address at, PageHandle page) {
  ContextScope context(*this);
  CallScope scope(*this, BackendOp::Map);
  scope.injectFault("cuMemMap");
  check(driver().cuMemMap(at, pageSize_, 0, page, 0), "cuMemMap");
  liveResources().mappings++;
}

void CudaBackend::setAccess(Address at) {
  ContextScope context(*this);
  CallScope scope(*this, BackendOp::SetAccess);
  scope.injectFault("cuMemSetAccess");
  check(driver().cuMemSetAccess(at, pageSize_, &access_, 1), "cuMemSetAccess");
}

void CudaBackend::unmap(Address at) {
  ContextScope context(*this);
  CallScope scope(*this, BackendOp::Unmap);
  scope.injectFault("cuMemUnmap");
  check(driver().cuMemUnmap(at, pageSize_), "cuMemUnmap");
  liveResources().mappings--;
}

namespace {
// A pitched copy between packed host rows and rows `pitch` apart on the device.
cu::CUDA_MEMCPY2D pitchedCopy(size_t rowBytes, size_t rows) {
  cu::CUDA_MEMCPY2D c{};
  c.WidthInBytes = rowBytes;
  c.Height = rows;
  return c;
}
}  // namespace

void CudaBackend::copyIn(Address dst, uint64_t pitch, const void* src, size_t rowBytes, size_t rows) {
  ContextScope context(*this);
  CallScope scope(*this, BackendOp::CopyIn);
  if (pitch == rowBytes || rows == 1) {
    scope.injectFault("cuMemcpyHtoD");
    check(driver().cuMemcpyHtoD(dst, src, rowBytes * rows), "cuMemcpyHtoD");
    return;
  }
  scope.injectFault("cuMemcpy2D");
  cu::CUDA_MEMCPY2D c = pitchedCopy(rowBytes, rows);
  c.srcMemoryType = cu::CU_MEMORYTYPE_HOST;
  c.srcHost = src;
  c.srcPitch = rowBytes;
  c.dstMemoryType = cu::CU_MEMORYTYPE_DEVICE;
  c.dstDevice = dst;
  c.dstPitch = pitch;
  check(driver().cuMemcpy2D(&c), "cuMemcpy2D");
}

void CudaBackend::copyOut(void* dst, Address src, uint64_t pitch, size_t rowBytes, size_t rows) {
  ContextScope context(*this);
  CallScope scope(*this, BackendOp::CopyOut);
  if (pitch == rowBytes || rows == 1) {
    scope.injectFault("cuMemcpyDtoH");
    check(driver().cuMemcpyDtoH(dst, src, rowBytes * rows), "cuMemcpyDtoH");
    return;
  }
  scope.injectFault("cuMemcpy2D");
  cu::CUDA_MEMCPY2D c = pitchedCopy(rowBytes, rows);
  c.srcMemoryType = cu::CU_MEMORYTYPE_DEVICE;
  c.srcDevice = src;
  c.srcPitch = pitch;
  c.dstMemoryType = cu::CU_MEMORYTYPE_HOST;
  c.dstHost = dst;
  c.dstPitch = rowBytes;
  check(driver().cuMemcpy2D(&c), "cuMemcpy2D");
}

void CudaBackend::copyDevice(Address dst, Address src, size_t bytes, uint64_t stream) {
  ContextScope context(*this);
  CallScope scope(*this, BackendOp::CopyDevice);
  scope.injectFault("cuMemcpyDtoDAsync");
  auto s = reinterpret_cast<CUstream>(stream);
  check(driver().cuMemcpyDtoDAsync(dst, src, bytes, s), "cuMemcpyDtoDAsync");
  if (stream == 0) check(driver().cuStreamSynchronize(s), "cuStreamSynchronize");
}

void* CudaBackend::allocHost(size_t bytes) {
  ContextScope ctx(*this);
  CallScope scope(*this, BackendOp::AllocHost);
  scope.injectFault("cuMemAllocHost");
  void* p = nullptr;
  check(driver().cuMemAllocHost(&p, bytes), "cuMemAllocHost");
  return p;
}

void CudaBackend::freeHost(void* p) {
  if (!p) return;
  ContextScope ctx(*this);
  driver().cuMemFreeHost(p);
}

uint64_t CudaBackend::createStream() {
  ContextScope ctx(*this);
  CUstream s = nullptr;
  check(driver().cuStreamCreate(&s, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
  return reinterpret_cast<uint64_t>(s);
}

void CudaBackend::destroyStream(uint64_t stream) {
  ContextScope ctx(*this);
  driver().cuStreamDestroy(reinterpret_cast<CUstream>(stream));
}

void CudaBackend::syncStream(uint64_t stream) {
  ContextScope ctx(*this);
  check(driver().cuStreamSynchronize(reinterpret_cast<CUstream>(stream)), "cuStreamSynchronize");
}

void CudaBackend::copyToHost(void* dst, Address src, size_t bytes, uint64_t stream) {
  ContextScope ctx(*this);
  CallScope scope(*this, BackendOp::CopyToHost);
  scope.injectFault("cuMemcpyDtoHAsync");
  check(driver().cuMemcpyDtoHAsync(dst, src, bytes, reinterpret_cast<CUstream>(stream)), "cuMemcpyDtoHAsync");
}

void CudaBackend::copyFromHost(Address dst, const void* src, size_t bytes, uint64_t stream) {
  ContextScope ctx(*this);
  CallScope scope(*this, BackendOp::CopyFromHost);
  scope.injectFault("cuMemcpyHtoDAsync");
  check(driver().cuMemcpyHtoDAsync(dst, src, bytes, reinterpret_cast<CUstream>(stream)), "cuMemcpyHtoDAsync");
}

FenceHandle CudaBackend::recordFence(uint64_t stream) {
  ContextScope context(*this);
  CallScope scope(*this, BackendOp::Fence);
  scope.injectFault("cuEventRecord");
  const DriverApi& d = driver();
  CUevent event = nullptr;
  check(d.cuEventCreate(&event, CU_EVENT_DISABLE_TIMING), "cuEventCreate");
  CUresult r = d.cuEventRecord(event, reinterpret_cast<CUstream>(stream));
  if (r != CUDA_SUCCESS) {
    d.cuEventDestroy(event);
    check(r, "cuEventRecord");
  }
  liveResources().fences++;
  return reinterpret_cast<FenceHandle>(event);
}

bool CudaBackend::fenceDone(FenceHandle fence) {
  ContextScope context(*this);
  CallScope scope(*this, BackendOp::FenceQuery);
  scope.injectFault("cuEventQuery");
  CUresult r = driver().cuEventQuery(reinterpret_cast<CUevent>(fence));
  if (r == CUDA_ERROR_NOT_READY) return false;
  check(r, "cuEventQuery");
  return true;
}

void CudaBackend::waitFence(FenceHandle fence) {
  ContextScope context(*this);
  CallScope scope(*this, BackendOp::FenceWait);
  scope.injectFault("cuEventSynchronize");
  check(driver().cuEventSynchronize(reinterpret_cast<CUevent>(fence)), "cuEventSynchronize");
}

void CudaBackend::destroyFence(FenceHandle fence) {
  try {
    ContextScope context(*this);
    if (driver().cuEventDestroy(reinterpret_cast<CUevent>(fence)) == CUDA_SUCCESS) liveResources().fences--;
  } catch (...) {
    // No context on this thread: the event goes with the context.
  }
}

MemoryInfo CudaBackend::memoryInfo() {
  ContextScope context(*this);
  size_t freeBytes = 0, total = 0;
  check(driver().cuMemGetInfo(&freeBytes, &total), "cuMemGetInfo");
  return {freeBytes, total};
}

}  // namespace vat
