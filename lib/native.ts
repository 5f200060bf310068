/**
 * The native addon, loaded once. Its objects never leave the library: the
 * public classes in kv-cache.ts and sequence.ts wrap them.
 */
import type { CacheStats } from './stats.js';

import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { AddonLoadError } from './errors.js';

// eslint-disable-next-line @typescript-eslint/no-require-imports
const bindingsWith = require('bindings') as (options: { bindings: string; module_root: string; try: string[][] }) => NativeAddon;

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
export type FaultKind = 'outOfMemory' | 'error' | 'hostAlloc' | 'delay' | 'errorInClose';

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

/** `a` >= `b` for versions such as "2.28". */
function atLeast(a: string, b: string): boolean {
  const [x, y] = [a.split('.').map(Number), b.split('.').map(Number)];
  for (let i = 0; i < Math.max(x.length, y.length); i++)
    if ((x[i] ?? 0) !== (y[i] ?? 0)) return (x[i] ?? 0) > (y[i] ?? 0);
  return true;
}

interface Manifest {
  name?: string;
  /** The oldest glibc the prebuilt binary loads on (docs/development.md). */
  prebuildGlibcFloor?: string;
}

/** The package's folder and manifest: the nearest folder above this file with the package's package.json (dist/cjs, or lib/ under vitest). */
function findPackage(): { root: string; manifest: Manifest } {
  for (let d = __dirname; dirname(d) !== d; d = dirname(d)) {
    const file = join(d, 'package.json');
    const manifest = existsSync(file) ? (JSON.parse(readFileSync(file, 'utf8')) as Manifest) : undefined;
    if (manifest?.name === 'vattention') return { root: d, manifest };
  }
  return { root: join(__dirname, '..', '..'), manifest: {} };
}
const { root: packageRoot, manifest } = findPackage();
const FIX = 'Build it from source: `npm rebuild vattention --build-from-source` (needs a C++17 compiler, Python 3 and make; no CUDA toolkit).';

/**
 * Where the addon may be, in order: a build from source (build/Release, made
 * by the install script where no prebuild fits, or by `npm rebuild`), then the
 * prebuild shipped in the package for this platform (made with prebuildify:
 * one Node-API binary serves every Node >= 20 and, since libcuda is loaded at
 * run time, every GPU; it needs glibc >= package.json's `prebuildGlibcFloor`).
 * Found at run time, so `npm install --ignore-scripts` works where a prebuild
 * fits.
 */
function loadAddon(): NativeAddon {
  const built = loadBuilt();
  if (built) return built;
  const prebuild = join(packageRoot, 'prebuilds', `${process.platform}-${process.arch}`, 'vattention.glibc.node');
  const glibc = glibcVersion();
  const floor = manifest.prebuildGlibcFloor;
  const platform = `${process.platform}-${process.arch}${glibc ? `, glibc ${glibc}` : ''}`;
  if (!existsSync(prebuild) || process.platform !== 'linux' || glibc === null)
    throw new AddonLoadError(`vattention: no prebuilt addon for this platform (${platform}) and none built from source. ${FIX}`);
  if (floor && !atLeast(glibc, floor))
    throw new AddonLoadError(`vattention: the prebuilt addon needs glibc >= ${floor}; this system has glibc ${glibc}. ${FIX}`);
  return loadFile(prebuild, `the prebuilt addon for ${platform}`);
}

/** The build from source, if there is one (`bindings` looks where node-gyp and cmake-js put it). */
function loadBuilt(): NativeAddon | undefined {
  const tries = [
    ['module_root', 'build', 'Release', 'bindings'],
    ['module_root', 'build', 'Debug', 'bindings'],
  ];
  try {
    return bindingsWith({ bindings: 'vattention.node', module_root: packageRoot, try: tries });
  } catch (e) {
    if (/Could not locate the bindings file/.test((e as Error).message)) return undefined;
    throw new AddonLoadError(`vattention: the addon built from source (build/) did not load: ${(e as Error).message}. ${FIX}`);
  }
}

function loadFile(file: string, what: string): NativeAddon {
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    return require(file) as NativeAddon;
  } catch (e) {
    throw new AddonLoadError(`vattention: ${what} (${file}) did not load: ${(e as Error).message}. ${FIX}`);
  }
}

// VATTENTION_ADDON names another build of the addon (the sanitizer build of
// `npm run test:sanitize`); normally `loadAddon` finds it. Loaded on first
// use, so that importing the package never throws (`npx vattention info`
// reports a load failure); the first call that needs it throws
// AddonLoadError instead.
let loaded: NativeAddon | undefined;
function theAddon(): NativeAddon {
  if (!loaded) {
    const override = process.env.VATTENTION_ADDON;
    loaded = override ? loadFile(override, 'VATTENTION_ADDON') : loadAddon();
  }
  return loaded;
}
export const addon: NativeAddon = new Proxy({} as NativeAddon, {
  get: (_target, key) => Reflect.get(theAddon(), key),
});

/**
 * One namespace object of the addon (`testing`, `kernels`), looked up on
 * each use: importing the module that uses it must not load the addon.
 */
export function addonPart<T extends object>(name: string): T {
  return new Proxy({} as T, {
    get: (_target, key) => Reflect.get((addon as unknown as Record<string, T>)[name]!, key),
  });
}
