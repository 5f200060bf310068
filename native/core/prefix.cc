// Automatic prefix caching, the façade's part: a reserve that finds the
// longest cached prefix of a prompt and shares it (KVCache::share), and
// publish. The index itself is core/prefix_cache.*.
#include "common/errors.h"
#include "core/kv_cache.h"

namespace vat {

SequenceRef KVCache::reserveCached(const std::vector<uint32_t>& ids, uint64_t salt,
                                   std::optional<uint64_t> expectedTokens) {
  // Looked up under the lock, shared by share() under it again: between the
  // two the source may lose its pages (a reclaim) or its slot (placed again);
  // share() then refuses (ERR_SEQUENCE_RELEASED) and the lookup runs again.
  for (int attempt = 0; attempt < 2; ++attempt) {
    PrefixCache::Hit hit;
    {
      Lock lk(core_->lock);
      checkOpen();
      if (!core_->suspended) hit = core_->prefix->lookup(ids, salt);
    }
    if (hit.groups == 0) break;
    uint64_t tokens = core_->layout->tokensInGroups(hit.groups);
    try {
      SequenceRef ref = share(hit.source, tokens, true, {}, false);
      Lock lk(core_->lock);
      core_->prefix->inherit(ref.slot, ids, hit.groups, salt);
      core_->prefix->count(ids.size(), tokens);
      return ref;
    } catch (const Error& e) {
      // A row straddling the last group makes share copy it into new pages:
      // without them, or with the source gone, the prompt is a miss.
      bool gone = e.code() == ErrorCode::SequenceReleased || e.code() == ErrorCode::OutOfRange;
      if (!gone && e.code() != ErrorCode::OutOfMemory) throw;
    }
  }
  {
    Lock lk(core_->lock);
    checkOpen();
    core_->prefix->count(ids.size(), 0);
  }
  return reserve(expectedTokens);
}

void KVCache::publish(SequenceRef seq, const std::vector<uint32_t>& ids, uint64_t salt) {
  Lock lk(core_->lock);
  Slot& s = activeSlot(seq);
  if (ids.size() > s.tokens)
    fail(ErrorCode::OutOfRange, "cannot publish " + std::to_string(ids.size()) + " tokens: the sequence has " +
                                    std::to_string(s.tokens));
  core_->prefix->publish(seq.slot, ids, salt);
}

void KVCache::setPrefixHashMask(uint64_t mask) {
  Lock lk(core_->lock);
  core_->prefix->setHashMask(mask);
}

}  // namespace vat
