// Typed errors of the native core. Every failure inside the library is one of
// these; the binding turns them into JS errors with a `code` property. Nothing
// in the library aborts or exits.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace vat {

enum class ErrorCode {
  CudaUnavailable,   // no driver, no device, or no VMM support
  LibraryUnavailable,  // a library loaded at run time (cuBLASLt for linear) is not there
  Cuda,              // any other driver error
  OutOfMemory,       // budget reached or the driver/OS has no memory left
  NoSlot,            // every sequence slot is taken
  OutOfRange,        // token / layer / byte range outside what exists or is backed
  SequenceReleased,  // a stale sequence handle (released, or its slot reused)
  Closed,            // the cache was closed
  InvalidArgument,   // bad argument that got past the TypeScript checks
  Os,                // an operating-system call failed (host backend)
  Aborted,           // an async operation was cancelled
  Suspended,         // the cache's pages were given back (suspend): nothing needing memory runs
  Internal,          // a broken invariant or an unexpected failure inside the library
};

const char* errorCodeName(ErrorCode code);

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message)
      : std::runtime_error(message), code_(code) {}
  ErrorCode code() const { return code_; }

  // Driver or OS status behind the error, when there is one.
  int status = 0;
  std::string statusName;
  // Figures for out-of-memory errors (bytes).
  uint64_t requestedBytes = 0;
  uint64_t availableBytes = 0;
  // The device the error happened on, in a cache over several devices; -1 otherwise.
  int device = -1;

 private:
  ErrorCode code_;
};

// `e` with another message, every figure kept.
inline Error withMessage(const Error& e, const std::string& message) {
  Error out(e.code(), message);
  out.status = e.status;
  out.statusName = e.statusName;
  out.requestedBytes = e.requestedBytes;
  out.availableBytes = e.availableBytes;
  out.device = e.device;
  return out;
}

[[noreturn]] inline void fail(ErrorCode code, const std::string& message) {
  throw Error(code, message);
}

}  // namespace vat
