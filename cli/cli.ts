#!/usr/bin/env node
/**
 * `npx vattention <command>`:
 *   info   what the driver and devices offer (--json)
 *   demo   a simulated serving loop on this machine, and what it cost (--json)
 *   bench  the benchmarks that apply here, with a report and SVG plots
 */
import { spawn } from 'node:child_process';
import { appendFileSync, existsSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { runDemo, type DemoReport } from './demo.js';
import { autoBackend, driverInfo, type KVLayoutChoice } from 'vattention';
import { lineChart } from './plot.js';

const packageRoot = resolve(__dirname, '..', '..'); // dist/cli/cli.js -> the package root

/** A mistake in the command line: one line on stderr, exit code 2. */
class UsageError extends Error {}

type Values = Record<string, string | boolean | undefined>;

const COMMANDS = {
  info: {
    usage: 'vattention info [--json]\n  the CUDA driver, devices, VMM support and granularity, and the backend `auto` picks',
    options: { json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } },
  },
  demo: {
    usage:
      'vattention demo [--json] [--requests N] [--seed N] [--backend cuda|host|auto] [--layout per-layer|all-layers|groups:N] [--compare-layouts] [--shared-prefix N] [--prefix-cache]\n' +
      '  a simulated serving loop on this machine, and what it cost (N: positive integers; defaults 300 requests, seed 42);\n' +
      '  --shared-prefix N: every prompt starts with the same N-token system prompt, shared with reserve({ prefix });\n' +
      '  --prefix-cache: prompts carry token ids, found with reserve({ tokens }) and published after their prefill\n' +
      '    (with --shared-prefix: the system prompt is found that way instead of shared by hand);\n' +
      '  --compare-layouts runs the same trace under each layout and prints one table',
    options: {
      json: { type: 'boolean' },
      layout: { type: 'string' },
      'compare-layouts': { type: 'boolean' },
      'shared-prefix': { type: 'string' },
      'prefix-cache': { type: 'boolean' },
      requests: { type: 'string' },
      seed: { type: 'string' },
      backend: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  },
  bench: {
    usage:
      'vattention bench [--out DIR] [--json]\n' +
      '  the benchmarks that apply to this machine; writes report.txt, JSON results and SVG plots to DIR\n' +
      '  (default ./vattention-report); --json prints the results as one JSON object',
    options: { out: { type: 'string' }, json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } },
  },
} as const;

type Command = keyof typeof COMMANDS;

function usage(): string {
  return `usage: vattention <command> [options]      (vattention <command> --help for one)

${Object.values(COMMANDS)
  .map((c) => c.usage)
  .join('\n\n')}

  vattention --version`;
}

function parse(command: Command, args: string[]): Values {
  try {
    return parseArgs({ args, options: COMMANDS[command].options, strict: true, allowPositionals: false }).values as Values;
  } catch (e) {
    // one line; node's "argument is ambiguous" (a value starting with '-') said plainly
    const line = (e as Error).message.split('\n')[0]!;
    throw new UsageError(line.replace(/ argument is ambiguous\..*$/, " takes a value: one that starts with '-' must be written --option=value"));
  }
}

/** A flag's value as a positive integer, or a UsageError naming it. */
function positiveInteger(values: Values, name: string, fallback: number): number {
  const raw = values[name];
  if (raw === undefined) return fallback;
  const n = Number(raw);
  if (typeof raw !== 'string' || !/^[0-9]+$/.test(raw) || !Number.isSafeInteger(n) || n < 1)
    throw new UsageError(`--${name} must be a positive integer, got '${String(raw)}'`);
  return n;
}

