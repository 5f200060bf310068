#!/usr/bin/env node
// The package's install step: builds the native addon from source with
// node-gyp, and when that fails says what is missing and how to fix it.
'use strict';
const { spawnSync } = require('node:child_process');
const { existsSync } = require('node:fs');
const path = require('node:path');

// npm hands lifecycle scripts its bundled node-gyp; fall back to ours, then PATH.
const candidates = [
  process.env.npm_config_node_gyp,
  path.join(__dirname, '..', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'),
].filter((p) => p && existsSync(p));
const [cmd, args] = candidates.length
  ? [process.execPath, [candidates[0], 'rebuild']]
  : ['node-gyp', ['rebuild']];

const r = spawnSync(cmd, args, { stdio: 'inherit', cwd: path.join(__dirname, '..') });
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
