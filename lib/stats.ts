/** The shape of `KVCache.stats()`: kept by the native core, documented here once. */

export interface SlotStats {
  /** The slot's index (`Sequence.slot`). */
  slot: number;
  /** A sequence holds the slot. */
  active: boolean;
  /** Grown length of the sequence in the slot (0 when free). */
  tokens: number;
  /** Tokens the slot's mapped pages hold (kept after release: deferred reclamation). */
  backedTokens: number;
  /** Pages mapped in the slot, across every layer's K and V. */
  mappedPages: number;
}

export interface CallStats {
  /** Calls made, ever. */
  calls: number;
  /** Time spent in them, on every thread. */
  nanoseconds: number;
}

export interface PrefetchStats {
  /** The `prefetchTokens` option (0: no worker). */
  tokens: number;
  /** step() entries that were already backed: no mapping and no wait on the caller's thread. */
  hits: number;
  /** step() entries that mapped or waited on the caller's thread. */
  misses: number;
  /** Pages mapped by the worker thread and by growAsync. */
  pagesAhead: number;
  /** Pages mapped on the caller's thread by grow and step. */
  pagesOnDemand: number;
  /**
   * Pages the worker unmapped from released slots ahead of need (memory full,
   * option `idlePageGroups`); `pagesReclaimed - pagesReclaimedAhead` were
   * reclaimed on demand, by a growth or `reclaim()`.
   */
  pagesReclaimedAhead: number;
  /** Time grow and step spent mapping or waiting on the caller's thread. */
  stallNanoseconds: number;
  /** step() calls that found the cache's lock held by another thread (the worker's bookkeeping, an async growth's): contention. */
  lockWaits: number;
  /** The time those calls waited for it. */
  lockWaitNanoseconds: number;
  /** Native step calls, done or failed: each step(); each stepAsync() one, two when it maps on a pool thread. */
  steps: number;
  /** The time those calls spent in the native library (lock waits and mapping included; the JS wrapper and the N-API crossing not). */
  stepNanoseconds: number;
  /** Worker mappings that failed (retried at the next step). */
  errors: number;
  /** Why the worker could not start (prefetch is then off), or null. See the 'prefetchError' event. */
  workerError: string | null;
}

/** Automatic prefix caching (see {@link KVCache.publish}). */
export interface PrefixCacheStats {
  /** `reserve({ tokens })` calls. */
  queries: number;
  /** Of them, those that got at least one page group from the cache. */
  hits: number;
  /** Prompt tokens asked for; `hitTokens / queryTokens` is the token hit rate. */
  queryTokens: number;
  /** Tokens the hits got without a prefill. */
  hitTokens: number;
  /** Published page groups findable in released sequences' slots: memory kept for later hits (reclaimable). */
  cachedGroups: number;
  /** Their bytes. */
  cachedBytes: number;
  /** Published page groups findable in running sequences. */
  publishedGroups: number;
  /** Published page groups lost: reclaimed for memory, or their slot given to a new sequence. */
  evictions: number;
}

export interface HostMemoryStats {
  /** The `hostMemoryBudget` option. */
  budgetBytes: number;
  /**
   * Host bytes held now, page-locked on cuda: in use (swapped-out sequences,
   * a suspended cache's copy, copies under way) and idle, kept in 16 MiB
   * blocks for the next swap (page-locking is the slow part of a first swap).
   * `trim()` gives the idle ones back.
   */
  bytesHeld: number;
  /** Of them, idle. */
  bytesIdle: number;
  /** Of them, swapped-out sequences' tokens. */
  bytesSwapped: number;
  /** Sequences swapped out and not yet swapped in or discarded. */
  swappedSequences: number;
  /** Of them, the pages of a cache suspended with `keep: 'host'`. */
  bytesSuspendCopy: number;
  /** swapOut() calls that completed, ever. */
  swapOuts: number;
  /** swapIn() calls that completed, ever. */
  swapIns: number;
}

