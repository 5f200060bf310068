#include "pool/page_pool.h"

#include <algorithm>

#include "common/errors.h"

namespace vat {

PagePool::PagePool(Backend& backend, std::shared_ptr<BudgetAccount> budget)
    : backend_(backend), pageSize_(backend.pageSize()), budget_(std::move(budget)) {}

PoolCounts PagePool::counts() const {
  return {budgetPages(), created_.load(), idle_.size(), mapped_.load(), stranded_.size(), suspended_, held_};
}

PageId PagePool::takeIdle() {
  if (idle_.empty()) return kNone;
  PageId id = idle_.back();
  idle_.pop_back();
  return id;
}

PageId PagePool::create() {
  if (!reserveCreation()) {
    Error e(ErrorCode::OutOfMemory, "page pool budget reached (" + std::to_string(budgetPages()) + " pages of " +
                                        std::to_string(pageSize_) + " bytes)");
    e.requestedBytes = pageSize_;
    throw e;
  }
  PageHandle handle;
  try {
    handle = backend_.createPage();
  } catch (...) {
    cancelCreation();
    throw;
  }
  return adopt(handle);
}

bool PagePool::reserveCreation() {
  // The record is allocated now, so that adopt() cannot fail with a page
  // created and nowhere to keep it.
  // The idle and stranded lists get room for every record, so putting a
  // page there (after an unmap, on a rollback path) never allocates.
  // Invariant: a vacant record for every pending creation.
  if (vacant_.size() <= pendingCreations_) {
    size_t records = pages_.size() + 1;
    vacant_.reserve(records);
    idle_.reserve(records);
    stranded_.reserve(records);
    pages_.push_back(std::make_unique<Page>());
    vacant_.push_back(static_cast<PageId>(records - 1));
  }
  if (!budget_->tryCharge()) return false;  // (the vacant record stays for the next creation)
  ++pendingCreations_;
  return true;
}

PageId PagePool::adopt(PageHandle handle) {
  PageId id = vacant_.back();
  vacant_.pop_back();
  *pages_[id] = Page{handle, PageState::Created, 0, {}};
  --pendingCreations_;
  ++created_;
  return id;
}

// A page going idle, stranded or away is no change's any more: place() first.
void PagePool::putIdle(PageId id) {
  place(id);
  idle_.push_back(id);
}

void PagePool::hold(PageId id) {
  Page& p = *pages_[id];
  if (p.held) return;
  if (p.state == PageState::Mapped || p.state == PageState::Accessible) --mapped_;
  p.held = true;
  ++held_;
}

void PagePool::place(PageId id) {
  Page& p = *pages_[id];
  if (!p.held) return;
  p.held = false;
  --held_;
  if (p.state == PageState::Mapped || p.state == PageState::Accessible) ++mapped_;
}

void PagePool::strand(PageId id) {
  place(id);
  Page& p = *pages_[id];
  if (p.state != PageState::Mapped && p.state != PageState::Accessible) return;
  p.state = PageState::Stranded;
  --mapped_;
  stranded_.push_back(id);
}

void PagePool::strayMapping(Address at) noexcept {
  try {
    strays_.push_back(at);
  } catch (...) {
    // no memory even for the record: the mapping goes at close with the range
  }
}

size_t PagePool::retryStranded() {
  for (size_t i = strays_.size(); i-- > 0;) {
    try {
      backend_.unmap(strays_[i]);
    } catch (...) {
      continue;
    }
    strays_.erase(strays_.begin() + static_cast<std::ptrdiff_t>(i));
  }
  for (size_t i = stranded_.size(); i-- > 0;) {
    PageId id = stranded_[i];
    try {
      unmap(*pages_[id]);
    } catch (...) {
      continue;
    }
    stranded_.erase(stranded_.begin() + static_cast<std::ptrdiff_t>(i));
    idle_.push_back(id);
  }
  return stranded_.size();
}

void PagePool::destroy(PageId id) {
  backend_.releasePage(pages_[id]->handle);  // throws: page stays Created (and held, if it was)
  noteReleased(id);
}

PageId PagePool::takeIdleToRelease() {
  PageId id = takeIdle();
  if (id != kNone) hold(id);
  return id;
}

void PagePool::noteReleased(PageId id) {
  Page& p = *pages_[id];
  if (p.held) --held_;
  p = Page{};
  vacant_.push_back(id);
  --created_;
  budget_->refund();
}

void PagePool::map(Page& p, Address at) {
  backend_.map(at, p.handle);  // throws: still Created
  p.state = PageState::Mapped;
  p.address = at;
  try {
    backend_.setAccess(at);
  } catch (...) {
    // Undo the map so the page is Created again; if even that fails the page
    // stays Mapped and unmap() will be retried at close.
    try {
      backend_.unmap(at);
      p.state = PageState::Created;
      p.address = 0;
    } catch (...) {
      if (!p.held) ++mapped_;
    }
    throw;
  }
  p.state = PageState::Accessible;
  if (!p.held) ++mapped_;
}

void PagePool::unmap(Page& p) {
  backend_.unmap(p.address);  // throws: page unchanged
  noteUnmapped(p);
}

void PagePool::noteUnmapped(Page& p) {
  if (p.state != PageState::Stranded && !p.held) --mapped_;
  p.state = PageState::Created;
  p.address = 0;
}

void PagePool::noteMappingAt(PageId id, Address at) {
  Page& p = *pages_[id];
  if (p.state != PageState::Accessible) fail(ErrorCode::InvalidArgument, "only a mapped page can be shared");
  p.sharedAt.push_back(at);  // throws bad_alloc with nothing changed
  if (p.sharedAt.size() == 1) ++sharedPages_;
  ++extraMappings_;
}

bool PagePool::noteUnmappedAt(PageId id, Address at) {
  Page& p = *pages_[id];
  if (p.sharedAt.empty()) {
    noteUnmapped(p);
    return true;
  }
  forgetMappingAt(id, at);
  return false;
}

void PagePool::mapNoted(PageHandle handle, Address at, bool& mapped) {
  mapped = false;
  backend_.map(at, handle);
  mapped = true;
  try {
    backend_.setAccess(at);
  } catch (...) {
    try {
      backend_.unmap(at);
      mapped = false;
    } catch (...) {
      // left mapped: the caller's undo unmaps it again (or keeps it recorded)
    }
    throw;
  }
}

void PagePool::forgetMappingAt(PageId id, Address at) {
  Page& p = *pages_[id];
  if (p.sharedAt.empty()) return;  // the page's only mapping is never a note
  if (at == p.address) {
    p.address = p.sharedAt.back();
    p.sharedAt.pop_back();
  } else {
    auto it = std::find(p.sharedAt.begin(), p.sharedAt.end(), at);
    if (it == p.sharedAt.end()) return;
    p.sharedAt.erase(it);
  }
  --extraMappings_;
  if (p.sharedAt.empty()) --sharedPages_;
}

bool PagePool::unmapAt(PageId id, Address at) {
  Page& p = *pages_[id];
  if (p.state == PageState::Suspended) {
    forgetSuspendedAt(p, id, at);
    return false;
  }
  if (p.sharedAt.empty()) {
    unmap(p);
    return true;
  }
  backend_.unmap(at);  // throws: the mapping stays
  dropSharedAddress(p, at);
  return false;
}

void PagePool::dropSharedAddress(Page& p, Address at) {
  if (at == p.address) {
    p.address = p.sharedAt.back();
    p.sharedAt.pop_back();
  } else {
    p.sharedAt.erase(std::find(p.sharedAt.begin(), p.sharedAt.end(), at));
  }
  --extraMappings_;
  if (p.sharedAt.empty()) --sharedPages_;
}

uint32_t PagePool::mappingsOf(PageId id) const {
  const Page& p = *pages_[id];
  if (p.state == PageState::Suspended) return 1 + static_cast<uint32_t>(p.sharedAt.size());
  if (p.state != PageState::Mapped && p.state != PageState::Accessible) return 0;
  return 1 + static_cast<uint32_t>(p.sharedAt.size());
}

void PagePool::prefill(uint64_t pages) {
  while (idle_.size() < pages && headroom() > 0) putIdle(create());
}

uint64_t PagePool::trim(uint64_t maxPages) {
  uint64_t done = 0;
  while (done < maxPages && !idle_.empty()) {
    destroy(idle_.back());  // throws: the page stays idle
    idle_.pop_back();
    ++done;
  }
  return done;
}

void PagePool::teardown() {
  for (PageId id = 0; id < pages_.size(); ++id) {
    Page& p = *pages_[id];
    if (p.state == PageState::Suspended) {  // no mapping; memory (counted in created_) only if a failed suspension kept it
      if (p.handle != 0) {
        try {
          destroy(id);
        } catch (...) {  // still held: stays in created_, below
        }
      }
      p = Page{};
      continue;
    }
    for (Address at : p.sharedAt) {
      try {
        backend_.unmap(at);
      } catch (...) {
      }
    }
    p.sharedAt.clear();
    if (p.state == PageState::Mapped || p.state == PageState::Accessible || p.state == PageState::Stranded) {
      try {
        unmap(p);
      } catch (...) {
      }
    }
    if (p.state == PageState::Created) {
      try {
        destroy(id);
      } catch (...) {
      }
    }
  }
  for (Address at : strays_) {
    try {
      backend_.unmap(at);
    } catch (...) {
    }
  }
  strays_.clear();
  idle_.clear();
  stranded_.clear();
  sharedPages_ = extraMappings_ = suspended_ = 0;
  // Pending creations made no memory: their charge goes back. The pages still
  // in created_ are memory this pool could not unmap or release: it is still
  // taken on the device, so its charge stays on the account, which a shared
  // default outlives this pool (the other caches on it cannot count it as
  // free); the account is the record of it. A new account, made once no
  // cache uses the default, starts from the memory free then.
  created_ = 0;
  budget_->refund(pendingCreations_);
  pendingCreations_ = 0;
}

}  // namespace vat
