// One cache over several devices (tensor parallelism): every device holds
// kvHeads / devices of each layer's heads; every decision is made once and
// applied to all, all or nothing across devices. On the host backend the
// devices are logical (a range, pool and worker each), so every behaviour
// runs on CI; the cuda cases need two VMM-capable GPUs.
import { afterEach, describe, expect, it } from 'vitest';
import { driverInfo, KVCache, type KVCacheOptions, type Sequence } from '../lib/index.js';
import { deviceMemory, liveResources, rowValue, synchronizeStream, writeRowsU32 } from '../lib/testing.js';
import { backends, cudaSkip, pattern, stateOf } from './backends.js';

function twoGpuSkipReason(): string | null {
  if (cudaSkip) return cudaSkip;
  const info = driverInfo();
  const vmm = info.devices.filter((d) => d.vmmSupported);
  if (vmm.length < 2) return `${vmm.length} VMM-capable CUDA device(s): these tests need 2`;
  return null;
}

const cases = backends
  .filter((b) => b.layoutName !== 'layer-groups:2')
  .map((b) => ({
    ...b,
    skip: b.name === 'cuda' ? twoGpuSkipReason() : b.skip,
    // cuda: room for 4 page groups of the per-layer layout (1024 tokens each with 4 heads of 256 a device)
    options: { ...b.options, devices: [0, 1], ...(b.name === 'cuda' ? { maxTokens: 5200 } : {}) } as KVCacheOptions,
  }));

const labelOf = (b: (typeof cases)[number]) =>
  `${b.name} backend over 2 devices, ${b.layoutName} layout${b.skip ? ` (skipped: ${b.skip})` : ''}`;