export interface LayoutStats {
  /** 'per-layer', 'all-layers' or 'layer-groups:N'. */
  name: string;
  /** K (and V) tensors: layers for per-layer, 1 for all-layers. */
  layerGroups: number;
  /** Pages mapped together to extend a sequence: one per tensor (2 × layerGroups). */
  pagesPerPageGroup: number;
  /** pagesPerPageGroup × page size: the most a sequence can hold past its tokens, less one token. */
  bytesPerPageGroup: number;
  /** Tokens one page group holds; not a whole number when a token's row does not divide the page (a row may straddle two pages). */
  tokensPerPageGroup: number;
}

export interface CacheStats {
  /** The backend in use. */
  backend: 'cuda' | 'host';
  /** The layout and its page group. */
  layout: LayoutStats;
  /** Bytes of one physical page. */
  pageSize: number;
  /** Bytes of physical memory the cache may back (the `memoryBudget` option, rounded down to pages). */
  budgetBytes: number;
  /** Pages that exist: mapped + pooled + stranded + inFlight. */
  pagesCreated: number;
  /** Pages mapped into slots (active sequences and released slots). */
  pagesMapped: number;
  /** Created pages waiting unmapped in the pool. */
  pagesPooled: number;
  /**
   * Pages left mapped by a failed unmap (during a rollback or a reclaim),
   * owned by no sequence: retried before the next mapping and at close.
   * Normally 0.
   */
  pagesStranded: number;
  /**
   * Pages a growth running off the JS thread (growAsync, stepAsync, the
   * prefetch worker) has taken from the pool or created and is mapping:
   * counted in no other figure until the growth commits (then they are
   * mapped, the sequence's) or fails (then pooled, stranded or gone). With
   * them, every figure of one `stats()` adds up at any moment. 0 when
   * nothing is growing in the background.
   */
  pagesInFlight: number;
  /** Mapped pages × page size. */
  bytesBacked: number;
  /** Tokens of active sequences × bytes per token (all layers, K and V). */
  bytesUsed: number;
  /**
   * Bytes mapped to active sequences past their tokens: the rounding of each
   * sequence up to whole page groups, and the look-ahead the prefetch worker
   * mapped. `bytesUsed + bytesBeyondTokens + bytesInReleasedSlots = bytesBacked`.
   */
  bytesBeyondTokens: number;
  /**
   * Of bytesBeyondTokens, the part inside the page groups the tokens need:
   * each active sequence's last group is partly empty (internal
   * fragmentation; less than one page group per sequence — see
   * `layout.bytesPerPageGroup`).
   */
  bytesPageRounding: number;
  /**
   * Of bytesBeyondTokens, whole page groups past what the tokens need: the
   * prefetch look-ahead, and pages a sequence found in its slot (deferred
   * reclamation) beyond its length. Reclaimable once no fence holds them.
   */
  bytesSpareGroups: number;
  /** Bytes released slots keep mapped for the next sequence placed there (deferred reclamation); reclaimable. */
  bytesInReleasedSlots: number;
  /** Bytes of idle pages in the pool: created, not mapped. */
  bytesPooled: number;
  /** Sequences holding a slot (reserved and not released). */
  activeSequences: number;
  /** Virtual address space reserved for every layer's K and V (no physical memory). */
  reservedVirtualBytes: number;
  /** Pages ever unmapped from released slots (reclaim). */
  pagesReclaimed: number;
  /** Mapped pages ever found in a slot by reserve (deferred reclamation hits). */
  pagesReused: number;
  /** Physical pages mapped in more than one slot (fork, prefix sharing): counted once in bytesBacked. */
  pagesShared: number;
  /**
   * Mappings beyond a page's first, in bytes: what sharing saved. The slots' mapped bytes
   * (bytesUsed + bytesBeyondTokens + bytesInReleasedSlots) add up to bytesBacked + this.
   */
  bytesSavedBySharing: number;
  /** suspend() gave the pages back and resume() has not backed them again. */
  suspended: boolean;
  /**
   * Physical pages given back by suspend() that resume() backs again, in
   * bytes. While suspended the slots' mapped bytes add up to
   * bytesBacked + bytesSuspended + bytesSavedBySharing.
   */
  bytesSuspended: number;
  /** The same in pages. */
  pagesSuspended: number;
  /** Host memory of swap and suspend. */
  host: HostMemoryStats;
  /**
   * Backend (driver or OS) calls made on the thread that created the cache: the serving loop's critical path.
   * `write()` and `read()` count too (each is a copy on that thread): they are for tests and tools, not the loop.
   */
  driverCallsOnJsThread: number;
  /** The prefetch worker and the callers' side of it. */
  prefetch: PrefetchStats;
  /** Automatic prefix caching. */
  prefixCache: PrefixCacheStats;
  /** One entry per slot, in slot order. */
  slots: SlotStats[];
  /** Backend calls by kind: reserveRange, createPage, map, setAccess, unmap, releasePage, copyIn, ... */
  driverCalls: Record<string, CallStats>;
  /**
   * Each device's own figures, in the order of `options.devices` (one entry
   * for a single device). The figures above add them up: bytes, pages and
   * calls are summed; what is decided once for every device is the same on
   * every device and counted once: a slot's `tokens`, `activeSequences`, the
   * swap counts (`host.swappedSequences`, `swapOuts`, `swapIns`) and the
   * callers' side of prefetch (`hits`, `misses`, `steps`, their times, lock
   * waits, worker `errors`); a slot's `backedTokens` is the least any device
   * backs.
   */
  devices: DeviceStats[];
}

