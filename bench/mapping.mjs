// Mapping throughput: pages backed per second by grow(), from a prefilled pool
// and from scratch, next to raw cuMemCreate / cuMemMap + cuMemSetAccess loops
// in the same run.   node bench/mapping.mjs [--pages 2048] [--repeat 3]
// With --devices 0,1: the raw loop on each device alone, on all of them at
// once (a thread each, and a process each), on the first device from two threads, and grow() of a
// cache over all of them next to one over the first: does the driver map for
// several GPUs of a process at the same time?
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { KVCache } from '../dist/esm/index.mjs';
import { rawVmmLoop, rawVmmLoopConcurrent } from '../dist/esm/testing.mjs';
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

if (args.devices !== undefined) {
  const devices = args.devices.split(',').map(Number);
  const perPage = (t) => ((t.createNs + t.mapNs + t.setAccessNs + t.unmapNs + t.releaseNs) / t.pages / 1e3).toFixed(1);
  const phases = (t) =>
    [t.createNs, t.mapNs, t.setAccessNs, t.unmapNs, t.releaseNs].map((ns) => (ns / t.pages / 1e3).toFixed(1)).join('/');
  const configs = [
    ...devices.map((d) => ({ name: `device ${d} alone`, list: [d] })),
    { name: `devices ${devices.join('+')} at once`, list: devices },
    { name: `device ${devices[0]} from ${devices.length} threads`, list: devices.map(() => devices[0]) },
  ];
  const rows = [];
  {
    // the devices one after the other on one thread: what serial mapping costs
    let best = null;
    for (let r = 0; r < repeat; r++) {
      const t0 = nowNs();
      const threads = devices.flatMap((d) => rawVmmLoopConcurrent(pages, [d]).threads);
      const t = { wallNs: Number(nowNs() - t0), threads };
      if (best === null || t.wallNs < best.wallNs) best = t;
    }
    rows.push({ name: `devices ${devices.join(', ')} one after the other`, list: devices, ...best });
  }
  for (const c of configs) {
    let best = null;
    for (let r = 0; r < repeat; r++) {
      const t = rawVmmLoopConcurrent(pages, c.list);
      if (best === null || t.wallNs < best.wallNs) best = t;
    }
    rows.push({ ...c, ...best });
  }
  // the raw loop in a process of its own per device, all started at one wall-clock moment: is the
  // serialisation the process's or the driver's?
  {
    const testingModule = new URL('../dist/esm/testing.mjs', import.meta.url).href;
    const script = `import { rawVmmLoop } from ${JSON.stringify(testingModule)};
      const [device, startAt, pages] = process.argv.slice(1).map(Number);
      rawVmmLoop(64, device);
      while (Date.now() < startAt) {}
      const t0 = process.hrtime.bigint();
      const t = rawVmmLoop(pages, device);
      console.log(JSON.stringify({ ...t, wallNs: Number(process.hrtime.bigint() - t0) }));`;
    let best = null;
    for (let r = 0; r < repeat; r++) {
      const startAt = Date.now() + 3000;
      const outs = await Promise.all(
        devices.map((d) => promisify(execFile)(process.execPath, ['--input-type=module', '-e', script, String(d), String(startAt), String(pages)])),
      );
      const threads = outs.map((o) => JSON.parse(o.stdout));
      const t = { wallNs: Math.max(...threads.map((x) => x.wallNs)), threads };
      if (best === null || t.wallNs < best.wallNs) best = t;
    }
    rows.push({ name: `devices ${devices.join('+')} at once, a process each`, list: devices, ...best });
  }
  // the library: grow() of `pages` pages per device, one cache over all the devices vs one over the first
  const grown = (list, threads = false) => {
    if (threads) process.env.VATTENTION_PARALLEL_DEVICES = '1';
    const shape = { layers: 1, kvHeads: 16 * list.length, headDim: 32 * 1024, dtype: 'float16', maxSequences: 1 };
    const maxTokens = pages; // 2 tokens a page of each of K and V: `pages` pages per device
    let bestNs = Infinity;
    for (let r = 0; r < repeat; r++) {
      const cache = new KVCache({ ...shape, maxTokens, backend: 'cuda', prefetchTokens: 0, devices: list });
      try {
        const seq = cache.reserve();
        const t0 = nowNs();
        cache.grow(seq, maxTokens);
        bestNs = Math.min(bestNs, Number(nowNs() - t0));
      } finally {
        cache.close();
      }
    }
    delete process.env.VATTENTION_PARALLEL_DEVICES;
    return bestNs;
  };
  const libOne = grown([devices[0]]);
  const libAll = grown(devices);
  const libThreads = grown(devices, true);
  const alone = rows[1].wallNs;
  console.log(`Mapping on several devices: ${pages} pages of 2 MiB per thread (create, map, setAccess, unmap, release), best of ${repeat}`);
  console.log(
    table(
      [
        ...rows.map((r) => ({ what: `raw loop, ${r.name}`, ns: r.wallNs, per: r.threads.map(perPage).join(" / "), threads: r.threads })),
        { what: `grow() of a cache on device ${devices[0]}`, ns: libOne, per: '' },
        { what: `grow() of a cache over ${devices.join('+')} (same pages per device)`, ns: libAll, per: '' },
        { what: `grow() of a cache over ${devices.join('+')}, a thread per device`, ns: libThreads, per: '' },
      ],
      [
        { title: 'what', value: (r) => r.what },
        { title: 'wall ms', value: (r) => fmt.ms(r.ns) },
        { title: 'vs one device alone', value: (r) => (r.what.startsWith('grow') ? (r.ns / libOne).toFixed(2) : (r.ns / alone).toFixed(2)) },
        { title: 'µs/page per thread', value: (r) => r.per },
        { title: 'create/map/access/unmap/release µs/page, thread 1', value: (r) => (r.threads ? phases(r.threads[0]) : '') },
      ],
    ),
  );
  saveResult('mapping-devices', { pages, repeat, devices, raw: rows, libraryOneDeviceNs: libOne, libraryAllDevicesNs: libAll, libraryThreadPerDeviceNs: libThreads });
  process.exit(0);
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
