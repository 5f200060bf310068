#include "device/fence_list.h"

namespace vat {

void FenceList::record(Backend& backend, uint64_t stream, FenceUse use) {
  fences_.reserve(fences_.size() + 1);  // after the fence exists nothing may fail
  fences_.push_back({backend.recordFence(stream), use});
}

bool FenceList::pending(Backend& backend) noexcept {
  for (size_t i = 0; i < fences_.size();) {
    bool passed = false;
    try {
      passed = backend.fenceDone(fences_[i].fence);
    } catch (...) {
    }
    if (passed) {
      backend.destroyFence(fences_[i].fence);
      fences_[i] = fences_.back();
      fences_.pop_back();
    } else {
      ++i;
    }
  }
  return !fences_.empty();
}

void FenceList::waitAll(Backend& backend) {
  while (!fences_.empty()) {
    backend.waitFence(fences_.back().fence);
    backend.destroyFence(fences_.back().fence);
    fences_.pop_back();
  }
}

void FenceList::drain(Backend& backend) noexcept {
  for (const Entry& e : fences_) {
    try {
      backend.waitFence(e.fence);
    } catch (...) {
    }
    backend.destroyFence(e.fence);
  }
  fences_.clear();
}

}  // namespace vat
