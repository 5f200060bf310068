#!/usr/bin/env bash
# The host-backend suite under AddressSanitizer and UndefinedBehaviorSanitizer.
# Builds the addon with -fsanitize=address,undefined into build-sanitize/
# (cmake-js, -DVATTENTION_SANITIZE=ON; node-gyp takes VATTENTION_SANITIZE=1),
# preloads the sanitizer runtimes into node (which is not instrumented) and
# runs the whole vitest suite against that build. Any report fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
npx cmake-js rebuild -O build-sanitize --CDVATTENTION_SANITIZE=ON >/dev/null
export VATTENTION_ADDON="$PWD/build-sanitize/Release/vattention.node"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
# Leak checking is off: node itself keeps allocations alive at exit.
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
npx vitest run "$@"
echo "sanitizers (address, undefined): no report"
