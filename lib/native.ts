/**
 * The native addon, loaded once. Its objects never leave the library: the
 * public classes in kv-cache.ts wrap them.
 */
import type { CacheStats } from './stats.js';

// eslint-disable-next-line @typescript-eslint/no-require-imports
const bindings = require('bindings') as (name: string) => NativeAddon;

export interface NativeCacheOptions {
  layers: number;
  kvHeads: number;
  headDim: number;
  dtypeBytes: number;
  maxSequences: number;
  maxTokens: number;
  backend: 'cuda' | 'host';
  device: number;
  pageSize: number;
  memoryBudget: bigint;
  prefillBytes: bigint;
  prefetchTokens: number;
  layerGroups: number;
}

export type NativeStats = Omit<CacheStats, 'layout'>;

export interface NativeLayout {
  base: bigint;
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
  grow(slot: number, generation: number, tokens: number): number;
  step(slots: Uint32Array, generations: Uint32Array, tokens: Uint32Array, count: number): number;
  growAsync(slot: number, generation: number, tokens: number): [Promise<void>, () => void];
  release(slot: number, generation: number, stream?: bigint): void;
  reclaim(bytes?: number): number;
  trim(): number;
  write(slot: number, generation: number, layer: number, kind: 0 | 1, token: number, data: Uint8Array): void;
  read(slot: number, generation: number, layer: number, kind: 0 | 1, token: number, out: Uint8Array): void;
  tokens(slot: number, generation: number): number;
  stats(): NativeStats;
  obtainableBytes(): number;
  layout(): NativeLayout;
  close(): void;
  workerError(): string | null;
  injectFault(op: string, nth: number, kind: FaultKind, delayMs: number): void;
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

// VATTENTION_ADDON names another build of the addon (the sanitizer build of
// `npm run test:sanitize`); normally `bindings` finds build/Release.
const override = process.env.VATTENTION_ADDON;
// eslint-disable-next-line @typescript-eslint/no-require-imports
export const addon: NativeAddon = override ? (require(override) as NativeAddon) : bindings('vattention');
