/**
 * The public KV cache: a table of contents. Each method is documented here
 * and done in lib/ops/ (placement, growth, moves, data, figures) over the
 * cache's private CacheContext; the native object stays behind it. Policy
 * lives in the native core (native/core/).
 */
import { EventEmitter } from 'node:events';
import type {
  DeviceOption,
  ForkOptions,
  GrowAsyncOptions,
  KVCacheEvents,
  PublishOptions,
  ReadRange,
  ReleaseOptions,
  ReserveOptions,
  SuspendOptions,
  SwapOutOptions,
  TensorInfo,
  TokenIds,
  TokenRange,
} from './call-options.js';
import { fromNative } from './errors.js';
import { autoBackend } from './info.js';
import { type MetricsOptions, formatPrometheus } from './metrics.js';
import { addon, type FaultKind, type NativeCache } from './native.js';
import { CacheContext } from './ops/context.js';
import * as bytes from './ops/data.js';
import * as figures from './ops/figures.js';
import * as growth from './ops/growth.js';
import * as moves from './ops/moves.js';
import * as placement from './ops/placement.js';
import { type KVCacheOptions, type KVKind, type NormalizedOptions, normalizeOptions } from './options.js';
import type { Sequence, SwappedSequence } from './sequence.js';
import type { CacheStats, LayoutStats } from './stats.js';

/**
 * A KV cache whose per-layer K and V tensors are virtually contiguous and
 * backed by physical pages on demand. Emits {@link KVCacheEvents}.
 */
export class KVCache extends EventEmitter<KVCacheEvents> {
  readonly options: Readonly<NormalizedOptions>;
  readonly backend: 'cuda' | 'host';
  #ctx: CacheContext;
  #step = new growth.StepBatch();

