/**
 * `vattention/kernels`: attention kernels that read the cache in place.
 *
 * - {@link decodeAttention}: one query token per sequence over K/V at any
 *   strides (every layout of a `KVCache`, any plain [B, T, H, D] tensor) or in
 *   vLLM-style paged blocks; grouped-query attention with any ratio, head
 *   dimensions 64, 80, 96, 128, 192 and 256, fp16 / bf16 / fp8 (e4m3) K/V,
 *   sliding window, logit soft-cap.
 * - {@link appendKV}: writes a batch's new K/V tokens into the cache at each
 *   sequence's position (converting to fp8 for fp8 caches).
 *
 * The kernels are this package's own CUDA C (native/kernels), shipped as PTX
 * and compiled by the driver on first use per device. Every call is queued
 * on `stream` and returns at once: no allocation and no host
 * synchronisation per call (after the first with a given shape), so calls
 * can be captured in a CUDA graph (see docs/kernels.md for what must stay
 * fixed). Every argument is checked before anything is queued: a bad call
 * throws a coded error and changes nothing.
 * @packageDocumentation
 */
import type { TensorInfo } from './call-options.js';
import { callNative, ClosedError, InvalidArgumentRangeError, InvalidArgumentTypeError } from './errors.js';
import * as modelOps from './model-ops.js';
import { addonPart } from './native.js';
import { checkAddress, checkInteger, checkObject, describe } from './options.js';

/** Element type of a cache's K and V. */
export type KVDtype = 'float16' | 'bfloat16' | 'float8_e4m3';
/** Element type of queries, outputs and new K/V tokens. */
export type QueryDtype = 'float16' | 'bfloat16';

/** The head dimensions the kernels take. */
export const HEAD_DIMS: readonly number[] = Object.freeze([64, 80, 96, 128, 192, 256]);

/** Where K and V rows are: element strides, shared by K and V. */
export interface KVStrides {
  /** Strided: a sequence's (row's) stride. Paged: a block's. */
  row: number;
  /** A token's stride (within a block when paged). */
  token: number;
  /** A KV head's stride. */
  head: number;
}

/** vLLM-style paged blocks: `[numBlocks, blockSize, kvHeads, headDim]` addressed through a block table. */
export interface PagedBlocks {
  /** int32 `[batch, maxBlocksPerSequence]` device array: entry b's i-th block. */
  blockTable: bigint;
  maxBlocksPerSequence: number;
  /** Tokens per block. */
  blockSize: number;
}

/**
 * Dequantisation scales of an fp8 cache: the value of a stored element is
 * `stored × scale`. Per tensor (`k`, `v`, default 1) and, optionally, per KV
 * head (float32 `[kvHeads]` device arrays, multiplied with the tensor's).
 */
export interface KVScale {
  k?: number;
  v?: number;
  kPerHead?: bigint;
  vPerHead?: bigint;
}

/** The cache a kernel reads or writes. */
export interface CacheArgs {
  /** The cache's element type. */
  dtype: KVDtype;
  /** Queries', outputs' and new tokens' type: the cache's for 16-bit caches (the default); required for fp8. */
  queryDtype?: QueryDtype;
  kvHeads: number;
  /** One of {@link HEAD_DIMS}. */
  headDim: number;
  /** K and V base addresses (16-byte aligned). */
  k: bigint;
  v: bigint;
  /** Element strides, each a multiple of 16 bytes. */
  strides: KVStrides;
  /** Strided: int32 `[batch]` device array, the row (cache slot) of each entry; default entry i is row i. */
  rows?: bigint;
  /** Paged addressing instead of strided. */
  paged?: PagedBlocks;
  /** fp8 caches only. */
  kvScale?: KVScale;
  /** At least every entry's length (and, paged, at most maxBlocksPerSequence × blockSize). */
  maxLength: number;
  stream?: bigint;
  device?: number;
}

