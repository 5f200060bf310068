// The README is user documentation that stays short and true: at most 300
// lines; every TypeScript block in it and in docs/ is a complete program,
// type-checked under `strict` against the built package, imported by its
// name; the quick start is run; every relative link points at a file (and
// heading) that exists.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import ts from 'typescript';
import { describe, expect, it } from 'vitest';

const root = join(__dirname, '..');
const built = existsSync(join(root, 'dist', 'esm', 'index.d.mts'));
const readme = readFileSync(join(root, 'README.md'), 'utf8');
const guides = readdirSync(join(root, 'docs'), { recursive: true, encoding: 'utf8' })
  .filter((f) => f.endsWith('.md'))
  .map((f) => join(root, 'docs', f));
const tsBlocks = (text: string) => [...text.matchAll(/```ts\n([\s\S]*?)```/g)].map((m) => m[1]!);
const blocks = [readme, ...guides.map((g) => readFileSync(g, 'utf8'))].flatMap(tsBlocks);
const quickStart = tsBlocks(readme.slice(readme.indexOf('## Quick start')))[0]!;

const compilerOptions: ts.CompilerOptions = {
  strict: true,
  target: ts.ScriptTarget.ES2022,
  module: ts.ModuleKind.Node16,
  moduleResolution: ts.ModuleResolutionKind.Node16,
  lib: ['lib.es2022.d.ts', 'lib.esnext.disposable.d.ts'],
  types: ['node'],
  skipLibCheck: true,
};

/** GitHub's anchor for a heading. */
const anchor = (heading: string) =>
  heading
    .trim()
    .toLowerCase()
    .replace(/[^\w\- ]/g, '')
    .replace(/ /g, '-');

describe('the README', () => {
  it('is at most 300 lines, in the order a newcomer reads it', () => {
    expect(readme.split('\n').length).toBeLessThanOrEqual(300);
    const headings = [...readme.matchAll(/^## (.*)$/gm)].map((m) => m[1]);
    const order = ['Install', 'Quick start', 'Concepts', 'A serving loop', 'API', 'Features', 'CLI', 'Troubleshooting', 'Performance'];
    expect(headings.filter((h) => order.includes(h!))).toEqual(order);
  });

  it('has a quick start of at most 25 lines', () => {
    expect(quickStart.trim().split('\n').length).toBeLessThanOrEqual(25);
  });

  it('links only to files and headings that exist (README and docs/)', () => {
    const broken: string[] = [];
    for (const file of [join(root, 'README.md'), ...guides]) {
      const text = readFileSync(file, 'utf8').replace(/```[\s\S]*?```/g, '');
      for (const [, target] of text.matchAll(/\]\(([^)\s]+)\)/g)) {
        if (/^[a-z]+:/.test(target!)) continue; // http(s), mailto
        const [path, hash] = target!.split('#');
        const to = path ? resolve(dirname(file), path) : file;
        const where = `${relative(root, file)} -> ${target}`;
        if (!existsSync(to)) broken.push(where);
        else if (hash && to.endsWith('.md')) {
          const anchors = [...readFileSync(to, 'utf8').matchAll(/^#+ (.*)$/gm)].map((m) => anchor(m[1]!));
          if (!anchors.includes(hash)) broken.push(`${where} (no such heading)`);
        }
      }
    }
    expect(broken).toEqual([]);
  });
});

/** Every file under `dir`, relative, with its text. */
function tree(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const f of readdirSync(dir, { recursive: true, encoding: 'utf8' }).sort())
    if (f.endsWith('.md')) out[f] = readFileSync(join(dir, f), 'utf8');
  return out;
}

describe('the API reference (docs/api, typedoc)', () => {
  it('is what typedoc makes of the TSDoc now, with no broken {@link} (npm run docs:api regenerates it)', () => {
    const out = join(root, 'test', '.api-check');
    rmSync(out, { recursive: true, force: true });
    try {
      const typedoc = join(root, 'node_modules', 'typedoc', 'bin', 'typedoc');
      const r = spawnSync(process.execPath, [typedoc, '--out', out], { cwd: root, encoding: 'utf8' });
      expect(r.stdout + r.stderr).not.toMatch(/\[(warning|error)\]/);
      expect(r.status).toBe(0);
      expect(tree(out)).toEqual(tree(join(root, 'docs', 'api')));
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  }, 60_000);
});

describe.skipIf(!built)(`README and docs/ TypeScript${built ? '' : ' (skipped: dist/ not built; run npm install)'}`, () => {
  it('has TypeScript blocks to check', () => {
    expect(blocks.length).toBeGreaterThan(3);
  });

  // Inside the package, so that 'vattention' resolves through its own exports map.
  const dir = join(root, 'test', '.readme-blocks');

  it('every block compiles under strict, importing the package as a user does', () => {
    rmSync(dir, { recursive: true, force: true });
    mkdirSync(dir, { recursive: true });
    try {
      const files = blocks.map((code, i) => {
        const file = join(dir, `block-${i}.mts`);
        writeFileSync(file, code);
        return file;
      });
      const program = ts.createProgram(files, { ...compilerOptions, noEmit: true });
      const problems = ts
        .getPreEmitDiagnostics(program)
        .map((d) => `${d.file ? `${d.file.fileName.split('/').pop()}:${d.file.getLineAndCharacterOfPosition(d.start ?? 0).line + 1}: ` : ''}${ts.flattenDiagnosticMessageText(d.messageText, '\n')}`);
      expect(problems).toEqual([]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('the quick start runs (host backend when there is no GPU) and prints what it says', () => {
    rmSync(dir, { recursive: true, force: true });
    mkdirSync(dir, { recursive: true });
    try {
      const js = ts.transpileModule(quickStart, { compilerOptions: { ...compilerOptions, module: ts.ModuleKind.ES2022 } }).outputText;
      writeFileSync(join(dir, 'quick-start.mjs'), js);
      const r = spawnSync(process.execPath, [join(dir, 'quick-start.mjs')], { encoding: 'utf8' });
      expect(r.stderr).toBe('');
      expect(r.status).toBe(0);
      expect(r.stdout).toBe('600 true\nrefused, nothing changed: 2 sequences\n');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
