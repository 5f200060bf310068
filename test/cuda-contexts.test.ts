// A cache works in its own CUDA context whatever the calling thread has
// current (issue 17, item 1), and leaves that context current. Another CUDA
// addon, or a second cache on another device, makes another context current
// on the JS thread; here a second context on the same device stands in.
// Before the fix, release({ stream }) recorded its fence in the wrong context:
// with a stream of the cache's context it failed (CUDA_ERROR_INVALID_HANDLE);
// with 0n the event went to the other context's idle default stream, the
// pages were unmapped at once, and the kernel still reading them faulted
// (a sticky error: this file stands alone).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KVCache } from '../lib/index.js';
import {
  createContext,
  createStream,
  currentContext,
  destroyContext,
  destroyStream,
  fillU32,
  fillValue,
  liveResources,
  setCurrentContext,
  spinThenReadU32,
  synchronizeStream,
} from '../lib/testing.js';
import { cudaSkip } from './backends.js';

describe.skipIf(cudaSkip !== null)(`a cache called with another context current${cudaSkip ? ` (skipped: ${cudaSkip})` : ''}`, () => {
  const shape = { backend: 'cuda' as const, layout: 'per-layer' as const, layers: 2, kvHeads: 8, headDim: 128, dtype: 'float16' as const, maxSequences: 4, maxTokens: 16_384, prefetchTokens: 0 };
  let foreign = 0n;
  beforeAll(() => {
    foreign = createContext();
  });
  afterAll(() => {
    destroyContext(foreign);
  });

  it('release({ stream: 0n }) fences the cache\'s own default stream: reclaim waits for the kernel, no fault', () => {
    using c = new KVCache(shape);
    const a = c.reserve();
    c.grow(a, 4096);
    const words = (4096 * c.tokenBytes) / 4;
    spinThenReadU32(a.address(0, 'k'), words, 300e6); // queued in the primary context, legacy stream
    setCurrentContext(foreign);
    const t0 = performance.now();
    c.release(a, { stream: 0n });
    expect(currentContext()).toBe(foreign);
    c.reclaim();
    expect(performance.now() - t0).toBeGreaterThan(150);
    expect(currentContext()).toBe(foreign);
    synchronizeStream(0n); // the testing tools switch back to the primary context
  });

  it('release({ stream }) with a stream of the cache\'s context works while another context is current', () => {
    using c = new KVCache(shape);
    const a = c.reserve();
    c.grow(a, 100);
    const stream = createStream();
    try {
      fillU32(a.address(1, 'v'), 100, 3, { stream });
      setCurrentContext(foreign);
      c.release(a, { stream });
      expect(currentContext()).toBe(foreign);
      synchronizeStream(stream);
    } finally {
      destroyStream(stream);
    }
  });

  it('a cache made, grown, written, read and closed with another context current leaves that context current', () => {
    setCurrentContext(foreign);
    const c = new KVCache(shape);
    expect(currentContext()).toBe(foreign);
    const a = c.reserve();
    c.grow(a, 3000);
    const data = new Uint32Array((3000 * c.tokenBytes) / 4).map((_, i) => fillValue(i, 11));
    c.write(a, { layer: 1, kind: 'k', token: 0 }, data);
    const back = new Uint32Array(c.read(a, { layer: 1, kind: 'k', token: 0, count: 3000 }).buffer);
    expect(back.every((x, i) => x === data[i])).toBe(true);
    c.stats();
    c.release(a);
    c.reclaim();
    c.trim();
    expect(currentContext()).toBe(foreign);
    c.close();
    expect(currentContext()).toBe(foreign);
    expect(liveResources()).toEqual({ ranges: 0, pages: 0, mappings: 0, fences: 0, contexts: 0 });
  });

  it('growAsync and the prefetch worker bind the cache\'s context on their own threads', async () => {
    setCurrentContext(foreign);
    using c = new KVCache({ ...shape, prefetchTokens: 1024 });
    const a = c.reserve();
    await c.growAsync(a, 5000);
    for (let t = 5001; t < 7000; t += 100) c.step([a], [t]);
    expect(c.stats().prefetch.errors).toBe(0);
    expect(c.stats().prefetch.workerError).toBe(null);
    expect(currentContext()).toBe(foreign);
  });
});
