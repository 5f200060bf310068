#!/usr/bin/env bash
# Packaging as a user meets it: `npm pack` (prepack makes the prebuilt
# binary), then install the tarball into fresh projects: a CommonJS one that
# builds from source (VATTENTION_BUILD_FROM_SOURCE=1), an ESM TypeScript one
# (prebuilt binary), one where compiling is impossible (no make, no compiler,
# no python on PATH; CXX=false), and one installed with --ignore-scripts;
# type-check and run them. Also: the tarball carries no
# tests, CLI sources or build leftovers (and no CLI types: the CLI is not part
# of the API), it carries the LICENSE and the examples, publint finds nothing
# wrong and the types resolve under every moduleResolution (attw).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$root"
npx publint --strict
# Types resolve for every consumer: node10 (through ./testing.d.ts, ./kernels.d.ts, ./prom-client.d.ts), node16 from CJS and ESM, bundlers.
npx attw --pack . --format table-flipped
npm pack --pack-destination "$work" >/dev/null 2>&1
tgz=$(ls "$work"/vattention-*.tgz)
listing=$(tar tzf "$tgz")
echo "packed $(basename "$tgz"): $(echo "$listing" | wc -l) files"
if echo "$listing" | grep -E '^package/(test|build|build-sanitize|build-tsan|\.gpu|\.ci|node_modules|lib|cli|bench/results)/|\.tsbuildinfo$|^package/dist/cli/.*\.d\.ts$'; then
  echo "the tarball carries files it should not (above)" >&2
  exit 1
fi
for f in package/prebuilds/linux-x64/vattention.glibc.node package/dist/cjs/index.js package/dist/esm/index.mjs package/dist/cjs/index.d.ts package/dist/cjs/testing.d.ts package/dist/cli/cli.js package/binding.gyp package/native/sources.txt package/scripts/install.js package/LICENSE package/README.md package/examples/serving-loop.mjs package/dist/cjs/prom-client.d.ts package/dist/esm/prom-client.mjs package/prom-client.d.ts package/dist/cjs/kernels.d.ts package/dist/esm/kernels.mjs package/kernels.d.ts package/examples/llama/make-weights.mjs; do
  echo "$listing" | grep -qx "$f" || { echo "missing from the tarball: $f" >&2; exit 1; }
done

# CommonJS JavaScript consumer, built from source
mkdir "$work/cjs" && cd "$work/cjs"
npm init -y >/dev/null
VATTENTION_BUILD_FROM_SOURCE=1 npm install --no-audit --no-fund "$tgz" >/dev/null
[ -f node_modules/vattention/build/Release/vattention.node ] || { echo "the source build did not happen" >&2; exit 1; }
cat > index.js <<'JS'
const { KVCache, OutOfMemoryError } = require('vattention');
const cache = new KVCache({ backend: 'host', layers: 2, kvHeads: 2, headDim: 64, dtype: 'float16', maxSequences: 2, maxTokens: 64, pageSize: 4096, memoryBudget: 1 << 20 });
const seq = cache.reserve();
cache.grow(seq, 40);
cache.write(seq, { layer: 1, kind: 'v', token: 0 }, new Uint8Array(40 * cache.tokenBytes).fill(9));
if (!cache.read(seq, { layer: 1, kind: 'v', token: 0, count: 40 }).every((x) => x === 9)) throw new Error('data');
if (typeof cache.tensor(0, 'k').address !== 'bigint') throw new Error('address');
if (!(OutOfMemoryError.prototype instanceof Error)) throw new Error('classes');
cache.close();
console.log('cjs consumer: ok');
JS
node index.js
npx vattention info >/dev/null

# ESM TypeScript consumer
mkdir "$work/esm" && cd "$work/esm"
npm init -y >/dev/null
npm pkg set type=module
npm install --no-audit --no-fund "$tgz" >/dev/null
cat > tsconfig.json <<JSON
{ "compilerOptions": { "module": "nodenext", "moduleResolution": "nodenext", "target": "es2022", "strict": true,
  "lib": ["es2022", "esnext.disposable"], "types": ["node"], "typeRoots": ["$root/node_modules/@types"], "outDir": "out", "skipLibCheck": false } }
