// Decode loop (vAttention paper, Figure 10): B sequences of a 32-layer,
// 32-query-head, 8-KV-head, 128-dim fp16 model (Llama-3-8B's attention)
// start from a prefill and grow one token a step for T steps. Each step:
// cache.step() (the library, timed on the JS thread), a GPU kernel that
// writes the new token's K and V into every layer, then the real decode
// attention of all 32 layers (native/kernels), then a stream sync. Runs:
// per-layer layout with prefetch and with synchronous mapping
// (prefetchTokens: 0), the all-layers layout with prefetch, and the same loop
// over vLLM-style paged blocks (blocks of 16 handed out from a free list in
// JS, the block table uploaded each step, the paged mode of the same kernel).
// Without a GPU it runs on the host backend (8 layers, B up to 64, no
// kernel: the compute is a sleep of --compute-us), to show the same effect
// on host mmap.
// With --devices 0,1 it compares one device with a cache over several
// (tensor parallel) in the per-layer layout, with and without prefetch.
//   node bench/decode.mjs [--batches 1,16,64,256] [--steps 512] [--warmup 32] [--why-tail] [--prebacked] [--compute-us 2000] [--devices 0,1]
import { KVCache } from '../dist/esm/index.mjs';
import * as kernels from '../dist/esm/kernels.mjs';
import * as gpu from '../dist/esm/testing.mjs';
import { createStream, destroyStream, synchronizeStream, writeTokens } from '../dist/esm/testing.mjs';
import { readFileSync } from 'node:fs';
import { PerformanceObserver, performance } from 'node:perf_hooks';
import { cudaPresent, fmt, nowNs, saveResult, summarize, table, tailBreakdown } from './common.mjs';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const onGpu = cudaPresent();
const backend = onGpu ? 'cuda' : 'host';
const batches = (args.batches ?? (onGpu ? '1,16,64,256' : '1,16,64')).split(',').map(Number);
const steps = Number(args.steps ?? (onGpu ? 512 : 256));
const warmup = Number(args.warmup ?? 32); // untimed steps first, in every configuration
const computeNs = Number(args['compute-us'] ?? 2000) * 1000;
const model = { layers: onGpu ? 32 : 8, kvHeads: 8, headDim: 128, dtype: 'float16' };
const qHeads = 32;
const maxTokens = 4096;
const prefetchTokens = 64;
const sleeper = new Int32Array(new SharedArrayBuffer(4));
// --why-tail: split the slowest steps (>= p99) into time on the CPU
// and off it (waiting or preempted), with page faults and GC, from the JS
// thread's usage taken around each step
const clock = 'why-tail' in args ? { sample: gpu.threadUsage } : null;
const gcs = [];
// The control: fixed arithmetic with no memory traffic, calibrated to about
// 20 µs, timed on the JS thread right after each step in every configuration.
// Its p99 is what the machine does to a 20 µs stretch of pure computation at
// that point of the loop: when step()'s p99 is no worse, the tail is the
// machine's, not the library's. (On a quiet H100 VM its p99 is ~30-45 µs; on
// a noisy one, with the same code, ~265 µs.)
let controlRounds = 0;
function control(rounds) {
  let x = 1;
  for (let k = 0; k < rounds; k++) x = (Math.imul(x, 1103515245) + 12345) | 0;
  return x;
}
{
  let sink = 0;
  for (let r = 0; r < 2000; r++) sink ^= control(1000); // compiled before it is timed
  for (controlRounds = 256; ; controlRounds *= 2) {
    const t0 = nowNs();
    for (let r = 0; r < 100; r++) sink ^= control(controlRounds);
    if (Number(nowNs() - t0) / 100 >= 20_000 || sink === 0.5) break;
  }
}
function timeControl() {
  const c0 = nowNs();
  if (control(controlRounds) === 0.5) throw new Error('unreachable');
  return Number(nowNs() - c0);
}
/** Steal time of the whole machine so far (ms): time the hypervisor ran someone else on our CPUs. */
function stealMs() {
  try {
    const cpu = readFileSync('/proc/stat', 'latin1').split('\n')[0].trim().split(/\s+/);
    return (Number(cpu[8]) * 1000) / 100; // USER_HZ
  } catch {
    return NaN;
  }
}
if (clock) new PerformanceObserver((l) => gcs.push(...l.getEntries().map((e) => [e.startTime, e.startTime + e.duration]))).observe({ entryTypes: ['gc'] });

