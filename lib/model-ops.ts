/**
 * The element-wise steps and linear layers of a Llama-architecture model
 * around the attention kernels, part of `vattention/kernels`: what
 * examples/llama runs, for any caller with the same shapes.
 *
 * - `linear`: `out = input · weightᵀ` through cuBLASLt (loaded at run
 *   time: `VATTENTION_CUBLASLT`, then `libcublasLt.so.13`, then `.so.12`;
 *   without it a call is `ERR_LIBRARY_UNAVAILABLE`).
 * - `gatherRows` (embedding lookup, last-token pick), `rmsNorm`
 *   (fused with the residual add), `rotaryEmbedding` (fused with the
 *   split of a Q/K/V projection), `siluMul`, `argmax` (greedy or
 *   a temperature sample): this package's CUDA C, shipped as PTX.
 *
 * Rows are contiguous, addresses 16-byte aligned, activations fp16 or bf16
 * with fp32 arithmetic. Like the attention kernels every call is checked,
 * then queued on `stream`, and returns at once.
 * @packageDocumentation
 */
import { callNative, InvalidArgumentRangeError, InvalidArgumentTypeError } from './errors.js';
import { addonPart } from './native.js';
import { checkAddress, checkInteger, checkObject, describe } from './options.js';

/** Element type of activations and weights. */
export type ActivationDtype = 'float16' | 'bfloat16';

/** Where a call is queued. */
export interface QueueArgs {
  /** Default the legacy default stream (0n). */
  stream?: bigint;
  /** Default 0. */
  device?: number;
}

export interface LinearArgs extends QueueArgs {
  dtype: ActivationDtype;
  rows: number;
  /** Multiples of 8. */
  inFeatures: number;
  outFeatures: number;
  /** `[rows, inFeatures]`. */
  input: bigint;
  /** `[outFeatures, inFeatures]`, the layout of checkpoints. */
  weight: bigint;
  /** `[rows, outFeatures]`, in `outputDtype`. */
  output: bigint;
  /** Default `dtype`; `'float32'` for logits. */
  outputDtype?: ActivationDtype | 'float32';
}

export interface GatherRowsArgs extends QueueArgs {
  rows: number;
  /** Rows of the table; an id outside [0, tableRows) gives a row of zeros. */
  tableRows: number;
  /** 16-bit elements per row, a multiple of 8. */
  width: number;
  table: bigint;
  /** int32 `[rows]`. */
  ids: bigint;
  /** `[rows, width]`. */
  out: bigint;
}

export interface RmsNormArgs extends QueueArgs {
  dtype: ActivationDtype;
  rows: number;
  /** A multiple of 8, at most 8192. */
  width: number;
  /** Default 1e-5. */
  eps?: number;
  x: bigint;
  /** When given, x is first added into it (the residual stream), and the sum is normalised. */
  residual?: bigint;
  /** `[width]`. */
  weight: bigint;
  out: bigint;
}

export interface RotaryEmbeddingArgs extends QueueArgs {
  dtype: ActivationDtype;
  rows: number;
  qHeads: number;
  kvHeads: number;
  headDim: number;
  /** `[rows, (qHeads + 2 kvHeads) × headDim]`: a fused Q/K/V projection. */
  qkv: bigint;
  /** int32 `[rows]`; a negative position leaves the row unrotated. */
  positions: bigint;
  /** float32 `[headDim / 2]` inverse frequencies (with any rope scaling applied). */
  frequencies: bigint;
  /** Outputs `[rows, qHeads, headDim]`, `[rows, kvHeads, headDim]` ×2; q and k rotated (halves convention). */
  q: bigint;
  k: bigint;
  v: bigint;
}

export interface SiluMulArgs extends QueueArgs {
  dtype: ActivationDtype;
  rows: number;
  /** A multiple of 8. */
  width: number;
  /** `[rows, 2 × width]`: gate, then up. */
  gateUp: bigint;
  /** `[rows, width]` = silu(gate) × up. */
  out: bigint;
}

