// Hiding the cost of mapping: step() with the prefetch worker, growAsync,
// and closing while either is busy. Run against every backend present.
import { afterEach, describe, expect, it } from 'vitest';
import { KVCache, type Sequence } from '../lib/index.js';
import { deviceBackends as backends, groupPagesOf, label, layerGroupsOf, pattern, stateOf, tokensPerGroupOf } from './backends.js';

const until = async (what: () => boolean, ms = 5000) => {
  const end = Date.now() + ms;
  while (!what()) {
    if (Date.now() > end) throw new Error('timed out waiting');
    await new Promise((r) => setTimeout(r, 2));
  }
};

for (const b of backends) {
  describe.skipIf(b.skip !== null)(`prefetch and async growth, ${label(b)}`, () => {
    const open: KVCache[] = [];
    const make = (extra: Partial<typeof b.options> = {}) => {
      const c = new KVCache({ ...b.options, ...extra });
      open.push(c);
      return c;
    };
    afterEach(() => {
      for (const c of open.splice(0)) c.close();
    });
    const tpp = (c: KVCache) => tokensPerGroupOf(b, c.pageSize, c.tokenBytes);

    it('step() backs the batch, then the worker maps ahead so later steps make no driver call on the JS thread', async () => {
      // look ahead one page of tokens: two sequences stay well inside the budget
      const c = make({ prefetchTokens: b.name === 'host' ? 16 : 512 });
      const per = tpp(c);
      const seqs = [c.reserve(), c.reserve()];
      c.step(seqs, [1, 1]);
      await until(() => c.stats().slots.filter((s) => s.active).every((s) => s.backedTokens >= Math.min(1 + c.options.prefetchTokens, c.options.maxTokens)));
      const js0 = c.stats().driverCallsOnJsThread;
      const misses0 = c.stats().prefetch.misses; // the first step found nothing backed
      let len = 1;
      for (; len < Math.min(per + 5, c.options.maxTokens - 1); len++) {
        c.step(seqs, len + 1);
        // give the worker its turn as the GPU's compute would
        await until(() => c.stats().slots.filter((s) => s.active).every((s) => s.backedTokens >= Math.min(len + 1 + c.options.prefetchTokens, c.options.maxTokens) || s.mappedPages === 0));
      }
      const s = c.stats();
      expect(s.driverCallsOnJsThread).toBe(js0); // crossing page boundaries cost the JS thread nothing
      expect(s.prefetch.pagesAhead).toBeGreaterThan(0);
      expect(s.prefetch.hits).toBeGreaterThan(0);
      for (const seq of seqs) expect(seq.tokens).toBe(len);
      expect(s.prefetch.misses).toBe(misses0);
      // data written across a prefetched page boundary is intact
      const data = pattern(len * c.tokenBytes, 4);
      c.write(seqs[1]!, { layer: 0, kind: 'v', token: 0 }, data);
      expect(Buffer.from(c.read(seqs[1]!, { layer: 0, kind: 'v', token: 0, count: len })).equals(Buffer.from(data))).toBe(true);
    });

    it('without prefetch (prefetchTokens: 0) step() maps on the JS thread', () => {
      const c = make({ prefetchTokens: 0 });
      const seqs = [c.reserve(), c.reserve()];
      const js0 = c.stats().driverCallsOnJsThread;
      for (let len = 1; len <= tpp(c) + 1; len++) c.step(seqs, len);
      const s = c.stats();
      expect(s.driverCallsOnJsThread).toBeGreaterThan(js0);
      expect(s.prefetch.pagesAhead).toBe(0);
      expect(s.prefetch.pagesOnDemand).toBe(2 * 2 * groupPagesOf(b) * b.deviceCount);
    });

    it('step() is all or nothing across the batch', () => {
      const c = make({ prefetchTokens: 0 });
      const [x, y] = [c.reserve(), c.reserve()];
      c.step([x, y], [2, 2]);
      const before = stateOf(c);
      // the pair cannot both reach maxTokens within the budget
      expect(() => c.step([x, y], [c.options.maxTokens, c.options.maxTokens])).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_MEMORY' }));
      expect(stateOf(c)).toEqual(before);
      expect(() => c.step([x, y], [3, c.options.maxTokens + 1])).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
      c.release(y);
      expect(() => c.step([x, y], [3, 3])).toThrow(expect.objectContaining({ code: 'ERR_SEQUENCE_RELEASED' }));
      expect(x.tokens).toBe(2);
      c.step([x], [c.options.maxTokens]);
      expect(x.tokens).toBe(c.options.maxTokens);
    });

    it('demand wins: growth takes back pages the worker prefetched for others', async () => {
      // a budget of one whole sequence and one page group: y's growth to
      // maxTokens needs all but one group, so x's look-ahead must give way
      const c = make({ prefetchTokens: c0Tokens(b), memoryBudget: (fullSequencePages(b) + groupPagesOf(b)) * pageSizeOf(b) });
      const [x, y] = [c.reserve(), c.reserve()];
      c.step([x], [1]);
      await until(() => c.stats().slots[x.slot]!.backedTokens >= Math.min(1 + c.options.prefetchTokens, c.options.maxTokens));
      const prefetched = c.stats().slots[x.slot]!.mappedPages;
      expect(prefetched).toBeGreaterThan(groupPagesOf(b)); // more than x's one token needs
      // y needs every page the budget has left, and some of x's look-ahead
      const budgetPages = c.stats().budgetBytes / c.pageSize;
      const group = groupPagesOf(b) * b.deviceCount; // on every device: what stats() adds up
      const yGroups = Math.floor((budgetPages - group) / group);
      c.grow(y, Math.min(yGroups * tpp(c), c.options.maxTokens));
      const s = c.stats();
      expect(s.slots[x.slot]!.mappedPages).toBeLessThan(prefetched);
      expect(s.slots[x.slot]!.backedTokens).toBeGreaterThanOrEqual(1);
      expect(x.tokens).toBe(1);
    });

    /** Fills the whole budget with three sequences and releases them, oldest first. */
    const fillAndRelease = (c: KVCache) => {
      const per = tpp(c), group = groupPagesOf(b) * b.deviceCount; // on every device: what stats() adds up
      const groups = c.stats().budgetBytes / c.pageSize / group;
      const shares = [Math.ceil(groups / 3), Math.ceil(groups / 3), groups - 2 * Math.ceil(groups / 3)];
      const fillers = shares.map((g) => {
        const seq = c.reserve({ expectedTokens: 0 });
        c.grow(seq, g * per);
        return seq;
      });
      for (const f of fillers) c.release(f);
      expect(c.stats().pagesMapped).toBe(groups * group);
      expect(c.obtainableBytes()).toBe(groups * group * c.pageSize); // all of it reclaimable, none free
      return { slots: fillers.map((f) => f.slot), shares };
    };

    it('memory full of released slots: the worker reclaims ahead of need (least recently released first), so steps that cross page groups make no backend call on the JS thread', async () => {
      const c = make({ prefetchTokens: tokensPerGroupOf(b, pageSizeOf(b), tokenBytesOf(b)) });
      const per = tpp(c), group = groupPagesOf(b) * b.deviceCount; // on every device: what stats() adds up
      const { slots, shares } = fillAndRelease(c);
      const seq = c.reserve({ expectedTokens: 0 }); // the empty slot
      c.step([seq], [1]); // its first group: mapped (and room made) on demand
      const caughtUp = (len: number) => () => {
        const s = c.stats();
        return s.slots[seq.slot]!.backedTokens >= Math.min(len + per, c.options.maxTokens) && s.pagesPooled >= group;
      };
      await until(caughtUp(1));
      const s0 = c.stats();
      const onDemand0 = s0.pagesReclaimed - s0.prefetch.pagesReclaimedAhead;
      const end = Math.min(3 * per, c.options.maxTokens - per);
      for (let len = 2; len <= end; len++) {
        c.step([seq], [len]);
        await until(caughtUp(len)); // the GPU's compute time, in which the worker works
      }
      const s = c.stats();
      expect(s.driverCallsOnJsThread).toBe(s0.driverCallsOnJsThread); // the worker made room and mapped; the serving thread did neither
      expect(s.prefetch.misses).toBe(s0.prefetch.misses);
      expect(s.prefetch.pagesReclaimedAhead).toBeGreaterThan(s0.prefetch.pagesReclaimedAhead);
      expect(s.pagesReclaimed - s.prefetch.pagesReclaimedAhead).toBe(onDemand0);
      // least recently released first (demand and worker alike): the newest released slot is untouched
      expect(s.slots[slots[0]!]!.mappedPages).toBeLessThan(shares[0]! * group);
      expect(s.slots[slots[2]!]!.mappedPages).toBe(shares[2]! * group);
      expect(c.metrics()).toMatch(/vattention_pages_reclaimed_total\{by="ahead"(,device="0")?\} [1-9]/);
    });

    it('a growth that needs room takes released slots before the look-ahead of running sequences (which the next steps would need back)', async () => {
      const c = make({ prefetchTokens: tpp(c0ForStress(b)), idlePageGroups: 0 });
      const per = tpp(c), group = groupPagesOf(b) * b.deviceCount; // on every device: what stats() adds up
      const total = c.stats().budgetBytes / c.pageSize / group; // page groups the budget holds
      const a = c.reserve();
      c.step([a], [1]);
      await until(() => c.stats().slots[a.slot]!.backedTokens >= 1 + per); // its tokens' group and one ahead
      const zGroups = Math.min(total - 4, Math.floor(c.options.maxTokens / per));
      const r = c.reserve();
      c.grow(r, (total - 2 - zGroups) * per);
      const z = c.reserve();
      c.grow(z, zGroups * per);
      c.release(r);
      expect(c.stats().pagesMapped).toBe(total * group); // the budget is full
      const y = c.reserve({ expectedTokens: 0 });
      const reclaimed0 = c.stats().pagesReclaimed;
      c.grow(y, 1);
      const s = c.stats();
      expect(s.pagesReclaimed - reclaimed0).toBe(group); // one page group unmapped to make room...
      expect(s.slots[r.slot]!.mappedPages).toBe((total - 3 - zGroups) * group); // ...from the released slot
      expect(s.slots[a.slot]!.backedTokens).toBeGreaterThanOrEqual(1 + per); // the look-ahead stayed
      expect(s.slots[y.slot]!.mappedPages).toBe(group);
    });

    it('obtainableBytes({ lookAhead: false }) leaves out the look-ahead the worker mapped for running sequences', async () => {
      const c = make({ prefetchTokens: tpp(c0ForStress(b)), idlePageGroups: 0 });
      const per = tpp(c), group = groupPagesOf(b) * b.deviceCount; // on every device: what stats() adds up
      const a = c.reserve();
      c.step([a], [1]);
      await until(() => c.stats().slots[a.slot]!.backedTokens >= 1 + per); // its tokens' group and one ahead
      const s = c.stats();
      const lookAhead = s.slots[a.slot]!.mappedPages * c.pageSize - group * c.pageSize; // past the group its token needs
      expect(lookAhead).toBeGreaterThan(0);
      expect(c.obtainableBytes() - c.obtainableBytes({ lookAhead: false })).toBe(lookAhead);
      expect(() => c.obtainableBytes({ lookAhead: 1 as unknown as boolean })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }));
    });

    it('stepAsync() completes at once when the batch is backed, and maps off the JS thread when it is not: no backend call on the JS thread either way', async () => {
      const c = make({ prefetchTokens: 0 }); // no worker: every new page group is a miss
      const per = tpp(c);
      const a = c.reserve();
      const b2 = c.reserve();
      const js = c.stats().driverCallsOnJsThread;
      const steps0 = c.stats().prefetch.steps;
      await c.stepAsync([a, b2], [1, per + 1]);
      let s = c.stats();
      expect(s.driverCallsOnJsThread).toBe(js);
      // the check on the JS thread, then the step on a pool thread: two native steps, timed
      expect(s.prefetch.steps).toBe(steps0 + 2);
      expect(s.prefetch.stepNanoseconds).toBeGreaterThan(0);
      const stepNs = s.prefetch.stepNanoseconds;
      expect([a.tokens, b2.tokens]).toEqual([1, per + 1]);
      expect(s.prefetch.misses).toBe(2);
      await c.stepAsync([a, b2], [2, per + 2]); // backed already: the synchronous path
      s = c.stats();
      expect(s.prefetch.hits).toBe(2);
      expect(s.prefetch.steps).toBe(steps0 + 3);
      expect(s.prefetch.stepNanoseconds).toBeGreaterThan(stepNs);
      expect(() => c.step([a], [c.options.maxTokens + 1])).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
      expect(c.stats().prefetch.steps).toBe(steps0 + 4); // a failed step counts too
      expect(s.driverCallsOnJsThread).toBe(js);
      // bytes written through the batch's addresses are there
      const data = pattern(c.tokenBytes, 7);
      c.write(b2, { layer: 0, kind: 'k', token: per }, data);
      expect(Buffer.from(c.read(b2, { layer: 0, kind: 'k', token: per, count: 1 })).equals(Buffer.from(data))).toBe(true);
    });

    it('stepAsync() out of memory rejects with every piece of state as it was; bad input and closing are typed', async () => {
      const c = make({ prefetchTokens: 0 });
      const a = c.reserve();
      const b2 = c.reserve();
      const events: unknown[] = [];
      c.on('outOfMemory', (e) => events.push(e));
      const before = stateOf(c);
      await expect(c.stepAsync([a, b2], [c.options.maxTokens, c.options.maxTokens])).rejects.toMatchObject({ code: 'ERR_OUT_OF_MEMORY' });
      expect(stateOf(c)).toEqual(before);
      expect(events).toEqual([expect.objectContaining({ operation: 'step' })]);
      await expect(c.stepAsync([a], [c.options.maxTokens + 1])).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
      await expect(c.stepAsync([a], [-1])).rejects.toMatchObject({ code: 'ERR_INVALID_ARGUMENT' });
      await expect(c.stepAsync('a' as unknown as Sequence[], 1)).rejects.toMatchObject({ code: 'ERR_INVALID_ARGUMENT' });
      const pending = c.stepAsync([a], [tpp(c) * 2]).then(
        () => null,
        (e: { code: string }) => e.code,
      );
      c.close();
      expect([null, 'ERR_CLOSED']).toContain(await pending);
      await expect(c.stepAsync([a], [1])).rejects.toMatchObject({ code: 'ERR_CLOSED' });
    });

    it('growAsync also has the worker map the look-ahead: a prompt joining the batch at a page-group boundary finds its next group ready', async () => {
      const c = make({ prefetchTokens: tpp(c0ForStress(b)) });
      const per = tpp(c);
      const seq = c.reserve();
      await c.growAsync(seq, per); // the prompt ends exactly at a group boundary
      await until(() => c.stats().slots[seq.slot]!.backedTokens >= 2 * per); // no step() yet
      const s0 = c.stats();
      c.step([seq], [per + 1]);
      const s = c.stats();
      expect(s.driverCallsOnJsThread).toBe(s0.driverCallsOnJsThread);
      expect(s.prefetch.misses).toBe(s0.prefetch.misses);
    });

    it('a growAsync that needs room when memory is full reclaims on its own thread: the JS thread makes no backend call', async () => {
      const c = make({ prefetchTokens: 0 });
      fillAndRelease(c);
      const seq = c.reserve({ expectedTokens: 0 });
      const js0 = c.stats().driverCallsOnJsThread;
      await c.growAsync(seq, 2 * tpp(c));
      const s = c.stats();
      expect(s.driverCallsOnJsThread).toBe(js0);
      expect(s.pagesReclaimed).toBe(2 * groupPagesOf(b) * b.deviceCount);
      expect(s.slots[seq.slot]!.mappedPages).toBe(2 * groupPagesOf(b) * b.deviceCount);
      expect(s.bytesUsed + s.bytesBeyondTokens + s.bytesInReleasedSlots).toBe(s.bytesBacked);
    });

    it('memory full, the worker reclaiming ahead, prompts growing asynchronously, steps and releases interleaved: every byte stays where it was written', async () => {
      const c = make({ prefetchTokens: tpp(c0ForStress(b)) });
      fillAndRelease(c);
      const per = tpp(c);
      let x = 12345;
      const rand = (n: number) => ((x = (Math.imul(x, 1103515245) + 12345) >>> 0) % n);
      const tokenData = (id: number, t: number) => pattern(c.tokenBytes, id * 10_000 + t);
      interface Live { id: number; seq: Sequence; tokens: number }
      const live: Live[] = [];
      const pending: Promise<void>[] = [];
      let nextId = 1;
      const admit = () => {
        const seq = c.reserve({ expectedTokens: 0 });
        const id = nextId++;
        const prompt = 1 + rand(2 * per);
        pending.push(
          c.growAsync(seq, prompt).then(
            () => {
              for (let t = 0; t < prompt; t++) c.write(seq, { layer: 0, kind: 'k', token: t }, tokenData(id, t));
              live.push({ id, seq, tokens: prompt });
            },
            (e: unknown) => {
              expect((e as { code?: string }).code).toBe('ERR_OUT_OF_MEMORY');
              c.release(seq);
            },
          ),
        );
      };
      const verify = (l: Live) => {
        const got = c.read(l.seq, { layer: 0, kind: 'k', token: 0, count: l.tokens });
        for (let t = 0; t < l.tokens; t++)
          expect(Buffer.from(got.subarray(t * c.tokenBytes, (t + 1) * c.tokenBytes)).equals(Buffer.from(tokenData(l.id, t)))).toBe(true);
      };
      for (let round = 0; round < 120; round++) {
        if (live.length + pending.length < 3) admit();
        if (live.length > 0) {
          const batch = live.filter((l) => l.tokens < c.options.maxTokens);
          try {
            c.step(batch.map((l) => l.seq), batch.map((l) => l.tokens + 1));
            for (const l of batch) {
              c.write(l.seq, { layer: 0, kind: 'k', token: l.tokens }, tokenData(l.id, l.tokens));
              l.tokens++;
            }
          } catch (e) {
            expect((e as { code?: string }).code).toBe('ERR_OUT_OF_MEMORY');
            const victim = live.splice(rand(live.length), 1)[0]!;
            verify(victim);
            c.release(victim.seq);
          }
        }
        if (live.length > 0 && rand(8) === 0) {
          const done = live.splice(rand(live.length), 1)[0]!;
          verify(done);
          c.release(done.seq);
        }
        if (round % 10 === 0) {
          await Promise.all(pending.splice(0));
          for (const l of live) verify(l);
        }
        await new Promise((r) => setTimeout(r, 1)); // the GPU's time: the worker maps and reclaims
      }
      await Promise.all(pending.splice(0));
      for (const l of live) verify(l);
      const s = c.stats();
      expect(s.bytesUsed + s.bytesBeyondTokens + s.bytesInReleasedSlots).toBe(s.bytesBacked);
      expect(s.pagesMapped + s.pagesPooled + s.pagesStranded + s.pagesInFlight).toBe(s.pagesCreated);
      expect(s.prefetch.pagesReclaimedAhead).toBeGreaterThan(0); // the worker's retirements ran among all this
      expect(s.pagesReclaimed).toBeGreaterThan(s.prefetch.pagesReclaimedAhead); // and demand (growAsync's retirements, step) too
    });

    it('idlePageGroups: 0 turns reclaim-ahead off: the growth reclaims on demand, on the JS thread', async () => {
      const c = make({ prefetchTokens: tpp({ pageSize: b.name === 'host' ? 4096 : 2 << 20, tokenBytes: b.options.kvHeads * b.options.headDim * 2 } as KVCache), idlePageGroups: 0 });
      fillAndRelease(c);
      const seq = c.reserve({ expectedTokens: 0 });
      c.step([seq], [1]);
      await new Promise((r) => setTimeout(r, 50)); // time in which a worker would have reclaimed
      const js0 = c.stats().driverCallsOnJsThread;
      c.step([seq], [tpp(c) + 1]);
      const s = c.stats();
      expect(s.prefetch.pagesReclaimedAhead).toBe(0);
      expect(s.pagesReclaimed).toBeGreaterThan(0);
      expect(s.driverCallsOnJsThread).toBeGreaterThan(js0);
    });

    it('growAsync backs the tokens off the JS thread, all or nothing', async () => {
      const c = make({ prefetchTokens: 0 });
      const seq = c.reserve();
      const js0 = c.stats().driverCallsOnJsThread;
      await c.growAsync(seq, c.options.maxTokens);
      expect(seq.tokens).toBe(c.options.maxTokens);
      const s = c.stats();
      expect(s.driverCallsOnJsThread).toBe(js0);
      expect(s.prefetch.pagesAhead).toBe(s.pagesMapped);
      const data = pattern(c.options.maxTokens * c.tokenBytes, 8);
      c.write(seq, { layer: b.options.layers - 1, kind: 'k', token: 0 }, data);
      expect(Buffer.from(c.read(seq, { layer: b.options.layers - 1, kind: 'k', token: 0, count: c.options.maxTokens })).equals(Buffer.from(data))).toBe(true);
      // beyond the budget: rejected, nothing changed
      const other = c.reserve();
      const before = stateOf(c);
      await expect(c.growAsync(other, c.options.maxTokens)).rejects.toMatchObject({ code: 'ERR_OUT_OF_MEMORY' });
      expect(stateOf(c)).toEqual(before);
      await expect(c.growAsync(other, c.options.maxTokens + 1)).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
    });

    it('stats() taken while growAsync maps off the JS thread adds up: the pages it holds are pagesInFlight', async () => {
      const c = make({ prefetchTokens: 0 });
      const seq = c.reserve();
      c._injectFault('map', 1, 'delay', 200); // the growth's second mapping is slow: a window to look into
      const grown = c.growAsync(seq, c.options.maxTokens);
      let inFlight = 0;
      for (const end = Date.now() + 10_000; Date.now() < end; ) {
        const s = c.stats();
        expect(s.pagesMapped + s.pagesPooled + s.pagesStranded + s.pagesInFlight).toBe(s.pagesCreated);
        expect(s.bytesUsed + s.bytesBeyondTokens + s.bytesInReleasedSlots).toBe(s.bytesBacked);
        expect(s.bytesBacked).toBe(s.pagesMapped * s.pageSize);
        if (s.pagesInFlight > 0) inFlight++;
        if (s.slots[seq.slot]!.backedTokens >= c.options.maxTokens) break;
      }
      await grown;
      expect(inFlight).toBeGreaterThan(0);
      const s = c.stats();
      expect(s.pagesInFlight).toBe(0);
      expect(s.pagesMapped).toBe(s.slots[seq.slot]!.mappedPages);
    });

    it('a growAsync that fails gives back what it held: nothing stays in flight', async () => {
      const c = make({ prefetchTokens: 0 });
      const seq = c.reserve();
      const controller = new AbortController();
      const grown = c.growAsync(seq, c.options.maxTokens, { signal: controller.signal });
      controller.abort();
      await grown.catch(() => undefined);
      const s = c.stats();
      expect(s.pagesInFlight).toBe(0);
      expect(s.pagesMapped + s.pagesPooled + s.pagesStranded).toBe(s.pagesCreated);
      await expect(c.growAsync(c.reserve(), 3)).resolves.toBeUndefined();
    });

    it('growAsync rejects with ERR_ABORTED for an aborted signal and leaves nothing mapped', async () => {
      const c = make({ prefetchTokens: 0 });
      const seq = c.reserve();
      const ac = new AbortController();
      ac.abort();
      await expect(c.growAsync(seq, 10, { signal: ac.signal })).rejects.toMatchObject({ code: 'ERR_ABORTED' });
      expect(c.stats().pagesMapped).toBe(0);
      // abort while pending: either it was already done, or nothing changed
      const ac2 = new AbortController();
      const p = c.growAsync(seq, c.options.maxTokens, { signal: ac2.signal });
      ac2.abort();
      const outcome = await p.then(() => 'done', (e) => e.code);
      if (outcome === 'done') expect(seq.tokens).toBe(c.options.maxTokens);
      else {
        expect(outcome).toBe('ERR_ABORTED');
        expect(seq.tokens).toBe(0);
        expect(c.stats().pagesMapped).toBe(0);
      }
      await c.growAsync(seq, 5);
      expect(seq.tokens).toBeGreaterThanOrEqual(5);
    });

    it('close() while growAsync is pending and the worker is busy: promises reject ERR_CLOSED, no hang', async () => {
      for (let round = 0; round < 20; round++) {
        const c = new KVCache({ ...b.options, prefetchTokens: c0Tokens(b) });
        const seqs: Sequence[] = [c.reserve(), c.reserve()];
        c.step([seqs[0]!], [1]); // the worker starts mapping ahead
        const p = c.growAsync(seqs[1]!, Math.floor(c.options.maxTokens / 2));
        if (round % 2) await new Promise((r) => setImmediate(r));
        c.close();
        const outcome = await p.then(() => 'done', (e) => e.code);
        expect(['done', 'ERR_CLOSED']).toContain(outcome);
        expect(c.closed).toBe(true);
        await expect(c.growAsync(seqs[0]!, 3)).rejects.toMatchObject({ code: 'ERR_CLOSED' });
      }
    });

    it('many concurrent growAsync calls on different sequences all land', async () => {
      const c = make({ prefetchTokens: 0, maxSequences: 4 });
      const seqs = [c.reserve(), c.reserve(), c.reserve()];
      await Promise.all(seqs.map((s, i) => c.growAsync(s, 10 + i)));
      expect(seqs.map((s) => s.tokens)).toEqual([10, 11, 12]);
    });
  });
}

/** A stand-in with the case's page and token size, for tpp() before a cache exists. */
const c0ForStress = (b: (typeof backends)[number]) => ({ pageSize: b.name === 'host' ? 4096 : 2 << 20, tokenBytes: tokenBytesOf(b) }) as KVCache;
const pageSizeOf = (b: (typeof backends)[number]) => (b.name === 'host' ? 4096 : 2 << 20);
/** One device's share of a token in one tensor (kvHeads split over the devices). */
const tokenBytesOf = (b: (typeof backends)[number]) => (b.options.kvHeads / b.deviceCount) * b.options.headDim * 2;

function c0Tokens(b: (typeof backends)[number]): number {
  // three page groups ahead
  return 3 * tokensPerGroupOf(b, pageSizeOf(b), tokenBytesOf(b));
}

/** Pages a sequence of maxTokens holds under the case's layout. */
function fullSequencePages(b: (typeof backends)[number]): number {
  const rowBytes = tokenBytesOf(b) * (b.options.layers / layerGroupsOf(b));
  return Math.ceil((b.options.maxTokens * rowBytes) / pageSizeOf(b)) * groupPagesOf(b);
}