// Prefill lengths spread over 1..1024 tokens (one per-layer page of this
// model), so page boundaries fall on different steps for different
// sequences; the same lengths for every layout (deterministic generator).
function prefills(b, tokensPerPage) {
  let x = 0x9e3779b9;
  return Array.from({ length: b }, () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return 1 + (x % tokensPerPage);
  });
}

/** The device buffers of a step's attention: queries, outputs, lengths, rows (`qh` query heads). */
function attentionBuffers(b, device = 0, qh = qHeads) {
  const bytes = b * qh * model.headDim * 2;
  return { device, q: gpu.allocate(bytes, device), out: gpu.allocate(bytes, device), lengths: gpu.allocate(4 * b, device), rows: gpu.allocate(4 * b, device) };
}
function freeBuffers(bufs) {
  for (const [name, at] of Object.entries(bufs)) if (name !== 'device') gpu.free(at, bufs.device);
}

/** Every layer's attention for one decode step, queued on `stream` (of `device`, with its share of the heads). */
function attendAllLayers(b, bufs, maxLength, kvOfLayer, stream, device = 0, shards = 1) {
  for (let layer = 0; layer < model.layers; layer++)
    kernels.decodeAttention({ dtype: model.dtype, batch: b, qHeads: qHeads / shards, kvHeads: model.kvHeads / shards, headDim: model.headDim, q: bufs.q, out: bufs.out, lengths: bufs.lengths, maxLength, ...kvOfLayer[layer], stream, device });
}

/**
 * One configuration: B sequences, `layout`, prefetch on or off, over
 * `devices` (tensor parallel: each device holds kvHeads / devices heads and
 * runs its share of the attention on a stream of its own; the library's
 * step() is one call for all of them).
 */
