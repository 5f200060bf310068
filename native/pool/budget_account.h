// The pages a memory budget allows, charged by the pools that draw on it:
// one pool (a cache given its own memoryBudget), or every cache of the
// process that took the default budget of the same device. The default is
// a figure about the whole machine (free GPU memory, or the RAM or cgroup
// limit), so two caches that each took it would count the same memory
// twice; sharing one account makes them compete for it instead.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace vat {

class BudgetAccount {
 public:
  explicit BudgetAccount(uint64_t limitPages) : limit_(limitPages) {}
  BudgetAccount(const BudgetAccount&) = delete;
  BudgetAccount& operator=(const BudgetAccount&) = delete;

  uint64_t limitPages() const { return limit_; }
  uint64_t availablePages() const {
    uint64_t c = charged_.load();
    return c < limit_ ? limit_ - c : 0;
  }
  // One page more, if the limit allows it.
  bool tryCharge();
  void refund(uint64_t pages = 1) { charged_ -= pages; }

 private:
  const uint64_t limit_;
  std::atomic<uint64_t> charged_{0};
};

// The process's account for the default budget of `device` (a key naming
// backend and ordinal): the one the caches alive on it share, or, when none
// is alive, a new one of `limitPages()` pages (computed then: memory the
// earlier caches gave back is free again).
std::shared_ptr<BudgetAccount> defaultBudgetAccount(const std::string& device,
                                                    const std::function<uint64_t()>& limitPages);

}  // namespace vat