export interface ArgmaxArgs extends QueueArgs {
  rows: number;
  vocab: number;
  /** float32 elements between rows; default vocab. */
  stride?: number;
  /** float32 `[rows, stride]`. */
  logits: bigint;
  /** int32 `[rows]`. */
  out: bigint;
  /** 0 (default): the largest logit, the first of equals; above: a sample of softmax(logits / temperature). */
  temperature?: number;
  /** Of the sample (a counter-based hash of seed, row and index); default 0. */
  seed?: bigint;
}

interface NativeModelOps {
  linear(device: number, call: Record<string, unknown>): void;
  gatherRows(device: number, call: Record<string, unknown>): void;
  rmsNorm(device: number, call: Record<string, unknown>): void;
  rotary(device: number, call: Record<string, unknown>): void;
  siluMul(device: number, call: Record<string, unknown>): void;
  argmax(device: number, call: Record<string, unknown>): void;
  cublasLt(): { loaded: boolean; detail: string };
}

const native = addonPart<NativeModelOps>('kernels');
const MAX_INT32 = 0x7fff_ffff;
const QUEUE_KEYS = ['stream', 'device'];

function checkDtype(value: unknown, name = 'args.dtype'): ActivationDtype {
  if (value !== 'float16' && value !== 'bfloat16')
    throw new InvalidArgumentRangeError(name, `must be 'float16' or 'bfloat16', got ${describe(value)}`);
  return value;
}

/** The checked args, the device and stream pulled out. */
function queued(args: unknown, keys: string[]): { a: Record<string, unknown>; device: number; stream: bigint } {
  const a = checkObject('args', args, false, [...keys, ...QUEUE_KEYS]);
  const stream = a.stream === undefined ? 0n : a.stream;
  if (typeof stream !== 'bigint' || stream < 0n || stream >= 1n << 64n)
    throw new InvalidArgumentTypeError('args.stream', `must be a CUstream (bigint, 0n = the default stream), got ${describe(a.stream)}`);
  const device = a.device === undefined ? 0 : checkInteger('args.device', a.device, 0, 1023);
  return { a, device, stream };
}

const count = (a: Record<string, unknown>, key: string, min = 1) => checkInteger(`args.${key}`, a[key], min, MAX_INT32);
const address = (a: Record<string, unknown>, key: string) => checkAddress(`args.${key}`, a[key]);

/**
 * Whether `linear` can run: cuBLASLt loaded (`library`: the name it was
 * loaded by) or not (`problem`: what was tried). Loads it on first call;
 * needs no GPU.
 */
export function linearLibrary(): { available: boolean; library: string | null; problem: string | null } {
  const s = callNative(() => native.cublasLt());
  return { available: s.loaded, library: s.loaded ? s.detail : null, problem: s.loaded ? null : s.detail };
}

/** Queues `output[rows, outFeatures] = input[rows, inFeatures] · weight[outFeatures, inFeatures]ᵀ`, fp32 accumulation. */
export function linear(args: LinearArgs): void {
  const { a, device, stream } = queued(args, ['dtype', 'rows', 'inFeatures', 'outFeatures', 'input', 'weight', 'output', 'outputDtype']);
  const dtype = checkDtype(a.dtype);
  if (a.outputDtype !== undefined && a.outputDtype !== dtype && a.outputDtype !== 'float32')
    throw new InvalidArgumentRangeError('args.outputDtype', `must be '${dtype}' (the input's) or 'float32', got ${describe(a.outputDtype)}`);
  const flat = {
    dtype,
    outputFloat32: a.outputDtype === 'float32',
    rows: count(a, 'rows'),
    inFeatures: count(a, 'inFeatures'),
    outFeatures: count(a, 'outFeatures'),
    input: address(a, 'input'),
    weight: address(a, 'weight'),
    output: address(a, 'output'),
    stream,
  };
  callNative(() => native.linear(device, flat));
}

