// vattention/kernels on the GPU: decode attention over K/V written through
// the cache, on every layout and in paged blocks holding the same data,
// against a CPU reference in float64 (every dtype, head dim and group ratio
// of the supported set, window, soft-cap, fp8 scales, lengths 0, 1 and a page
// group ± 1, ragged batches); appendKV for each cache type and addressing;
// concurrent calls on several streams; a sequence released while the kernel
// still reads it. The argument checks that need no GPU are in kernels.test.ts.
import { afterAll, describe, expect, it } from 'vitest';
import { KVCache, type Sequence } from '../lib/index.js';
import * as kernels from '../lib/kernels.js';
import * as gpu from '../lib/testing.js';
import { cudaSkip, layouts } from './backends.js';

type KVDtype = kernels.KVDtype;
type QueryDtype = kernels.QueryDtype;
type Stored = Uint16Array | Uint8Array;

const encoders: Record<KVDtype, (x: number) => number> = {
  float16: gpu.toFloat16Bits,
  bfloat16: gpu.toBFloat16Bits,
  float8_e4m3: gpu.toFloat8E4M3Bits,
};
const decoders: Record<KVDtype, (b: number) => number> = {
  float16: gpu.fromFloat16Bits,
  bfloat16: gpu.fromBFloat16Bits,
  float8_e4m3: gpu.fromFloat8E4M3Bits,
};

function storage(dtype: KVDtype, count: number): Stored {
  return dtype === 'float8_e4m3' ? new Uint8Array(count) : new Uint16Array(count);
}

/** Deterministic values in (-range, range) stored in `dtype`. */
function randomValues(count: number, seed: number, dtype: KVDtype, range = 1): Stored {
  const out = storage(dtype, count);
  let x = (seed * 2654435761) >>> 0 || 1;
  const encode = encoders[dtype];
  for (let i = 0; i < count; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[i] = encode(((x / 2 ** 32) * 2 - 1) * range);
  }
  return out;
}

interface Shape {
  dtype: KVDtype;
  queryDtype: QueryDtype;
  qHeads: number;
  kvHeads: number;
  headDim: number;
  window?: number;
  softcap?: number;
  /** fp8: per-tensor scales, and per-head ones (multiplied) when perHead. */
  kvScale?: { k: number; v: number; perHead?: boolean };
}

/** Per-head dequantisation scales of a shape: [k, v] per KV head. */
function headScales(s: Shape): { k: Float32Array; v: Float32Array } | null {
  if (!s.kvScale?.perHead) return null;
  return {
    k: Float32Array.from({ length: s.kvHeads }, (_, h) => 0.5 + h / s.kvHeads),
    v: Float32Array.from({ length: s.kvHeads }, (_, h) => 1.5 - h / (2 * s.kvHeads)),
  };
}

/** softmax(q·Kᵀ/√D)·V per query head, in float64 over the stored values. kv[b]: [len, kvHeads, headDim]. */
function reference(s: Shape, q: Uint16Array, k: Stored[], v: Stored[], lengths: number[]): Float64Array {
  const f = decoders[s.dtype], fq = decoders[s.queryDtype];
  const D = s.headDim, G = s.qHeads / s.kvHeads, scale = 1 / Math.sqrt(D);
  const perHead = headScales(s);
  const out = new Float64Array(lengths.length * s.qHeads * D);
  for (let b = 0; b < lengths.length; b++) {
    const kf = Float64Array.from(k[b]!, f), vf = Float64Array.from(v[b]!, f);
    const len = lengths[b]!, first = s.window ? Math.max(0, len - s.window) : 0;
    for (let h = 0; h < s.qHeads; h++) {
      const kvh = Math.floor(h / G);
      if (len === 0) continue;
      const ks = (s.kvScale?.k ?? 1) * (perHead ? perHead.k[kvh]! : 1);
      const vs = (s.kvScale?.v ?? 1) * (perHead ? perHead.v[kvh]! : 1);
      const qh = Array.from(q.subarray((b * s.qHeads + h) * D, (b * s.qHeads + h + 1) * D), fq);
      const scores = new Float64Array(len);
      let max = -Infinity;
      for (let t = first; t < len; t++) {
        let dot = 0;
        const at = (t * s.kvHeads + kvh) * D;
        for (let d = 0; d < D; d++) dot += qh[d]! * kf[at + d]! * ks;
        let logit = dot * scale;
        if (s.softcap) logit = s.softcap * Math.tanh(logit / s.softcap);
        scores[t] = logit;
        max = Math.max(max, logit);
      }
      let sum = 0;
      for (let t = first; t < len; t++) sum += scores[t] = Math.exp(scores[t]! - max);
      const o = (b * s.qHeads + h) * D;
      for (let t = first; t < len; t++) {
        const at = (t * s.kvHeads + kvh) * D, w = scores[t]! / sum;
        for (let d = 0; d < D; d++) out[o + d] += w * vf[at + d]! * vs;
      }
    }
  }
  return out;
}

