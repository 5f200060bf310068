import { createRequire } from 'node:module';
import { join } from 'node:path';
import { defineConfig } from 'vitest/config';

// On a machine with a CUDA device, test files run one at a time: they share
// the GPU's memory, and some measure it (free memory back to baseline) or
// fill it on purpose (device out-of-memory), which would disturb a file
// running beside them. Without a device, files run in parallel.
function cudaPresent(): boolean {
  try {
    const addon = createRequire(join(process.cwd(), 'package.json'))('./build/Release/vattention.node') as {
      driverInfo(): { devices: unknown[] };
    };
    return addon.driverInfo().devices.length > 0;
  } catch {
    return false;
  }
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
