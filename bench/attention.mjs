// Decode attention (vattention/kernels) over the cache against plain and paged
// memory (vAttention paper, Figures 6-7). One layer of a Llama-3-8B-shaped
// model (32 query heads, 8 KV heads, 128 dims), one query token per
// sequence, every sequence `context` tokens long. For each batch × context
// the kernel reads K and V from:
//   (a) per-layer    a cuda cache, per-layer layout (the tensor of one layer), fp16
//   (b) cuMemAlloc   one plain [B, T, H, D] buffer for K and one for V, fp16
//   (c) all-layers   a cuda cache, all 32 layers in one K and one V tensor, fp16
//   (e) paged 16     vLLM-style blocks of 16 tokens in cuMemAlloc memory, the
//                    block table shuffled as an allocator leaves it, fp16
//   (f) fp8          (a) with a float8_e4m3 cache (fp16 queries)
// Time per call: median of --iters calls (≥ 20), CUDA events around each,
// L2 flushed before each (a read of 2 × L2 of other memory), the stream held
// by a 200 µs spin so that launch time is not counted. Bandwidth: K
// and V bytes read / time, against the driver's peak (memory clock × bus
// width) and against the streaming-read ceiling measured in the same run
// (testing.streamRead over 1 GiB). A variant that does not fit in 60% of
// free memory is skipped. Then two calls on two streams at once against the
// same two on one stream, one after the other.
//   node bench/attention.mjs [--batches 1,8,32,128] [--contexts 1024,4096,16384] [--iters 30]
import { KVCache } from '../dist/esm/index.mjs';
import * as kernels from '../dist/esm/kernels.mjs';
import * as gpu from '../dist/esm/testing.mjs';
import { cudaPresent, saveResult, summarize, table } from './common.mjs';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
if (!cudaPresent()) {
  console.log('attention: skipped (needs a CUDA device with VMM support; the kernels run on the GPU only)');
  process.exit(0);
}
const batches = (args.batches ?? '1,8,32,128').split(',').map(Number);
const contexts = (args.contexts ?? '1024,4096,16384').split(',').map(Number);
const iters = Math.max(20, Number(args.iters ?? 30));
const model = { layers: 32, qHeads: 32, kvHeads: 8, headDim: 128 };
const row = model.kvHeads * model.headDim; // elements of one token of one layer's K
const peak = gpu.peakBandwidth();
const props = gpu.deviceProperties();

const variants = [
  { id: 'a', name: 'per-layer', cache: { layers: 2, layout: 'per-layer' }, dtype: 'float16' },
  { id: 'b', name: 'cuMemAlloc', plain: true, dtype: 'float16' },
  { id: 'c', name: 'all-layers', cache: { layers: model.layers, layout: 'all-layers' }, dtype: 'float16' },
  { id: 'e', name: 'paged 16', paged: true, dtype: 'float16' },
  { id: 'f', name: 'fp8 per-layer', cache: { layers: 2, layout: 'per-layer' }, dtype: 'float8_e4m3' },
];
const bytesOf = (dtype) => (dtype === 'float8_e4m3' ? 1 : 2);

/** Bytes of device memory a variant needs for B sequences of T tokens. */
function footprint(v, B, T) {
  const layers = v.cache ? v.cache.layers : 1;
  return 2 * B * T * row * bytesOf(v.dtype) * layers;
}

const scratch = [];
function upload(data) {
  const at = gpu.allocate(Math.max(16, data.byteLength));
  scratch.push(at);
  gpu.copyToDevice(at, data);
  return at;
}
function allocate(bytes) {
  const at = gpu.allocate(bytes);
  scratch.push(at);
  return at;
}
function freeScratch() {
  for (const at of scratch.splice(0)) gpu.free(at);
}

/** The K/V arguments of one variant; `close` frees what it made. */
function setup(v, B, T) {
  const rowBytes = row * bytesOf(v.dtype);
  if (v.cache) {
    const cache = new KVCache({ backend: 'cuda', kvHeads: model.kvHeads, headDim: model.headDim, dtype: v.dtype, ...v.cache, maxSequences: B, maxTokens: T, prefetchTokens: 0 });
    const seqs = Array.from({ length: B }, () => cache.reserve());
    for (const s of seqs) cache.grow(s, T);
    const layer = v.cache.layers - 1;
    return {
      kv: { ...kernels.cacheKV(cache.tensor(layer, 'k'), cache.tensor(layer, 'v')), rows: upload(Int32Array.from(seqs, (s) => s.slot)) },
      close: () => cache.close(),
    };
  }
  if (v.plain) {
    const k = allocate(B * T * rowBytes), vv = allocate(B * T * rowBytes);
    return { kv: { k, v: vv, strides: { row: T * row, token: row, head: model.headDim } }, close: () => {} };
  }
  const blockSize = 16, perSeq = Math.ceil(T / blockSize), blocks = B * perSeq;
  const order = Int32Array.from({ length: blocks }, (_, i) => i);
  let x = 12345;
  for (let i = blocks - 1; i > 0; i--) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    const j = x % (i + 1);
    [order[i], order[j]] = [order[j], order[i]];
  }
  const k = allocate(blocks * blockSize * rowBytes), vv = allocate(blocks * blockSize * rowBytes);
  return {
    kv: { k, v: vv, strides: { row: blockSize * row, token: row, head: model.headDim }, paged: { blockTable: upload(order), maxBlocksPerSequence: perSeq, blockSize } },
    close: () => {},
  };
}

