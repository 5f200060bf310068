// Behaviour of the KV cache, run against every backend present.
import { readFileSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { KVCache, OutOfMemoryError, type Sequence } from '../lib/index.js';
import { deviceBackends as backends, groupPagesOf, label, layerGroupsOf, pattern, stateOf, tokensPerGroupOf } from './backends.js';

for (const b of backends) {
  describe.skipIf(b.skip !== null)(label(b), () => {
    const open: KVCache[] = [];
    const make = (extra: Partial<typeof b.options> = {}) => {
      const c = new KVCache({ ...b.options, ...extra });
      open.push(c);
      return c;
    };
    afterEach(() => {
      for (const c of open.splice(0)) c.close();
    });
    // Tokens of one page group (whole ones), from the option, not the cache.
    const tokensPerPage = (c: KVCache) => tokensPerGroupOf(b, c.pageSize, c.tokenBytes);
    // Pages of one page group on one device, and on all of them (what stats() adds up).
    const devicePages = groupPagesOf(b);
    const groupPages = devicePages * b.deviceCount;

    it("exposes every layer's K and V as a view of shape [maxSequences, maxTokens, kvHeads, headDim] whose token rows never overlap another view's", () => {
      const c = make();
      const o = b.options;
      const layersPerTensor = o.layers / layerGroupsOf(b);
      const tensors = c.tensors();
      expect(tensors).toHaveLength(o.layers);
      const views = tensors.flatMap((t) => [t.k, t.v]);
      const slotStride = views[0]!.strideBytes[0];
      // slot stride covers maxTokens rows, rounded up to whole pages
      expect(slotStride % c.pageSize).toBe(0);
      expect(slotStride).toBeGreaterThanOrEqual(o.maxTokens * c.tokenBytes * layersPerTensor);
      for (const v of views) {
        const heads = o.kvHeads / b.deviceCount; // one device's shard
        expect(v.shape).toEqual([o.maxSequences, o.maxTokens, heads, o.headDim]);
        expect(v.strides).toEqual([slotStride / 2, heads * o.headDim * layersPerTensor, o.headDim, 1]);
        expect(typeof v.address).toBe('bigint');
      }
      // the first layer of each tensor is page aligned
      for (let layer = 0; layer < o.layers; layer += layersPerTensor)
        for (const v of [tensors[layer]!.k, tensors[layer]!.v]) expect(v.address % BigInt(c.pageSize)).toBe(0n);
      // byte intervals of tokens 0..2 of slots 0..1 in every view are disjoint and inside the range
      const intervals: [bigint, bigint][] = [];
      for (const v of views)
        for (let slot = 0; slot < 2; slot++)
          for (let token = 0; token < 3; token++) {
            const at = v.address + BigInt(slot * v.strideBytes[0] + token * v.strideBytes[1]);
            intervals.push([at, at + BigInt(c.tokenBytes)]);
          }
      intervals.sort((x, y) => (x[0] < y[0] ? -1 : 1));
      for (let i = 1; i < intervals.length; i++) expect(intervals[i]![0] >= intervals[i - 1]![1]).toBe(true);
      const end = views[0]!.address + BigInt(c.stats().reservedVirtualBytes);
      expect(intervals.at(-1)![1] <= end).toBe(true);
    });

    it('reports its layout and page group in stats()', () => {
      const c = make();
      expect(c.stats().layout).toEqual({
        name: b.layoutName,
        layerGroups: layerGroupsOf(b),
        pagesPerPageGroup: devicePages,
        bytesPerPageGroup: devicePages * c.pageSize,
        tokensPerPageGroup: c.pageSize / (c.tokenBytes * (b.options.layers / layerGroupsOf(b))),
      });
    });

    it('backs nothing until a sequence grows, then exactly the pages needed in every layer', () => {
      const c = make();
      const seq = c.reserve();
      expect(c.stats().pagesMapped).toBe(0);
      c.grow(seq, 1);
      expect(c.stats().pagesMapped).toBe(groupPages);
      c.grow(seq, tokensPerPage(c));
      expect(c.stats().pagesMapped).toBe(groupPages);
      c.grow(seq, tokensPerPage(c) + 1);
      expect(c.stats().pagesMapped).toBe(2 * groupPages);
      expect(seq.tokens).toBe(tokensPerPage(c) + 1);
      const s = c.stats();
      expect(s.bytesBacked).toBe(2 * groupPages * c.pageSize);
      expect(s.bytesUsed).toBe((tokensPerPage(c) + 1) * c.bytesPerToken);
      expect(s.slots[seq.slot]).toMatchObject({ active: true, tokens: tokensPerPage(c) + 1, backedTokens: 2 * tokensPerPage(c) });
    });

    it('obtainableBytes() says what a growth could get, and a growth of exactly that succeeds while one page more is refused', () => {
      const c = new KVCache({ ...b.options, prefetchTokens: 0 });
      try {
        const group = groupPages * c.pageSize;
        expect(c.obtainableBytes()).toBe(c.stats().budgetBytes);
        const a = c.reserve();
        c.grow(a, tokensPerPage(c) * 2);
        const other = c.reserve();
        c.grow(other, tokensPerPage(c));
        c.release(other); // its group stays mapped, and counts as obtainable
        const free = c.obtainableBytes();
        expect(free).toBe(c.stats().budgetBytes - 2 * group); // a's two groups are not obtainable; the released one is
        const groups = Math.floor(free / group);
        const fits = Math.min(b.options.maxTokens, tokensPerPage(c) * (2 + groups));
        const before = stateOf(c);
        if (tokensPerPage(c) * (2 + groups + 1) <= b.options.maxTokens) {
          expect(() => c.grow(a, tokensPerPage(c) * (2 + groups + 1))).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_MEMORY' }));
          expect(stateOf(c)).toEqual(before);
        }
        c.grow(a, fits);
        expect(a.tokens).toBe(fits);
      } finally {
        c.close();
      }
    });

    it('stats() says where the backed bytes are: tokens, past the tokens, released slots; and what is pooled', () => {
      const c = new KVCache({ ...b.options, prefetchTokens: 0 });
      try {
        const group = groupPages * c.pageSize;
        const a = c.reserve();
        c.grow(a, tokensPerPage(c) + 1); // 2 groups, one token into the second
        const other = c.reserve();
        c.grow(other, 1);
        c.release(other);
        let s = c.stats();
        expect(s.bytesUsed).toBe((tokensPerPage(c) + 1) * c.bytesPerToken);
        expect(s.bytesBeyondTokens).toBe(2 * group - s.bytesUsed);
        expect(s.bytesInReleasedSlots).toBe(group);
        expect(s.bytesPooled).toBe(0);
        expect(s.bytesUsed + s.bytesBeyondTokens + s.bytesInReleasedSlots).toBe(s.bytesBacked);
        expect(s.bytesPageRounding).toBe(s.bytesBeyondTokens); // no look-ahead, nothing inherited
        expect(s.bytesSpareGroups).toBe(0);
        // a sequence placed in the released 2-group slot... first free a's slot and place a short one there
        c.release(a);
        const short = c.reserve({ expectedTokens: 2 * tokensPerPage(c) });
        expect(short.slot).toBe(a.slot);
        c.grow(short, 1);
        s = c.stats();
        expect(s.bytesPageRounding).toBe(group - s.bytesUsed); // the group its one token needs
        expect(s.bytesSpareGroups).toBe(group); // the second group it inherited
        expect(s.bytesPageRounding + s.bytesSpareGroups).toBe(s.bytesBeyondTokens);
        c.release(short);
        c.reclaim();
        s = c.stats();
        expect(s.bytesInReleasedSlots).toBe(0);
        expect(s.bytesPooled).toBe(3 * group);
      } finally {
        c.close();
      }
    });

    it('growing to fewer tokens than backed does nothing', () => {
      const c = make();
      const seq = c.reserve();
      c.grow(seq, 20);
      const calls = c.stats().driverCalls.map!.calls;
      c.grow(seq, 5);
      c.grow(seq, 0);
      expect(seq.tokens).toBe(20);
      expect(c.stats().driverCalls.map!.calls).toBe(calls);
    });

    it('reads back data written across page boundaries as one contiguous range', () => {
      const c = make();
      const seq = c.reserve();
      const n = b.options.maxTokens;
      c.grow(seq, n);
      for (let layer = 0; layer < b.options.layers; layer++) {
        for (const kind of ['k', 'v'] as const) {
          c.write(seq, { layer, kind, token: 0 }, pattern(n * c.tokenBytes, layer * 2 + (kind === 'v' ? 1 : 0)));
        }
      }
      for (let layer = 0; layer < b.options.layers; layer++) {
        for (const kind of ['k', 'v'] as const) {
          const seed = layer * 2 + (kind === 'v' ? 1 : 0);
          expect(Buffer.from(c.read(seq, { layer, kind, token: 0, count: n })).equals(Buffer.from(pattern(n * c.tokenBytes, seed)))).toBe(true);
          // a range that straddles a page boundary, read on its own
          const t0 = tokensPerPage(c) - 3;
          const part = c.read(seq, { layer, kind, token: t0, count: 7 });
          expect(Buffer.from(part).equals(Buffer.from(pattern(n * c.tokenBytes, seed).subarray(t0 * c.tokenBytes, (t0 + 7) * c.tokenBytes)))).toBe(true);
        }
      }
    });

    it('writes tokens one at a time the way a decode loop does', () => {
      const c = make();
      const seq = c.reserve();
      const n = 3 * tokensPerPage(c) + 2;
      const all = pattern(n * c.tokenBytes, 99);
      for (let t = 0; t < n; t++) {
        c.grow(seq, t + 1);
        c.write(seq, { layer: 1, kind: 'v', token: t }, all.subarray(t * c.tokenBytes, (t + 1) * c.tokenBytes));
      }
      expect(Buffer.from(c.read(seq, { layer: 1, kind: 'v', token: 0, count: n })).equals(Buffer.from(all))).toBe(true);
    });

    it('keeps sequences apart: each slot has its own range', () => {
      const c = make();
      const a = c.reserve();
      const d = c.reserve();
      expect(a.slot).not.toBe(d.slot);
      c.grow(a, 10);
      c.grow(d, 10);
      c.write(a, { layer: 0, kind: 'k', token: 0 }, pattern(10 * c.tokenBytes, 1));
      c.write(d, { layer: 0, kind: 'k', token: 0 }, pattern(10 * c.tokenBytes, 2));
      expect(Buffer.from(c.read(a, { layer: 0, kind: 'k', token: 0, count: 10 })).equals(Buffer.from(pattern(10 * c.tokenBytes, 1)))).toBe(true);
      expect(a.address(0, 'k') - c.tensor(0, 'k').address).toBe(BigInt(a.slot * c.tensor(0, 'k').strideBytes[0]));
    });

    it('deferred reclamation: a new sequence in a released slot reuses its pages with no map call', () => {
      const c = make();
      const seq = c.reserve();
      c.grow(seq, 2 * tokensPerPage(c));
      c.release(seq);
      const before = c.stats();
      expect(before.pagesMapped).toBe(2 * groupPages); // pages stay mapped after release
      const next = c.reserve({ expectedTokens: 2 * tokensPerPage(c) });
      expect(next.slot).toBe(seq.slot);
      c.grow(next, 2 * tokensPerPage(c));
      const after = c.stats();
      for (const op of ['map', 'setAccess', 'createPage', 'unmap']) expect(after.driverCalls[op]!.calls).toBe(before.driverCalls[op]!.calls);
      expect(after.pagesReused - before.pagesReused).toBe(2 * groupPages);
    });

    it('reserve picks the released slot whose mapped pages best fit expectedTokens', () => {
      const c = make();
      const tpp = tokensPerPage(c);
      const seqs = [c.reserve(), c.reserve(), c.reserve()];
      c.grow(seqs[0]!, 1); // 1 group
      c.grow(seqs[1]!, 3 * tpp); // 3 groups
      c.grow(seqs[2]!, 2 * tpp); // 2 groups
      const slots = seqs.map((s) => s.slot);
      for (const s of seqs) c.release(s);
      const fit2 = c.reserve({ expectedTokens: 2 * tpp - 1 });
      expect(fit2.slot).toBe(slots[2]);
      const fit1 = c.reserve({ expectedTokens: Math.min(5, tpp) });
      expect(fit1.slot).toBe(slots[0]);
      c.release(fit1);
      // nothing covers 4 pages: take the slot with the most
      const big = c.reserve({ expectedTokens: 4 * tpp });
      expect(big.slot).toBe(slots[1]);
    });

    it('throws ERR_NO_SLOT when every slot is taken, and a release frees one', () => {
      const c = make();
      const all = Array.from({ length: b.options.maxSequences }, () => c.reserve());
      expect(() => c.reserve()).toThrow(expect.objectContaining({ code: 'ERR_NO_SLOT' }));
      c.release(all[2]!);
      expect(c.reserve().slot).toBe(all[2]!.slot);
    });

    it('grows up to maxTokens and refuses beyond with ERR_OUT_OF_RANGE', () => {
      const c = make();
      const seq = c.reserve();
      c.grow(seq, b.options.maxTokens);
      expect(seq.tokens).toBe(b.options.maxTokens);
      expect(() => c.grow(seq, b.options.maxTokens + 1)).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
      expect(seq.tokens).toBe(b.options.maxTokens);
    });

    it('refuses reads and writes past the backed tokens without faulting', () => {
      const c = make();
      const seq = c.reserve();
      c.grow(seq, 10);
      const one = new Uint8Array(c.tokenBytes);
      expect(() => c.write(seq, { layer: 0, kind: 'k', token: 10 }, one)).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
      expect(() => c.read(seq, { layer: 0, kind: 'k', token: 5, count: 6 })).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
      expect(() => c.write(seq, { layer: 0, kind: 'k', token: 0 }, new Uint8Array(c.tokenBytes + 1))).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }));
      expect(c.read(seq, { layer: 0, kind: 'k', token: 10, count: 0 })).toHaveLength(0);
    });

    it('out of memory: throws ERR_OUT_OF_MEMORY with figures and leaves everything as it was', () => {
      const c = make();
      const a = c.reserve();
      c.grow(a, b.options.maxTokens);
      c.write(a, { layer: 0, kind: 'k', token: 0 }, pattern(b.options.maxTokens * c.tokenBytes, 5));
      const d = c.reserve();
      c.grow(d, 3);
      const before = c.stats();
      const beforeState = stateOf(c);
      let error: unknown;
      try {
        c.grow(d, b.options.maxTokens);
      } catch (e) {
        error = e;
      }
      expect(error).toBeInstanceOf(OutOfMemoryError);
      const oom = error as OutOfMemoryError;
      expect(oom.code).toBe('ERR_OUT_OF_MEMORY');
      expect(oom.requestedBytes).toBeGreaterThan(oom.availableBytes);
      expect(d.tokens).toBe(3);
      const after = c.stats();
      expect(stateOf(c)).toEqual(beforeState);
      expect(after.driverCalls.map!.calls).toBe(before.driverCalls.map!.calls);
      // the cache keeps working: data intact, smaller growth succeeds, release makes room
      expect(Buffer.from(c.read(a, { layer: 0, kind: 'k', token: 0, count: b.options.maxTokens })).equals(Buffer.from(pattern(b.options.maxTokens * c.tokenBytes, 5)))).toBe(true);
      c.release(a);
      c.grow(d, b.options.maxTokens);
      expect(d.tokens).toBe(b.options.maxTokens);
    });

    it('under memory pressure, growth reclaims pages of released slots', () => {
      const c = make();
      const a = c.reserve();
      const d = c.reserve();
      c.grow(a, b.options.maxTokens);
      c.release(a);
      c.grow(d, b.options.maxTokens); // the budget holds one full sequence: needs a's pages back
      const s = c.stats();
      expect(s.pagesReclaimed).toBeGreaterThan(0);
      expect(s.pagesCreated).toBeLessThanOrEqual(s.budgetBytes / s.pageSize);
    });

    it('reclaim(bytes) unmaps released slots back to the pool; trim() gives the pool back', () => {
      const c = make();
      const a = c.reserve();
      c.grow(a, 2 * tokensPerPage(c));
      const keep = c.reserve();
      c.grow(keep, 1);
      c.release(a);
      expect(c.reclaim(1)).toBe(groupPages * c.pageSize); // one group, rounded up
      expect(c.stats().slots[a.slot]!.mappedPages).toBe(groupPages);
      expect(c.reclaim()).toBe(groupPages * c.pageSize);
      let s = c.stats();
      expect(s.pagesMapped).toBe(groupPages); // only `keep`
      expect(s.pagesPooled).toBe(2 * groupPages);
      expect(c.trim()).toBe(2 * groupPages * c.pageSize);
      s = c.stats();
      expect(s.pagesCreated).toBe(groupPages);
      expect(s.pagesPooled).toBe(0);
      expect(c.reclaim()).toBe(0); // nothing released left
    });

    it('pool prefill creates pages up front and growth uses them without creating', () => {
      const c = make({ poolPrefill: 2 * devicePages * (b.name === 'host' ? 4096 : 2 * 1024 * 1024) });
      const s0 = c.stats();
      expect(s0.pagesPooled).toBe(2 * groupPages);
      const seq = c.reserve();
      c.grow(seq, 2 * tokensPerPage(c));
      const s1 = c.stats();
      expect(s1.driverCalls.createPage!.calls).toBe(s0.driverCalls.createPage!.calls);
      expect(s1.pagesPooled).toBe(0);
    });

    it('release, use after release, double release and foreign sequences fail with codes', () => {
      const c = make();
      const other = make();
      const seq = c.reserve();
      c.grow(seq, 4);
      c.release(seq);
      expect(seq.released).toBe(true);
      expect(() => c.release(seq)).toThrow(expect.objectContaining({ code: 'ERR_SEQUENCE_RELEASED' }));
      expect(() => c.grow(seq, 5)).toThrow(expect.objectContaining({ code: 'ERR_SEQUENCE_RELEASED' }));
      expect(() => c.read(seq, { layer: 0, kind: 'k', token: 0, count: 1 })).toThrow(expect.objectContaining({ code: 'ERR_SEQUENCE_RELEASED' }));
      expect(() => seq.tokens).toThrow(expect.objectContaining({ code: 'ERR_SEQUENCE_RELEASED' }));
      const mine = c.reserve();
      expect(() => other.grow(mine, 1)).toThrow(expect.objectContaining({ code: 'ERR_FOREIGN_SEQUENCE' }));
      expect(() => other.release(mine)).toThrow(expect.objectContaining({ code: 'ERR_FOREIGN_SEQUENCE' }));
    });

    it('close() is idempotent, works with `using`, and everything after it throws ERR_CLOSED', () => {
      const c = new KVCache(b.options);
      const seq = c.reserve();
      c.grow(seq, 10);
      c.close();
      c.close();
      expect(c.closed).toBe(true);
      expect(seq.released).toBe(true);
      for (const f of [() => c.reserve(), () => c.grow(seq, 11), () => c.release(seq), () => c.stats(), () => c.reclaim(), () => c.trim(), () => seq.tokens])
        expect(f).toThrow(expect.objectContaining({ code: 'ERR_CLOSED' }));
      let leaked: KVCache | undefined;
      {
        using d = new KVCache(b.options);
        d.grow(d.reserve(), 3);
        leaked = d;
      }
      expect(leaked.closed).toBe(true);
    });

    it('counts every backend call by kind', () => {
      const c = make();
      const seq = c.reserve();
      c.grow(seq, 1);
      const s = c.stats();
      expect(s.driverCalls.reserveRange!.calls).toBe(b.deviceCount); // one range on each device
      expect(s.driverCalls.createPage!.calls).toBe(groupPages);
      expect(s.driverCalls.map!.calls).toBe(groupPages);
      expect(s.driverCalls.setAccess!.calls).toBe(groupPages);
      expect(s.driverCalls.map!.nanoseconds).toBeGreaterThan(0);
    });

    it('many sequences grow and release in a serving-loop pattern without losing a byte', () => {
      const c = make({ maxSequences: 3 }); // 3 x 40 tokens fit the budget
      const live = new Map<Sequence, number>();
      let seed = 1;
      const seeds = new Map<Sequence, number>();
      for (let step = 0; step < 300; step++) {
        if (live.size < 3 && step % 7 === 0) {
          const s = c.reserve({ expectedTokens: 20 });
          live.set(s, 0);
          seeds.set(s, seed++);
        }
        for (const [s, n] of live) {
          if (n >= 40) {
            const data = c.read(s, { layer: 2, kind: 'k', token: 0, count: n });
            const want = new Uint8Array(n * c.tokenBytes);
            for (let t = 0; t < n; t++) want.set(pattern(c.tokenBytes, seeds.get(s)! * 1000 + t), t * c.tokenBytes);
            expect(Buffer.from(data).equals(Buffer.from(want))).toBe(true);
            c.release(s);
            live.delete(s);
            continue;
          }
          c.grow(s, n + 1);
          c.write(s, { layer: 2, kind: 'k', token: n }, pattern(c.tokenBytes, seeds.get(s)! * 1000 + n));
          live.set(s, n + 1);
        }
      }
      expect(c.stats().pagesReused).toBeGreaterThan(0);
    });
  });
}

