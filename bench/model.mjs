// A Llama-3-8B-shaped model (examples/llama, random fp16 weights filled on
// the device from a seed) decoding through the cache, contiguous against
// paged (the vAttention paper's end-to-end comparison). For each batch B ×
// context T that fits, B sequences are grown to T tokens (their K/V are
// whatever the pages hold: attention reads every byte the same) and decode
// --steps steps, each: cache.step (the library, timed on its own), the
// host → device copy of the step's tokens and tables, the forward pass as
// one CUDA graph (captured once per row after a warm-up step; the kernels'
// addresses stay fixed because a sequence's KV does not move), the read of
// the B chosen tokens. Stores: a KVCache of each layout, and vLLM-style
// paged blocks of 16 (examples/llama/kv-stores.mjs) with the same kernels in
// their paged mode.
// Roofline of a step: the weights (read once per step) plus the K/V of
// B × T tokens over 32 layers, at the streaming-read bandwidth measured in
// the same run (testing.streamRead over 4 GiB).
// Then: where the GPU time of one step goes (CUDA events between the
// kernels of an eager step, B = 16, T = 4096), prefill tokens/s of 1 × 8192
// and 16 × 1024 prompts, and the prefill attention kernel's TFLOP/s.
//   node bench/model.mjs [--rows 1x1024,16x4096,...] [--stores per-layer,all-layers,layer-groups:8,paged] [--steps 32]
import { KVCache } from '../dist/esm/index.mjs';
import * as kernels from '../dist/esm/kernels.mjs';
import * as gpu from '../dist/esm/testing.mjs';
import { parseConfig, SHAPES } from '../examples/llama/config.mjs';
import { GpuModel } from '../examples/llama/gpu-model.mjs';
import { CacheKV, PagedKV } from '../examples/llama/kv-stores.mjs';
import { cudaPresent, environment, nowNs, saveResult, summarize, table } from './common.mjs';

const HELP = `node bench/model.mjs [options]
  --rows LIST     batch x context pairs (default 1x1024,1x4096,1x16384,16x1024,16x4096,16x16384,64x1024,64x4096,256x1024)
  --stores LIST   per-layer,all-layers,layer-groups:8,paged (default all four)
  --steps N       timed decode steps per row (default 32, after 2 warm-up steps)
  --no-prefill    skip the prefill figures`;
const argv = process.argv.slice(2);
if (argv.includes('--help')) {
  console.log(HELP);
  process.exit(0);
}
const args = Object.fromEntries(argv.reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []));
if (!cudaPresent()) {
  console.log('model: skipped (needs a CUDA device with VMM support)');
  process.exit(0);
}
const cublas = kernels.linearLibrary();
if (!cublas.available) {
  console.log(`model: skipped (${cublas.problem})`);
  process.exit(0);
}

const m = parseConfig(SHAPES['llama-3-8b']);
const rows = (args.rows ?? '1x1024,1x4096,1x16384,16x1024,16x4096,16x16384,64x1024,64x4096,256x1024').split(',').map((r) => r.split('x').map(Number));
const stores = (args.stores ?? 'per-layer,all-layers,layer-groups:8,paged').split(',');
const steps = Number(args.steps ?? 32);
const tokenKvBytes = m.layers * 2 * m.kvHeads * m.headDim * 2; // K and V of one token, every layer

const stream = gpu.createStream();
const model = new GpuModel(m, { fill: { seed: 1 }, maxRows: 16384, maxBatch: 256, stream });
const ceiling = streamingRead();

function streamingRead() {
  const bytes = 4 * 2 ** 30, buffer = gpu.allocate(bytes);
  const [start, end] = [gpu.createEvent(), gpu.createEvent()];
  const times = [];
  for (let i = 0; i < 5; i++) {
    gpu.recordEvent(start, stream);
    gpu.streamRead(buffer, bytes, { stream });
    gpu.recordEvent(end, stream);
    gpu.synchronizeStream(stream);
    times.push(gpu.elapsedMilliseconds(start, end));
  }
  gpu.free(buffer);
  return bytes / (summarize(times).p50 / 1e3);
}