// L2 flush: reading this much other memory before each timed call leaves
// none of the call's K/V in L2.
const flushBytes = Math.max(2 * props.l2Bytes, 64 << 20);
const flush = gpu.allocate(flushBytes);

// Before each timed call the stream spins this long, so that the host has
// queued the call before the start event runs: the figure is the GPU's
// time, not the launch's (a call takes some µs of JS and driver time).
const spin = gpu.allocate(16);
const holdStream = (s) => gpu.spinThenFillU32(spin, 4, 1, 200e3, { stream: s });

/** Median GPU time (ms) of `launch`, L2 flushed before each call. */
function medianMs(launch, stream) {
  const start = gpu.createEvent(), end = gpu.createEvent();
  try {
    for (let i = 0; i < 3; i++) launch(); // warm-up (and JIT)
    const ms = [];
    for (let i = 0; i < iters; i++) {
      gpu.streamRead(flush, flushBytes, { stream });
      holdStream(stream);
      gpu.recordEvent(start, stream);
      launch();
      gpu.recordEvent(end, stream);
      ms.push(gpu.elapsedMilliseconds(start, end));
    }
    return summarize(ms).p50;
  } finally {
    gpu.destroyEvent(start);
    gpu.destroyEvent(end);
  }
}

const stream = gpu.createStream();

// The streaming-read ceiling: a plain read of 1 GiB, nothing else.
const ceilingBytes = 1 << 30;
const ceilingBuffer = gpu.allocate(ceilingBytes);
const ceilingMs = medianMs(() => gpu.streamRead(ceilingBuffer, ceilingBytes, { stream }), stream);
gpu.free(ceilingBuffer);
const ceiling = ceilingBytes / (ceilingMs / 1e3);

function callFor(v, B, T, kv) {
  return {
    dtype: v.dtype,
    ...(v.dtype === 'float8_e4m3' ? { queryDtype: 'float16', kvScale: { k: 1, v: 1 } } : {}),
    batch: B,
    qHeads: model.qHeads,
    kvHeads: model.kvHeads,
    headDim: model.headDim,
    q: allocate(B * model.qHeads * model.headDim * 2),
    out: allocate(B * model.qHeads * model.headDim * 2),
    lengths: upload(new Int32Array(B).fill(T)),
    liveLengths: new Int32Array(B).fill(T),
    maxLength: T,
    stream,
    ...kv,
  };
}

const results = [];
console.log(
  `decode attention, ${model.qHeads}/${model.kvHeads} heads × ${model.headDim}; device peak ${(peak / 1e12).toFixed(2)} TB/s, ` +
    `streaming-read ceiling ${(ceiling / 1e12).toFixed(2)} TB/s (${((ceiling / peak) * 100).toFixed(1)}% of peak), ${props.multiprocessors} SMs; median of ${iters}, L2 flushed`,
);
for (const B of batches) {
  for (const T of contexts) {
    const { freeBytes } = gpu.deviceMemory();
    const r = { batch: B, context: T, tokens: B * T, us: {}, bytes: {}, plan: null };
    for (const v of variants) {
      if (footprint(v, B, T) > 0.6 * freeBytes) {
        r.us[v.id] = null;
        continue;
      }
      const { kv, close } = setup(v, B, T);
      try {
        const call = callFor(v, B, T, kv);
        const plan = kernels.planDecodeAttention(call);
        r.us[v.id] = medianMs(() => kernels.decodeAttention(call), stream) * 1000;
        r.bytes[v.id] = 2 * B * T * row * bytesOf(v.dtype);
        if (v.id === 'a') r.plan = plan;
      } finally {
        close();
        freeScratch();
      }
    }
    results.push(r);
  }
}