JSON
cat > index.ts <<'TS'
import { KVCache, CudaUnavailableError, type CacheStats, type Sequence } from 'vattention';
import { liveResources } from 'vattention/testing';
using cache = new KVCache({ backend: 'host', layers: 2, kvHeads: 2, headDim: 64, dtype: 'bfloat16', maxSequences: 2, maxTokens: 64, pageSize: 4096, memoryBudget: 1 << 20 });
const seq: Sequence = cache.reserve({ expectedTokens: 10 });
cache.step([seq], [10]);
await cache.growAsync(seq, 20);
const stats: CacheStats = cache.stats();
const address: bigint = seq.address(0, 'k');
if (stats.activeSequences !== 1 || address <= 0n) throw new Error('state');
if (!(new CudaUnavailableError('x') instanceof Error)) throw new Error('classes');
if (typeof liveResources().pages !== 'number') throw new Error('testing entry');
console.log('esm typescript consumer: ok');
TS
# The README's quick start, pasted as it is.
node -e "const r=require('fs').readFileSync('$root/README.md','utf8'); const q=r.slice(r.indexOf('## Quick start')); process.stdout.write(/\`\`\`ts\n([\s\S]*?)\`\`\`/.exec(q)[1])" > quick-start.ts
"$root/node_modules/.bin/tsc" -p .
node out/index.js
[ "$(node out/quick-start.js)" = "$(printf '600 true\nrefused, nothing changed: 2 sequences')" ] || { echo "the README's quick start did not run as it says" >&2; exit 1; }
echo "the README's quick start: ok"
[ ! -e node_modules/vattention/build ] || { echo "the ESM consumer compiled although a prebuild fits" >&2; exit 1; }

# Consumers that cannot compile: (1) no make, compiler or python on PATH and
# CXX=false; (2) npm runs no install script at all.
cat > "$work/smoke.cjs" <<'JS'
const { KVCache, driverInfo } = require('vattention');
const cache = new KVCache({ backend: 'host', layers: 4, kvHeads: 2, headDim: 64, dtype: 'float16', maxSequences: 2, maxTokens: 64, pageSize: 4096, memoryBudget: 1 << 20 });
const seq = cache.reserve();
cache.grow(seq, 33);
cache.write(seq, { layer: 3, kind: 'k', token: 0 }, new Uint8Array(33 * cache.tokenBytes).fill(7));
if (!cache.read(seq, { layer: 3, kind: 'k', token: 0, count: 33 }).every((x) => x === 7)) throw new Error('data');
cache.close();
if (typeof driverInfo().loaded !== 'boolean') throw new Error('driverInfo');
console.log('prebuilt consumer: ok');
JS
fake=$work/no-toolchain
mkdir "$fake"
for tool in make gmake cc gcc g++ c++ clang clang++ python python3; do printf '#!/bin/sh\necho "$0: not available here" >&2\nexit 127\n' > "$fake/$tool"; chmod +x "$fake/$tool"; done
mkdir "$work/nocompiler" && cd "$work/nocompiler"
npm init -y >/dev/null
PATH="$fake:$PATH" CXX=false CC=false npm install --no-audit --no-fund "$tgz" >/dev/null
[ ! -e node_modules/vattention/build ] || { echo "something was compiled" >&2; exit 1; }
cp "$work/smoke.cjs" . && PATH="$fake:$PATH" node smoke.cjs
PATH="$fake:$PATH" npx vattention info >/dev/null
mkdir "$work/noscripts" && cd "$work/noscripts"
npm init -y >/dev/null
npm install --ignore-scripts --no-audit --no-fund "$tgz" >/dev/null
[ ! -e node_modules/vattention/build ] || { echo "something was compiled" >&2; exit 1; }
cp "$work/smoke.cjs" . && node smoke.cjs