describe('host backend limits', () => {
  // Each mapped host page is its own memory area; the backend caps them at
  // (vm.max_map_count - 16384) / 2 per process. Grow past that cap.
  const maxMapCount = (() => {
    try {
      return Number(readFileSync('/proc/sys/vm/max_map_count', 'utf8').trim());
    } catch {
      return NaN;
    }
  })();
  const cap = Math.floor((maxMapCount - 16384) / 2);
  const tokens = Math.floor(cap / 2) + 1000; // K and V: two 4 KiB pages per token
  const bytes = tokens * 2 * 4096;
  const skip = !Number.isFinite(maxMapCount)
    ? 'cannot read /proc/sys/vm/max_map_count'
    : bytes > 2 ** 30
      ? `vm.max_map_count is ${maxMapCount}: reaching the cap would take ${Math.round(bytes / 2 ** 20)} MiB`
      : null;
  it.skipIf(skip !== null)(`mapping more pages than vm.max_map_count allows is ERR_OUT_OF_MEMORY, not a crash${skip ? ` (skipped: ${skip})` : ''}`, () => {
    using c = new KVCache({ backend: 'host', layers: 1, kvHeads: 1, headDim: 2048, dtype: 'float16', maxSequences: 1, maxTokens: tokens, pageSize: 4096, memoryBudget: bytes + 2 ** 20, prefetchTokens: 0 });
    const seq = c.reserve();
    let error: any;
    try {
      c.grow(seq, tokens);
    } catch (e) {
      error = e;
    }
    expect(error?.code).toBe('ERR_OUT_OF_MEMORY');
    expect(error.message).toMatch(/max_map_count/);
    expect(seq.tokens).toBe(0);
    expect(c.stats().pagesMapped).toBe(0);
    c.grow(seq, 1000); // still works
    expect(seq.tokens).toBe(1000);
  });
});
