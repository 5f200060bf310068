/**
 * The native addon, loaded once. Its objects never leave the library: the
 * public classes in kv-cache.ts and sequence.ts wrap them.
 */
import type { CacheStats } from './stats.js';

// eslint-disable-next-line @typescript-eslint/no-require-imports
const bindingsWith = require('bindings') as (options: { bindings: string; try: string[][] }) => NativeAddon;

export interface NativeCacheOptions {
  layers: number;
  kvHeads: number;
  headDim: number;
  dtypeBytes: number;
  maxSequences: number;
  maxTokens: number;
  backend: 'cuda' | 'host';
  /** One KVCache per device, kvHeads split over them. */
  devices: number[];
  pageSize: number;
  /** Per device (0n: that device's default). */
  memoryBudgets: bigint[];
  prefillBytes: bigint;
  prefetchTokens: number;
  layerGroups: number;
  idlePageGroups: number;
  hostMemoryBudget: bigint;
  hostMemoryPrefill: bigint;
  prefixCache: boolean;
  /** Bytes per device; undefined: no bound but the budget. */
  prefixCacheMaxBytes: bigint | undefined;
}

export type NativeStats = Omit<CacheStats, 'layout' | 'devices'>;

export interface NativeLayout {
  /** The first device's range. */
  base: bigint;
  /** Each device's range, in the order of `devices`. */
  bases: bigint[];
  devices: number[];
  pageSize: number;
  granularity: number;
  backend: 'cuda' | 'host';
  tokenBytes: number;
  bytesPerToken: number;
  pagesPerGroup: number;
  layout: string;
  layerGroups: number;
  tokenPitch: number;
  rangeBytes: number;
  tensors: { offset: bigint; strideElements: number[] }[];
}

export interface NativeCache {
  reserve(expectedTokens?: number): [slot: number, generation: number];
  /** Prefix caching: the sequence's tokens() are the cached ones it got. */
  reserveCached(ids: Uint32Array, salt: bigint, expectedTokens?: number): [slot: number, generation: number];
  reserveCachedAsync(ids: Uint32Array, salt: bigint, expectedTokens?: number): Promise<[slot: number, generation: number]>;
  publish(slot: number, generation: number, ids: Uint32Array, salt: bigint): void;
  /** Test-only: prefix hashes ANDed with `mask`. */
  prefixHashMask(mask: bigint): void;
  grow(slot: number, generation: number, tokens: number): number;
  step(slots: Uint32Array, generations: Uint32Array, tokens: Uint32Array, count: number): number;
  stepIfBacked(slots: Uint32Array, generations: Uint32Array, tokens: Uint32Array, count: number): boolean;
  stepAsync(slots: Uint32Array, generations: Uint32Array, tokens: Uint32Array, count: number): Promise<number>;
  growAsync(slot: number, generation: number, tokens: number): [Promise<void>, () => void];
  /** A fence per device (undefined: none on that device). */
  release(slot: number, generation: number, streams?: (bigint | undefined)[]): void;
  /** `streams`: the copy's stream on each device (undefined: finished on return). */
  share(slot: number, generation: number, tokens: number, allowReleased: boolean, streams?: (bigint | undefined)[], copyLast?: boolean): [slot: number, generation: number];
  shareAsync(slot: number, generation: number, tokens: number, allowReleased: boolean, streams?: (bigint | undefined)[], copyLast?: boolean): Promise<[slot: number, generation: number]>;
  /** `streams`: a fence per device (undefined: none on that device). */
  swapOut(slot: number, generation: number, streams?: (bigint | undefined)[]): Promise<[handle: number, tokens: number]>;
  swapIn(handle: number): Promise<[slot: number, generation: number]>;
  discardSwapped(handle: number): void;
  suspend(keepHost: boolean): Promise<void>;
  resume(): Promise<void>;
  reclaim(bytes?: number): number;
  trim(): number;
  /** `device`: index into `devices`. */
  write(slot: number, generation: number, layer: number, kind: 0 | 1, token: number, data: Uint8Array, device: number): void;
  read(slot: number, generation: number, layer: number, kind: 0 | 1, token: number, out: Uint8Array, device: number): void;
  tokens(slot: number, generation: number): number;
  /** One device's figures; `device`: index into `devices`. */
  stats(device: number): NativeStats;
  obtainableBytes(withLookAhead?: boolean): number;
  layout(): NativeLayout;
  close(): void;
  workerError(): string | null;
  injectFault(op: string, nth: number, kind: FaultKind, delayMs: number, device: number): void;
}

/** How a test-injected backend fault fails. */
export type FaultKind = 'outOfMemory' | 'error' | 'hostAlloc' | 'delay';

export interface NativeDeviceInfo {
  ordinal: number;
  name: string;
  totalBytes: number;
  computeCapability: string;
  vmmSupported: boolean;
  granularity: number;
}

export interface NativeDriverInfo {
  loaded: boolean;
  library: string;
  problem: string;
  version: number;
  typesCheckedAgainst: number;
  devices: NativeDeviceInfo[];
}

export interface NativeAddon {
  NativeCache: new (options: NativeCacheOptions) => NativeCache;
  driverInfo(): NativeDriverInfo;
}

/** glibc's version when the process runs on glibc (the shipped prebuilds need it), else null (musl). */
function glibcVersion(): string | null {
  const report = process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined;
  return report?.header?.glibcVersionRuntime ?? null;
}

/**
 * Where the addon may be, in order: a build from source (build/Release, made
 * by the install script where no prebuild fits, or by `npm rebuild`), then the
 * prebuild shipped in the package for this platform (made with prebuildify:
 * one Node-API binary serves every Node >= 20 and, since libcuda is loaded at
 * run time, every GPU). Found at run time, so `npm install --ignore-scripts`
 * works where a prebuild fits.
 */
function loadAddon(): NativeAddon {
  const tries = [
    ['module_root', 'build', 'Release', 'bindings'],
    ['module_root', 'build', 'Debug', 'bindings'],
  ];
  if (process.platform === 'linux' && glibcVersion() !== null)
    tries.push(['module_root', 'prebuilds', `${process.platform}-${process.arch}`, 'vattention.glibc.node']);
  try {
    return bindingsWith({ bindings: 'vattention.node', try: tries });
  } catch (e) {
    const libc = glibcVersion() ? `glibc ${glibcVersion()}` : 'not glibc';
    throw new Error(
      `vattention: no native addon for ${process.platform}-${process.arch} (${libc}). ` +
        'Prebuilt binaries ship for linux-x64 with glibc; elsewhere the addon is compiled at install ' +
        '(`npm rebuild vattention`; needs a C++17 compiler, Python 3 and make). ' +
        (e as Error).message,
    );
  }
}

// VATTENTION_ADDON names another build of the addon (the sanitizer build of
// `npm run test:sanitize`); normally `loadAddon` finds it.
const override = process.env.VATTENTION_ADDON;
// eslint-disable-next-line @typescript-eslint/no-require-imports
export const addon: NativeAddon = override ? (require(override) as NativeAddon) : loadAddon();
