#include "common/lifetime.h"

#include <atomic>
#include <cstdlib>
#include <mutex>

namespace vat {
namespace {
std::atomic<bool> exiting{false};
void markExiting() { exiting.store(true, std::memory_order_release); }
}  // namespace

void watchProcessExit() {
  static std::once_flag once;
  std::call_once(once, [] { std::atexit(markExiting); });
}

bool processExiting() { return exiting.load(std::memory_order_acquire); }

}  // namespace vat
