/**
 * Option and argument validation. Runs before any native call, so a bad
 * option never reaches the driver and never changes state.
 */
import { totalmem } from 'node:os';
import { InvalidArgumentRangeError, InvalidArgumentTypeError } from './errors.js';

export type DType = 'float16' | 'bfloat16' | 'float32' | 'int8' | 'float8_e4m3';
export type BackendChoice = 'cuda' | 'host' | 'auto';
export type KVKind = 'k' | 'v';
/**
 * How layers share tensors (see the README's "Layouts"):
 * - `'per-layer'`: a K and a V tensor per layer (vAttention's layout). A page
 *   group is a page of each of the 2 × layers tensors.
 * - `'all-layers'`: one K and one V tensor holding every layer; a page group
 *   is 2 pages for any model, so a sequence wastes less than 2 pages.
 * - `{ layerGroups: N }`: N K and N V tensors of layers / N consecutive layers
 *   each (N divides layers); N = 1 is all-layers, N = layers is per-layer.
 */
export type KVLayoutChoice = 'per-layer' | 'all-layers' | { layerGroups: number };

export const DTYPE_BYTES: Readonly<Record<DType, number>> = Object.freeze({
  float16: 2,
  bfloat16: 2,
  float32: 4,
  int8: 1,
  float8_e4m3: 1,
});

export interface KVCacheOptions {
  /** Transformer layers; each has a K and a V tensor. */
  layers: number;
  /** KV heads per layer (GQA: fewer than attention heads). */
  kvHeads: number;
  /** Elements per head. */
  headDim: number;
  /** Element type of K and V. */
  dtype: DType;
  /** Sequence slots: the most sequences alive at once. */
  maxSequences: number;
  /** The most tokens one sequence may hold. */
  maxTokens: number;
  /** CUDA device ordinal (default 0). For several devices use `devices`. */
  device?: number;
  /**
   * Tensor parallelism: the CUDA device ordinals one cache spans (distinct,
   * at most 16). Every device holds `kvHeads / devices.length` of each
   * layer's KV heads (`kvHeads` must divide evenly) in a virtual range, page
   * pool, budget and prefetch worker of its own; every decision (the slot of
   * a sequence, the tokens backed) is made once and applied to all, all or
   * nothing across devices. Default `[device]`.
   */
  devices?: readonly number[];
  /** 'cuda', 'host', or 'auto' (cuda when a VMM-capable device is present). Default 'auto'. */
  backend?: BackendChoice;
  /**
   * Bytes of physical memory the cache may back. Default: on cuda the device's
   * free memory less 5% of its total; on host half the free RAM.
   * With several `devices`: per device — one figure for each, or an array
   * with one entry per device.
   */
  memoryBudget?: number | bigint | readonly (number | bigint)[];
  /**
   * Bytes per physical page. cuda: a multiple of the allocation granularity
   * (default: the granularity, 2 MiB on current GPUs). host: a multiple of the
   * OS page (default 2 MiB).
   */
  pageSize?: number;
  /** Bytes of pages to create into the pool up front (default 0); per device. */
  poolPrefill?: number | bigint;
  /**
   * Look-ahead of {@link KVCache.step}: a worker thread keeps the next
   * `prefetchTokens` tokens of every stepped sequence backed, and keeps a page
   * group ready in the pool. 0 turns the worker off. Default 64.
   */
  prefetchTokens?: number;
  /**
   * Page groups the prefetch worker keeps idle in the pool while `step()` is
   * in use: created within the budget, or, when the budget is full, reclaimed
   * ahead of need from released slots (least recently released first, only
   * those whose fences have passed) — so the serving loop does not unmap on
   * its own thread. 0: no idle pages kept and no reclaim ahead (demand
   * growth reclaims for itself). Default 1.
   */
  idlePageGroups?: number;
  /**
   * Tensor arrangement; default `'all-layers'` (chosen by the attention and
   * decode benchmarks: no measurable cost to the kernel, 32× less memory past
   * the tokens for Llama-3-8B). Kernels must honour the tensors' strides; use
   * `'per-layer'` for a contiguous [B, T, H, D] tensor per layer.
   * See {@link KVLayoutChoice}.
   */
  layout?: KVLayoutChoice;
  /**
   * Bytes of host memory the cache may hold for {@link KVCache.swapOut}
   * (swapped-out sequences) and {@link KVCache.suspend} with `keep: 'host'`
   * (page-locked on cuda). Going past it is `ERR_OUT_OF_MEMORY`. Default: a
   * quarter of the machine's RAM.
   */
  hostMemoryBudget?: number | bigint;
  /**
   * Bytes of host memory to page-lock at construction (default 0), so that
   * the first swaps do not pay for it (on an H100 host page-locking ran at
   * 2-3 GB/s, about twenty times slower than the copy itself).
   */
  hostMemoryPrefill?: number | bigint;
  /**
   * Automatic prefix caching ({@link KVCache.publish}, `reserve({ tokens })`):
   * on by default, bounded by the memory budget (cached groups live in
   * released sequences' pages and are reclaimed, least recently used first,
   * when memory is needed). `false` turns it off (`reserve({ tokens })` then
   * never hits and `publish` keeps nothing). `maxBytes`: of released
   * sequences' pages (per device), the most kept findable; beyond it the
   * least recently released stop being cached.
   */
  prefixCache?: boolean | { maxBytes?: number | bigint };
}