function run(b, prefetch, layout, devices = [0], shards = devices.length) {
  const cache = new KVCache({
    ...model,
    kvHeads: (model.kvHeads / shards) * devices.length,
    backend,
    devices,
    maxSequences: b,
    maxTokens,
    layout,
    prefetchTokens: prefetch ? prefetchTokens : 0,
  });
  const perDevice = devices.map((device) => ({
    device,
    stream: onGpu ? createStream(device) : 0n,
    bufs: onGpu ? attentionBuffers(b, device, qHeads / shards) : null,
  }));
  try {
    const groups = cache.layout.layerGroups;
    for (const d of perDevice) {
      const k0 = cache.tensor(0, 'k', { device: d.device });
      // writeTokens sees each tensor's token row (all the layers it holds) as one token
      d.writeLayout = {
        base: k0.address,
        tensors: 2 * groups,
        tensorStride: Number(cache.tensor(0, 'v', { device: d.device }).address - k0.address),
        slotStride: k0.strideBytes[0],
        tokenBytes: k0.strideBytes[1],
      };
      d.kvOfLayer = cache.tensors({ device: d.device }).map(({ k, v }) => ({ ...kernels.cacheKV(k, v), rows: d.bufs?.rows }));
    }
    const seqs = Array.from({ length: b }, () => cache.reserve());
    // the same lengths in every configuration; one per-layer page of the model (of a shard: 2x the tokens)
    const lens = prefills(b, 1024 * shards);
    for (let i = 0; i < b; i++) cache.grow(seqs[i], lens[i]); // prefill, not timed
    // --prebacked: every page the loop will need mapped before it starts (nothing to map while it runs)
    if ('prebacked' in args) for (let i = 0; i < b; i++) cache.grow(seqs[i], Math.min(maxTokens, lens[i] + warmup + steps + prefetchTokens));
    cache.step(seqs, lens); // schedules look-ahead
    if (onGpu) {
      for (const d of perDevice) {
        gpu.copyToDevice(d.bufs.rows, Int32Array.from(seqs, (s) => s.slot), { device: d.device });
        synchronizeStream(d.stream, d.device);
      }
    }
    let before = null;
    const lib = [];
    const whole = [];
    const entries = Array.from({ length: b }, () => [0, 0]); // reused every step
    const lengths = new Int32Array(b);
    const clockBefore = [], clockAfter = [], wallMs = [], controlNs = [], nativeNs = [];
    let stepNs = 0, steal0 = 0;
    // steps below 0 warm up (the engine compiles the loop and the library's wrapper) and are not timed
    for (let t = -warmup; t < steps; t++) {
      if (t === 0) {
        before = cache.stats();
        stepNs = before.prefetch.stepNanoseconds;
        steal0 = clock ? stealMs() : 0;
      }
      const timed = t >= 0;
      for (let i = 0; i < b; i++) lens[i]++;
      if (clock && timed) clockBefore.push(clock.sample());
      const m0 = clock ? performance.now() : 0;
      const t0 = nowNs();
      cache.step(seqs, lens);
      const t1 = nowNs();
      if (timed) controlNs.push(timeControl());
      if (clock && timed) {
        wallMs.push([m0, performance.now()]);
        clockAfter.push(clock.sample());
        const native = cache.stats().prefetch.stepNanoseconds;
        nativeNs.push(native - stepNs);
        stepNs = native;
      }
      if (onGpu) {
        let maxLength = 0;
        for (let i = 0; i < b; i++) {
          entries[i][0] = seqs[i].slot;
          entries[i][1] = lens[i] - 1;
          lengths[i] = lens[i];
          maxLength = Math.max(maxLength, lens[i]);
        }
        for (const d of perDevice) {
          writeTokens(d.writeLayout, entries, t + warmup, { stream: d.stream, device: d.device });
          gpu.copyToDevice(d.bufs.lengths, lengths, { stream: d.stream, device: d.device });
          attendAllLayers(b, d.bufs, maxLength, d.kvOfLayer, d.stream, d.device, shards);
        }
        for (const d of perDevice) synchronizeStream(d.stream, d.device);
      } else {
        Atomics.wait(sleeper, 0, 0, computeNs / 1e6); // the "GPU" computes; the worker may map meanwhile
      }
      const t2 = nowNs();
      if (!timed) continue;
      lib.push(Number(t1 - t0));
      whole.push(Number(t2 - t0));
    }
    const after = cache.stats();
    return {
      memory: cache.layout.name,
      devices: devices.join('+'),
      batch: b,
      prefetch,
      steps,
      library: summarize(lib),
      step: summarize(whole),
      jsThreadDriverCalls: after.driverCallsOnJsThread - before.driverCallsOnJsThread,
      pagesMappedAhead: after.prefetch.pagesAhead - before.prefetch.pagesAhead,
      pagesMappedOnDemand: after.prefetch.pagesOnDemand - before.prefetch.pagesOnDemand,
      misses: after.prefetch.misses - before.prefetch.misses,
      stallNs: after.prefetch.stallNanoseconds - before.prefetch.stallNanoseconds,
      lockWaits: after.prefetch.lockWaits - before.prefetch.lockWaits,
      lockWaitNs: after.prefetch.lockWaitNanoseconds - before.prefetch.lockWaitNanoseconds,
      bytesBacked: after.bytesBacked,
      bytesUsed: after.bytesUsed,
      libraryNs: lib,
      control: summarize(controlNs),
      stealMs: clock ? stealMs() - steal0 : undefined,
      // GC entries arrive once the event loop turns: the overlap is worked out after run() returns
      tail: clock ? () => tailBreakdown(lib, nativeNs, clockBefore, clockAfter, wallMs.map(([a, z]) => gcs.some(([s, e]) => s < z && e > a))) : undefined,
    };
  } finally {
    if (onGpu) {
      for (const d of perDevice) {
        freeBuffers(d.bufs);
        destroyStream(d.stream, d.device);
      }
    }
    cache.close();
  }
}

/**
 * The same loop over paged blocks of 16 tokens in cuMemAlloc memory: a free
 * list in JS hands out blocks, the block table goes to the device each step
 * (what a paged server does), attention runs in paged mode.
 */
