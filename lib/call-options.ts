/**
 * The options objects of the cache's calls, what tensor() describes, and the
 * events it emits: the public shapes, without behaviour.
 */
import type { DType, KVKind } from './options.js';
import type { Sequence } from './sequence.js';

/** One K or V tensor of a layer, as a kernel sees it. */
export interface TensorInfo {
  layer: number;
  kind: KVKind;
  /** Device (or host) address of element [0, 0, 0, 0]. */
  address: bigint;
  /** [maxSequences, maxTokens, kvHeads, headDim]. */
  shape: [number, number, number, number];
  /**
   * Strides in elements. A slot's stride is maxTokens rows rounded up to whole
   * pages; the token stride is kvHeads × headDim per layer, times the layers
   * sharing the tensor in an all-layers or grouped layout (a strided view).
   */
  strides: [number, number, number, number];
  /** Strides in bytes. */
  strideBytes: [number, number, number, number];
  dtype: DType;
}

export interface ReserveOptions {
  /** Tokens the sequence is expected to reach; picks the released slot whose pages fit best. */
  expectedTokens?: number;
  /**
   * Prefix sharing: the new sequence starts with the first `tokens` tokens of
   * `from` (active, or released while its slot still holds its pages). Whole
   * page groups before token `tokens` are mapped from `from`'s physical pages
   * (no copy); the page group that token falls in is copied. See {@link KVCache.fork}.
   */
  prefix?: { from: Sequence; tokens: number };
  /** With `prefix`: the stream the copy is queued on (after the work there); without, it is done on return. */
  stream?: bigint;
  /** With `prefix`, over several devices: a stream per device, instead of `stream`. */
  streams?: readonly (bigint | undefined)[];
  /**
   * Automatic prefix caching: the prompt's token ids. The new sequence starts
   * with the longest prefix of them that a sequence published
   * ({@link KVCache.publish}) and the cache still holds, mapped shared from
   * the pages that hold it (whole page groups, no copy):
   * `seq.cachedTokens` says how many (possibly 0); prefill the rest. Not
   * with `prefix`.
   */
  tokens?: TokenIds;
  /** With `tokens`: only what was published under the same salt is found (per-tenant isolation). Default 0. */
  salt?: number | bigint;
}

/** Token ids: integers in [0, 2^32). */
export type TokenIds = Int32Array | Uint32Array | readonly number[];

export interface PublishOptions {
  /** The salt later `reserve({ tokens, salt })` calls must give to find these tokens. Default 0. */
  salt?: number | bigint;
}

export interface ForkOptions {
  /**
   * The tokens the fork shares, all of them written already (at most
   * `seq.tokens`): the new sequence starts with this length, and every whole
   * page group below it is shared. Default: `seq.tokens`, with the page group
   * of the last backed token always copied, never shared, because a step
   * backs a token before it is written (after `growAsync(seq, prompt + 1)` the
   * token at `prompt` is the next one each branch writes for itself).
   */
  tokens?: number;
  /** CUDA stream (bigint) the copy of the partial page group is queued on, after the work there; without, it is done on return. */
  stream?: bigint;
  /** Over several devices: a stream per device, instead of `stream`. */
  streams?: readonly (bigint | undefined)[];
}

export interface SwapOutOptions {
  /**
   * CUDA stream (bigint) whose queued work may still write the sequence: the
   * copy starts once that work is done. Omit when the GPU is done with it.
   */
  stream?: bigint;
  /** Over several devices: a stream per device, instead of `stream`. */
  streams?: readonly (bigint | undefined)[];
}

export interface SuspendOptions {
  /**
   * `'none'` (default): the KV bytes are dropped; after `resume()` the same
   * addresses are backed again with undefined contents (recompute, or
   * release the sequences). `'host'`: the bytes are copied to host memory
   * first (within `hostMemoryBudget`) and restored exactly by `resume()`.
   */
  keep?: 'none' | 'host';
}

export interface ReleaseOptions {
  /**
   * CUDA stream (CUstream as bigint; 0n = the legacy default stream) whose
   * queued work may still use the sequence. The slot's pages are not unmapped
   * before that work is done. Omit when the GPU is known to be done with it.
   * One device only: a cache over several devices takes `streams`.
   */
  stream?: bigint;
  /**
   * A cache over several devices: one stream per device, in the order of
   * `options.devices` (a stream belongs to its device's context); an entry
   * left undefined fences nothing on that device.
   */
  streams?: readonly (bigint | undefined)[];
}

/** Which device's shard a per-device call means (a cache over several devices). */
export interface DeviceOption {
  /** CUDA ordinal, one of `options.devices`; default the first. */
  device?: number;
}

export interface GrowAsyncOptions {
  /** Aborts the growth while pending: the promise rejects with ERR_ABORTED and nothing changes. */
  signal?: AbortSignal;
}

export interface TokenRange {
  layer: number;
  kind: KVKind;
  /** First token. */
  token: number;
  /**
   * Over several devices: whose shard (CUDA ordinal, one of
   * `options.devices`; default the first). The bytes are that shard's
   * heads: `tokenBytes` per token.
   */
  device?: number;
}

export interface ReadRange extends TokenRange {
  count: number;
}

/** Events a cache emits, for logging. */
export interface KVCacheEvents {
  /** A growth unmapped pages of other slots (prefetched tails, released slots) to make room. */
  reclaim: [{ operation: 'grow' | 'step'; pages: number; bytes: number }];
  /** A growth was refused for lack of memory (the error is thrown as well). */
  outOfMemory: [{ operation: 'grow' | 'step' | 'growAsync'; requestedBytes: number; availableBytes: number }];
  /**
   * The prefetch worker could not start on its thread (e.g. the CUDA context
   * could not be made current there): prefetch is off, demand growth still
   * works. Emitted once, on the tick after construction; `stats().prefetch.workerError` says the same.
   */
  prefetchError: [{ message: string }];
}