export interface NormalizedOptions {
  layers: number;
  kvHeads: number;
  headDim: number;
  dtype: DType;
  dtypeBytes: number;
  maxSequences: number;
  maxTokens: number;
  /** The first of `devices`. */
  device: number;
  /** CUDA ordinals the cache spans: `[device]` unless `devices` was given. */
  devices: number[];
  backend: BackendChoice;
  /**
   * The first device's budget. In `cache.options` the default is resolved to
   * its figure (what `stats().devices[0].budgetBytes` reports); from
   * normalizeOptions alone, 0n stands for the default.
   */
  memoryBudget: bigint;
  /** Each device's budget, in the order of `devices` (resolved as `memoryBudget`). */
  memoryBudgets: bigint[];
  pageSize: number;
  poolPrefill: bigint;
  prefetchTokens: number;
  /** Tensors per kind: layers for per-layer, 1 for all-layers. */
  layerGroups: number;
  idlePageGroups: number;
  hostMemoryBudget: bigint;
  hostMemoryPrefill: bigint;
  /** Whether prefix caching is on. */
  prefixCache: boolean;
  /** Its bound in bytes per device (undefined: the memory budget's). */
  prefixCacheMaxBytes: bigint | undefined;
}

export const DEFAULT_PREFETCH_TOKENS = 64;

const MAX_U32 = 0xffff_ffff;

/** An integer in [min, max]; TypeError for a non-number, RangeError otherwise. */
export function checkInteger(name: string, value: unknown, min: number, max: number): number {
  if (typeof value !== 'number') throw new InvalidArgumentTypeError(name, `must be a number, got ${describe(value)}`);
  if (!Number.isInteger(value)) throw new InvalidArgumentRangeError(name, `must be an integer, got ${value}`);
  if (value < min || value > max)
    throw new InvalidArgumentRangeError(name, `must be between ${min} and ${max}, got ${value}`);
  return value;
}

/** A byte count as number or bigint, in [min, 2^64). */
export function checkBytes(name: string, value: unknown, min: bigint): bigint {
  let v: bigint;
  if (typeof value === 'bigint') v = value;
  else if (typeof value === 'number') {
    if (!Number.isSafeInteger(value))
      throw new InvalidArgumentRangeError(name, `must be a safe integer or a bigint, got ${value}`);
    v = BigInt(value);
  } else throw new InvalidArgumentTypeError(name, `must be a number or bigint, got ${describe(value)}`);
  if (v < min || v >= 1n << 64n) throw new InvalidArgumentRangeError(name, `must be at least ${min}, got ${v}`);
  return v;
}

export function checkKind(name: string, value: unknown): 0 | 1 {
  if (value === 'k') return 0;
  if (value === 'v') return 1;
  if (typeof value !== 'string') throw new InvalidArgumentTypeError(name, `must be 'k' or 'v', got ${describe(value)}`);
  throw new InvalidArgumentRangeError(name, `must be 'k' or 'v', got '${value}'`);
}

/**
 * An options object (or undefined when optional). With `keys`, a key it does
 * not know is ERR_INVALID_ARGUMENT, as in the constructor: in plain JS a
 * misspelt `{ strem }` would otherwise be dropped in silence (a fence lost).
 */
export function checkObject(name: string, value: unknown, optional: boolean, keys?: readonly string[]): Record<string, unknown> {
  if (value === undefined && optional) return {};
  if (typeof value !== 'object' || value === null || Array.isArray(value))
    throw new InvalidArgumentTypeError(name, `must be an object, got ${describe(value)}`);
  if (keys)
    for (const key of Object.keys(value))
      if (!keys.includes(key)) throw new InvalidArgumentRangeError(`${name}.${key}`, `is not a known option (known: ${keys.join(', ')})`);
  return value as Record<string, unknown>;
}

/** A device address: a positive bigint below 2^64. */
export function checkAddress(name: string, value: unknown): bigint {
  if (typeof value !== 'bigint' || value <= 0n || value >= 1n << 64n)
    throw new InvalidArgumentTypeError(name, `must be a device address (bigint), got ${describe(value)}`);
  return value;
}

