/**
 * `vattention/testing`: GPU helpers for integration tests and benchmarks.
 * Small kernels (JIT-compiled from PTX by the driver) that read and write
 * cache memory as a real attention kernel would, CUDA streams, and device
 * memory figures. These need a CUDA device and throw ERR_CUDA_UNAVAILABLE
 * without one; `liveResources` and `injectNextCacheFault` work everywhere.
 */
import { callNative } from './errors.js';
import { addon, addonPart, type FaultKind } from './native.js';
export type { FaultKind } from './native.js';
import { InvalidArgumentRangeError, InvalidArgumentTypeError } from './errors.js';
import { checkAddress, checkInteger, checkObject, describe } from './options.js';
import type { TensorInfo } from './call-options.js';

interface NativeTesting {
  deviceMemory(device: number): { freeBytes: number; totalBytes: number };
  fillU32(device: number, address: bigint, count: number, seed: number, stream: bigint): void;
  spinThenFillU32(device: number, address: bigint, count: number, value: number, nanos: number, stream: bigint): void;
  spinThenReadU32(device: number, address: bigint, count: number, nanos: number, stream: bigint): void;
  streamRead(device: number, address: bigint, bytes: number, stream: bigint): void;
  beginCapture(device: number, stream: bigint): void;
  endCapture(device: number, stream: bigint): bigint;
  launchGraph(device: number, graph: bigint, stream: bigint): void;
  destroyGraph(device: number, graph: bigint): void;
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
  rawVmmLoopConcurrent(devices: number[], pages: number): { wallNs: number; threads: RawVmmTimes[] };
  threadUsage(): [number, number, number, number];
  createContext(device: number): bigint;
  checkFillU32(device: number, address: bigint, count: number, seed: number, counter: bigint, stream: bigint): void;
  createCounter(device: number): bigint;
  readCounter(device: number, counter: bigint): number;
  destroyCounter(device: number, counter: bigint): void;
  destroyContext(context: bigint): void;
  setCurrentContext(context: bigint): void;
  currentContext(): bigint;
  allocate(device: number, bytes: number): bigint;
  writeRowsU32(device: number, address: bigint, stride: number, rows: number, rowBytes: number, seed: number, stream: bigint): void;
  free(device: number, address: bigint): void;
  copyToDevice(device: number, dst: bigint, data: ArrayBufferView, stream: bigint | undefined): void;
  copyOnDevice(device: number, dst: bigint, src: bigint, bytes: number): void;
  copyFromDevice(device: number, out: ArrayBufferView, src: bigint): void;
  createEvent(device: number): bigint;
  recordEvent(device: number, event: bigint, stream: bigint): void;
  elapsedMilliseconds(device: number, start: bigint, end: bigint): number;
  destroyEvent(device: number, event: bigint): void;
  deviceProperties(device: number): DeviceProperties;
}

