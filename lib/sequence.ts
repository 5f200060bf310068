/**
 * The handles a cache gives out: a {@link Sequence} in a slot, and a
 * {@link SwappedSequence} waiting in host memory. They hold no native state;
 * the cache checks them on every call.
 */
import { ForeignSequenceError, InvalidArgumentRangeError, InvalidArgumentTypeError } from './errors.js';
import type { DeviceOption } from './call-options.js';
import type { KVCache } from './kv-cache.js';
import { type KVKind, describe } from './options.js';

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
    /**
     * Tokens it started with from the prefix cache (`reserve({ tokens })`):
     * backed and holding the KV of the first `cachedTokens` ids already, so
     * the prefill starts there. 0 for any other sequence.
     */
    readonly cachedTokens = 0,
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

  #discardNative: (handle: number) => void;

  /** @internal */
  constructor(
    readonly cache: KVCache,
    handle: number,
    /** Tokens it holds. */
    readonly tokens: number,
    /** Host bytes it holds (tokens × bytes per token, every layer's K and V). */
    readonly bytes: number,
    discardNative: (handle: number) => void,
  ) {
    this.#handle = handle;
    this.#discardNative = discardNative;
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
    this.#discardNative(this.#handle);
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
}