export function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  if (typeof value === 'number' || typeof value === 'bigint' || typeof value === 'boolean') return `${typeof value} ${String(value)}`;
  if (typeof value === 'string') return `string '${value.length > 40 ? value.slice(0, 40) + '…' : value}'`;
  return typeof value;
}

const KNOWN = new Set([
  'layers',
  'kvHeads',
  'headDim',
  'dtype',
  'maxSequences',
  'maxTokens',
  'device',
  'devices',
  'backend',
  'memoryBudget',
  'pageSize',
  'poolPrefill',
  'prefetchTokens',
  'layout',
  'idlePageGroups',
  'hostMemoryBudget',
  'hostMemoryPrefill',
  'prefixCache',
]);

/** The number of K (and V) tensors a layout choice asks for. */
export function layerGroupsOf(name: string, value: unknown, layers: number): number {
  if (value === 'per-layer') return layers;
  if (value === undefined || value === 'all-layers') return 1;
  if (typeof value === 'string')
    throw new InvalidArgumentRangeError(name, `must be 'per-layer', 'all-layers' or { layerGroups: N }, got '${value}'`);
  const o = checkObject(name, value, false);
  for (const key of Object.keys(o))
    if (key !== 'layerGroups') throw new InvalidArgumentRangeError(`${name}.${key}`, 'is not a known option');
  const n = checkInteger(`${name}.layerGroups`, o.layerGroups, 1, layers);
  if (layers % n !== 0)
    throw new InvalidArgumentRangeError(`${name}.layerGroups`, `must divide layers (${layers}), got ${n}`);
  return n;
}

/** The layout's name as stats() reports it. */
export function layoutName(layerGroups: number, layers: number): string {
  if (layerGroups === layers) return 'per-layer';
  if (layerGroups === 1) return 'all-layers';
  return `layer-groups:${layerGroups}`;
}

export function normalizeOptions(input: unknown): NormalizedOptions {
  const o = checkObject('options', input, false);
  for (const key of Object.keys(o)) {
    if (!KNOWN.has(key)) throw new InvalidArgumentRangeError(`options.${key}`, 'is not a known option');
  }
  const layers = checkInteger('options.layers', o.layers, 1, 65_536);
  const kvHeads = checkInteger('options.kvHeads', o.kvHeads, 1, 65_536);
  const headDim = checkInteger('options.headDim', o.headDim, 1, 65_536);
  if (typeof o.dtype !== 'string')
    throw new InvalidArgumentTypeError('options.dtype', `must be a string, got ${describe(o.dtype)}`);
  if (!Object.hasOwn(DTYPE_BYTES, o.dtype))
    throw new InvalidArgumentRangeError(
      'options.dtype',
      `must be one of ${Object.keys(DTYPE_BYTES).join(', ')}, got '${o.dtype}'`,
    );
  const dtype = o.dtype as DType;
  const maxSequences = checkInteger('options.maxSequences', o.maxSequences, 1, 1 << 20);
  const maxTokens = checkInteger('options.maxTokens', o.maxTokens, 1, MAX_U32 >>> 1);
  const device = o.device === undefined ? 0 : checkInteger('options.device', o.device, 0, 1023);
  const devices = devicesOf(o.devices, o.device === undefined ? undefined : device);
  if (kvHeads % devices.length !== 0)
    throw new InvalidArgumentRangeError(
      'options.kvHeads',
      `(${kvHeads}) must divide evenly over the ${devices.length} devices (each holds kvHeads / devices heads)`,
    );
  let backend: BackendChoice = 'auto';
  if (o.backend !== undefined) {
    if (typeof o.backend !== 'string')
      throw new InvalidArgumentTypeError('options.backend', `must be a string, got ${describe(o.backend)}`);
    if (o.backend !== 'cuda' && o.backend !== 'host' && o.backend !== 'auto')
      throw new InvalidArgumentRangeError('options.backend', `must be 'cuda', 'host' or 'auto', got '${o.backend}'`);
    backend = o.backend;
  }
  const memoryBudgets = budgetsOf(o.memoryBudget, devices.length);
  const memoryBudget = memoryBudgets[0]!;
  const pageSize = o.pageSize === undefined ? 0 : checkInteger('options.pageSize', o.pageSize, 4096, 2 ** 40);
  if (pageSize !== 0 && pageSize % 4096 !== 0)
    throw new InvalidArgumentRangeError('options.pageSize', `must be a multiple of 4096, got ${pageSize}`);
  const poolPrefill = o.poolPrefill === undefined ? 0n : checkBytes('options.poolPrefill', o.poolPrefill, 0n);
  for (const budget of memoryBudgets)
    if (budget !== 0n && poolPrefill > budget)
      throw new InvalidArgumentRangeError('options.poolPrefill', `(${poolPrefill}) exceeds memoryBudget (${budget})`);
  const prefetchTokens =
    o.prefetchTokens === undefined
      ? DEFAULT_PREFETCH_TOKENS
      : checkInteger('options.prefetchTokens', o.prefetchTokens, 0, maxTokens);
  const dtypeBytes = DTYPE_BYTES[dtype];
  const layerGroups = layerGroupsOf('options.layout', o.layout, layers);
  // The whole virtual range must be addressable: 2 * layerGroups tensors of
  // maxSequences slots, each rounded up to whole pages (estimated at 2 MiB).
  const page = BigInt(pageSize || 2 * 1024 * 1024);
  const rowBytes = BigInt(kvHeads * headDim * dtypeBytes) * BigInt(layers / layerGroups);
  const slotBytes = ((BigInt(maxTokens) * rowBytes + page - 1n) / page) * page;
  const rangeBytes = 2n * BigInt(layerGroups) * BigInt(maxSequences) * slotBytes;
  if (rangeBytes > 1n << 47n)
    throw new InvalidArgumentRangeError(
      'options',
      `the KV tensors need ${rangeBytes} bytes of virtual address space, more than the 2^47 a process can reserve; lower maxSequences or maxTokens`,
    );
  const hostMemoryBudget =
    o.hostMemoryBudget === undefined ? BigInt(Math.floor(totalmem() / 4)) : checkBytes('options.hostMemoryBudget', o.hostMemoryBudget, 0n);
  const hostMemoryPrefill = o.hostMemoryPrefill === undefined ? 0n : checkBytes('options.hostMemoryPrefill', o.hostMemoryPrefill, 0n);
  if (hostMemoryPrefill > hostMemoryBudget)
    throw new InvalidArgumentRangeError('options.hostMemoryPrefill', `(${hostMemoryPrefill}) exceeds hostMemoryBudget (${hostMemoryBudget})`);
  return {
    layers,
    kvHeads,
    headDim,
    dtype,
    dtypeBytes,
    maxSequences,
    maxTokens,
    device: devices[0]!,
    devices,
    backend,
    memoryBudget,
    memoryBudgets,
    pageSize,
    poolPrefill,
    prefetchTokens,
    layerGroups,
    idlePageGroups: o.idlePageGroups === undefined ? 1 : checkInteger('options.idlePageGroups', o.idlePageGroups, 0, 1024),
    hostMemoryBudget,
    hostMemoryPrefill,
    ...prefixCacheOf(o.prefixCache),
  };
}