export interface DecodeAttentionArgs extends CacheArgs {
  batch: number;
  /** Query heads: a multiple of kvHeads (any ratio). */
  qHeads: number;
  /** `[batch, qHeads, headDim]` query, contiguous. */
  q: bigint;
  /** `[batch, qHeads, headDim]` output, contiguous. */
  out: bigint;
  /** int32 `[batch]` device array: tokens of each entry (0 gives a zero output). */
  lengths: bigint;
  /**
   * The same lengths on the host, for the plan: the split of the KV length
   * follows the longest live entry, not maxLength. Default: every entry at
   * maxLength. The device array decides what is read; these only tune.
   */
  liveLengths?: ArrayLike<number>;
  /** Softmax scale; default 1 / sqrt(headDim). */
  scale?: number;
  /** Logit soft-cap: logits become softcap × tanh(logits / softcap). Default none. */
  softcap?: number;
  /** Attend only the last `window` tokens of each entry. Default all. */
  window?: number;
  /** Splits of the KV length; default planned. Fix it (and the workspace) for CUDA graphs. */
  splits?: number;
  /** Scratch for the splits; default one owned by the stream (see docs/kernels.md). */
  workspace?: AttentionWorkspace;
}

export interface PrefillAttentionArgs extends CacheArgs {
  batch: number;
  /** Query heads: a multiple of kvHeads (any ratio). */
  qHeads: number;
  /** Query tokens per entry: the second dimension of q and out. */
  queryTokens: number;
  /** `[batch, queryTokens, qHeads, headDim]` queries, contiguous. */
  q: bigint;
  /** `[batch, queryTokens, qHeads, headDim]` output, contiguous (rows past an entry's count are zeros). */
  out: bigint;
  /** int32 `[batch]` device array: tokens of each entry, its new ones (already appended) included. */
  lengths: bigint;
  /** int32 `[batch]` device array: new tokens of each entry (≤ queryTokens), the last of its length; default all. */
  counts?: bigint;
  /** Softmax scale; default 1 / sqrt(headDim). */
  scale?: number;
  /** Logit soft-cap, as in {@link DecodeAttentionArgs}. */
  softcap?: number;
  /** Each query attends only the last `window` tokens up to its own. Default all. */
  window?: number;
}

/** How a decode call splits the work. */
export interface AttentionPlan {
  /** Blocks per (entry, KV head) along the KV length. */
  splits: number;
  /** Tokens per split of the longest entry. */
  tokensPerSplit: number;
  /** Query heads one block computes. */
  headsPerBlock: number;
  /** Workspace the call needs (0 with one split). */
  workspaceBytes: number;
}

export interface AppendKVArgs extends CacheArgs {
  batch: number;
  /** New tokens per entry (the second dimension of kNew / vNew). */
  newTokens: number;
  /** `[batch, newTokens, kvHeads, headDim]` new K, contiguous, in queryDtype. */
  kNew: bigint;
  vNew: bigint;
  /** int32 `[batch]` device array: the position of entry b's first new token. */
  positions: bigint;
  /** int32 `[batch]` device array: new tokens of entry b (≤ newTokens); default all. */
  counts?: bigint;
}

interface NativeKernels {
  decodeAttention(device: number, call: Record<string, unknown>): AttentionPlan;
  planDecodeAttention(device: number, call: Record<string, unknown>): AttentionPlan;
  appendKV(device: number, call: Record<string, unknown>): void;
  allocateWorkspace(device: number, bytes: number): bigint;
  freeWorkspace(device: number, address: bigint): void;
  releaseStream(device: number, stream: bigint): boolean;
}

const native = addonPart<NativeKernels>('kernels');
const call = callNative;

const CACHE_KEYS = ['dtype', 'queryDtype', 'kvHeads', 'headDim', 'k', 'v', 'strides', 'rows', 'paged', 'kvScale', 'maxLength', 'stream', 'device'];
const DECODE_KEYS = [...CACHE_KEYS, 'batch', 'qHeads', 'q', 'out', 'lengths', 'liveLengths', 'scale', 'softcap', 'window', 'splits', 'workspace'];
const PREFILL_KEYS = [...CACHE_KEYS, 'batch', 'qHeads', 'queryTokens', 'q', 'out', 'lengths', 'counts', 'scale', 'softcap', 'window'];
const APPEND_KEYS = [...CACHE_KEYS, 'batch', 'newTokens', 'kNew', 'vNew', 'positions', 'counts'];
const MAX_INT32 = 0x7fff_ffff;

function checkNumber(name: string, value: unknown, fallback: number, positive: boolean): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number') throw new InvalidArgumentTypeError(name, `must be a number, got ${describe(value)}`);
  if (!Number.isFinite(value) || (positive ? !(value > 0) : value < 0))
    throw new InvalidArgumentRangeError(name, `must be a ${positive ? 'positive' : 'non-negative'} finite number, got ${value}`);
  return value;
}