/** Queues `out[i] = table[ids[i]]` for 16-bit rows. */
export function gatherRows(args: GatherRowsArgs): void {
  const { a, device, stream } = queued(args, ['rows', 'tableRows', 'width', 'table', 'ids', 'out']);
  const flat = {
    rows: count(a, 'rows'),
    tableRows: count(a, 'tableRows'),
    width: count(a, 'width'),
    table: address(a, 'table'),
    ids: address(a, 'ids'),
    out: address(a, 'out'),
    stream,
  };
  callNative(() => native.gatherRows(device, flat));
}

/** Queues, per row, `h = x (+ residual, stored back)`, `out = h / rms(h) × weight`. */
export function rmsNorm(args: RmsNormArgs): void {
  const { a, device, stream } = queued(args, ['dtype', 'rows', 'width', 'eps', 'x', 'residual', 'weight', 'out']);
  const eps = a.eps === undefined ? 1e-5 : a.eps;
  if (typeof eps !== 'number' || !(eps > 0) || !Number.isFinite(eps))
    throw new InvalidArgumentRangeError('args.eps', `must be a positive finite number, got ${describe(a.eps)}`);
  const flat = {
    dtype: checkDtype(a.dtype),
    rows: count(a, 'rows'),
    width: count(a, 'width'),
    eps,
    x: address(a, 'x'),
    residual: a.residual === undefined ? 0n : address(a, 'residual'),
    weight: address(a, 'weight'),
    out: address(a, 'out'),
    stream,
  };
  callNative(() => native.rmsNorm(device, flat));
}

/** Queues the split of a fused Q/K/V row into q, k, v with q and k rotated by each row's position. */
export function rotaryEmbedding(args: RotaryEmbeddingArgs): void {
  const keys = ['dtype', 'rows', 'qHeads', 'kvHeads', 'headDim', 'qkv', 'positions', 'frequencies', 'q', 'k', 'v'];
  const { a, device, stream } = queued(args, keys);
  const flat = {
    dtype: checkDtype(a.dtype),
    rows: count(a, 'rows'),
    qHeads: count(a, 'qHeads'),
    kvHeads: count(a, 'kvHeads'),
    headDim: count(a, 'headDim'),
    qkv: address(a, 'qkv'),
    positions: address(a, 'positions'),
    frequencies: address(a, 'frequencies'),
    q: address(a, 'q'),
    k: address(a, 'k'),
    v: address(a, 'v'),
    stream,
  };
  callNative(() => native.rotary(device, flat));
}

/** Queues `out = silu(gate) × up` over fused `[gate | up]` rows. */
export function siluMul(args: SiluMulArgs): void {
  const { a, device, stream } = queued(args, ['dtype', 'rows', 'width', 'gateUp', 'out']);
  const flat = {
    dtype: checkDtype(a.dtype),
    rows: count(a, 'rows'),
    width: count(a, 'width'),
    gateUp: address(a, 'gateUp'),
    out: address(a, 'out'),
    stream,
  };
  callNative(() => native.siluMul(device, flat));
}

/** Queues the pick of one token per row of float32 logits (greedy, or sampled at a temperature). */
export function argmax(args: ArgmaxArgs): void {
  const { a, device, stream } = queued(args, ['rows', 'vocab', 'stride', 'logits', 'out', 'temperature', 'seed']);
  const vocab = count(a, 'vocab');
  const temperature = a.temperature === undefined ? 0 : a.temperature;
  if (typeof temperature !== 'number' || !(temperature >= 0) || !Number.isFinite(temperature))
    throw new InvalidArgumentRangeError('args.temperature', `must be 0 or a positive finite number, got ${describe(a.temperature)}`);
  const seed = a.seed === undefined ? 0n : a.seed;
  if (typeof seed !== 'bigint' || seed < 0n || seed >= 1n << 64n)
    throw new InvalidArgumentTypeError('args.seed', `must be a bigint in [0, 2^64), got ${describe(a.seed)}`);
  const flat = {
    rows: count(a, 'rows'),
    vocab,
    stride: a.stride === undefined ? vocab : checkInteger('args.stride', a.stride, vocab, Number.MAX_SAFE_INTEGER),
    logits: address(a, 'logits'),
    out: address(a, 'out'),
    temperature,
    seed,
    stream,
  };
  callNative(() => native.argmax(device, flat));
}
