// Moving KV out of device memory and back: swapOut/swapIn of one sequence
// through host memory, suspend/resume of the whole cache with its addresses
// kept. Run against every backend and layout present.
import { afterEach, describe, expect, it } from 'vitest';
import { KVCache, type Sequence, SwappedSequence } from '../lib/index.js';
import { deviceMemory, liveResources } from '../lib/testing.js';
import { deviceBackends as backends, groupPagesOf, label, pattern, stateOf, tokensPerGroupOf } from './backends.js';

const kinds = ['k', 'v'] as const;
const code = (c: string) => expect.objectContaining({ code: c });

for (const b of backends) {
  describe.skipIf(b.skip !== null)(`swap and suspend, ${label(b)}`, () => {
    const open: KVCache[] = [];
    const make = (extra: Record<string, unknown> = {}) => {
      const c = new KVCache({ ...b.options, prefetchTokens: 0, ...extra });
      open.push(c);
      return c;
    };
    afterEach(() => {
      for (const c of open.splice(0)) c.close();
    });
    const per = (c: KVCache) => tokensPerGroupOf(b, c.pageSize, c.tokenBytes);
    const group = groupPagesOf(b) * b.deviceCount; // a page group on every device: what stats() adds up
    const data = (c: KVCache, id: number, layer: number, kind: number, count: number) =>
      pattern(count * c.tokenBytes, id * 1_000_003 + layer * 7919 + kind * 104_729);
    const fill = (c: KVCache, seq: Sequence, id: number, count: number) => {
      for (let layer = 0; layer < c.options.layers; layer++)
        for (const [kind, name] of kinds.entries()) c.write(seq, { layer, kind: name, token: 0 }, data(c, id, layer, kind, count));
    };
    const expectData = (c: KVCache, seq: Sequence, id: number, count: number) => {
      for (let layer = 0; layer < c.options.layers; layer++)
        for (const [kind, name] of kinds.entries()) {
          const got = c.read(seq, { layer, kind: name, token: 0, count });
          expect(Buffer.from(got).equals(Buffer.from(data(c, id, layer, kind, count))), `layer ${layer} ${name}`).toBe(true);
        }
    };
    const identity = (c: KVCache) => {
      const s = c.stats();
      expect(s.bytesUsed + s.bytesBeyondTokens + s.bytesInReleasedSlots).toBe(s.bytesBacked + s.bytesSuspended + s.bytesSavedBySharing);
      expect(s.pagesMapped + s.pagesPooled + s.pagesStranded + s.pagesInFlight).toBe(s.pagesCreated);
    };
    /** stateOf, less the host blocks kept for reuse (a failed swap may have made some). */
    const stateOfKept = (c: KVCache) => {
      const withoutHeld = <T extends { host: Record<string, number> }>(st: T) => {
        const { bytesHeld: _held, bytesIdle: _idle, ...host } = st.host;
        return { ...st, host };
      };
      const st = stateOf(c) as { host: Record<string, number>; devices: { host: Record<string, number> }[] };
      return { ...withoutHeld(st), devices: st.devices.map(withoutHeld) };
    };
    /** Tokens of a sequence that fills about half the budget. */
    const half = (c: KVCache) => {
      const groups = Math.floor(c.stats().budgetBytes / c.pageSize / group / 2);
      return Math.min(c.options.maxTokens, groups * per(c) - 1);
    };

    describe('swapOut / swapIn', () => {
      it('swapOut copies every layer\'s K and V to host memory and releases the sequence; swapIn brings the same bytes back', async () => {
        const c = make();
        const n = half(c);
        const p = c.reserve();
        c.grow(p, n);
        fill(c, p, 1, n);
        const swapped = await c.swapOut(p);
        expect(swapped).toBeInstanceOf(SwappedSequence);
        expect(swapped.tokens).toBe(n);
        expect(swapped.bytes).toBe(n * c.bytesPerToken);
        expect(p.released).toBe(true);
        expect(() => c.grow(p, n + 1)).toThrow(code('ERR_SEQUENCE_RELEASED'));
        let s = c.stats();
        expect(s.activeSequences).toBe(0);
        expect(s.host).toMatchObject({ bytesSwapped: n * c.bytesPerToken, swappedSequences: 1, swapOuts: 1 });
        // one copy per tensor, split where a tensor's rows cross a 16 MiB host block
        const copies = s.driverCalls.copyToHost!.calls;
        expect(copies).toBeGreaterThanOrEqual(group);
        expect(copies).toBeLessThanOrEqual(group + Math.ceil(swapped.bytes / (16 << 20)));
        // over several devices a series per device, each with its share of the bytes
        const dev = b.deviceCount > 1 ? ',device="0"' : '';
        expect(c.metrics()).toContain(`vattention_swaps_total{direction="out"${dev}} 1`);
        expect(c.metrics()).toContain(`vattention_host_bytes{kind="swapped"${dev}} ${(n * c.bytesPerToken) / b.deviceCount}`);
        identity(c);
        const q = await c.swapIn(swapped);
        expect(q.tokens).toBe(n);
        expect(swapped.gone).toBe(true);
        expectData(c, q, 1, n);
        s = c.stats();
        expect(s.host).toMatchObject({ bytesSwapped: 0, swappedSequences: 0, swapIns: 1 });
        expect(s.host.bytesIdle).toBe(s.host.bytesHeld); // kept for the next swap
        identity(c);
        // a sequence of no tokens swaps too
        const e = c.reserve();
        const se = await c.swapOut(e);
        expect(se.tokens).toBe(0);
        expect((await c.swapIn(se)).tokens).toBe(0);
      });

      it('a swapped-out sequence gives its memory to others, and comes back in another slot when its own is taken', async () => {
        const c = make();
        const n = half(c);
        const a = c.reserve();
        c.grow(a, n);
        fill(c, a, 1, n);
        const b2 = c.reserve();
        c.grow(b2, n);
        fill(c, b2, 2, n);
        // memory is full: a third sequence of that length cannot grow
        const x = c.reserve();
        expect(() => c.grow(x, n)).toThrow(code('ERR_OUT_OF_MEMORY'));
        const swapped = await c.swapOut(a);
        c.grow(x, n); // takes a's pages
        fill(c, x, 3, n);
        c.release(b2);
        const back = await c.swapIn(swapped);
        expect(back.slot).not.toBe(x.slot);
        expectData(c, back, 1, n);
        expectData(c, x, 3, n);
        identity(c);
      });

      it('past hostMemoryBudget swapOut is ERR_OUT_OF_MEMORY and the sequence is as it was', async () => {
        const c = make({ hostMemoryBudget: 1024 });
        const n = 8;
        const p = c.reserve();
        c.grow(p, n);
        fill(c, p, 1, n);
        const before = stateOf(c);
        // over several devices the budget is split evenly and the error is the first device's, for its share
        await expect(c.swapOut(p)).rejects.toMatchObject({ code: 'ERR_OUT_OF_MEMORY', requestedBytes: (n * c.bytesPerToken) / b.deviceCount, availableBytes: 0 });
        expect(stateOf(c)).toEqual(before);
        expect(p.released).toBe(false);
        expectData(c, p, 1, n);
      });

      it('a failed copy or host allocation leaves the sequence (swapOut) or the swapped tokens (swapIn) as they were', async () => {
        const c = make();
        const n = per(c) + 1;
        const p = c.reserve();
        c.grow(p, n);
        fill(c, p, 1, n);
        const before = stateOfKept(c);
        c._injectFault('copyToHost', 0, false);
        await expect(c.swapOut(p)).rejects.toMatchObject({ code: b.name === 'cuda' ? 'ERR_CUDA' : 'ERR_OS' });
        expect(stateOfKept(c)).toEqual(before);
        c.trim(); // the block the failed swap made is kept for reuse: give it back, so the next one is made
        const trimmed = stateOf(c);
        c._injectFault('allocHost', 0, true);
        await expect(c.swapOut(p)).rejects.toMatchObject({ code: 'ERR_OUT_OF_MEMORY' });
        expect(stateOf(c)).toEqual(trimmed);
        expectData(c, p, 1, n);
        const swapped = await c.swapOut(p);
        const out = stateOfKept(c);
        // the last tensor's copy fails, on the last device (the others have copied theirs)
        c._injectFault('copyFromHost', groupPagesOf(b) - 1, false, 0, b.deviceCount - 1);
        await expect(c.swapIn(swapped)).rejects.toMatchObject({ code: b.name === 'cuda' ? 'ERR_CUDA' : 'ERR_OS' });
        const after = stateOfKept(c);
        // the slot tried (the released one holding the old pages) is released again
        for (const key of ['bytesBacked', 'pagesMapped', 'activeSequences', 'slots', 'host'] as const) expect(after[key]).toEqual(out[key]);
        expect(swapped.gone).toBe(false);
        const q = await c.swapIn(swapped);
        expectData(c, q, 1, n);
      });

      it('swapIn without memory or a free slot is refused, changes nothing, and works later', async () => {
        const c = make();
        const n = half(c);
        const a = c.reserve();
        c.grow(a, n);
        fill(c, a, 1, n);
        const swapped = await c.swapOut(a);
        const blockers = [c.reserve(), c.reserve()];
        c.grow(blockers[0]!, n);
        c.grow(blockers[1]!, n);
        const before = stateOf(c);
        await expect(c.swapIn(swapped)).rejects.toMatchObject({ code: 'ERR_OUT_OF_MEMORY' });
        expect({ ...stateOf(c), slots: undefined }).toEqual({ ...before, slots: undefined });
        while (c.stats().activeSequences < c.options.maxSequences) c.reserve();
        await expect(c.swapIn(swapped)).rejects.toMatchObject({ code: 'ERR_NO_SLOT' });
        c.release(blockers[0]!);
        const q = await c.swapIn(swapped);
        expectData(c, q, 1, n);
      });

      it('options and arguments of swap and suspend are checked before anything runs', async () => {
        expect(() => make({ hostMemoryBudget: 'lots' })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT', name: 'InvalidArgumentTypeError' }));
        expect(() => make({ hostMemoryBudget: -1 })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT', name: 'InvalidArgumentRangeError' }));
        expect(() => make({ hostMemoryBudget: 1 << 20, hostMemoryPrefill: 2 << 20 })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT', message: expect.stringContaining('hostMemoryPrefill') }));
        const c = make({ hostMemoryBudget: 64 << 20, hostMemoryPrefill: 32 << 20 });
        expect(c.stats().host).toMatchObject({ budgetBytes: 64 << 20, bytesHeld: 32 << 20, bytesIdle: 32 << 20 });
        await expect(c.suspend({ keep: 'disk' as 'host' })).rejects.toMatchObject({ code: 'ERR_INVALID_ARGUMENT', name: 'InvalidArgumentRangeError' });
        await expect(c.suspend({ keep: 1 as unknown as 'host' })).rejects.toMatchObject({ code: 'ERR_INVALID_ARGUMENT', name: 'InvalidArgumentTypeError' });
        await expect(c.suspend(7 as unknown as { keep: 'host' })).rejects.toMatchObject({ code: 'ERR_INVALID_ARGUMENT' });
        expect(c.suspended).toBe(false);
      });

      it('bad input is a typed error; a swapped sequence is swapped in once; discard() frees its host memory', async () => {
        const c = make();
        const p = c.reserve();
        c.grow(p, 3);
        await expect(c.swapIn({} as SwappedSequence)).rejects.toMatchObject({ code: 'ERR_INVALID_ARGUMENT', name: 'InvalidArgumentTypeError' });
        await expect(c.swapOut({} as Sequence)).rejects.toMatchObject({ code: 'ERR_INVALID_ARGUMENT' });
        await expect(c.swapOut(p, { stream: 3 as unknown as bigint })).rejects.toMatchObject({ code: 'ERR_INVALID_ARGUMENT' });
        const other = make();
        await expect(other.swapOut(p)).rejects.toMatchObject({ code: 'ERR_FOREIGN_SEQUENCE' });
        const swapped = await c.swapOut(p);
        await expect(other.swapIn(swapped)).rejects.toMatchObject({ code: 'ERR_FOREIGN_SEQUENCE' });
        await expect(c.swapOut(p)).rejects.toMatchObject({ code: 'ERR_SEQUENCE_RELEASED' });
        const [first, second] = await Promise.allSettled([c.swapIn(swapped), c.swapIn(swapped)]);
        expect(first.status).toBe('fulfilled');
        expect(second).toMatchObject({ status: 'rejected', reason: { code: 'ERR_INVALID_ARGUMENT' } });
        await expect(c.swapIn(swapped)).rejects.toMatchObject({ code: 'ERR_INVALID_ARGUMENT' });
        const q = (first as PromiseFulfilledResult<Sequence>).value;
        const again = await c.swapOut(q);
        expect(c.stats().host.bytesSwapped).toBe(3 * c.bytesPerToken);
        again.discard();
        again.discard();
        expect(again.gone).toBe(true);
        expect(c.stats().host).toMatchObject({ bytesSwapped: 0, swappedSequences: 0 });
        const held = c.stats().host.bytesHeld;
        expect(held).toBeGreaterThan(0);
        expect(c.trim()).toBeGreaterThanOrEqual(held); // idle host blocks go back too
        expect(c.stats().host.bytesHeld).toBe(0);
        await expect(c.swapIn(again)).rejects.toMatchObject({ code: 'ERR_INVALID_ARGUMENT' });
      });

      it('steps of other sequences go on while swaps run; close() while swaps run settles them and frees everything', async () => {
        const c = make({ prefetchTokens: 8 });
        const n = per(c);
        const seqs = [c.reserve(), c.reserve(), c.reserve()];
        for (const [i, s] of seqs.entries()) {
          c.grow(s, n);
          fill(c, s, i + 1, n);
        }
        const outs = Promise.all([c.swapOut(seqs[0]!), c.swapOut(seqs[1]!)]);
        for (let t = n + 1; t < n + 20; t++) c.step([seqs[2]!], t);
        const swapped = await outs;
        const ins = await Promise.all(swapped.map((s) => c.swapIn(s)));
        expectData(c, ins[0]!, 1, n);
        expectData(c, ins[1]!, 2, n);
        c.close(); // its worker creates pages on its own: the count below is d's alone
        const live = liveResources();
        const d = make();
        const x = d.reserve();
        d.grow(x, n);
        const pending = d.swapOut(x).then(
          (s) => s,
          (e: unknown) => e,
        );
        d.close();
        const settled = await pending;
        if (settled instanceof SwappedSequence) expect(settled.gone).toBe(true);
        else expect(settled).toMatchObject({ code: 'ERR_CLOSED' });
        expect(liveResources()).toEqual(live);
      });
    });

    describe('suspend / resume', () => {
      it("suspend({ keep: 'host' }) gives every page back and keeps the addresses; resume() restores the bytes, sharing included", async () => {
        const c = make();
        const n = per(c) + 3;
        const a = c.reserve();
        c.grow(a, n);
        fill(c, a, 1, n);
        const child = c.fork(a);
        const r = c.reserve();
        c.grow(r, 2);
        c.release(r); // a released slot's pages are not kept
        const addresses = [a.address(0, 'k'), child.address(c.options.layers - 1, 'v')];
        const tensor = c.tensor(0, 'k').address;
        const shared = c.stats().pagesShared;
        const gpuBefore = b.name === 'cuda' ? deviceMemory().freeBytes : 0;
        await c.suspend({ keep: 'host' });
        const s = c.stats();
        expect(c.suspended).toBe(true);
        expect(s).toMatchObject({ suspended: true, bytesBacked: 0, pagesCreated: 0, pagesMapped: 0, pagesPooled: 0 });
        // a's two page groups and the child's copied one; the group they share counts once
        expect(s.bytesSuspended).toBe(3 * group * c.pageSize);
        expect(s.host.bytesSuspendCopy).toBe(s.bytesSuspended);
        expect(s.host.bytesHeld).toBeGreaterThanOrEqual(s.bytesSuspended);
        identity(c);
        if (b.name === 'cuda') expect(deviceMemory().freeBytes).toBeGreaterThanOrEqual(gpuBefore + s.bytesSuspended);
        expect([a.address(0, 'k'), child.address(c.options.layers - 1, 'v')]).toEqual(addresses);
        expect(c.tensor(0, 'k').address).toBe(tensor);
        await c.resume();
        expect(c.suspended).toBe(false);
        const after = c.stats();
        expect(after).toMatchObject({ suspended: false, bytesSuspended: 0, pagesShared: shared });
        expect(after.host.bytesSuspendCopy).toBe(0);
        expect(after.host.bytesIdle).toBe(after.host.bytesHeld);
        expectData(c, a, 1, n);
        expectData(c, child, 1, n);
        identity(c);
        // both grow again
        c.grow(a, n + per(c));
        c.grow(child, n + 1);
      });

      it("while suspended, what needs memory is ERR_SUSPENDED and changes nothing; reserve, release, stats and close work", async () => {
        const c = make();
        const n = per(c);
        const a = c.reserve();
        c.grow(a, n);
        fill(c, a, 1, n);
        const spare = c.reserve();
        await c.suspend();
        const before = stateOf(c);
        expect(() => c.grow(a, n + 1)).toThrow(code('ERR_SUSPENDED'));
        expect(() => c.step([a], n)).toThrow(code('ERR_SUSPENDED'));
        expect(() => c.write(a, { layer: 0, kind: 'k', token: 0 }, new Uint8Array(c.tokenBytes))).toThrow(code('ERR_SUSPENDED'));
        expect(() => c.read(a, { layer: 0, kind: 'k', token: 0, count: 1 })).toThrow(code('ERR_SUSPENDED'));
        expect(() => c.fork(a)).toThrow(code('ERR_SUSPENDED'));
        await expect(c.growAsync(a, n + 1)).rejects.toMatchObject({ code: 'ERR_SUSPENDED', name: 'SuspendedError' });
        await expect(c.swapOut(a)).rejects.toMatchObject({ code: 'ERR_SUSPENDED' });
        await expect(c.suspend()).rejects.toMatchObject({ code: 'ERR_SUSPENDED' });
        expect(c.reclaim()).toBe(0);
        expect(c.obtainableBytes()).toBe(0);
        expect(stateOf(c)).toEqual(before);
        // releasing a sequence while suspended drops its pages: resume() does not back them
        expect(c.stats().bytesSuspended).toBe(group * c.pageSize);
        c.release(spare);
        const q = c.reserve();
        expect(q.tokens).toBe(0);
        c.release(a);
        expect(c.stats().bytesSuspended).toBe(0);
        await c.resume();
        await c.resume(); // not suspended: nothing to do
        expect(c.stats().pagesMapped).toBe(0);
      });

      // suspend() and resume() hold the cache's lock only between pages: with
      // one page's driver call slowed, the JS thread's stats(), reserve() and
      // release() run in the middle of the move (before, they waited for all
      // of it: a stats() scrape stalled the event loop for the whole suspend).
      for (const keep of ['none', 'host'] as const)
        it(`stats(), reserve() and release() run while suspend({ keep: '${keep}' }) and resume() move pages; a release meanwhile is settled when the move ends`, async () => {
          const c = make({ hostMemoryBudget: 2 ** 30 }); // room for every page: 2 MiB pages on the GPU fill far more than the host backend's
          const n = half(c);
          const [a, gone] = [c.reserve(), c.reserve()];
          c.grow(a, n);
          c.grow(gone, n);
          fill(c, a, 1, n);
          const total = c.stats().pagesMapped;
          c._injectFault('unmap', 1, 'delay', 200, 0); // device 0's second page is slow to go
          let done = false;
          const suspending = c.suspend({ keep }).finally(() => (done = true));
          const seen = new Set<number>();
          let released = false, reserved: Sequence | undefined;
          for (; !done; await new Promise((r) => setImmediate(r))) {
            const s = c.stats();
            identity(c);
            seen.add(s.pagesSuspended);
            if (s.pagesSuspended > 0 && !released) {
              c.release(gone); // mid-move: its pages stay until the move ends
              reserved = c.reserve();
              released = true;
            }
          }
          await suspending;
          expect(released).toBe(true);
          expect([...seen].some((p) => p > 0 && p < total)).toBe(true); // a snapshot in the middle of the move
          const s = c.stats();
          expect(s.pagesSuspended).toBe(total / 2); // the released sequence's pages went when the move ended
          expect(s.activeSequences).toBe(2);
          identity(c);
          c._injectFault('map', 1, 'delay', 200, 0);
          done = false;
          const resuming = c.resume().finally(() => (done = true));
          const during = new Set<number>();
          for (; !done; await new Promise((r) => setImmediate(r))) {
            identity(c);
            during.add(c.stats().pagesMapped);
          }
          await resuming;
          expect([...during].some((p) => p > 0 && p < total / 2)).toBe(true);
          expect(c.stats().pagesMapped).toBe(total / 2);
          if (keep === 'host') expectData(c, a, 1, n);
          c.release(reserved!);
          identity(c);
        });

      it('suspend() of a cache whose memory sits in released slots drops their pages with the lock released: stats() answers meanwhile', async () => {
        const c = make();
        const n = half(c);
        for (const id of [1, 2]) {
          const s = c.reserve();
          c.grow(s, n);
          c.release(s); // deferred reclamation: the slot keeps its pages
        }
        const total = c.stats().pagesMapped;
        expect(total).toBeGreaterThan(2);
        c._injectFault('unmap', 1, 'delay', 200, 0);
        let done = false;
        const suspending = c.suspend().finally(() => (done = true));
        let retiring = 0;
        for (; !done; await new Promise((r) => setImmediate(r))) {
          identity(c);
          const s = c.stats();
          // pages that left their slot and are still being unmapped: counted mapped, listed by no slot
          if (s.slots.reduce((sum, slot) => sum + slot.mappedPages, 0) < s.pagesMapped) retiring++;
        }
        await suspending;
        expect(retiring).toBeGreaterThan(0); // snapshots taken while the released pages went
        expect(c.stats()).toMatchObject({ pagesMapped: 0, pagesSuspended: 0, pagesCreated: 0, pagesPooled: 0 });
        await c.resume();
        identity(c);
      });

      it('close() while suspend() moves pages: the suspend stops at the next page and close frees everything', async () => {
        const c = make({ hostMemoryBudget: 64 * 2 ** 20 });
        const a = c.reserve();
        c.grow(a, half(c));
        c._injectFault('unmap', 1, 'delay', 200, 0);
        const suspending = c.suspend({ keep: 'none' }).then(() => 'done', (e) => e.code);
        while (c.stats().pagesSuspended === 0) await new Promise((r) => setImmediate(r));
        c.close();
        expect(['done', 'ERR_CLOSED']).toContain(await suspending);
        expect(c.closed).toBe(true);
        expect(liveResources().mappings).toBe(0);
      });

      it("suspend({ keep: 'none' }): after resume the same addresses are backed again, contents undefined", async () => {
        const c = make();
        const n = per(c) + 1;
        const a = c.reserve();
        c.grow(a, n);
        fill(c, a, 1, n);
        const address = a.address(1, 'v');
        await c.suspend({ keep: 'none' });
        expect(c.stats().host.bytesHeld).toBe(0);
        await c.resume();
        expect(a.address(1, 'v')).toBe(address);
        expect(a.tokens).toBe(n);
        fill(c, a, 2, n);
        expectData(c, a, 2, n);
        identity(c);
      });

      /** A cache holding one sequence of two page groups and a token, filled, then suspended with keep: 'host'. */
      const suspendedWithData = async () => {
        const c = make();
        const n = 2 * per(c) + 1;
        const a = c.reserve();
        c.grow(a, n);
        fill(c, a, 1, n);
        await c.suspend({ keep: 'host' });
        return { c, a, n };
      };

      it('a resume that runs out of memory stays suspended and can be retried; a suspend past hostMemoryBudget is refused', async () => {
        const { c, a, n } = await suspendedWithData();
        const suspended = stateOf(c);
        c._injectFault('createPage', group + 1, true); // a few pages in
        await expect(c.resume()).rejects.toMatchObject({ code: 'ERR_OUT_OF_MEMORY' });
        expect(stateOf(c)).toEqual(suspended);
        await c.resume();
        expectData(c, a, 1, n);
        const small = make({ hostMemoryBudget: c.pageSize });
        const x = small.reserve();
        small.grow(x, n);
        fill(small, x, 4, n);
        await expect(small.suspend({ keep: 'host' })).rejects.toMatchObject({ code: 'ERR_OUT_OF_MEMORY' });
        expect(small.suspended).toBe(false);
        expectData(small, x, 4, n);
        small.grow(x, n + per(c));
      });

      it('a resume whose copy fails and whose undo cannot suspend a page again: the next resume restores that page too', async () => {
        const { c, a, n } = await suspendedWithData();
        c._injectFault('copyFromHost', 0, false); // the bytes' way back fails...
        c._injectFault('unmap', 0, false); // ...and the undo's first unmap: that page stays backed, its bytes not restored
        await expect(c.resume()).rejects.toMatchObject({ code: b.name === 'cuda' ? 'ERR_CUDA' : 'ERR_OS' });
        expect(c.suspended).toBe(true);
        identity(c);
        await c.resume();
        expectData(c, a, 1, n);
        identity(c);
      });

      it('close() while suspended or with sequences swapped out frees everything', async () => {
        const live = liveResources();
        const c = make();
        const a = c.reserve();
        c.grow(a, per(c));
        const x = c.reserve();
        c.grow(x, 2);
        const swapped = await c.swapOut(x);
        await c.suspend({ keep: 'host' });
        c.close();
        expect(swapped.gone).toBe(true);
        expect(() => swapped.discard()).not.toThrow();
        await expect(c.resume()).rejects.toMatchObject({ code: 'ERR_CLOSED' });
        const now = liveResources();
        expect(now.pages).toBe(live.pages);
        expect(now.mappings).toBe(live.mappings);
      });
    });
  });
}