function version(): string {
  return (JSON.parse(readFileSync(join(packageRoot, 'package.json'), 'utf8')) as { version: string }).version;
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

function info(values: Values): number {
  let d: ReturnType<typeof driverInfo>;
  try {
    d = driverInfo();
  } catch (e) {
    // The diagnostic must work when the addon does not load: that is when it is needed most.
    if ((e as { code?: string }).code !== 'ERR_ADDON_LOAD') throw e;
    if (values.json) console.log(JSON.stringify({ addonLoaded: false, problem: (e as Error).message }, null, 2));
    else console.log(`native addon: did not load.\n${(e as Error).message}`);
    return 1;
  }
  const backend = autoBackend();
  if (values.json) {
    console.log(JSON.stringify({ addonLoaded: true, ...d, autoBackend: backend, hostBackend: true }, null, 2));
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

/** --layout's value: per-layer, all-layers or groups:N. */
function layoutOption(raw: string | undefined): KVLayoutChoice | undefined {
  if (raw === undefined) return undefined;
  if (raw === 'per-layer' || raw === 'all-layers') return raw;
  const m = /^groups:([0-9]+)$/.exec(raw);
  if (m && Number(m[1]) >= 1) return { layerGroups: Number(m[1]) };
  throw new UsageError(`--layout must be per-layer, all-layers or groups:N, got '${raw}'`);
}

const LAYOUTS_COMPARED: KVLayoutChoice[] = ['per-layer', { layerGroups: 4 }, 'all-layers'];

function printComparison(reports: DemoReport[], print: (line: string) => void = console.log): void {
  const r0 = reports[0]!;
  const m = r0.model;
  print(`The same trace (${r0.requests} requests) under each layout, ${r0.backend} backend, ${m.layers} layers x ${m.kvHeads} KV heads x ${m.headDim} dims ${m.dtype}, budget ${bytes(r0.memoryBudget)}`);
  const rows = reports.map((r) => [
    r.layout.name,
    bytes(r.layout.bytesPerPageGroup),
    r.layout.tokensPerPageGroup.toFixed(1),
    bytes(r.meanBytesBacked),
    bytes(r.meanBytesUsed),
    bytes(r.meanBytesPageRounding),
    bytes(r.meanBytesPageRoundingPerRequest),
    bytes(r.meanBytesSpareGroups),
    bytes(r.meanBytesInReleasedSlots),
    bytes(r.meanBytesPooled),
    `${(100 * r.wasteFraction).toFixed(1)}%`,
    String(r.steps),
    String(r.preemptions),
    `${(r.criticalPathMappingSeconds * 1e3).toFixed(1)}`,
  ]);
  const head = ['layout', 'page group', 'tokens/group', 'backed', 'tokens', 'page rounding', 'rounding/request', 'spare groups', 'released slots', 'pooled', 'no-token share', 'steps', 'preemptions', 'serving-thread mapping ms'];
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ');
  print(line(head));
  print(widths.map((w) => '-'.repeat(w)).join('  '));
  for (const r of rows) print(line(r));
  print('(means over the steps. page rounding: the unfilled part of each running sequence\'s last page group; spare groups: whole groups mapped past a sequence\'s tokens (look-ahead, inherited from the slot); released slots: kept for the next sequence, reclaimable)');
}

function printDemo(r: DemoReport): void {
  const m = r.model;
  console.log(`Simulated serving loop on the ${r.backend} backend, ${r.layout.name} layout (page group ${bytes(r.layout.bytesPerPageGroup)} = ${r.layout.tokensPerPageGroup.toFixed(1)} tokens)`);
  console.log(`  model KV: ${m.layers} layers x ${m.kvHeads} KV heads x ${m.headDim} dims ${m.dtype}; ${r.maxSequences} slots x ${r.maxTokens} tokens; budget ${bytes(r.memoryBudget)}`);
  if (r.backend === 'host')
    console.log('  (host backend: a quarter of the layers, a 1 GiB budget, mmap pages and a sleep for 1/10 of the GPU time, so preemptions, shares and the layouts\' ranking differ from a GPU run; the README\'s Performance section has the H100/H200 figures)');
  console.log(`  served ${r.served}/${r.requests} requests in ${r.steps} steps (${r.tokensGenerated} tokens generated, ${r.preemptions} preemptions, ${r.preemptionsAhead} of them ahead of need), ${r.wallSeconds.toFixed(2)} s`);
  console.log(`  memory backed: peak ${bytes(r.peakBytesBacked)}, mean ${bytes(r.meanBytesBacked)}; holding tokens: mean ${bytes(r.meanBytesUsed)}${r.sharedPrefix || r.prefixCache ? ' (every sequence\'s tokens, a shared page counted in each sequence that reads it: it can exceed what is backed)' : ''}`);
  if (r.prefixCache)
    console.log(`  prefix cache: token hit rate ${(100 * r.prefixCacheHitRate).toFixed(1)}%, ${r.prefillTokensSkipped} of ${r.prefillTokens} prompt tokens found cached (no prefill)`);
  if (r.sharedPrefix > 0)
    console.log(`  shared system prompt of ${r.sharedPrefix} tokens: memory saved by sharing its pages mean ${bytes(r.meanBytesSavedBySharing)}, peak ${bytes(r.peakBytesSavedBySharing)} (${(100 * r.meanBytesSavedBySharing / (r.meanBytesBacked + r.meanBytesSavedBySharing)).toFixed(1)}% of what the slots map)`);
  console.log(`  waste (mapped in slots, not holding tokens): mean ${bytes(r.meanWasteBytes)} = ${(100 * r.wasteFraction).toFixed(1)}% of it:`);
  console.log(`    past the tokens of active sequences: mean ${bytes(r.meanBytesBeyondTokens)} = page-group rounding ${bytes(r.meanBytesPageRounding)} (${bytes(r.meanBytesPageRoundingPerRequest)} per running request) + spare whole groups (look-ahead, inherited from the slot) ${bytes(r.meanBytesSpareGroups)}`);
  console.log(`    kept by released slots for the next sequence (deferred reclamation, reclaimable): mean ${bytes(r.meanBytesInReleasedSlots)}`);
  console.log(`  idle in the pool: mean ${bytes(r.meanBytesPooled)}`);
  console.log(`  pages reused through deferred reclamation: ${r.pagesReused}; newly mapped: ${r.pagesMapped} (${r.pagesCreated} created)`);
  const what = r.backend === 'cuda' ? 'CUDA driver calls' : 'OS calls (mmap, fallocate, mprotect)';
  console.log(`  time in ${what} creating, mapping and unmapping pages: ${(r.totalMappingSeconds * 1e3).toFixed(1)} ms (all threads)`);
  console.log(`  serving-loop thread time spent mapping, reclaiming or waiting for the worker inside grow/step: ${(r.criticalPathMappingSeconds * 1e3).toFixed(1)} ms`);
  console.log(`  serving thread in library calls: ${(r.servingThreadLibrarySeconds * 1e3).toFixed(1)} ms = ${(100 * r.servingThreadLibraryShare).toFixed(2)}% of ${r.wallSeconds.toFixed(2)} s wall (simulated compute ${r.simulatedComputeMs.toFixed(2)} ms per iteration, ${r.computeOnGpu ? 'a GPU kernel' : 'a sleep, 1/10 of an H100 roofline'})`);
  console.log(`  stepAsync(), its part on the serving thread: p50 ${r.stepMicros.p50.toFixed(1)} µs, p99 ${r.stepMicros.p99.toFixed(1)} µs, max ${r.stepMicros.max.toFixed(1)} µs; in the ${r.steadySteps} iterations without a preemption p50 ${r.steadyStepMicros.p50.toFixed(1)} µs, p99 ${r.steadyStepMicros.p99.toFixed(1)} µs, max ${r.steadyStepMicros.max.toFixed(1)} µs`);
  console.log(`  backend calls on the serving thread: ${r.driverCallsOnJsThread} (${r.driverCallsOnJsThreadWhileFull} in steps with the budget full, ${r.driverCallsOnJsThreadAfterPreemption} of them in steps retried after a preemption); ${r.stepsOffThread} iterations found a page missing and stepped on a pool thread`);
  console.log(`  pages mapped ahead ${r.pagesMappedAhead} / on demand ${r.pagesMappedOnDemand}; reclaimed ahead ${r.pagesReclaimedAhead} / on demand ${r.pagesReclaimedOnDemand}; ${r.prefillsAsync} prompts mapped by growAsync`);
}

async function demo(values: Values): Promise<number> {
  const requests = positiveInteger(values, 'requests', 300);
  const seed = positiveInteger(values, 'seed', 42);
  const backend = (values.backend as string | undefined) ?? 'auto';
  if (backend !== 'cuda' && backend !== 'host' && backend !== 'auto')
    throw new UsageError(`--backend must be cuda, host or auto, got '${backend}'`);
  const layout = layoutOption(values.layout as string | undefined);
  const sharedPrefix = values['shared-prefix'] === undefined ? 0 : positiveInteger(values, 'shared-prefix', 0);
  if (sharedPrefix >= 4096) throw new UsageError(`--shared-prefix must be less than 4096 tokens (half of maxTokens), got ${sharedPrefix}`);
  const prefixCache = Boolean(values['prefix-cache']);
  if (values['compare-layouts']) {
    if (layout !== undefined) throw new UsageError('--compare-layouts runs every layout: leave out --layout');
    const reports: DemoReport[] = [];
    for (const l of LAYOUTS_COMPARED) {
      const bar = progressBar(requests);
      reports.push(await runDemo({ backend, requests, seed, layout: l, sharedPrefix, prefixCache, onProgress: (done) => bar.update(done) }));
      bar.end();
    }
    if (values.json) console.log(JSON.stringify(reports.map(({ trace: _trace, ...r }) => r), null, 2));
    else printComparison(reports);
    return 0;
  }
  const bar = progressBar(requests);
  const report = await runDemo({ backend, requests, seed, layout, sharedPrefix, prefixCache, onProgress: (done) => bar.update(done) });
  bar.end();
  if (values.json) console.log(JSON.stringify(report, null, 2));
  else printDemo(report);
  return 0;
}

/** Runs a script, forwarding its output as it comes (to stderr with --json); returns its stdout. */
function runStreaming(script: string, env: NodeJS.ProcessEnv, toStderr: boolean): Promise<{ status: number; stdout: string }> {
  return new Promise((done, fail) => {
    const child = spawn(process.execPath, [script], { stdio: ['ignore', 'pipe', 'inherit'], env });
    let stdout = '';
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (chunk: string) => {
      stdout += chunk;
      (toStderr ? process.stderr : process.stdout).write(chunk);
    });
    // SIGTERM / SIGINT: passed to the runner, which stops its benchmark; then this exits with them
    const signals: [NodeJS.Signals, number][] = [['SIGTERM', 15], ['SIGINT', 2]];
    let stoppedBy = 0;
    const stop = (signal: NodeJS.Signals, number: number) => () => {
      stoppedBy = 128 + number;
      child.kill(signal);
    };
    const handlers = signals.map(([signal, number]) => [signal, stop(signal, number)] as const);
    for (const [signal, handler] of handlers) process.on(signal, handler);
    child.on('error', fail);
    child.on('close', (code) => {
      for (const [signal, handler] of handlers) process.off(signal, handler);
      done({ status: stoppedBy || (code ?? 1), stdout });
    });
  });
}

async function bench(values: Values): Promise<number> {
  const out = resolve((values.out as string | undefined) ?? 'vattention-report');
  const json = values.json === true;
  try {
    mkdirSync(out, { recursive: true });
  } catch (e) {
    throw new UsageError(`--out ${out}: cannot make the report directory (${(e as Error).message})`);
  }
  const runner = join(packageRoot, 'bench', 'run.mjs');
  if (!existsSync(runner)) {
    console.error(`bench: ${runner} is missing from this installation`);
    return 1;
  }
  console.error('running the benchmarks that apply to this machine...');
  // Every result goes under `out`: an installed package never writes inside itself.
  const r = await runStreaming(runner, { ...process.env, BENCH_OUT: out }, json);
  if (r.status !== 0) return r.status;
  // The tables, as printed, for people; the JSON beside them for machines.
  writeFileSync(join(out, 'report.txt'), `vattention benchmarks, ${new Date().toISOString()}\n${r.stdout}`);
  console.error('running the demo trace under each layout...');
  const traces: DemoReport[] = [];
  for (const layout of LAYOUTS_COMPARED) {
    const bar = progressBar(300);
    traces.push(await runDemo({ layout, onProgress: (d) => bar.update(d) }));
    bar.end();
  }
  // The default layout's run is the main one; the others are for comparison.
  const main = traces.find((t) => t.layout.name === 'all-layers') ?? traces[0]!;
  writeFileSync(join(out, 'demo.json'), JSON.stringify(traces, null, 2));
  const report = [''];
  printComparison(traces, (line) => report.push(line));
  appendFileSync(join(out, 'report.txt'), `${report.join('\n')}\n`);
  const MiB = (b: number) => b / 2 ** 20;
  const budget = { name: `budget ${bytes(main.memoryBudget)}`, y: MiB(main.memoryBudget) };
  writeFileSync(
    join(out, 'memory-by-layout.svg'),
    lineChart({
      title: `Demo serving loop (${main.backend}): memory backed by active sequences (solid) and holding tokens (dashed), per layout`,
      xLabel: 'step',
      yLabel: 'MiB',
      series: traces.flatMap((t, i) => [
        { name: `backed, ${t.layout.name}`, color: i, points: t.trace.map((p) => [p.step, MiB(p.bytesBacked - p.bytesInReleasedSlots)] as [number, number]) },
        { name: `holding tokens, ${t.layout.name}`, color: i, dashed: true, points: t.trace.map((p) => [p.step, MiB(p.bytesUsed)] as [number, number]) },
      ]),
      hLines: [budget],
    }),
  );
  writeFileSync(
    join(out, 'memory.svg'),
    lineChart({
      title: `Demo serving loop (${main.backend}, ${main.layout.name}): where the backed memory is`,
      xLabel: 'step',
      yLabel: 'MiB',
      series: [
        { name: 'holding tokens', points: main.trace.map((p) => [p.step, MiB(p.bytesUsed)]) },
        { name: 'backed by active sequences', points: main.trace.map((p) => [p.step, MiB(p.bytesBacked - p.bytesInReleasedSlots)]) },
        { name: 'kept by released slots', points: main.trace.map((p) => [p.step, MiB(p.bytesInReleasedSlots)]) },
      ],
      hLines: [budget],
    }),
  );
  // The timeline of the default layout's run: the serving thread's time in the library per step.
  writeFileSync(
    join(out, 'demo-timeline.svg'),
    lineChart({
      title: `Demo serving loop (${main.backend}, ${main.layout.name}): serving-thread time in the library per step`,
      xLabel: 'step',
      yLabel: 'µs (log)',
      logY: true,
      series: [{ name: 'library time per step (reserve, growAsync call, step, release)', points: main.trace.map((p) => [p.step, Math.max(0.1, p.libraryMicros)] as [number, number]) }],
    }),
  );
  const plots = ['memory.svg', 'memory-by-layout.svg', 'demo-timeline.svg'];
  const decodePath = join(out, 'decode.json');
  if (existsSync(decodePath)) {
    const decode = JSON.parse(readFileSync(decodePath, 'utf8')) as {
      results: { batch: number; memory?: string; prefetch: boolean; libraryNs?: number[] }[];
    };
    const largest = Math.max(...decode.results.map((x) => x.batch));
    const mode = (x: { memory?: string; prefetch: boolean }) => (x.memory === 'paged 16' ? 'blocks from a free list' : x.prefetch ? 'prefetch' : 'synchronous mapping');
    const series = decode.results
      .filter((x) => x.batch === largest && x.libraryNs)
      .map((x) => ({ name: `${x.memory ? `${x.memory}, ` : ''}${mode(x)}`, points: x.libraryNs!.map((ns, i) => [i, ns / 1e3] as [number, number]) }));
    writeFileSync(join(out, 'decode-latency.svg'), lineChart({ title: `Library time per decode step, B = ${largest}`, xLabel: 'step', yLabel: 'µs (log)', logY: true, series }));
    plots.push('decode-latency.svg');
  }
  if (json) {
    const results: Record<string, unknown> = {};
    for (const f of readdirSync(out).filter((n) => n.endsWith('.json')))
      results[f.replace(/\.json$/, '')] = JSON.parse(readFileSync(join(out, f), 'utf8'));
    console.log(JSON.stringify({ out, plots, results }, null, 2));
  } else {
    console.log(`\nreport: ${out} (tables: report.txt; JSON results; plots: ${plots.join(', ')})`);
  }
  return 0;
}

async function main(argv: string[]): Promise<number> {
  const [command, ...args] = argv;
  if (command === '--version' || command === '-v') {
    console.log(version());
    return 0;
  }
  if (command === undefined || command === 'help' || command === '--help' || command === '-h') {
    console.log(usage());
    return 0;
  }
  if (!(command in COMMANDS)) throw new UsageError(`unknown command '${command}' (info, demo, bench)`);
  const values = parse(command as Command, args);
  if (values.help) {
    console.log(`usage: ${COMMANDS[command as Command].usage}`);
    return 0;
  }
  switch (command as Command) {
    case 'info':
      return info(values);
    case 'demo':
      return demo(values);
    case 'bench':
      return bench(values);
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    if (e instanceof UsageError) {
      console.error(`vattention: ${e.message}`);
      process.exitCode = 2;
      return;
    }
    const err = e as { code?: string; message?: string };
    // Node's system errors begin their message with their code already (EEXIST: ...)
    const message = err.message ?? String(e);
    const prefixed = err.code && !message.startsWith(`${err.code}:`) ? `${err.code}: ` : '';
    console.error(`vattention: ${prefixed}${message}`);
    process.exitCode = 1;
  },
);
