// Every backend call a growth, reclaim, trim, write or read makes can fail;
// the operation then throws a typed error and the cache is exactly as before.
import { afterEach, describe, expect, it } from 'vitest';
import { KVCache } from '../lib/index.js';
import { injectNextCacheFault, liveResources } from '../lib/testing.js';
import { deviceBackends as backends, groupPagesOf, label, pattern, stateOf, tokensPerGroupOf } from './backends.js';

for (const b of backends) {
  describe.skipIf(b.skip !== null)(`fault injection, ${label(b)}`, () => {
    const open: KVCache[] = [];
    afterEach(() => {
      for (const c of open.splice(0)) c.close();
      // nothing leaked: every range, page and mapping went back
      expect(liveResources()).toEqual({ ranges: 0, pages: 0, mappings: 0, fences: 0, contexts: 0 });
    });
    const setup = () => {
      // No prefetch worker: each injected fault must hit the call site under test.
      const c = new KVCache({ ...b.options, prefetchTokens: 0 });
      open.push(c);
      const tpp = tokensPerGroupOf(b, c.pageSize, c.tokenBytes);
      const a = c.reserve();
      c.grow(a, tpp + 2);
      c.write(a, { layer: 1, kind: 'k', token: 0 }, pattern((tpp + 2) * c.tokenBytes, 3));
      const idle = c.reserve();
      c.grow(idle, 2 * tpp);
      c.release(idle);
      return { c, a, tpp };
    };
    const comparable = (c: KVCache) => stateOf(c);
    const dataOf = (c: KVCache, a: ReturnType<typeof setup>['a']) =>
      Buffer.from(c.read(a, { layer: 1, kind: 'k', token: 0, count: a.tokens }));

    const growOps = ['createPage', 'map', 'setAccess'] as const;
    for (const op of growOps) {
      for (const nth of [0, 1, groupPagesOf(b) + 1]) { // the first, the second, one in the second group
        for (const oom of [true, false]) {
          it(`grow survives ${op} #${nth} failing with ${oom ? 'out of memory' : 'an error'}`, () => {
            const { c, a, tpp } = setup();
            const before = comparable(c);
            const data = dataOf(c, a);
            c._injectFault(op, nth, oom);
            if (op === 'createPage' && oom) {
              // The device is fuller than the budget assumed: growth falls back to
              // unmapping the released slot's pages and succeeds.
              c.grow(a, 4 * tpp);
              expect(c.stats().pagesReclaimed).toBeGreaterThan(before.pagesReclaimed);
              expect(dataOf(c, a).subarray(0, data.length).equals(data)).toBe(true);
              return;
            }
            let error: any;
            try {
              c.grow(a, 4 * tpp);
            } catch (e) {
              error = e;
            }
            expect(error?.code).toBe(oom ? 'ERR_OUT_OF_MEMORY' : b.name === 'cuda' ? 'ERR_CUDA' : 'ERR_OS');
            expect(a.tokens).toBe(tpp + 2);
            expect(comparable(c)).toEqual(before);
            expect(dataOf(c, a).equals(data)).toBe(true);
            c.grow(a, 4 * tpp); // works afterwards
            expect(a.tokens).toBe(4 * tpp);
          });
        }
      }
    }

    it('reclaim survives an unmap failure part way through a page group', () => {
      const { c } = setup();
      const before = comparable(c);
      c._injectFault('unmap', 1, false); // the second page of the first group: every layout has at least 2
      expect(() => c.reclaim()).toThrow(expect.objectContaining({ code: b.name === 'cuda' ? 'ERR_CUDA' : 'ERR_OS' }));
      expect(comparable(c)).toEqual(before);
      expect(c.reclaim()).toBeGreaterThan(0);
    });

    it('trim survives a page release failure', () => {
      const { c } = setup();
      c.reclaim();
      const pooled = c.stats().pagesPooled;
      c._injectFault('releasePage', 1, false);
      expect(() => c.trim()).toThrow(expect.objectContaining({ code: b.name === 'cuda' ? 'ERR_CUDA' : 'ERR_OS' }));
      expect(c.stats().pagesPooled).toBe(pooled - 1);
      expect(c.trim()).toBe((pooled - 1) * c.pageSize);
      expect(c.stats().pagesCreated).toBe(c.stats().pagesMapped);
    });

    it('write and read surface copy failures', () => {
      const { c, a } = setup();
      const data = dataOf(c, a);
      c._injectFault('copyIn', 0, false);
      expect(() => c.write(a, { layer: 1, kind: 'k', token: 0 }, new Uint8Array(c.tokenBytes))).toThrow(
        expect.objectContaining({ code: b.name === 'cuda' ? 'ERR_CUDA' : 'ERR_OS' }),
      );
      c._injectFault('copyOut', 0, false);
      expect(() => dataOf(c, a)).toThrow(expect.objectContaining({ code: b.name === 'cuda' ? 'ERR_CUDA' : 'ERR_OS' }));
      expect(dataOf(c, a).equals(data)).toBe(true);
    });

    it('createPage out of memory with no released slot to reclaim: ERR_OUT_OF_MEMORY, nothing changed', () => {
      const { c, a, tpp } = setup();
      c.reclaim();
      c.trim();
      const before = comparable(c);
      c._injectFault('createPage', 1, true);
      expect(() => c.grow(a, 4 * tpp)).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_MEMORY' }));
      expect(comparable(c)).toEqual(before);
      c.grow(a, 4 * tpp);
    });

    const errorCode = (oom: boolean) => (oom ? 'ERR_OUT_OF_MEMORY' : b.name === 'cuda' ? 'ERR_CUDA' : 'ERR_OS');

    for (const op of ['createPage', 'map', 'setAccess'] as const) {
      for (const oom of [true, false]) {
        it(`step survives ${op} failing with ${oom ? 'out of memory' : 'an error'} part way through a batch`, () => {
          const { c, a, tpp } = setup();
          c.reclaim();
          c.trim(); // nothing to fall back on: the fault must surface
          const other = c.reserve();
          c.step([a, other], [tpp + 2, 1]);
          const before = comparable(c);
          const data = dataOf(c, a);
          c._injectFault(op, 3, oom);
          expect(() => c.step([a, other], [3 * tpp, 2 * tpp])).toThrow(expect.objectContaining({ code: errorCode(oom) }));
          expect(comparable(c)).toEqual(before);
          expect([a.tokens, other.tokens]).toEqual([tpp + 2, 1]);
          expect(dataOf(c, a).equals(data)).toBe(true);
          c.step([a, other], [3 * tpp, 2 * tpp]);
          expect([a.tokens, other.tokens]).toEqual([3 * tpp, 2 * tpp]);
        });

        it(`growAsync survives ${op} failing with ${oom ? 'out of memory' : 'an error'}`, async () => {
          const { c, a, tpp } = setup();
          c.reclaim();
          c.trim();
          const before = comparable(c);
          c._injectFault(op, 2, oom);
          await expect(c.growAsync(a, 4 * tpp)).rejects.toMatchObject({ code: errorCode(oom) });
          expect(comparable(c)).toEqual(before);
          expect(a.tokens).toBe(tpp + 2);
          await c.growAsync(a, 4 * tpp);
          expect(a.tokens).toBe(4 * tpp);
        });
      }
    }

    for (const op of ['reserveRange', 'createPage'] as const) {
      it(`construction fails cleanly when ${op} fails inside it`, () => {
        injectNextCacheFault(op, 0, false);
        expect(() => new KVCache({ ...b.options, poolPrefill: 8 * (b.name === 'host' ? 4096 : 2 * 1024 * 1024) })).toThrow(
          expect.objectContaining({ code: errorCode(false) }),
        );
        expect(liveResources()).toEqual({ ranges: 0, pages: 0, mappings: 0, fences: 0, contexts: 0 });
      });
    }

    it('a failing prefetch mapping is counted and retried; demand growth still works', async () => {
      // look ahead one page of tokens, so the worker maps the second page group
      const c = new KVCache({ ...b.options, prefetchTokens: b.name === 'host' ? 16 : 512 });
      open.push(c);
      const seq = c.reserve();
      c._injectFault('map', groupPagesOf(b), false); // after the first group, mapped on demand
      c.step([seq], [1]);
      const deadline = Date.now() + 5000;
      while (c.stats().prefetch.errors === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 2));
      expect(c.stats().prefetch.errors).toBe(1);
      c.step([seq], [40]);
      expect(seq.tokens).toBe(40);
    });

    it.skipIf(b.name !== 'cuda')(`release({ stream }) survives the fence (cuEventRecord) failing: the sequence stays active${b.name !== 'cuda' ? ' (skipped: host memory needs no fence)' : ''}`, () => {
      const { c, a, tpp } = setup();
      const before = comparable(c);
      c._injectFault('fence', 0, false);
      expect(() => c.release(a, { stream: 0n })).toThrow(expect.objectContaining({ code: 'ERR_CUDA' }));
      expect(comparable(c)).toEqual(before);
      expect(a.released).toBe(false);
      expect(a.tokens).toBe(tpp + 2);
      c.release(a, { stream: 0n });
      expect(a.released).toBe(true);
    });

        it('a failing unmap at close still frees everything else', () => {
      const { c } = setup();
      c._injectFault('unmap', 0, false);
      c.close(); // close never throws; the fault is disarmed for teardown
      expect(c.closed).toBe(true);
    });

    it('poolPrefill above memoryBudget is refused before any native call', () => {
      expect(() => new KVCache({ ...b.options, memoryBudget: 4096, poolPrefill: 8192 })).toThrow(
        expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }),
      );
    });
  });
}
