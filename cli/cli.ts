#!/usr/bin/env node
/**
 * `npx vattention <command>`:
 *   info   what the driver and devices offer (--json)
 *   demo   a simulated serving loop on this machine, and what it cost (--json)
 *   bench  the benchmarks that apply here, with a report and SVG plots
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { runDemo, type DemoReport } from './demo.js';
import { autoBackend, driverInfo } from 'vattention';
import { lineChart } from './plot.js';

const packageRoot = resolve(__dirname, '..', '..'); // dist/cli/cli.js -> the package root

function flag(args: string[], name: string): boolean {
  return args.includes(`--${name}`);
}

function value(args: string[], name: string): string | undefined {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : undefined;
}

const bytes = (n: number) => {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let u = 0;
  while (n >= 1024 && u < units.length - 1) {
    n /= 1024;
    u++;
  }
  return `${n.toFixed(u ? 1 : 0)} ${units[u]}`;
};

function info(args: string[]): number {
  const d = driverInfo();
  const backend = autoBackend();
  if (flag(args, 'json')) {
    console.log(JSON.stringify({ ...d, autoBackend: backend, hostBackend: true }, null, 2));
    return 0;
  }
  if (!d.loaded) {
    console.log(`CUDA driver: not found (${d.problem})`);
    console.log('No GPU here: the host backend (Linux host memory, same semantics) is available, and `auto` uses it.');
    return 0;
  }
  const v = d.version;
  console.log(`CUDA driver: ${d.library}, version ${Math.floor(v / 1000)}.${(v % 1000) / 10}`);
  if (d.devices.length === 0) console.log('No CUDA device visible; the host backend is available.');
  for (const dev of d.devices) {
    console.log(
      `device ${dev.ordinal}: ${dev.name}, ${bytes(dev.totalBytes)}, compute ${dev.computeCapability}, ` +
        `VMM ${dev.vmmSupported ? `supported, granularity ${bytes(dev.granularity)}` : 'NOT supported'}`,
    );
  }
  console.log(`backend 'auto' picks: ${backend}`);
  return 0;
}

function progressBar(total: number) {
  const tty = process.stderr.isTTY;
  let last = -1;
  return {
    update(done: number) {
      if (!tty) return;
      const pct = Math.floor((100 * done) / total);
      if (pct === last) return;
      last = pct;
      const width = 30;
      const fill = Math.round((width * done) / total);
      process.stderr.write(`\r[${'#'.repeat(fill)}${'.'.repeat(width - fill)}] ${pct}% (${done}/${total} requests)`);
    },
    end() {
      if (tty) process.stderr.write('\n');
    },
  };
}

function printDemo(r: DemoReport): void {
  const m = r.model;
  console.log(`Simulated serving loop on the ${r.backend} backend`);
  console.log(`  model KV: ${m.layers} layers x ${m.kvHeads} KV heads x ${m.headDim} dims ${m.dtype}; ${r.maxSequences} slots x ${r.maxTokens} tokens; budget ${bytes(r.memoryBudget)}`);
  console.log(`  served ${r.served}/${r.requests} requests in ${r.steps} steps (${r.tokensGenerated} tokens generated, ${r.preemptions} preemptions), ${r.wallSeconds.toFixed(2)} s`);
  console.log(`  memory backed: peak ${bytes(r.peakBytesBacked)}, mean ${bytes(r.meanBytesBacked)}; holding tokens: mean ${bytes(r.meanBytesUsed)}`);
  console.log(`  waste (backed, not holding tokens): mean ${bytes(r.meanWasteBytes)} = ${(100 * r.wasteFraction).toFixed(1)}% of backed`);
  console.log(`  pages reused through deferred reclamation: ${r.pagesReused}; newly mapped: ${r.pagesMapped} (${r.pagesCreated} created)`);
  console.log(`  driver time creating, mapping and unmapping pages: ${(r.totalMappingSeconds * 1e3).toFixed(1)} ms (all threads)`);
  console.log(`  serving-loop thread time spent mapping, reclaiming or waiting for the worker inside grow/step: ${(r.criticalPathMappingSeconds * 1e3).toFixed(1)} ms`);
}

function demo(args: string[]): number {
  const requests = Number(value(args, 'requests') ?? 300);
  const bar = progressBar(requests);
  const report = runDemo({
    backend: (value(args, 'backend') as 'cuda' | 'host' | 'auto' | undefined) ?? 'auto',
    requests,
    seed: Number(value(args, 'seed') ?? 42),
    onProgress: (done) => bar.update(done),
  });
  bar.end();
  if (flag(args, 'json')) console.log(JSON.stringify(report, null, 2));
  else printDemo(report);
  return 0;
}

function bench(args: string[]): number {
  const out = resolve(value(args, 'out') ?? 'vattention-report');
  mkdirSync(out, { recursive: true });
  const runner = join(packageRoot, 'bench', 'run.mjs');
  if (!existsSync(runner)) {
    console.error(`bench: ${runner} is missing from this installation`);
    return 1;
  }
  console.error('running the benchmarks that apply to this machine...');
  const r = spawnSync(process.execPath, [runner], {
    stdio: ['ignore', 'pipe', 'inherit'],
    encoding: 'utf8',
    env: { ...process.env, BENCH_OUT: out },
  });
  process.stdout.write(r.stdout ?? '');
  if (r.status !== 0) return r.status ?? 1;
  // The tables, as printed, for people; the JSON beside them for machines.
  writeFileSync(join(out, 'report.txt'), `vattention benchmarks, ${new Date().toISOString()}\n${r.stdout ?? ''}`);
  console.error('running the demo trace...');
  const bar = progressBar(300);
  const trace = runDemo({ onProgress: (d) => bar.update(d) });
  bar.end();
  writeFileSync(join(out, 'demo.json'), JSON.stringify(trace, null, 2));
  writeFileSync(
    join(out, 'memory.svg'),
    lineChart({
      title: `Demo serving loop (${trace.backend}): memory backed vs holding tokens`,
      xLabel: 'step',
      yLabel: 'MiB',
      series: [
        { name: 'backed', points: trace.trace.map((p) => [p.step, p.bytesBacked / 2 ** 20]) },
        { name: 'holding tokens', points: trace.trace.map((p) => [p.step, p.bytesUsed / 2 ** 20]) },
      ],
    }),
  );
  const plots = ['memory.svg'];
  const decodePath = join(out, 'decode.json');
  if (existsSync(decodePath)) {
    const decode = JSON.parse(readFileSync(decodePath, 'utf8')) as {
      results: { batch: number; prefetch: boolean; libraryNs?: number[] }[];
    };
    const largest = Math.max(...decode.results.map((x) => x.batch));
    const series = decode.results
      .filter((x) => x.batch === largest && x.libraryNs)
      .map((x) => ({ name: x.prefetch ? 'prefetch' : 'synchronous mapping', points: x.libraryNs!.map((ns, i) => [i, ns / 1e3] as [number, number]) }));
    writeFileSync(join(out, 'decode-latency.svg'), lineChart({ title: `Library time per decode step, B = ${largest}`, xLabel: 'step', yLabel: 'µs (log)', logY: true, series }));
    plots.push('decode-latency.svg');
  }
  console.log(`\nreport: ${out} (tables: report.txt; JSON results; plots: ${plots.join(', ')})`);
  return 0;
}

function main(argv: string[]): number {
  const [command, ...args] = argv;
  switch (command) {
    case 'info':
      return info(args);
    case 'demo':
      return demo(args);
    case 'bench':
      return bench(args);
    default:
      console.log(`usage: vattention <command>

  info   [--json]                          the CUDA driver, devices, VMM support, granularity
  demo   [--json] [--requests N] [--seed S] [--backend cuda|host|auto]
                                           a simulated serving loop and what it cost
  bench  [--out DIR]                       benchmarks that apply here, a report and SVG plots`);
      return command === undefined || command === 'help' || command === '--help' ? 0 : 1;
  }
}

try {
  process.exitCode = main(process.argv.slice(2));
} catch (e) {
  const err = e as { code?: string; message?: string };
  console.error(`vattention: ${err.code ? `${err.code}: ` : ''}${err.message ?? String(e)}`);
  process.exitCode = 1;
}