function runPaged(b) {
  const blockSize = 16;
  const row = model.kvHeads * model.headDim, blockBytes = blockSize * row * 2;
  const stream = createStream();
  const bufs = attentionBuffers(b);
  const lens = prefills(b, 1024);
  const maxBlocks = Math.ceil((Math.max(...lens) + warmup + steps) / blockSize);
  const blocks = b * maxBlocks;
  const pool = gpu.allocate(2 * model.layers * blocks * blockBytes); // [2 × layers][blocks][16][heads][dim]
  const table = gpu.allocate(4 * b * maxBlocks);
  try {
    const free = Array.from({ length: blocks }, (_, i) => blocks - 1 - i);
    const hostTable = new Int32Array(b * maxBlocks);
    const owned = new Int32Array(b);
    const ensure = (i, tokens) => {
      let changed = false;
      while (owned[i] * blockSize < tokens) {
        hostTable[i * maxBlocks + owned[i]++] = free.pop();
        changed = true;
      }
      return changed;
    };
    for (let i = 0; i < b; i++) ensure(i, lens[i]);
    gpu.copyToDevice(table, hostTable);
    const tensorStride = blocks * blockBytes;
    const kvOfLayer = Array.from({ length: model.layers }, (_, layer) => ({
      k: pool + BigInt(2 * layer * tensorStride),
      v: pool + BigInt((2 * layer + 1) * tensorStride),
      strides: { row: blockSize * row, token: row, head: model.headDim },
      paged: { blockTable: table, maxBlocksPerSequence: maxBlocks, blockSize },
    }));
    const writeLayout = { base: pool, tensors: 2 * model.layers, tensorStride, slotStride: blockBytes, tokenBytes: row * 2 };
    const lib = [], whole = [], controlNs = [];
    const entries = Array.from({ length: b }, () => [0, 0]);
    const lengths = new Int32Array(b);
    for (let t = -warmup; t < steps; t++) {
      for (let i = 0; i < b; i++) lens[i]++;
      const t0 = nowNs();
      let changed = false;
      for (let i = 0; i < b; i++) changed = ensure(i, lens[i]) || changed;
      if (changed) gpu.copyToDevice(table, hostTable, { stream });
      const t1 = nowNs();
      if (t >= 0) controlNs.push(timeControl());
      let maxLength = 0;
      for (let i = 0; i < b; i++) {
        const token = lens[i] - 1;
        entries[i][0] = hostTable[i * maxBlocks + Math.floor(token / blockSize)];
        entries[i][1] = token % blockSize;
        lengths[i] = lens[i];
        maxLength = Math.max(maxLength, lens[i]);
      }
      writeTokens(writeLayout, entries, t + warmup, { stream });
      gpu.copyToDevice(bufs.lengths, lengths, { stream });
      attendAllLayers(b, bufs, maxLength, kvOfLayer, stream);
      synchronizeStream(stream);
      const t2 = nowNs();
      if (t < 0) continue;
      lib.push(Number(t1 - t0));
      whole.push(Number(t2 - t0));
    }
    const used = lens.reduce((a, n) => a + n, 0) * row * 2 * 2 * model.layers;
    return {
      memory: 'paged 16',
      batch: b,
      prefetch: false,
      steps,
      library: summarize(lib),
      control: summarize(controlNs),
      step: summarize(whole),
      jsThreadDriverCalls: 0,
      pagesMappedAhead: 0,
      pagesMappedOnDemand: 0,
      misses: 0,
      bytesBacked: Number(owned.reduce((a, n) => a + n, 0)) * blockBytes * 2 * model.layers,
      bytesUsed: used,
      libraryNs: lib,
    };
  } finally {
    gpu.free(table);
    gpu.free(pool);
    freeBuffers(bufs);
    destroyStream(stream);
  }
}

const results = [];
const tailLines = [];
// --devices 0,1: the per-layer layout on the first device alone and on all of
// them (tensor parallel), with prefetch and with synchronous mapping, side by side.
const devices = args.devices === undefined ? null : args.devices.split(',').map(Number);
const configs = devices
  ? [
      ['per-layer', true, [devices[0]]],
      ['per-layer', true, devices],
      ['per-layer', false, [devices[0]]],
      ['per-layer', false, devices],
      ['per-layer', false, devices, 'threads'],
    ]
  : [
      ['per-layer', true],
      ['per-layer', false],
      ...(onGpu ? [['all-layers', true], ['paged', false]] : [['all-layers', true]]),
    ];
