// Decode attention (native/kernels) over K/V written through the cache, on
// every layout and in paged blocks holding the same data, against a CPU
// reference; and a sequence released while the kernel still reads it.
import { afterAll, describe, expect, it } from 'vitest';
import { KVCache, type Sequence } from '../lib/index.js';
import * as gpu from '../lib/testing.js';
import { cudaSkip, layouts } from './backends.js';

type Dtype = 'float16' | 'bfloat16';
const toBits = (dtype: Dtype) => (dtype === 'float16' ? gpu.toFloat16Bits : gpu.toBFloat16Bits);
const fromBits = (dtype: Dtype) => (dtype === 'float16' ? gpu.fromFloat16Bits : gpu.fromBFloat16Bits);

/** Deterministic values in (-1, 1), stored as 16-bit floats. */
function randomHalves(count: number, seed: number, dtype: Dtype): Uint16Array {
  const out = new Uint16Array(count);
  let x = (seed * 2654435761) >>> 0 || 1;
  const bits = toBits(dtype);
  for (let i = 0; i < count; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[i] = bits((x / 2 ** 32) * 2 - 1);
  }
  return out;
}

interface Shape {
  dtype: Dtype;
  qHeads: number;
  kvHeads: number;
  headDim: number;
}

/** softmax(q·Kᵀ/√D)·V per query head, in float64 over the stored values. kv[b]: [len, kvHeads, headDim]. */
function reference(s: Shape, q: Uint16Array, k: Uint16Array[], v: Uint16Array[], lengths: number[]): Float64Array {
  const f = fromBits(s.dtype), D = s.headDim, G = s.qHeads / s.kvHeads, scale = 1 / Math.sqrt(D);
  const out = new Float64Array(lengths.length * s.qHeads * D);
  for (let b = 0; b < lengths.length; b++) {
    const kf = Float64Array.from(k[b]!, f), vf = Float64Array.from(v[b]!, f);
    for (let h = 0; h < s.qHeads; h++) {
      const kvh = Math.floor(h / G), len = lengths[b]!;
      if (len === 0) continue;
      const qh = Array.from(q.subarray((b * s.qHeads + h) * D, (b * s.qHeads + h + 1) * D), f);
      const scores = new Float64Array(len);
      let max = -Infinity;
      for (let t = 0; t < len; t++) {
        let dot = 0;
        const at = (t * s.kvHeads + kvh) * D;
        for (let d = 0; d < D; d++) dot += qh[d]! * kf[at + d]!;
        scores[t] = dot * scale;
        max = Math.max(max, scores[t]!);
      }
      let sum = 0;
      for (let t = 0; t < len; t++) sum += scores[t] = Math.exp(scores[t]! - max);
      const o = (b * s.qHeads + h) * D;
      for (let t = 0; t < len; t++) {
        const at = (t * s.kvHeads + kvh) * D, w = scores[t]! / sum;
        for (let d = 0; d < D; d++) out[o + d] += w * vf[at + d]!;
      }
    }
  }
  return out;
}

/** The largest error beyond tolerance (≤ 0 when every element is within it). */
function worstExcess(dtype: Dtype, got: Uint16Array, want: Float64Array): number {
  const f = fromBits(dtype);
  const [abs, rel] = dtype === 'float16' ? [2e-3, 1e-2] : [1e-2, 2e-2];
  let worst = -Infinity;
  for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(f(got[i]!) - want[i]!) - (abs + rel * Math.abs(want[i]!)));
  return worst;
}

/** Device buffers freed after the suite. */
const buffers: bigint[] = [];
function upload(data: ArrayBufferView): bigint {
  const at = gpu.allocate(Math.max(16, data.byteLength));
  buffers.push(at);
  gpu.copyToDevice(at, data);
  return at;
}

