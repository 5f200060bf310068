// The README's TypeScript blocks are complete programs: each is type-checked
// under `strict` against the built package, imported by its name.
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import ts from 'typescript';
import { describe, expect, it } from 'vitest';

const root = join(__dirname, '..');
const built = existsSync(join(root, 'dist', 'esm', 'index.d.mts'));
const blocks = [...readFileSync(join(root, 'README.md'), 'utf8').matchAll(/```ts\n([\s\S]*?)```/g)].map((m) => m[1]!);

describe.skipIf(!built)(`README TypeScript${built ? '' : ' (skipped: dist/ not built; run npm install)'}`, () => {
  it('has TypeScript blocks to check', () => {
    expect(blocks.length).toBeGreaterThan(0);
  });

  it('every block compiles under strict, importing the package as a user does', () => {
    // Inside the package, so that 'vattention' resolves through its own exports map.
    const dir = join(root, 'test', '.readme-blocks');
    rmSync(dir, { recursive: true, force: true });
    mkdirSync(dir, { recursive: true });
    try {
      const files = blocks.map((code, i) => {
        const file = join(dir, `block-${i}.mts`);
        writeFileSync(file, code);
        return file;
      });
      const program = ts.createProgram(files, {
        strict: true,
        noEmit: true,
        target: ts.ScriptTarget.ES2022,
        module: ts.ModuleKind.Node16,
        moduleResolution: ts.ModuleResolutionKind.Node16,
        lib: ['lib.es2022.d.ts', 'lib.esnext.disposable.d.ts'],
        types: ['node'],
        skipLibCheck: true,
      });
      const problems = ts
        .getPreEmitDiagnostics(program)
        .map((d) => `${d.file ? `${d.file.fileName.split('/').pop()}:${d.file.getLineAndCharacterOfPosition(d.start ?? 0).line + 1}: ` : ''}${ts.flattenDiagnosticMessageText(d.messageText, '\n')}`);
      expect(problems).toEqual([]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