/** The store for `name` holding B sequences of up to `maxTokens`, grown to T - 1. */
function makeStore(name, B, T, maxTokens = T + steps + 8) {
  if (name === 'paged') {
    const kv = new PagedKV(m, { blocks: B * Math.ceil(maxTokens / 16) + 8, maxSequences: B, maxTokens });
    const seqs = Array.from({ length: B }, () => kv.reserve());
    closingOnError(kv, () => kv.step(seqs, seqs.map(() => T - 1)));
    return { kv, seqs, step: (lengths) => kv.step(seqs, lengths), close: () => kv.close() };
  }
  const layout = name.startsWith('layer-groups:') ? { layerGroups: Number(name.split(':')[1]) } : name;
  const cache = new KVCache({ backend: 'cuda', layers: m.layers, kvHeads: m.kvHeads, headDim: m.headDim, dtype: 'float16', maxSequences: B, maxTokens, layout });
  const seqs = Array.from({ length: B }, () => cache.reserve());
  closingOnError(cache, () => seqs.forEach((s) => cache.grow(s, T - 1)));
  const kv = new CacheKV(cache);
  return { kv, seqs, step: (lengths) => cache.step(seqs, lengths), close: () => (kv.close(), cache.close()) };
}

/** Runs `fill`; when it throws (a row too large: ERR_OUT_OF_MEMORY), closes `store` first, so the next row has its memory. */
function closingOnError(store, fill) {
  try {
    fill();
  } catch (e) {
    store.close();
    throw e;
  }
}

/**
 * Bytes `name` backs for B sequences of T tokens: whole 2 MiB pages per K or V tensor of each layer group (the
 * page rounding of every sequence), or blocks of 16 tokens.
 */
function storeBytes(name, B, T) {
  if (name === 'paged') return (B * Math.ceil(T / 16) + 8) * 16 * tokenKvBytes;
  const groups = name === 'all-layers' ? 1 : name === 'per-layer' ? m.layers : Number(name.split(':')[1]);
  const rowBytes = tokenKvBytes / 2 / groups, page = 2 ** 21; // one token's K (or V) in a layer group's tensor
  return B * 2 * groups * Math.ceil((T * rowBytes) / page) * page;
}

const fits = (name, B, T) => storeBytes(name, B, T) < 0.95 * gpu.deviceMemory().freeBytes;

/**
 * Decode steps of B sequences at context T over `storeName`. The timed steps end at T tokens (from T - steps + 1):
 * a row of context 1024 stays within the pages of 1024 tokens rather than paying for a page group it would enter
 * only at its last steps.
 */
