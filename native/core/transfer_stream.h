// A stream of the backend's own for one operation's transfers (swap, suspend).
#pragma once

#include <cstdint>

#include "backend/backend.h"

namespace vat {

class TransferStream {
 public:
  explicit TransferStream(Backend& backend) : backend_(backend), stream_(backend.createStream()) {}
  // Also on a failure path: the copies queued so far run to their end before
  // the host blocks, pages or slot they use are given back by the caller's undo.
  ~TransferStream() {
    try {
      backend_.syncStream(stream_);
    } catch (...) {
      // the device is lost (a sticky CUDA error): nothing runs on it any more
    }
    backend_.destroyStream(stream_);
  }
  TransferStream(const TransferStream&) = delete;
  TransferStream& operator=(const TransferStream&) = delete;
  uint64_t get() const { return stream_; }
  void finish() { backend_.syncStream(stream_); }

 private:
  Backend& backend_;
  uint64_t stream_;
};


}  // namespace vat
