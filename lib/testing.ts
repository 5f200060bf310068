/**
 * `vattention/testing`: GPU helpers for integration tests and benchmarks.
 * Small kernels (JIT-compiled from PTX by the driver) that read and write
 * cache memory as a real attention kernel would, CUDA streams, and device
 * memory figures. These need a CUDA device and throw ERR_CUDA_UNAVAILABLE
 * without one; `liveResources` and `injectNextCacheFault` work everywhere.
 */
import { fromNative } from './errors.js';
import { addon, type FaultKind } from './native.js';
import { checkInteger } from './options.js';

interface NativeTesting {
  deviceMemory(device: number): { freeBytes: number; totalBytes: number };
  fillU32(device: number, address: bigint, count: number, seed: number, stream: bigint): void;
  spinThenFillU32(device: number, address: bigint, count: number, value: number, nanos: number, stream: bigint): void;
  spinThenReadU32(device: number, address: bigint, count: number, nanos: number, stream: bigint): void;
  writeTokens(
    device: number,
    base: bigint,
    tensors: number,
    tensorStride: number,
    slotStride: number,
    tokenBytes: number,
    seed: number,
    entries: BigUint64Array,
    stream: bigint,
  ): void;
  createStream(device: number): bigint;
  destroyStream(device: number, stream: bigint): void;
  synchronizeStream(device: number, stream: bigint): void;
  rawVmmLoop(device: number, pages: number): RawVmmTimes;
  createContext(device: number): bigint;
  checkFillU32(device: number, address: bigint, count: number, seed: number, counter: bigint, stream: bigint): void;
  createCounter(device: number): bigint;
  readCounter(device: number, counter: bigint): number;
  destroyCounter(device: number, counter: bigint): void;
  destroyContext(context: bigint): void;
  setCurrentContext(context: bigint): void;
  currentContext(): bigint;
}

/** Whole-loop times (ns) of the raw driver calls over `pages` pages of `pageSize` bytes. */
export interface RawVmmTimes {
  pages: number;
  pageSize: number;
  createNs: number;
  mapNs: number;
  setAccessNs: number;
  unmapNs: number;
  releaseNs: number;
}

const native = (addon as unknown as { testing: NativeTesting }).testing;

function call<T>(fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    throw fromNative(e);
  }
}

/** Free and total memory of a device (cuMemGetInfo). */
export function deviceMemory(device = 0): { freeBytes: number; totalBytes: number } {
  checkInteger('device', device, 0, 1023);
  return call(() => native.deviceMemory(device));
}

/** The value `fillU32` writes at u32 index `i`. */
export function fillValue(i: number, seed: number): number {
  return (Math.imul(i, 0x9e3779b1) + seed) >>> 0;
}

/** Queues a kernel that writes out[i] = fillValue(i, seed) for i < count u32 words. */
export function fillU32(address: bigint, count: number, seed: number, options: { device?: number; stream?: bigint } = {}): void {
  call(() => native.fillU32(options.device ?? 0, address, count, seed >>> 0, options.stream ?? 0n));
}

/**
 * Queues a kernel that spins for `nanoseconds` on the GPU, then reads count
 * u32 words from `address`, as attention reads the cache: a late reader.
 * If the memory is unmapped before it reads, the stream faults
 * (CUDA_ERROR_ILLEGAL_ADDRESS at the next synchronisation).
 */
export function spinThenReadU32(address: bigint, count: number, nanoseconds: number, options: { device?: number; stream?: bigint } = {}): void {
  call(() => native.spinThenReadU32(options.device ?? 0, address, count, nanoseconds, options.stream ?? 0n));
}

/**
 * Queues a kernel that reads count u32 words at `address` and adds to the
 * device counter (see {@link createCounter}) how many differ from what
 * `fillU32(address, count, seed)` writes: a reader that checks what it reads.
 */
export function checkFillU32(address: bigint, count: number, seed: number, counter: bigint, options: { device?: number; stream?: bigint } = {}): void {
  call(() => native.checkFillU32(options.device ?? 0, address, count, seed >>> 0, counter, options.stream ?? 0n));
}

/** A u32 counter in device memory, zeroed. Free it with {@link destroyCounter}. */
export function createCounter(device = 0): bigint {
  return call(() => native.createCounter(device));
}

/** Reads a device counter (synchronous copy: waits for the work queued before it on the legacy stream). */
export function readCounter(counter: bigint, device = 0): number {
  return call(() => native.readCounter(device, counter));
}

export function destroyCounter(counter: bigint, device = 0): void {
  call(() => native.destroyCounter(device, counter));
}

