#include "common/lifetime.h"

#include <atomic>

namespace vat {
namespace {
std::atomic<bool> exiting{false};

// Marks the process as exiting from a static object's destructor rather than
// std::atexit: both run when the process exits, but the destructor is
// registered with this shared object's handle (__cxa_atexit), so it is
// dropped if Node unloads the addon (the last worker thread that loaded it
// ended). A plain atexit handler, as ThreadSanitizer's interceptor registers
// it, is not, and the process would call unmapped code at exit.
struct ExitWatcher {
  ~ExitWatcher() { exiting.store(true, std::memory_order_release); }
};
}  // namespace

void watchProcessExit() { static ExitWatcher watcher; }

bool processExiting() { return exiting.load(std::memory_order_acquire); }

}  // namespace vat
