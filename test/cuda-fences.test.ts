// A fence survives reuse of its slot (issue 16), on a real GPU: a kernel still
// reads a released sequence while the slot is handed to the next sequence and
// memory runs short. Before the fix, reclaim took the reused slot's spare tail
// (the released sequence's pages) without waiting, and the kernel faulted
// with CUDA_ERROR_ILLEGAL_ADDRESS, a sticky error that ends every later CUDA
// call of the process. That is why this file stands alone (vitest runs each
// file in its own process).
import { describe, expect, it } from 'vitest';
import { KVCache } from '../lib/index.js';
import { fillU32, fillValue, spinThenReadU32, synchronizeStream } from '../lib/testing.js';
import { cudaSkip } from './backends.js';

const MiB = 1024 * 1024;

describe.skipIf(cudaSkip !== null)(`fences across slot reuse on a CUDA device${cudaSkip ? ` (skipped: ${cudaSkip})` : ''}`, () => {
  // 8 KV heads x 128 dims fp16 = 2 KiB a token: 1024 tokens a 2 MiB page; 4 layers: 8 pages a group.
  const shape = { backend: 'cuda' as const, layout: 'per-layer' as const, layers: 4, kvHeads: 8, headDim: 128, dtype: 'float16' as const, maxSequences: 4, maxTokens: 65_536, prefetchTokens: 0 };
  const spin = 300e6; // the reader starts reading after 300 ms

  it('a kernel still reading a released sequence survives: its reused slot is reclaimed only after the fence', () => {
    using c = new KVCache({ ...shape, memoryBudget: 80 * 2 * MiB });
    const a = c.reserve();
    c.grow(a, 8192); // 8 groups = 64 pages
    const words = (8192 * c.tokenBytes) / 4;
    fillU32(a.address(0, 'k'), words, 5);
    spinThenReadU32(a.address(0, 'k'), words, spin); // legacy default stream, as the issue describes
    c.release(a, { stream: 0n });
    const b = c.reserve({ expectedTokens: 1000 });
    expect(b.slot).toBe(a.slot); // best fit: A's slot and A's pages
    c.grow(b, 1); // the other 7 groups are B's spare tail, still read by the kernel
    const other = c.reserve({ expectedTokens: 0 });
    const t0 = performance.now();
    c.grow(other, 4096); // 4 groups: 2 from the budget, 2 reclaimed from B's fenced tail
    const waited = performance.now() - t0;
    expect(waited).toBeGreaterThan(150); // it waited for the reader
    synchronizeStream(0n); // throws CUDA_ERROR_ILLEGAL_ADDRESS if the pages went too early
    expect(c.stats().slots[b.slot]!.mappedPages).toBe(6 * 8);
    // B's own first group was never touched: the bytes A left are there
    const back = new Uint32Array(c.read(b, { layer: 0, kind: 'k', token: 0, count: 1 }).buffer);
    expect(back[0]).toBe(fillValue(0, 5));
  });

  it('with an unfenced released slot to take instead, the growth does not wait at all', () => {
    using c = new KVCache({ ...shape, memoryBudget: 80 * 2 * MiB });
    const a = c.reserve();
    c.grow(a, 6144); // 6 groups
    const spare = c.reserve();
    c.grow(spare, 2048); // 2 groups, released with nothing queued on it
    c.release(spare);
    const words = (6144 * c.tokenBytes) / 4;
    spinThenReadU32(a.address(0, 'k'), words, spin);
    c.release(a, { stream: 0n });
    const b = c.reserve({ expectedTokens: 6000 });
    expect(b.slot).toBe(a.slot);
    c.grow(b, 1);
    const other = c.reserve({ expectedTokens: 0 });
    const t0 = performance.now();
    c.grow(other, 4096); // 2 groups from the budget, 2 from the unfenced slot
    expect(performance.now() - t0).toBeLessThan(150);
    expect(c.stats().slots[b.slot]!.mappedPages).toBe(6 * 8);
    synchronizeStream(0n);
  });

  it('close() with a reader still running waits for it, then frees everything', () => {
    const c = new KVCache({ ...shape, memoryBudget: 80 * 2 * MiB });
    const a = c.reserve();
    c.grow(a, 4096);
    spinThenReadU32(a.address(3, 'v'), (4096 * c.tokenBytes) / 4, spin);
    c.release(a, { stream: 0n });
    const again = c.reserve({ expectedTokens: 4096 });
    c.grow(again, 10);
    const t0 = performance.now();
    c.close();
    expect(performance.now() - t0).toBeGreaterThan(150);
    synchronizeStream(0n);
  });
});
