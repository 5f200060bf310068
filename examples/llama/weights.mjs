// Random Llama weights for a named shape (seeded, normal with a chosen std;
// norm weights around 1), rounded to the storage type so that what a file
// holds and what the reference computes with are the same numbers; and the
// conversion of safetensors tensors to Float32Array.
import { fromBFloat16Bits, fromFloat16Bits, toBFloat16Bits, toFloat16Bits } from 'vattention/testing';
import { tensorList } from './config.mjs';

/** The safetensors dtype of a config dtype. */
export const storageDtype = (dtype) => (dtype === 'bfloat16' ? 'BF16' : 'F16');

/** Float32Array values → 16-bit storage (Uint16Array) of `dtype` ('F16' | 'BF16'). */
export function encode(values, dtype) {
  const to = dtype === 'BF16' ? toBFloat16Bits : toFloat16Bits;
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = to(values[i]);
  return out;
}

/** The bytes of a safetensors tensor (F16, BF16 or F32) as a Float32Array. */
export function decode(bytes, dtype) {
  if (dtype === 'F32') return new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
  if (dtype !== 'F16' && dtype !== 'BF16') throw new Error(`weights: cannot decode dtype ${dtype}`);
  const from = dtype === 'BF16' ? fromBFloat16Bits : fromFloat16Bits;
  const bits = new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2);
  const out = new Float32Array(bits.length);
  for (let i = 0; i < bits.length; i++) out[i] = from(bits[i]);
  return out;
}

/** A seeded normal generator (mulberry32 + Box-Muller). */
export function normals(seed) {
  let s = seed >>> 0 || 1;
  const uniform = () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (((t ^ (t >>> 14)) >>> 0) + 0.5) / 2 ** 32;
  };
  return () => Math.sqrt(-2 * Math.log(uniform())) * Math.cos(2 * Math.PI * uniform());
}

/**
 * Random weights of shape `m`: Map name → { shape, values } with values a
 * Float32Array already rounded to `m.dtype`. Matrices ~ N(0, std²) (default
 * 1/√hidden, which keeps activations of order 1), norm weights 1 + N(0, 0.1²).
 */
export function randomWeights(m, { seed = 1, std = 1 / Math.sqrt(m.hidden) } = {}) {
  const next = normals(seed), dtype = storageDtype(m.dtype);
  const weights = new Map();
  for (const { name, shape } of tensorList(m)) {
    const count = shape.reduce((a, d) => a * d, 1);
    const values = new Float32Array(count);
    const norm = name.endsWith('norm.weight');
    for (let i = 0; i < count; i++) values[i] = norm ? 1 + 0.1 * next() : std * next();
    weights.set(name, { shape, values: decode(new Uint8Array(encode(values, dtype).buffer), dtype) });
  }
  return weights;
}
