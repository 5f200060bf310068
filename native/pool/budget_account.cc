#include "pool/budget_account.h"

#include <map>
#include <mutex>

namespace vat {

bool BudgetAccount::tryCharge() {
  uint64_t c = charged_.load();
  do {
    if (c >= limit_) return false;
  } while (!charged_.compare_exchange_weak(c, c + 1));
  return true;
}

std::shared_ptr<BudgetAccount> defaultBudgetAccount(const std::string& device,
                                                    const std::function<uint64_t()>& limitPages) {
  // Leaked on purpose: caches closed by exit handlers may still look it up.
  static auto* lock = new std::mutex;
  static auto* accounts = new std::map<std::string, std::weak_ptr<BudgetAccount>>;
  std::lock_guard<std::mutex> guard(*lock);
  std::weak_ptr<BudgetAccount>& slot = (*accounts)[device];
  if (auto alive = slot.lock()) return alive;
  auto made = std::make_shared<BudgetAccount>(limitPages());
  slot = made;
  return made;
}

}  // namespace vat