const us = (r, id) => (r.us[id] == null ? '—' : r.us[id].toFixed(1));
const ratio = (r, a, b) => (r.us[a] == null || r.us[b] == null ? '—' : (r.us[a] / r.us[b]).toFixed(3));
const rate = (r, id) => r.bytes[id] / (r.us[id] / 1e6);
const share = (r, id, of) => (r.us[id] == null ? '—' : `${((rate(r, id) / of) * 100).toFixed(0)}%`);
console.log(
  table(results, [
    { title: 'B', value: (r) => r.batch },
    { title: 'context', value: (r) => r.context },
    ...variants.map((v) => ({ title: `(${v.id}) µs`, value: (r) => us(r, v.id) })),
    { title: '(a) of peak', value: (r) => share(r, 'a', peak) },
    { title: '(a) of ceiling', value: (r) => share(r, 'a', ceiling) },
    { title: '(e) of peak', value: (r) => share(r, 'e', peak) },
    { title: '(f) of peak', value: (r) => share(r, 'f', peak) },
    { title: '(e)/(a)', value: (r) => ratio(r, 'e', 'a') },
    { title: '(c)/(a)', value: (r) => ratio(r, 'c', 'a') },
    { title: '(a)/(f)', value: (r) => ratio(r, 'a', 'f') },
    { title: 'splits', value: (r) => r.plan?.splits ?? '—' },
  ]),
);
console.log(variants.map((v) => `(${v.id}) ${v.name}`).join('; '));

// Two calls on two streams at once against the same two on one stream.
function twoStreams(B, T) {
  const v = variants[1];
  const other = gpu.createStream();
  const made = [setup(v, B, T), setup(v, B, T)];
  try {
    const calls = made.map(({ kv }, i) => ({ ...callFor(v, B, T, kv), stream: i === 0 ? stream : other }));
    for (const c of calls) gpu.fillU32(c.q, (B * model.qHeads * model.headDim) / 2, 7, { stream: c.stream });
    const serialOut = calls.map(() => allocate(B * model.qHeads * model.headDim * 2));
    const oneStream = medianMs(() => calls.forEach((c, i) => kernels.decodeAttention({ ...c, out: serialOut[i], stream })), stream);
    gpu.synchronizeStream(stream);
    const startA = gpu.createEvent(), startB = gpu.createEvent(), endA = gpu.createEvent(), endB = gpu.createEvent();
    const spans = [];
    for (let i = 0; i < iters; i++) {
      gpu.streamRead(flush, flushBytes, { stream });
      gpu.synchronizeStream(stream);
      // both streams held, then released at about the same time with both calls queued
      holdStream(stream);
      holdStream(other);
      gpu.recordEvent(startA, stream);
      gpu.recordEvent(startB, other);
      kernels.decodeAttention(calls[0]);
      kernels.decodeAttention(calls[1]);
      gpu.recordEvent(endA, stream);
      gpu.recordEvent(endB, other);
      gpu.synchronizeStream(stream);
      gpu.synchronizeStream(other);
      const sB = gpu.elapsedMilliseconds(startA, startB);
      spans.push(Math.max(gpu.elapsedMilliseconds(startA, endA), gpu.elapsedMilliseconds(startA, endB)) - Math.min(0, sB));
    }
    const same = calls.every((c, i) => {
      const n = B * model.qHeads * model.headDim;
      return Buffer.from(gpu.copyFromDevice(new Uint16Array(n), c.out).buffer).equals(Buffer.from(gpu.copyFromDevice(new Uint16Array(n), serialOut[i]).buffer));
    });
    for (const e of [startA, startB, endA, endB]) gpu.destroyEvent(e);
    return { batch: B, context: T, oneStreamUs: oneStream * 1000, twoStreamsUs: summarize(spans).p50 * 1000, sameOutputs: same };
  } finally {
    for (const m of made) m.close();
    freeScratch();
    gpu.destroyStream(other);
  }
}
const concurrency = [twoStreams(8, 4096), twoStreams(1, 16384)];
console.log(
  table(concurrency, [
    { title: 'B', value: (r) => r.batch },
    { title: 'context', value: (r) => r.context },
    { title: 'one stream, 2 calls µs', value: (r) => r.oneStreamUs.toFixed(1) },
    { title: 'two streams at once µs', value: (r) => r.twoStreamsUs.toFixed(1) },
    { title: 'ratio', value: (r) => (r.twoStreamsUs / r.oneStreamUs).toFixed(3) },
    { title: 'same outputs', value: (r) => (r.sameOutputs ? 'yes' : 'NO') },
  ]),
);
gpu.free(flush);
gpu.free(spin);
gpu.destroyStream(stream);
saveResult('attention', { model, iters, peakBandwidth: peak, streamingReadCeiling: ceiling, device: props, variants: variants.map(({ id, name }) => ({ id, name })), results, concurrency });