/** Queues a kernel that spins for `nanoseconds` on the GPU, then writes `value` to count u32 words. */
export function spinThenFillU32(
  address: bigint,
  count: number,
  value: number,
  nanoseconds: number,
  options: { device?: number; stream?: bigint } = {},
): void {
  call(() => native.spinThenFillU32(options.device ?? 0, address, count, value >>> 0, nanoseconds, options.stream ?? 0n));
}

export interface WriteTokensLayout {
  base: bigint;
  tensors: number;
  tensorStride: number;
  slotStride: number;
  tokenBytes: number;
}

/**
 * Queues a decode step's KV write: for each [slot, token] (at most 256), one
 * token of every tensor is written. Word w of entry b gets seed ^ (b << 16) ^ w.
 */
const writeTable = new BigUint64Array(256); // reused: benchmarks call this every step

export function writeTokens(
  layout: WriteTokensLayout,
  entries: [slot: number, token: number][],
  seed: number,
  options: { device?: number; stream?: bigint } = {},
): void {
  if (entries.length > 256) throw new RangeError('writeTokens takes at most 256 entries');
  const table = writeTable.subarray(0, entries.length);
  entries.forEach(([slot, token], i) => (table[i] = (BigInt(slot) << 32n) | BigInt(token)));
  call(() =>
    native.writeTokens(
      options.device ?? 0,
      layout.base,
      layout.tensors,
      layout.tensorStride,
      layout.slotStride,
      layout.tokenBytes,
      seed >>> 0,
      table,
      options.stream ?? 0n,
    ),
  );
}

export function createStream(device = 0): bigint {
  return call(() => native.createStream(device));
}

export function destroyStream(stream: bigint, device = 0): void {
  call(() => native.destroyStream(device, stream));
}

export function synchronizeStream(stream: bigint, device = 0): void {
  call(() => native.synchronizeStream(device, stream));
}

/**
 * The raw driver loop the library's mapping rate is compared with:
 * cuMemCreate, cuMemMap, cuMemSetAccess, cuMemUnmap, cuMemRelease over
 * `pages` granularity-sized pages, each loop timed as a whole.
 */
export function rawVmmLoop(pages: number, device = 0): RawVmmTimes {
  checkInteger('pages', pages, 1, 1 << 20);
  return call(() => native.rawVmmLoop(device, pages));
}

/** Driver/OS resources alive in this process (all caches): each is zero once every cache is closed. */
export interface LiveResources {
  ranges: number;
  pages: number;
  mappings: number;
  /** Fences (CUDA events) recorded and not yet destroyed; negative if one was destroyed twice. */
  fences: number;
  /** References the caches hold on CUDA primary contexts. */
  contexts: number;
}

interface NativeTestHooks {
  liveResources(): LiveResources;
  injectNextCacheFault(op: string, nth: number, kind: FaultKind, delayMs: number): void;
  holdHostStream(stream: bigint): void;
  finishHostStream(stream: bigint): void;
}
const hooks = addon as unknown as NativeTestHooks;

export function liveResources(): LiveResources {
  return hooks.liveResources();
}

/**
 * Test-only: makes the nth call (0 = the next) of backend operation `op`
 * fail in the next cache constructed: `true`/'outOfMemory', `false`/'error',
 * or 'hostAlloc' (std::bad_alloc), after `delayMs`. Ops: reserveRange,
 * freeRange, createPage, releasePage, map, setAccess, unmap, copyIn, copyOut,
 * fence, fenceQuery, fenceWait, and startWorker (call 0: starting the prefetch
 * thread; call 1: the thread binding itself).
 */
export function injectNextCacheFault(op: string, nth: number, kind: boolean | FaultKind, delayMs = 0): void {
  const k: FaultKind = kind === true ? 'outOfMemory' : kind === false ? 'error' : kind;
  call(() => hooks.injectNextCacheFault(op, nth, k, delayMs));
}

/**
 * Host backend only: fences recorded on `stream` (any bigint naming a pretend
 * stream) stay pending until waited for or until {@link finishHostStream}, as
 * GPU work still queued would. Lets tests on machines without a GPU check
 * which paths consult fences, and in what order.
 */
export function holdHostStream(stream: bigint): void {
  hooks.holdHostStream(stream);
}

/** Host backend only: the held stream's work is done; its fences have passed. */
export function finishHostStream(stream: bigint): void {
  hooks.finishHostStream(stream);
}

/**
 * A CUDA context other than the device's primary one (which caches use).
 * The calling thread's current context is left as it was.
 */
export function createContext(device = 0): bigint {
  return call(() => native.createContext(device));
}

export function destroyContext(context: bigint): void {
  call(() => native.destroyContext(context));
}

/** Makes `context` current on the calling (JS) thread. */
export function setCurrentContext(context: bigint): void {
  call(() => native.setCurrentContext(context));
}

/** The calling thread's current CUDA context (0n when none). */
export function currentContext(): bigint {
  return call(() => native.currentContext());
}
