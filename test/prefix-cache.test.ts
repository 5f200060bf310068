// Automatic prefix caching: a sequence publishes the token ids its first
// tokens hold; reserve({ tokens }) finds the longest cached prefix of a
// prompt and maps its page groups shared. Run on every backend × layout × device count.
import { afterEach, describe, expect, it } from 'vitest';
import { KVCache, type Sequence } from '../lib/index.js';
import { finishHostStream, holdHostStream } from '../lib/testing.js';
import { deviceBackends as backends, groupPagesOf, label, pattern, stateOf, streamOf } from './backends.js';

const kinds = ['k', 'v'] as const;

for (const b of backends) {
  describe.skipIf(b.skip !== null)(`prefix cache, ${label(b)}`, () => {
    const open: KVCache[] = [];
    const make = (extra: Record<string, unknown> = {}) => {
      const c = new KVCache({ ...b.options, prefetchTokens: 0, ...extra });
      open.push(c);
      return c;
    };
    afterEach(() => {
      for (const c of open.splice(0)) c.close();
    });
    const per = (c: KVCache) => c.layout.tokensPerPageGroup;
    const ids = (n: number, seed = 1) => Array.from({ length: n }, (_, i) => (seed * 7919 + i * 31) % 50_000);
    const data = (c: KVCache, seed: number, layer: number, kind: number, count: number) =>
      pattern(count * c.tokenBytes, seed * 1_000_003 + layer * 7919 + kind * 104_729);
    /** The prefill: grow and write every layer's K and V (per device), then publish. */
    const prefill = (c: KVCache, seq: Sequence, prompt: number[], seed: number) => {
      c.grow(seq, prompt.length);
      for (let layer = 0; layer < c.options.layers; layer++)
        for (const [kind, name] of kinds.entries())
          for (const device of c.devices)
            c.write(seq, { layer, kind: name, token: 0, device }, data(c, seed + device, layer, kind, prompt.length));
      c.publish(seq, prompt);
    };
    /** The first `count` tokens of `seq` hold what `seed`'s prefill wrote, on every device. */
    const holds = (c: KVCache, seq: Sequence, seed: number, count: number) => {
      for (let layer = 0; layer < c.options.layers; layer++)
        for (const [kind, name] of kinds.entries())
          for (const device of c.devices) {
            const got = c.read(seq, { layer, kind: name, token: 0, count, device });
            const want = data(c, seed + device, layer, kind, count);
            if (!Buffer.from(got).equals(Buffer.from(want.subarray(0, count * c.tokenBytes)))) return false;
          }
      return true;
    };

    it('a prompt shares the longest published prefix in whole page groups: 0, one and many groups, same bytes', () => {
      const c = make();
      const prompt = ids(Math.min(c.options.maxTokens, 3 * per(c) + 2));
      const a = c.reserve({ tokens: prompt });
      expect(a.cachedTokens).toBe(0); // nothing published yet
      prefill(c, a, prompt, 1);
      const whole = Math.floor(prompt.length / per(c));
      const b2 = c.reserve({ tokens: prompt });
      expect(b2.cachedTokens).toBe(whole * per(c));
      expect(b2.tokens).toBe(b2.cachedTokens);
      expect(holds(c, b2, 1, b2.cachedTokens)).toBe(true);
      const one = c.reserve({ tokens: prompt.slice(0, per(c) + 1) });
      expect(one.cachedTokens).toBe(per(c));
      const short = c.reserve({ tokens: prompt.slice(0, per(c) - 1) });
      expect(short.cachedTokens).toBe(0); // shorter than a group: nothing whole to share
      const st = c.stats().prefixCache;
      expect(st).toMatchObject({ queries: 4, hits: 2, hitTokens: (whole + 1) * per(c) });
      expect(st.queryTokens).toBe(2 * prompt.length + per(c) + 1 + per(c) - 1);
      // the shared groups are the same physical pages: no new page for them
      expect(c.stats().pagesShared).toBeGreaterThan(0);
    });

    it('a prompt that differs after some groups gets the groups before the difference; another salt gets nothing', () => {
      const c = make();
      const prompt = ids(Math.min(c.options.maxTokens, 3 * per(c)));
      const a = c.reserve({ tokens: prompt });
      prefill(c, a, prompt, 2);
      const other = [...prompt];
      other[per(c) + 1] = 99_999; // inside the second group
      const s = c.reserve({ tokens: other });
      expect(s.cachedTokens).toBe(per(c));
      expect(holds(c, s, 2, per(c))).toBe(true);
      expect(c.reserve({ tokens: prompt, salt: 7 }).cachedTokens).toBe(0);
      c.publish(s, other.slice(0, per(c))); // what it inherited, again: consistent
      expect(() => c.publish(s, prompt.slice(0, per(c)), { salt: 7 })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }));
    });

    it("after release the published groups stay findable until their pages are needed; the hit's bytes are the original's", () => {
      const c = make();
      const prompt = ids(Math.min(c.options.maxTokens, 2 * per(c)));
      const a = c.reserve({ tokens: prompt });
      prefill(c, a, prompt, 3);
      c.release(a);
      expect(c.stats().prefixCache.cachedGroups).toBe(Math.floor(prompt.length / per(c)));
      expect(c.stats().prefixCache.cachedBytes).toBe(
        Math.floor(prompt.length / per(c)) * c.layout.bytesPerPageGroup * b.deviceCount,
      );
      const again = c.reserve({ tokens: prompt });
      expect(again.cachedTokens).toBe(Math.floor(prompt.length / per(c)) * per(c));
      expect(holds(c, again, 3, again.cachedTokens)).toBe(true);
      // a partial hit keeps the rest of the chain cached in the released slot
      c.release(again);
      const partial = c.reserve({ tokens: prompt.slice(0, per(c)) });
      expect(partial.cachedTokens).toBe(per(c));
      const full = c.reserve({ tokens: prompt });
      expect(full.cachedTokens).toBe(Math.floor(prompt.length / per(c)) * per(c));
    });

    it('eviction under a full budget: a new sequence takes a slot without cached groups first, then the least recently used', () => {
      const c = make({ maxSequences: 4 });
      const n = Math.min(c.options.maxTokens, per(c));
      const p1 = ids(n, 1), p2 = ids(n, 2);
      const s1 = c.reserve({ tokens: p1 });
      prefill(c, s1, p1, 4);
      const s2 = c.reserve({ tokens: p2 });
      prefill(c, s2, p2, 5);
      const plain = c.reserve();
      c.grow(plain, n);
      c.release(s1); // the least recently used cached prefix
      c.release(s2);
      c.release(plain); // released last, but caches nothing
      const x = c.reserve();
      expect(x.slot).not.toBe(s1.slot);
      expect(x.slot).not.toBe(s2.slot);
      const y = c.reserve();
      expect([s1.slot, s2.slot, plain.slot]).not.toContain(y.slot); // the free slot before any cached one
      const z = c.reserve(); // only cached slots are left: the least recently used goes
      expect(z.slot).toBe(s1.slot);
      expect(c.reserve({ tokens: p1 }).cachedTokens).toBe(0);
      expect(c.stats().prefixCache.evictions).toBeGreaterThanOrEqual(1);
    });

    it('a running sharer protects its groups: memory pressure takes the cached groups no one runs on first', () => {
      const c = make();
      const n = Math.min(c.options.maxTokens, 2 * per(c));
      const prompt = ids(n, 9);
      const a = c.reserve({ tokens: prompt });
      prefill(c, a, prompt, 6);
      const runner = c.reserve({ tokens: prompt }); // shares a's groups and keeps running
      c.release(a);
      // fill the rest of the budget and more: a's pages are the runner's too, never unmapped from it
      const big = c.reserve();
      try {
        c.grow(big, c.options.maxTokens);
      } catch (e) {
        expect((e as { code: string }).code).toBe('ERR_OUT_OF_MEMORY');
      }
      expect(holds(c, runner, 6, runner.cachedTokens)).toBe(true);
    });

    it.skipIf(b.name !== 'host')(`a fenced released sequence's cached groups go only after its fence${b.name !== 'host' ? ' (skipped: holds a pretend host stream)' : ''}`, () => {
      const probe = make();
      // a budget of one full sequence: the growth below needs the cached group's pages
      const c = make({ memoryBudget: probe.bytesForTokens(probe.options.maxTokens) });
      const n = Math.min(c.options.maxTokens, per(c));
      const prompt = ids(n, 11);
      const a = c.reserve({ tokens: prompt });
      prefill(c, a, prompt, 7);
      const stream = 0x9e11n;
      holdHostStream(stream);
      try {
        c.release(a, streamOf(b, stream));
        const waits = () => c.stats().driverCalls.fenceWait?.calls ?? 0;
        const w0 = waits();
        const big = c.reserve();
        expect(big.slot).not.toBe(a.slot); // the cached slot is the last a plain sequence takes
        c.grow(big, c.options.maxTokens);
        expect(waits()).toBeGreaterThan(w0); // a's fenced pages were waited for before they went
        expect(c.reserve({ tokens: prompt }).cachedTokens).toBe(0);
        expect(c.stats().prefixCache.evictions).toBeGreaterThan(0);
      } finally {
        finishHostStream(stream);
      }
    });

    it('two sequences publishing the same prefix: one copy stays cached, the duplicate is reclaimed first', () => {
      const c = make();
      const n = Math.min(c.options.maxTokens, per(c));
      const prompt = ids(n, 13);
      const a = c.reserve({ tokens: prompt });
      const d = c.reserve({ tokens: prompt }); // at once: neither finds the other
      prefill(c, a, prompt, 8);
      prefill(c, d, prompt, 8);
      c.release(a);
      c.release(d);
      expect(c.stats().prefixCache.cachedGroups).toBe(1); // d adds nothing findable
      const next = c.reserve(); // plain: takes the duplicate's slot, not the cached copy
      expect(next.slot).toBe(d.slot);
      expect(c.reserve({ tokens: prompt }).cachedTokens).toBe(per(c));
    });

    it('a forced hash collision is never taken: the ids are compared', () => {
      const c = make();
      c._forcePrefixCollisions();
      const n = Math.min(c.options.maxTokens, 2 * per(c));
      const a = c.reserve({ tokens: ids(n, 1) });
      prefill(c, a, ids(n, 1), 9);
      const other = c.reserve({ tokens: ids(n, 2) }); // every hash equal, the ids not
      expect(other.cachedTokens).toBe(0);
      const same = c.reserve({ tokens: ids(n, 1) });
      expect(same.cachedTokens).toBe(Math.floor(n / per(c)) * per(c));
      expect(holds(c, same, 9, same.cachedTokens)).toBe(true);
    });

    it('bad input is a coded error and changes nothing', () => {
      const c = make();
      const a = c.reserve();
      c.grow(a, 4);
      const before = stateOf(c);
      const bad = (f: () => unknown, code = 'ERR_INVALID_ARGUMENT') => expect(f).toThrow(expect.objectContaining({ code }));
      bad(() => c.reserve({ tokens: [1, 2.5] }));
      bad(() => c.reserve({ tokens: [1, 2 ** 32] }));
      bad(() => c.reserve({ tokens: [-1] }));
      bad(() => c.reserve({ tokens: new Int32Array([3, -4]) }));
      bad(() => c.reserve({ tokens: 'abc' as unknown as number[] }));
      bad(() => c.reserve({ tokens: [1], prefix: { from: a, tokens: 1 } }));
      bad(() => c.reserve({ salt: 3 }));
      bad(() => c.reserve({ tokens: ids(c.options.maxTokens + 1) }));
      bad(() => c.publish(a, [1, 2, 3, 4, 5]), 'ERR_OUT_OF_RANGE'); // longer than the sequence
      bad(() => c.publish(a, ['x'] as unknown as number[]));
      bad(() => c.publish(a, [1], { salt: -1 }));
      expect(stateOf(c)).toEqual(before);
      expect(c.stats().prefixCache.queries).toBe(0);
      c.release(a);
      bad(() => c.publish(a, [1]), 'ERR_SEQUENCE_RELEASED');
      expect(() => make({ prefixCache: { maxBytes: -1 } })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }));
      expect(() => make({ prefixCache: { size: 1 } })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }));
    });

    it('prefixCache: false never hits; maxBytes bounds what released sequences keep findable', () => {
      const off = make({ prefixCache: false });
      const n = Math.min(off.options.maxTokens, per(off));
      const p = ids(n, 5);
      const a = off.reserve({ tokens: p });
      prefill(off, a, p, 10);
      expect(off.reserve({ tokens: p }).cachedTokens).toBe(0);
      const bounded = make({ prefixCache: { maxBytes: groupPagesOf(b) * bounded0PageSize(b) } }); // one group per device
      const p1 = ids(n, 6), p2 = ids(n, 7);
      const s1 = bounded.reserve({ tokens: p1 });
      prefill(bounded, s1, p1, 11);
      const s2 = bounded.reserve({ tokens: p2 });
      prefill(bounded, s2, p2, 12);
      bounded.release(s1);
      bounded.release(s2); // over the bound: s1's group stops being cached
      expect(bounded.stats().prefixCache.cachedGroups).toBe(1);
      expect(bounded.reserve({ tokens: p1 }).cachedTokens).toBe(0);
      expect(bounded.reserve({ tokens: p2 }).cachedTokens).toBe(per(bounded));
    });

    it('reserveAsync({ tokens }) shares on a pool thread: same hit, no backend call on the JS thread', async () => {
      const c = make();
      const n = Math.min(c.options.maxTokens, 2 * per(c));
      const prompt = ids(n, 17);
      const a = c.reserve({ tokens: prompt });
      prefill(c, a, prompt, 13);
      const js = c.stats().driverCallsOnJsThread;
      const s = await c.reserveAsync({ tokens: prompt });
      expect(s.cachedTokens).toBe(Math.floor(n / per(c)) * per(c));
      expect(c.stats().driverCallsOnJsThread).toBe(js);
      expect(holds(c, s, 13, s.cachedTokens)).toBe(true);
    });

    it('suspend keep: none drops what was published; keep: host keeps it findable', async () => {
      const c = make({ hostMemoryBudget: 64 << 20 });
      const n = Math.min(c.options.maxTokens, per(c));
      const prompt = ids(n, 19);
      const a = c.reserve({ tokens: prompt });
      prefill(c, a, prompt, 14);
      await c.suspend({ keep: 'host' });
      await c.resume();
      expect(c.reserve({ tokens: prompt }).cachedTokens).toBe(per(c));
      await c.suspend();
      await c.resume();
      expect(c.reserve({ tokens: prompt }).cachedTokens).toBe(0);
    });
  });
}

function bounded0PageSize(b: (typeof backends)[number]): number {
  return b.name === 'host' ? 4096 : 2 << 20;
}
