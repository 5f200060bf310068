// npm pack / publish: the tarball ships the prebuilt addon for this platform
// (prebuilds/, made with prebuildify) and dist/. Rebuilds the prebuild only
// when a native source is newer than it, so the packaging checks (which pack
// several times) compile once.
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';

const root = new URL('..', import.meta.url).pathname;
const prebuild = join(root, 'prebuilds', `${process.platform}-${process.arch}`, 'vattention.glibc.node');

function newestSource(dir) {
  let newest = 0;
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, entry.name);
    newest = Math.max(newest, entry.isDirectory() ? newestSource(p) : statSync(p).mtimeMs);
  }
  return newest;
}

const sources = Math.max(newestSource(join(root, 'native')), statSync(join(root, 'binding.gyp')).mtimeMs);
if (!existsSync(prebuild) || statSync(prebuild).mtimeMs < sources) {
  execFileSync('npm', ['run', 'prebuild'], { stdio: 'inherit', cwd: root });
}
if (!existsSync(join(root, 'dist', 'esm', 'index.mjs'))) execFileSync('npm', ['run', 'build:ts'], { stdio: 'inherit', cwd: root });
