// Fork by sharing pages vs a copy: a sequence of Llama-3-8B's KV shape
// (32 layers x 8 KV heads x 128 dims fp16) with 4096 + 17 tokens is forked
// (the whole page groups mapped again from the same physical pages, the
// partial group copied on the device), against what a copy needs at the very
// least: a new sequence grown to the same length (its pages mapped), and on a
// GPU the full copy: that plus the bytes copied device to device, tensor by
// tensor. Median of --iters forks, each released again (the slot's mappings
// dropped), per layout.
//   node bench/sharing.mjs [--iters 20] [--tokens 4113]
import { KVCache } from '../dist/esm/index.mjs';
import { copyOnDevice } from '../dist/esm/testing.mjs';
import { cudaPresent, fmt, nowNs, saveResult, summarize, table } from './common.mjs';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const onGpu = cudaPresent();
const backend = onGpu ? 'cuda' : 'host';
const iters = Number(args.iters ?? 20);
const tokens = Number(args.tokens ?? 4113);
const model = { layers: onGpu ? 32 : 8, kvHeads: 8, headDim: 128, dtype: 'float16' };

const results = [];
for (const layout of ['all-layers', 'per-layer']) {
  const cache = new KVCache({ ...model, backend, layout, maxSequences: 4, maxTokens: 8192, prefetchTokens: 0, memoryBudget: (onGpu ? 8 : 1) * 2 ** 30 });
  try {
    const parent = cache.reserve();
    cache.grow(parent, tokens);
    const forkNs = [];
    const copyNs = [];
    const fullCopyNs = [];
    // one copy per tensor: the slot's rows of a tensor are contiguous
    const layersPerTensor = model.layers / cache.layout.layerGroups;
    const copyBytes = (from, to) => {
      for (let layer = 0; layer < model.layers; layer += layersPerTensor)
        for (const kind of ['k', 'v']) copyOnDevice(to.address(layer, kind), from.address(layer, kind), tokens * cache.tensor(layer, kind).strideBytes[1]);
    };
    let extraForkBytes = 0;
    let extraCopyBytes = 0;
    for (let i = 0; i < iters; i++) {
      const b0 = cache.stats().bytesBacked;
      let t0 = nowNs();
      const child = cache.fork(parent);
      forkNs.push(Number(nowNs() - t0));
      extraForkBytes = cache.stats().bytesBacked - b0;
      cache.release(child); // its mappings are dropped: the next fork starts from the same state
      cache.reclaim();
      const b1 = cache.stats().bytesBacked;
      t0 = nowNs();
      const copy = cache.reserve({ expectedTokens: 0 });
      cache.grow(copy, tokens);
      copyNs.push(Number(nowNs() - t0));
      if (onGpu) {
        copyBytes(parent, copy);
        fullCopyNs.push(Number(nowNs() - t0));
      }
      extraCopyBytes = cache.stats().bytesBacked - b1;
      cache.release(copy);
      cache.reclaim();
    }
    const f = summarize(forkNs);
    const c = summarize(copyNs);
    results.push({ layout, pageGroupBytes: cache.layout.bytesPerPageGroup, fork: f, growCopy: c, fullCopy: onGpu ? summarize(fullCopyNs) : null, extraForkBytes, extraCopyBytes, sequenceBytes: tokens * cache.bytesPerToken });
  } finally {
    cache.close();
  }
}
console.log(`Fork of a ${tokens}-token sequence (${backend}: ${model.layers} layers x 8 KV heads x 128 dims fp16), median of ${iters}:`);
console.log(
  table(results, [
    { title: 'layout', value: (r) => r.layout },
    { title: 'fork ms', value: (r) => fmt.ms(r.fork.p50) },
    { title: 'new sequence, mapped only ms', value: (r) => fmt.ms(r.growCopy.p50) },
    { title: 'fork / new sequence', value: (r) => (r.fork.p50 / r.growCopy.p50).toFixed(2) },
    { title: 'mapped + bytes copied ms', value: (r) => (r.fullCopy ? fmt.ms(r.fullCopy.p50) : 'n/a (no GPU)') },
    { title: 'memory added by fork MiB', value: (r) => (r.extraForkBytes / 2 ** 20).toFixed(1) },
    { title: 'by a copy MiB', value: (r) => (r.extraCopyBytes / 2 ** 20).toFixed(1) },
  ]),
);
saveResult('sharing', { backend, model, tokens, iters, results });