for (const b of batches) {
  for (const [memory, prefetch, on, threads] of configs) {
    // the single-device rows of --devices hold one device's share of the heads: the same work per device;
    // "threads": the cache maps for its devices on a thread each instead of one after the other
    if (threads) process.env.VATTENTION_PARALLEL_DEVICES = '1';
    const r = memory === 'paged' ? runPaged(b) : run(b, prefetch, memory, on, devices ? devices.length : 1);
    delete process.env.VATTENTION_PARALLEL_DEVICES;
    if (threads) r.devices += ' threads';
    results.push(r);
    if (r.tail) {
      await new Promise((resolve) => setTimeout(resolve, 20));
      r.tail = r.tail();
      const us = (ns) => (ns / 1e3).toFixed(1);
      tailLines.push(`B=${b} ${r.memory}${devices ? ` devices ${r.devices}` : ''} ${prefetch ? 'prefetch' : 'sync'}: control p50 ${us(r.control.p50)} p99 ${us(r.control.p99)} max ${us(r.control.max)} µs, machine steal ${r.stealMs} ms; steps >= p99: ${r.tail.map((x) => `#${x.step} ${us(x.wallNs)} µs (native ${us(x.nativeNs)}) = cpu ${us(x.cpuNs)} + off ${us(x.offCpuNs)} (${x.waits} waits, ${x.preemptions} preempted, ${x.faults} faults${x.gc ? ', GC' : ''})`).join('; ')}`);
    }
    process.stderr.write(`decode B=${b} ${r.memory} ${devices ? `devices ${r.devices} ` : ''}${prefetch ? 'prefetch' : 'sync'}: lib p99 ${fmt.us(r.library.p99)} µs, step p50 ${fmt.ms(r.step.p50)} ms\n`);
  }
}

const work = onGpu ? `write K/V + decode attention of ${model.layers} layers (${qHeads}/${model.kvHeads} heads) per step` : `${computeNs / 1000} µs sleep per step`;
console.log(`Decode loop (${backend}): ${model.layers} layers x 8 KV heads x 128 dims fp16, ${steps} timed steps after ${warmup} untimed, ${work}, prefetchTokens ${prefetchTokens}`);
const perLayerP50 = (b) => results.find((r) => r.batch === b && r.memory === 'per-layer' && r.prefetch)?.step.p50;
if (devices) console.log(`Tensor parallel: devices ${devices.join('+')} hold ${model.kvHeads / devices.length} of the ${model.kvHeads} KV heads each and run ${qHeads / devices.length} query heads each; the single-device rows hold one such shard (the same work per device), so the sync rows show whether mapping on ${devices.length} devices costs ${devices.length}x or 1x. "lib total": time in step() on the JS thread over all steps; "stall": time each device's step spent mapping, summed over the devices (devices mapping at once count twice).`);
console.log(
  table(results, [
    { title: 'B', value: (r) => r.batch },
    { title: 'memory', value: (r) => r.memory },
    ...(devices ? [{ title: 'devices', value: (r) => r.devices }, { title: 'lib mean µs', value: (r) => fmt.us(r.library.mean) }, { title: 'lib total ms', value: (r) => fmt.ms(r.library.mean * r.steps) }, { title: 'stall ms, devices summed', value: (r) => fmt.ms(r.stallNs) }] : []),
    { title: 'mapping', value: (r) => (r.memory === 'paged 16' ? 'blocks' : r.prefetch ? 'prefetch' : 'sync') },
    { title: 'lib p50 µs', value: (r) => fmt.us(r.library.p50) },
    { title: 'lib p99 µs', value: (r) => fmt.us(r.library.p99) },
    { title: 'control p99 µs', value: (r) => fmt.us(r.control.p99) },
    { title: 'lib max µs', value: (r) => fmt.us(r.library.max) },
    { title: 'step p50 ms', value: (r) => fmt.ms(r.step.p50) },
    { title: 'step p99 ms', value: (r) => fmt.ms(r.step.p99) },
    { title: 'tokens/s', value: (r) => fmt.int(r.batch / (r.step.p50 / 1e9)) },
    { title: 'step vs per-layer', value: (r) => (r.step.p50 / perLayerP50(r.batch)).toFixed(3) },
    { title: 'JS-thread driver calls', value: (r) => r.jsThreadDriverCalls },
    { title: 'pages ahead', value: (r) => r.pagesMappedAhead },
    { title: 'pages on demand', value: (r) => r.pagesMappedOnDemand },
    { title: 'misses', value: (r) => r.misses },
    { title: 'lock waits', value: (r) => r.lockWaits ?? '-' },
    { title: 'lock wait µs', value: (r) => (r.lockWaitNs === undefined ? '-' : fmt.us(r.lockWaitNs)) },
    { title: 'no-token share', value: (r) => `${((1 - r.bytesUsed / r.bytesBacked) * 100).toFixed(1)}%` },
  ]),
);
if (tailLines.length) console.log(`Where the slowest steps' time went (JS thread, --why-tail):\n${tailLines.join('\n')}`);
saveResult(devices ? 'decode-devices' : 'decode', { devices, backend, model: { ...model, qHeads }, steps, computeNs: onGpu ? null : computeNs, prefetchTokens, results });
