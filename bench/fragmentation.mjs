// Memory a request holds past its tokens, per layout (vAttention paper,
// Table 8, on this library with the stock driver's 2 MiB pages). For each
// model shape at TP-1 and TP-2 (KV heads halved per GPU) and each layout:
//   tokens per page group  what one growth step adds
//   worst case per request the most a sequence can hold past its tokens,
//                          measured: a sequence grown to the worst length, its
//                          stats().bytesBeyondTokens
//   mean on the demo trace the demo's long-tailed requests (host backend,
//                          2 MiB pages, no look-ahead): mean over steps of
//                          bytesPageRounding / running requests (whole groups
//                          a sequence inherits from its slot are reported
//                          apart: spare groups, reclaimable)
// and, for comparison, per-layer with the 64 KiB pages the paper got from a
// patched driver (computed: 2 × layers × 64 KiB).
// The host backend has the same page arithmetic as a GPU with 2 MiB pages.
//   node bench/fragmentation.mjs [--requests 60]
import { createRequire } from 'node:module';
import { KVCache } from '../dist/esm/index.mjs';
import { saveResult, table } from './common.mjs';

const require = createRequire(import.meta.url);
const { runDemo } = require('../dist/cli/demo.js');

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const requests = Number(args.requests ?? 60);
const MiB = 2 ** 20;
const page = 2 * MiB;
const models = [
  { name: 'Llama-3-8B', layers: 32, kvHeads: 8, headDim: 128 },
  { name: 'Yi-6B', layers: 32, kvHeads: 4, headDim: 128 },
  { name: 'Yi-34B', layers: 60, kvHeads: 8, headDim: 128 },
];
const layouts = [
  { name: 'per-layer', layout: 'per-layer' },
  { name: '4 layer groups', layout: { layerGroups: 4 } },
  { name: 'all-layers', layout: 'all-layers' },
];

/** The length whose last page group holds the least: found from the layout's own figures. */
function worstLength(cache) {
  const { tokensPerPageGroup } = cache.layout;
  let worst = 1, most = -1;
  for (let n = 1; n <= Math.ceil(3 * tokensPerPageGroup) + 1; n++) {
    const groups = Math.ceil(n / tokensPerPageGroup - 1e-9);
    const waste = groups * cache.layout.bytesPerPageGroup - n * cache.bytesPerToken;
    if (waste > most) [worst, most] = [n, waste];
  }
  return worst;
}

const rows = [];
for (const model of models) {
  for (const tp of [1, 2]) {
    const shape = { layers: model.layers, kvHeads: model.kvHeads / tp, headDim: model.headDim, dtype: 'float16' };
    for (const { name, layout } of layouts) {
      const cache = new KVCache({ backend: 'host', ...shape, layout, maxSequences: 1, maxTokens: 8192, pageSize: page, prefetchTokens: 0 });
      let worstBytes, groupBytes, tokensPerGroup;
      try {
        const seq = cache.reserve();
        cache.grow(seq, worstLength(cache));
        worstBytes = cache.stats().bytesBeyondTokens;
        ({ bytesPerPageGroup: groupBytes, tokensPerPageGroup: tokensPerGroup } = cache.layout);
      } finally {
        cache.close();
      }
      const demo = await runDemo({ backend: 'host', model: shape, layout, requests, seed: 42, maxSequences: 8, memoryBudget: 6 * 2 ** 30, prefetchTokens: 0, weightBytes: 0 });
      rows.push({
        model: model.name,
        tp,
        layout: name,
        tokensPerGroup,
        groupBytes,
        worstBytes,
        meanBytes: demo.meanBytesPageRoundingPerRequest,
        meanShare: demo.meanBytesPageRounding / demo.meanBytesBacked,
        spareShare: demo.meanBytesSpareGroups / demo.meanBytesBacked,
        paper64k: 2 * model.layers * 64 * 1024,
      });
      process.stderr.write(`fragmentation: ${model.name} TP-${tp} ${name} done\n`);
    }
  }
}

const mib = (b) => (b / MiB).toFixed(2);
console.log(`Memory a request holds past its tokens, 2 MiB pages (fp16; KV heads per GPU at TP-2 halved); demo trace: ${requests} requests, 8 slots, no look-ahead`);
console.log(
  table(rows, [
    { title: 'model', value: (r) => r.model },
    { title: 'TP', value: (r) => r.tp },
    { title: 'layout', value: (r) => r.layout },
    { title: 'tokens/group', value: (r) => r.tokensPerGroup.toFixed(1) },
    { title: 'group MiB', value: (r) => mib(r.groupBytes) },
    { title: 'worst MiB/request', value: (r) => mib(r.worstBytes) },
    { title: 'mean MiB/request (demo)', value: (r) => mib(r.meanBytes) },
    { title: 'rounding share of backed (demo)', value: (r) => `${(r.meanShare * 100).toFixed(1)}%` },
    { title: 'spare-group share (demo)', value: (r) => `${(r.spareShare * 100).toFixed(1)}%` },
    { title: 'per-layer @64 KiB worst MiB', value: (r) => mib(r.paper64k) },
  ]),
);
saveResult('fragmentation', { pageSize: page, requests, rows });
