#include "pool/page_pool.h"

#include "common/errors.h"

namespace vat {

PagePool::PagePool(Backend& backend, uint64_t budgetBytes)
    : backend_(backend), pageSize_(backend.pageSize()), budgetPages_(budgetBytes / backend.pageSize()) {}

PoolCounts PagePool::counts() const { return {budgetPages_, created_.load(), idle_.size(), mapped_.load()}; }

PageId PagePool::takeIdle() {
  if (idle_.empty()) return kNone;
  PageId id = idle_.back();
  idle_.pop_back();
  return id;
}

PageId PagePool::create() {
  if (headroom() == 0) {
    Error e(ErrorCode::OutOfMemory, "page pool budget reached (" + std::to_string(budgetPages_) + " pages of " +
                                        std::to_string(pageSize_) + " bytes)");
    e.requestedBytes = pageSize_;
    throw e;
  }
  PageHandle handle = backend_.createPage();  // throws: nothing to undo
  ++pendingCreations_;
  return adopt(handle);
}

bool PagePool::reserveCreation() {
  if (headroom() == 0) return false;
  ++pendingCreations_;
  return true;
}

PageId PagePool::adopt(PageHandle handle) {
  PageId id;
  if (!vacant_.empty()) {
    id = vacant_.back();
    vacant_.pop_back();
  } else {
    id = static_cast<PageId>(pages_.size());
    pages_.push_back(std::make_unique<Page>());
  }
  *pages_[id] = Page{handle, PageState::Created, 0};
  --pendingCreations_;
  ++created_;
  return id;
}

void PagePool::putIdle(PageId id) { idle_.push_back(id); }

void PagePool::destroy(PageId id) {
  Page& p = *pages_[id];
  backend_.releasePage(p.handle);  // throws: page stays Created
  p = Page{};
  vacant_.push_back(id);
  --created_;
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
      ++mapped_;
    }
    throw;
  }
  p.state = PageState::Accessible;
  ++mapped_;
}

void PagePool::unmap(Page& p) {
  backend_.unmap(p.address);  // throws: page unchanged
  p.state = PageState::Created;
  p.address = 0;
  --mapped_;
}

void PagePool::prefill(uint64_t pages) {
  while (idle_.size() < pages && created_ < budgetPages_) putIdle(create());
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
    if (p.state == PageState::Mapped || p.state == PageState::Accessible) {
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
  idle_.clear();
}

}  // namespace vat
