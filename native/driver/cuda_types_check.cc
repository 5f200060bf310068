// Compile-time proof that driver/cuda_types.h matches the real cuda.h, when
// the toolkit is present at build time (include path /usr/local/cuda/include
// or CUDA_PATH). Without cuda.h this file compiles to nothing.
#if defined(__has_include)
#if __has_include(<cuda.h>)
#include <cuda.h>

#include "driver/cuda_types.h"

#define VAT_SAME_VALUE(name) static_assert(static_cast<long long>(vat::cu::name) == static_cast<long long>(::name), #name)
#define VAT_SAME_LAYOUT(ours, theirs)                                  \
  static_assert(sizeof(vat::cu::ours) == sizeof(::theirs), #ours " size"); \
  static_assert(alignof(vat::cu::ours) == alignof(::theirs), #ours " alignment")
#define VAT_SAME_OFFSET(ours, theirs, field) \
  static_assert(offsetof(vat::cu::ours, field) == offsetof(::theirs, field), #ours "." #field)

VAT_SAME_VALUE(CUDA_SUCCESS);
VAT_SAME_VALUE(CUDA_ERROR_OUT_OF_MEMORY);
VAT_SAME_VALUE(CUDA_ERROR_NOT_READY);
VAT_SAME_VALUE(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT);
VAT_SAME_VALUE(CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE);
VAT_SAME_VALUE(CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH);
VAT_SAME_VALUE(CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE);
VAT_SAME_VALUE(CU_DEVICE_ATTRIBUTE_PCI_BUS_ID);
VAT_SAME_VALUE(CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID);
VAT_SAME_VALUE(CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID);
VAT_SAME_VALUE(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR);
VAT_SAME_VALUE(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR);
VAT_SAME_VALUE(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED);
VAT_SAME_VALUE(CU_MEM_ALLOCATION_TYPE_PINNED);
VAT_SAME_VALUE(CU_MEM_HANDLE_TYPE_NONE);
VAT_SAME_VALUE(CU_MEM_LOCATION_TYPE_DEVICE);
VAT_SAME_VALUE(CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
VAT_SAME_VALUE(CU_MEM_ALLOC_GRANULARITY_MINIMUM);
VAT_SAME_VALUE(CU_EVENT_DISABLE_TIMING);
VAT_SAME_VALUE(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES);
VAT_SAME_VALUE(CU_STREAM_CAPTURE_STATUS_NONE);
VAT_SAME_VALUE(CU_STREAM_CAPTURE_MODE_THREAD_LOCAL);
VAT_SAME_VALUE(CU_STREAM_NON_BLOCKING);
VAT_SAME_VALUE(CU_GET_PROC_ADDRESS_DEFAULT);
VAT_SAME_VALUE(CU_GET_PROC_ADDRESS_SUCCESS);

static_assert(sizeof(vat::cu::CUresult) == sizeof(::CUresult), "CUresult size");
static_assert(sizeof(vat::cu::CUdevice) == sizeof(::CUdevice), "CUdevice size");
static_assert(sizeof(vat::cu::CUdeviceptr) == sizeof(::CUdeviceptr), "CUdeviceptr size");
static_assert(sizeof(vat::cu::CUmemGenericAllocationHandle) == sizeof(::CUmemGenericAllocationHandle),
              "CUmemGenericAllocationHandle size");
static_assert(sizeof(vat::cu::CUmemAllocationType) == sizeof(::CUmemAllocationType), "enum size");
static_assert(sizeof(vat::cu::CUmemLocationType) == sizeof(::CUmemLocationType), "enum size");
static_assert(sizeof(vat::cu::CUmemAccess_flags) == sizeof(::CUmemAccess_flags), "enum size");

VAT_SAME_LAYOUT(CUmemLocation, CUmemLocation);
VAT_SAME_OFFSET(CUmemLocation, CUmemLocation, type);
VAT_SAME_OFFSET(CUmemLocation, CUmemLocation, id);

VAT_SAME_LAYOUT(CUmemAllocationProp, CUmemAllocationProp);
VAT_SAME_OFFSET(CUmemAllocationProp, CUmemAllocationProp, type);
VAT_SAME_OFFSET(CUmemAllocationProp, CUmemAllocationProp, requestedHandleTypes);
VAT_SAME_OFFSET(CUmemAllocationProp, CUmemAllocationProp, location);
VAT_SAME_OFFSET(CUmemAllocationProp, CUmemAllocationProp, win32HandleMetaData);
VAT_SAME_OFFSET(CUmemAllocationProp, CUmemAllocationProp, allocFlags);

VAT_SAME_LAYOUT(CUmemAccessDesc, CUmemAccessDesc);
VAT_SAME_OFFSET(CUmemAccessDesc, CUmemAccessDesc, location);
VAT_SAME_OFFSET(CUmemAccessDesc, CUmemAccessDesc, flags);

VAT_SAME_VALUE(CU_MEMORYTYPE_HOST);
VAT_SAME_VALUE(CU_MEMORYTYPE_DEVICE);
static_assert(sizeof(vat::cu::CUmemorytype) == sizeof(::CUmemorytype), "enum size");
VAT_SAME_LAYOUT(CUDA_MEMCPY2D, CUDA_MEMCPY2D);
VAT_SAME_OFFSET(CUDA_MEMCPY2D, CUDA_MEMCPY2D, srcXInBytes);
VAT_SAME_OFFSET(CUDA_MEMCPY2D, CUDA_MEMCPY2D, srcMemoryType);
VAT_SAME_OFFSET(CUDA_MEMCPY2D, CUDA_MEMCPY2D, srcHost);
VAT_SAME_OFFSET(CUDA_MEMCPY2D, CUDA_MEMCPY2D, srcDevice);
VAT_SAME_OFFSET(CUDA_MEMCPY2D, CUDA_MEMCPY2D, srcPitch);
VAT_SAME_OFFSET(CUDA_MEMCPY2D, CUDA_MEMCPY2D, dstMemoryType);
VAT_SAME_OFFSET(CUDA_MEMCPY2D, CUDA_MEMCPY2D, dstHost);
VAT_SAME_OFFSET(CUDA_MEMCPY2D, CUDA_MEMCPY2D, dstDevice);
VAT_SAME_OFFSET(CUDA_MEMCPY2D, CUDA_MEMCPY2D, dstPitch);
VAT_SAME_OFFSET(CUDA_MEMCPY2D, CUDA_MEMCPY2D, WidthInBytes);
VAT_SAME_OFFSET(CUDA_MEMCPY2D, CUDA_MEMCPY2D, Height);

// Exported so tests/tools can tell whether the check ran in this build.
extern "C" const int vat_cuda_types_checked = CUDA_VERSION;
#else
extern "C" const int vat_cuda_types_checked = 0;
#endif
#else
extern "C" const int vat_cuda_types_checked = 0;
#endif