/** One device's share of a cache (see {@link CacheStats.devices}). */
export interface DeviceStats extends Omit<CacheStats, 'devices'> {
  /** Its CUDA ordinal (the logical device number on the host backend). */
  device: number;
}

type Summable = Omit<CacheStats, 'layout' | 'devices'>;

/** The whole cache's figures from each device's (see {@link CacheStats.devices}). */
export function sumDeviceStats<T extends Summable>(perDevice: readonly T[]): T {
  if (perDevice.length === 1) return perDevice[0]!;
  const first = perDevice[0]!;
  const add = <O extends object>(a: O, b: O): O => {
    const out = { ...a } as Record<string, unknown>;
    for (const [k, v] of Object.entries(b)) {
      const mine = out[k];
      if (typeof v === 'number' && typeof mine === 'number') out[k] = mine + v;
      else if (typeof v === 'object' && v !== null && !Array.isArray(v) && typeof mine === 'object' && mine !== null)
        out[k] = add(mine as object, v as object);
    }
    return out as O;
  };
  let total = first as Summable;
  for (const d of perDevice.slice(1)) total = add(total, d);
  return {
    ...total,
    pageSize: first.pageSize,
    activeSequences: first.activeSequences,
    suspended: perDevice.some((d) => d.suspended),
    // decisions, made once for every device: counted once
    host: {
      ...total.host,
      swappedSequences: first.host.swappedSequences,
      swapOuts: first.host.swapOuts,
      swapIns: first.host.swapIns,
    },
    prefetch: {
      ...total.prefetch,
      // decisions, made once for every device: counted once (pages are per device: added up)
      hits: first.prefetch.hits,
      misses: first.prefetch.misses,
      stallNanoseconds: first.prefetch.stallNanoseconds,
      lockWaits: first.prefetch.lockWaits,
      lockWaitNanoseconds: first.prefetch.lockWaitNanoseconds,
      steps: first.prefetch.steps,
      stepNanoseconds: first.prefetch.stepNanoseconds,
      errors: first.prefetch.errors,
      tokens: first.prefetch.tokens,
      workerError: perDevice.find((d) => d.prefetch.workerError !== null)?.prefetch.workerError ?? null,
    },
    // decided once; only the bytes are each device's
    prefixCache: { ...first.prefixCache, cachedBytes: total.prefixCache.cachedBytes },
    slots: first.slots.map((slot, i) => ({
      ...slot,
      backedTokens: Math.min(...perDevice.map((d) => d.slots[i]!.backedTokens)),
      mappedPages: perDevice.reduce((n, d) => n + d.slots[i]!.mappedPages, 0),
    })),
  } as T;
}
