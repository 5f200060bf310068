// Mapping throughput: pages backed per second by grow(), from a prefilled pool
// and from scratch, next to raw cuMemCreate / cuMemMap + cuMemSetAccess loops
// in the same run.   node bench/mapping.mjs [--pages 2048] [--repeat 3]
import { KVCache } from '../dist/esm/index.mjs';
import { rawVmmLoop } from '../dist/esm/testing.mjs';
import { cudaPresent, fmt, nowNs, saveResult, table } from './common.mjs';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const pages = Number(args.pages ?? 2048);
const repeat = Number(args.repeat ?? 3);

if (!cudaPresent()) {
  console.log('mapping benchmark: skipped (needs a CUDA device with VMM support)');
  process.exit(0);
}

// One layer, 16 KV heads x 32K dims fp16 = 1 MiB per token: a 2 MiB page holds 2 tokens of
// a tensor, so grow(seq, pages) maps exactly `pages` pages (K and V halves).
function libraryRate(fromPool) {
  const shape = { layers: 1, kvHeads: 16, headDim: 32 * 1024, dtype: 'float16', maxSequences: 1 };
  const probe = new KVCache({ ...shape, maxTokens: 2, backend: 'cuda', prefetchTokens: 0 });
  const perToken = probe.tokenBytes;
  const pageSize = probe.pageSize;
  probe.close();
  const tokensPerPage = pageSize / perToken;
  const maxTokens = (pages / 2) * tokensPerPage;
  const cache = new KVCache({
    ...shape,
    maxTokens,
    backend: 'cuda',
    prefetchTokens: 0,
    poolPrefill: fromPool ? pages * pageSize : 0,
  });
  try {
    const seq = cache.reserve();
    const t0 = nowNs();
    cache.grow(seq, maxTokens);
    const ns = Number(nowNs() - t0);
    const mapped = cache.stats().pagesMapped;
    return { pages: mapped, ns, pagesPerSecond: (mapped / ns) * 1e9 };
  } finally {
    cache.close();
  }
}

const runs = [];
for (let r = 0; r < repeat; r++) {
  const raw = rawVmmLoop(pages);
  const pool = libraryRate(true);
  const scratch = libraryRate(false);
  runs.push({
    rawCreatePerSecond: (pages / raw.createNs) * 1e9,
    rawMapAccessPerSecond: (pages / (raw.mapNs + raw.setAccessNs)) * 1e9,
    rawCreateMapAccessPerSecond: (pages / (raw.createNs + raw.mapNs + raw.setAccessNs)) * 1e9,
    rawUnmapPerSecond: (pages / raw.unmapNs) * 1e9,
    libraryFromPoolPerSecond: pool.pagesPerSecond,
    libraryFromScratchPerSecond: scratch.pagesPerSecond,
    raw,
  });
}
const best = (key) => Math.max(...runs.map((r) => r[key]));
const rows = [
  { what: 'raw cuMemCreate', rate: best('rawCreatePerSecond') },
  { what: 'raw cuMemMap + cuMemSetAccess', rate: best('rawMapAccessPerSecond') },
  { what: 'raw create + map + setAccess', rate: best('rawCreateMapAccessPerSecond') },
  { what: 'grow() from the pool', rate: best('libraryFromPoolPerSecond'), vs: best('rawMapAccessPerSecond') },
  { what: 'grow() from scratch', rate: best('libraryFromScratchPerSecond'), vs: best('rawCreateMapAccessPerSecond') },
];
console.log(`Mapping throughput: ${pages} pages of 2 MiB per run, best of ${repeat}`);
console.log(
  table(rows, [
    { title: 'what', value: (r) => r.what },
    { title: 'pages/s', value: (r) => fmt.int(r.rate) },
    { title: 'GB/s', value: (r) => ((r.rate * 2 * 1024 * 1024) / 1e9).toFixed(1) },
    { title: 'µs/page', value: (r) => (1e6 / r.rate).toFixed(1) },
    { title: 'vs raw', value: (r) => (r.vs ? `${((100 * r.rate) / r.vs).toFixed(1)}%` : '') },
  ]),
);
saveResult('mapping', { pages, repeat, rows, runs });
