// The pool's side of suspend / resume: a page's Suspended state (its memory
// given back to the backend, every address it was mapped at kept) and the
// way back to Accessible. See page_pool.h for the state machine.
#include <algorithm>

#include "common/errors.h"
#include "pool/page_pool.h"

namespace vat {

void PagePool::forgetSuspendedAt(Page& p, PageId id, Address at) {
  if (p.sharedAt.empty()) {
    p = Page{};
    vacant_.push_back(id);
    --suspended_;
    return;
  }
  dropSharedAddress(p, at);
}

// Every mapping goes, then the memory; a failure maps back what was unmapped.
// When mapping back fails too, the page cannot be Accessible any more (a
// slot would list an address with nothing behind it): it is Suspended at
// every address, keeping its memory (the handle), which resumePage maps
// again with the bytes it holds, and the error is thrown.
void PagePool::suspendPage(PageId id) {
  Page& p = *pages_[id];
  if (p.state != PageState::Accessible) fail(ErrorCode::Internal, "only a mapped page can be suspended");
  std::vector<Address> all{p.address};
  all.insert(all.end(), p.sharedAt.begin(), p.sharedAt.end());
  size_t unmapped = 0;
  try {
    for (; unmapped < all.size(); ++unmapped) backend_.unmap(all[unmapped]);
    backend_.releasePage(p.handle);
  } catch (...) {
    if (!remapAll(p.handle, all, unmapped)) {
      p.state = PageState::Suspended;  // the handle kept: its memory and bytes are still there
      --mapped_;
      ++suspended_;
    }
    throw;
  }
  p.handle = 0;
  p.state = PageState::Suspended;
  --mapped_;
  --created_;
  budget_->refund();
  ++suspended_;
}

// The undo of unmapping all[0, count): maps them back. When one cannot be,
// those mapped back are unmapped again so that none is (false); an address
// whose unmap fails then stays mapped, recorded as a stray mapping.
bool PagePool::remapAll(PageHandle handle, const std::vector<Address>& all, size_t count) {
  size_t done = 0;
  try {
    for (; done < count; ++done) {
      backend_.map(all[done], handle);
      try {
        backend_.setAccess(all[done]);
      } catch (...) {
        backend_.unmap(all[done]);
        throw;
      }
    }
    return true;
  } catch (...) {
  }
  for (size_t i = done; i-- > 0;) {
    try {
      backend_.unmap(all[i]);
    } catch (...) {
      strayMapping(all[i]);
    }
  }
  // the addresses past `count` were never unmapped: they go now
  for (size_t i = count; i < all.size(); ++i) {
    try {
      backend_.unmap(all[i]);
    } catch (...) {
      strayMapping(all[i]);
    }
  }
  return false;
}

// New memory at every address the page had; a failure unmaps and releases it.
void PagePool::resumePage(PageId id) {
  Page& p = *pages_[id];
  if (p.state != PageState::Suspended) fail(ErrorCode::Internal, "only a suspended page can be resumed");
  bool kept = p.handle != 0;  // a failed suspension kept the memory (suspendPage)
  if (!kept && !budget_->tryCharge()) {
    Error e(ErrorCode::OutOfMemory, "page pool budget reached (" + std::to_string(budgetPages()) + " pages of " +
                                        std::to_string(pageSize_) + " bytes)");
    e.requestedBytes = pageSize_;
    throw e;
  }
  std::vector<Address> all{p.address};
  all.insert(all.end(), p.sharedAt.begin(), p.sharedAt.end());
  PageHandle handle = 0;
  try {
    handle = kept ? p.handle : backend_.createPage();
  } catch (...) {
    if (!kept) budget_->refund();
    throw;
  }
  size_t mapped = 0;
  try {
    for (; mapped < all.size(); ++mapped) {
      backend_.map(all[mapped], handle);
      try {
        backend_.setAccess(all[mapped]);
      } catch (...) {
        ++mapped;  // unmapped below with the others
        throw;
      }
    }
  } catch (...) {
    for (size_t i = 0; i < mapped; ++i) {
      try {
        backend_.unmap(all[i]);
      } catch (...) {
        strayMapping(all[i]);  // recorded, unmapped again before the next mapping
      }
    }
    if (!kept) {
      try {
        backend_.releasePage(handle);
        budget_->refund();
      } catch (...) {
        // the memory would be owned by nothing: kept in the record instead
        // (the next resume maps it; close releases it), still charged
        p.handle = handle;
        ++created_;
      }
    }
    throw;
  }
  if (!kept) ++created_;
  p.handle = handle;
  p.state = PageState::Accessible;
  ++mapped_;
  --suspended_;
}

}  // namespace vat
