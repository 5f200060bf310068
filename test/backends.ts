// The backends a behaviour test runs against, each with a small model shape
// chosen so that a page holds a handful of tokens (many page boundaries).
import { driverInfo, type KVCacheOptions, type KVLayoutChoice } from '../lib/index.js';

export interface BackendCase {
  name: 'host' | 'cuda';
  /** Devices the cache spans: 1, or 2 (the host backend's logical devices on CI; two GPUs on a cuda machine). */
  deviceCount: number;
  /** Why the backend's tests are skipped on this machine, or null. */
  skip: string | null;
  /** The layout's name in stats(). */
  layoutName: string;
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

// The layouts every behaviour test runs under (4 layers: layerGroups 2 is a
// real middle ground).
export const layouts: { name: string; layout: KVLayoutChoice }[] = [
  { name: 'per-layer', layout: 'per-layer' },
  { name: 'all-layers', layout: 'all-layers' },
  { name: 'layer-groups:2', layout: { layerGroups: 2 } },
];

// host: 4 KiB pages, 256-byte tokens per layer -> per page 16 tokens
// (per-layer), 8 (2 layer groups) or 4 (all layers).
// cuda: 2 MiB pages (the granularity), 4 KiB tokens per layer -> 512, 256 or
// 128 tokens a page. Either budget holds one whole sequence in every layout,
// not two.
const backendOptions: Omit<BackendCase, 'layoutName' | 'deviceCount'>[] = [
  {
    name: 'host',
    skip: null,
    options: {
      backend: 'host',
      layers: 4,
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
      layers: 4,
      kvHeads: 8,
      headDim: 256,
      dtype: 'float16',
      maxSequences: 4,
      maxTokens: 2100,
      memoryBudget: 64 * 2 * 1024 * 1024,
    },
  },
];

/** Every backend under every layout, on one device: parametrize a suite with `for (const b of backends)`. */
export const backends: BackendCase[] = backendOptions.flatMap((b) =>
  layouts.map(({ name, layout }) => ({ ...b, deviceCount: 1, layoutName: name, options: { ...b.options, layout } })),
);

function twoDeviceSkip(b: BackendCase): string | null {
  if (b.skip || b.name === 'host') return b.skip;
  const vmm = driverInfo().devices.filter((d) => d.vmmSupported);
  return vmm.length < 2 ? `${vmm.length} VMM-capable CUDA device(s): two-device cases need 2` : null;
}

/**
 * {@link backends} on one device and on two (kvHeads split over them; every
 * decision made once for both): the matrix of the behaviour suites. Over two
 * devices a figure of stats() is the sum of the devices', `tokenBytes` and
 * `tensor()` one device's shard.
 */
export const deviceBackends: BackendCase[] = backends.flatMap((b) => [
  b,
  {
    ...b,
    deviceCount: 2,
    skip: twoDeviceSkip(b),
    // Twice the heads, split over the two: each device holds the shard a
    // single-device case holds (same token bytes, page groups and budget).
    options: { ...b.options, devices: [0, 1], kvHeads: 2 * b.options.kvHeads },
  },
]);

/** One case per backend (per-layer layout), for tests about the backend rather than the layout. */
export const perLayerBackends: BackendCase[] = backends.filter((b) => b.layoutName === 'per-layer');

export function label(b: BackendCase): string {
  const name = `${b.name} backend, ${b.layoutName} layout${b.deviceCount > 1 ? `, ${b.deviceCount} devices` : ''}`;
  return b.skip ? `${name} (skipped: ${b.skip})` : name;
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
  const stats = c.stats();
  const devices = (stats.devices as Record<string, unknown>[] | undefined) ?? [];
  return { ...comparable(stats), devices: devices.map(comparable) };
}

/** A stats object less what changes without a change of state (calls, their time, the worker's counts). */
function comparable(stats: Record<string, unknown>): Record<string, unknown> {
  const { driverCalls: _calls, driverCallsOnJsThread: _js, prefetch, devices: _devices, ...state } = stats;
  const { hits, misses, pagesOnDemand } = prefetch as { hits: number; misses: number; pagesOnDemand: number };
  return { ...state, prefetch: { hits, misses, pagesOnDemand } };
}

/** K (and V) tensors of the case's layout, worked out from the option (not asked of the cache). */
export function layerGroupsOf(b: BackendCase): number {
  const l = b.options.layout;
  if (l === undefined || l === 'per-layer') return b.options.layers;
  if (l === 'all-layers') return 1;
  return l.layerGroups;
}

/** Pages one growth step maps under the case's layout. */
export function groupPagesOf(b: BackendCase): number {
  return 2 * layerGroupsOf(b);
}

/** Whole tokens a page group holds under the case's layout. */
export function tokensPerGroupOf(b: BackendCase, pageSize: number, tokenBytes: number): number {
  return Math.floor(pageSize / (tokenBytes * (b.options.layers / layerGroupsOf(b))));
}

/** `{ stream }` on one device, `{ streams }` with that stream on every device of the case. */
export function streamOf(b: BackendCase, stream: bigint): { stream: bigint } | { streams: bigint[] } {
  return b.deviceCount > 1 ? { streams: Array.from({ length: b.deviceCount }, () => stream) } : { stream };
}