for (const b of cases) {
  describe.skipIf(b.skip !== null)(`several devices, ${labelOf(b)}`, () => {
    const open: KVCache[] = [];
    afterEach(() => {
      for (const c of open.splice(0)) c.close();
      expect(liveResources()).toEqual({ ranges: 0, pages: 0, mappings: 0, fences: 0, contexts: 0 });
    });
    const make = (extra: Partial<KVCacheOptions> = {}) => {
      const c = new KVCache({ ...b.options, prefetchTokens: 0, ...extra });
      open.push(c);
      return c;
    };
    /** Tokens one page group holds (the same on every device). */
    const perGroup = (c: KVCache) => c.layout.tokensPerPageGroup;
    /** Each device's slots: what must be identical everywhere. */
    const slotsOf = (c: KVCache) => c.stats().devices.map((d) => d.slots.map((s) => ({ active: s.active, tokens: s.tokens })));
    const mappedOf = (c: KVCache) =>
      c.stats().devices.map((d) => ({ bytesBacked: d.bytesBacked, bytesUsed: d.bytesUsed, slots: d.slots, activeSequences: d.activeSequences }));

    it('splits the heads: each device has its own range, kvHeads / devices heads a token, and the totals add up', () => {
      const c = make();
      expect(c.devices).toEqual([0, 1]);
      const t0 = c.tensor(0, 'k', { device: 0 });
      const t1 = c.tensor(0, 'k', { device: 1 });
      expect(t0.shape[2]).toBe(b.options.kvHeads / 2);
      expect(t1.shape).toEqual(t0.shape);
      expect(t1.address).not.toBe(t0.address);
      expect(c.tensor(0, 'k').address).toBe(t0.address); // the first device by default
      expect(c.tokenBytes).toBe((b.options.kvHeads / 2) * b.options.headDim * 2);
      expect(c.bytesPerToken).toBe(2 * b.options.layers * b.options.kvHeads * b.options.headDim * 2);
      const s = c.reserve();
      c.grow(s, perGroup(c) + 1);
      const st = c.stats();
      expect(st.devices.map((d) => d.device)).toEqual([0, 1]);
      expect(st.bytesBacked).toBe(st.devices[0]!.bytesBacked + st.devices[1]!.bytesBacked);
      expect(st.bytesUsed).toBe((perGroup(c) + 1) * c.bytesPerToken);
      expect(st.activeSequences).toBe(1);
      expect(st.budgetBytes).toBe(st.devices[0]!.budgetBytes * 2);
      expect(s.address(1, 'v', { device: 1 })).toBe(c.tensor(1, 'v', { device: 1 }).address + BigInt(s.slot) * BigInt(c.tensor(1, 'v').strideBytes[0]));
    });

    it('makes the same decisions on every device: slots, tokens, releases, reuse', () => {
      const c = make({ prefetchTokens: 8 });
      const live: Sequence[] = [];
      let x = 12345;
      const rnd = (n: number) => {
        x = (Math.imul(x, 1103515245) + 12345) >>> 0;
        return x % n;
      };
      for (let i = 0; i < 200; i++) {
        const op = rnd(4);
        try {
          if (op === 0 && live.length < b.options.maxSequences) live.push(c.reserve({ expectedTokens: rnd(50) }));
          else if (op === 1 && live.length) {
            const s = live[rnd(live.length)]!;
            c.grow(s, Math.min(b.options.maxTokens, s.tokens + rnd(3 * perGroup(c))));
          } else if (op === 2 && live.length) c.step(live, live.map((s) => Math.min(b.options.maxTokens, s.tokens + 1)));
          else if (op === 3 && live.length) c.release(live.splice(rnd(live.length), 1)[0]!);
        } catch (e) {
          expect((e as { code: string }).code).toBe('ERR_OUT_OF_MEMORY'); // a full budget is the only expected refusal
        }
        const [d0, d1] = slotsOf(c);
        expect(d1).toEqual(d0);
        for (const d of c.stats().devices) for (const s of d.slots) expect(s.backedTokens).toBeGreaterThanOrEqual(s.tokens);
      }
    });

    it('keeps each shard its own bytes: write and read per device', () => {
      const c = make();
      const s = c.reserve();
      c.grow(s, 2 * perGroup(c) + 3);
      const n = 2 * perGroup(c) + 3;
      const a = pattern(n * c.tokenBytes, 1);
      const z = pattern(n * c.tokenBytes, 2);
      c.write(s, { layer: 1, kind: 'v', token: 0 }, a);
      c.write(s, { layer: 1, kind: 'v', token: 0, device: 1 }, z);
      expect(Buffer.from(c.read(s, { layer: 1, kind: 'v', token: 0, count: n })).equals(Buffer.from(a))).toBe(true);
      expect(Buffer.from(c.read(s, { layer: 1, kind: 'v', token: 0, count: n, device: 1 })).equals(Buffer.from(z))).toBe(true);
    });

    it('refuses bad multi-device input with ERR_INVALID_ARGUMENT and changes nothing', () => {
      const bad = (o: Partial<KVCacheOptions> | Record<string, unknown>, match: RegExp) =>
        expect(() => new KVCache({ ...b.options, ...o } as KVCacheOptions)).toThrow(
          expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT', message: expect.stringMatching(match) }),
        );
      bad({ kvHeads: 3 }, /divide evenly over the 2 devices/);
      bad({ devices: [0, 0] }, /twice/);
      bad({ devices: [] }, /1 to 16/);
      bad({ devices: 1 }, /array/);
      bad({ devices: [0, 1], device: 1 }, /conflicts/);
      bad({ memoryBudget: [1 << 20] }, /one entry per device/);
      bad({ memoryBudget: [1 << 20, -1] }, /memoryBudget\[1\]/);
      const c = make();
      const s = c.reserve();
      c.grow(s, 3);
      const before = stateOf(c);
      const code = expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' });
      expect(() => c.release(s, { stream: 0n })).toThrow(code);
      expect(() => c.release(s, { streams: [0n] })).toThrow(code);
      expect(() => c.release(s, { streams: [0n, 'x' as unknown as bigint] })).toThrow(code);
      expect(() => c.release(s, { stream: 0n, streams: [0n, 0n] })).toThrow(code);
      expect(() => c.tensor(0, 'k', { device: 2 })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT', message: expect.stringMatching(/not one of the cache's devices/) }));
      expect(() => c.read(s, { layer: 0, kind: 'k', token: 0, count: 1, device: 7 })).toThrow(code);
      expect(() => c.write(s, { layer: 0, kind: 'k', token: 0, device: -1 }, new Uint8Array(c.tokenBytes))).toThrow(code);
      expect(() => c.fork(s, { stream: 0n })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT', message: expect.stringMatching(/pass streams/) }));
      expect(() => c.reserve({ prefix: { from: s, tokens: 1 }, streams: [0n] })).toThrow(code);
      expect(s.released).toBe(false);
      expect(stateOf(c)).toEqual(before);
    });

    it('all or nothing across devices: a budget only device 1 lacks refuses the growth there and changes nothing anywhere', () => {
      const group = (pages: number) => pages * (b.name === 'host' ? 4096 : 2 << 20);
      // device 0 holds a whole sequence, device 1 two page groups of it
      const c = make({ memoryBudget: [Number(b.options.memoryBudget), group(2 * (b.layoutName === 'per-layer' ? 2 * b.options.layers : 2))] });
      const s = c.reserve();
      c.grow(s, 1);
      const before = stateOf(c);
      let error: any;
      try {
        c.grow(s, 2 * perGroup(c) + 1); // three page groups
      } catch (e) {
        error = e;
      }
      expect(error?.code).toBe('ERR_OUT_OF_MEMORY');
      expect(error.device).toBe(1);
      expect(error.message).toMatch(/^device 1: /);
      expect(stateOf(c)).toEqual(before); // device 0 did not even start: nothing created, nothing mapped
      c.grow(s, perGroup(c) + 1); // what both can back still works
      expect(slotsOf(c)[1]).toEqual(slotsOf(c)[0]);
    });

    it('a two-device step that device 1 cannot back refuses before any device makes a driver call, and changes nothing', () => {
      const group = (pages: number) => pages * (b.name === 'host' ? 4096 : 2 << 20);
      const c = make({ memoryBudget: [Number(b.options.memoryBudget), group(b.layoutName === 'per-layer' ? 2 * b.options.layers : 2)] });
      const s = c.reserve();
      c.step([s], [1]); // one page group: all device 1 can back
      const before = stateOf(c);
      const calls = () =>
        c.stats().devices.map((d) => Object.values(d.driverCalls).reduce((sum, op) => sum + op.calls, 0));
      const callsBefore = calls();
      expect(() => c.step([s], [perGroup(c) + 1])).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_MEMORY', device: 1 }));
      expect(calls()).toEqual(callsBefore); // decided before touching device 0
      expect(stateOf(c)).toEqual(before);
      expect(s.tokens).toBe(1);
    });

    for (const op of ['createPage', 'map', 'setAccess'] as const) {
      it(`all or nothing across devices: ${op} failing on device 1 only undoes device 0 (grow, step, growAsync)`, async () => {
        const c = make();
        const a = c.reserve();
        const z = c.reserve();
        c.grow(a, 2);
        c.grow(z, 3);
        const data = pattern(2 * c.tokenBytes, 9);
        c.write(a, { layer: 0, kind: 'k', token: 0 }, data);
        const before = mappedOf(c);
        const fail = async (run: () => unknown) => {
          c._injectFault(op, 0, false, 0, 1);
          let error: any;
          try {
            await run();
          } catch (e) {
            error = e;
          }
          expect(error?.code).toBe(b.name === 'cuda' ? 'ERR_CUDA' : 'ERR_OS');
          expect(error.device).toBe(1);
          expect(mappedOf(c)).toEqual(before); // device 0's new pages went back to its pool
          expect(Buffer.from(c.read(a, { layer: 0, kind: 'k', token: 0, count: 2 })).equals(Buffer.from(data))).toBe(true);
        };
        await fail(() => c.grow(a, 3 * perGroup(c)));
        await fail(() => c.step([a, z], [2 * perGroup(c), 3 * perGroup(c)]));
        await fail(() => c.growAsync(a, 3 * perGroup(c)));
        await fail(() => c.stepAsync([a, z], [2 * perGroup(c), 3 * perGroup(c)]));
        // and everything works afterwards, on both devices
        c.step([a, z], [2 * perGroup(c), 3 * perGroup(c)]);
        expect(slotsOf(c)[1]).toEqual(slotsOf(c)[0]);
        expect(c.stats().devices.every((d) => d.slots[a.slot]!.backedTokens >= 2 * perGroup(c))).toBe(true);
      });
    }

    it('a step whose batch is backed on device 0 but not on device 1 maps device 1 alone, or undoes device 0 when it cannot', () => {
      const c = make();
      const s = c.reserve();
      c.grow(s, 1);
      // Device 0 maps ahead of device 1: a growth that only device 0 commits (device 1 fails).
      c._injectFault('map', 0, false, 0, 1);
      expect(() => c.grow(s, perGroup(c) + 1)).toThrow();
      const st = c.stats();
      expect(st.devices[0]!.slots[s.slot]!.backedTokens).toBe(st.devices[1]!.slots[s.slot]!.backedTokens);
      // the undo unmapped device 0's group: step into it needs both devices again
      c._injectFault('map', 0, false, 0, 1);
      expect(() => c.step([s], [perGroup(c) + 1])).toThrow(expect.objectContaining({ device: 1 }));
      expect(s.tokens).toBe(1);
      expect(slotsOf(c)[0]![s.slot]!.tokens).toBe(1);
      expect(slotsOf(c)[1]![s.slot]!.tokens).toBe(1);
      c.step([s], [perGroup(c) + 1]);
      expect(s.tokens).toBe(perGroup(c) + 1);
    });

    it('fork and prefix share on every device, into the same slot, each shard its own bytes', async () => {
      const c = make();
      const a = c.reserve();
      const n = 2 * perGroup(c) + 3;
      c.grow(a, n);
      const pa = pattern(n * c.tokenBytes, 21);
      const pz = pattern(n * c.tokenBytes, 22);
      c.write(a, { layer: 2, kind: 'k', token: 0 }, pa);
      c.write(a, { layer: 2, kind: 'k', token: 0, device: 1 }, pz);
      const f = c.fork(a, { streams: [0n, 0n] });
      const p = await c.reserveAsync({ prefix: { from: a, tokens: perGroup(c) + 1 } });
      c.release(a);
      const g = await c.forkAsync(f);
      for (const [seq, count] of [[f, n], [g, n], [p, perGroup(c) + 1]] as const) {
        expect(Buffer.from(c.read(seq, { layer: 2, kind: 'k', token: 0, count })).equals(Buffer.from(pa.subarray(0, count * c.tokenBytes)))).toBe(true);
        expect(Buffer.from(c.read(seq, { layer: 2, kind: 'k', token: 0, count, device: 1 })).equals(Buffer.from(pz.subarray(0, count * c.tokenBytes)))).toBe(true);
      }
      const [d0, d1] = slotsOf(c);
      expect(d1).toEqual(d0);
      expect(c.stats().devices.every((d) => d.pagesShared > 0)).toBe(true);
      for (const seq of [f, g, p]) c.release(seq);
      // a prefix from a released sequence (no sharer of its pages) works while its slot holds its pages
      const b = c.reserve();
      c.grow(b, perGroup(c) + 2);
      c.write(b, { layer: 0, kind: 'v', token: 0, device: 1 }, pz.subarray(0, (perGroup(c) + 2) * c.tokenBytes));
      c.release(b);
      const q = c.reserve({ prefix: { from: b, tokens: perGroup(c) } });
      expect(slotsOf(c)[1]).toEqual(slotsOf(c)[0]);
      expect(Buffer.from(c.read(q, { layer: 0, kind: 'v', token: 0, count: perGroup(c), device: 1 })).equals(Buffer.from(pz.subarray(0, perGroup(c) * c.tokenBytes)))).toBe(true);
    });

    for (const op of ['map', 'copyDevice'] as const) {
      it(`a fork that fails on device 1 (${op}) is undone on device 0 too, and the next one works`, () => {
        const c = make();
        const a = c.reserve();
        const n = perGroup(c) + 3; // a whole group shared, a partial one copied
        c.grow(a, n);
        const before = mappedOf(c);
        c._injectFault(op, 0, false, 0, 1);
        let error: any;
        try {
          c.fork(a);
        } catch (e) {
          error = e;
        }
        expect(error?.device).toBe(1);
        expect(c.stats().activeSequences).toBe(1);
        expect(slotsOf(c)[1]).toEqual(slotsOf(c)[0]);
        const after = mappedOf(c);
        expect(after.map((d) => d.bytesUsed)).toEqual(before.map((d) => d.bytesUsed));
        const f = c.fork(a);
        expect(f.tokens).toBe(n);
        expect(slotsOf(c)[1]).toEqual(slotsOf(c)[0]);
        c.release(f);
        c.release(a);
        expect(c.stats().activeSequences).toBe(0);
      });
    }

    it('release fences every device before releasing any: a fence that fails leaves the sequence on both', () => {
      const c = make();
      const s = c.reserve();
      c.grow(s, 3);
      const before = stateOf(c);
      c._injectFault('fence', 0, false, 0, 1);
      expect(() => c.release(s, { streams: [0n, 0n] })).toThrow(expect.objectContaining({ device: 1 }));
      expect(s.released).toBe(false);
      expect(slotsOf(c)[0]![s.slot]!.active).toBe(true);
      expect(slotsOf(c)[1]![s.slot]!.active).toBe(true);
      expect(s.tokens).toBe(3);
      c.release(s, { streams: [0n, undefined] });
      expect(slotsOf(c).every((d) => !d[s.slot]!.active)).toBe(true);
      expect(before.activeSequences).toBe(1);
      expect(c.stats().activeSequences).toBe(0);
    });

    it('steady decode with prefetch makes no driver call on the JS thread on any device', async () => {
      const c = make({ prefetchTokens: 16 });
      const seqs = [c.reserve(), c.reserve()];
      // start 20 tokens before a page-group boundary, so the measured steps cross one
      for (const s of seqs) c.grow(s, Math.max(1, perGroup(c) - 20));
      const stepOnce = async (pause: number) => {
        c.step(seqs, seqs.map((s) => s.tokens + 1));
        await new Promise((r) => setTimeout(r, pause)); // the "GPU" computes; both workers map meanwhile
      };
      for (let t = 0; t < 5; t++) await stepOnce(20);
      const before = c.stats().devices.map((d) => d.driverCallsOnJsThread);
      for (let t = 0; t < 40; t++) await stepOnce(5);
      expect(c.stats().devices.map((d) => d.driverCallsOnJsThread)).toEqual(before);
      expect(c.stats().devices.every((d) => d.prefetch.pagesAhead > 0)).toBe(true);
    });

    it('concurrent growAsync, stepAsync and releases with both workers on leave the devices identical', async () => {
      const c = make({ prefetchTokens: 8 });
      let x = 777;
      const rnd = (n: number) => {
        x = (Math.imul(x, 1103515245) + 12345) >>> 0;
        return x % n;
      };
      const outcomes = new Set<string>();
      const note = (p: Promise<unknown>) =>
        p.then(
          () => outcomes.add('ok'),
          (e: { code: string }) => outcomes.add(e.code),
        );
      for (let round = 0; round < 30; round++) {
        const seqs = Array.from({ length: b.options.maxSequences - 1 }, () => c.reserve());
        const pending: Promise<unknown>[] = [];
        for (const s of seqs.slice(0, 2)) pending.push(note(c.growAsync(s, 1 + rnd(3 * perGroup(c)))));
        pending.push(note(c.stepAsync(seqs.slice(2), seqs.slice(2).map(() => 1 + rnd(2 * perGroup(c))))));
        // a fork of a sequence being grown: it takes the tokens it had when called, on both devices
        pending.push(note(c.forkAsync(seqs[0]!).then((f) => c.release(f))));
        await Promise.all(pending);
        const [d0, d1] = slotsOf(c);
        expect(d1).toEqual(d0);
        for (const s of seqs) c.release(s);
      }
      // out of memory or a sequence grown past another's request are the only refusals
      for (const o of outcomes) expect(['ok', 'ERR_OUT_OF_MEMORY']).toContain(o);
      expect(c.stats().activeSequences).toBe(0);
    });

    it('a growAsync and a step of the same sequence at once, either failing on device 1, leave the devices identical', async () => {
      const c = make({ prefetchTokens: 0 });
      let x = 4242;
      const rnd = (n: number) => {
        x = (Math.imul(x, 1103515245) + 12345) >>> 0;
        return x % n;
      };
      const outcomes = new Set<string>();
      const note = (p: Promise<unknown>) =>
        p.then(
          () => outcomes.add('ok'),
          (e: { code: string }) => outcomes.add(e.code),
        );
      for (let round = 0; round < 40; round++) {
        const [a, z] = [c.reserve(), c.reserve()];
        c.grow(a, 1 + rnd(perGroup(c)));
        // device 1's next mapping fails after a delay: whichever growth meets it undoes device 0 meanwhile
        c._injectFault('map', rnd(2), false, 1 + rnd(3), 1);
        const upTo = (n: number) => Math.min(c.options.maxTokens, n);
        const pending = [
          note(c.growAsync(a, upTo(a.tokens + 1 + rnd(3 * perGroup(c))))),
          note(c.stepAsync([a, z], [upTo(a.tokens + 1 + rnd(2 * perGroup(c))), 1 + rnd(perGroup(c))])),
          note(c.growAsync(a, upTo(a.tokens + 1 + rnd(2 * perGroup(c))))),
        ];
        await Promise.all(pending);
        const [d0, d1] = slotsOf(c);
        expect(d1).toEqual(d0);
        c.release(a);
        c.release(z);
      }
      // an injected failure is the backend's own error: ERR_OS on the host, ERR_CUDA on a GPU
      for (const o of outcomes) expect(['ok', 'ERR_OS', 'ERR_CUDA', 'ERR_OUT_OF_MEMORY']).toContain(o);
    });

    it('close while a growth is pending on device 1 settles it and frees both devices', async () => {
      const c = make();
      const s = c.reserve();
      c._injectFault('map', 0, 'delay', 200, 1);
      const pending = c.growAsync(s, 3 * perGroup(c)).then(
        () => 'grown',
        (e) => (e as { code: string }).code,
      );
      await new Promise((r) => setTimeout(r, 20));
      c.close();
      expect(['grown', 'ERR_CLOSED', 'ERR_ABORTED']).toContain(await pending);
      expect(() => c.stats()).toThrow(expect.objectContaining({ code: 'ERR_CLOSED' }));
    });

    it('suspend and resume act on every device and keep each shard its bytes', async () => {
      const c = make({ hostMemoryBudget: 256 << 20 });
      const s = c.reserve();
      const n = perGroup(c) + 2;
      c.grow(s, n);
      const a = pattern(n * c.tokenBytes, 4);
      const z = pattern(n * c.tokenBytes, 5);
      c.write(s, { layer: 0, kind: 'k', token: 0 }, a);
      c.write(s, { layer: 0, kind: 'k', token: 0, device: 1 }, z);
      await c.suspend({ keep: 'host' });
      expect(c.suspended).toBe(true);
      expect(c.stats().devices.every((d) => d.suspended && d.bytesBacked === 0)).toBe(true);
      expect(() => c.grow(s, n + 1)).toThrow(expect.objectContaining({ code: 'ERR_SUSPENDED' }));
      await c.resume();
      expect(c.suspended).toBe(false);
      expect(Buffer.from(c.read(s, { layer: 0, kind: 'k', token: 0, count: n })).equals(Buffer.from(a))).toBe(true);
      expect(Buffer.from(c.read(s, { layer: 0, kind: 'k', token: 0, count: n, device: 1 })).equals(Buffer.from(z))).toBe(true);
    });

    it('swapOut and swapIn move every shard and bring each back byte for byte, into the same slot everywhere', async () => {
      const c = make({ hostMemoryBudget: 256 << 20 });
      const s = c.reserve();
      const n = 2 * perGroup(c) + 1;
      c.grow(s, n);
      const a = pattern(n * c.tokenBytes, 31);
      const z = pattern(n * c.tokenBytes, 32);
      c.write(s, { layer: 3, kind: 'v', token: 0 }, a);
      c.write(s, { layer: 3, kind: 'v', token: 0, device: 1 }, z);
      const swapped = await c.swapOut(s, { streams: [0n, undefined] });
      expect(s.released).toBe(true);
      expect(c.stats().activeSequences).toBe(0);
      expect(swapped.bytes).toBe(n * c.bytesPerToken);
      expect(c.stats().host.bytesSwapped).toBeGreaterThanOrEqual(n * c.bytesPerToken);
      const t = await c.swapIn(swapped);
      expect(t.tokens).toBe(n);
      expect(slotsOf(c)[1]).toEqual(slotsOf(c)[0]);
      expect(Buffer.from(c.read(t, { layer: 3, kind: 'v', token: 0, count: n })).equals(Buffer.from(a))).toBe(true);
      expect(Buffer.from(c.read(t, { layer: 3, kind: 'v', token: 0, count: n, device: 1 })).equals(Buffer.from(z))).toBe(true);
      expect(c.stats().host.bytesSwapped).toBe(0);
      expect(swapped.gone).toBe(true);
    });

    it('a swap that fails on device 1 changes nothing: swapOut keeps the sequence, swapIn keeps the copy (retryable)', async () => {
      const c = make({ hostMemoryBudget: 256 << 20 });
      const s = c.reserve();
      const n = perGroup(c) + 5;
      c.grow(s, n);
      const z = pattern(n * c.tokenBytes, 41);
      c.write(s, { layer: 0, kind: 'k', token: 0, device: 1 }, z);
      c._injectFault('copyToHost', 0, false, 0, 1);
      await expect(c.swapOut(s)).rejects.toMatchObject({ device: 1 });
      expect(s.released).toBe(false);
      expect(s.tokens).toBe(n);
      expect(c.stats().host.bytesSwapped).toBe(0);
      // no device counts a swap that did not happen (device 0's copy was made, then given back)
      expect(c.stats().devices.map((d) => d.host.swapOuts)).toEqual([0, 0]);
      const swapped = await c.swapOut(s);
      expect(c.stats().devices.map((d) => d.host.swapOuts)).toEqual([1, 1]);
      c._injectFault('copyFromHost', 0, false, 0, 1);
      await expect(c.swapIn(swapped)).rejects.toMatchObject({ device: 1 });
      expect(c.stats().devices.map((d) => d.host.swapIns)).toEqual([0, 0]);
      expect(c.stats().activeSequences).toBe(0);
      expect(slotsOf(c)[1]).toEqual(slotsOf(c)[0]);
      const t = await c.swapIn(swapped);
      expect(Buffer.from(c.read(t, { layer: 0, kind: 'k', token: 0, count: n, device: 1 })).equals(Buffer.from(z))).toBe(true);
      expect(slotsOf(c)[1]).toEqual(slotsOf(c)[0]);
      // and a discarded one frees every device's copy
      const again = await c.swapOut(t);
      again.discard();
      expect(c.stats().host.bytesSwapped).toBe(0);
    });

    it('metrics carry a device label per device', () => {
      const c = make();
      const s = c.reserve();
      c.grow(s, 5);
      const text = c.metrics();
      expect(text).toMatch(/vattention_backed_bytes\{[^}]*device="0"[^}]*\} \d+/);
      expect(text).toMatch(/vattention_backed_bytes\{[^}]*device="1"[^}]*\} \d+/);
    });

    describe.skipIf(b.name !== 'cuda')(`on the GPUs${b.name !== 'cuda' ? ' (skipped: the host backend has no kernels)' : ''}`, () => {
      it('a kernel on each device writes through its shard and the bytes read back match', () => {
        const c = make();
        const s = c.reserve();
        const n = 2 * perGroup(c) + 5;
        c.grow(s, n);
        const seedOf = (device: number, layer: number, kind: 'k' | 'v') => 100 * device + 2 * layer + (kind === 'v' ? 1 : 0);
        for (const device of [0, 1]) {
          for (let layer = 0; layer < b.options.layers; layer++)
            for (const kind of ['k', 'v'] as const) {
              // token rows through the tensor's strides (a strided view in the all-layers layout)
              const stride = c.tensor(layer, kind, { device }).strideBytes[1];
              writeRowsU32(s.address(layer, kind, { device }), { count: n, rowBytes: c.tokenBytes, stride }, seedOf(device, layer, kind), { device });
            }
          synchronizeStream(0n, device);
        }
        const words = c.tokenBytes / 4;
        for (const device of [0, 1])
          for (let layer = 0; layer < b.options.layers; layer++)
            for (const kind of ['k', 'v'] as const) {
              const got = new Uint32Array(c.read(s, { layer, kind, token: 0, count: n, device }).buffer);
              const seed = seedOf(device, layer, kind);
              const wrong = got.findIndex((v, i) => v !== rowValue(seed, Math.floor(i / words), i % words));
              expect(wrong, `device ${device} layer ${layer} ${kind}: first wrong word`).toBe(-1);
            }
      });

      it('free memory is back to its baseline on both devices after close()', () => {
        // the driver's own state on each device (primary contexts, modules) first, as a server's would be
        const warm = make();
        warm.grow(warm.reserve(), 1);
        warm.close();
        const base = [deviceMemory(0).freeBytes, deviceMemory(1).freeBytes];
        const c = make({ memoryBudget: 128 << 20 }); // holds a sequence of maxTokens in either layout
        const s = c.reserve();
        c.grow(s, b.options.maxTokens);
        const during = [deviceMemory(0).freeBytes, deviceMemory(1).freeBytes];
        expect(during[0]).toBeLessThan(base[0]!);
        expect(during[1]).toBeLessThan(base[1]!);
        c.close();
        const after = [deviceMemory(0).freeBytes, deviceMemory(1).freeBytes];
        for (const d of [0, 1]) expect(Math.abs(after[d]! - base[d]!)).toBeLessThanOrEqual(4 << 20);
      });
    });
  });
}
