// The shape of the code, checked: what docs/architecture.md promises a
// newcomer (short files, short functions, layers that import downwards only)
// stays true without anyone remembering to look.
import { execFileSync } from 'node:child_process';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';

const root = resolve(__dirname, '..');

function filesUnder(dir: string, keep: (path: string) => boolean): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir)) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) out.push(...filesUnder(path, keep));
    else if (keep(path)) out.push(path);
  }
  return out;
}

// Generated PTX (scripts/gen-ptx.sh) is not written by hand.
const handWritten = (path: string) => /\.(cc|h|cu|cuh)$/.test(path) && !path.endsWith('_ptx.cc');

describe('code structure', () => {
  it('no hand-written native source file is over 400 lines', () => {
    const long = filesUnder(join(root, 'native'), handWritten)
      .map((path) => ({ file: relative(root, path), lines: readFileSync(path, 'utf8').split('\n').length - 1 }))
      .filter((f) => f.lines > 400);
    expect(long).toEqual([]);
  });

  it('no native function is over 60 lines (scripts/long-functions.py)', () => {
    let output = '';
    try {
      output = execFileSync('python3', [join(root, 'scripts/long-functions.py'), '60'], { encoding: 'utf8' });
    } catch (e) {
      output = String((e as { stdout?: string }).stdout ?? e);
    }
    expect(output.trim()).toBe('');
  });

  it("the library's modules import one another without a cycle (dist/cjs, at run time)", () => {
    const dist = join(root, 'dist/cjs');
    const modules = filesUnder(dist, (p) => p.endsWith('.js'));
    const imports = new Map<string, string[]>();
    for (const file of modules) {
      const text = readFileSync(file, 'utf8');
      const deps = [...text.matchAll(/require\("(\.{1,2}\/[^"]+)"\)/g)].map((m) => resolve(dirname(file), m[1]!));
      imports.set(file, deps.map((d) => (d.endsWith('.js') ? d : `${d}.js`)));
    }
    const cycles: string[] = [];
    const state = new Map<string, 'visiting' | 'done'>();
    const visit = (file: string, path: string[]) => {
      if (state.get(file) === 'done') return;
      if (state.get(file) === 'visiting') {
        cycles.push([...path.slice(path.indexOf(file)), file].map((f) => relative(dist, f)).join(' -> '));
        return;
      }
      state.set(file, 'visiting');
      for (const dep of imports.get(file) ?? []) visit(dep, [...path, file]);
      state.set(file, 'done');
    };
    for (const file of modules) visit(file, []);
    expect(modules.length).toBeGreaterThan(5);
    expect(cycles).toEqual([]);
  });
});
