/**
 * Where the bytes are and copying them: tensor descriptions and addresses
 * for kernels, write/read of whole tokens (tests, tools, host backend).
 */
import type { DeviceOption, ReadRange, TensorInfo, TokenRange } from '../call-options.js';
import { InvalidArgumentRangeError, InvalidArgumentTypeError, OutOfMemoryError, OutOfRangeError } from '../errors.js';
import { type KVKind, checkInteger, checkKind, checkObject, describe } from '../options.js';
import type { Sequence } from '../sequence.js';
import type { CacheContext } from './context.js';

export function tensor(ctx: CacheContext, layer: number, kind: KVKind, options?: DeviceOption): TensorInfo {
  ctx.open();
  checkInteger('layer', layer, 0, ctx.options.layers - 1);
  const k = checkKind('kind', kind);
  const device = ctx.deviceIndex('options.device', checkObject('options', options, true, ['device']).device);
  const t = ctx.layout.tensors[2 * layer + k]!;
  const o = ctx.options;
  const strides = t.strideElements as [number, number, number, number];
  return {
    layer,
    kind,
    address: ctx.layout.bases[device]! + t.offset,
    shape: [o.maxSequences, o.maxTokens, o.kvHeads / o.devices.length, o.headDim],
    strides: [...strides],
    strideBytes: strides.map((s) => s * o.dtypeBytes) as [number, number, number, number],
    dtype: o.dtype,
  };
}

export function tensors(ctx: CacheContext, options?: DeviceOption): { k: TensorInfo; v: TensorInfo }[] {
  const out = [];
  for (let layer = 0; layer < ctx.options.layers; layer++)
    out.push({ k: tensor(ctx, layer, 'k', options), v: tensor(ctx, layer, 'v', options) });
  return out;
}

export function sequenceAddress(ctx: CacheContext, seq: Sequence, layer: number, kind: KVKind, options?: DeviceOption): bigint {
  ctx.open();
  ctx.check(seq);
  const t = tensor(ctx, layer, kind, options);
  return t.address + BigInt(seq.slot) * BigInt(t.strideBytes[0]);
}

export function tokens(ctx: CacheContext, seq: Sequence): number {
  const native = ctx.open();
  const generation = ctx.check(seq);
  return ctx.call(() => native.tokens(seq.slot, generation));
}

export function write(ctx: CacheContext, seq: Sequence, range: TokenRange, data: ArrayBufferView): void {
  const native = ctx.open();
  const generation = ctx.check(seq);
  const { layer, kind, token } = ctx.range(range, ['layer', 'kind', 'token', 'device']);
  if (!ArrayBuffer.isView(data))
    throw new InvalidArgumentTypeError('data', `must be a TypedArray, Buffer or DataView, got ${describe(data)}`);
  const bytes = bytesOf('data', data);
  if (bytes.byteLength % ctx.tokenBytes !== 0)
    throw new InvalidArgumentRangeError(
      'data.byteLength',
      `${bytes.byteLength} is not a whole number of tokens (${ctx.tokenBytes} bytes each)`,
    );
  const device = ctx.deviceIndex('range.device', (range as TokenRange).device);
  ctx.call(() => native.write(seq.slot, generation, layer, kind, token, bytes, device));
}

export function read(ctx: CacheContext, seq: Sequence, range: ReadRange, into?: ArrayBufferView): Uint8Array {
  const native = ctx.open();
  const generation = ctx.check(seq);
  const { layer, kind, token } = ctx.range(range, ['layer', 'kind', 'token', 'count', 'device']);
  const count = checkInteger('range.count', (range as ReadRange).count, 0, ctx.options.maxTokens);
  const device = ctx.deviceIndex('range.device', (range as ReadRange).device);
  // Checked before allocating: a read past the sequence allocates nothing.
  const have = ctx.call(() => native.tokens(seq.slot, generation));
  if (token + count > have)
    throw new OutOfRangeError(`tokens [${token}, ${token + count}) are past the sequence's ${have} backed tokens`);
  const out = readBuffer(count * ctx.tokenBytes, into);
  ctx.call(() => native.read(seq.slot, generation, layer, kind, token, out, device));
  return out;
}

/** `into` cut to `length` bytes, or a new buffer. */
function readBuffer(length: number, into: unknown): Uint8Array {
  if (into === undefined) return allocate(length);
  if (!ArrayBuffer.isView(into))
    throw new InvalidArgumentTypeError('into', `must be a TypedArray, Buffer or DataView, got ${describe(into)}`);
  const view = bytesOf('into', into);
  if (view.byteLength < length) throw new InvalidArgumentRangeError('into', `holds ${view.byteLength} bytes, ${length} needed`);
  return view.subarray(0, length);
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
