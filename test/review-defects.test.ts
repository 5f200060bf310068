// Regression tests for the defects of issue 27 (GPU checks, a line-by-line
// review, adversarial host testing). Each test names its item; each failed on
// the code before the fix (see docs/reliability.md). The host backend models
// a busy GPU stream with holdHostStream: a device-to-device copy queued on a
// held stream runs only when the stream finishes, reading memory as it is
// then, and one that reads memory no longer mapped writes 0xDB bytes.
import { afterEach, describe, expect, it } from 'vitest';
import { KVCache, type Sequence } from '../lib/index.js';
import { finishHostStream, holdHostStream, liveResources } from '../lib/testing.js';
import { backends, groupPagesOf, label, pattern, tokensPerGroupOf } from './backends.js';

const noLeaks = { ranges: 0, pages: 0, mappings: 0, fences: 0, contexts: 0 };
const kinds = ['k', 'v'] as const;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
let nextStream = 0x27000n;

for (const b of backends) {
  const hostOnly = b.name !== 'host';
  const heldWhy = hostOnly ? ' (skipped: holds a pretend host stream; cuda-review-defects.test.ts does this with a real kernel)' : '';
  const faultWhy = hostOnly ? ' (skipped: the fault sequence counts host backend calls)' : '';
  describe.skipIf(b.skip !== null)(`issue 27 defects stay fixed, ${label(b)}`, () => {
    const open: KVCache[] = [];
    afterEach(() => {
      for (const c of open.splice(0)) c.close();
      expect(liveResources()).toEqual(noLeaks);
    });
    const make = (extra: Record<string, unknown> = {}) => {
      const c = new KVCache({ ...b.options, prefetchTokens: 0, ...extra });
      open.push(c);
      return c;
    };
    const per = (c: KVCache) => tokensPerGroupOf(b, c.pageSize, c.tokenBytes);
    // The same from the options, for a cache's own options.
    const pageSize = b.options.pageSize ?? 2 * 1024 * 1024;
    const groupTokens = tokensPerGroupOf(b, pageSize, b.options.kvHeads * b.options.headDim * 2);
    const groupBytes = groupPagesOf(b) * pageSize;
    const data = (c: KVCache, id: number, layer: number, kind: number, token: number) =>
      pattern(c.tokenBytes, id * 1_000_003 + layer * 7919 + kind * 104_729 + token);
    const fill = (c: KVCache, seq: Sequence, id: number, from: number, count: number) => {
      for (let layer = 0; layer < c.options.layers; layer++)
        for (const [kind, name] of kinds.entries())
          for (let t = from; t < from + count; t++) c.write(seq, { layer, kind: name, token: t }, data(c, id, layer, kind, t));
    };
    /** Which tokens of [from, from + count) do not hold `id`'s data (empty: all do). */
    const wrongTokens = (c: KVCache, seq: Sequence, id: number, from: number, count: number) => {
      const wrong = new Set<number>();
      for (let layer = 0; layer < c.options.layers; layer++)
        for (const [kind, name] of kinds.entries()) {
          const got = c.read(seq, { layer, kind: name, token: from, count });
          for (let t = 0; t < count; t++)
            if (!Buffer.from(got.subarray(t * c.tokenBytes, (t + 1) * c.tokenBytes)).equals(Buffer.from(data(c, id, layer, kind, from + t))))
              wrong.add(from + t);
        }
      return [...wrong];
    };

    // ---- 1: the copies a share queues hold their pages until they ran ----

    it.skipIf(hostOnly)(`1: a prefix share from a released sequence, its copy queued on a busy stream: the source's pages are not reused before the copy ran${heldWhy}`, () => {
      const c = make();
      const n = per(c) + 3; // one whole group, shared, and 3 tokens of a second, copied
      const a = c.reserve();
      c.grow(a, n);
      fill(c, a, 1, 0, n);
      c.release(a);
      const stream = nextStream++;
      holdHostStream(stream);
      let child: Sequence;
      try {
        child = c.reserve({ prefix: { from: a, tokens: n }, stream });
        // Another sequence takes every page it can get without waiting, and writes them.
        const d = c.reserve({ expectedTokens: 0 });
        const room = Math.floor(c.obtainableBytes() / groupBytes) * per(c);
        c.grow(d, Math.min(room, c.options.maxTokens));
        fill(c, d, 2, 0, d.tokens);
      } finally {
        finishHostStream(stream);
      }
      expect(wrongTokens(c, child, 1, 0, n)).toEqual([]);
    });

    it.skipIf(hostOnly)(`1: a fork whose parent is released without that stream: the parent's slot takes no new sequence before the copy ran${heldWhy}`, () => {
      const c = make();
      const n = 3; // less than a group: the fork copies it all, shares nothing
      const p = c.reserve();
      c.grow(p, n);
      fill(c, p, 1, 0, n);
      const stream = nextStream++;
      holdHostStream(stream);
      let child: Sequence;
      try {
        child = c.fork(p, { stream });
        c.release(p);
        // The slot with the most mapped groups is the parent's: a new
        // sequence placed there would write where the copy still reads.
        const x = c.reserve();
        c.grow(x, n);
        fill(c, x, 2, 0, n);
      } finally {
        finishHostStream(stream);
      }
      expect(wrongTokens(c, child, 1, 0, n)).toEqual([]);
    });

    it.skipIf(hostOnly)(`1: a share whose copy was queued and then failed: nothing is given back before the copy ran${heldWhy}`, () => {
      const c = make();
      const n = 2 * per(c) + 3;
      const a = c.reserve();
      c.grow(a, n);
      fill(c, a, 1, 0, n);
      const pages = groupPagesOf(b);
      const stream = nextStream++;
      holdHostStream(stream);
      let d: Sequence;
      try {
        c._injectFault('copyDevice', pages - 1, false); // the last page of the copied group
        expect(() => c.reserve({ prefix: { from: a, tokens: n }, stream })).toThrow(expect.objectContaining({ code: 'ERR_OS' }));
        // The pages the share had taken are free again: a new sequence takes and writes them.
        d = c.reserve({ expectedTokens: 0 });
        c.grow(d, n);
        fill(c, d, 2, 0, n);
      } finally {
        finishHostStream(stream);
      }
      expect(wrongTokens(c, d, 2, 0, n)).toEqual([]);
      expect(wrongTokens(c, a, 1, 0, n)).toEqual([]);
      expect(c.stats().activeSequences).toBe(2);
    });

    // ---- 2: fork's default shares no page the next step writes --------------

    it('2: fork() after growAsync(seq, prompt + 1) with prompt + 1 a whole number of groups: each branch keeps its own first sampled token', async () => {
      const c = make();
      const prompt = 2 * per(c) - 1;
      const p = c.reserve();
      await c.growAsync(p, prompt + 1);
      fill(c, p, 1, 0, prompt);
      const branch = c.fork(p);
      expect(branch.tokens).toBe(prompt + 1);
      fill(c, p, 2, prompt, 1); // each writes its own first sampled token
      fill(c, branch, 3, prompt, 1);
      expect(wrongTokens(c, p, 2, prompt, 1)).toEqual([]);
      expect(wrongTokens(c, branch, 3, prompt, 1)).toEqual([]);
      expect(wrongTokens(c, branch, 1, 0, prompt)).toEqual([]);
    });

    it('2: fork(seq, { tokens }) shares exactly the tokens named: whole groups below them mapped, no copy past them', () => {
      const c = make();
      const p = c.reserve();
      c.grow(p, 2 * per(c) + 1);
      fill(c, p, 1, 0, 2 * per(c));
      const before = c.stats().pagesShared;
      const branch = c.fork(p, { tokens: 2 * per(c) });
      expect(branch.tokens).toBe(2 * per(c));
      expect(c.stats().pagesShared - before).toBe(2 * groupPagesOf(b));
      expect(wrongTokens(c, branch, 1, 0, 2 * per(c))).toEqual([]);
      expect(() => c.fork(p, { tokens: 2 * per(c) + 2 })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }));
      expect(() => c.fork(p, { tokens: -1 })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }));
      expect(c.stats().activeSequences).toBe(2);
    });

    // ---- 3: swapIn waits for the worker's extension of the new slot ---------

    it.skipIf(hostOnly)(`3: swapIn of a sequence while the prefetch worker maps its look-ahead: swapIn waits, nothing is mapped twice${faultWhy}`, async () => {
      const c = make({ prefetchTokens: 2 * groupTokens, hostMemoryBudget: 1 << 20 });
      const n = per(c) + 1;
      const s = c.reserve();
      c.grow(s, n);
      fill(c, s, 1, 0, n);
      const swapped = await c.swapOut(s);
      c.reclaim(); // the swapIn's growth maps every group it needs: the worker's map is the one after
      c._injectFault('map', 2 * groupPagesOf(b), 'delay', 400); // the first page of the worker's look-ahead
      const back = await c.swapIn(swapped);
      c.grow(back, 2 * per(c) + 1); // the group the worker was mapping
      await sleep(600);
      expect(c.stats().prefetch.errors).toBe(0);
      expect(wrongTokens(c, back, 1, 0, n)).toEqual([]);
    });

    // ---- 4: a failed suspension of a page leaves no slot listing an unmapped page

    it.skipIf(hostOnly)(`4: suspend() whose page release and then its mapping back fail: the page is suspended with its memory, resume() restores it${faultWhy}`, async () => {
      const c = make();
      const n = per(c);
      const s = c.reserve();
      c.grow(s, n);
      fill(c, s, 1, 0, n);
      c._injectFault('releasePage', 0, false);
      c._injectFault('map', 0, false);
      await expect(c.suspend()).rejects.toMatchObject({ code: 'ERR_OS' });
      await c.resume();
      // The page kept its memory, so even keep: 'none' finds the bytes.
      expect(wrongTokens(c, s, 1, 0, 1)).toEqual([]);
      c.grow(s, 2 * n);
      fill(c, s, 2, n, n);
      expect(wrongTokens(c, s, 2, n, n)).toEqual([]);
    });

    // ---- 5: what can never fit is known at admission ----------------------

    it('5: fits() says whether a sequence can ever be backed within the budget; bytesForTokens() is what a growth to that length maps', () => {
      const c = make({ memoryBudget: 2 * groupBytes });
      const g = per(c);
      expect(c.bytesForTokens(0)).toBe(0);
      expect(c.bytesForTokens(1)).toBe(groupBytes);
      expect(c.bytesForTokens(g)).toBe(groupBytes);
      expect(c.bytesForTokens(g + 1)).toBe(2 * groupBytes);
      expect(c.fits(2 * g)).toBe(true);
      expect(c.fits(2 * g + 1)).toBe(false); // three groups: more than the whole budget
      expect(c.fits(c.options.maxTokens + 1)).toBe(false);
      const s = c.reserve();
      c.grow(s, g + 1);
      expect(c.stats().bytesBacked).toBe(c.bytesForTokens(g + 1));
      expect(() => c.fits(-1)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }));
      expect(() => c.bytesForTokens(c.options.maxTokens + 1)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }));
      expect(() => c.fits(1.5)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }));
    });

    // ---- 6: a fenced released sharer's pages are waited for, not refused ----

    it.skipIf(hostOnly)(`6: a growth that needs a fenced released sharer's pages waits for the fence and gets them${heldWhy}`, () => {
      const c = make({ memoryBudget: 5 * groupBytes });
      const g = per(c);
      const a = c.reserve();
      c.grow(a, 2 * g + 3);
      const fork = c.fork(a);
      const stream = nextStream++;
      holdHostStream(stream);
      try {
        c.release(fork, { stream }); // kernels still read through the fork
        c.release(a);
        const waits = c.stats().driverCalls.fenceWait!.calls;
        const d = c.reserve();
        c.grow(d, 5 * g); // the whole budget: the fork's pages included
        expect(d.tokens).toBe(5 * g);
        expect(c.stats().driverCalls.fenceWait!.calls).toBeGreaterThan(waits);
      } finally {
        finishHostStream(stream);
      }
    });

    // ---- 7: a refused swapIn changes nothing ------------------------------

    it('7: a swapIn refused for memory leaves the slot it tried as it was: a released sequence there is still a prefix source', async () => {
      const c = make({ memoryBudget: 4 * groupBytes, hostMemoryBudget: 4 * groupBytes });
      const g = per(c);
      const s = c.reserve();
      c.grow(s, 2 * g);
      const swapped = await c.swapOut(s);
      const x = c.reserve(); // takes s's old slot (the most mapped groups) and its 2 groups
      c.grow(x, 2 * g);
      const r = c.reserve({ expectedTokens: 0 });
      c.grow(r, g);
      fill(c, r, 1, 0, g);
      c.release(r); // keeps its group
      const y = c.reserve({ expectedTokens: 0 });
      c.grow(y, g); // the budget is full
      const before = c.stats();
      await expect(c.swapIn(swapped)).rejects.toMatchObject({ code: 'ERR_OUT_OF_MEMORY' });
      expect(c.stats().slots).toEqual(before.slots);
      const again = c.reserve({ prefix: { from: r, tokens: g } });
      expect(wrongTokens(c, again, 1, 0, g)).toEqual([]);
      expect(swapped.gone).toBe(false);
    });

    // ---- 9, 10: async operations report what happened --------------------

    it.skipIf(hostOnly)(`9: swapOut during a growAsync of the same sequence: the swapped sequence's tokens are those its copy holds${faultWhy}`, async () => {
      const c = make({ hostMemoryBudget: 1 << 22 });
      const g = per(c);
      const s = c.reserve();
      c.grow(s, g);
      c._injectFault('map', 0, 'delay', 200);
      const growing = c.growAsync(s, 3 * g);
      await sleep(50); // the growth is mapping its first page
      const swapped = await c.swapOut(s);
      await Promise.allSettled([growing]);
      const back = await c.swapIn(swapped);
      expect(swapped.tokens).toBe(back.tokens);
      expect(back.tokens).toBe(3 * g);
      expect(swapped.bytes).toBe(back.tokens * c.bytesPerToken);
    });

    it('10: a sequence released after its growAsync backed it but before the promise settled: the promise rejects with ERR_SEQUENCE_RELEASED', async () => {
      const c = make();
      const s = c.reserve();
      const growing = c.growAsync(s, per(c));
      const until = Date.now() + 300;
      while (Date.now() < until) {
        // the event loop is blocked: the growth ends on its pool thread, the promise cannot settle yet
      }
      c.release(s);
      await expect(growing).rejects.toMatchObject({ code: 'ERR_SEQUENCE_RELEASED' });
    });

    // ---- 11: host blocks sized to the host budget ------------------------

    it('11: with a small hostMemoryBudget, several small swaps fit (a host block is not the whole budget)', async () => {
      const bytesPerToken = 2 * b.options.layers * b.options.kvHeads * b.options.headDim * 2;
      const c = make({ hostMemoryBudget: 16 * bytesPerToken }); // room for 16 one-token swaps, if blocks allow
      const swapped = [];
      for (let i = 0; i < 3; i++) {
        const s = c.reserve();
        c.grow(s, 1);
        fill(c, s, 10 + i, 0, 1);
        swapped.push(await c.swapOut(s));
      }
      for (const [i, sw] of swapped.entries()) {
        const s = await c.swapIn(sw);
        expect(wrongTokens(c, s, 10 + i, 0, 1)).toEqual([]);
      }
    });

    // ---- 12-15: failure paths record what they leave --------------------

    it.skipIf(hostOnly)(`12: the worker's unmap of a released sharer's shared page fails: the address is unmapped again before the slot is used, no growth fails there${faultWhy}`, async () => {
      const c = make({ prefetchTokens: 4 });
      const g = per(c);
      const a = c.reserve();
      c.grow(a, g);
      const sharer = c.reserve({ prefix: { from: a, tokens: g } }); // one whole group: shared pages only
      c._injectFault('unmap', 0, false);
      c.release(sharer); // the worker drops its mappings off this thread; the first unmap fails
      for (let i = 0; i < 100 && c.stats().slots[sharer.slot]!.mappedPages > 0; i++) await sleep(10);
      const others = [c.reserve(), c.reserve(), c.reserve()]; // every slot is taken: the sharer's too
      for (const o of others) c.grow(o, g);
      expect(others.map((o) => o.tokens)).toEqual([g, g, g]);
    });

    it.skipIf(hostOnly)(`13: share()'s undo whose unmap of a shared mapping fails: the mapping stays recorded (dropped later), nothing leaks${faultWhy}`, () => {
      const c = make();
      const g = per(c);
      const a = c.reserve();
      c.grow(a, 2 * g + 3);
      fill(c, a, 1, 0, 2 * g + 3);
      const pages = groupPagesOf(b);
      c._injectFault('copyDevice', 0, false); // after every mapping was made
      c._injectFault('unmap', pages, false); // the undo: the fresh group first, then the last shared page
      expect(() => c.reserve({ prefix: { from: a, tokens: 2 * g + 3 } })).toThrow(expect.objectContaining({ code: 'ERR_OS' }));
      const others = [c.reserve(), c.reserve(), c.reserve()];
      for (const o of others) c.grow(o, g);
      for (const [i, o] of others.entries()) fill(c, o, 20 + i, 0, g);
      expect(wrongTokens(c, a, 1, 0, 2 * g + 3)).toEqual([]);
      // afterEach: no mapping left after close()
    });

    it.skipIf(hostOnly)(`14: resume() whose setAccess fails and whose undo's unmap fails too: the mapping is recorded, the next resume() succeeds${faultWhy}`, async () => {
      const c = make({ hostMemoryBudget: 1 << 22 });
      const s = c.reserve();
      c.grow(s, per(c));
      fill(c, s, 1, 0, per(c));
      await c.suspend({ keep: 'host' });
      c._injectFault('setAccess', 0, false);
      c._injectFault('unmap', 0, false);
      await expect(c.resume()).rejects.toMatchObject({ code: 'ERR_OS' });
      await c.resume();
      expect(wrongTokens(c, s, 1, 0, per(c))).toEqual([]);
    });

    it.skipIf(hostOnly)(`14: resume() whose map fails and whose release of the new page fails too: the page is owned (close frees it)${faultWhy}`, async () => {
      const c = make();
      const s = c.reserve();
      c.grow(s, per(c));
      await c.suspend();
      c._injectFault('map', 0, false);
      c._injectFault('releasePage', 0, false);
      await expect(c.resume()).rejects.toMatchObject({ code: 'ERR_OS' });
      // afterEach: close() gives every page back
    });

    it.skipIf(hostOnly)(`15: a prefix share into a released sharer's slot that fails creating its fresh pages: that slot still takes no new sequence${heldWhy}`, () => {
      const c = make();
      const g = per(c);
      const a = c.reserve();
      c.grow(a, 2 * g + 3);
      fill(c, a, 1, 0, 2 * g + 3);
      const sharer = c.reserve({ prefix: { from: a, tokens: 2 * g } }); // two whole groups, all shared
      const stream = nextStream++;
      holdHostStream(stream);
      try {
        c.release(sharer, { stream }); // its mappings must stay until the fence: a released sharer
        c._injectFault('createPage', 0, false);
        expect(() => c.reserve({ prefix: { from: a, tokens: 2 * g + 3 } })).toThrow(expect.objectContaining({ code: 'ERR_OS' }));
        const x = c.reserve(); // must not be the sharer's slot, which maps a's pages
        c.grow(x, 1);
        fill(c, x, 2, 0, 1);
        expect(wrongTokens(c, a, 1, 0, 2 * g + 3)).toEqual([]);
      } finally {
        finishHostStream(stream);
      }
    });

    // ---- 8: obtainableBytes counts pages being retired -------------------

    it.skipIf(hostOnly)(`8: obtainableBytes() does not dip while a share retires a free slot's pages off the lock${faultWhy}`, async () => {
      const c = make({ maxSequences: 2 }); // the share must clear the one free slot
      const g = per(c);
      const r = c.reserve();
      c.grow(r, 2 * g);
      c.release(r);
      const a = c.reserve({ expectedTokens: 0 });
      c.grow(a, g);
      const before = c.obtainableBytes();
      c._injectFault('unmap', 0, 'delay', 300); // the retirement of r's slot, off the lock
      const sharing = c.reserveAsync({ prefix: { from: a, tokens: g } });
      await sleep(100);
      const during = c.obtainableBytes();
      await sharing;
      expect(during).toBe(before);
    });
  });
}

