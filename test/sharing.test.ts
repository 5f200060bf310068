// Sharing KV memory between sequences: fork() and prefix sharing map the same
// physical pages at a second place in the range, copying only the page group
// the last token falls in. Run against every backend and layout present.
import { afterEach, describe, expect, it } from 'vitest';
import { KVCache, type Sequence } from '../lib/index.js';
import { finishHostStream, holdHostStream } from '../lib/testing.js';
import { deviceBackends as backends, groupPagesOf, label, pattern, stateOf, streamOf, tokensPerGroupOf } from './backends.js';

const kinds = ['k', 'v'] as const;

for (const b of backends) {
  describe.skipIf(b.skip !== null)(`fork and prefix sharing, ${label(b)}`, () => {
    const open: KVCache[] = [];
    const make = () => {
      const c = new KVCache({ ...b.options, prefetchTokens: 0 });
      open.push(c);
      return c;
    };
    afterEach(() => {
      for (const c of open.splice(0)) c.close();
    });
    const per = (c: KVCache) => tokensPerGroupOf(b, c.pageSize, c.tokenBytes);
    const group = groupPagesOf(b) * b.deviceCount; // a page group on every device: what stats() adds up
    // A distinct pattern per (sequence id, layer, kind), token by token.
    const data = (c: KVCache, id: number, layer: number, kind: number, from: number, count: number) =>
      pattern(count * c.tokenBytes, id * 1_000_003 + layer * 7919 + kind * 104_729 + from);
    const fill = (c: KVCache, seq: Sequence, id: number, from: number, count: number) => {
      for (let layer = 0; layer < c.options.layers; layer++)
        for (const [kind, name] of kinds.entries())
          for (let t = from; t < from + count; t++) c.write(seq, { layer, kind: name, token: t }, data(c, id, layer, kind, t, 1));
    };
    /** The ids whose data each token of [from, from + count) of `seq` holds must be `id`'s. */
    const expectData = (c: KVCache, seq: Sequence, id: number, from: number, count: number) => {
      for (let layer = 0; layer < c.options.layers; layer++)
        for (const [kind, name] of kinds.entries()) {
          const got = c.read(seq, { layer, kind: name, token: from, count });
          for (let t = 0; t < count; t++) {
            const want = data(c, id, layer, kind, from + t, 1);
            expect(Buffer.from(got.subarray(t * c.tokenBytes, (t + 1) * c.tokenBytes)).equals(Buffer.from(want)), `layer ${layer} ${name} token ${from + t}`).toBe(true);
          }
        }
    };
    const identity = (c: KVCache) => {
      const s = c.stats();
      expect(s.bytesUsed + s.bytesBeyondTokens + s.bytesInReleasedSlots).toBe(s.bytesBacked + s.bytesSavedBySharing);
      expect(s.pagesMapped + s.pagesPooled + s.pagesStranded + s.pagesInFlight).toBe(s.pagesCreated);
    };

    it('fork() maps the whole page groups from the same pages and copies only the partial one: same tokens, less memory', () => {
      const c = make();
      const n = 2 * per(c) + 3; // two whole groups and three tokens of a third
      const p = c.reserve();
      c.grow(p, n);
      fill(c, p, 1, 0, n);
      const before = c.stats();
      const child = c.fork(p);
      const s = c.stats();
      expect(child.tokens).toBe(n);
      expect(child.slot).not.toBe(p.slot);
      expect(s.pagesShared).toBe(2 * group);
      expect(s.bytesSavedBySharing).toBe(2 * group * c.pageSize);
      expect(s.bytesBacked - before.bytesBacked).toBe(group * c.pageSize); // only the partial group is new memory
      expect(s.driverCalls.copyDevice?.calls).toBe(group);
      expectData(c, child, 1, 0, n);
      expectData(c, p, 1, 0, n);
      identity(c);
    });

    it('after fork() the two grow and write independently; the copied partial group is the copy-on-write', () => {
      const c = make();
      const n = per(c) + 2;
      const p = c.reserve();
      c.grow(p, n);
      fill(c, p, 1, 0, n);
      const child = c.fork(p);
      c.grow(p, n + 5);
      c.grow(child, n + 7);
      fill(c, p, 2, n, 5);
      fill(c, child, 3, n, 7);
      // the child rewrites its last token before the fork: it lives in the copied group
      fill(c, child, 4, n - 1, 1);
      expectData(c, p, 1, 0, n);
      expectData(c, p, 2, n, 5);
      expectData(c, child, 1, 0, n - 1);
      expectData(c, child, 4, n - 1, 1);
      expectData(c, child, 3, n, 7);
      identity(c);
    });

    it('releasing the parent first leaves the child intact; a fork of a fork works; the last mapping gives the page back', () => {
      const c = make();
      const n = 2 * per(c);
      const p = c.reserve();
      c.grow(p, n);
      fill(c, p, 1, 0, n);
      // By default the group of the last backed token is copied (it may not be written yet)...
      const copied = c.fork(p);
      expect(c.stats().pagesShared).toBe(group);
      expectData(c, copied, 1, 0, n);
      c.release(copied);
      // ...naming the written tokens shares it: a boundary, nothing copied
      const child = c.fork(p, { tokens: n });
      expect(c.stats().pagesShared).toBe(2 * group);
      c.release(p);
      expect(c.stats().pagesShared).toBe(0);
      expectData(c, child, 1, 0, n);
      const grandchild = c.fork(child, { tokens: n });
      c.release(child);
      expectData(c, grandchild, 1, 0, n);
      identity(c);
      c.release(grandchild);
      const s = c.stats();
      expect(s.pagesShared).toBe(0);
      expect(s.bytesSavedBySharing).toBe(0);
      expect(s.bytesBacked).toBe(s.bytesInReleasedSlots); // every page counted once, held by one released slot
      identity(c);
      // and the slots are reusable: a new sequence placed anywhere writes only its own pages
      const q = c.reserve();
      c.grow(q, n);
      fill(c, q, 9, 0, n);
      expectData(c, q, 9, 0, n);
    });

    it('reserve({ prefix }) shares the first tokens of an active sequence, or of a released one whose slot still holds them', () => {
      const c = make();
      const n = 2 * per(c) + 1;
      const p = c.reserve();
      c.grow(p, n);
      fill(c, p, 1, 0, n);
      const a = c.reserve({ prefix: { from: p, tokens: per(c) + 1 } });
      expect(a.tokens).toBe(per(c) + 1);
      expect(c.stats().pagesShared).toBe(group);
      expectData(c, a, 1, 0, per(c) + 1);
      // p shares pages with a: released, it gives its mappings up (its slot must not be reused while they are a's)
      c.release(p);
      expect(() => c.reserve({ prefix: { from: p, tokens: 1 } })).toThrow(expect.objectContaining({ code: 'ERR_SEQUENCE_RELEASED' }));
      expectData(c, a, 1, 0, per(c) + 1);
      // a released sequence that shared nothing keeps its pages (deferred reclamation): its tokens can be shared
      const q = c.reserve({ expectedTokens: 0 });
      c.grow(q, n);
      fill(c, q, 2, 0, n);
      c.release(q);
      const r = c.reserve({ prefix: { from: q, tokens: n } });
      expect(r.tokens).toBe(n);
      expectData(c, r, 2, 0, n);
      // the released source gave its pages up: it cannot be shared from again
      expect(() => c.reserve({ prefix: { from: q, tokens: 1 } })).toThrow(expect.objectContaining({ code: 'ERR_SEQUENCE_RELEASED' }));
      identity(c);
    });

    it('bad input is a typed error and changes nothing', () => {
      const c = make();
      const p = c.reserve();
      c.grow(p, 3);
      const before = stateOf(c);
      expect(() => c.reserve({ prefix: { from: p, tokens: 4 } })).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
      expect(() => c.reserve({ prefix: { from: {} as Sequence, tokens: 1 } })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }));
      expect(() => c.reserve({ prefix: { from: p, tokens: -1 } })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }));
      expect(() => c.reserve({ stream: 0n })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }));
      expect(() => c.fork(p, { stream: 1 as unknown as bigint })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }));
      const other = make();
      expect(() => other.fork(p)).toThrow(expect.objectContaining({ code: 'ERR_FOREIGN_SEQUENCE' }));
      expect(() => other.reserve({ prefix: { from: p, tokens: 1 } })).toThrow(expect.objectContaining({ code: 'ERR_FOREIGN_SEQUENCE' }));
      expect(stateOf(c)).toEqual(before);
      const q = c.reserve();
      c.release(q);
      expect(() => c.fork(q)).toThrow(expect.objectContaining({ code: 'ERR_SEQUENCE_RELEASED' }));
    });

    it('out of memory or out of slots: fork() is refused and every piece of state is as it was', () => {
      const c = make();
      const budgetGroups = c.stats().budgetBytes / c.pageSize / group;
      const perSeq = Math.min(Math.floor(c.options.maxTokens / per(c)), Math.floor(budgetGroups / 3));
      // three sequences fill the budget but for less than a group; the first ends mid-group
      const seqs = [c.reserve(), c.reserve(), c.reserve()];
      c.grow(seqs[0]!, (perSeq - 1) * per(c) + 1);
      c.grow(seqs[1]!, perSeq * per(c));
      c.grow(seqs[2]!, (budgetGroups - 2 * perSeq) * per(c) > c.options.maxTokens ? c.options.maxTokens : (budgetGroups - 2 * perSeq) * per(c));
      const full = c.stats();
      if (full.pagesMapped < full.budgetBytes / c.pageSize) return; // the shape leaves room: nothing to test here
      const before = stateOf(c);
      expect(() => c.fork(seqs[0]!)).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_MEMORY' }));
      expect(stateOf(c)).toEqual(before);
      // a boundary needs no new page: that fork of the tokens written succeeds in the same state
      const child = c.fork(seqs[1]!, { tokens: perSeq * per(c) });
      expect(child.tokens).toBe(perSeq * per(c));
      // every slot taken now
      expect(() => c.fork(seqs[1]!, { tokens: perSeq * per(c) })).toThrow(expect.objectContaining({ code: 'ERR_NO_SLOT' }));
      identity(c);
    });

    it('forkAsync() and reserveAsync({ prefix }) map on a worker thread: same tokens, no backend call on the JS thread', async () => {
      const c = make();
      const n = 2 * per(c) + 3;
      const p = c.reserve();
      c.grow(p, n);
      fill(c, p, 1, 0, n);
      const calls = c.stats().driverCallsOnJsThread;
      const [child, prefixed] = await Promise.all([c.forkAsync(p), c.reserveAsync({ prefix: { from: p, tokens: per(c) + 1 } })]);
      expect(c.stats().driverCallsOnJsThread).toBe(calls);
      expect(child.tokens).toBe(n);
      expect(prefixed.tokens).toBe(per(c) + 1);
      expectData(c, child, 1, 0, n);
      expectData(c, prefixed, 1, 0, per(c) + 1);
      expect(c.stats().pagesShared).toBe(2 * group); // p's first two groups: both in the child, the first in prefixed too
      identity(c);
      const plain = await c.reserveAsync({ expectedTokens: 3 }); // no prefix: reserve()
      expect(plain.tokens).toBe(0);
      await expect(c.forkAsync({} as Sequence)).rejects.toMatchObject({ code: 'ERR_INVALID_ARGUMENT' });
      await expect(c.reserveAsync({ prefix: { from: p, tokens: n + 1 } })).rejects.toMatchObject({ code: 'ERR_OUT_OF_RANGE' });
    });

    it('stats() taken while forkAsync() maps on its thread adds up: mappings count once the child lists them', async () => {
      const c = make();
      const n = 4 * per(c) + 3; // four groups shared, the fifth copied into fresh pages
      const p = c.reserve();
      c.grow(p, n);
      fill(c, p, 1, 0, n);
      c._injectFault('map', 1, 'delay', 200); // the share's second mapping is slow: a window to look into
      const forked = c.forkAsync(p);
      let inFlight = 0;
      for (const end = Date.now() + 10_000; Date.now() < end; ) {
        const s = c.stats();
        identity(c);
        if (s.pagesInFlight > 0) inFlight++;
        if (s.activeSequences === 2) break;
      }
      const child = await forked;
      expect(inFlight).toBeGreaterThan(0); // snapshots during the share: the fresh pages it held
      const s = c.stats();
      expect(s.pagesInFlight).toBe(0);
      expect(s.bytesSavedBySharing).toBe(4 * group * s.pageSize);
      identity(c);
      expectData(c, child, 1, 0, n);
    });

    it('the source released, stepped or the cache closed while forkAsync() maps: the child is whole or the call fails cleanly', async () => {
      const c = make();
      const n = 2 * per(c) + 1;
      for (let round = 0; round < 6; round++) {
        const p = c.reserve();
        c.grow(p, n);
        fill(c, p, round + 1, 0, n);
        const pending = c.forkAsync(p).then(
          (seq) => seq,
          (e: { code: string }) => e.code,
        );
        if (round % 2 === 0) c.release(p);
        else c.grow(p, n + 1);
        const got = await pending;
        if (typeof got === 'string') expect(got).toBe('ERR_SEQUENCE_RELEASED');
        else {
          expectData(c, got, round + 1, 0, n);
          c.release(got);
        }
        if (!p.released) c.release(p);
        identity(c);
      }
      const d = make();
      const q = d.reserve();
      d.grow(q, n);
      const pending = d.forkAsync(q).then(
        () => null,
        (e: { code: string }) => e.code,
      );
      d.close();
      expect([null, 'ERR_CLOSED']).toContain(await pending);
    });

    it('with the prefetch worker, releasing a sharer unmaps nothing on the JS thread: the worker drops its mappings', async () => {
      const c = new KVCache({ ...b.options, prefetchTokens: per(make()) });
      open.push(c);
      const n = 2 * per(c) + 3;
      const system = c.reserve();
      c.grow(system, n);
      fill(c, system, 1, 0, n);
      const a = await c.reserveAsync({ prefix: { from: system, tokens: n } });
      c.grow(a, n + 1);
      const js = c.stats().driverCallsOnJsThread;
      c.release(a);
      expect(c.stats().driverCallsOnJsThread).toBe(js);
      const until = Date.now() + 5000;
      while (c.stats().pagesShared > 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 2));
      expect(c.stats().pagesShared).toBe(0);
      expect(c.stats().driverCallsOnJsThread).toBe(js);
      expectData(c, system, 1, 0, n);
      identity(c);
    });

    it.skipIf(b.name !== 'host')(`a prefix share takes a released sharer of the same prefix as it is: no page mapped${b.name !== 'host' ? ' (skipped: holds a pretend host stream, which only the host backend has)' : ''}`, () => {
      const c = new KVCache({ ...b.options, prefetchTokens: per(make()) });
      open.push(c);
      const n = 2 * per(c) + 3;
      const system = c.reserve();
      c.grow(system, n);
      fill(c, system, 1, 0, n);
      const a = c.reserve({ prefix: { from: system, tokens: n } });
      c.grow(a, n + per(c)); // a page group of its own past the copied one
      const stream = 0x5eedn + 7n;
      holdHostStream(stream);
      c.release(a, streamOf(b, stream)); // its fence keeps the worker from dropping its mappings
      const maps = c.stats().driverCalls.map!.calls;
      const reused = c.stats().pagesReused;
      const b2 = c.reserve({ prefix: { from: system, tokens: n } });
      finishHostStream(stream);
      const s = c.stats();
      expect(b2.slot).toBe(a.slot);
      expect(s.driverCalls.map!.calls).toBe(maps); // the shared groups, the copied one and the next were all there
      expect(s.pagesReused - reused).toBe(4 * group);
      expect(s.driverCalls.copyDevice!.calls).toBe(2 * group); // the partial group copied again, once per share
      expectData(c, b2, 1, 0, n);
      c.grow(b2, n + per(c)); // its own group past the copy: no mapping either
      expect(c.stats().driverCalls.map!.calls).toBe(maps);
      identity(c);
    });

    it('concurrent forkAsync / reserveAsync with steps, releases and the worker dropping mappings: every byte stays where it was written', async () => {
      const c = new KVCache({ ...b.options, prefetchTokens: per(make()) });
      open.push(c);
      const n = per(c) + 2;
      let id = 1;
      const system = c.reserve();
      c.grow(system, n);
      fill(c, system, id, 0, n);
      // each live sequence: the ids of the data in [0, n) (the shared prefix, never written again) and past it
      const live: { seq: Sequence; prefix: number; own: number; tokens: number }[] = [];
      for (let round = 0; round < 12; round++) {
        const pending: Promise<unknown>[] = [];
        for (let k = 0; k < 2; k++) {
          const from = live.length > 0 && k === 1 ? live[round % live.length]! : { seq: system, prefix: 1, own: 0, tokens: n };
          const fork = (round + k) % 2 === 0;
          const made = fork ? c.forkAsync(from.seq) : c.reserveAsync({ prefix: { from: from.seq, tokens: n } });
          pending.push(
            made.then(
              (seq) => {
                const tokens = fork ? from.tokens : n;
                const entry = { seq, prefix: from.prefix, own: 0, tokens };
                // its own tokens past what it shares: written once it exists
                if (from.own !== 0 && fork) {
                  entry.own = ++id;
                  c.grow(seq, tokens + 1);
                  fill(c, seq, entry.own, tokens, 1);
                  entry.tokens = tokens + 1;
                } else {
                  entry.own = from.own;
                }
                live.push(entry);
              },
              (e: { code: string }) => expect(['ERR_NO_SLOT', 'ERR_OUT_OF_MEMORY', 'ERR_SEQUENCE_RELEASED']).toContain(e.code),
            ),
          );
        }
        // the serving loop goes on meanwhile
        for (const e of live) if (e.seq !== system && !e.seq.released && e.tokens < c.options.maxTokens) {
          try {
            c.step([e.seq], [e.tokens]);
          } catch (err) {
            expect((err as { code: string }).code).toBe('ERR_OUT_OF_MEMORY');
          }
        }
        if (live.length > 2) {
          const gone = live.splice(round % live.length, 1)[0]!;
          if (!gone.seq.released) c.release(gone.seq);
        }
        await Promise.all(pending);
        for (const e of live) {
          if (e.seq.released) continue;
          expectData(c, e.seq, e.prefix, 0, n);
        }
        // the worker may be mapping ahead right now: pages mapped, not yet a slot's
        const st = c.stats();
        expect(st.bytesUsed + st.bytesBeyondTokens + st.bytesInReleasedSlots).toBeLessThanOrEqual(st.bytesBacked + st.bytesSavedBySharing);
      }
      expectData(c, system, 1, 0, n);
    });

    const hostOnly = b.name !== 'host' ? ' (skipped: holds a pretend host stream, which only the host backend has)' : '';
    it.skipIf(b.name !== 'host')(`a released sharer keeps its mappings while its fence is pending, and drops them once it has passed${hostOnly}`, () => {
      const c = make();
      const n = per(c);
      const p = c.reserve();
      c.grow(p, n);
      fill(c, p, 1, 0, n);
      const child = c.fork(p, { tokens: n });
      const stream = 0x5eedn;
      holdHostStream(stream);
      c.release(child, streamOf(b, stream)); // GPU work may still read the child's addresses
      expect(c.stats().pagesShared).toBe(group);
      const q = c.reserve(); // never placed in the child's slot: its pages are the parent's too
      expect(q.slot).not.toBe(child.slot);
      finishHostStream(stream);
      c.reserve(); // a reserve drops what waited for its fence
      expect(c.stats().pagesShared).toBe(0);
      expectData(c, p, 1, 0, n);
      identity(c);
    });
  });
}
