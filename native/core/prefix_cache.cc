#include "core/prefix_cache.h"

#include <algorithm>
#include <string>

#include "common/errors.h"

namespace vat {

namespace {

// splitmix64's finaliser: every input bit moves every output bit.
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

PrefixCache::PrefixCache(const SlotTable& slots, const KVLayout& layout, bool enabled, uint64_t maxGroups)
    : slots_(slots), layout_(layout), enabled_(enabled), maxGroups_(maxGroups), published_(slots.size()) {}

// What slot i published is no longer findable: evicted.
void PrefixCache::forget(uint32_t i) {
  counts_.evictions += published_[i].hashes.size();
  published_[i] = Published{};
}

// options.prefixCache.maxBytes: released slots' cached groups, most recently
// released first, up to the bound; the rest are forgotten (their pages are
// then an ordinary released slot's, reclaimed before cached ones).
void PrefixCache::enforceBound() {
  if (maxGroups_ == UINT64_MAX) return;
  std::vector<uint32_t> released;
  for (uint32_t i = 0; i < slots_.size(); ++i)
    if (!slots_[i].active && sync(i) > 0) released.push_back(i);
  std::sort(released.begin(), released.end(),
            [&](uint32_t a, uint32_t b) { return slots_[a].releasedAt > slots_[b].releasedAt; });
  uint64_t kept = 0;
  for (uint32_t i : released) {
    uint64_t groups = published_[i].hashes.size();
    if (kept + groups > maxGroups_) forget(i);
    else kept += groups;
  }
}

// The page groups whose tokens all lie in the first `tokens`.
size_t PrefixCache::wholeGroups(uint64_t tokens) const {
  size_t g = layout_.groupsForTokens(tokens);
  return g > 0 && layout_.tokensInGroups(g) > tokens ? g - 1 : g;
}

// Group k covers tokens [tokensInGroups(k), tokensInGroups(k + 1)): a token
// whose row straddles two groups belongs to the later one.
std::vector<uint64_t> PrefixCache::chain(const uint32_t* ids, size_t groups, uint64_t salt) const {
  std::vector<uint64_t> out;
  out.reserve(groups);
  uint64_t h = mix(salt ^ 0x7661747470726566ull);
  for (size_t g = 0; g < groups; ++g) {
    for (uint64_t t = layout_.tokensInGroups(g); t < layout_.tokensInGroups(g + 1); ++t) h = mix(h ^ ids[t]);
    out.push_back(h & hashMask_);
  }
  return out;
}

size_t PrefixCache::sync(uint32_t i) {
  Published& p = published_[i];
  const Slot& s = slots_[i];
  if (p.hashes.empty() && p.ids.empty()) return 0;
  if (p.epoch != s.contentEpoch) {
    forget(i);
    return 0;
  }
  if (s.groups < p.hashes.size()) {
    counts_.evictions += p.hashes.size() - s.groups;
    p.hashes.resize(s.groups);
    p.ids.resize(std::min<size_t>(p.ids.size(), layout_.tokensInGroups(s.groups)));
  }
  return p.hashes.size();
}

// Whole groups of `ids` slot i holds with the same KV: hashes first, then the
// ids themselves (a hash collision is never taken for a hit).
size_t PrefixCache::matchingGroups(uint32_t i, const std::vector<uint32_t>& ids, const std::vector<uint64_t>& hashes,
                                   uint64_t salt) {
  size_t have = findable(i);
  const Published& p = published_[i];
  if (have == 0 || p.salt != salt) return 0;
  size_t n = 0;
  while (n < have && n < hashes.size() && p.hashes[n] == hashes[n]) ++n;
  uint64_t tokens = layout_.tokensInGroups(n);
  auto mismatch = std::mismatch(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(tokens), p.ids.begin());
  if (mismatch.first == ids.begin() + static_cast<std::ptrdiff_t>(tokens)) return n;
  // The ids differ where the hashes agreed: only the groups before the first
  // differing token match.
  size_t differsAt = static_cast<size_t>(mismatch.first - ids.begin());
  while (n > 0 && layout_.tokensInGroups(n) > differsAt) --n;
  return n;
}

PrefixCache::Hit PrefixCache::lookup(const std::vector<uint32_t>& ids, uint64_t salt) {
  Hit best;
  size_t groups = wholeGroups(ids.size());
  if (!enabled_ || groups == 0) return best;
  enforceBound();
  std::vector<uint64_t> hashes = chain(ids.data(), groups, salt);
  auto it = byFirstGroup_.find(hashes[0]);
  if (it == byFirstGroup_.end()) return best;
  std::vector<uint32_t>& holders = it->second;
  bool bestActive = false;
  for (size_t k = 0; k < holders.size();) {
    uint32_t i = holders[k];
    if (findable(i) == 0) {  // stale: it holds nothing any more
      holders[k] = holders.back();
      holders.pop_back();
      continue;
    }
    ++k;
    size_t n = matchingGroups(i, ids, hashes, salt);
    const Slot& s = slots_[i];
    // The longest; on a tie a running source (sharing from it drops no one's mappings).
    if (n > best.groups || (n == best.groups && n > 0 && s.active && !bestActive)) {
      best.groups = n;
      best.source = {i, s.active ? s.generation : s.generation - 1};
      bestActive = s.active;
    }
  }
  if (holders.empty()) byFirstGroup_.erase(it);
  return best;
}

void PrefixCache::count(uint64_t queryTokens, uint64_t hitTokens) {
  counts_.queries++;
  counts_.queryTokens += queryTokens;
  if (hitTokens > 0) counts_.hits++;
  counts_.hitTokens += hitTokens;
}

void PrefixCache::publish(uint32_t slot, const std::vector<uint32_t>& ids, uint64_t salt) {
  if (!enabled_) return;
  sync(slot);
  Published& p = published_[slot];
  const Slot& s = slots_[slot];
  bool fresh = p.ids.empty() || p.epoch != s.contentEpoch;
  if (!fresh) {
    if (p.salt != salt)
      fail(ErrorCode::InvalidArgument, "salt: the sequence published (or inherited) its first tokens under another salt");
    size_t both = std::min(ids.size(), p.ids.size());
    if (!std::equal(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(both), p.ids.begin()))
      fail(ErrorCode::InvalidArgument,
           "tokens: the ids differ from those the sequence published (or inherited) for its first " +
               std::to_string(both) + " tokens");
    if (ids.size() <= p.ids.size()) return;  // nothing new
  }
  size_t groups = std::min(wholeGroups(ids.size()), s.groups);
  std::vector<uint64_t> hashes = chain(ids.data(), groups, salt);
  bool duplicate = !hashes.empty() && heldElsewhere(slot, ids, hashes, salt) >= hashes.size();
  p.epoch = s.contentEpoch;
  p.salt = salt;
  p.ids = ids;
  p.hashes = std::move(hashes);
  p.duplicate = duplicate;
  if (!duplicate) index(slot);
}

// The most of these groups another slot holds (with other pages or the same).
size_t PrefixCache::heldElsewhere(uint32_t i, const std::vector<uint32_t>& ids, const std::vector<uint64_t>& hashes,
                                  uint64_t salt) {
  auto it = byFirstGroup_.find(hashes[0]);
  if (it == byFirstGroup_.end()) return 0;
  size_t most = 0;
  for (uint32_t other : it->second)
    if (other != i) most = std::max(most, matchingGroups(other, ids, hashes, salt));
  return most;
}

void PrefixCache::inherit(uint32_t slot, const std::vector<uint32_t>& ids, size_t groups, uint64_t salt) {
  Published& p = published_[slot];
  uint64_t tokens = layout_.tokensInGroups(groups);
  p.epoch = slots_[slot].contentEpoch;
  p.salt = salt;
  p.ids.assign(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(tokens));
  p.hashes = chain(ids.data(), groups, salt);
  p.duplicate = false;
  if (!p.hashes.empty()) index(slot);
}

// Only the first group's hash is indexed: a slot holding group k of a chain
// holds groups 0..k-1 of it too, so its first group finds it.
void PrefixCache::index(uint32_t i) {
  const Published& p = published_[i];
  if (p.hashes.empty()) return;
  std::vector<uint32_t>& holders = byFirstGroup_[p.hashes[0]];
  if (std::find(holders.begin(), holders.end(), i) == holders.end()) holders.push_back(i);
}

void PrefixCache::clear() {
  for (uint32_t i = 0; i < published_.size(); ++i) forget(i);
  byFirstGroup_.clear();
}

std::vector<char> PrefixCache::holders() {
  std::vector<char> out(slots_.size(), 0);
  if (!enabled_) return out;
  enforceBound();
  for (uint32_t i = 0; i < slots_.size(); ++i) out[i] = holds(i);
  return out;
}

PrefixCacheStats PrefixCache::stats() {
  enforceBound();
  PrefixCacheStats st = counts_;
  for (uint32_t i = 0; i < slots_.size(); ++i)
    if (slots_[i].active) st.publishedGroups += findable(i);
  st.evictions = counts_.evictions;
  return st;
}

}  // namespace vat
