import { createRequire } from 'node:module';
import { join } from 'node:path';
import { defineConfig } from 'vitest/config';

// On a machine with a CUDA device, test files run one at a time: they share
// the GPU's memory, and some measure it (free memory back to baseline) or
// fill it on purpose (device out-of-memory), which would disturb a file
// running beside them. Without a device, files run in parallel.
// The addon is looked for where the library looks (lib/native.ts): a source
// build, then the shipped prebuild.
function cudaPresent(): boolean {
  const load = createRequire(join(process.cwd(), 'package.json'));
  for (const path of ['./build/Release/vattention.node', `./prebuilds/${process.platform}-${process.arch}/vattention.glibc.node`]) {
    try {
      const addon = load(path) as { driverInfo(): { devices: unknown[] } };
      return addon.driverInfo().devices.length > 0;
    } catch {
      // not there (or not loadable): try the next
    }
  }
  return false;
}

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    fileParallelism: !cudaPresent(),
    reporters: ['default', './test/skip-reporter.ts'],
  },
});