function decodeRow(B, T, storeName) {
  const first = T - steps - 3;
  const store = makeStore(storeName, B, first + 1, T);
  try {
    const lengths = Array(B).fill(first);
    const tokens = Array(B).fill(1);
    const batch = () => store.seqs.map((seq, b) => ({ seq, tokens: [tokens[b]], position: lengths[b] - 1 }));
    // fixed splits (planned for the longest length the row reaches) and workspace: the graph's arguments
    const plan = kernels.planDecodeAttention({ dtype: 'float16', kvHeads: m.kvHeads, headDim: m.headDim, batch: B, qHeads: m.heads, q: 16n, out: 16n, lengths: 16n, k: 16n, v: 16n, strides: { row: 0, token: 0, head: 0 }, maxLength: T, liveLengths: Array(B).fill(T) });
    const workspace = new kernels.AttentionWorkspace({ bytes: Math.max(16, plan.workspaceBytes) });
    const decode = { splits: plan.splits, workspace };
    const advance = () => {
      lengths.forEach((n, b) => (lengths[b] = n + 1));
      const t0 = nowNs();
      store.step(lengths);
      return Number(nowNs() - t0);
    };
    advance();
    model.upload(batch(), store.kv);
    model.queue(B, 1, store.kv, { decode }); // warm-up: modules loaded, GEMM plans made
    gpu.synchronizeStream(stream);
    const graph = gpu.captureGraph(stream, () => model.queue(B, 1, store.kv, { decode }));
    try {
      const wall = [], library = [];
      for (let i = 0; i < steps + 2; i++) {
        const t0 = nowNs();
        const lib = advance();
        model.upload(batch(), store.kv);
        gpu.launchGraph(graph, stream);
        gpu.synchronizeStream(stream);
        const next = gpu.copyFromDevice(new Int32Array(B), model.a.next);
        next.forEach((t, b) => (tokens[b] = t));
        if (i >= 2) {
          wall.push(Number(nowNs() - t0));
          library.push(lib);
        }
      }
      const s = summarize(wall), libSum = library.reduce((a, b) => a + b, 0), wallSum = wall.reduce((a, b) => a + b, 0);
      const bytes = model.weightBytes() + B * (T - (steps - 1) / 2) * tokenKvBytes; // the mean context of the timed steps
      return { B, T, store: storeName, splits: plan.splits, p50Ms: s.p50 / 1e6, p99Ms: s.p99 / 1e6, tokensPerSecond: (B * 1e9) / s.mean, rooflineMs: (bytes / ceiling) * 1e3, libraryShare: libSum / wallSum };
    } finally {
      gpu.destroyGraph(graph);
      workspace.close();
    }
  } finally {
    store.close();
  }
}

/** GPU time of one eager step by kind of kernel (events between kernels). */
function profileStep(B, T) {
  const store = makeStore('per-layer', B, T);
  try {
    const lengths = Array(B).fill(T);
    store.step(lengths);
    const batch = store.seqs.map((seq) => ({ seq, tokens: [1], position: T - 1 }));
    model.forward(batch, store.kv); // warm-up
    const events = [], kinds = [];
    const first = gpu.createEvent();
    model.upload(batch, store.kv);
    const hostStart = nowNs();
    gpu.recordEvent(first, stream);
    model.queue(B, 1, store.kv, {
      mark: (kind) => {
        const e = gpu.createEvent();
        gpu.recordEvent(e, stream);
        events.push(e);
        kinds.push(kind);
      },
    });
    const hostNs = Number(nowNs() - hostStart);
    gpu.synchronizeStream(stream);
    const byKind = {};
    let previous = first, total = 0;
    events.forEach((e, i) => {
      const ms = gpu.elapsedMilliseconds(previous, e);
      byKind[kinds[i]] = (byKind[kinds[i]] ?? 0) + ms;
      total += ms;
      previous = e;
    });
    for (const e of [first, ...events]) gpu.destroyEvent(e);
    return { B, T, gpuMs: total, byKindMs: byKind, hostQueueMs: hostNs / 1e6, kernels: events.length };
  } finally {
    store.close();
  }
}

/** Prefill of `B` prompts of `n` tokens: the whole forward pass, and the attention kernel alone. */
function prefillRow(B, n) {
  const store = makeStore('per-layer', B, 1, n);
  try {
    store.step(Array(B).fill(n));
    const batch = store.seqs.map((seq) => ({ seq, tokens: Array(n).fill(7), position: 0 }));
    model.forward(batch, store.kv); // warm-up
    const t0 = nowNs();
    model.forward(batch, store.kv);
    const forwardMs = Number(nowNs() - t0) / 1e6;
    // the attention kernel alone on layer 0's K/V, q from the model's buffer
    const args = { dtype: 'float16', kvHeads: m.kvHeads, headDim: m.headDim, ...store.kv.layer(0), batch: B, qHeads: m.heads, queryTokens: n, q: model.a.q, out: model.a.attn, lengths: model.a.lengths, counts: model.a.counts, stream };
    const [start, end] = [gpu.createEvent(), gpu.createEvent()];
    const times = [];
    for (let i = 0; i < 5; i++) {
      gpu.recordEvent(start, stream);
      kernels.prefillAttention(args);
      gpu.recordEvent(end, stream);
      gpu.synchronizeStream(stream);
      times.push(gpu.elapsedMilliseconds(start, end));
    }
    const attentionMs = summarize(times).p50;
    const flops = 4 * m.heads * m.headDim * B * ((n * (n + 1)) / 2);
    return { B, n, forwardMs, tokensPerSecond: (B * n) / (forwardMs / 1e3), attentionMs, attentionTflops: flops / (attentionMs / 1e3) / 1e12 };
  } finally {
    store.close();
  }
}

