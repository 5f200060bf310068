// Decode attention over the cache against plain and paged memory (vAttention
// paper, Figures 6-7; kvcached's layout measurements). One layer of a
// Llama-3-8B-shaped model (32 query heads, 8 KV heads, 128 dims, fp16), one
// query token per sequence, every sequence `context` tokens long. For each
// batch × context, the same kernel (native/kernels/decode_attention.cu) reads
// K and V from:
//   (a) per-layer    a cuda cache, per-layer layout (the tensor of one layer)
//   (b) cuMemAlloc   one plain [B, T, H, D] buffer for K and one for V
//   (c) all-layers   a cuda cache, all 32 layers in one K and one V tensor
//   (c') all-layers with 32 MiB pages (larger handles: a mitigation)
//   (d) 4 groups     a cuda cache, { layerGroups: 4 } (8 layers per tensor)
//   (e) paged        vLLM-style blocks of 16 tokens in cuMemAlloc memory, the
//                    block table shuffled as an allocator leaves it
// Time per call: median of --iters calls after warm-up, CUDA events around
// each. Bandwidth: K and V bytes read / time; peak from the driver's memory
// clock and bus width. A variant that does not fit in 60% of free memory is
// skipped (the all-layers caches back every layer's memory).
//   node bench/attention.mjs [--batches 1,8,32,128] [--contexts 1024,4096,16384] [--iters 30]
import { KVCache } from '../dist/esm/index.mjs';
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
const iters = Number(args.iters ?? 30);
const model = { layers: 32, qHeads: 32, kvHeads: 8, headDim: 128, dtype: 'float16' };
const row = model.kvHeads * model.headDim; // elements of one token of one layer's K
const rowBytes = row * 2;
const peak = gpu.peakBandwidth();
const props = gpu.deviceProperties();

const variants = [
  { id: 'a', name: 'per-layer', cache: { layers: 2, layout: 'per-layer' } },
  { id: 'b', name: 'cuMemAlloc', plain: true },
  { id: 'c', name: 'all-layers', cache: { layers: model.layers, layout: 'all-layers' } },
  { id: "c'", name: 'all-layers 32 MiB pages', cache: { layers: model.layers, layout: 'all-layers', pageSize: 32 << 20 } },
  { id: 'd', name: '4 layer groups', cache: { layers: model.layers, layout: { layerGroups: 4 } } },
  { id: 'e', name: 'paged 16', paged: true },
];

/** Bytes of device memory a variant needs for B sequences of T tokens. */
function footprint(v, B, T) {
  const layers = v.cache ? v.cache.layers : 1;
  return 2 * B * T * rowBytes * layers;
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

/** The K/V arguments of one variant; `close` frees what it made. */
function setup(v, B, T) {
  if (v.cache) {
    const cache = new KVCache({ backend: 'cuda', kvHeads: model.kvHeads, headDim: model.headDim, dtype: model.dtype, ...v.cache, maxSequences: B, maxTokens: T, prefetchTokens: 0 });
    const seqs = Array.from({ length: B }, () => cache.reserve());
    for (const s of seqs) cache.grow(s, T);
    const layer = v.cache.layers - 1;
    return {
      kv: { ...gpu.cacheKV(cache.tensor(layer, 'k'), cache.tensor(layer, 'v')), rows: upload(Int32Array.from(seqs, (s) => s.slot)) },
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
    kv: {
      k,
      v: vv,
      strides: { row: blockSize * row, token: row, head: model.headDim },
      paged: { blockTable: upload(order), maxBlocksPerSequence: perSeq, blockSize },
    },
    close: () => {},
  };
}

function freeScratch() {
  for (const at of scratch.splice(0)) gpu.free(at);
}

/** Median GPU time (ms) of one attention call, and its plan. */
function time(call, stream) {
  const start = gpu.createEvent(), end = gpu.createEvent();
  try {
    let plan;
    for (let i = 0; i < 3; i++) plan = gpu.decodeAttention({ ...call, stream }); // warm-up (and JIT)
    const ms = [];
    for (let i = 0; i < iters; i++) {
      gpu.recordEvent(start, stream);
      gpu.decodeAttention({ ...call, stream });
      gpu.recordEvent(end, stream);
      ms.push(gpu.elapsedMilliseconds(start, end));
    }
    return { ms: summarize(ms).p50, plan };
  } finally {
    gpu.destroyEvent(start);
    gpu.destroyEvent(end);
  }
}

const stream = gpu.createStream();
const results = [];
console.log(`decode attention, ${model.qHeads}/${model.kvHeads} heads × ${model.headDim}, fp16; device peak ${(peak / 1e12).toFixed(2)} TB/s, ${props.multiprocessors} SMs; median of ${iters}`);
for (const B of batches) {
  for (const T of contexts) {
    const { freeBytes } = gpu.deviceMemory();
    const r = { batch: B, context: T, tokens: B * T, bytes: 2 * B * T * rowBytes, us: {}, plan: null };
    for (const v of variants) {
      if (footprint(v, B, T) > 0.6 * freeBytes) {
        r.us[v.id] = null;
        continue;
      }
      const { kv, close } = setup(v, B, T);
      try {
        const q = allocate(B * model.qHeads * model.headDim * 2), out = allocate(B * model.qHeads * model.headDim * 2);
        const lengths = upload(new Int32Array(B).fill(T));
        const t = time({ dtype: model.dtype, batch: B, qHeads: model.qHeads, kvHeads: model.kvHeads, headDim: model.headDim, q, out, lengths, maxLength: T, ...kv }, stream);
        r.us[v.id] = t.ms * 1000;
        r.plan ??= t.plan;
      } finally {
        close();
        freeScratch();
      }
    }
    results.push(r);
  }
}
gpu.destroyStream(stream);

const us = (r, id) => (r.us[id] == null ? '—' : r.us[id].toFixed(1));
const ratio = (r, a, b) => (r.us[a] == null || r.us[b] == null ? '—' : (r.us[a] / r.us[b]).toFixed(3));
const share = (r, id) => (r.us[id] == null ? '—' : `${((r.bytes / (r.us[id] / 1e6) / peak) * 100).toFixed(0)}%`);
console.log(
  table(results, [
    { title: 'B', value: (r) => r.batch },
    { title: 'context', value: (r) => r.context },
    ...variants.map((v) => ({ title: `(${v.id}) µs`, value: (r) => us(r, v.id) })),
    { title: '(a)/(b)', value: (r) => ratio(r, 'a', 'b') },
    { title: '(c)/(a)', value: (r) => ratio(r, 'c', 'a') },
    { title: "(c')/(a)", value: (r) => ratio(r, "c'", 'a') },
    { title: '(d)/(a)', value: (r) => ratio(r, 'd', 'a') },
    { title: '(e)/(a)', value: (r) => ratio(r, 'e', 'a') },
    { title: '(a) of peak', value: (r) => share(r, 'a') },
    { title: '(b) of peak', value: (r) => share(r, 'b') },
    { title: 'splits', value: (r) => r.plan?.splits ?? '—' },
  ]),
);
console.log(variants.map((v) => `(${v.id}) ${v.name}`).join('; '));
saveResult('attention', { model, iters, peakBandwidth: peak, device: props, variants: variants.map(({ id, name }) => ({ id, name })), results });