// ---- several devices (host backend: logical devices, so CI runs them) ----

const host = backends.find((b) => b.name === 'host' && b.layoutName === 'per-layer')!;
describe('issue 27 defects over two host devices stay fixed', () => {
  const open: KVCache[] = [];
  afterEach(() => {
    for (const c of open.splice(0)) c.close();
    expect(liveResources()).toEqual(noLeaks);
  });
  const make = (extra: Record<string, unknown> = {}) => {
    const c = new KVCache({ ...host.options, devices: [0, 1], prefetchTokens: 0, hostMemoryBudget: 1 << 22, ...extra });
    open.push(c);
    return c;
  };
  const per = (c: KVCache) => c.layout.tokensPerPageGroup;
  const row = (c: KVCache, id: number, token: number) => pattern(c.tokenBytes, id * 7919 + token);
  const fill = (c: KVCache, seq: Sequence, id: number, count: number) => {
    for (const device of [0, 1]) for (let t = 0; t < count; t++) c.write(seq, { layer: 0, kind: 'k', token: t, device }, row(c, id + device, t));
  };
  const holds = (c: KVCache, seq: Sequence, id: number, count: number) =>
    [0, 1].every((device) =>
      Array.from({ length: count }, (_, t) => t).every((t) =>
        Buffer.from(c.read(seq, { layer: 0, kind: 'k', token: t, count: 1, device })).equals(Buffer.from(row(c, id + device, t))),
      ),
    );
  const tokensOf = (c: KVCache) => c.stats().devices.map((d) => d.slots.map((s) => s.tokens));

  it("20, 19: suspend({ keep: 'none' }) failing on one device leaves the cache suspended in part (not resumed as if whole); a step then fails on every device, none keeps the tokens", async () => {
    const c = make();
    const g = per(c);
    const r = c.reserve();
    c.grow(r, g);
    c.release(r); // a released slot: suspend unmaps it first
    const s = c.reserve();
    c.grow(s, g);
    c._injectFault('unmap', 0, false, 0, 0); // device 0 fails before giving anything back
    const failed = await c.suspend().then(() => null, (e: { code: string; message: string }) => e);
    expect(failed?.code).toBe('ERR_OS');
    expect(failed?.message).toMatch(/suspended in part/);
    expect(c.suspended).toBe(true);
    const before = tokensOf(c);
    expect(() => c.step([s], [g + 1])).toThrow(expect.objectContaining({ code: 'ERR_SUSPENDED' }));
    expect(tokensOf(c)).toEqual(before);
    await c.resume();
    expect(c.suspended).toBe(false);
    c.step([s], [g + 1]);
    expect(s.tokens).toBe(g + 1);
  });

  it('21: a swapIn over two devices failing on the second: the slot it used no longer passes as a released prefix source', async () => {
    const c = make({ memoryBudget: 4 * 8 * 4096 });
    const g = per(c);
    const s = c.reserve();
    c.grow(s, 2 * g);
    fill(c, s, 1, 2 * g);
    const swapped = await c.swapOut(s);
    const x = c.reserve(); // s's old slot, with its pages
    c.grow(x, 2 * g);
    const r = c.reserve({ expectedTokens: 0 });
    c.grow(r, g);
    fill(c, r, 10, g);
    c.release(r); // the swapIn's slot: the one with the most pages among the free
    c._injectFault('copyFromHost', 0, false, 0, 1);
    await expect(c.swapIn(swapped)).rejects.toMatchObject({ code: 'ERR_OS', device: 1 });
    let again: Sequence | null = null;
    try {
      again = c.reserve({ prefix: { from: r, tokens: g } });
    } catch (e) {
      expect((e as { code: string }).code).toBe('ERR_SEQUENCE_RELEASED');
    }
    if (again) expect(holds(c, again, 10, g)).toBe(true); // never another sequence's bytes
    const back = await c.swapIn(swapped); // the handle still works
    expect(holds(c, back, 1, 2 * g)).toBe(true);
  });

  it('22: reclaim(bytes) over two devices frees that many bytes of the whole cache, not that many on each device', () => {
    const c = make();
    const g = per(c);
    const s = c.reserve();
    c.grow(s, 3 * g);
    c.release(s);
    const groupBytes = c.layout.bytesPerPageGroup; // one device's group
    expect(c.reclaim(2 * groupBytes)).toBe(2 * groupBytes); // a group on each device
    expect(c.stats().devices.map((d) => d.bytesInReleasedSlots)).toEqual([2 * groupBytes, 2 * groupBytes]);
  });
});
