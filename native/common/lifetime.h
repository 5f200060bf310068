// Process-exit awareness. Once the process is exiting, the CUDA driver may
// already be tearing itself down: the library then makes no driver call and
// leaves the memory to the OS / driver, which reclaim it with the process.
#pragma once

namespace vat {

// Registers the atexit hook (idempotent).
void watchProcessExit();
bool processExiting();

}  // namespace vat
