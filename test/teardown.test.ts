// Teardown and environments: no crash or hang when the process ends with
// live mappings and a busy prefetch worker, when a cache is collected without
// close(), and with several worker_threads each running a cache.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { KVCache } from '../lib/index.js';
import { deviceMemory, liveResources } from '../lib/testing.js';
import { backends, label } from './backends.js';

const fixtures = join(__dirname, 'fixtures');
const built = existsSync(join(__dirname, '..', 'dist', 'cjs', 'index.js'));

function child(args: string[], nodeArgs: string[] = []) {
  const r = spawnSync(process.execPath, [...nodeArgs, ...args], { encoding: 'utf8', timeout: 60_000 });
  return { status: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr };
}

for (const b of backends) {
  describe.skipIf(b.skip !== null || !built)(`teardown, ${label(b)}${built ? '' : ' (skipped: dist/ not built; run npm install)'}`, () => {
    it('process.exit() with live mappings, a busy prefetch worker and a pending growAsync: exits cleanly', () => {
      const r = child([join(fixtures, 'teardown-child.cjs'), 'exit', b.name]);
      expect(r.stdout, r.stderr).toContain('ready');
      expect(r.signal).toBe(null);
      expect(r.status).toBe(0);
    });

    it('an uncaught exception with a busy cache: the usual exit code 1, no crash', () => {
      const r = child([join(fixtures, 'teardown-child.cjs'), 'uncaught', b.name]);
      expect(r.stdout, r.stderr).toContain('ready');
      expect(r.stderr).toContain('boom (deliberate)');
      expect(r.signal).toBe(null);
      expect(r.status).toBe(1);
    });

    it('the event loop drains with a cache never closed: exits 0', () => {
      const r = child([join(fixtures, 'teardown-child.cjs'), 'drain', b.name]);
      expect(r.stdout, r.stderr).toContain('ready');
      expect(r.signal).toBe(null);
      expect(r.status).toBe(0);
    });

    it('caches dropped without close() are collected and give everything back', () => {
      const r = child([join(fixtures, 'teardown-child.cjs'), 'gc', b.name], ['--expose-gc']);
      expect(r.signal).toBe(null);
      expect(r.status).toBe(0);
      const counts = JSON.parse(r.stdout.trim().split('\n').pop()!);
      expect(counts).toEqual({ ranges: 0, pages: 0, mappings: 0, fences: 0, contexts: 0 });
    });

    it('four worker_threads with a cache each, one terminated mid-work: the rest finish, no crash', () => {
      const r = child([join(fixtures, 'worker-child.cjs'), b.name]);
      expect(r.stderr).not.toContain('worker error');
      expect(r.stdout).toContain('ok: 3 workers finished');
      expect(r.signal).toBe(null);
      expect(r.status).toBe(0);
    });

    it('two caches share one device and stay apart; afterwards free device memory is back to baseline', () => {
      const baseline = b.name === 'cuda' ? deviceMemory().freeBytes : 0;
      const x = new KVCache({ ...b.options, prefetchTokens: 0 });
      const y = new KVCache({ ...b.options, prefetchTokens: 0 });
      try {
        const a = x.reserve();
        const c = y.reserve();
        x.grow(a, 20);
        y.grow(c, 20);
        x.write(a, { layer: 0, kind: 'k', token: 0 }, new Uint8Array(20 * x.tokenBytes).fill(1));
        y.write(c, { layer: 0, kind: 'k', token: 0 }, new Uint8Array(20 * y.tokenBytes).fill(2));
        expect(x.read(a, { layer: 0, kind: 'k', token: 0, count: 20 }).every((v) => v === 1)).toBe(true);
        expect(y.read(c, { layer: 0, kind: 'k', token: 0, count: 20 }).every((v) => v === 2)).toBe(true);
        expect(x.tensor(0, 'k').address).not.toBe(y.tensor(0, 'k').address);
      } finally {
        x.close();
        y.close();
      }
      expect(liveResources()).toEqual({ ranges: 0, pages: 0, mappings: 0, fences: 0, contexts: 0 });
      if (b.name === 'cuda') expect(Math.abs(deviceMemory().freeBytes - baseline)).toBeLessThanOrEqual(2 * 1024 * 1024);
    });
  });
}
