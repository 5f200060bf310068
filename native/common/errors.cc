#include "common/errors.h"

namespace vat {

const char* errorCodeName(ErrorCode code) {
  switch (code) {
    case ErrorCode::CudaUnavailable: return "ERR_CUDA_UNAVAILABLE";
    case ErrorCode::LibraryUnavailable: return "ERR_LIBRARY_UNAVAILABLE";
    case ErrorCode::Cuda: return "ERR_CUDA";
    case ErrorCode::OutOfMemory: return "ERR_OUT_OF_MEMORY";
    case ErrorCode::NoSlot: return "ERR_NO_SLOT";
    case ErrorCode::OutOfRange: return "ERR_OUT_OF_RANGE";
    case ErrorCode::SequenceReleased: return "ERR_SEQUENCE_RELEASED";
    case ErrorCode::Closed: return "ERR_CLOSED";
    case ErrorCode::InvalidArgument: return "ERR_INVALID_ARGUMENT";
    case ErrorCode::Os: return "ERR_OS";
    case ErrorCode::Aborted: return "ERR_ABORTED";
    case ErrorCode::Suspended: return "ERR_SUSPENDED";
    case ErrorCode::Internal: return "ERR_INTERNAL";
  }
  return "ERR_UNKNOWN";
}

}  // namespace vat
