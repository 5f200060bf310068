// The host backend's default budget inside a container: half of what the
// process's cgroup still allows, not half of the host's free RAM (past the
// cgroup's limit the process is killed, not refused). A fake cgroup folder
// (VATTENTION_CGROUP_ROOT) stands in for /sys/fs/cgroup, v2 and v1 layouts.
// Caches alive in one process that take the default share it (one account
// per device) instead of each counting the same memory.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

const root = join(__dirname, '..');
const built = existsSync(join(root, 'dist', 'cjs', 'index.js'));
const MiB = 1024 * 1024;

function budgetIn(cgroup: string | undefined): number {
  const script = `const { KVCache } = require(${JSON.stringify(join(root, 'dist', 'cjs', 'index.js'))});
    const c = new KVCache({ backend: 'host', layers: 2, kvHeads: 2, headDim: 64, dtype: 'float16', maxSequences: 2, maxTokens: 64, pageSize: 4096, prefetchTokens: 0 });
    console.log(c.stats().budgetBytes); c.close();`;
  const env = { ...process.env };
  if (cgroup === undefined) delete env.VATTENTION_CGROUP_ROOT;
  else env.VATTENTION_CGROUP_ROOT = cgroup;
  const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', env });
  expect(r.status, r.stderr).toBe(0);
  return Number(r.stdout.trim());
}

describe.skipIf(!built)(`the host default budget respects the cgroup's memory limit${built ? '' : ' (skipped: dist/ not built)'}`, () => {
  it('cgroup v2 (memory.max, memory.current) and v1 (memory.limit_in_bytes, memory.usage_in_bytes): half of limit - used; no limit ("max"): the host figure', () => {
    const dir = mkdtempSync(join(tmpdir(), 'vattention-cgroup-'));
    try {
      const v2 = join(dir, 'v2');
      mkdirSync(v2);
      writeFileSync(join(v2, 'memory.max'), `${600 * MiB}\n`);
      writeFileSync(join(v2, 'memory.current'), `${100 * MiB}\n`);
      expect(budgetIn(v2)).toBe(250 * MiB);
      const v1 = join(dir, 'v1');
      mkdirSync(join(v1, 'memory'), { recursive: true });
      writeFileSync(join(v1, 'memory', 'memory.limit_in_bytes'), `${400 * MiB}\n`);
      writeFileSync(join(v1, 'memory', 'memory.usage_in_bytes'), `${200 * MiB}\n`);
      expect(budgetIn(v1)).toBe(100 * MiB);
      const none = join(dir, 'none');
      mkdirSync(none);
      writeFileSync(join(none, 'memory.max'), 'max\n');
      const unlimited = budgetIn(none);
      expect(unlimited).toBeGreaterThan(0);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

function runIn(cgroup: string, body: string): Record<string, unknown> {
  const script = `const { KVCache } = require(${JSON.stringify(join(root, 'dist', 'cjs', 'index.js'))});
    const shape = { backend: 'host', layers: 2, kvHeads: 2, headDim: 64, dtype: 'float16', maxSequences: 4, maxTokens: 4096, pageSize: 4096, prefetchTokens: 0 };
    const code = (f) => { try { f(); return 'ok'; } catch (e) { return e.code; } };
    const out = {};
    ${body}
    console.log(JSON.stringify(out));`;
  const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', env: { ...process.env, VATTENTION_CGROUP_ROOT: cgroup } });
  expect(r.status, r.stderr).toBe(0);
  return JSON.parse(r.stdout.trim()) as Record<string, unknown>;
}

describe.skipIf(!built)(`caches in one process share the default budget${built ? '' : ' (skipped: dist/ not built)'}`, () => {
  it('two caches with the default draw on one 8 MiB account; a cache with its own memoryBudget does not; a closed cache gives its share back', () => {
    const dir = mkdtempSync(join(tmpdir(), 'vattention-cgroup-'));
    try {
      writeFileSync(join(dir, 'memory.max'), `${16 * MiB}\n`); // default: half of 16 MiB
      writeFileSync(join(dir, 'memory.current'), '0\n');
      // A sequence of 4096 tokens is 4 MiB (1 KiB a token over 2 layers, K and V).
      const out = runIn(
        dir,
        `const a = new KVCache(shape), b = new KVCache(shape), own = new KVCache({ ...shape, memoryBudget: 4 << 20 });
        out.budgets = [a.stats().budgetBytes, b.stats().budgetBytes, own.stats().budgetBytes];
        const [a1, a2, a3] = [a.reserve(), a.reserve(), a.reserve()];
        out.aFirstTwo = [code(() => a.grow(a1, 4096)), code(() => a.grow(a2, 4096))];
        out.aThird = code(() => a.grow(a3, 1));
        const b1 = b.reserve();
        out.bWhileAHoldsAll = code(() => b.grow(b1, 1));
        out.bTokens = b1.tokens;
        out.own = code(() => own.grow(own.reserve(), 4096));
        a.close();
        out.bAfterAClosed = code(() => b.grow(b1, 8192 - 4096));
        out.bSecond = code(() => b.grow(b.reserve(), 4096));
        b.close(); own.close();`,
      );
      expect(out).toEqual({
        budgets: [8 * MiB, 8 * MiB, 4 * MiB],
        aFirstTwo: ['ok', 'ok'],
        aThird: 'ERR_OUT_OF_MEMORY',
        bWhileAHoldsAll: 'ERR_OUT_OF_MEMORY',
        bTokens: 0,
        own: 'ok',
        bAfterAClosed: 'ok',
        bSecond: 'ok',
      });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('memory whose release failed when a cache closed stays charged to the shared account: another cache cannot take it', () => {
    const dir = mkdtempSync(join(tmpdir(), 'vattention-cgroup-'));
    try {
      writeFileSync(join(dir, 'memory.max'), `${16 * MiB}\n`); // default: half of 16 MiB, shared by a and b
      writeFileSync(join(dir, 'memory.current'), '0\n');
      const out = runIn(
        dir,
        `const a = new KVCache(shape), b = new KVCache(shape);
        a.grow(a.reserve(), 4096); a.grow(a.reserve(), 4096);
        a._injectFault('releasePage', 0, 'errorInClose'); // the first page a gives back at close is not released
        a.close();
        const [b1, b2] = [b.reserve(), b.reserve()];
        out.first = code(() => b.grow(b1, 4096));
        out.secondWhole = code(() => b.grow(b2, 4096));
        out.secondLessOnePage = code(() => b.grow(b2, 4096 - 16));
        b.close();`,
      );
      // a 4 KiB page holds 16 tokens of one layer's K or V: 16 tokens fewer need 4 pages fewer, and 1 is missing
      expect(out).toEqual({ first: 'ok', secondWhole: 'ERR_OUT_OF_MEMORY', secondLessOnePage: 'ok' });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