/** K and V of every entry in vLLM-style blocks of 16, blocks shuffled across the pool. */
function pagedCopy(s: Shape, k: Uint16Array[], v: Uint16Array[], lengths: number[], seed: number) {
  const blockSize = 16, row = s.kvHeads * s.headDim;
  const blocksOf = lengths.map((n) => Math.ceil(n / blockSize));
  const total = blocksOf.reduce((a, b) => a + b, 0) || 1;
  const order = Array.from({ length: total }, (_, i) => i);
  let x = seed >>> 0 || 1;
  for (let i = order.length - 1; i > 0; i--) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    const j = x % (i + 1);
    [order[i], order[j]] = [order[j]!, order[i]!];
  }
  const maxBlocks = Math.max(1, ...blocksOf);
  const table = new Int32Array(lengths.length * maxBlocks);
  const kPool = new Uint16Array(total * blockSize * row), vPool = new Uint16Array(total * blockSize * row);
  let next = 0;
  lengths.forEach((n, b) => {
    for (let i = 0; i < blocksOf[b]!; i++) {
      const block = order[next++]!;
      table[b * maxBlocks + i] = block;
      const from = i * blockSize * row, to = Math.min(n, (i + 1) * blockSize) * row;
      kPool.set(k[b]!.subarray(from, to), block * blockSize * row);
      vPool.set(v[b]!.subarray(from, to), block * blockSize * row);
    }
  });
  return {
    k: upload(kPool),
    v: upload(vPool),
    strides: { row: blockSize * row, token: row, head: s.headDim },
    paged: { blockTable: upload(table), maxBlocksPerSequence: maxBlocks, blockSize },
  };
}