// profile and prefill first (seconds), printed as they come, then the decode rows
const info = { name: environment().gpu };
console.log(`Llama-3-8B shape, fp16, random weights (${(model.weightBytes() / 2 ** 30).toFixed(1)} GiB read per step); ${info.name}; streaming read ${(ceiling / 1e12).toFixed(2)} TB/s; cuBLASLt ${cublas.library}`);
const profile = profileStep(16, 4096);
console.log(`one eager step, B=${profile.B} T=${profile.T}: GPU ${profile.gpuMs.toFixed(2)} ms over ${profile.kernels} marks: ` +
  Object.entries(profile.byKindMs).map(([k, ms]) => `${k} ${ms.toFixed(2)} ms (${((ms / profile.gpuMs) * 100).toFixed(0)}%)`).join(', ') +
  `; host queueing ${profile.hostQueueMs.toFixed(2)} ms`);
const prefill = [];
for (const [B, n] of argv.includes('--no-prefill') ? [] : [[1, 8192], [16, 1024]]) {
  const p = prefillRow(B, n);
  prefill.push(p);
  console.log(`prefill ${p.B} x ${p.n}: ${Math.round(p.tokensPerSecond)} tokens/s (forward ${p.forwardMs.toFixed(1)} ms); attention kernel ${p.attentionMs.toFixed(2)} ms per layer, ${p.attentionTflops.toFixed(0)} TFLOP/s`);
}

const decodeRows = [];
for (const [B, T] of rows) {
  if (!(T > steps + 3)) throw new Error(`context ${T} must exceed --steps + 3`);
  for (const name of stores) {
    if (!fits(name, B, T)) {
      console.log(`skip B=${B} T=${T} ${name}: its K/V take ${(storeBytes(name, B, T) / 2 ** 30).toFixed(1)} GiB, more than the free memory`);
      continue;
    }
    try {
      const row = decodeRow(B, T, name);
      decodeRows.push(row);
      console.log(`B=${B} T=${T} ${name}: ${Math.round(row.tokensPerSecond)} tokens/s, step p50 ${row.p50Ms.toFixed(2)} p99 ${row.p99Ms.toFixed(2)} ms, roofline ${row.rooflineMs.toFixed(2)} ms (${(row.p50Ms / row.rooflineMs).toFixed(2)}x), library ${(row.libraryShare * 100).toFixed(2)}%`);
    } catch (e) {
      if (e.code !== 'ERR_OUT_OF_MEMORY') throw e;
      console.log(`skip B=${B} T=${T} ${name}: ${e.message}`);
    }
  }
}
model.close();
gpu.destroyStream(stream);

console.log(
  table(decodeRows, [
    { title: 'B', value: (r) => r.B },
    { title: 'T', value: (r) => r.T },
    { title: 'store', value: (r) => r.store },
    { title: 'tokens/s', value: (r) => Math.round(r.tokensPerSecond) },
    { title: 'step p50 ms', value: (r) => r.p50Ms.toFixed(2) },
    { title: 'p99 ms', value: (r) => r.p99Ms.toFixed(2) },
    { title: 'roofline ms', value: (r) => r.rooflineMs.toFixed(2) },
    { title: 'step/roofline', value: (r) => (r.p50Ms / r.rooflineMs).toFixed(2) },
    { title: 'library %', value: (r) => (r.libraryShare * 100).toFixed(2) },
  ]),
);
saveResult('model', { streamingReadBytesPerSecond: ceiling, decode: decodeRows, profile, prefill });
