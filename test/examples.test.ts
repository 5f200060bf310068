// The examples in examples/ run as they are, through the package's own
// name (self-reference via the exports map), and the CLI answers.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { cudaSkip } from './backends.js';

const root = join(__dirname, '..');
const built = existsSync(join(root, 'dist', 'esm', 'index.mjs'));

describe.skipIf(!built)(`examples and CLI${built ? '' : ' (skipped: dist/ not built; run npm install)'}`, () => {
  it('examples/serving-loop.mjs serves every request', () => {
    const r = spawnSync(process.execPath, [join(root, 'examples', 'serving-loop.mjs')], { encoding: 'utf8', timeout: 170_000 });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    const m = /served 24 requests in \d+ steps \((\d+) preemptions, (\d+) prompts requeued for memory\)/.exec(r.stdout);
    expect(m, r.stdout).not.toBeNull();
    expect(Number(m![1]) + Number(m![2])).toBeGreaterThan(0); // memory ran out, and the loop coped
    expect(r.stdout).toMatch(/vattention_backed_bytes \d+/);
    expect(r.stdout).toContain('rejected 1 request(s) that can never fit (24)'); // at admission, not queued for ever
    expect(r.stdout).toContain('done');
  }, 180_000); // a fixed workload; its own limit so that a slow machine does not fail it

  it('vattention info --json describes the driver and the backend auto picks', () => {
    const r = spawnSync(process.execPath, [join(root, 'dist', 'cli', 'cli.js'), 'info', '--json'], { encoding: 'utf8' });
    expect(r.status).toBe(0);
    const info = JSON.parse(r.stdout);
    expect(typeof info.loaded).toBe('boolean');
    expect(['cuda', 'host']).toContain(info.autoBackend);
  });

  it('vattention demo --json serves every request and reports memory and mapping figures', () => {
    const r = spawnSync(process.execPath, [join(root, 'dist', 'cli', 'cli.js'), 'demo', '--json', '--requests', '40'], { encoding: 'utf8', timeout: 170_000 });
    expect(r.status).toBe(0);
    const report = JSON.parse(r.stdout);
    expect(report.served).toBe(40);
    expect(report.peakBytesBacked).toBeGreaterThan(0);
    expect(report.meanBytesUsed).toBeLessThanOrEqual(report.meanBytesBacked);
    expect(report.pagesMapped).toBeGreaterThan(0);
    expect(report.trace.length).toBeGreaterThan(0);
    // it behaves like a server: prompts mapped off the serving thread, compute simulated, the library's share measured
    expect(report.prefillsAsync).toBeGreaterThanOrEqual(40);
    expect(report.simulatedComputeMs).toBeGreaterThan(0);
    expect(report.servingThreadLibraryShare).toBeGreaterThan(0);
    expect(report.servingThreadLibraryShare).toBeLessThan(1);
    expect(report.stepMicros.p99).toBeGreaterThanOrEqual(report.stepMicros.p50);
    expect(report.pagesMappedAhead + report.pagesMappedOnDemand).toBeGreaterThan(0);
  }, 180_000);

  it.skipIf(cudaSkip === null)(`vattention bench writes a report: tables, JSON and SVG plots${cudaSkip === null ? ' (skipped: on a GPU the full benchmark takes minutes and most of the device; run it by hand)' : ''}`, () => {
    const out = mkdtempSync(join(tmpdir(), 'vattention-report-'));
    try {
      // (the JSON summary holds every result: about 1 MiB, spawnSync's default buffer)
      const r = spawnSync(process.execPath, [join(root, 'dist', 'cli', 'cli.js'), 'bench', '--out', out, '--json'], { encoding: 'utf8', timeout: 590_000, maxBuffer: 64 << 20 });
      expect(r.status, r.stderr).toBe(0);
      const summary = JSON.parse(r.stdout); // --json: one JSON object on stdout, the tables went to stderr
      expect(summary.out).toBe(out);
      expect(Object.keys(summary.results)).toEqual(expect.arrayContaining(['overhead', 'decode', 'demo', 'fragmentation', 'prefix-cache']));
      for (const f of ['report.txt', 'overhead.json', 'decode.json', 'demo.json', 'fragmentation.json', 'memory.svg', 'memory-by-layout.svg', 'demo-timeline.svg', 'decode-latency.svg']) expect(existsSync(join(out, f)), f).toBe(true);
      expect(readFileSync(join(out, 'report.txt'), 'utf8')).toContain('Memory a request holds past its tokens');
      expect(readFileSync(join(out, 'memory-by-layout.svg'), 'utf8')).toContain('all-layers');
      // each layout's own tokens line, the budget line, and the demo's layout table in the report
      expect(readFileSync(join(out, 'memory-by-layout.svg'), 'utf8').match(/holding tokens, /g)?.length).toBe(3);
      expect(readFileSync(join(out, 'memory.svg'), 'utf8')).toMatch(/all-layers.*[\s\S]*budget /);
      expect(readFileSync(join(out, 'report.txt'), 'utf8')).toContain('The same trace');
      expect(readFileSync(join(out, 'report.txt'), 'utf8')).toContain('Decode loop');
      const svg = readFileSync(join(out, 'decode-latency.svg'), 'utf8');
      expect(svg).toMatch(/^<svg[^>]*xmlns="http:\/\/www.w3.org\/2000\/svg"/);
      expect(svg).toContain('synchronous mapping');
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  }, 600_000); // a fixed workload (62-99 s on 2 cores): its own limit, not vitest's 60 s

  const cli = (...args: string[]) =>
    spawnSync(process.execPath, [join(root, 'dist', 'cli', 'cli.js'), ...args], { encoding: 'utf8', timeout: 20_000 });

  it('an unknown command or flag, or a bad number, is one line on stderr and exit code 2 (never a hang)', () => {
    for (const [args, message] of [
      [['frobnicate'], /unknown command 'frobnicate'/],
      [['demo', '--bogus'], /Unknown option '--bogus'/],
      [['demo', '--requests', '2.5'], /--requests must be a positive integer, got '2.5'/],
      [['demo', '--requests', 'abc'], /--requests must be a positive integer, got 'abc'/],
      [['demo', '--requests', '0'], /--requests must be a positive integer/],
      [['demo', '--seed', '-1'], /'--seed' takes a value: one that starts with '-' must be written --option=value/],
      [['demo', '--seed=-1'], /--seed must be a positive integer, got '-1'/],
      [['demo', '--backend', 'tpu'], /--backend must be cuda, host or auto/],
      [['bench', '--out'], /argument missing/],
    ] as const) {
      const r = cli(...args);
      expect(r.signal, args.join(' ')).toBe(null);
      expect(r.status, args.join(' ')).toBe(2);
      expect(r.stderr.trim().split('\n'), args.join(' ')).toHaveLength(1);
      expect(r.stderr, args.join(' ')).toMatch(message);
    }
  });

  it.skipIf(process.platform !== 'linux')('SIGTERM to vattention bench stops the benchmark it runs, not only the CLI', async () => {
    const out = mkdtempSync(join(tmpdir(), 'vat-bench-sigterm-'));
    // the processes whose environment names this report directory: the CLI's runner and its benchmark
    const alive = () =>
      readdirSync('/proc').filter((pid) => {
        if (!/^[0-9]+$/.test(pid)) return false;
        try {
          return readFileSync(`/proc/${pid}/environ`, 'utf8').includes(`BENCH_OUT=${out}\0`);
        } catch {
          return false; // gone, or not ours
        }
      });
    try {
      const child = spawn(process.execPath, [join(root, 'dist', 'cli', 'cli.js'), 'bench', '--out', out], { stdio: ['ignore', 'pipe', 'pipe'] });
      let seen = '';
      await new Promise<void>((started) => {
        const look = (chunk: Buffer) => {
          seen += chunk.toString();
          if (seen.includes('== overhead ==')) started();
        };
        child.stdout.on('data', look);
        child.stderr.on('data', look);
      });
      await new Promise((r) => setTimeout(r, 200)); // the benchmark itself has started
      expect(alive().length).toBeGreaterThan(0);
      child.kill('SIGTERM');
      const code = await new Promise<number | null>((done) => child.on('close', (c) => done(c)));
      expect(code).toBe(143);
      for (let i = 0; i < 50 && alive().length > 0; i++) await new Promise((r) => setTimeout(r, 100));
      expect(alive()).toEqual([]);
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  }, 60_000);

  it('--help of every command prints its usage without running anything; --version the version', () => {
    for (const command of ['info', 'demo', 'bench']) {
      const r = cli(command, '--help');
      expect(r.status).toBe(0);
      expect(r.stdout).toContain(`usage: vattention ${command}`);
      expect(r.stderr).toBe(''); // nothing ran: bench and demo print their progress on stderr
    }
    const v = cli('--version');
    expect(v.stdout.trim()).toBe(JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).version);
    expect(cli().stdout).toContain('usage: vattention <command>');
  });

  it("demo names what it timed on each backend: driver calls on cuda, OS calls on host", () => {
    const r = cli('demo', '--requests', '5', '--backend', 'host');
    expect(r.status).toBe(0);
    expect(r.stdout).toContain('time in OS calls');
    expect(r.stdout).not.toContain('driver time');
  });
});
