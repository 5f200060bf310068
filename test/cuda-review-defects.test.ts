// The GPU halves of issue 27's items 1, 6 and 16, with real kernels and real
// streams: a share's copy queued behind a busy stream, a fenced released
// sharer, failures in the middle of queued transfers. A fault here can be a
// sticky CUDA error that ends every later CUDA call of the process, which is
// why this file stands alone (vitest runs each file in its own process).
import { describe, expect, it } from 'vitest';
import { KVCache, type Sequence } from '../lib/index.js';
import {
  checkFillU32,
  createCounter,
  createStream,
  destroyCounter,
  destroyStream,
  fillU32,
  readCounter,
  spinThenFillU32,
  spinThenReadU32,
  synchronizeStream,
} from '../lib/testing.js';
import { cudaSkip } from './backends.js';

const MiB = 1024 * 1024;
const spin = 300e6; // a busy stream: its next work starts after 300 ms

describe.skipIf(cudaSkip !== null)(`issue 27 on a CUDA device${cudaSkip ? ` (skipped: ${cudaSkip})` : ''}`, () => {
  // 8 KV heads x 128 dims fp16 = 2 KiB a token: 1024 tokens a 2 MiB page; 4 layers: 8 pages a group.
  const shape = { backend: 'cuda' as const, layout: 'per-layer' as const, layers: 4, kvHeads: 8, headDim: 128, dtype: 'float16' as const, maxSequences: 4, maxTokens: 16_384, prefetchTokens: 0 };
  const tensors = [0, 1, 2, 3].flatMap((layer) => (['k', 'v'] as const).map((kind) => ({ layer, kind })));
  const fill = (c: KVCache, seq: Sequence, tokens: number, seed: number) => {
    for (const [t, { layer, kind }] of tensors.entries()) fillU32(seq.address(layer, kind), (tokens * c.tokenBytes) / 4, seed + t);
    synchronizeStream(0n);
  };
  /** Words of `seq`'s first `tokens` tokens, over every tensor, that do not hold the pattern of `seed`. */
  const mismatches = (c: KVCache, seq: Sequence, tokens: number, seed: number) => {
    const counter = createCounter();
    try {
      for (const [t, { layer, kind }] of tensors.entries()) checkFillU32(seq.address(layer, kind), (tokens * c.tokenBytes) / 4, seed + t, counter);
      synchronizeStream(0n);
      return readCounter(counter);
    } finally {
      destroyCounter(counter);
    }
  };

  it('1: a prefix share from a released sequence with its copy queued behind a busy stream copies the source, not pages reused meanwhile', () => {
    using c = new KVCache({ ...shape, memoryBudget: 40 * 2 * MiB });
    const stream = createStream();
    try {
      const n = 1024 + 300; // one whole group shared, 300 tokens copied
      const a = c.reserve();
      c.grow(a, n);
      fill(c, a, n, 100);
      const somewhere = a.address(0, 'k');
      c.release(a);
      spinThenFillU32(somewhere, 0, 0, spin, { stream }); // the stream is busy for 300 ms (it writes nothing)
      const child = c.reserve({ prefix: { from: a, tokens: n }, stream });
      // Another sequence takes every page it can get without waiting and writes all of it.
      const d = c.reserve({ expectedTokens: 0 });
      const groups = Math.floor(c.obtainableBytes() / c.layout.bytesPerPageGroup);
      c.grow(d, Math.min(groups * 1024, shape.maxTokens));
      fill(c, d, d.tokens, 900);
      synchronizeStream(stream);
      expect(mismatches(c, child, n, 100)).toBe(0);
      expect(mismatches(c, d, d.tokens, 900)).toBe(0);
    } finally {
      synchronizeStream(stream);
      destroyStream(stream);
    }
  });

  it('1: a fork whose copy is queued behind a busy stream, the parent released at once without that stream: the parent\'s slot takes no new sequence before the copy ran', () => {
    using c = new KVCache({ ...shape, memoryBudget: 40 * 2 * MiB });
    const stream = createStream();
    try {
      const n = 500; // less than a group: all of it copied
      const p = c.reserve();
      c.grow(p, n);
      fill(c, p, n, 200);
      spinThenFillU32(p.address(0, 'k'), 0, 0, spin, { stream });
      const child = c.fork(p, { stream });
      c.release(p);
      const x = c.reserve(); // would be the parent's slot (the most mapped pages) but for the copy
      c.grow(x, n);
      fill(c, x, n, 700);
      synchronizeStream(stream);
      expect(mismatches(c, child, n, 200)).toBe(0);
      expect(mismatches(c, x, n, 700)).toBe(0);
    } finally {
      synchronizeStream(stream);
      destroyStream(stream);
    }
  });

  it('6: a growth that needs a fenced released sharer\'s pages waits for the kernel reading them and gets them', () => {
    using c = new KVCache({ ...shape, memoryBudget: 80 * 2 * MiB }); // 10 groups
    const a = c.reserve();
    c.grow(a, 2048 + 100); // 3 groups
    fill(c, a, 2048 + 100, 300);
    const b = c.fork(a); // 2 groups shared, 1 copied
    spinThenReadU32(b.address(0, 'k'), (2048 * c.tokenBytes) / 4, spin); // legacy default stream
    c.release(b, { stream: 0n });
    c.release(a);
    const d = c.reserve({ expectedTokens: 0 });
    const t0 = performance.now();
    c.grow(d, 10 * 1024); // the whole budget: the fork's 3 groups included
    const waited = performance.now() - t0;
    expect(d.tokens).toBe(10 * 1024);
    expect(waited).toBeGreaterThan(100); // it waited for the reader rather than refuse
    synchronizeStream(0n); // CUDA_ERROR_ILLEGAL_ADDRESS here if the pages went too early
  });

  it('16: swapOut, swapIn, suspend and resume failing with transfers already queued: the data stays exact and the next try succeeds', async () => {
    using c = new KVCache({ ...shape, memoryBudget: 40 * 2 * MiB, hostMemoryBudget: 256 * MiB });
    const n = 3000;
    const s = c.reserve();
    c.grow(s, n);
    fill(c, s, n, 400);
    c._injectFault('copyToHost', 3, false); // the 4th transfer: 3 are queued
    await expect(c.swapOut(s)).rejects.toMatchObject({ code: 'ERR_CUDA' });
    expect(mismatches(c, s, n, 400)).toBe(0);
    const swapped = await c.swapOut(s);
    c._injectFault('copyFromHost', 3, false);
    await expect(c.swapIn(swapped)).rejects.toMatchObject({ code: 'ERR_CUDA' });
    const back = await c.swapIn(swapped);
    expect(mismatches(c, back, n, 400)).toBe(0);
    c._injectFault('copyToHost', 3, false);
    await expect(c.suspend({ keep: 'host' })).rejects.toMatchObject({ code: 'ERR_CUDA' });
    await c.suspend({ keep: 'host' });
    c._injectFault('copyFromHost', 3, false);
    await expect(c.resume()).rejects.toMatchObject({ code: 'ERR_CUDA' });
    await c.resume();
    expect(mismatches(c, back, n, 400)).toBe(0);
  });
});
