// A cache over two (logical) devices under random operations, with faults
// injected on one device at a time, against a model of what each device's
// shard must hold. After every operation: the devices agree on every slot
// (active, tokens), each backs at least its tokens, every byte written to a
// shard reads back from that shard, and nothing leaks at close. Host
// backend (CI); replay a failure with VAT_SEED=<seed> (printed).
import { describe, expect, it } from 'vitest';
import { KVCache, type KVCacheOptions, type Sequence, type SwappedSequence } from '../lib/index.js';
import { liveResources } from '../lib/testing.js';
import { backends, pattern } from './backends.js';

interface Live {
  seq: Sequence;
  tokens: number;
  // bytes written per device: [token count, seed] of layer 1's V from token 0
  written: [number, number] | null;
  frozen: boolean; // shared with another sequence: no more writes
}

const faultOps = ['createPage', 'map', 'setAccess', 'copyDevice', 'copyToHost', 'copyFromHost'] as const;

function rng(seed: number) {
  let x = seed >>> 0 || 1;
  return (n: number) => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
}

const host = backends.filter((b) => b.name === 'host' && b.layoutName !== 'layer-groups:2');

for (const b of host) {
  describe(`several devices under random operations, host backend, ${b.layoutName} layout`, () => {
    const seeds = process.env.VAT_SEED ? [Number(process.env.VAT_SEED)] : [11, 22, 33, 44, 55, 66];
    for (const seed of seeds) {
      // seeds 33 and 66: a thread per device (VATTENTION_PARALLEL_DEVICES, read when the cache is made)
      const threads = seed % 3 === 0;
      it(`keeps the devices identical and each shard its bytes (seed ${seed}${threads ? ', a thread per device' : ''})`, async () => {
        const rnd = rng(seed);
        const prefetch = seed % 2 === 0 ? 8 : 0;
        if (threads) process.env.VATTENTION_PARALLEL_DEVICES = '1';
        let c: KVCache;
        try {
          c = new KVCache({ ...(b.options as KVCacheOptions), devices: [0, 1], prefetchTokens: prefetch, hostMemoryBudget: 64 << 20 });
        } finally {
          delete process.env.VATTENTION_PARALLEL_DEVICES;
        }
        const per = c.layout.tokensPerPageGroup;
        const max = c.options.maxTokens;
        const live: Live[] = [];
        const swapped: { s: SwappedSequence; l: Live }[] = [];
        const codes = new Set<string>();
        const attempt = async (what: string, fn: () => unknown | Promise<unknown>): Promise<boolean> => {
          try {
            await fn();
            return true;
          } catch (e) {
            const code = (e as { code?: string }).code ?? String(e);
            codes.add(code);
            // refusals the model allows: memory, slots, an injected fault (ERR_OS), sharing a
            // sequence grown past what another shared
            if (!['ERR_OUT_OF_MEMORY', 'ERR_NO_SLOT', 'ERR_OS'].includes(code)) throw new Error(`seed ${seed}: ${what} failed with ${code}: ${(e as Error).message}`);
            return false;
          }
        };
        try {
          for (let step = 0; step < 600; step++) {
            // a fault on one device, now and then, at the next call of an op
            if (rnd(6) === 0) c._injectFault(faultOps[rnd(faultOps.length)]!, rnd(3), rnd(2) === 0, 0, rnd(2));
            const op = rnd(12);
            const pick = () => live[rnd(live.length)]!;
            if (op === 0 && live.length < c.options.maxSequences) {
              const seq = c.reserve({ expectedTokens: rnd(max) });
              live.push({ seq, tokens: 0, written: null, frozen: false });
            } else if (op === 1 && live.length) {
              const l = pick();
              const to = Math.min(max, l.tokens + rnd(3 * per));
              if (await attempt('grow', () => c.grow(l.seq, to))) l.tokens = Math.max(l.tokens, to);
            } else if (op === 2 && live.length) {
              const next = live.map((l) => Math.min(max, l.tokens + 1 + rnd(2)));
              const run = rnd(2) === 0 ? () => c.step(live.map((l) => l.seq), next) : () => c.stepAsync(live.map((l) => l.seq), next);
              if (await attempt('step', run)) live.forEach((l, i) => (l.tokens = Math.max(l.tokens, next[i]!)));
            } else if (op === 3 && live.length) {
              const l = pick();
              const to = Math.min(max, l.tokens + rnd(2 * per));
              if (await attempt('growAsync', () => c.growAsync(l.seq, to))) l.tokens = Math.max(l.tokens, to);
            } else if (op === 4 && live.length) {
              const l = pick();
              if (!l.frozen && l.tokens > 0) {
                const n = 1 + rnd(l.tokens);
                const s = seed * 1000 + step;
                c.write(l.seq, { layer: 1, kind: 'v', token: 0 }, pattern(n * c.tokenBytes, s));
                c.write(l.seq, { layer: 1, kind: 'v', token: 0, device: 1 }, pattern(n * c.tokenBytes, s + 1));
                l.written = [n, s];
              }
            } else if (op === 5 && live.length) {
              const l = live.splice(rnd(live.length), 1)[0]!;
              c.release(l.seq);
            } else if (op === 6 && live.length && live.length < c.options.maxSequences) {
              const l = pick();
              let child: Sequence | undefined;
              const prefix = rnd(2) === 0 ? l.tokens : rnd(l.tokens + 1);
              const fork = prefix === l.tokens && rnd(2) === 0;
              if (await attempt('share', async () => (child = fork ? await c.forkAsync(l.seq) : c.reserve({ prefix: { from: l.seq, tokens: prefix } })))) {
                l.frozen = true;
                const n = l.written ? Math.min(l.written[0], prefix) : 0;
                live.push({ seq: child!, tokens: prefix, written: n > 0 ? [n, l.written![1]] : null, frozen: true });
              }
            } else if (op === 7) {
              c.reclaim(rnd(2) === 0 ? undefined : rnd(8) * c.pageSize);
            } else if (op === 8) {
              c.trim();
            } else if (op === 9 && live.length) {
              const i = rnd(live.length);
              const l = live[i]!;
              let out: SwappedSequence | undefined;
              if (await attempt('swapOut', async () => (out = await c.swapOut(l.seq)))) {
                live.splice(i, 1);
                swapped.push({ s: out!, l });
              }
            } else if (op === 10 && swapped.length && live.length < c.options.maxSequences) {
              const i = rnd(swapped.length);
              const { s: out, l } = swapped[i]!;
              let back: Sequence | undefined;
              if (await attempt('swapIn', async () => (back = await c.swapIn(out)))) {
                swapped.splice(i, 1);
                live.push({ ...l, seq: back!, frozen: false });
              }
            } else if (op === 11 && live.length >= 3) {
              // Concurrent async forms on the pool's threads at once (issue 27): a growAsync and a
              // stepAsync of one sequence, a forkAsync of a second, a swapOut of a third; each
              // outcome is applied to the model on its own (distinct sequences, or max of the two).
              const [a, f, o] = [live[0]!, live[1]!, live[2]!];
              const toA = Math.min(max, a.tokens + rnd(2 * per));
              const nextA = Math.min(max, a.tokens + 1);
              const settle = async <T>(what: string, p: Promise<T>): Promise<T | undefined> => {
                let out: T | undefined;
                return (await attempt(what, async () => (out = await p))) ? out : undefined;
              };
              const [grown, stepped, child, out] = await Promise.all([
                settle('growAsync (concurrent)', c.growAsync(a.seq, toA).then(() => true)),
                settle('stepAsync (concurrent)', c.stepAsync([a.seq], [nextA]).then(() => true)),
                live.length < c.options.maxSequences ? settle('forkAsync (concurrent)', c.forkAsync(f.seq, { tokens: f.tokens })) : undefined,
                settle('swapOut (concurrent)', c.swapOut(o.seq)),
              ]);
              if (grown) a.tokens = Math.max(a.tokens, toA);
              if (stepped) a.tokens = Math.max(a.tokens, nextA);
              if (child) {
                f.frozen = true;
                live.push({ seq: child, tokens: f.tokens, written: f.written, frozen: true });
              }
              if (out) {
                live.splice(live.indexOf(o), 1);
                swapped.push({ s: out, l: o });
              }
            }
            // invariants
            const st = c.stats();
            const [d0, d1] = st.devices.map((d) => d.slots.map((s) => [s.active, s.tokens]));
            expect(d1, `seed ${seed} step ${step}`).toEqual(d0);
            for (const l of live) {
              expect(l.seq.tokens, `seed ${seed} step ${step}: tokens of slot ${l.seq.slot}`).toBe(l.tokens);
              for (const d of st.devices) expect(d.slots[l.seq.slot]!.backedTokens).toBeGreaterThanOrEqual(l.tokens);
              if (l.written) {
                const [n, s] = l.written;
                const got0 = c.read(l.seq, { layer: 1, kind: 'v', token: 0, count: n });
                const got1 = c.read(l.seq, { layer: 1, kind: 'v', token: 0, count: n, device: 1 });
                const want0 = pattern(n * c.tokenBytes, s);
                const want1 = pattern(n * c.tokenBytes, s + 1);
                expect(Buffer.from(got0).equals(Buffer.from(want0)), `seed ${seed} step ${step}: device 0 bytes of slot ${l.seq.slot}`).toBe(true);
                expect(Buffer.from(got1).equals(Buffer.from(want1)), `seed ${seed} step ${step}: device 1 bytes of slot ${l.seq.slot}`).toBe(true);
              }
            }
            expect(st.activeSequences).toBe(live.length);
            // one decision, counted once; each device holds its shard's copy of each
            expect(st.host.swappedSequences).toBe(swapped.length);
            for (const d of st.devices) expect(d.host.swappedSequences).toBe(swapped.length);
          }
        } finally {
          c.close();
        }
        expect(liveResources()).toEqual({ ranges: 0, pages: 0, mappings: 0, fences: 0, contexts: 0 });
        expect(codes.size).toBeGreaterThan(0); // the mix did meet refusals (faults at least)
      });
    }
  });
}