function checkStream(name: string, value: unknown): bigint {
  if (value === undefined) return 0n;
  if (typeof value !== 'bigint' || value < 0n || value >= 1n << 64n)
    throw new InvalidArgumentTypeError(name, `must be a CUstream (bigint, 0n = the default stream), got ${describe(value)}`);
  return value;
}

/** The cache part of a call, flattened for the addon. */
function cacheCall(a: CacheArgs): Record<string, unknown> {
  if (a.dtype !== 'float16' && a.dtype !== 'bfloat16' && a.dtype !== 'float8_e4m3')
    throw new InvalidArgumentRangeError('args.dtype', `must be 'float16', 'bfloat16' or 'float8_e4m3', got ${describe(a.dtype)}`);
  if (a.queryDtype !== undefined && a.queryDtype !== 'float16' && a.queryDtype !== 'bfloat16')
    throw new InvalidArgumentRangeError('args.queryDtype', `must be 'float16' or 'bfloat16', got ${describe(a.queryDtype)}`);
  if (a.queryDtype === undefined && a.dtype === 'float8_e4m3')
    throw new InvalidArgumentRangeError('args.queryDtype', "is required for a float8_e4m3 cache ('float16' or 'bfloat16')");
  const headDim = checkInteger('args.headDim', a.headDim, 1, 65_535);
  if (!HEAD_DIMS.includes(headDim))
    throw new InvalidArgumentRangeError('args.headDim', `must be one of ${HEAD_DIMS.join(', ')}, got ${headDim}`);
  const strides = checkObject('args.strides', a.strides, false, ['row', 'token', 'head']);
  const paged = checkObject('args.paged', a.paged, true, ['blockTable', 'maxBlocksPerSequence', 'blockSize']);
  const scale = checkObject('args.kvScale', a.kvScale, true, ['k', 'v', 'kPerHead', 'vPerHead']);
  if (a.kvScale !== undefined && a.dtype !== 'float8_e4m3')
    throw new InvalidArgumentRangeError('args.kvScale', `applies to float8_e4m3 caches only, not ${a.dtype}`);
  if (a.rows !== undefined && a.paged !== undefined)
    throw new InvalidArgumentRangeError('args.rows', 'and args.paged exclude each other (a paged cache finds rows through its block table)');
  const stride = (key: string) => checkInteger(`args.strides.${key}`, strides[key], 0, Number.MAX_SAFE_INTEGER);
  const isPaged = a.paged !== undefined;
  return {
    dtype: a.dtype,
    queryDtype: a.queryDtype ?? a.dtype,
    kvHeads: checkInteger('args.kvHeads', a.kvHeads, 1, 65_535),
    headDim,
    k: checkAddress('args.k', a.k),
    v: checkAddress('args.v', a.v),
    rowStride: stride('row'),
    tokenStride: stride('token'),
    headStride: stride('head'),
    paged: isPaged,
    rows: isPaged ? checkAddress('args.paged.blockTable', paged.blockTable) : a.rows === undefined ? 0n : checkAddress('args.rows', a.rows),
    maxBlocksPerSequence: isPaged ? checkInteger('args.paged.maxBlocksPerSequence', paged.maxBlocksPerSequence, 1, MAX_INT32) : 0,
    blockSize: isPaged ? checkInteger('args.paged.blockSize', paged.blockSize, 1, MAX_INT32) : 0,
    kScale: checkNumber('args.kvScale.k', scale.k, 1, true),
    vScale: checkNumber('args.kvScale.v', scale.v, 1, true),
    kScales: scale.kPerHead === undefined ? 0n : checkAddress('args.kvScale.kPerHead', scale.kPerHead),
    vScales: scale.vPerHead === undefined ? 0n : checkAddress('args.kvScale.vPerHead', scale.vPerHead),
    maxLength: checkInteger('args.maxLength', a.maxLength, 0, MAX_INT32),
    stream: checkStream('args.stream', a.stream),
  };
}

function checkDevice(value: unknown): number {
  return value === undefined ? 0 : checkInteger('args.device', value, 0, 1023);
}

/** The longest of the live lengths, each checked against maxLength. */
function longest(value: unknown, batch: number, maxLength: number): number {
  if (value === undefined) return 0;
  const lengths = value as ArrayLike<unknown>;
  if (typeof value !== 'object' || value === null || typeof lengths.length !== 'number')
    throw new InvalidArgumentTypeError('args.liveLengths', `must be an array of numbers, got ${describe(value)}`);
  if (lengths.length !== batch)
    throw new InvalidArgumentRangeError('args.liveLengths', `must hold batch (${batch}) lengths, got ${lengths.length}`);
  let most = 0;
  for (let i = 0; i < batch; i++) most = Math.max(most, checkInteger(`args.liveLengths[${i}]`, lengths[i], 0, maxLength));
  return most;
}