/** Device attributes the benchmarks need. */
export interface DeviceProperties {
  multiprocessors: number;
  /** Peak memory clock (kHz): peak bandwidth = 2 × clock × bus width / 8. */
  memoryClockKHz: number;
  busWidthBits: number;
  l2Bytes: number;
  /** PCI address, e.g. '0000:1b:00.0' (the sysfs name of the device's link). */
  pciBusId: string;
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

const native = addonPart<NativeTesting>('testing');
const call = callNative;

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
/**
 * Queues a plain read of `bytes` at `address` (16-byte aligned) as fast as
 * the GPU can, nothing written: the streaming-read ceiling that bandwidth
 * figures compare against (bench/attention.mjs).
 */
export function streamRead(address: bigint, bytes: number, options: { device?: number; stream?: bigint } = {}): void {
  call(() => native.streamRead(options.device ?? 0, address, bytes, options.stream ?? 0n));
}

/**
 * Captures what `queue` puts on `stream` (a stream of {@link createStream},
 * not 0n) into an instantiated CUDA graph (thread-local capture mode);
 * replay it with {@link launchGraph}, free it with {@link destroyGraph}.
 */
export function captureGraph(stream: bigint, queue: () => void, device = 0): bigint {
  call(() => native.beginCapture(device, stream));
  try {
    queue();
  } catch (e) {
    try {
      native.destroyGraph(device, native.endCapture(device, stream));
    } catch {
      // the capture is invalid after the failure: the failure is what to report
    }
    throw e;
  }
  return call(() => native.endCapture(device, stream));
}

export function launchGraph(graph: bigint, stream: bigint, device = 0): void {
  call(() => native.launchGraph(device, graph, stream));
}

export function destroyGraph(graph: bigint, device = 0): void {
  call(() => native.destroyGraph(device, graph));
}

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

/**
 * {@link rawVmmLoop} on one thread per entry of `devices`, started together
 * (list a device twice for two threads on one device): whether the driver
 * runs virtual-memory calls for several GPUs, or threads, of a process at
 * once. `wallNs`: from the start to the last thread's end.
 */
export function rawVmmLoopConcurrent(pages: number, devices: readonly number[]): { wallNs: number; threads: RawVmmTimes[] } {
  checkInteger('pages', pages, 1, 1 << 20);
  if (!Array.isArray(devices) || devices.length < 1 || devices.length > 16)
    throw new InvalidArgumentRangeError('devices', `must list 1 to 16 device ordinals, got ${describe(devices)}`);
  devices.forEach((d, i) => checkInteger(`devices[${i}]`, d, 0, 1023));
  return call(() => native.rawVmmLoopConcurrent([...devices], pages));
}

/** What the calling thread has used so far (Linux): to split a slow call into running and waiting. */
export interface ThreadUsage {
  /** CPU time of this thread (exact, not tick-based). */
  cpuNs: number;
  minorFaults: number;
  /** Times the thread gave up the CPU to wait (a lock, a page fault on a busy address space, I/O). */
  voluntarySwitches: number;
  /** Times the thread was preempted. */
  involuntarySwitches: number;
}

/** The calling thread's {@link ThreadUsage} now. */
export function threadUsage(): ThreadUsage {
  const [cpuNs, minorFaults, voluntarySwitches, involuntarySwitches] = native.threadUsage();
  return { cpuNs, minorFaults, voluntarySwitches, involuntarySwitches };
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
 * 'hostAlloc' (std::bad_alloc) or 'errorInClose' (an error met by close's
 * teardown, which drops the other faults), after `delayMs`. Ops: reserveRange,
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

/** Word `w` of row `row` that {@link writeRowsU32} writes with `seed`. */
export function rowValue(seed: number, row: number, w: number): number {
  return (Math.imul(seed, 0x9e3779b1) ^ Math.imul(row, 0x85ebca6b) ^ w) >>> 0;
}

/**
 * Queues a kernel writing `rows` rows of `rowBytes` bytes (a multiple of 4),
 * `stride` bytes apart from `address` — through a strided view, e.g. a layer
 * of an all-layers cache: `stride` = `tensor.strideBytes[1]`. Word w of row r
 * gets {@link rowValue}(seed, r, w).
 */
export function writeRowsU32(
  address: bigint,
  rows: { count: number; rowBytes: number; stride: number },
  seed: number,
  options: { device?: number; stream?: bigint } = {},
): void {
  checkInteger('rows.count', rows.count, 0, 0x7fff_ffff);
  checkInteger('rows.rowBytes', rows.rowBytes, 4, Number.MAX_SAFE_INTEGER);
  checkInteger('rows.stride', rows.stride, 0, Number.MAX_SAFE_INTEGER);
  call(() => native.writeRowsU32(options.device ?? 0, address, rows.stride, rows.count, rows.rowBytes, seed >>> 0, options.stream ?? 0n));
}

// ---- device memory, copies, events ----------------------------------------

function checkView(name: string, value: unknown): ArrayBufferView {
  if (!ArrayBuffer.isView(value)) throw new InvalidArgumentTypeError(name, `must be a TypedArray or DataView, got ${describe(value)}`);
  if ((value.buffer as ArrayBuffer & { detached?: boolean }).detached === true) throw new InvalidArgumentTypeError(name, 'is detached');
  return value;
}

/** `bytes` of plain device memory (cuMemAlloc), for kernel inputs and baselines. Free with {@link free}. */
export function allocate(bytes: number, device = 0): bigint {
  checkInteger('bytes', bytes, 1, Number.MAX_SAFE_INTEGER);
  return call(() => native.allocate(device, bytes));
}

export function free(address: bigint, device = 0): void {
  checkAddress('address', address);
  call(() => native.free(device, address));
}

/**
 * Copies `data` to device memory at `dst`: synchronous, or queued on
 * `options.stream` (the bytes are staged before it returns).
 */
/** Copies `bytes` between two device addresses (finished on return). */
export function copyOnDevice(dst: bigint, src: bigint, bytes: number, device = 0): void {
  call(() => native.copyOnDevice(device, dst, src, bytes));
}

export function copyToDevice(dst: bigint, data: ArrayBufferView, options: { device?: number; stream?: bigint } = {}): void {
  checkAddress('dst', dst);
  checkView('data', data);
  call(() => native.copyToDevice(options.device ?? 0, dst, data, options.stream));
}

/** Copies `out.byteLength` bytes from device memory at `src` into `out` (synchronous). */
export function copyFromDevice<T extends ArrayBufferView>(out: T, src: bigint, device = 0): T {
  checkView('out', out);
  checkAddress('src', src);
  call(() => native.copyFromDevice(device, out, src));
  return out;
}

/** A CUDA event that records time (for GPU timing). */
export function createEvent(device = 0): bigint {
  return call(() => native.createEvent(device));
}

export function recordEvent(event: bigint, stream = 0n, device = 0): void {
  call(() => native.recordEvent(device, event, stream));
}

/** GPU time between two recorded events; waits for `end`. */
export function elapsedMilliseconds(start: bigint, end: bigint, device = 0): number {
  return call(() => native.elapsedMilliseconds(device, start, end));
}

export function destroyEvent(event: bigint, device = 0): void {
  call(() => native.destroyEvent(device, event));
}

export function deviceProperties(device = 0): DeviceProperties {
  return call(() => native.deviceProperties(device));
}

/** Peak memory bandwidth (bytes/s) from the driver's memory clock and bus width (double data rate). */
export function peakBandwidth(device = 0): number {
  const p = deviceProperties(device);
  return 2 * p.memoryClockKHz * 1000 * (p.busWidthBits / 8);
}

// ---- 16-bit floats (Node has no Float16Array before 22) ---------------------

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** IEEE fp16 bits of `x`, rounded to nearest even. */
export function toFloat16Bits(x: number): number {
  f32[0] = x;
  const bits = u32[0]!;
  const sign = (bits >>> 16) & 0x8000;
  const exp = (bits >>> 23) & 0xff;
  let mant = bits & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >>> shift;
    const rest = mant & ((1 << shift) - 1), mid = 1 << (shift - 1);
    if (rest > mid || (rest === mid && half & 1)) half++;
    return sign | half;
  }
  let half = (e << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && half & 1)) half++;
  return sign | half;
}

