/** The shape of `KVCache.stats()`: kept by the native core, documented here once. */

export interface SlotStats {
  slot: number;
  active: boolean;
  /** Grown length of the sequence in the slot (0 when free). */
  tokens: number;
  /** Tokens the slot's mapped pages hold (kept after release: deferred reclamation). */
  backedTokens: number;
  mappedPages: number;
}

export interface CallStats {
  calls: number;
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
  /** Time grow and step spent mapping or waiting on the caller's thread. */
  stallNanoseconds: number;
  /** Worker mappings that failed (retried at the next step). */
  errors: number;
  /** Why the worker could not start (prefetch is then off), or null. See the 'prefetchError' event. */
  workerError: string | null;
}

export interface CacheStats {
  backend: 'cuda' | 'host';
  pageSize: number;
  budgetBytes: number;
  /** Pages that exist: mapped + pooled + stranded. */
  pagesCreated: number;
  pagesMapped: number;
  /** Created pages waiting unmapped in the pool. */
  pagesPooled: number;
  /**
   * Pages left mapped by a failed unmap (during a rollback or a reclaim),
   * owned by no sequence: retried before the next mapping and at close.
   * Normally 0.
   */
  pagesStranded: number;
  /** Mapped pages × page size. */
  bytesBacked: number;
  /** Tokens of active sequences × bytes per token (all layers, K and V). */
  bytesUsed: number;
  activeSequences: number;
  reservedVirtualBytes: number;
  /** Pages ever unmapped from released slots (reclaim). */
  pagesReclaimed: number;
  /** Mapped pages ever found in a slot by reserve (deferred reclamation hits). */
  pagesReused: number;
  /** Backend (driver or OS) calls made on the thread that created the cache: the serving loop's critical path. */
  driverCallsOnJsThread: number;
  prefetch: PrefetchStats;
  slots: SlotStats[];
  /** Backend calls by kind: reserveRange, createPage, map, setAccess, unmap, releasePage, copyIn, ... */
  driverCalls: Record<string, CallStats>;
}
