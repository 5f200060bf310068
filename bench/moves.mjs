// Moving KV out of device memory and back, with Llama-3-8B's KV shape
// (32 layers x 8 KV heads x 128 dims fp16, 128 KiB a token):
//  - swapOut / swapIn of one sequence of --tokens tokens: time and GB/s, the
//    first swap (cold: the host blocks are page-locked then) apart from the
//    median of the next --iters (warm: blocks reused), next to the PCIe
//    link's limit per direction as the kernel reports it in sysfs for the
//    GPU's PCI address (from the driver);
//  - suspend / resume of a cache holding --gib GiB, with keep 'none' and
//    'host' (cold and warm again): time, and the device's free memory freed.
//    node bench/moves.mjs [--tokens 4096] [--gib 8] [--iters 5]
import { readFileSync } from 'node:fs';
import { KVCache } from '../dist/esm/index.mjs';
import { deviceMemory, deviceProperties } from '../dist/esm/testing.mjs';
import { cudaPresent, fmt, nowNs, saveResult, summarize, table } from './common.mjs';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const onGpu = cudaPresent();
const backend = onGpu ? 'cuda' : 'host';
const iters = Number(args.iters ?? 5);
const model = { layers: onGpu ? 32 : 8, kvHeads: 8, headDim: 128, dtype: 'float16' };
const tokens = Number(args.tokens ?? (onGpu ? 4096 : 1024));
const gib = Number(args.gib ?? (onGpu ? 8 : 0.25));
const GB = 1e9;

/** Bytes/s of one direction of the device's PCIe link (sysfs), or null when unknown. */
function pcieLimit() {
  if (!onGpu) return null;
  try {
    const bus = deviceProperties(0).pciBusId;
    const dir = `/sys/bus/pci/devices/${bus}`;
    const speed = readFileSync(`${dir}/current_link_speed`, 'utf8'); // "32.0 GT/s PCIe"
    const width = Number(readFileSync(`${dir}/current_link_width`, 'utf8'));
    const gts = Number.parseFloat(speed);
    const encoding = gts >= 8 ? 128 / 130 : 8 / 10; // PCIe 3.0 and later: 128b/130b
    return { bus, speed: speed.trim(), width, bytesPerSecond: (gts * 1e9 * width * encoding) / 8 };
  } catch (e) {
    return { error: String(e) };
  }
}

async function swapFigures() {
  const cache = new KVCache({ ...model, backend, maxSequences: 4, maxTokens: Math.max(8192, tokens), prefetchTokens: 0, memoryBudget: (onGpu ? 4 : 1) * 2 ** 30, hostMemoryBudget: 4 * 2 ** 30 });
  try {
    const out = [];
    const inn = [];
    const allocOut = [];
    let seq = cache.reserve();
    cache.grow(seq, tokens);
    const bytes = tokens * cache.bytesPerToken;
    for (let i = 0; i <= iters; i++) {
      const calls = cache.stats().driverCalls.allocHost?.nanoseconds ?? 0;
      let t0 = nowNs();
      const swapped = await cache.swapOut(seq);
      out.push(Number(nowNs() - t0));
      allocOut.push((cache.stats().driverCalls.allocHost?.nanoseconds ?? 0) - calls);
      t0 = nowNs();
      seq = await cache.swapIn(swapped);
      inn.push(Number(nowNs() - t0));
    }
    return {
      tokens,
      bytes,
      cold: { swapOut: out[0], allocHost: allocOut[0], swapIn: inn[0] },
      warm: { swapOut: summarize(out.slice(1)), allocHost: summarize(allocOut.slice(1)), swapIn: summarize(inn.slice(1)) },
    };
  } finally {
    cache.close();
  }
}

async function suspendFigures() {
  const tokensEach = 4096;
  const cache = new KVCache({ ...model, backend, maxSequences: 64, maxTokens: 8192, prefetchTokens: 0, memoryBudget: Math.ceil(gib * 1.25 * 2 ** 30), hostMemoryBudget: Math.ceil(gib * 1.1 * 2 ** 30) });
  try {
    const target = gib * 2 ** 30;
    const seqs = [];
    while (cache.stats().bytesBacked + tokensEach * cache.bytesPerToken <= target) {
      const s = cache.reserve();
      cache.grow(s, tokensEach);
      seqs.push(s);
    }
    const held = cache.stats().bytesBacked;
    const rows = [];
    for (const keep of ['none', 'host']) {
      const suspendNs = [];
      const resumeNs = [];
      let freed = 0;
      for (let i = 0; i <= iters; i++) {
        const free0 = onGpu ? deviceMemory().freeBytes : 0;
        let t0 = nowNs();
        await cache.suspend({ keep });
        suspendNs.push(Number(nowNs() - t0));
        if (onGpu) freed = deviceMemory().freeBytes - free0;
        t0 = nowNs();
        await cache.resume();
        resumeNs.push(Number(nowNs() - t0));
      }
      rows.push({ keep, held, freed, cold: { suspend: suspendNs[0], resume: resumeNs[0] }, suspend: summarize(suspendNs.slice(1)), resume: summarize(resumeNs.slice(1)) });
    }
    return { sequences: seqs.length, tokensEach, rows };
  } finally {
    cache.close();
  }
}

const link = pcieLimit();
const swap = await swapFigures();
const suspend = await suspendFigures();
console.log(`swapOut / swapIn of a ${swap.tokens}-token sequence (${(swap.bytes / 2 ** 20).toFixed(0)} MiB, ${backend}, ${model.layers} layers): the first (cold), then the median of ${iters} (warm):`);
const gbps = (bytes, ns) => (bytes / (ns / 1e9) / GB).toFixed(1);
console.log(
  table(
    [
      { op: 'swapOut', cold: swap.cold.swapOut, coldAlloc: swap.cold.allocHost, warm: swap.warm.swapOut.p50 },
      { op: 'swapIn', cold: swap.cold.swapIn, coldAlloc: 0, warm: swap.warm.swapIn.p50 },
    ],
    [
      { title: 'operation', value: (r) => r.op },
      { title: 'cold ms', value: (r) => fmt.ms(r.cold) },
      { title: 'of it page-locking ms', value: (r) => fmt.ms(r.coldAlloc) },
      { title: 'warm ms', value: (r) => fmt.ms(r.warm) },
      { title: 'warm GB/s', value: (r) => gbps(swap.bytes, r.warm) },
    ],
  ),
);
if (link?.bytesPerSecond) console.log(`PCIe link of ${link.bus}: ${link.speed} x${link.width} = ${(link.bytesPerSecond / GB).toFixed(1)} GB/s per direction`);
else if (onGpu) console.log(`PCIe link: unknown (${link?.error})`);
console.log(`\nsuspend / resume of a cache holding ${(suspend.rows[0].held / 2 ** 30).toFixed(2)} GiB (${suspend.sequences} sequences of ${suspend.tokensEach} tokens): the first, then the median of ${iters}:`);
console.log(
  table(suspend.rows, [
    { title: 'keep', value: (r) => r.keep },
    { title: 'first suspend ms', value: (r) => fmt.ms(r.cold.suspend) },
    { title: 'first resume ms', value: (r) => fmt.ms(r.cold.resume) },
    { title: 'suspend ms', value: (r) => fmt.ms(r.suspend.p50) },
    { title: 'resume ms', value: (r) => fmt.ms(r.resume.p50) },
    { title: 'device memory freed GiB', value: (r) => (onGpu ? (r.freed / 2 ** 30).toFixed(2) : 'n/a') },
  ]),
);
saveResult('moves', { backend, model, iters, link, swap, suspend });
