// Checks shared by the attention kernels' launchers: every argument
// checked before any driver call, each failure ERR_INVALID_ARGUMENT naming
// the argument.
#pragma once

#include <cstdint>
#include <string>

#include "kernels/decode_attention.h"

namespace vat::kernels {

[[noreturn]] void invalid(const char* what, const std::string& message);
void checkAligned(const char* what, const char* name, uint64_t address, uint64_t alignment);
// Addresses, strides, the block table and the fp8 scales of a cache.
void checkCache(const char* what, KVDtype dtype, const CacheAddressing& c, uint32_t maxLength);
// The head dimension and the pairing of cache and query types.
void checkTypes(const char* what, KVDtype dtype, QueryDtype query, uint32_t headDim);

}  // namespace vat::kernels