/** The largest error beyond tolerance (≤ 0 when every element is within it). */
function worstExcess(dtype: QueryDtype, got: Uint16Array, want: Float64Array): number {
  const f = decoders[dtype];
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

/** The kvScale argument of a shape (device arrays uploaded). */
function kvScaleArg(s: Shape): kernels.KVScale | undefined {
  if (!s.kvScale) return undefined;
  const perHead = headScales(s);
  return { k: s.kvScale.k, v: s.kvScale.v, ...(perHead ? { kPerHead: upload(perHead.k), vPerHead: upload(perHead.v) } : {}) };
}

/** A shuffled order of `n` items (a pool after an allocator's churn). */
function shuffled(n: number, seed: number): number[] {
  const order = Array.from({ length: n }, (_, i) => i);
  let x = seed >>> 0 || 1;
  for (let i = order.length - 1; i > 0; i--) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    const j = x % (i + 1);
    [order[i], order[j]] = [order[j]!, order[i]!];
  }
  return order;
}

/** K and V of every entry in vLLM-style blocks of 16, blocks shuffled across the pool. */
function pagedCopy(s: Shape, k: Stored[], v: Stored[], lengths: number[], seed: number, maxLength: number) {
  const blockSize = 16, row = s.kvHeads * s.headDim;
  const blocksOf = lengths.map((n) => Math.ceil(n / blockSize));
  const total = blocksOf.reduce((a, b) => a + b, 0) || 1;
  const order = shuffled(total, seed);
  const maxBlocks = Math.max(1, Math.ceil(maxLength / blockSize));
  const table = new Int32Array(lengths.length * maxBlocks);
  const kPool = storage(s.dtype, total * blockSize * row), vPool = storage(s.dtype, total * blockSize * row);
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

const tag = (s: Shape, lengths: number[]) =>
  `${s.dtype}${s.dtype === 'float8_e4m3' ? ` (q ${s.queryDtype}${s.kvScale?.perHead ? ', per-head scales' : ''})` : ''}, ${s.qHeads}/${s.kvHeads} heads × ${s.headDim}` +
  `${s.window ? `, window ${s.window}` : ''}${s.softcap ? `, soft-cap ${s.softcap}` : ''}, lengths ${lengths.join(' ')}`;

describe.skipIf(cudaSkip !== null)(`attention kernels on the GPU${cudaSkip ? ` (skipped: ${cudaSkip})` : ''}`, () => {
  afterAll(() => {
    for (const b of buffers.splice(0)) gpu.free(b);
  });

  // 4 layers; per-layer rows of 8 KV heads × 128 fp16 = 2 KiB: 1024 tokens a
  // page per-layer, 256 with all layers in one tensor: lengths around both.
  const f16 = { dtype: 'float16', queryDtype: 'float16' } as const;
  const bf16 = { dtype: 'bfloat16', queryDtype: 'bfloat16' } as const;
  const cases: { shape: Shape; lengths: number[] }[] = [
    { shape: { ...f16, qHeads: 32, kvHeads: 8, headDim: 128 }, lengths: [1, 255, 257, 1023, 1025, 3000] },
    { shape: { ...bf16, qHeads: 28, kvHeads: 4, headDim: 128 }, lengths: [1024, 17, 2049] },
    { shape: { ...f16, qHeads: 8, kvHeads: 8, headDim: 64 }, lengths: [4095, 4097] },
    { shape: { ...f16, qHeads: 16, kvHeads: 1, headDim: 256 }, lengths: [0, 600, 1] },
    { shape: { ...bf16, qHeads: 10, kvHeads: 2, headDim: 80 }, lengths: [333, 1, 2048] },
    { shape: { ...f16, qHeads: 16, kvHeads: 4, headDim: 96 }, lengths: [500, 129] },
    { shape: { ...bf16, qHeads: 32, kvHeads: 2, headDim: 192 }, lengths: [200, 64, 0] },
    { shape: { ...f16, qHeads: 32, kvHeads: 8, headDim: 128, window: 512, softcap: 30 }, lengths: [3000, 10, 1025] },
    { shape: { ...bf16, qHeads: 8, kvHeads: 1, headDim: 64, softcap: 5 }, lengths: [1500, 2] },
    { shape: { dtype: 'float8_e4m3', queryDtype: 'float16', qHeads: 32, kvHeads: 8, headDim: 128, kvScale: { k: 0.05, v: 0.03 } }, lengths: [1000, 1, 2050] },
    { shape: { dtype: 'float8_e4m3', queryDtype: 'bfloat16', qHeads: 12, kvHeads: 2, headDim: 256, kvScale: { k: 0.02, v: 0.1, perHead: true } }, lengths: [300, 4097] },
    { shape: { dtype: 'float8_e4m3', queryDtype: 'float16', qHeads: 4, kvHeads: 4, headDim: 80, kvScale: { k: 0.5, v: 0.25 }, window: 100 }, lengths: [1, 700] },
  ];

  for (const { shape: s, lengths } of cases) {
    const batch = lengths.length, maxLength = Math.max(...lengths), row = s.kvHeads * s.headDim;
    const range = s.dtype === 'float8_e4m3' ? 20 : 1; // fp8 stores value / scale: use its range
    const k = lengths.map((n, b) => randomValues(n * row, 100 + b, s.dtype, range));
    const v = lengths.map((n, b) => randomValues(n * row, 200 + b, s.dtype, range));
    const q = randomValues(batch * s.qHeads * s.headDim, 7, s.queryDtype) as Uint16Array;
    let want: Float64Array | undefined;
    const expected = () => (want ??= reference(s, q, k, v, lengths));
    const args = (out: bigint) => ({
      dtype: s.dtype,
      queryDtype: s.queryDtype,
      batch,
      qHeads: s.qHeads,
      kvHeads: s.kvHeads,
      headDim: s.headDim,
      q: upload(q),
      out,
      lengths: upload(Int32Array.from(lengths)),
      maxLength,
      ...(s.window ? { window: s.window } : {}),
      ...(s.softcap ? { softcap: s.softcap } : {}),
      ...(s.kvScale ? { kvScale: kvScaleArg(s) } : {}),
    });
    const result = (out: bigint) => gpu.copyFromDevice(new Uint16Array(q.length), out);

    for (const { name, layout } of layouts) {
      it(`matches the CPU reference on the ${name} layout, with any split (${tag(s, lengths)})`, () => {
        const layers = 4, layer = 2;
        using c = new KVCache({ backend: 'cuda', layers, kvHeads: s.kvHeads, headDim: s.headDim, dtype: s.dtype, maxSequences: batch + 2, maxTokens: 4200, layout, prefetchTokens: 0 });
        // a released sequence first, so entries do not sit in slots 0..batch-1
        c.release(c.reserve());
        const seqs: Sequence[] = [];
        lengths.forEach((n, b) => {
          const seq = c.reserve();
          seqs.push(seq);
          c.grow(seq, n);
          for (let l = 0; l < layers; l++) {
            if (n === 0) continue;
            // other layers get other data: a kernel reading the wrong view fails
            c.write(seq, { layer: l, kind: 'k', token: 0 }, l === layer ? k[b]! : randomValues(k[b]!.length, 1000 * l + b, s.dtype, range));
            c.write(seq, { layer: l, kind: 'v', token: 0 }, l === layer ? v[b]! : randomValues(v[b]!.length, 2000 * l + b, s.dtype, range));
          }
        });
        const kv = { ...kernels.cacheKV(c.tensor(layer, 'k'), c.tensor(layer, 'v')), rows: upload(Int32Array.from(seqs, (x) => x.slot)) };
        const out = upload(new Uint16Array(q.length));
        const plan = kernels.decodeAttention({ ...args(out), ...kv, liveLengths: lengths });
        expect(worstExcess(s.queryDtype, result(out), expected())).toBeLessThanOrEqual(0);
        expect(plan.splits).toBeGreaterThanOrEqual(1);
        // one split (no reduce kernel) and an odd number of splits give the same answer
        for (const splits of [1, 7]) {
          const other = upload(new Uint16Array(q.length));
          expect(kernels.decodeAttention({ ...args(other), ...kv, splits }).splits).toBe(splits);
          expect(worstExcess(s.queryDtype, result(other), expected()), `${splits} splits`).toBeLessThanOrEqual(0);
        }
      });
    }

    it(`matches the CPU reference in paged blocks of 16 with a shuffled table (${tag(s, lengths)})`, () => {
      const out = upload(new Uint16Array(q.length));
      kernels.decodeAttention({ ...args(out), ...pagedCopy(s, k, v, lengths, 11, maxLength) });
      expect(worstExcess(s.queryDtype, result(out), expected())).toBeLessThanOrEqual(0);
    });
  }

  // Every module (cache type × head dimension) once, paged and on a plain tensor.
  for (const dtype of ['float16', 'bfloat16', 'float8_e4m3'] as const)
    for (const headDim of kernels.HEAD_DIMS) {
      const s: Shape = { dtype, queryDtype: dtype === 'bfloat16' ? 'bfloat16' : 'float16', qHeads: 8, kvHeads: 2, headDim, ...(dtype === 'float8_e4m3' ? { kvScale: { k: 0.05, v: 0.05 } } : {}) };
      const lengths = [1, 300, 1025];
      it(`the ${dtype} module of head dim ${headDim} matches the reference, paged and on a plain tensor`, () => {
        const row = s.kvHeads * headDim, T = 1032, range = dtype === 'float8_e4m3' ? 20 : 1;
        const k = lengths.map((n, b) => randomValues(n * row, 300 + b, dtype, range)), v = lengths.map((n, b) => randomValues(n * row, 400 + b, dtype, range));
        const q = randomValues(lengths.length * s.qHeads * headDim, 500, s.queryDtype) as Uint16Array;
        const want = reference(s, q, k, v, lengths);
        const common = { dtype, queryDtype: s.queryDtype, batch: 3, qHeads: s.qHeads, kvHeads: s.kvHeads, headDim, q: upload(q), lengths: upload(Int32Array.from(lengths)), maxLength: 1025, ...(s.kvScale ? { kvScale: kvScaleArg(s) } : {}) };
        const paged = upload(new Uint16Array(q.length));
        kernels.decodeAttention({ ...common, out: paged, ...pagedCopy(s, k, v, lengths, 13, 1025) });
        expect(worstExcess(s.queryDtype, gpu.copyFromDevice(new Uint16Array(q.length), paged), want), 'paged').toBeLessThanOrEqual(0);
        const kAll = storage(dtype, 3 * T * row), vAll = storage(dtype, 3 * T * row);
        lengths.forEach((_, b) => {
          kAll.set(k[b]!, b * T * row);
          vAll.set(v[b]!, b * T * row);
        });
        const plain = upload(new Uint16Array(q.length));
        kernels.decodeAttention({ ...common, out: plain, k: upload(kAll), v: upload(vAll), strides: { row: T * row, token: row, head: headDim } });
        expect(worstExcess(s.queryDtype, gpu.copyFromDevice(new Uint16Array(q.length), plain), want), 'plain').toBeLessThanOrEqual(0);
      });
    }

  it('runs on a plain [B, T, H, D] tensor in cuMemAlloc memory (rows default to the entry index)', () => {
    const s: Shape = { ...f16, qHeads: 32, kvHeads: 8, headDim: 128 };
    const lengths = [300, 77], T = 512, row = s.kvHeads * s.headDim;
    const k = lengths.map((n, b) => randomValues(n * row, 30 + b, s.dtype));
    const v = lengths.map((n, b) => randomValues(n * row, 40 + b, s.dtype));
    const kAll = new Uint16Array(lengths.length * T * row), vAll = new Uint16Array(lengths.length * T * row);
    lengths.forEach((_, b) => {
      kAll.set(k[b]!, b * T * row);
      vAll.set(v[b]!, b * T * row);
    });
    const q = randomValues(lengths.length * s.qHeads * s.headDim, 9, s.dtype) as Uint16Array;
    const out = upload(new Uint16Array(q.length));
    kernels.decodeAttention({ ...s, batch: 2, q: upload(q), out, lengths: upload(Int32Array.from(lengths)), maxLength: 300, k: upload(kAll), v: upload(vAll), strides: { row: T * row, token: row, head: s.headDim } });
    expect(worstExcess(s.queryDtype, gpu.copyFromDevice(new Uint16Array(q.length), out), reference(s, q, k, v, lengths))).toBeLessThanOrEqual(0);
  });

  it('plans from the live lengths: a batch of short sequences in long reservations gets the plan of its live length', () => {
    const base = { dtype: 'float16' as const, batch: 4, qHeads: 32, kvHeads: 8, headDim: 128, maxLength: 131_072 };
    const at = upload(new Uint8Array(64));
    const addresses = { q: at, out: at, lengths: at, k: at, v: at, strides: { row: 131_072 * 1024, token: 1024, head: 128 } };
    const full = kernels.planDecodeAttention({ ...base, ...addresses });
    const live = kernels.planDecodeAttention({ ...base, ...addresses, liveLengths: [100, 37, 250, 1] });
    expect(full.tokensPerSplit * full.splits).toBeGreaterThanOrEqual(131_072);
    expect(live.tokensPerSplit * live.splits).toBeLessThan(1024);
    expect(live.workspaceBytes).toBeLessThan(full.workspaceBytes);
  });

  it('concurrent calls on several streams give bit-identical results to the same calls on one stream', () => {
    const s: Shape = { ...f16, qHeads: 32, kvHeads: 8, headDim: 128 };
    const row = s.kvHeads * s.headDim, streams = [gpu.createStream(), gpu.createStream(), gpu.createStream()];
    try {
      // Three calls of different shapes (different splits and workspace sizes),
      // each needing a workspace; on one stream first, then all at once.
      const calls = [
        { batch: 1, length: 16_384 },
        { batch: 6, length: 3000 },
        { batch: 2, length: 9000 },
      ].map(({ batch, length }, i) => {
        const k = randomValues(batch * length * row, 50 + i, s.dtype), v = randomValues(batch * length * row, 60 + i, s.dtype);
        const q = randomValues(batch * s.qHeads * s.headDim, 70 + i, s.dtype);
        return {
          length: q.length,
          args: { ...s, batch, q: upload(q), lengths: upload(new Int32Array(batch).fill(length)), maxLength: length, k: upload(k), v: upload(v), strides: { row: length * row, token: row, head: s.headDim } },
        };
      });
      const serial = calls.map((c) => {
        const out = upload(new Uint16Array(c.length));
        kernels.decodeAttention({ ...c.args, out, stream: streams[0]! });
        return out;
      });
      gpu.synchronizeStream(streams[0]!);
      const spin = upload(new Uint32Array(4));
      const outs = calls.map(() => [] as bigint[]);
      for (let round = 0; round < 5; round++)
        calls.forEach((c, i) => {
          // each stream is held busy a moment so that the rounds overlap across streams
          if (round === 0) gpu.spinThenFillU32(spin, 4, 1, 20e6, { stream: streams[i]! });
          const out = upload(new Uint16Array(c.length));
          outs[i]!.push(out);
          expect(kernels.decodeAttention({ ...c.args, out, stream: streams[i]! }).splits).toBeGreaterThan(1);
        });
      for (const st of streams) gpu.synchronizeStream(st);
      calls.forEach((c, i) => {
        const want = gpu.copyFromDevice(new Uint16Array(c.length), serial[i]!);
        for (const out of outs[i]!) expect(Buffer.from(gpu.copyFromDevice(new Uint16Array(c.length), out).buffer).equals(Buffer.from(want.buffer)), `call ${i}`).toBe(true);
      });
    } finally {
      for (const st of streams) gpu.destroyStream(st);
    }
  });

  it('releaseStream frees what the kernels keep for a stream; the next calls make it again, with the same results', () => {
    const s: Shape = { ...f16, qHeads: 32, kvHeads: 8, headDim: 128 };
    const batch = 2, length = 9000, row = s.kvHeads * s.headDim;
    const q = randomValues(batch * s.qHeads * s.headDim, 91, s.dtype);
    const args = { ...s, batch, q: upload(q), lengths: upload(new Int32Array(batch).fill(length)), maxLength: length, k: upload(randomValues(batch * length * row, 92, s.dtype)), v: upload(randomValues(batch * length * row, 93, s.dtype)), strides: { row: length * row, token: row, head: s.headDim } };
    const input = upload(randomValues(16 * 64, 94, 'float16')), weight = upload(randomValues(64 * 64, 95, 'float16'));
    const library = kernels.linearLibrary(); // cuBLASLt is optional here: without it only the attention workspace is kept
    const stream = gpu.createStream();
    try {
      expect(kernels.releaseStream({ stream })).toBe(false); // nothing made for it yet
      const run = () => {
        const out = upload(new Uint16Array(q.length)), projected = upload(new Uint16Array(16 * 64));
        expect(kernels.decodeAttention({ ...args, out, stream }).splits).toBeGreaterThan(1); // uses the stream's workspace
        if (library.available) kernels.linear({ dtype: 'float16', rows: 16, inFeatures: 64, outFeatures: 64, input, weight, output: projected, stream });
        gpu.synchronizeStream(stream);
        return [gpu.copyFromDevice(new Uint16Array(q.length), out), gpu.copyFromDevice(new Uint16Array(16 * 64), projected)];
      };
      const first = run();
      expect(kernels.releaseStream({ stream })).toBe(true);
      expect(kernels.releaseStream({ stream })).toBe(false); // gone
      const again = run();
      again.forEach((values, i) => expect(Buffer.from(values.buffer).equals(Buffer.from(first[i]!.buffer)), `output ${i}`).toBe(true));
      expect(kernels.releaseStream({ stream })).toBe(true);
    } finally {
      gpu.destroyStream(stream);
    }
  });

  it('a caller-owned workspace: too small is refused before anything is queued, large enough gives the same result', () => {
    const s: Shape = { ...f16, qHeads: 32, kvHeads: 8, headDim: 128 };
    const length = 8192, row = s.kvHeads * s.headDim;
    const q = randomValues(s.qHeads * s.headDim, 3, s.dtype) as Uint16Array;
    const k = randomValues(length * row, 4, s.dtype), v = randomValues(length * row, 5, s.dtype);
    const call = { ...s, batch: 1, q: upload(q), lengths: upload(Int32Array.of(length)), maxLength: length, k: upload(k), v: upload(v), strides: { row: length * row, token: row, head: s.headDim } };
    const plan = kernels.planDecodeAttention({ ...call, out: call.q });
    expect(plan.workspaceBytes).toBeGreaterThan(0);
    using small = new kernels.AttentionWorkspace({ bytes: plan.workspaceBytes - 1 });
    const out = upload(new Uint16Array(q.length).fill(0x1234));
    expect(() => kernels.decodeAttention({ ...call, out, workspace: small })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT', message: expect.stringContaining(String(plan.workspaceBytes)) }));
    expect(gpu.copyFromDevice(new Uint16Array(q.length), out).every((x) => x === 0x1234)).toBe(true);
    using enough = new kernels.AttentionWorkspace({ bytes: plan.workspaceBytes });
    kernels.decodeAttention({ ...call, out, workspace: enough });
    expect(worstExcess(s.queryDtype, gpu.copyFromDevice(new Uint16Array(q.length), out), reference(s, q, [k], [v], [length]))).toBeLessThanOrEqual(0);
    enough.close();
    enough.close(); // idempotent
    expect(() => kernels.decodeAttention({ ...call, out, workspace: enough })).toThrow(expect.objectContaining({ code: 'ERR_CLOSED' }));
  });

  it('decode and append captured in a CUDA graph replay with new lengths and positions, as the same calls made directly', () => {
    const s: Shape = { ...f16, qHeads: 32, kvHeads: 8, headDim: 128 };
    const batch = 3, T = 4096, row = s.kvHeads * s.headDim;
    const stream = gpu.createStream();
    try {
      const k = randomValues(batch * T * row, 21, s.dtype), v = randomValues(batch * T * row, 22, s.dtype);
      const kNew = randomValues(batch * row, 23, s.dtype), vNew = randomValues(batch * row, 24, s.dtype);
      const q = randomValues(batch * s.qHeads * s.headDim, 25, s.dtype) as Uint16Array;
      const lengths = upload(new Int32Array(batch)), positions = upload(new Int32Array(batch));
      const cache = { dtype: s.dtype, kvHeads: s.kvHeads, headDim: s.headDim, k: upload(k), v: upload(v), strides: { row: T * row, token: row, head: s.headDim }, maxLength: T, stream };
      const decode = { ...cache, batch, qHeads: s.qHeads, q: upload(q), lengths, splits: 6 };
      const plan = kernels.planDecodeAttention({ ...decode, out: decode.q });
      using workspace = new kernels.AttentionWorkspace({ bytes: plan.workspaceBytes });
      const graphOut = upload(new Uint16Array(q.length)), directOut = upload(new Uint16Array(q.length));
      const append = { ...cache, batch, newTokens: 1, kNew: upload(kNew), vNew: upload(vNew), positions };
      // nothing but launches inside the capture: every buffer exists before it
      const step = (out: bigint) => {
        kernels.appendKV(append);
        kernels.decodeAttention({ ...decode, out, workspace });
      };
      const graph = gpu.captureGraph(stream, () => step(graphOut));
      try {
        for (const live of [[100, 1, 4000], [2049, 700, 17]]) {
          gpu.copyToDevice(positions, Int32Array.from(live, (n) => n - 1), { stream });
          gpu.copyToDevice(lengths, Int32Array.from(live), { stream });
          gpu.launchGraph(graph, stream);
          gpu.synchronizeStream(stream);
          const replayed = gpu.copyFromDevice(new Uint16Array(q.length), graphOut);
          step(directOut);
          gpu.synchronizeStream(stream);
          expect(Buffer.from(replayed.buffer).equals(Buffer.from(gpu.copyFromDevice(new Uint16Array(q.length), directOut).buffer)), `lengths ${live.join(' ')}`).toBe(true);
          // and the replay is right, not only repeatable: the appended token is the last one attended
          live.forEach((n, b) => {
            k.set(kNew.subarray(b * row, (b + 1) * row), (b * T + n - 1) * row);
            v.set(vNew.subarray(b * row, (b + 1) * row), (b * T + n - 1) * row);
          });
          const ks = live.map((n, b) => k.slice(b * T * row, (b * T + n) * row)), vs = live.map((n, b) => v.slice(b * T * row, (b * T + n) * row));
          expect(worstExcess(s.queryDtype, replayed, reference(s, q, ks, vs, live))).toBeLessThanOrEqual(0);
        }
      } finally {
        gpu.destroyGraph(graph);
      }
    } finally {
      gpu.destroyStream(stream);
    }
  });

  for (const [dtype, queryDtype] of [['float16', 'float16'], ['bfloat16', 'bfloat16'], ['float8_e4m3', 'float16'], ['float8_e4m3', 'bfloat16']] as const) {
    it(`appendKV writes new tokens at each entry's position, strided on a cache and paged (${dtype}, new tokens ${queryDtype})`, () => {
      const s: Shape = { dtype, queryDtype, qHeads: 8, kvHeads: 4, headDim: 128, ...(dtype === 'float8_e4m3' ? { kvScale: { k: 0.04, v: 0.02, perHead: true } } : {}) };
      const row = s.kvHeads * s.headDim, newTokens = 5, positions = [0, 1023, 3000], counts = [5, 2, 5], maxLength = 3003;
      const batch = positions.length;
      const range = dtype === 'float8_e4m3' ? 8 : 1;
      const kNew = randomValues(batch * newTokens * row, 80, queryDtype, range) as Uint16Array;
      const vNew = randomValues(batch * newTokens * row, 81, queryDtype, range) as Uint16Array;
      // What the cache must hold: each new element converted to the cache's type.
      const perHead = headScales(s);
      const fq = decoders[queryDtype], enc = encoders[dtype];
      const stored = (src: Uint16Array, b: number, n: number, kind: 'k' | 'v'): Stored => {
        const outRow = storage(dtype, row);
        for (let h = 0; h < s.kvHeads; h++) {
          const scale = Math.fround((kind === 'k' ? s.kvScale?.k : s.kvScale?.v) ?? 1) * (perHead ? perHead[kind][h]! : 1);
          const inverse = Math.fround(1 / Math.fround(scale));
          for (let d = 0; d < s.headDim; d++) {
            const x = fq(src[((b * newTokens + n) * s.kvHeads + h) * s.headDim + d]!);
            outRow[h * s.headDim + d] = enc(dtype === 'float8_e4m3' ? Math.fround(Math.fround(x) * inverse) : x);
          }
        }
        return outRow;
      };
      const common = {
        dtype,
        queryDtype,
        batch,
        newTokens,
        kvHeads: s.kvHeads,
        headDim: s.headDim,
        kNew: upload(kNew),
        vNew: upload(vNew),
        positions: upload(Int32Array.from(positions)),
        counts: upload(Int32Array.from(counts)),
        maxLength,
        ...(s.kvScale ? { kvScale: kvScaleArg(s) } : {}),
      };
      // strided: a per-layer cache's layer 1, sequences grown past their appends
      using c = new KVCache({ backend: 'cuda', layers: 2, kvHeads: s.kvHeads, headDim: s.headDim, dtype, maxSequences: 4, maxTokens: 4096, prefetchTokens: 0 });
      const seqs = positions.map(() => c.reserve());
      seqs.forEach((seq) => c.grow(seq, 3008));
      const before = seqs.map((seq) => c.read(seq, { layer: 1, kind: 'k', token: 0, count: 3008 }));
      kernels.appendKV({ ...common, ...kernels.cacheKV(c.tensor(1, 'k'), c.tensor(1, 'v')), rows: upload(Int32Array.from(seqs, (x) => x.slot)) });
      seqs.forEach((seq, b) => {
        for (const kind of ['k', 'v'] as const) {
          const got = c.read(seq, { layer: 1, kind, token: 0, count: 3008 });
          const bytesPerRow = row * (dtype === 'float8_e4m3' ? 1 : 2);
          for (let t = 0; t < 3008; t++) {
            const n = t - positions[b]!;
            const written = n >= 0 && n < counts[b]! && t < maxLength;
            const want = written ? new Uint8Array(stored(kind === 'k' ? kNew : vNew, b, n, kind).buffer) : kind === 'k' ? before[b]!.subarray(t * bytesPerRow, (t + 1) * bytesPerRow) : null;
            if (want) expect(Buffer.from(got.subarray(t * bytesPerRow, (t + 1) * bytesPerRow)).equals(Buffer.from(want)), `${kind} entry ${b} token ${t}`).toBe(true);
          }
        }
      });
      // paged: blocks of 16, a shuffled table; compare the blocks' bytes
      const blockSize = 16, maxBlocks = Math.ceil(maxLength / blockSize), order = shuffled(batch * maxBlocks, 5);
      const table = Int32Array.from(order);
      const bytesPerRow = row * (dtype === 'float8_e4m3' ? 1 : 2), poolBytes = batch * maxBlocks * blockSize * bytesPerRow;
      const kPool = upload(new Uint8Array(poolBytes)), vPool = upload(new Uint8Array(poolBytes));
      kernels.appendKV({ ...common, k: kPool, v: vPool, strides: { row: blockSize * row, token: row, head: s.headDim }, paged: { blockTable: upload(table), maxBlocksPerSequence: maxBlocks, blockSize } });
      for (const [kind, pool] of [['k', kPool], ['v', vPool]] as const) {
        const got = gpu.copyFromDevice(new Uint8Array(poolBytes), pool);
        const want = new Uint8Array(poolBytes);
        positions.forEach((p, b) => {
          for (let n = 0; n < counts[b]!; n++) {
            const t = p + n;
            if (t >= maxLength) continue;
            const block = table[b * maxBlocks + Math.floor(t / blockSize)]!;
            want.set(new Uint8Array(stored(kind === 'k' ? kNew : vNew, b, n, kind).buffer), (block * blockSize + (t % blockSize)) * bytesPerRow);
          }
        });
        expect(Buffer.from(got).equals(Buffer.from(want)), `paged ${kind}`).toBe(true);
      }
    });
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

  it("a sequence released with { stream } while attention still reads it keeps its pages until the kernel is done", () => {
    const s: Shape = { ...f16, qHeads: 32, kvHeads: 8, headDim: 128 };
    // Budget for one sequence: growing the second needs the first one's pages.
    const layers = 2, n = 4096;
    using c = new KVCache({ backend: 'cuda', layers, kvHeads: s.kvHeads, headDim: s.headDim, dtype: 'float16', maxSequences: 2, maxTokens: n, memoryBudget: 2 * layers * 4 * 2 ** 21, prefetchTokens: 0 });
    const stream = gpu.createStream();
    try {
      const a = c.reserve();
      c.grow(a, n);
      const row = s.kvHeads * s.headDim;
      const k = randomValues(n * row, 5, s.dtype), v = randomValues(n * row, 6, s.dtype);
      c.write(a, { layer: 1, kind: 'k', token: 0 }, k);
      c.write(a, { layer: 1, kind: 'v', token: 0 }, v);
      const q = randomValues(s.qHeads * s.headDim, 8, s.dtype) as Uint16Array;
      const out = upload(new Uint16Array(q.length));
      const spin = upload(new Uint32Array(4));
      // the stream is busy for 300 ms before attention reads a's pages
      gpu.spinThenFillU32(spin, 4, 1, 300e6, { stream });
      kernels.decodeAttention({ ...s, batch: 1, q: upload(q), out, lengths: upload(Int32Array.of(n)), maxLength: n, ...kernels.cacheKV(c.tensor(1, 'k'), c.tensor(1, 'v')), rows: upload(Int32Array.of(a.slot)), stream });
      c.release(a, { stream });
      const other = c.reserve({ expectedTokens: 0 }); // an empty slot, not a's
      expect(other.slot).not.toBe(a.slot);
      const waits = c.stats().driverCalls.fenceWait!.calls;
      c.grow(other, n); // needs a's pages: must wait for the fence, not unmap under the kernel
      expect(c.stats().driverCalls.fenceWait!.calls).toBeGreaterThan(waits);
      gpu.synchronizeStream(stream); // a kernel that faulted would throw here
      expect(worstExcess(s.queryDtype, gpu.copyFromDevice(new Uint16Array(q.length), out), reference(s, q, [k], [v], [n]))).toBeLessThanOrEqual(0);
    } finally {
      gpu.destroyStream(stream);
    }
  });
});

// Causal prefill: query token j of entry b (the last counts[b] of its
// lengths[b] tokens) is the decode of a sequence of its own position + 1
// tokens, so the decode reference checks it row by row; padding rows
// (j ≥ counts[b]) are zeros. Group ratios 1 (16 tokens a block), 3 (5 tokens,
// one row unused), 4 and 32 (two head chunks), a window, fp8, paged and plain.
describe.skipIf(cudaSkip !== null)(`prefill attention on the GPU${cudaSkip ? ` (skipped: ${cudaSkip})` : ''}`, () => {
  afterAll(() => {
    for (const b of buffers.splice(0)) gpu.free(b);
  });
  const f16 = { dtype: 'float16', queryDtype: 'float16' } as const;
  const bf16 = { dtype: 'bfloat16', queryDtype: 'bfloat16' } as const;
  const cases: { shape: Shape; lengths: number[]; counts: number[] }[] = [
    { shape: { ...f16, qHeads: 32, kvHeads: 8, headDim: 128 }, lengths: [70, 300, 17], counts: [70, 33, 1] },
    { shape: { ...bf16, qHeads: 4, kvHeads: 4, headDim: 64 }, lengths: [45, 1030], counts: [45, 40] },
    { shape: { ...f16, qHeads: 6, kvHeads: 2, headDim: 80, window: 20 }, lengths: [64, 90], counts: [64, 2] },
    { shape: { ...bf16, qHeads: 32, kvHeads: 1, headDim: 256 }, lengths: [19, 5], counts: [19, 5] },
    { shape: { dtype: 'float8_e4m3', queryDtype: 'float16', qHeads: 8, kvHeads: 2, headDim: 128, kvScale: { k: 0.05, v: 0.03 } }, lengths: [50, 600], counts: [50, 31] },
  ];
  for (const { shape: s, lengths, counts } of cases) {
    it(`matches the decode reference per query token, paged and on a plain tensor (${tag(s, lengths)}, new ${counts.join(' ')})`, () => {
      const batch = lengths.length, queryTokens = Math.max(...counts), row = s.kvHeads * s.headDim, maxLength = Math.max(...lengths);
      const range = s.dtype === 'float8_e4m3' ? 20 : 1;
      const k = lengths.map((n, b) => randomValues(n * row, 600 + b, s.dtype, range)), v = lengths.map((n, b) => randomValues(n * row, 700 + b, s.dtype, range));
      const q = randomValues(batch * queryTokens * s.qHeads * s.headDim, 800, s.queryDtype) as Uint16Array;
      // one decode entry per (entry, query token)
      const rowLengths = lengths.flatMap((n, b) => Array.from({ length: queryTokens }, (_, j) => (j < counts[b]! ? n - counts[b]! + j + 1 : 0)));
      const want = reference(s, q, lengths.flatMap((_, b) => Array(queryTokens).fill(k[b])), lengths.flatMap((_, b) => Array(queryTokens).fill(v[b])), rowLengths);
      const common = {
        dtype: s.dtype, queryDtype: s.queryDtype, batch, qHeads: s.qHeads, kvHeads: s.kvHeads, headDim: s.headDim, queryTokens, q: upload(q),
        lengths: upload(Int32Array.from(lengths)), counts: upload(Int32Array.from(counts)), maxLength,
        ...(s.window ? { window: s.window } : {}), ...(s.kvScale ? { kvScale: kvScaleArg(s) } : {}),
      };
      const paged = upload(new Uint16Array(q.length).fill(0xffff)); // padding rows must come out zero
      kernels.prefillAttention({ ...common, out: paged, ...pagedCopy(s, k, v, lengths, 17, maxLength) });
      expect(worstExcess(s.queryDtype, gpu.copyFromDevice(new Uint16Array(q.length), paged), want), 'paged').toBeLessThanOrEqual(0);
      const T = maxLength + 8, kAll = storage(s.dtype, batch * T * row), vAll = storage(s.dtype, batch * T * row);
      lengths.forEach((_, b) => {
        kAll.set(k[b]!, b * T * row);
        vAll.set(v[b]!, b * T * row);
      });
      const plain = upload(new Uint16Array(q.length));
      kernels.prefillAttention({ ...common, out: plain, k: upload(kAll), v: upload(vAll), strides: { row: T * row, token: row, head: s.headDim } });
      expect(worstExcess(s.queryDtype, gpu.copyFromDevice(new Uint16Array(q.length), plain), want), 'plain').toBeLessThanOrEqual(0);
    });
  }
});
