/**
 * The public KV cache. Validates arguments, keeps the native object private,
 * and turns native errors into typed ones. Policy lives in the native core.
 */
import {
  AbortedError,
  ClosedError,
  OutOfMemoryError,
  ForeignSequenceError,
  InvalidArgumentRangeError,
  InvalidArgumentTypeError,
  OutOfRangeError,
  ReentrantCallError,
  SequenceReleasedError,
  fromNative,
} from './errors.js';
import { EventEmitter } from 'node:events';
import { autoBackend } from './info.js';
import { type MetricsOptions, formatPrometheus } from './metrics.js';
import { addon, type FaultKind, type NativeCache, type NativeLayout } from './native.js';
import { type CacheStats, type DeviceStats, type LayoutStats, sumDeviceStats } from './stats.js';
import {
  type DType,
  type KVCacheOptions,
  type KVKind,
  type NormalizedOptions,
  checkBytes,
  checkInteger,
  checkKind,
  checkObject,
  describe,
  normalizeOptions,
} from './options.js';

/** One K or V tensor of a layer, as a kernel sees it. */
// The keys each call's options object may hold (anything else is ERR_INVALID_ARGUMENT).
const STREAM_KEYS = ['stream', 'streams'] as const;
const FORK_KEYS = ['tokens', 'stream', 'streams'] as const;

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

export type { CacheStats, CallStats, DeviceStats, HostMemoryStats, LayoutStats, PrefetchStats, SlotStats } from './stats.js';

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

/** A sequence placed in a slot of a cache. Obtained from {@link KVCache.reserve}. */
export class Sequence {
  // Private fields, not a WeakMap: step() checks every entry of the batch,
  // and a private field read costs a fraction of a WeakMap lookup.
  #generation: number;
  #released = false;

  /** @internal */
  constructor(
    readonly cache: KVCache,
    readonly slot: number,
    generation: number,
  ) {
    this.#generation = generation;
  }

  /** True once released (or its cache closed). */
  get released(): boolean {
    return this.#released || this.cache.closed;
  }

