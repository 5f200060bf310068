// Call overhead: reserve / grow (already backed) / release round trips per
// second from JS, on every backend present.   node bench/overhead.mjs [--iterations 200000]
import { KVCache } from '../dist/esm/index.mjs';
import { cudaPresent, fmt, nowNs, saveResult, table } from './common.mjs';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const iterations = Number(args.iterations ?? 200000);
const backends = cudaPresent() ? ['host', 'cuda'] : ['host'];
const rows = [];

for (const backend of backends) {
  const cache = new KVCache({ backend, layers: 32, kvHeads: 8, headDim: 128, dtype: 'float16', maxSequences: 8, maxTokens: 4096, prefetchTokens: 0 });
  try {
    const warm = cache.reserve();
    cache.grow(warm, 100);
    cache.release(warm);
    const measure = (name, body) => {
      for (let i = 0; i < 1000; i++) body();
      const t0 = nowNs();
      for (let i = 0; i < iterations; i++) body();
      const ns = Number(nowNs() - t0);
      rows.push({ backend, call: name, perSecond: (iterations / ns) * 1e9, nsPerCall: ns / iterations });
    };
    measure('reserve + grow (backed) + release', () => {
      const s = cache.reserve({ expectedTokens: 100 });
      cache.grow(s, 100);
      cache.release(s);
    });
    const s = cache.reserve({ expectedTokens: 100 });
    cache.grow(s, 100);
    measure('grow (already backed)', () => cache.grow(s, 100));
    const batch = [s];
    measure('step, batch of 1 (backed)', () => cache.step(batch, 100));
    cache.release(s);
    const many = Array.from({ length: 8 }, () => cache.reserve({ expectedTokens: 100 }));
    for (const m of many) cache.grow(m, 100);
    measure('step, batch of 8 (backed)', () => cache.step(many, 100));
  } finally {
    cache.close();
  }
}
console.log(`Call overhead: ${iterations.toLocaleString('en-US')} iterations each`);
console.log(
  table(rows, [
    { title: 'backend', value: (r) => r.backend },
    { title: 'call', value: (r) => r.call },
    { title: 'per second', value: (r) => fmt.int(r.perSecond) },
    { title: 'ns per call', value: (r) => r.nsPerCall.toFixed(0) },
  ]),
);
saveResult('overhead', { iterations, rows });