# The prebuild's glibc floor (package.json prebuildGlibcFloor): no symbol
# version newer than it and no libstdc++ symbol at all (it is linked in).
floor=$(node -p "require('$root/package.json').prebuildGlibcFloor")
prebuilt=node_modules/vattention/prebuilds/linux-x64/vattention.glibc.node
newest=$(objdump -T "$prebuilt" | grep -oE 'GLIBC_[0-9]+(\.[0-9]+)*' | sed 's/GLIBC_//' | sort -V | tail -1)
[ "$(printf '%s\n%s\n' "$newest" "$floor" | sort -V | tail -1)" = "$floor" ] || { echo "the prebuild needs GLIBC_$newest, newer than its floor $floor" >&2; exit 1; }
if objdump -T "$prebuilt" | grep -E 'GLIBCXX|CXXABI'; then echo "the prebuild needs the system's libstdc++ (above)" >&2; exit 1; fi
echo "prebuild: newest glibc symbol $newest (floor $floor), no GLIBCXX"
# Below the floor the loader says so and names the fix; install.js builds from source instead.
cp -r "$work/noscripts" "$work/oldglibc" && cd "$work/oldglibc"
node -e "const f='node_modules/vattention/package.json',p=require('./'+f);p.prebuildGlibcFloor='99.0';require('fs').writeFileSync(f,JSON.stringify(p))"
node -e "try { new (require('vattention').KVCache)({ backend: 'host', layers: 1, kvHeads: 1, headDim: 64, dtype: 'float16', maxSequences: 1, maxTokens: 64 }); process.exit(1) } catch (e) { if (e.code !== 'ERR_ADDON_LOAD' || !/needs glibc >= 99.0/.test(e.message) || !/--build-from-source/.test(e.message)) throw e; }"
out=$(cd node_modules/vattention && PATH="$fake:$PATH" CXX=false CC=false node scripts/install.js 2>&1) && { echo "install.js used the prebuild below its floor" >&2; exit 1; }
echo "$out" | grep -q 'needs glibc >= 99.0 and this system has .*: building from source' || { echo "install.js: $out" >&2; exit 1; }
echo "below the floor: the loader refuses with ERR_ADDON_LOAD, install.js builds from source"

# An older userland: Debian 11 (glibc 2.31, libstdc++ of gcc 10), made with
# debootstrap; Node's own binary runs there (it needs glibc 2.28). The
# prebuild loads and works, and `vattention info` reports; the addon built
# from source on this machine (the CJS consumer's) does not load there, which
# shows the check can fail.
if [ "$(id -u)" != 0 ] || ! command -v debootstrap >/dev/null; then
  reason="needs root and debootstrap (apt-get install debootstrap)"
  [ "${VATTENTION_REQUIRE_OLD_USERLAND:-}" != 1 ] || { echo "older userland: $reason" >&2; exit 1; }
  echo "older userland: SKIPPED ($reason)"
else
  old=$work/bullseye
  unset NODE_EXTRA_CA_CERTS  # a path of this machine's, absent there
  debootstrap --variant=minbase bullseye "$old" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  cp "$(command -v node)" "$old/usr/local/bin/node"
  cp -r "$work/noscripts" "$old/prebuilt" && cp -r "$work/cjs" "$old/fromsource"
  chroot "$old" /usr/local/bin/node --version >/dev/null
  echo "older userland: $(chroot "$old" ldd --version | head -1)"
  chroot "$old" /bin/sh -c 'cd /prebuilt && node smoke.cjs && node node_modules/vattention/dist/cli/cli.js info >/dev/null'
  chroot "$old" /bin/sh -c "cd /fromsource && node -e \"try { require('vattention').driverInfo(); process.exit(1) } catch (e) { if (e.code !== 'ERR_ADDON_LOAD' || !/GLIBC/.test(e.message)) throw e; console.log('  (the addon built on this machine does not load there: ' + /GLIBC[A-Z]*_[0-9.]+/.exec(e.message)[0] + ' not found)') }\""
  report=$(chroot "$old" /bin/sh -c 'cd /fromsource && node node_modules/vattention/dist/cli/cli.js info' 2>&1) && { echo "vattention info exited 0 with no addon" >&2; exit 1; }
  echo "$report" | grep -q 'native addon: did not load' || { echo "vattention info did not report the load failure: $report" >&2; exit 1; }
fi
echo "package: ok"