describe.skipIf(cudaSkip !== null)(`decode attention on the GPU${cudaSkip ? ` (skipped: ${cudaSkip})` : ''}`, () => {
  afterAll(() => {
    for (const b of buffers.splice(0)) gpu.free(b);
  });

  // 4 layers; per-layer rows of 8 KV heads × 128 fp16 = 2 KiB: 1024 tokens a
  // page per-layer, 256 with all layers in one tensor: lengths around both.
  const cases: { shape: Shape; lengths: number[] }[] = [
    { shape: { dtype: 'float16', qHeads: 32, kvHeads: 8, headDim: 128 }, lengths: [1, 255, 257, 1023, 1025, 3000] },
    { shape: { dtype: 'bfloat16', qHeads: 32, kvHeads: 8, headDim: 128 }, lengths: [1024, 17, 2049] },
    { shape: { dtype: 'float16', qHeads: 8, kvHeads: 8, headDim: 64 }, lengths: [4095, 4097] },
    { shape: { dtype: 'float16', qHeads: 16, kvHeads: 2, headDim: 256 }, lengths: [0, 600, 1] },
  ];

  for (const { shape: s, lengths } of cases) {
    const tag = `${s.dtype}, ${s.qHeads}/${s.kvHeads} heads × ${s.headDim}, lengths ${lengths.join(' ')}`;
    for (const { name, layout } of layouts) {
      it(`matches the CPU reference on the ${name} layout and in paged blocks over the same data (${tag})`, () => {
        const layers = 4, layer = 2, batch = lengths.length;
        using c = new KVCache({ backend: 'cuda', layers, kvHeads: s.kvHeads, headDim: s.headDim, dtype: s.dtype, maxSequences: batch + 2, maxTokens: 4200, layout, prefetchTokens: 0 });
        // a released sequence first, so entries do not sit in slots 0..batch-1
        c.release(c.reserve());
        const seqs: Sequence[] = [];
        const k: Uint16Array[] = [], v: Uint16Array[] = [];
        lengths.forEach((n, b) => {
          const seq = c.reserve();
          seqs.push(seq);
          c.grow(seq, n);
          k.push(randomHalves(n * s.kvHeads * s.headDim, 100 + b, s.dtype));
          v.push(randomHalves(n * s.kvHeads * s.headDim, 200 + b, s.dtype));
          for (let l = 0; l < layers; l++) {
            if (n === 0) continue;
            // other layers get other data: a kernel reading the wrong view fails
            c.write(seq, { layer: l, kind: 'k', token: 0 }, l === layer ? k[b]! : randomHalves(k[b]!.length, 1000 * l + b, s.dtype));
            c.write(seq, { layer: l, kind: 'v', token: 0 }, l === layer ? v[b]! : randomHalves(v[b]!.length, 2000 * l + b, s.dtype));
          }
        });
        const q = randomHalves(batch * s.qHeads * s.headDim, 7, s.dtype);
        const want = reference(s, q, k, v, lengths);
        const common = {
          ...s,
          batch,
          q: upload(q),
          lengths: upload(Int32Array.from(lengths)),
          maxLength: Math.max(...lengths),
        };
        const out = upload(new Uint16Array(q.length));
        const kv = gpu.cacheKV(c.tensor(layer, 'k'), c.tensor(layer, 'v'));
        const plan = gpu.decodeAttention({ ...common, ...kv, out, rows: upload(Int32Array.from(seqs, (x) => x.slot)) });
        const got = gpu.copyFromDevice(new Uint16Array(q.length), out);
        expect(worstExcess(s.dtype, got, want)).toBeLessThanOrEqual(0);
        // one split (no reduce kernel) gives the same answer
        const single = upload(new Uint16Array(q.length));
        gpu.decodeAttention({ ...common, ...kv, out: single, rows: upload(Int32Array.from(seqs, (x) => x.slot)), splits: 1 });
        expect(worstExcess(s.dtype, gpu.copyFromDevice(new Uint16Array(q.length), single), want)).toBeLessThanOrEqual(0);
        expect(plan.splits).toBeGreaterThanOrEqual(1);
        // paged blocks of 16 holding the same K and V
        const pagedOut = upload(new Uint16Array(q.length));
        gpu.decodeAttention({ ...common, ...pagedCopy(s, k, v, lengths, 11), out: pagedOut });
        expect(worstExcess(s.dtype, gpu.copyFromDevice(new Uint16Array(q.length), pagedOut), want)).toBeLessThanOrEqual(0);
      });
    }
  }

  it('a kernel writing through every layer\'s strided view of an all-layers cache writes exactly the bytes read() returns for that layer', () => {
    const layers = 6, n = 700; // 6 × 2 KiB rows: 170.7 tokens a page, rows straddle pages
    using c = new KVCache({ backend: 'cuda', layers, kvHeads: 8, headDim: 128, dtype: 'float16', maxSequences: 3, maxTokens: 1024, layout: 'all-layers', prefetchTokens: 0 });
    c.release(c.reserve());
    const seq = c.reserve();
    c.grow(seq, n);
    for (let l = 0; l < layers; l++)
      for (const [kind, k] of [['k', 0], ['v', 1]] as const)
        gpu.writeRowsU32(seq.address(l, kind), { count: n, rowBytes: c.tokenBytes, stride: c.tensor(l, kind).strideBytes[1] }, 2 * l + k);
    for (let l = 0; l < layers; l++)
      for (const [kind, k] of [['k', 0], ['v', 1]] as const) {
        const bytes = c.read(seq, { layer: l, kind, token: 0, count: n });
        const got = new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
        let bad = 0;
        for (let t = 0; t < n; t++) for (let w = 0; w < c.tokenBytes / 4; w++) if (got[t * (c.tokenBytes / 4) + w] !== gpu.rowValue(2 * l + k, t, w)) bad++;
        expect(bad, `layer ${l} ${kind}`).toBe(0);
      }
  });

  it('runs on a plain [B, T, H, D] tensor in cuMemAlloc memory (rows default to the entry index)', () => {
    const s: Shape = { dtype: 'float16', qHeads: 32, kvHeads: 8, headDim: 128 };
    const lengths = [300, 77], T = 512, row = s.kvHeads * s.headDim;
    const k = lengths.map((n, b) => randomHalves(n * row, 30 + b, s.dtype));
    const v = lengths.map((n, b) => randomHalves(n * row, 40 + b, s.dtype));
    const kAll = new Uint16Array(lengths.length * T * row), vAll = new Uint16Array(lengths.length * T * row);
    lengths.forEach((_, b) => {
      kAll.set(k[b]!, b * T * row);
      vAll.set(v[b]!, b * T * row);
    });
    const q = randomHalves(lengths.length * s.qHeads * s.headDim, 9, s.dtype);
    const out = upload(new Uint16Array(q.length));
    gpu.decodeAttention({ ...s, batch: 2, q: upload(q), out, lengths: upload(Int32Array.from(lengths)), maxLength: 300, k: upload(kAll), v: upload(vAll), strides: { row: T * row, token: row, head: s.headDim } });
    expect(worstExcess(s.dtype, gpu.copyFromDevice(new Uint16Array(q.length), out), reference(s, q, k, v, lengths))).toBeLessThanOrEqual(0);
  });

  it('refuses what the kernels cannot take with ERR_INVALID_ARGUMENT', () => {
    const at = upload(new Uint8Array(64));
    const base = { dtype: 'float16' as const, batch: 1, qHeads: 8, kvHeads: 8, headDim: 128, q: at, out: at, lengths: at, maxLength: 1, k: at, v: at, strides: { row: 1024, token: 1024, head: 128 } };
    for (const bad of [{ headDim: 96 }, { qHeads: 24, kvHeads: 8 }, { q: at + 2n }, { strides: { row: 1024, token: 1020, head: 128 } }, { dtype: 'float32' }, { paged: { blockTable: at, maxBlocksPerSequence: 0, blockSize: 16 } }])
      expect(() => gpu.decodeAttention({ ...base, ...bad } as never)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }));
  });

  it("a sequence released with { stream } while attention still reads it keeps its pages until the kernel is done", () => {
    const s: Shape = { dtype: 'float16', qHeads: 32, kvHeads: 8, headDim: 128 };
    // Budget for one sequence: growing the second needs the first one's pages.
    const layers = 2, n = 4096;
    using c = new KVCache({ backend: 'cuda', layers, kvHeads: s.kvHeads, headDim: s.headDim, dtype: s.dtype, maxSequences: 2, maxTokens: n, memoryBudget: 2 * layers * 4 * 2 ** 21, prefetchTokens: 0 });
    const stream = gpu.createStream();
    try {
      const a = c.reserve();
      c.grow(a, n);
      const row = s.kvHeads * s.headDim;
      const k = randomHalves(n * row, 5, s.dtype), v = randomHalves(n * row, 6, s.dtype);
      c.write(a, { layer: 1, kind: 'k', token: 0 }, k);
      c.write(a, { layer: 1, kind: 'v', token: 0 }, v);
      const q = randomHalves(s.qHeads * s.headDim, 8, s.dtype);
      const out = upload(new Uint16Array(q.length));
      const spin = upload(new Uint32Array(4));
      // the stream is busy for 300 ms before attention reads a's pages
      gpu.spinThenFillU32(spin, 4, 1, 300e6, { stream });
      gpu.decodeAttention({ ...s, batch: 1, q: upload(q), out, lengths: upload(Int32Array.of(n)), maxLength: n, ...gpu.cacheKV(c.tensor(1, 'k'), c.tensor(1, 'v')), rows: upload(Int32Array.of(a.slot)), stream });
      c.release(a, { stream });
      const other = c.reserve({ expectedTokens: 0 }); // an empty slot, not a's
      expect(other.slot).not.toBe(a.slot);
      const waits = c.stats().driverCalls.fenceWait!.calls;
      c.grow(other, n); // needs a's pages: must wait for the fence, not unmap under the kernel
      expect(c.stats().driverCalls.fenceWait!.calls).toBeGreaterThan(waits);
      gpu.synchronizeStream(stream); // a kernel that faulted would throw here
      expect(worstExcess(s.dtype, gpu.copyFromDevice(new Uint16Array(q.length), out), reference(s, q, [k], [v], [n]))).toBeLessThanOrEqual(0);
    } finally {
      gpu.destroyStream(stream);
    }
  });
});
