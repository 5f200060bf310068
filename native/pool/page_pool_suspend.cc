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
  beginSuspend(id);
  Move move = suspendMemory(*pages_[id]);
  noteSuspended(id, move);
}

void PagePool::beginSuspend(PageId id) const {
  if (pages_[id]->state != PageState::Accessible) fail(ErrorCode::Internal, "only a mapped page can be suspended");
}

PagePool::Move PagePool::suspendMemory(const Page& p) const noexcept {
  Move move;
  std::vector<Address> all;
  size_t unmapped = 0;
  try {
    all.push_back(p.address);
    all.insert(all.end(), p.sharedAt.begin(), p.sharedAt.end());
    for (; unmapped < all.size(); ++unmapped) backend_.unmap(all[unmapped]);
    backend_.releasePage(p.handle);
    move.done = true;
  } catch (...) {
    move.error = std::current_exception();
    move.memoryKept = !remapAll(p.handle, all, unmapped, move.strays);
  }
  return move;
}

void PagePool::noteSuspended(PageId id, Move& move) {
  Page& p = *pages_[id];
  for (Address at : move.strays) strayMapping(at);
  if (move.done || move.memoryKept) {
    p.state = PageState::Suspended;  // when memoryKept, the handle too: its memory and bytes are still there
    --mapped_;
    ++suspended_;
  }
  if (move.done) {
    p.handle = 0;
    --created_;
    budget_->refund();
  }
  if (move.error) std::rethrow_exception(move.error);
}

// The undo of unmapping all[0, count): maps them back. When one cannot be,
// those mapped back are unmapped again so that none is (false); an address
// whose unmap fails then stays mapped, recorded in `strays`.
bool PagePool::remapAll(PageHandle handle, const std::vector<Address>& all, size_t count,
                        std::vector<Address>& strays) const {
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
  auto unmapOrRecord = [&](Address at) {
    try {
      backend_.unmap(at);
    } catch (...) {
      try {
        strays.push_back(at);
      } catch (...) {
        // no memory even for the record: the mapping goes at close with the range
      }
    }
  };
  for (size_t i = done; i-- > 0;) unmapOrRecord(all[i]);
  // the addresses past `count` were never unmapped: they go now
  for (size_t i = count; i < all.size(); ++i) unmapOrRecord(all[i]);
  return false;
}

// New memory at every address the page had; a failure unmaps and releases it.
void PagePool::resumePage(PageId id) {
  bool kept = beginResume(id);
  Move move = resumeMemory(*pages_[id], kept);
  noteResumed(id, kept, move);
}

bool PagePool::beginResume(PageId id) {
  const Page& p = *pages_[id];
  if (p.state != PageState::Suspended) fail(ErrorCode::Internal, "only a suspended page can be resumed");
  bool kept = p.handle != 0;  // a failed suspension kept the memory (suspendPage)
  if (!kept && !budget_->tryCharge()) {
    Error e(ErrorCode::OutOfMemory, "page pool budget reached (" + std::to_string(budgetPages()) + " pages of " +
                                        std::to_string(pageSize_) + " bytes)");
    e.requestedBytes = pageSize_;
    throw e;
  }
  return kept;
}

PagePool::Move PagePool::resumeMemory(const Page& p, bool kept) const noexcept {
  Move move;
  std::vector<Address> all;
  size_t mapped = 0;
  try {
    all.push_back(p.address);
    all.insert(all.end(), p.sharedAt.begin(), p.sharedAt.end());
    move.handle = kept ? p.handle : backend_.createPage();
    for (; mapped < all.size(); ++mapped) {
      backend_.map(all[mapped], move.handle);
      try {
        backend_.setAccess(all[mapped]);
      } catch (...) {
        ++mapped;  // unmapped below with the others
        throw;
      }
    }
    move.done = true;
    return move;
  } catch (...) {
    move.error = std::current_exception();
  }
  for (size_t i = 0; i < mapped; ++i) {
    try {
      backend_.unmap(all[i]);
    } catch (...) {
      try {
        move.strays.push_back(all[i]);  // recorded, unmapped again before the next mapping
      } catch (...) {
      }
    }
  }
  if (!kept && move.handle != 0) {
    try {
      backend_.releasePage(move.handle);
      move.handle = 0;
    } catch (...) {
      move.memoryKept = true;  // the memory would be owned by nothing: the record keeps it
    }
  }
  return move;
}

void PagePool::noteResumed(PageId id, bool kept, Move& move) {
  Page& p = *pages_[id];
  for (Address at : move.strays) strayMapping(at);
  if (move.done) {
    if (!kept) ++created_;
    p.handle = move.handle;
    p.state = PageState::Accessible;
    ++mapped_;
    --suspended_;
    return;
  }
  if (!kept && move.memoryKept) {
    // the next resume maps it; close releases it; still charged
    p.handle = move.handle;
    ++created_;
  } else if (!kept) {
    budget_->refund();
  }
  std::rethrow_exception(move.error);
}

}  // namespace vat
