// The install step explains a failed native build: what is missing and how
// to fix it. Simulated in a copy of the package by pointing CXX at a
// compiler that does not exist.
import { spawnSync } from 'node:child_process';
import { cpSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

const root = join(__dirname, '..');

const clang = spawnSync('clang++', ['--version'], { stdio: 'ignore' }).status === 0;

describe('install', () => {
  it.skipIf(clang)(`a failed native build says what is missing and how to fix it${clang ? ' (skipped: clang++ is installed, so no compiler can be made to look missing)' : ''}`, () => {
    const dir = mkdtempSync(join(tmpdir(), 'vattention-install-'));
    try {
      for (const f of ['package.json', 'binding.gyp', 'native', 'scripts']) cpSync(join(root, f), join(dir, f), { recursive: true });
      symlinkSync(join(root, 'node_modules'), join(dir, 'node_modules'));
      const r = spawnSync(process.execPath, [join(dir, 'scripts', 'install.js')], {
        cwd: dir,
        encoding: 'utf8',
        timeout: 120_000,
        env: { ...process.env, CXX: '/nonexistent/g++' },
      });
      expect(r.status).not.toBe(0);
      expect(r.stderr).toContain('vattention: building the native addon failed.');
      expect(r.stderr).toMatch(/Missing: .*a C\+\+17 compiler \(g\+\+ or clang\+\+\)/);
      expect(r.stderr).toContain('apt-get install -y build-essential python3');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it.skipIf(process.arch !== 'x64' || !process.report?.getReport().header.glibcVersionRuntime)(
    `where a prebuild fits, installing compiles nothing (even with no compiler), and VATTENTION_BUILD_FROM_SOURCE=1 compiles anyway${process.arch !== 'x64' ? ' (skipped: prebuilds ship for linux-x64 with glibc)' : ''}`,
    () => {
      const dir = mkdtempSync(join(tmpdir(), 'vattention-install-'));
      try {
        for (const f of ['package.json', 'binding.gyp', 'native', 'scripts']) cpSync(join(root, f), join(dir, f), { recursive: true });
        symlinkSync(join(root, 'node_modules'), join(dir, 'node_modules'));
        mkdirSync(join(dir, 'prebuilds', 'linux-x64'), { recursive: true });
        writeFileSync(join(dir, 'prebuilds', 'linux-x64', 'vattention.glibc.node'), 'stand-in');
        const run = (env: NodeJS.ProcessEnv) =>
          spawnSync(process.execPath, [join(dir, 'scripts', 'install.js')], { cwd: dir, encoding: 'utf8', timeout: 120_000, env: { ...process.env, CXX: '/nonexistent/g++', ...env } });
        const quick = run({});
        expect(quick.status).toBe(0);
        expect(quick.stdout).toContain('using the prebuilt addon for linux-x64');
        const forced = run({ VATTENTION_BUILD_FROM_SOURCE: '1' });
        expect(forced.status).not.toBe(0); // it tried to compile, with no compiler
        expect(forced.stderr).toContain('vattention: building the native addon failed.');
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    },
  );
});