/** options.prefixCache: a boolean, or { maxBytes }. */
function prefixCacheOf(value: unknown): { prefixCache: boolean; prefixCacheMaxBytes: bigint | undefined } {
  if (value === undefined || value === true) return { prefixCache: true, prefixCacheMaxBytes: undefined };
  if (value === false) return { prefixCache: false, prefixCacheMaxBytes: undefined };
  const o = checkObject('options.prefixCache', value, false, ['maxBytes']);
  const maxBytes = o.maxBytes === undefined ? undefined : checkBytes('options.prefixCache.maxBytes', o.maxBytes, 0n);
  return { prefixCache: true, prefixCacheMaxBytes: maxBytes };
}

/** options.devices: distinct ordinals, 1 to 16 of them; `device`, when given too, must be the first. */
function devicesOf(value: unknown, device: number | undefined): number[] {
  if (value === undefined) return [device ?? 0];
  if (!Array.isArray(value))
    throw new InvalidArgumentTypeError('options.devices', `must be an array of device ordinals, got ${describe(value)}`);
  if (value.length < 1 || value.length > 16)
    throw new InvalidArgumentRangeError('options.devices', `must list 1 to 16 devices, got ${value.length}`);
  const devices = value.map((d, i) => checkInteger(`options.devices[${i}]`, d, 0, 1023));
  if (new Set(devices).size !== devices.length)
    throw new InvalidArgumentRangeError('options.devices', `must not list a device twice, got [${devices.join(', ')}]`);
  if (device !== undefined && device !== devices[0])
    throw new InvalidArgumentRangeError('options.device', `(${device}) conflicts with options.devices [${devices.join(', ')}]: give one of them`);
  return devices;
}

/** options.memoryBudget: one figure for every device, or one per device. */
function budgetsOf(value: unknown, devices: number): bigint[] {
  if (value === undefined) return new Array<bigint>(devices).fill(0n);
  if (!Array.isArray(value)) return new Array<bigint>(devices).fill(checkBytes('options.memoryBudget', value, 1n));
  if (value.length !== devices)
    throw new InvalidArgumentRangeError('options.memoryBudget', `must have one entry per device (${devices}), got ${value.length}`);
  return value.map((b, i) => checkBytes(`options.memoryBudget[${i}]`, b, 1n));
}
