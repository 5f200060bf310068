#!/usr/bin/env bash
# The concurrency-heavy tests under ThreadSanitizer: the prefetch worker,
# growAsync (abort, close while busy), worker_threads and process teardown,
# the defect regressions (lost wake-ups, races with close), a cache over
# several devices (a thread per device in a growth) and the model-based
# test with the worker on. Builds the addon with -fsanitize=thread into
# build-tsan/ (cmake-js, -DVATTENTION_TSAN=ON; node-gyp takes VATTENTION_TSAN=1),
# preloads the TSan runtime into node (which is not instrumented: its own
# threads are invisible to TSan, so only the addon's accesses are checked,
# and its synchronisation through pthreads is seen) and runs those files.
# Any report fails the run (halt_on_error, exit code 66).
set -euo pipefail
cd "$(dirname "$0")/.."
npx cmake-js rebuild -O build-tsan --CDVATTENTION_TSAN=ON >/dev/null
export VATTENTION_ADDON="$PWD/build-tsan/Release/vattention.node"
export LD_PRELOAD="$(gcc -print-file-name=libtsan.so)"
# suppressions: see the file for why each one is there.
# ignore_noninstrumented_modules: Node's own (uninstrumented) code is not
# checked through interceptors; the addon's accesses are, on every thread.
export TSAN_OPTIONS="halt_on_error=1 exitcode=66 second_deadlock_stack=1 report_signal_unsafe=0 ignore_noninstrumented_modules=1 suppressions=$PWD/scripts/tsan.supp"
# The mutation first: a race written on purpose on a libuv pool thread must be
# reported (exit 66), or the suppressions hide the races this run is for.
set +e
node -e 'require(process.env.VATTENTION_ADDON).racePoolThread()' 2>/dev/null
status=$?
set -e
if [ "$status" -ne 66 ]; then
  echo "ThreadSanitizer: the pool-thread race mutation was not reported (exit $status): races on pool threads would be hidden" >&2
  exit 1
fi
echo "ThreadSanitizer: the pool-thread race mutation is reported"
files=(test/prefetch.test.ts test/teardown.test.ts test/defects.test.ts test/review-defects.test.ts test/model.test.ts test/faults.test.ts test/swap-suspend.test.ts test/sharing.test.ts test/multi-device.test.ts test/multi-device-model.test.ts)
node node_modules/vitest/vitest.mjs run "${files[@]}" "$@"
echo "ThreadSanitizer: no report (${files[*]})"