/** What decode and prefill calls share: the cache, the queries, the output, the softmax. */
function queryCall(a: DecodeAttentionArgs | PrefillAttentionArgs): Record<string, unknown> {
  const cache = cacheCall(a);
  const qHeads = checkInteger('args.qHeads', a.qHeads, 1, 65_535);
  if (qHeads % (cache.kvHeads as number) !== 0)
    throw new InvalidArgumentRangeError('args.qHeads', `must be a multiple of kvHeads (${String(cache.kvHeads)}), got ${qHeads}`);
  return {
    ...cache,
    batch: checkInteger('args.batch', a.batch, 1, 65_535),
    qHeads,
    q: checkAddress('args.q', a.q),
    out: checkAddress('args.out', a.out),
    lengths: checkAddress('args.lengths', a.lengths),
    scale: checkNumber('args.scale', a.scale, 0, true),
    softcap: checkNumber('args.softcap', a.softcap, 0, true),
    window: a.window === undefined ? 0 : checkInteger('args.window', a.window, 1, MAX_INT32),
  };
}

function decodeCall(args: DecodeAttentionArgs): { device: number; flat: Record<string, unknown> } {
  const a = checkObject('args', args, false, DECODE_KEYS) as unknown as DecodeAttentionArgs;
  const common = queryCall(a);
  if (a.workspace !== undefined && !(a.workspace instanceof AttentionWorkspace))
    throw new InvalidArgumentTypeError('args.workspace', `must be an AttentionWorkspace, got ${describe(a.workspace)}`);
  const device = checkDevice(a.device);
  if (a.workspace !== undefined && a.workspace.device !== device)
    throw new InvalidArgumentRangeError('args.workspace', `is on device ${a.workspace.device}, the call on device ${device}`);
  const flat = {
    ...common,
    queryTokens: 1,
    counts: 0n,
    longestLength: longest(a.liveLengths, common.batch as number, common.maxLength as number),
    splits: a.splits === undefined ? 0 : checkInteger('args.splits', a.splits, 1, 65_535),
    workspace: a.workspace === undefined ? 0n : a.workspace.address,
    workspaceBytes: a.workspace === undefined ? 0 : a.workspace.bytes,
  };
  return { device, flat };
}

/**
 * Queues decode attention: `out = softmax(q·Kᵀ × scale)·V` per query head
 * over each entry's first `lengths[b]` tokens (the last `window` of them
 * with a window), fp32 accumulation. The KV length is split over blocks
 * (flash-decoding) per the plan, which follows `liveLengths`.
 * @returns the plan it used.
 */
export function decodeAttention(args: DecodeAttentionArgs): AttentionPlan {
  const { device, flat } = decodeCall(args);
  return call(() => native.decodeAttention(device, flat));
}

/** The plan {@link decodeAttention} would use for these arguments, without queuing anything (its workspace size, for one). */
export function planDecodeAttention(args: DecodeAttentionArgs): AttentionPlan {
  const { device, flat } = decodeCall(args);
  return call(() => native.planDecodeAttention(device, flat));
}

/**
 * Queues causal prefill attention: query token n of entry b sits at
 * position `lengths[b] − counts[b] + n` and attends the tokens up to it (its
 * K/V, like every new token's, already appended with {@link appendKV}); the
 * same kernel as decode, a block taking 16 (token, head) rows of a
 * grouped-query group. One split; no workspace.
 */
export function prefillAttention(args: PrefillAttentionArgs): void {
  const a = checkObject('args', args, false, PREFILL_KEYS) as unknown as PrefillAttentionArgs;
  const flat = {
    ...queryCall(a),
    queryTokens: checkInteger('args.queryTokens', a.queryTokens, 1, MAX_INT32),
    counts: a.counts === undefined ? 0n : checkAddress('args.counts', a.counts),
    longestLength: 0,
    splits: 1,
    workspace: 0n,
    workspaceBytes: 0,
  };
  const device = checkDevice(a.device);
  call(() => native.decodeAttention(device, flat));
}

/**
 * Queues the write of a batch's new tokens: token n of entry b goes to
 * position `positions[b] + n` of its sequence, for n < `counts[b]`
 * (default newTokens); fp8 caches store `value / scale`, saturated to
 * ±448. Positions at or past maxLength are not written.
 */