export function fromFloat16Bits(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f, mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/** bfloat16 bits of `x`, rounded to nearest even. */
export function toBFloat16Bits(x: number): number {
  f32[0] = x;
  const bits = u32[0]!;
  if ((bits & 0x7f800000) === 0x7f800000 && bits & 0x7fffff) return (bits >>> 16) | 0x40;
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
}

export function fromBFloat16Bits(h: number): number {
  u32[0] = h << 16;
  return f32[0]!;
}

// ---- fp8 e4m3 ("fn": no infinities, NaN = 0x7f, largest ±448) ---------------

function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** e4m3 bits of `x`, rounded to nearest even and saturated to ±448 (as CUDA's __NV_SATFINITE). */
export function toFloat8E4M3Bits(x: number): number {
  if (Number.isNaN(x)) return 0x7f;
  const sign = x < 0 || Object.is(x, -0) ? 0x80 : 0;
  const a = Math.abs(x);
  if (a >= 448) return sign | 0x7e;
  if (a < 2 ** -6) return sign | roundHalfEven(a * 2 ** 9); // subnormals; 8 is the smallest normal
  let e = Math.floor(Math.log2(a));
  if (2 ** e > a) e--;
  else if (2 ** (e + 1) <= a) e++;
  const bits = ((e + 7) << 3) + roundHalfEven((a / 2 ** e - 1) * 8); // a mantissa of 8 carries into the exponent
  return sign | Math.min(bits, 0x7e);
}

export function fromFloat8E4M3Bits(b: number): number {
  const sign = b & 0x80 ? -1 : 1;
  const e = (b >>> 3) & 0xf, m = b & 7;
  if (e === 0xf && m === 7) return NaN;
  if (e === 0) return sign * m * 2 ** -9;
  return sign * (1 + m / 8) * 2 ** (e - 7);
}
