/**
 * What every operation of a cache needs: the native object (null once
 * closed), the options and layout read at construction, and the checks and
 * error handling shared by all calls. One per KVCache, private to it; the
 * operations in this folder are functions over it.
 */
import type { KVCacheEvents } from '../call-options.js';
import {
  ClosedError,
  ForeignSequenceError,
  InvalidArgumentRangeError,
  InvalidArgumentTypeError,
  OutOfMemoryError,
  SequenceReleasedError,
  fromNative,
} from '../errors.js';
import type { KVCache } from '../kv-cache.js';
import type { NativeCache, NativeLayout } from '../native.js';
import { type NormalizedOptions, checkInteger, checkKind, checkObject, describe } from '../options.js';
import { Sequence } from '../sequence.js';

export type GrowthOperation = 'grow' | 'step' | 'growAsync';

export class CacheContext {
  native: NativeCache | null;
  /** The least device budget (fixed for the cache's life), read once by fits(). */
  budgetBytes: number | undefined;

  constructor(
    readonly cache: KVCache,
    native: NativeCache,
    readonly layout: NativeLayout,
    readonly options: Readonly<NormalizedOptions>,
  ) {
    this.native = native;
  }

  open(): NativeCache {
    if (this.native === null) throw new ClosedError();
    return this.native;
  }

  /** Bytes of one token in one tensor, on one device's shard. */
  get tokenBytes(): number {
    return this.layout.tokenBytes;
  }

  /** Checks a sequence argument; returns its generation. */
  check(seq: unknown): number {
    const generation = Sequence.generationOf(seq);
    if (generation === undefined) throw new InvalidArgumentTypeError('seq', `must be a Sequence from reserve(), got ${describe(seq)}`);
    if ((seq as Sequence).cache !== this.cache)
      throw new ForeignSequenceError(`the sequence in slot ${(seq as Sequence).slot} belongs to another cache`);
    if (generation < 0) throw new SequenceReleasedError(`the sequence in slot ${(seq as Sequence).slot} was released`);
    return generation;
  }

  /** A token count argument: a non-negative integer. */
  checkTokens(tokens: unknown): number {
    if (typeof tokens !== 'number') throw new InvalidArgumentTypeError('tokens', `must be a number, got ${describe(tokens)}`);
    if (!Number.isInteger(tokens) || tokens < 0) throw new InvalidArgumentRangeError('tokens', `must be a non-negative integer, got ${tokens}`);
    return tokens;
  }

  /** The index in `options.devices` of a device ordinal (the first when undefined). */
  deviceIndex(name: string, device: unknown): number {
    if (device === undefined) return 0;
    checkInteger(name, device, 0, 1023);
    const i = this.options.devices.indexOf(device as number);
    if (i < 0) throw new InvalidArgumentRangeError(name, `(${String(device)}) is not one of the cache's devices [${this.options.devices.join(', ')}]`);
    return i;
  }

  /** `stream` (one device) or `streams` (one per device) of an options object, checked; undefined for none. */
  streamsOption(o: Record<string, unknown>): (bigint | undefined)[] | undefined {
    const devices = this.options.devices.length;
    if (o.stream !== undefined && o.streams !== undefined)
      throw new InvalidArgumentRangeError('options', 'give stream or streams, not both');
    if (o.streams === undefined) {
      const stream = checkStream('options.stream', o.stream);
      if (stream !== undefined && devices > 1)
        throw new InvalidArgumentRangeError('options.stream', `names one stream for ${devices} devices: pass streams, one per device`);
      return stream === undefined ? undefined : [stream];
    }
    if (!Array.isArray(o.streams))
      throw new InvalidArgumentTypeError('options.streams', `must be an array of bigint (CUstream), got ${describe(o.streams)}`);
    if (o.streams.length !== devices)
      throw new InvalidArgumentRangeError('options.streams', `must have one entry per device (${devices}), got ${o.streams.length}`);
    return o.streams.map((s, i) => checkStream(`options.streams[${i}]`, s));
  }

  /** A token range argument of write() and read(). */
  range(range: unknown, keys: readonly string[]): { layer: number; kind: 0 | 1; token: number } {
    const r = checkObject('range', range, false, keys);
    return {
      layer: checkInteger('range.layer', r.layer, 0, this.options.layers - 1),
      kind: checkKind('range.kind', r.kind),
      token: checkInteger('range.token', r.token, 0, this.options.maxTokens),
    };
  }

  /** Runs a native call; its errors become the library's classes (and out-of-memory an event). */
  call<T>(fn: () => T, operation?: 'grow' | 'step'): T {
    try {
      return fn();
    } catch (e) {
      const error = fromNative(e);
      throw operation ? this.noteOutOfMemory(error, operation) : error;
    }
  }

  /** Runs a native call that returns a promise; errors (thrown or rejected) become the library's classes. */
  async callAsync<T>(fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      throw fromNative(e);
    }
  }

  noteOutOfMemory(error: unknown, operation: GrowthOperation): unknown {
    if (error instanceof OutOfMemoryError && this.cache.listenerCount('outOfMemory') > 0)
      this.emitSafely('outOfMemory', { operation, requestedBytes: error.requestedBytes, availableBytes: error.availableBytes });
    return error;
  }

  afterGrowth(operation: 'grow' | 'step', reclaimedPages: number): void {
    if (reclaimedPages > 0 && this.cache.listenerCount('reclaim') > 0)
      this.emitSafely('reclaim', { operation, pages: reclaimedPages, bytes: reclaimedPages * this.layout.pageSize });
  }

  /**
   * Events report what an operation did; a listener that throws must not
   * turn the operation's result into an error (the growth is committed by
   * then). Its exception is rethrown on its own, as an uncaught exception,
   * where the application's handlers see it.
   */
  emitSafely<K extends keyof KVCacheEvents>(event: K, ...args: KVCacheEvents[K]): void {
    try {
      (this.cache.emit as (e: K, ...a: KVCacheEvents[K]) => boolean).call(this.cache, event, ...args);
    } catch (listenerError) {
      queueMicrotask(() => {
        throw listenerError;
      });
    }
  }
}

function checkStream(name: string, stream: unknown): bigint | undefined {
  if (stream === undefined) return undefined;
  if (typeof stream !== 'bigint') throw new InvalidArgumentTypeError(name, `must be a bigint (CUstream), got ${describe(stream)}`);
  if (stream < 0n || stream >= 1n << 64n) throw new InvalidArgumentRangeError(name, `must be a 64-bit address, got ${stream}`);
  return stream;
}