export function appendKV(args: AppendKVArgs): void {
  const a = checkObject('args', args, false, APPEND_KEYS) as unknown as AppendKVArgs;
  const cache = cacheCall(a);
  const flat = {
    ...cache,
    batch: checkInteger('args.batch', a.batch, 1, 65_535),
    newTokens: checkInteger('args.newTokens', a.newTokens, 1, MAX_INT32),
    kNew: checkAddress('args.kNew', a.kNew),
    vNew: checkAddress('args.vNew', a.vNew),
    positions: checkAddress('args.positions', a.positions),
    counts: a.counts === undefined ? 0n : checkAddress('args.counts', a.counts),
  };
  const device = checkDevice(a.device);
  call(() => native.appendKV(device, flat));
}

/**
 * Device scratch for the splits of {@link decodeAttention}, owned by the
 * caller: pass it to calls that must not share the stream's default
 * workspace, or that are captured in a CUDA graph. A call needs
 * {@link planDecodeAttention}'s `workspaceBytes`; one call at a time may use
 * it (calls on one stream follow each other; on several streams, give each
 * its own).
 */
export class AttentionWorkspace {
  readonly device: number;
  readonly bytes: number;
  #address: bigint;

  constructor(options: { bytes: number; device?: number }) {
    const o = checkObject('options', options, false, ['bytes', 'device']);
    this.bytes = checkInteger('options.bytes', o.bytes, 1, Number.MAX_SAFE_INTEGER);
    this.device = o.device === undefined ? 0 : checkInteger('options.device', o.device, 0, 1023);
    this.#address = call(() => native.allocateWorkspace(this.device, this.bytes));
  }

  /** Device address of the buffer. */
  get address(): bigint {
    if (this.#address === 0n) throw new ClosedError('the workspace is closed');
    return this.#address;
  }

  get closed(): boolean {
    return this.#address === 0n;
  }

  /** Frees the buffer; idempotent. Calls queued with it must have finished. */
  close(): void {
    if (this.#address === 0n) return;
    const address = this.#address;
    this.#address = 0n;
    call(() => native.freeWorkspace(this.device, address));
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/**
 * Frees what the kernels keep for a stream of `device`: the default
 * workspace of `decodeAttention` / `prefillAttention` (sized to the largest
 * split seen) and `linear`'s cuBLASLt handle, 32 MiB workspace and per-shape
 * plans. They are kept per (device, stream) from a stream's first call, so
 * that calls allocate nothing; call this before destroying a stream that
 * will not be used again (a server with a stream per request would otherwise
 * keep them for every stream it ever made). Waits for the stream's queued
 * work first. Returns whether anything was kept for it; the next call on the
 * stream makes them again. Not while a graph that uses them can still be
 * launched: its kernels would read freed memory.
 */
export function releaseStream(options: { stream: bigint; device?: number }): boolean {
  const o = checkObject('options', options, false, ['stream', 'device']);
  if (typeof o.stream !== 'bigint' || o.stream < 0n || o.stream >= 1n << 64n)
    throw new InvalidArgumentTypeError('options.stream', `must be a CUstream (bigint, 0n = the default stream), got ${describe(o.stream)}`);
  const device = o.device === undefined ? 0 : checkInteger('options.device', o.device, 0, 1023);
  return call(() => native.releaseStream(device, o.stream as bigint));
}

/** K/V addresses and strides of one layer of a `KVCache`, for the kernels (rows: the slots). */
export function cacheKV(k: TensorInfo, v: TensorInfo): { k: bigint; v: bigint; strides: KVStrides } {
  if (k.strides.some((s, i) => s !== v.strides[i])) throw new InvalidArgumentRangeError('v', 'K and V must have the same strides');
  return { k: k.address, v: v.address, strides: { row: k.strides[0], token: k.strides[1], head: k.strides[2] } };
}

// Plain values, not re-export getters: vitest's loading of this repository's
// own dist (the examples import the package by name) reads getters of a
// CommonJS module as undefined.
export const { argmax, gatherRows, linear, linearLibrary, rmsNorm, rotaryEmbedding, siluMul } = modelOps;
export type { ActivationDtype, ArgmaxArgs, GatherRowsArgs, LinearArgs, QueueArgs, RmsNormArgs, RotaryEmbeddingArgs, SiluMulArgs } from './model-ops.js';
