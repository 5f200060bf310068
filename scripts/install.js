#!/usr/bin/env node
// The package's install step. Where a prebuilt binary ships for this
// platform (prebuilds/linux-x64, glibc) there is nothing to do: the loader
// finds it at run time (lib/native.ts), so installing with --ignore-scripts
// works too. Elsewhere, or with VATTENTION_BUILD_FROM_SOURCE=1 (or npm's
// --build-from-source), it builds the addon with node-gyp, and when that
// fails says what is missing and how to fix it.
'use strict';
const { spawnSync } = require('node:child_process');
const { existsSync } = require('node:fs');
const path = require('node:path');

const root = path.join(__dirname, '..');
const forced = process.env.VATTENTION_BUILD_FROM_SOURCE === '1' || process.env.npm_config_build_from_source === 'true';
const glibc = process.report && process.report.getReport().header.glibcVersionRuntime;
const prebuild = path.join(root, 'prebuilds', `${process.platform}-${process.arch}`, 'vattention.glibc.node');
// A clone of the repository (binding.gyp beside a .git) builds from source: its developers change the C++.
const isClone = existsSync(path.join(root, '.git'));
// The prebuild needs this glibc or newer (docs/development.md, "The prebuilt binary").
const floor = require(path.join(root, 'package.json')).prebuildGlibcFloor;
const atLeast = (a, b) => {
  const [x, y] = [a.split('.').map(Number), b.split('.').map(Number)];
  for (let i = 0; i < Math.max(x.length, y.length); i++) if ((x[i] || 0) !== (y[i] || 0)) return (x[i] || 0) > (y[i] || 0);
  return true;
};
if (!forced && !isClone && process.platform === 'linux' && glibc && existsSync(prebuild)) {
  if (!floor || atLeast(glibc, floor)) {
    console.log(`vattention: using the prebuilt addon for ${process.platform}-${process.arch} (glibc ${glibc} >= ${floor}); no compiler needed`);
    process.exit(0);
  }
  console.log(`vattention: the prebuilt addon needs glibc >= ${floor} and this system has ${glibc}: building from source`);
}

// npm hands lifecycle scripts its bundled node-gyp; fall back to ours, then PATH.
const candidates = [
  process.env.npm_config_node_gyp,
  path.join(__dirname, '..', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'),
].filter((p) => p && existsSync(p));
const [cmd, args] = candidates.length
  ? [process.execPath, [candidates[0], 'rebuild']]
  : ['node-gyp', ['rebuild']];

const r = spawnSync(cmd, args, { stdio: 'inherit', cwd: root });
if (r.status === 0) process.exit(0);

function have(tool, ...versionArgs) {
  const probe = spawnSync(tool, versionArgs.length ? versionArgs : ['--version'], { stdio: 'ignore' });
  return probe.status === 0;
}
const missing = [];
if (!have('make')) missing.push('make');
if (!have(process.env.CXX || 'g++') && !have('clang++')) missing.push('a C++17 compiler (g++ or clang++)');
if (!have('python3')) missing.push('python3 (node-gyp needs it)');
const lines = [
  '',
  'vattention: building the native addon failed.',
  missing.length
    ? `Missing: ${missing.join(', ')}. On Debian/Ubuntu: sudo apt-get install -y build-essential python3; on RHEL/Fedora: sudo dnf install -y gcc-c++ make python3.`
    : 'The compiler output above says what went wrong.',
  'Node.js headers come from the Node.js distribution; offline, point npm at them with `npm config set nodedir /path/to/node`.',
  'No GPU, CUDA toolkit or NVIDIA driver is needed to build: libcuda is loaded at run time.',
  'Supported: Linux x64/arm64, Node.js >= 20.',
  '',
];
console.error(lines.join('\n'));
process.exit(r.status || 1);
