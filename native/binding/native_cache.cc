#include "binding/native_cache.h"

namespace vat {

void closeAllInEnv(void* addonData) {
  auto* data = static_cast<AddonData*>(addonData);
  for (NativeCache* c : data->live) c->closeFromCleanupHook();
}

}  // namespace vat
