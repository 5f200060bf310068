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
      if (hit.groups == 0) break;
      if (inPlace(hit, false)) return takeInPlace(hit, ids, salt);
    }
    try {
      SequenceRef ref = share(hit.source, core_->layout->tokensInGroups(hit.groups), true, {}, false);
      Lock lk(core_->lock);
      core_->prefix->inherit(ref.slot, ids, hit.groups, salt);
      core_->prefix->count(ids.size(), core_->layout->tokensInGroups(hit.groups));
      return ref;
    } catch (const Error& e) {
      // No other free slot: the source itself, losing the rest of its chain.
      if (e.code() == ErrorCode::NoSlot) {
        Lock lk(core_->lock);
        if (inPlace(hit, true)) return takeInPlace(hit, ids, salt);
      }
      // The source gone, no slot, or (a row straddling the last group: share
      // copies that group) no memory for the copy: the prompt is a miss.
      bool miss = e.code() == ErrorCode::SequenceReleased || e.code() == ErrorCode::OutOfRange ||
                  e.code() == ErrorCode::OutOfMemory || e.code() == ErrorCode::NoSlot;
      if (!miss) throw;
    }
  }
  {
    Lock lk(core_->lock);
    checkOpen();
    core_->prefix->count(ids.size(), 0);
  }
  return reserve(expectedTokens);
}

// Under the lock: the new sequence in the hit's released slot, its pages and
// their KV as they are (no mapping, no copy).
SequenceRef KVCache::takeInPlace(const PrefixCache::Hit& hit, const std::vector<uint32_t>& ids, uint64_t salt) {
  uint64_t tokens = core_->layout->tokensInGroups(hit.groups);
  SequenceRef ref = occupy(hit.source.slot);
  core_->slots[ref.slot].tokens = tokens;
  core_->prefix->inherit(ref.slot, ids, hit.groups, salt);
  core_->prefix->count(ids.size(), tokens);
  prefetcher_->wake();
  return ref;
}

// Whether a hit's source is a released slot a new sequence may take as it is:
// when the hit is all it holds findable (a shorter hit would lose the rest of
// the cached chain: it is shared from elsewhere instead), or `lastResort`.
bool KVCache::inPlace(const PrefixCache::Hit& hit, bool lastResort) {
  uint32_t i = hit.source.slot;
  const Slot& s = core_->slots[i];
  if (s.active || s.generation != hit.source.generation + 1 || !s.placeable() || s.extendingNow() ||
      s.groups < hit.groups)
    return false;
  return lastResort || hit.groups >= core_->prefix->findable(i);
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