  constructor(options: KVCacheOptions) {
    super();
    const o = normalizeOptions(options);
    const backend = o.backend === 'auto' ? autoBackend(o.device) : o.backend;
    const native = openNative(o, backend);
    this.backend = backend;
    // a defaulted budget (0n) as the figure the cache chose
    const budgets = o.devices.map((_, i) => BigInt(native.stats(i).budgetBytes));
    this.options = Object.freeze({ ...o, backend, memoryBudget: budgets[0]!, memoryBudgets: budgets });
    this.#ctx = new CacheContext(this, native, native.layout(), this.options);
    const workerError = native.workerError();
    if (workerError !== null) process.nextTick(() => this.#ctx.emitSafely('prefetchError', { message: workerError }));
  }

  // ---- shape ----------------------------------------------------------------

  /** Bytes of one physical page. */
  get pageSize(): number {
    return this.#ctx.layout.pageSize;
  }

  /**
   * Bytes of one token in one tensor (kvHeads × headDim × dtype); over
   * several devices, in one device's shard (kvHeads / devices heads).
   */
  get tokenBytes(): number {
    return this.#ctx.tokenBytes;
  }

  /** Bytes of one token across every layer's K and V (over several devices, on all of them together). */
  get bytesPerToken(): number {
    return this.#ctx.layout.bytesPerToken * this.#ctx.layout.devices.length;
  }

  /** The CUDA ordinals the cache spans (`options.devices`). */
  get devices(): readonly number[] {
    return this.options.devices;
  }

  get closed(): boolean {
    return this.#ctx.native === null;
  }

  /** The tensor arrangement in use and the size of its page group (what one mapping step adds to a sequence). */
  get layout(): LayoutStats {
    return figures.layout(this.#ctx);
  }

  // ---- placement (ops/placement.ts) -------------------------------------------

  /** Places a new sequence in a free slot. Throws ERR_NO_SLOT when all are taken. */
  reserve(options?: ReserveOptions): Sequence {
    return placement.reserve(this.#ctx, options);
  }

  /**
   * {@link reserve} with the mapping of a `prefix` done on a worker thread:
   * sharing a long prefix maps every shared page again (~35 µs each on an
   * H100), which a serving loop should not wait for on its thread. Without
   * `prefix` it is `reserve()`.
   */
  reserveAsync(options?: ReserveOptions): Promise<Sequence> {
    return placement.reserveAsync(this.#ctx, options);
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
    return placement.fork(this.#ctx, seq, options);
  }

  /** {@link fork} with the mapping done on a worker thread (see {@link reserveAsync}). */
  forkAsync(seq: Sequence, options?: ForkOptions): Promise<Sequence> {
    return placement.forkAsync(this.#ctx, seq, options);
  }

  /**
   * Automatic prefix caching: declares that the first `tokens.length` tokens
   * of `seq` hold the KV of these token ids (call it once that KV is written:
   * after the prefill, and again as decoding goes on, each time with every id
   * from the first). From then on its whole page groups are found by later
   * `reserve({ tokens })` calls, while it runs and after it is released, until
   * their pages are reclaimed (least recently used first, when memory is
   * needed). Ids past `seq.tokens` are ERR_OUT_OF_RANGE; ids that contradict
   * what the sequence published or got from the cache before are
   * ERR_INVALID_ARGUMENT.
   */
  publish(seq: Sequence, tokens: TokenIds, options?: PublishOptions): void {
    placement.publish(this.#ctx, seq, tokens, options);
  }

  /** Frees the sequence's slot. Its pages stay mapped for the next sequence placed there. */
  release(seq: Sequence, options?: ReleaseOptions): void {
    placement.release(this.#ctx, seq, options);
  }

  // ---- growth (ops/growth.ts) ---------------------------------------------------

  /**
   * Makes the first `tokens` tokens of `seq` backed in every layer's K and V.
   * All or nothing: on ERR_OUT_OF_MEMORY the cache is as before the call.
   */
  grow(seq: Sequence, tokens: number): void {
    growth.grow(this.#ctx, seq, tokens);
  }

  /**
   * One decode (or prefill) iteration of a batch: when it returns,
   * `seqs[i]` has `tokens[i]` tokens backed (all or nothing across the batch),
   * and the prefetch worker maps ahead up to `tokens[i] + prefetchTokens`
   * while the GPU computes. With prefetch keeping up, no driver call happens
   * on the calling thread.
   */
  step(seqs: readonly Sequence[], tokens: readonly number[] | number): void {
    growth.step(this.#ctx, this.#step, seqs, tokens);
  }

  /**
   * {@link step} that never maps on the calling thread: when every entry is
   * backed already (the steady state, with prefetch keeping up) it completes
   * at once, as `step()` would; when a page is missing — a sequence past its
   * look-ahead, the retry after a preemption — the mapping runs on a worker
   * thread and the promise resolves once the batch is backed, so the event
   * loop is never held up by driver calls. All or nothing, like `step()`.
   */
  stepAsync(seqs: readonly Sequence[], tokens: readonly number[] | number): Promise<void> {
    return growth.stepAsync(this.#ctx, this.#step, seqs, tokens);
  }

  /**
   * {@link grow} with the mapping done on a worker thread, for prefills large
   * enough that mapping them on the JS thread would hold up the event loop.
   * All or nothing. Rejects with ERR_ABORTED when `signal` aborts first, and
   * with ERR_CLOSED when the cache is closed first.
   */
  growAsync(seq: Sequence, tokens: number, options?: GrowAsyncOptions): Promise<void> {
    return growth.growAsync(this.#ctx, seq, tokens, options);
  }

  // ---- moving memory (ops/moves.ts) ---------------------------------------------

  /**
   * Unmaps pages of released slots back to the pool: at least `bytes` (rounded
   * up to pages and page groups), or all of them. Returns the bytes unmapped.
   */
  reclaim(bytes?: number | bigint): number {
    return moves.reclaim(this.#ctx, bytes);
  }

  /**
   * Gives the pool's unmapped pages back to the driver, and the idle host
   * blocks of swap and suspend to the OS. Returns the bytes freed (both).
   * While `suspend()` or `resume()` moves pages it frees nothing and returns
   * 0 (it does not block the caller for the move): call it again after.
   */
  trim(): number {
    return moves.trim(this.#ctx);
  }

  /**
   * Preemption by swapping: copies the sequence's tokens (every layer's K
   * and V) to host memory, on a stream of the library's own and a worker
   * thread, then releases the sequence (its slot and pages go to others as
   * with {@link release}). The sequence is unusable from the call on
   * (ERR_SEQUENCE_RELEASED). Host memory counts against `hostMemoryBudget`
   * (ERR_OUT_OF_MEMORY past it). On failure the sequence is as it was.
   */
  swapOut(seq: Sequence, options?: SwapOutOptions): Promise<SwappedSequence> {
    return moves.swapOut(this.#ctx, seq, options);
  }

  /**
   * A swapped-out sequence back in device memory: a new {@link Sequence}
   * (any free slot) holding the same tokens, byte for byte. Mapping and
   * copying run on a worker thread. All or nothing: on ERR_OUT_OF_MEMORY or
   * ERR_NO_SLOT nothing changed and `swapped` can be swapped in later.
   */
  swapIn(swapped: SwappedSequence): Promise<Sequence> {
    return moves.swapIn(this.#ctx, swapped);
  }

  /**
   * Gives every physical page back to the driver (`cuMemGetInfo` shows the
   * memory free) while the virtual ranges, `tensor()` and `seq.address()`
   * values stay valid — for lending the GPU to other work between serving
   * phases. Released slots' pages and the look-ahead are not kept. Until
   * {@link resume}, anything that needs memory (grow, step, growAsync, fork,
   * write, read, swap) fails with ERR_SUSPENDED; reserve, release, stats
   * and close work. Kernels must not touch the cache meanwhile.
   * The pages go one at a time (and the host copy is made) with the cache's
   * lock released: stats(), reserve() and release() called meanwhile wait
   * for one page's driver calls at most, not for the whole suspend; a
   * sequence released meanwhile has its pages dropped when the suspend ends;
   * close() meanwhile stops it at the next page (ERR_CLOSED). The same holds
   * for {@link resume}.
   */
  suspend(options?: SuspendOptions): Promise<void> {
    return moves.suspend(this.#ctx, options);
  }

  /**
   * Backs the addresses of a suspended cache again (with the bytes when
   * suspended with `keep: 'host'`). All or nothing: on ERR_OUT_OF_MEMORY (the
   * GPU is still in use by others) it stays suspended and can be resumed
   * later. Resolves at once when not suspended.
   */
  resume(): Promise<void> {
    return moves.resume(this.#ctx);
  }

  /** True while suspended ({@link suspend}). */
  get suspended(): boolean {
    return moves.suspended(this.#ctx);
  }

  // ---- the bytes (ops/data.ts) ----------------------------------------------------

  /** Copies whole tokens into the sequence, starting at `range.token`. */
  write(seq: Sequence, range: TokenRange, data: ArrayBufferView): void {
    bytes.write(this.#ctx, seq, range, data);
  }

  /** Copies `count` tokens out of the sequence (into `into` when given). */
  read(seq: Sequence, range: ReadRange, into?: ArrayBufferView): Uint8Array {
    return bytes.read(this.#ctx, seq, range, into);
  }

  /** Tokens grown so far by `seq`. */
  tokens(seq: Sequence): number {
    return bytes.tokens(this.#ctx, seq);
  }

  /**
   * One layer's K or V tensor: address, shape and strides for a kernel. Over
   * several devices, that of `options.device`'s shard (its kvHeads / devices
   * heads, in that device's address space).
   */
  tensor(layer: number, kind: KVKind, options?: DeviceOption): TensorInfo {
    return bytes.tensor(this.#ctx, layer, kind, options);
  }

  /** Every layer's K and V tensors (of `options.device`'s shard). */
  tensors(options?: DeviceOption): { k: TensorInfo; v: TensorInfo }[] {
    return bytes.tensors(this.#ctx, options);
  }

  /** Address of the sequence's token 0 in one layer's K or V (of `options.device`'s shard). */
  sequenceAddress(seq: Sequence, layer: number, kind: KVKind, options?: DeviceOption): bigint {
    return bytes.sequenceAddress(this.#ctx, seq, layer, kind, options);
  }

  // ---- figures (ops/figures.ts) -----------------------------------------------------

  /**
   * The figures of the whole cache; over several devices, added up, with
   * each device's own in `devices`.
   */
  stats(): CacheStats {
    return figures.stats(this.#ctx);
  }

  /**
   * Bytes of physical pages a sequence of `tokens` tokens is backed with on
   * each device (whole page groups): what it takes of `memoryBudget`.
   */
  bytesForTokens(tokens: number): number {
    return figures.bytesForTokens(this.#ctx, tokens);
  }

  /**
   * Whether a sequence of `tokens` tokens fits in the memory budget at all,
   * whatever else is running (false past `maxTokens` too): a request for
   * which this is false can never be served and should be rejected at
   * admission, not queued.
   */
  fits(tokens: number): boolean {
    return figures.fits(this.#ctx, tokens);
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
  obtainableBytes(options?: { lookAhead?: boolean }): number {
    return figures.obtainableBytes(this.#ctx, options);
  }

  /**
   * The statistics as Prometheus text exposition (bytes backed and used,
   * pages by state, driver calls and their time by kind, prefetch hits and
   * misses, critical-path stall time), ready to serve on a /metrics route.
   */
  metrics(options?: MetricsOptions): string {
    return formatPrometheus(this.stats(), options);
  }

  // ---- lifetime -----------------------------------------------------------------------

  /**
   * Unmaps and frees everything and gives the virtual range back. Idempotent.
   * Waits for GPU work fenced by release({ stream }).
   */
  close(): void {
    const native = this.#ctx.native;
    if (native === null) return;
    this.#ctx.native = null;
    native.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  /** @internal Test-only: every prefix hash collides (the ids must still tell prefixes apart). */
  _forcePrefixCollisions(): void {
    const native = this.#ctx.open();
    native.prefixHashMask(0n);
  }

  /**
   * @internal Test-only: make the nth next backend call of `op` fail
   * (`true`/'outOfMemory', `false`/'error', 'hostAlloc', or 'errorInClose': an
   * error that close's teardown meets, which drops other faults), after `delayMs`,
   * on `device` (an ordinal of `options.devices`; default the first).
   * Several faults may be armed at once.
   */
  _injectFault(op: string, nth: number, kind: boolean | FaultKind, delayMs = 0, device?: number): void {
    const native = this.#ctx.open();
    const k: FaultKind = kind === true ? 'outOfMemory' : kind === false ? 'error' : kind;
    this.#ctx.call(() => native.injectFault(op, nth, k, delayMs, this.#ctx.deviceIndex('device', device)));
  }
}

function openNative(o: NormalizedOptions, backend: 'cuda' | 'host'): NativeCache {
  try {
    return new addon.NativeCache({
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
      prefixCache: o.prefixCache,
      prefixCacheMaxBytes: o.prefixCacheMaxBytes,
    });
  } catch (e) {
    throw fromNative(e);
  }
}
