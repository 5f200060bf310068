// The backends a behaviour test runs against, each with a small model shape
// chosen so that a page holds a handful of tokens (many page boundaries).
import { driverInfo, type KVCacheOptions } from '../lib/index.js';

export interface BackendCase {
  name: 'host' | 'cuda';
  /** Why the backend's tests are skipped on this machine, or null. */
  skip: string | null;
  options: KVCacheOptions;
}

function cudaSkipReason(): string | null {
  const info = driverInfo();
  if (!info.loaded) return `no CUDA driver: ${info.problem}`;
  if (info.devices.length === 0) return 'CUDA driver loaded but no device';
  if (!info.devices[0]!.vmmSupported) return `device 0 (${info.devices[0]!.name}) lacks VMM support`;
  return null;
}

export const cudaSkip = cudaSkipReason();

// host: 4 KiB pages, 256-byte tokens -> 16 tokens a page.
// cuda: 2 MiB pages (the granularity), 8 KiB tokens -> 256 tokens a page.
export const backends: BackendCase[] = [
  {
    name: 'host',
    skip: null,
    options: {
      backend: 'host',
      layers: 3,
      kvHeads: 2,
      headDim: 64,
      dtype: 'float16',
      maxSequences: 4,
      maxTokens: 100,
      pageSize: 4096,
      memoryBudget: 64 * 4096,
    },
  },
  {
    name: 'cuda',
    skip: cudaSkip,
    options: {
      backend: 'cuda',
      layers: 3,
      kvHeads: 8,
      headDim: 256,
      dtype: 'float16',
      maxSequences: 4,
      maxTokens: 2100,
      memoryBudget: 40 * 2 * 1024 * 1024,
    },
  },
];

export function label(b: BackendCase): string {
  return b.skip ? `${b.name} backend (skipped: ${b.skip})` : `${b.name} backend`;
}

/** Bytes 0..n-1 of a pattern that differs per (seed, position). */
export function pattern(bytes: number, seed: number): Uint8Array {
  const out = new Uint8Array(bytes);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < bytes; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[i] = x & 0xff;
  }
  return out;
}

/**
 * What stats() says about the cache's state, without the call and time
 * counters; of the prefetch figures, those a caller's operation changes
 * (hits, misses, pages mapped on demand), not the worker's.
 */
export function stateOf(c: { stats(): Record<string, unknown> }): Record<string, unknown> {
  const { driverCalls: _calls, driverCallsOnJsThread: _js, prefetch, ...state } = c.stats();
  const { hits, misses, pagesOnDemand } = prefetch as { hits: number; misses: number; pagesOnDemand: number };
  return { ...state, prefetch: { hits, misses, pagesOnDemand } };
}
