// The host backend's default budget inside a container: half of what the
// process's cgroup still allows, not half of the host's free RAM (past the
// cgroup's limit the process is killed, not refused). A fake cgroup folder
// (VATTENTION_CGROUP_ROOT) stands in for /sys/fs/cgroup, v2 and v1 layouts.
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
