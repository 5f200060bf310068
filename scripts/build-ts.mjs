// Builds dist/: the CommonJS implementation with tsc (dist/cjs), the CLI
// (dist/cli), and a thin
// ES module entry (dist/esm) that re-exports it, so ESM and CJS consumers
// share one copy of every class (instanceof works across both).
import { execFileSync } from 'node:child_process';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc');
rmSync(join(root, 'dist'), { recursive: true, force: true });
execFileSync(process.execPath, [tsc, '-p', join(root, 'tsconfig.json')], { stdio: 'inherit', cwd: root });
// The CLI after the library: it imports 'vattention' (this package, through its exports).
execFileSync(process.execPath, [tsc, '-p', join(root, 'cli', 'tsconfig.json')], { stdio: 'inherit', cwd: root });

function esmWrapper(entry) {
  // Names are read from the built CommonJS module itself, so the list cannot drift.
  // Loading it loads the addon, which is fine: it needs no GPU.
  const cjs = createRequire(import.meta.url)(join(root, 'dist/cjs', `${entry}.js`));
  const names = Object.keys(cjs).filter((n) => n !== 'default' && n !== '__esModule');
  const lines = [
    `import cjs from '../cjs/${entry}.js';`,
    `export const { ${names.join(', ')} } = cjs;`,
    '',
  ];
  mkdirSync(join(root, 'dist/esm'), { recursive: true });
  writeFileSync(join(root, 'dist/esm', `${entry}.mjs`), lines.join('\n'));
  writeFileSync(join(root, 'dist/esm', `${entry}.d.mts`), `export * from '../cjs/${entry}.js';\n`);
}

esmWrapper('index');
esmWrapper('testing');
esmWrapper('kernels');
esmWrapper('prom-client');
console.log('built dist/cjs and dist/esm');