  /**
   * @internal The generation of a sequence made by reserve(); -1 once
   * released; undefined for anything else (Object.create(Sequence.prototype)
   * included: it has no private fields).
   */
  static generationOf(seq: unknown): number | undefined {
    if (typeof seq !== 'object' || seq === null || !(#generation in seq)) return undefined;
    return seq.#released ? -1 : seq.#generation;
  }

  /** @internal The generation it was reserved with, released or not (prefix sharing from a released sequence). */
  static reservedGeneration(seq: unknown): number | undefined {
    if (typeof seq !== 'object' || seq === null || !(#generation in seq)) return undefined;
    return seq.#generation;
  }

  /** @internal */
  static markReleased(seq: Sequence): void {
    seq.#released = true;
  }

  /** Tokens grown so far (backed in every layer's K and V). */
  get tokens(): number {
    return this.cache.tokens(this);
  }

  /** Address of this sequence's token 0 in one layer's K or V (on `options.device`'s shard). */
  address(layer: number, kind: KVKind, options?: DeviceOption): bigint {
    return this.cache.sequenceAddress(this, layer, kind, options);
  }
}

/**
 * A sequence swapped out to host memory by {@link KVCache.swapOut}: its
 * tokens wait there until {@link KVCache.swapIn} makes them a sequence again
 * (in any free slot: its addresses may differ) or {@link discard} frees them.
 */
export class SwappedSequence {
  #handle: number;
  #state: 'swapped' | 'swappingIn' | 'gone' = 'swapped';

  /** @internal */
  constructor(
    readonly cache: KVCache,
    handle: number,
    /** Tokens it holds. */
    readonly tokens: number,
    /** Host bytes it holds (tokens × bytes per token, every layer's K and V). */
    readonly bytes: number,
  ) {
    this.#handle = handle;
  }

  /** True once swapped in or discarded (or its cache closed). */
  get gone(): boolean {
    return this.#state === 'gone' || this.cache.closed;
  }

  /** Frees its host memory without swapping it in. Idempotent; refused while a swapIn of it runs. */
  discard(): void {
    if (this.#state === 'gone' || this.cache.closed) {
      this.#state = 'gone';
      return;
    }
    if (this.#state === 'swappingIn') throw new InvalidArgumentRangeError('swapped', 'a swapIn of it is running');
    SwappedSequence.native(this.cache).discardSwapped(this.#handle);
    this.#state = 'gone';
  }

  /** @internal Begins a swapIn: the handle, or a typed error. */
  static beginSwapIn(s: unknown, cache: KVCache): number {
    if (!(s instanceof SwappedSequence) || !(#handle in s))
      throw new InvalidArgumentTypeError('swapped', `must be a SwappedSequence from swapOut(), got ${describe(s)}`);
    if (s.cache !== cache) throw new ForeignSequenceError('the swapped sequence belongs to another cache');
    if (s.#state === 'gone') throw new InvalidArgumentRangeError('swapped', 'was swapped in or discarded already');
    if (s.#state === 'swappingIn') throw new InvalidArgumentRangeError('swapped', 'a swapIn of it is already running');
    s.#state = 'swappingIn';
    return s.#handle;
  }

  /** @internal */
  static endSwapIn(s: SwappedSequence, succeeded: boolean): void {
    s.#state = succeeded ? 'gone' : 'swapped';
  }

  /** @internal set by KVCache */
  static native: (cache: KVCache) => NativeCache;
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

/**
 * A KV cache whose per-layer K and V tensors are virtually contiguous and
 * backed by physical pages on demand. Emits {@link KVCacheEvents}.
 */
export class KVCache extends EventEmitter<KVCacheEvents> {
  readonly options: Readonly<NormalizedOptions>;
  readonly backend: 'cuda' | 'host';
  #native: NativeCache | null;
  #layout: NativeLayout;
  #budgetBytes: number | undefined; // the least device budget (fixed for the cache's life), read once
  #stepSlots = new Uint32Array(64);
  #stepGenerations = new Uint32Array(64);
  #stepTokens = new Uint32Array(64);
  #inStep = false;

  constructor(options: KVCacheOptions) {
    super();
    const o = normalizeOptions(options);
    const backend = o.backend === 'auto' ? autoBackend(o.device) : o.backend;
    try {
      this.#native = new addon.NativeCache({
        layers: o.layers,
        kvHeads: o.kvHeads,
        headDim: o.headDim,
        dtypeBytes: o.dtypeBytes,
        maxSequences: o.maxSequences,
        maxTokens: o.maxTokens,
        backend,
        devices: o.devices,
        pageSize: o.pageSize,
        memoryBudgets: o.memoryBudgets,
        prefillBytes: o.poolPrefill,
        prefetchTokens: o.prefetchTokens,
        layerGroups: o.layerGroups,
        idlePageGroups: o.idlePageGroups,
        hostMemoryBudget: o.hostMemoryBudget,
        hostMemoryPrefill: o.hostMemoryPrefill,
      });
    } catch (e) {
      throw fromNative(e);
    }
    this.#layout = this.#native.layout();
    this.backend = backend;
    this.options = Object.freeze({ ...o, backend });
    const workerError = this.#native.workerError();
    if (workerError !== null) process.nextTick(() => this.#emitSafely('prefetchError', { message: workerError }));
  }

  /** Bytes of one physical page. */
  get pageSize(): number {
    return this.#layout.pageSize;
  }

  /**
   * Bytes of one token in one tensor (kvHeads × headDim × dtype); over
   * several devices, in one device's shard (kvHeads / devices heads).
   */
  get tokenBytes(): number {
    return this.#layout.tokenBytes;
  }

  /** Bytes of one token across every layer's K and V (over several devices, on all of them together). */
  get bytesPerToken(): number {
    return this.#layout.bytesPerToken * this.#layout.devices.length;
  }

  /** The CUDA ordinals the cache spans (`options.devices`). */
  get devices(): readonly number[] {
    return this.options.devices;
  }

  get closed(): boolean {
    return this.#native === null;
  }

  /** Places a new sequence in a free slot. Throws ERR_NO_SLOT when all are taken. */
  reserve(options?: ReserveOptions): Sequence {
    const native = this.#open();
    const plan = this.#reservePlan(options);
    if (plan.share) {
      const { slot: s, generation: g, tokens, stream } = plan.share;
      const [slot, gen] = this.#call(() => native.share(s, g, tokens, true, stream));
      return new Sequence(this, slot, gen);
    }
    const [slot, generation] = this.#call(() => native.reserve(plan.expected));
    return new Sequence(this, slot, generation);
  }

  /**
   * {@link reserve} with the mapping of a `prefix` done on a worker thread:
   * sharing a long prefix maps every shared page again (~35 µs each on an
   * H100), which a serving loop should not wait for on its thread. Without
   * `prefix` it is `reserve()`.
   */
  async reserveAsync(options?: ReserveOptions): Promise<Sequence> {
    const native = this.#open();
    const plan = this.#reservePlan(options);
    if (!plan.share) return this.reserve(options);
    const { slot: s, generation: g, tokens, stream } = plan.share;
    const [slot, gen] = await this.#callAsync(() => native.shareAsync(s, g, tokens, true, stream));
    return new Sequence(this, slot, gen);
  }

  #reservePlan(options: unknown): { expected?: number; share?: { slot: number; generation: number; tokens: number; stream?: (bigint | undefined)[] } } {
    const o = checkObject('options', options, true, ['expectedTokens', 'prefix', 'stream', 'streams']);
    const expected =
      o.expectedTokens === undefined
        ? undefined
        : checkInteger('options.expectedTokens', o.expectedTokens, 0, this.options.maxTokens);
    if (o.prefix !== undefined) {
      const p = checkObject('options.prefix', o.prefix, false, ['from', 'tokens']);
      const generation = Sequence.reservedGeneration(p.from);
      if (generation === undefined)
        throw new InvalidArgumentTypeError('options.prefix.from', `must be a Sequence from reserve(), got ${describe(p.from)}`);
      const from = p.from as Sequence;
      if (from.cache !== this) throw new ForeignSequenceError(`the sequence in slot ${from.slot} belongs to another cache`);
      const tokens = checkInteger('options.prefix.tokens', p.tokens, 0, this.options.maxTokens);
      const stream = this.#streamsOption(o);
      return { expected, share: { slot: from.slot, generation, tokens, stream } };
    }
    if (o.stream !== undefined) throw new InvalidArgumentRangeError('options.stream', 'only applies with options.prefix');
    if (o.streams !== undefined) throw new InvalidArgumentRangeError('options.streams', 'only applies with options.prefix');
    return { expected };
  }

  /** Runs a native call that returns a promise; errors (thrown or rejected) become the library's classes. */
  async #callAsync<T>(fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      throw fromNative(e);
    }
  }

  /**
   * A new sequence holding the same tokens as `seq`, in a free slot, without
   * copying them: every whole page group of `seq` is mapped into the new
   * slot from the same physical pages, and only the last, partial group is
   * copied into new pages (on `options.stream` when given). KV is
   * append-only, so the two then grow independently; tokens before the fork
   * must not be written again through either (both would see it). Releasing
   * either leaves the other intact; a page goes back to the pool when its
   * last mapping does. All or nothing (ERR_OUT_OF_MEMORY, ERR_NO_SLOT).
   */
  fork(seq: Sequence, options?: ForkOptions): Sequence {
    const native = this.#open();
    const generation = this.#check(seq);
    const o = checkObject('options', options, true, FORK_KEYS);
    const stream = this.#streamsOption(o);
    const [tokens, copyLast] = this.#forkTokens(native, seq, generation, o.tokens);
    const [slot, gen] = this.#call(() => native.share(seq.slot, generation, tokens, false, stream, copyLast));
    return new Sequence(this, slot, gen);
  }

  /** {@link fork} with the mapping done on a worker thread (see {@link reserveAsync}). */
  async forkAsync(seq: Sequence, options?: ForkOptions): Promise<Sequence> {
    const native = this.#open();
    const generation = this.#check(seq);
    const o = checkObject('options', options, true, FORK_KEYS);
    const stream = this.#streamsOption(o);
    const [tokens, copyLast] = this.#forkTokens(native, seq, generation, o.tokens);
    const [slot, gen] = await this.#callAsync(() => native.shareAsync(seq.slot, generation, tokens, false, stream, copyLast));
    return new Sequence(this, slot, gen);
  }

  /** The tokens a fork shares and whether its last backed token's group is copied (the default). */
  #forkTokens(native: NativeCache, seq: Sequence, generation: number, tokens: unknown): [number, boolean] {
    const backed = this.#call(() => native.tokens(seq.slot, generation));
    if (tokens === undefined) return [backed, true];
    return [checkInteger('options.tokens', tokens, 0, backed), false];
  }

  #stream(name: string, stream: unknown): bigint | undefined {
    if (stream === undefined) return undefined;
    if (typeof stream !== 'bigint') throw new InvalidArgumentTypeError(name, `must be a bigint (CUstream), got ${describe(stream)}`);
    if (stream < 0n || stream >= 1n << 64n) throw new InvalidArgumentRangeError(name, `must be a 64-bit address, got ${stream}`);
    return stream;
  }

  /**
   * Makes the first `tokens` tokens of `seq` backed in every layer's K and V.
   * All or nothing: on ERR_OUT_OF_MEMORY the cache is as before the call.
   */
  grow(seq: Sequence, tokens: number): void {
    const native = this.#open();
    const generation = this.#check(seq);
    if (typeof tokens !== 'number') throw new InvalidArgumentTypeError('tokens', `must be a number, got ${describe(tokens)}`);
    if (!Number.isInteger(tokens) || tokens < 0) throw new InvalidArgumentRangeError('tokens', `must be a non-negative integer, got ${tokens}`);
    this.#afterGrowth('grow', this.#call(() => native.grow(seq.slot, generation, tokens), 'grow'));
  }

  /**
   * One decode (or prefill) iteration of a batch: when it returns,
   * `seqs[i]` has `tokens[i]` tokens backed (all or nothing across the batch),
   * and the prefetch worker maps ahead up to `tokens[i] + prefetchTokens`
   * while the GPU computes. With prefetch keeping up, no driver call happens
   * on the calling thread.
   */
  step(seqs: readonly Sequence[], tokens: readonly number[] | number): void {
    const native = this.#open();
    // The arguments are read into shared scratch arrays; a getter on them
    // that called step() again would overwrite the entries being read.
    if (this.#inStep) throw new ReentrantCallError('step() was called from inside step() (a getter or proxy on its arguments)');
    this.#inStep = true;
    let n: number;
    try {
      n = this.#fillStep(seqs, tokens);
    } finally {
      this.#inStep = false;
    }
    const reclaimed = this.#call(() => native.step(this.#stepSlots, this.#stepGenerations, this.#stepTokens, n), 'step');
    this.#afterGrowth('step', reclaimed);
  }

  /**
   * {@link step} that never maps on the calling thread: when every entry is
   * backed already (the steady state, with prefetch keeping up) it completes
   * at once, as `step()` would; when a page is missing — a sequence past its
   * look-ahead, the retry after a preemption — the mapping runs on a worker
   * thread and the promise resolves once the batch is backed, so the event
   * loop is never held up by driver calls. All or nothing, like `step()`.
   */
  async stepAsync(seqs: readonly Sequence[], tokens: readonly number[] | number): Promise<void> {
    const native = this.#open();
    if (this.#inStep) throw new ReentrantCallError('stepAsync() was called from inside step() (a getter or proxy on its arguments)');
    this.#inStep = true;
    let n: number;
    try {
      n = this.#fillStep(seqs, tokens);
    } finally {
      this.#inStep = false;
    }
    if (this.#call(() => native.stepIfBacked(this.#stepSlots, this.#stepGenerations, this.#stepTokens, n), 'step')) return;
    let reclaimed: number;
    try {
      reclaimed = await this.#callAsync(() => native.stepAsync(this.#stepSlots, this.#stepGenerations, this.#stepTokens, n));
    } catch (e) {
      throw this.#noteOutOfMemory(e, 'step');
    }
    this.#afterGrowth('step', reclaimed);
  }

  /** Checks step()'s arguments into the reused scratch arrays; returns the entries. */
  #fillStep(seqs: readonly Sequence[], tokens: readonly number[] | number): number {
    if (!Array.isArray(seqs)) throw new InvalidArgumentTypeError('seqs', `must be an array of Sequence, got ${describe(seqs)}`);
    const n = seqs.length;
    if (typeof tokens !== 'number' && !Array.isArray(tokens))
      throw new InvalidArgumentTypeError('tokens', `must be a number or an array of numbers, got ${describe(tokens)}`);
    if (Array.isArray(tokens) && tokens.length !== n)
      throw new InvalidArgumentRangeError('tokens', `has ${tokens.length} entries for ${n} sequences`);
    if (this.#stepSlots.length < n) {
      const size = Math.max(n, this.#stepSlots.length * 2);
      this.#stepSlots = new Uint32Array(size);
      this.#stepGenerations = new Uint32Array(size);
      this.#stepTokens = new Uint32Array(size);
    }
    for (let i = 0; i < n; i++) {
      const seq = seqs[i]!;
      const generation = this.#check(seq);
      const t = typeof tokens === 'number' ? tokens : tokens[i];
      if (typeof t !== 'number') throw new InvalidArgumentTypeError(`tokens[${i}]`, `must be a number, got ${describe(t)}`);
      if (!Number.isInteger(t) || t < 0 || t > 0xffff_ffff)
        throw new InvalidArgumentRangeError(`tokens[${i}]`, `must be a non-negative integer, got ${t}`);
      this.#stepSlots[i] = seq.slot;
      this.#stepGenerations[i] = generation;
      this.#stepTokens[i] = t;
    }
    return n;
  }

  /**
   * {@link grow} with the mapping done on a worker thread, for prefills large
   * enough that mapping them on the JS thread would hold up the event loop.
   * All or nothing. Rejects with ERR_ABORTED when `signal` aborts first, and
   * with ERR_CLOSED when the cache is closed first.
   */
  async growAsync(seq: Sequence, tokens: number, options?: GrowAsyncOptions): Promise<void> {
    const native = this.#open();
    const generation = this.#check(seq);
    if (typeof tokens !== 'number') throw new InvalidArgumentTypeError('tokens', `must be a number, got ${describe(tokens)}`);
    if (!Number.isInteger(tokens) || tokens < 0) throw new InvalidArgumentRangeError('tokens', `must be a non-negative integer, got ${tokens}`);
    const o = checkObject('options', options, true, ['signal']);
    const signal = o.signal;
    if (signal !== undefined && !(signal instanceof AbortSignal))
      throw new InvalidArgumentTypeError('options.signal', `must be an AbortSignal, got ${describe(signal)}`);
    if (signal?.aborted) throw new AbortedError('the growth was aborted before it started');
    const [promise, cancel] = this.#call(() => native.growAsync(seq.slot, generation, tokens));
    signal?.addEventListener('abort', cancel, { once: true });
    try {
      await promise;
    } catch (e) {
      throw this.#noteOutOfMemory(fromNative(e), 'growAsync');
    } finally {
      signal?.removeEventListener('abort', cancel);
    }
    // Released (or swapped out) while the growth ran: nothing is backed for
    // the caller, who must not go on as if it were.
    if (this.closed) throw new ClosedError('the KV cache was closed during growAsync');
    if (seq.released) throw new SequenceReleasedError(`the sequence in slot ${seq.slot} was released during growAsync`);
  }

  /** Frees the sequence's slot. Its pages stay mapped for the next sequence placed there. */
  release(seq: Sequence, options?: ReleaseOptions): void {
    const native = this.#open();
    const generation = this.#check(seq);
    const streams = this.#streamsOption(checkObject('options', options, true, STREAM_KEYS));
    this.#call(() => native.release(seq.slot, generation, streams));
    Sequence.markReleased(seq);
  }

  /** `stream` (one device) or `streams` (one per device) of an options object, checked; undefined for none. */
  #streamsOption(o: Record<string, unknown>): (bigint | undefined)[] | undefined {
    const devices = this.options.devices.length;
    if (o.stream !== undefined && o.streams !== undefined)
      throw new InvalidArgumentRangeError('options', 'give stream or streams, not both');
    if (o.streams === undefined) {
      const stream = this.#stream('options.stream', o.stream);
      if (stream !== undefined && devices > 1)
        throw new InvalidArgumentRangeError('options.stream', `names one stream for ${devices} devices: pass streams, one per device`);
      return stream === undefined ? undefined : [stream];
    }
    if (!Array.isArray(o.streams))
      throw new InvalidArgumentTypeError('options.streams', `must be an array of bigint (CUstream), got ${describe(o.streams)}`);
    if (o.streams.length !== devices)
      throw new InvalidArgumentRangeError('options.streams', `must have one entry per device (${devices}), got ${o.streams.length}`);
    return o.streams.map((s, i) => this.#stream(`options.streams[${i}]`, s));
  }

  /**
   * Unmaps pages of released slots back to the pool: at least `bytes` (rounded
   * up to pages and page groups), or all of them. Returns the bytes unmapped.
   */
  reclaim(bytes?: number | bigint): number {
    const native = this.#open();
    const b = bytes === undefined ? undefined : checkBytes('bytes', bytes, 0n);
    if (b === 0n) return 0;
    return this.#call(() => native.reclaim(b === undefined || b > BigInt(Number.MAX_SAFE_INTEGER) ? undefined : Number(b)));
  }

  /**
   * Preemption by swapping: copies the sequence's tokens (every layer's K
   * and V) to host memory, on a stream of the library's own and a worker
   * thread, then releases the sequence (its slot and pages go to others as
   * with {@link release}). The sequence is unusable from the call on
   * (ERR_SEQUENCE_RELEASED). Host memory counts against `hostMemoryBudget`
   * (ERR_OUT_OF_MEMORY past it). On failure the sequence is as it was.
   */
  async swapOut(seq: Sequence, options?: SwapOutOptions): Promise<SwappedSequence> {
    const native = this.#open();
    const generation = this.#check(seq);
    const streams = this.#streamsOption(checkObject('options', options, true, STREAM_KEYS));
    // The tokens the copy holds, not those before the call: a growth still
    // running (growAsync) ends before the copy starts.
    const [handle, tokens] = await this.#callAsync(() => native.swapOut(seq.slot, generation, streams));
    Sequence.markReleased(seq);
    return new SwappedSequence(this, handle, tokens, tokens * this.bytesPerToken);
  }

  /**
   * A swapped-out sequence back in device memory: a new {@link Sequence}
   * (any free slot) holding the same tokens, byte for byte. Mapping and
   * copying run on a worker thread. All or nothing: on ERR_OUT_OF_MEMORY or
   * ERR_NO_SLOT nothing changed and `swapped` can be swapped in later.
   */
  async swapIn(swapped: SwappedSequence): Promise<Sequence> {
    const native = this.#open();
    const handle = SwappedSequence.beginSwapIn(swapped, this);
    let ok = false;
    try {
      const [slot, generation] = await this.#callAsync(() => native.swapIn(handle));
      ok = true;
      return new Sequence(this, slot, generation);
    } finally {
      SwappedSequence.endSwapIn(swapped, ok);
    }
  }

  /**
   * Gives every physical page back to the driver (`cuMemGetInfo` shows the
   * memory free) while the virtual ranges, `tensor()` and `seq.address()`
   * values stay valid — for lending the GPU to other work between serving
   * phases. Released slots' pages and the look-ahead are not kept. Until
   * {@link resume}, anything that needs memory (grow, step, growAsync, fork,
   * write, read, swap) fails with ERR_SUSPENDED; reserve, release, stats
   * and close work. Kernels must not touch the cache meanwhile.
   */
  async suspend(options?: SuspendOptions): Promise<void> {
    const native = this.#open();
    const o = checkObject('options', options, true, ['keep']);
    const keep = o.keep ?? 'none';
    if (keep !== 'none' && keep !== 'host') {
      if (typeof keep !== 'string') throw new InvalidArgumentTypeError('options.keep', `must be 'none' or 'host', got ${describe(keep)}`);
      throw new InvalidArgumentRangeError('options.keep', `must be 'none' or 'host', got '${keep}'`);
    }
    await this.#callAsync(() => native.suspend(keep === 'host'));
  }

  /**
   * Backs the addresses of a suspended cache again (with the bytes when
   * suspended with `keep: 'host'`). All or nothing: on ERR_OUT_OF_MEMORY (the
   * GPU is still in use by others) it stays suspended and can be resumed
   * later. Resolves at once when not suspended.
   */
  async resume(): Promise<void> {
    const native = this.#open();
    await this.#callAsync(() => native.resume());
  }

  /** True while suspended ({@link suspend}). */
  get suspended(): boolean {
    const native = this.#native;
    return native !== null && this.options.devices.some((_, i) => native.stats(i).suspended);
  }

  /**
   * Gives the pool's unmapped pages back to the driver, and the idle host
   * blocks of swap and suspend to the OS. Returns the bytes freed (both).
   */
  trim(): number {
    const native = this.#open();
    return this.#call(() => native.trim());
  }

  /** Copies whole tokens into the sequence, starting at `range.token`. */
  write(seq: Sequence, range: TokenRange, data: ArrayBufferView): void {
    const native = this.#open();
    const generation = this.#check(seq);
    const { layer, kind, token } = this.#range(range, ['layer', 'kind', 'token', 'device']);
    if (!ArrayBuffer.isView(data))
      throw new InvalidArgumentTypeError('data', `must be a TypedArray, Buffer or DataView, got ${describe(data)}`);
    const bytes = bytesOf('data', data);
    this.#checkWhole('data.byteLength', bytes.byteLength);
    const device = this.#deviceIndex('range.device', (range as TokenRange).device);
    this.#call(() => native.write(seq.slot, generation, layer, kind, token, bytes, device));
  }

  /** Copies `count` tokens out of the sequence (into `into` when given). */
  read(seq: Sequence, range: ReadRange, into?: ArrayBufferView): Uint8Array {
    const native = this.#open();
    const generation = this.#check(seq);
    const { layer, kind, token } = this.#range(range, ['layer', 'kind', 'token', 'count', 'device']);
    const count = checkInteger('range.count', (range as ReadRange).count, 0, this.options.maxTokens);
    const device = this.#deviceIndex('range.device', (range as ReadRange).device);
    // Checked before allocating: a read past the sequence allocates nothing.
    const have = this.#call(() => native.tokens(seq.slot, generation));
    if (token + count > have)
      throw new OutOfRangeError(`tokens [${token}, ${token + count}) are past the sequence's ${have} backed tokens`);
    const length = count * this.tokenBytes;
    let out: Uint8Array;
    if (into === undefined) out = allocate(length);
    else {
      if (!ArrayBuffer.isView(into))
        throw new InvalidArgumentTypeError('into', `must be a TypedArray, Buffer or DataView, got ${describe(into)}`);
      const view = bytesOf('into', into);
      if (view.byteLength < length)
        throw new InvalidArgumentRangeError('into', `holds ${view.byteLength} bytes, ${length} needed`);
      out = view.subarray(0, length);
    }
    this.#call(() => native.read(seq.slot, generation, layer, kind, token, out, device));
    return out;
  }

  /** Tokens grown so far by `seq`. */
  tokens(seq: Sequence): number {
    const native = this.#open();
    const generation = this.#check(seq);
    return this.#call(() => native.tokens(seq.slot, generation));
  }

  /**
   * One layer's K or V tensor: address, shape and strides for a kernel. Over
   * several devices, that of `options.device`'s shard (its kvHeads / devices
   * heads, in that device's address space).
   */
  tensor(layer: number, kind: KVKind, options?: DeviceOption): TensorInfo {
    this.#open();
    checkInteger('layer', layer, 0, this.options.layers - 1);
    const k = checkKind('kind', kind);
    const device = this.#deviceIndex('options.device', checkObject('options', options, true, ['device']).device);
    const t = this.#layout.tensors[2 * layer + k]!;
    const o = this.options;
    const strides = t.strideElements as [number, number, number, number];
    return {
      layer,
      kind,
      address: this.#layout.bases[device]! + t.offset,
      shape: [o.maxSequences, o.maxTokens, o.kvHeads / o.devices.length, o.headDim],
      strides: [...strides],
      strideBytes: strides.map((s) => s * o.dtypeBytes) as [number, number, number, number],
      dtype: o.dtype,
    };
  }

  /** Every layer's K and V tensors (of `options.device`'s shard). */
  tensors(options?: DeviceOption): { k: TensorInfo; v: TensorInfo }[] {
    const out = [];
    for (let layer = 0; layer < this.options.layers; layer++)
      out.push({ k: this.tensor(layer, 'k', options), v: this.tensor(layer, 'v', options) });
    return out;
  }

  /** Address of the sequence's token 0 in one layer's K or V (of `options.device`'s shard). */
  sequenceAddress(seq: Sequence, layer: number, kind: KVKind, options?: DeviceOption): bigint {
    this.#open();
    this.#check(seq);
    const t = this.tensor(layer, kind, options);
    return t.address + BigInt(seq.slot) * BigInt(t.strideBytes[0]);
  }

  /**
   * The figures of the whole cache; over several devices, added up, with
   * each device's own in `devices`.
   */
  stats(): CacheStats {
    const native = this.#open();
    const layout = this.layout;
    const perDevice: DeviceStats[] = this.options.devices.map((device, i) => ({
      ...this.#call(() => native.stats(i)),
      layout,
      device,
    }));
    const { device: _first, ...total } = sumDeviceStats(perDevice);
    return { ...total, devices: perDevice };
  }

  /** The tensor arrangement in use and the size of its page group (what one mapping step adds to a sequence). */
  get layout(): LayoutStats {
    const l = this.#layout;
    return {
      name: l.layout,
      layerGroups: l.layerGroups,
      pagesPerPageGroup: l.pagesPerGroup,
      bytesPerPageGroup: l.pagesPerGroup * l.pageSize,
      tokensPerPageGroup: l.pageSize / l.tokenPitch,
    };
  }

  /**
   * Bytes a growth could get now: idle pool pages, pages the budget still
   * allows, and pages reclaimable from prefetched tails and released slots
   * (including those waiting for a fence). A scheduler compares it with
   * `tokens × bytesPerToken` (rounded up to page groups) before admitting a
   * sequence. O(slots), no driver call.
   *
   * With `{ lookAhead: false }`, less the look-ahead the prefetch worker
   * mapped for running sequences: what the worker can still map ahead
   * without taking it from another. When it nears zero, the next growth of a
   * running sequence past its look-ahead maps on the calling thread; a
   * scheduler that preempts a sequence then (release it, swap it out) lets
   * the worker move its pages to the others ahead of need.
   */
  /**
   * Bytes of physical pages a sequence of `tokens` tokens is backed with on
   * each device (whole page groups): what it takes of `memoryBudget`.
   */
  bytesForTokens(tokens: number): number {
    this.#open();
    checkInteger('tokens', tokens, 0, this.options.maxTokens);
    const l = this.#layout;
    return Math.ceil((tokens * l.tokenPitch) / l.pageSize) * l.pagesPerGroup * l.pageSize;
  }

  /**
   * Whether a sequence of `tokens` tokens fits in the memory budget at all,
   * whatever else is running (false past `maxTokens` too): a request for
   * which this is false can never be served and should be rejected at
   * admission, not queued.
   */
  fits(tokens: number): boolean {
    this.#open();
    checkInteger('tokens', tokens, 0, Number.MAX_SAFE_INTEGER);
    if (tokens > this.options.maxTokens) return false;
    const bytes = this.bytesForTokens(tokens);
    this.#budgetBytes ??= Math.min(...this.stats().devices.map((d) => d.budgetBytes));
    return bytes <= this.#budgetBytes;
  }

  obtainableBytes(options?: { lookAhead?: boolean }): number {
    const native = this.#open();
    const o = checkObject('options', options, true, ['lookAhead']);
    if (o.lookAhead !== undefined && typeof o.lookAhead !== 'boolean')
      throw new InvalidArgumentTypeError('options.lookAhead', `must be a boolean, got ${describe(o.lookAhead)}`);
    return this.#call(() => native.obtainableBytes(o.lookAhead !== false));
  }

  /**
   * The statistics as Prometheus text exposition (bytes backed and used,
   * pages by state, driver calls and their time by kind, prefetch hits and
   * misses, critical-path stall time), ready to serve on a /metrics route.
   */
  metrics(options?: MetricsOptions): string {
    return formatPrometheus(this.stats(), options);
  }

  /**
   * Unmaps and frees everything and gives the virtual range back. Idempotent.
   * Waits for GPU work fenced by release({ stream }).
   */
  close(): void {
    const native = this.#native;
    if (native === null) return;
    this.#native = null;
    native.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  /**
   * @internal Test-only: make the nth next backend call of `op` fail
   * (`true`/'outOfMemory', `false`/'error', or 'hostAlloc'), after `delayMs`,
   * on `device` (an ordinal of `options.devices`; default the first).
   * Several faults may be armed at once.
   */
  _injectFault(op: string, nth: number, kind: boolean | FaultKind, delayMs = 0, device?: number): void {
    const native = this.#open();
    const k: FaultKind = kind === true ? 'outOfMemory' : kind === false ? 'error' : kind;
    this.#call(() => native.injectFault(op, nth, k, delayMs, this.#deviceIndex('device', device)));
  }

  #open(): NativeCache {
    if (this.#native === null) throw new ClosedError();
    return this.#native;
  }

  static {
    SwappedSequence.native = (cache) => cache.#open();
  }

  /** Checks a sequence argument; returns its generation. */
  #check(seq: unknown): number {
    const generation = Sequence.generationOf(seq);
    if (generation === undefined) throw new InvalidArgumentTypeError('seq', `must be a Sequence from reserve(), got ${describe(seq)}`);
    if ((seq as Sequence).cache !== this)
      throw new ForeignSequenceError(`the sequence in slot ${(seq as Sequence).slot} belongs to another cache`);
    if (generation < 0) throw new SequenceReleasedError(`the sequence in slot ${(seq as Sequence).slot} was released`);
    return generation;
  }

  /** The index in `options.devices` of a device ordinal (the first when undefined). */
  #deviceIndex(name: string, device: unknown): number {
    if (device === undefined) return 0;
    checkInteger(name, device, 0, 1023);
    const i = this.options.devices.indexOf(device as number);
    if (i < 0) throw new InvalidArgumentRangeError(name, `(${String(device)}) is not one of the cache's devices [${this.options.devices.join(', ')}]`);
    return i;
  }

  #range(range: unknown, keys: readonly string[]): { layer: number; kind: 0 | 1; token: number } {
    const r = checkObject('range', range, false, keys);
    return {
      layer: checkInteger('range.layer', r.layer, 0, this.options.layers - 1),
      kind: checkKind('range.kind', r.kind),
      token: checkInteger('range.token', r.token, 0, this.options.maxTokens),
    };
  }

  #checkWhole(name: string, byteLength: number): void {
    if (byteLength % this.tokenBytes !== 0)
      throw new InvalidArgumentRangeError(
        name,
        `${byteLength} is not a whole number of tokens (${this.tokenBytes} bytes each)`,
      );
  }

  #call<T>(fn: () => T, operation?: 'grow' | 'step'): T {
    try {
      return fn();
    } catch (e) {
      const error = fromNative(e);
      throw operation ? this.#noteOutOfMemory(error, operation) : error;
    }
  }

  #noteOutOfMemory(error: unknown, operation: 'grow' | 'step' | 'growAsync'): unknown {
    if (error instanceof OutOfMemoryError && this.listenerCount('outOfMemory') > 0)
      this.#emitSafely('outOfMemory', { operation, requestedBytes: error.requestedBytes, availableBytes: error.availableBytes });
    return error;
  }

  #afterGrowth(operation: 'grow' | 'step', reclaimedPages: number): void {
    if (reclaimedPages > 0 && this.listenerCount('reclaim') > 0)
      this.#emitSafely('reclaim', { operation, pages: reclaimedPages, bytes: reclaimedPages * this.pageSize });
  }

  /**
   * Events report what an operation did; a listener that throws must not
   * turn the operation's result into an error (the growth is committed by
   * then). Its exception is rethrown on its own, as an uncaught exception,
   * where the application's handlers see it.
   */
  #emitSafely<K extends keyof KVCacheEvents>(event: K, ...args: KVCacheEvents[K]): void {
    try {
      (this.emit as (e: K, ...a: KVCacheEvents[K]) => boolean)(event, ...args);
    } catch (listenerError) {
      queueMicrotask(() => {
        throw listenerError;
      });
    }
  }
}

/**
 * A byte view of a TypedArray, Buffer or DataView. A view over a detached
 * ArrayBuffer (transferred, or its worker gone) is refused with a code
 * instead of the engine's bare TypeError.
 */
function bytesOf(name: string, view: ArrayBufferView): Uint8Array {
  try {
    return new Uint8Array(view.buffer, view.byteOffset, view.byteLength);
  } catch {
    throw new InvalidArgumentTypeError(name, 'is a view over a detached ArrayBuffer');
  }
}

/** A new buffer for read(); the host running out of memory is ERR_OUT_OF_MEMORY like any other. */
function allocate(bytes: number): Uint8Array {
  try {
    return new Uint8Array(bytes);
  } catch {
    throw new OutOfMemoryError(`cannot allocate ${bytes} bytes of host memory for the read`, bytes, 0);
  }
}
