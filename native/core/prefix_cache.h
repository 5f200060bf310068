// Automatic prefix caching: which slot holds the KV of a prompt's first
// tokens, found by the token ids themselves. A sequence publishes the ids its
// first tokens hold (KVCache::publish); every whole page group of them gets a
// chained hash (the group's ids, the previous group's hash, a salt for
// per-tenant isolation). A new prompt is hashed the same way and the slot
// whose published chain matches it longest gives its groups to the new
// sequence, mapped shared (KVCache::share, no copy).
//
// What a slot published stays findable while the slot holds it: as long as
// the sequence runs, and after it is released for as long as its pages stay
// (deferred reclamation). The index is checked lazily against the slot table:
// a slot placed again (its content epoch moved on) or shrunk by a reclaim
// holds less, and what it lost counts as evicted. Eviction is the reclaim
// policy's (policy/reclaim.h: released slots holding cached groups go after
// the others, least recently released first, tail groups first) and the
// placement policy's (a new sequence goes to a slot without cached groups
// first). Hashes are only a shortcut: the ids are compared before a hit is
// taken, so a collision never hands out another prefix's KV.
//
// Decisions of the core, made once for every device, under the cache's lock.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

#include "core/slot_table.h"
#include "layout/kv_layout.h"

namespace vat {

struct PrefixCacheStats {
  uint64_t queries = 0;         // reserve({ tokens }) calls
  uint64_t hits = 0;            // of them, those that got at least one page group
  uint64_t queryTokens = 0;     // prompt tokens asked for
  uint64_t hitTokens = 0;       // tokens the hits got without prefill
  uint64_t cachedGroups = 0;    // distinct published page groups findable in released slots (memory kept for hits)
  uint64_t publishedGroups = 0; // published page groups findable in running sequences
  uint64_t evictions = 0;       // published page groups lost (reclaimed, or their slot placed again)
  uint64_t cachedBytes = 0;     // cachedGroups' pages (one device's; filled by KVCache::stats)

  template <class F> void fields(F&& f) const {
    f("queries", queries);
    f("hits", hits);
    f("queryTokens", queryTokens);
    f("hitTokens", hitTokens);
    f("cachedGroups", cachedGroups);
    f("publishedGroups", publishedGroups);
    f("evictions", evictions);
    f("cachedBytes", cachedBytes);
  }
};

class PrefixCache {
 public:
  // maxGroups: of released slots' page groups, the most kept findable
  // (beyond it the least recently released stop being cached).
  PrefixCache(const SlotTable& slots, const KVLayout& layout, bool enabled, uint64_t maxGroups);

  bool enabled() const { return enabled_; }

  // The slot whose published chain matches `ids` (under `salt`) over the most
  // whole page groups, and how many; groups 0 when none. The reference is the
  // one share() takes for that slot (active: its sequence; released: the
  // sequence it last held).
  struct Hit {
    SequenceRef source;
    size_t groups = 0;
  };
  Hit lookup(const std::vector<uint32_t>& ids, uint64_t salt);
  // A query's outcome, counted once it is known (a hit the share could not
  // take is a miss).
  void count(uint64_t queryTokens, uint64_t hitTokens);

  // Slot `slot` (active) holds the KV of `ids` in its first ids.size()
  // tokens. Refused (ERR_INVALID_ARGUMENT, nothing changed) when it contradicts
  // what the slot published or inherited before: the same salt, and ids that
  // agree on the tokens both cover.
  void publish(uint32_t slot, const std::vector<uint32_t>& ids, uint64_t salt);
  // A sequence that got `groups` groups of a hit holds those ids too.
  void inherit(uint32_t slot, const std::vector<uint32_t>& ids, size_t groups, uint64_t salt);
  // Every slot's published ids are gone (a suspend that dropped the KV).
  void clear();
  // Whether released slot `slot` holds findable groups (for the placement and
  // reclaim policies), one flag per slot.
  std::vector<char> holders();
  // Whether released slot i holds findable groups. A released sharer that
  // does (a hit mapped its groups elsewhere) keeps its mappings until a
  // refusal needs them (the ladder's sweep), instead of dropping them at once.
  bool holds(uint32_t i) { return enabled_ && !slots_[i].active && findable(i) > 0; }
  // The groups of slot i a lookup can find (0 for a duplicate).
  size_t findable(uint32_t i) { return sync(i) > 0 && !published_[i].duplicate ? published_[i].hashes.size() : 0; }

  PrefixCacheStats stats();
  // Test-only: the hashes ANDed with `mask` (0: every group collides).
  void setHashMask(uint64_t mask) { hashMask_ = mask; }

 private:
  struct Published {
    uint32_t epoch = 0;           // the slot's content epoch the ids belong to
    uint64_t salt = 0;
    std::vector<uint32_t> ids;    // the tokens' ids, as published (or inherited)
    std::vector<uint64_t> hashes; // one per whole page group of `ids` the slot still holds
    // Another slot holds every one of these groups already (two prompts
    // prefilled at once): not indexed, not a holder, so its pages go back
    // first and one copy stays cached. Indexed again once it publishes more.
    bool duplicate = false;
  };
  size_t heldElsewhere(uint32_t i, const std::vector<uint32_t>& ids, const std::vector<uint64_t>& hashes, uint64_t salt);

  std::vector<uint64_t> chain(const uint32_t* ids, size_t groups, uint64_t salt) const;
  size_t wholeGroups(uint64_t tokens) const;
  // Drops what slot i no longer holds (placed again, groups reclaimed) and
  // counts it as evicted; returns its findable groups.
  size_t sync(uint32_t i);
  size_t matchingGroups(uint32_t i, const std::vector<uint32_t>& ids, const std::vector<uint64_t>& hashes,
                        uint64_t salt);
  void index(uint32_t i);
  void forget(uint32_t i);
  void enforceBound();

  const SlotTable& slots_;
  const KVLayout& layout_;
  bool enabled_;
  uint64_t maxGroups_;
  uint64_t hashMask_ = ~uint64_t{0};
  std::vector<Published> published_;
  // First group's hash -> slots that published it (stale entries are skipped
  // and dropped when met).
  std::unordered_map<uint64_t, std::vector<uint32_t>> byFirstGroup_;
  PrefixCacheStats counts_;
};

}  // namespace vat
