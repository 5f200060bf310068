// Decode loop (vAttention paper, Figure 10): B sequences of a 32-layer,
// 8-KV-head, 128-dim fp16 model start from a prefill and grow one token a
// step for T steps. Each step: cache.step() (the library, timed on the JS
// thread), a GPU kernel that writes the new token's K and V into every
// layer, a fixed stretch of simulated compute, then a stream sync. Run with
// prefetch on and with synchronous mapping (prefetchTokens: 0) in one run.
// Without a GPU it runs on the host backend (8 layers, B up to 64, no
// kernel: the compute is a sleep), to show the same effect on host mmap.
//   node bench/decode.mjs [--batches 1,16,64,256] [--steps 512] [--compute-us 2000]
import { KVCache } from '../dist/esm/index.mjs';
import { createStream, destroyStream, spinThenFillU32, synchronizeStream, writeTokens } from '../dist/esm/testing.mjs';
import { cudaPresent, fmt, nowNs, saveResult, summarize, table } from './common.mjs';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const onGpu = cudaPresent();
const backend = onGpu ? 'cuda' : 'host';
const batches = (args.batches ?? (onGpu ? '1,16,64,256' : '1,16,64')).split(',').map(Number);
const steps = Number(args.steps ?? (onGpu ? 512 : 256));
const computeNs = Number(args['compute-us'] ?? 2000) * 1000;
const model = { layers: onGpu ? 32 : 8, kvHeads: 8, headDim: 128, dtype: 'float16' };
const prefetchTokens = 64;
const sleeper = new Int32Array(new SharedArrayBuffer(4));

// Prefill lengths spread over one page of tokens, so page boundaries fall on
// different steps for different sequences (deterministic generator).
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

function run(b, prefetch) {
  const cache = new KVCache({
    ...model,
    backend,
    maxSequences: b,
    maxTokens: 4096,
    prefetchTokens: prefetch ? prefetchTokens : 0,
  });
  const stream = onGpu ? createStream() : 0n;
  try {
    const k0 = cache.tensor(0, 'k');
    const layout = {
      base: k0.address,
      tensors: 2 * model.layers,
      tensorStride: Number(cache.tensor(0, 'v').address - k0.address),
      slotStride: k0.strideBytes[0],
      tokenBytes: cache.tokenBytes,
    };
    const tokensPerPage = cache.pageSize / cache.tokenBytes;
    const seqs = Array.from({ length: b }, () => cache.reserve());
    const lens = prefills(b, tokensPerPage);
    for (let i = 0; i < b; i++) cache.grow(seqs[i], lens[i]); // prefill, not timed
    cache.step(seqs, lens); // schedules look-ahead
    if (onGpu) synchronizeStream(stream);
    const before = cache.stats();
    const lib = [];
    const whole = [];
    const entries = Array.from({ length: b }, () => [0, 0]); // reused every step
    for (let t = 0; t < steps; t++) {
      for (let i = 0; i < b; i++) lens[i]++;
      const t0 = nowNs();
      cache.step(seqs, lens);
      const t1 = nowNs();
      if (onGpu) {
        for (let i = 0; i < b; i++) {
          entries[i][0] = seqs[i].slot;
          entries[i][1] = lens[i] - 1;
        }
        writeTokens(layout, entries, t, { stream });
        spinThenFillU32(k0.address, 0, 0, computeNs, { stream });
        synchronizeStream(stream);
      } else {
        Atomics.wait(sleeper, 0, 0, computeNs / 1e6); // the "GPU" computes; the worker may map meanwhile
      }
      const t2 = nowNs();
      lib.push(Number(t1 - t0));
      whole.push(Number(t2 - t0));
    }
    const after = cache.stats();
    return {
      batch: b,
      prefetch,
      steps,
      library: summarize(lib),
      step: summarize(whole),
      jsThreadDriverCalls: after.driverCallsOnJsThread - before.driverCallsOnJsThread,
      pagesMappedAhead: after.prefetch.pagesAhead - before.prefetch.pagesAhead,
      pagesMappedOnDemand: after.prefetch.pagesOnDemand - before.prefetch.pagesOnDemand,
      misses: after.prefetch.misses - before.prefetch.misses,
      bytesBacked: after.bytesBacked,
      libraryNs: lib,
    };
  } finally {
    if (onGpu) destroyStream(stream);
    cache.close();
  }
}

const results = [];
for (const b of batches) {
  for (const prefetch of [true, false]) {
    const r = run(b, prefetch);
    results.push(r);
    process.stderr.write(`decode B=${b} prefetch=${prefetch}: lib p99 ${fmt.us(r.library.p99)} µs\n`);
  }
}

console.log(`Decode loop (${backend}): ${model.layers} layers x 8 KV heads x 128 dims fp16, ${steps} steps, ${computeNs / 1000} µs ${onGpu ? 'simulated compute (GPU spin kernel)' : 'sleep'} per step, prefetchTokens ${prefetchTokens}`);
console.log(
  table(results, [
    { title: 'B', value: (r) => r.batch },
    { title: 'mapping', value: (r) => (r.prefetch ? 'prefetch' : 'sync') },
    { title: 'lib p50 µs', value: (r) => fmt.us(r.library.p50) },
    { title: 'lib p99 µs', value: (r) => fmt.us(r.library.p99) },
    { title: 'lib max µs', value: (r) => fmt.us(r.library.max) },
    { title: 'step p50 ms', value: (r) => fmt.ms(r.step.p50) },
    { title: 'step p99 ms', value: (r) => fmt.ms(r.step.p99) },
    { title: 'step max ms', value: (r) => fmt.ms(r.step.max) },
    { title: 'JS-thread driver calls', value: (r) => r.jsThreadDriverCalls },
    { title: 'pages ahead', value: (r) => r.pagesMappedAhead },
    { title: 'pages on demand', value: (r) => r.pagesMappedOnDemand },
    { title: 'misses', value: (r) => r.misses },
  ]),
);
saveResult('decode', { backend, model, steps, computeNs, prefetchTokens, results });
