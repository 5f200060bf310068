// The examples in examples/ run as they are, through the package's own
// name (self-reference via the exports map), and the CLI answers.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { cudaSkip } from './backends.js';

const root = join(__dirname, '..');
const built = existsSync(join(root, 'dist', 'esm', 'index.mjs'));

describe.skipIf(!built)(`examples and CLI${built ? '' : ' (skipped: dist/ not built; run npm install)'}`, () => {
  it('examples/serving-loop.mjs serves every request', () => {
    const r = spawnSync(process.execPath, [join(root, 'examples', 'serving-loop.mjs')], { encoding: 'utf8', timeout: 120_000 });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/served 24 requests in \d+ steps/);
    expect(r.stdout).toMatch(/vattention_backed_bytes \d+/);
    expect(r.stdout).toContain('done');
  });

  it('vattention info --json describes the driver and the backend auto picks', () => {
    const r = spawnSync(process.execPath, [join(root, 'dist', 'cli', 'cli.js'), 'info', '--json'], { encoding: 'utf8' });
    expect(r.status).toBe(0);
    const info = JSON.parse(r.stdout);
    expect(typeof info.loaded).toBe('boolean');
    expect(['cuda', 'host']).toContain(info.autoBackend);
  });

  it('vattention demo --json serves every request and reports memory and mapping figures', () => {
    const r = spawnSync(process.execPath, [join(root, 'dist', 'cli', 'cli.js'), 'demo', '--json', '--requests', '40'], { encoding: 'utf8', timeout: 120_000 });
    expect(r.status).toBe(0);
    const report = JSON.parse(r.stdout);
    expect(report.served).toBe(40);
    expect(report.peakBytesBacked).toBeGreaterThan(0);
    expect(report.meanBytesUsed).toBeLessThanOrEqual(report.meanBytesBacked);
    expect(report.pagesMapped).toBeGreaterThan(0);
    expect(report.trace.length).toBeGreaterThan(0);
  });

  it.skipIf(cudaSkip === null)(`vattention bench writes a report: tables, JSON and SVG plots${cudaSkip === null ? ' (skipped: on a GPU the full benchmark takes minutes and most of the device; run it by hand)' : ''}`, () => {
    const out = mkdtempSync(join(tmpdir(), 'vattention-report-'));
    try {
      const r = spawnSync(process.execPath, [join(root, 'dist', 'cli', 'cli.js'), 'bench', '--out', out], { encoding: 'utf8', timeout: 300_000 });
      expect(r.status, r.stderr).toBe(0);
      for (const f of ['report.txt', 'overhead.json', 'decode.json', 'demo.json', 'memory.svg', 'decode-latency.svg']) expect(existsSync(join(out, f)), f).toBe(true);
      expect(readFileSync(join(out, 'report.txt'), 'utf8')).toContain('Decode loop');
      const svg = readFileSync(join(out, 'decode-latency.svg'), 'utf8');
      expect(svg).toMatch(/^<svg[^>]*xmlns="http:\/\/www.w3.org\/2000\/svg"/);
      expect(svg).toContain('synchronous mapping');
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });

  it('an unknown command prints usage and fails', () => {
    const r = spawnSync(process.execPath, [join(root, 'dist', 'cli', 'cli.js'), 'frobnicate'], { encoding: 'utf8' });
    expect(r.status).toBe(1);
    expect(r.stdout).toContain('usage: vattention');
  });
});
