// Random operations against a model. fast-check drives random sequences of
// reserve / grow / step / write / read / release / reclaim / trim / fork /
// prefix sharing (and growAsync, swapOut / swapIn and suspend / resume in the
// async property) with sizes at the edges (0, 1, page
// boundaries, maxTokens, budget exhausted) against a plain TypeScript model
// of what the cache must hold. Every byte written is read back where the
// model says it is. Replay a failure with VAT_SEED=<seed> (printed on failure).
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { KVCache, type Sequence, type SwappedSequence } from '../lib/index.js';
import { finishHostStream, holdHostStream, liveResources, spinThenReadU32, synchronizeStream } from '../lib/testing.js';
import { backends, label, layouts, tokensPerGroupOf } from './backends.js';

interface SeqModel {
  tokens: number;
  written: Map<string, number>; // `${layer}:${kind}:${token}` -> seed of the bytes there
  // Tokens below this were shared with another sequence (fork, prefix): KV
  // is append-only, so no write goes there any more.
  frozen: number;
  // Placed by reserve({ tokens }) for prompt PROMPTS[p] (its first len ids):
  // while clean, every byte it holds is the prompt's own (promptSeed), so it
  // may publish them.
  prompt?: { p: number; len: number; clean: boolean; upTo: number };
}
interface Model {
  live: { seq: Sequence; m: SeqModel }[];
  swapped: { s: SwappedSequence; m: SeqModel }[];
  // Slots released with a fence still pending (host: a held stream), with the
  // pages mapped there when last seen and the fence waits counted when the
  // fence was recorded: none may go before a fence wait. (The wait may come
  // well before the pages go: a reserve() that waits for a sharer's fence
  // before dropping its mappings, and later a growth that takes the pages.)
  fenced: Map<number, { pages: number; waitsBefore: number }>;
}
interface Real {
  cache: KVCache;
}

const KINDS = ['k', 'v'] as const;

function tokenBytesFor(seed: number, tokenBytes: number): Uint8Array {
  const out = new Uint8Array(tokenBytes);
  let x = (seed * 2654435761) >>> 0 || 7;
  for (let i = 0; i < tokenBytes; i++) {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    out[i] = x >>> 24;
  }
  return out;
}

// Prompts for the prefix cache: they differ from their first id on, so
// equal ids mean an equal prompt, whose KV bytes the model knows (promptSeed).
const PROMPT_COUNT = 3;
const promptIds = (p: number, len: number) => Array.from({ length: len }, (_, t) => p * 100_000 + t * 7);
const promptSeed = (p: number, t: number) => 5_000_000 + p * 100_000 + t;

let operations = 0;
const HELD_STREAM = 0xfe0cen;
const seed = process.env.VAT_SEED ? Number(process.env.VAT_SEED) : (Date.now() ^ (Math.random() * 2 ** 31)) >>> 0;

function codeOf(f: () => unknown): string | null {
  try {
    f();
    return null;
  } catch (e) {
    return (e as { code?: string }).code ?? 'NO_CODE';
  }
}

for (const b of backends) {
  describe.skipIf(b.skip !== null)(`model-based random operations, ${label(b)}`, () => {
    const o = { ...b.options, prefetchTokens: 0 };
    const maxTokens = o.maxTokens;
    const tpp = tokensPerGroupOf(b, b.name === 'host' ? 4096 : 2 << 20, b.options.kvHeads * b.options.headDim * 2); // see backends.ts
    const tokenCount = fc.oneof(
      fc.constantFrom(0, 1, tpp - 1, tpp, tpp + 1, 2 * tpp, maxTokens - 1, maxTokens, maxTokens + 1),
      fc.integer({ min: 0, max: maxTokens }),
    );
    const pick = fc.nat();

    const pickSeq = (m: Model, i: number) => (m.live.length ? m.live[i % m.live.length]! : undefined);

    const verify = (c: KVCache, entry: { seq: Sequence; m: SeqModel }, layer: number, kind: 'k' | 'v') => {
      const n = entry.m.tokens;
      if (n === 0) return;
      const bytes = c.read(entry.seq, { layer, kind, token: 0, count: n });
      for (const [key, s] of entry.m.written) {
        const [l, k, t] = key.split(':');
        if (Number(l) !== layer || k !== kind) continue;
        const want = tokenBytesFor(s, c.tokenBytes);
        const at = Number(t) * c.tokenBytes;
        for (let i = 0; i < c.tokenBytes; i++) if (bytes[at + i] !== want[i]) throw new Error(`byte ${i} of token ${t} (layer ${layer} ${kind}, slot ${entry.seq.slot}) differs`);
      }
    };

    // settled: no worker or async growth may be mapping off the lock; the
    // figures add up either way (pages such a growth holds are pagesInFlight).
    const invariants = (m: Model, c: KVCache, settled = true) => {
      const s = c.stats();
      if (b.name === 'host') {
        // A pending fence's slot only loses pages after a fence wait.
        const waits = s.driverCalls.fenceWait!.calls;
        for (const [slot, seen] of m.fenced) {
          const now = s.slots[slot]!.mappedPages;
          if (now < seen.pages) {
            expect(waits).toBeGreaterThan(seen.waitsBefore);
            m.fenced.delete(slot);
          } else seen.pages = now;
        }
      }
      expect(s.pagesMapped + s.pagesPooled + s.pagesStranded + s.pagesInFlight).toBe(s.pagesCreated);
      if (settled) expect(s.pagesInFlight).toBe(0);
      expect(s.bytesUsed + s.bytesBeyondTokens + s.bytesInReleasedSlots).toBe(s.bytesBacked + s.bytesSavedBySharing);
      expect(s.suspended).toBe(false);
      expect(s.host.swappedSequences).toBe(m.swapped.length);
      expect(s.host.bytesSwapped).toBe(m.swapped.reduce((sum, w) => sum + w.m.tokens * c.bytesPerToken, 0));
      expect(s.bytesPageRounding + s.bytesSpareGroups).toBe(s.bytesBeyondTokens);
      expect(s.bytesPageRounding).toBeLessThan(Math.max(1, s.activeSequences) * s.layout.bytesPerPageGroup);
      expect(s.bytesPooled).toBe(s.pagesPooled * s.pageSize);
      expect(s.pagesCreated * s.pageSize).toBeLessThanOrEqual(s.budgetBytes);
      expect(s.activeSequences).toBe(m.live.length);
      let used = 0;
      for (const { seq, m: sm } of m.live) {
        const slot = s.slots[seq.slot]!;
        expect(slot.active).toBe(true);
        expect(slot.tokens).toBe(sm.tokens);
        expect(slot.backedTokens).toBeGreaterThanOrEqual(sm.tokens);
        used += sm.tokens * c.bytesPerToken;
      }
      expect(s.bytesUsed).toBe(used);
    };

    const commands = [
      fc.option(tokenCount, { nil: undefined }).map((expected) => ({
        toString: () => `reserve(${expected})`,
        check: () => true,
        run: (m: Model, r: Real) => {
          const full = m.live.length === o.maxSequences;
          const expectedArg = expected !== undefined && expected > maxTokens ? maxTokens : expected;
          if (full) {
            expect(codeOf(() => r.cache.reserve({ expectedTokens: expectedArg }))).toBe('ERR_NO_SLOT');
            return;
          }
          const seq = r.cache.reserve({ expectedTokens: expectedArg });
          m.live.push({ seq, m: { tokens: 0, written: new Map(), frozen: 0 } });
        },
      })),
      fc.tuple(pick, tokenCount).map(([i, n]) => ({
        toString: () => `grow(#${i}, ${n})`,
        check: (m: Model) => m.live.length > 0,
        run: (m: Model, r: Real) => {
          const e = pickSeq(m, i)!;
          const code = codeOf(() => r.cache.grow(e.seq, n));
          if (n > maxTokens) expect(code).toBe('ERR_OUT_OF_RANGE');
          else if (code === null) e.m.tokens = Math.max(e.m.tokens, n);
          else expect(code).toBe('ERR_OUT_OF_MEMORY');
          expect(e.seq.tokens).toBe(e.m.tokens);
        },
      })),
      fc.tuple(fc.array(fc.tuple(pick, tokenCount), { minLength: 1, maxLength: 4 })).map(([entries]) => ({
        toString: () => `step(${entries.map(([i, n]) => `#${i}:${n}`).join(', ')})`,
        check: (m: Model) => m.live.length > 0,
        run: (m: Model, r: Real) => {
          const chosen = entries.map(([i, n]) => [pickSeq(m, i)!, n] as const);
          const before = chosen.map(([e]) => e.m.tokens);
          const code = codeOf(() => r.cache.step(chosen.map(([e]) => e.seq), chosen.map(([, n]) => n)));
          const twice = new Set(chosen.map(([e]) => e.seq)).size < chosen.length;
          if (twice) expect(code).toBe('ERR_INVALID_ARGUMENT'); // a sequence once per step
          else if (chosen.some(([, n]) => n > maxTokens)) expect(code).toBe('ERR_OUT_OF_RANGE');
          else if (code === null) for (const [e, n] of chosen) e.m.tokens = Math.max(e.m.tokens, n);
          if (code !== null) {
            if (!twice && !chosen.some(([, n]) => n > maxTokens)) expect(code).toBe('ERR_OUT_OF_MEMORY');
            chosen.forEach(([e], k) => expect(e.m.tokens).toBe(before[k])); // all or nothing
          }
          for (const [e] of chosen) expect(e.seq.tokens).toBe(e.m.tokens);
        },
      })),
      fc.tuple(pick, fc.nat({ max: o.layers - 1 }), fc.constantFrom(...KINDS), tokenCount, fc.integer({ min: 0, max: 3 }), fc.nat()).map(
        ([i, layer, kind, token, count, s]) => ({
          toString: () => `write(#${i}, L${layer}${kind}, token ${token}, count ${count}, seed ${s})`,
          check: (m: Model) => m.live.length > 0,
          run: (m: Model, r: Real) => {
            const e = pickSeq(m, i)!;
            const c = r.cache;
            const data = new Uint8Array(count * c.tokenBytes);
            for (let t = 0; t < count; t++) data.set(tokenBytesFor(s + t, c.tokenBytes), t * c.tokenBytes);
            if (Math.min(token, maxTokens) < e.m.frozen) return; // shared: never written again (append-only KV)
            const code = codeOf(() => c.write(e.seq, { layer, kind, token: Math.min(token, maxTokens) }, data));
            if (Math.min(token, maxTokens) + count > e.m.tokens) {
              expect(code).toBe('ERR_OUT_OF_RANGE');
              return;
            }
            expect(code).toBe(null);
            for (let t = 0; t < count; t++) e.m.written.set(`${layer}:${kind}:${token + t}`, s + t);
            if (count > 0 && e.m.prompt) e.m.prompt.clean = false; // its bytes are no longer the prompt's
          },
        }),
      ),
      fc.tuple(pick, fc.nat({ max: o.layers - 1 }), fc.constantFrom(...KINDS)).map(([i, layer, kind]) => ({
        toString: () => `readAndVerify(#${i}, L${layer}${kind})`,
        check: (m: Model) => m.live.length > 0,
        run: (m: Model, r: Real) => verify(r.cache, pickSeq(m, i)!, layer, kind),
      })),
      pick.map((i) => ({
        toString: () => `release(#${i})`,
        check: (m: Model) => m.live.length > 0,
        run: (m: Model, r: Real) => {
          const idx = i % m.live.length;
          const e = m.live[idx]!;
          // verify everything once more before the data becomes unobservable
          for (let l = 0; l < o.layers; l++) for (const k of KINDS) verify(r.cache, e, l, k);
          r.cache.release(e.seq);
          m.live.splice(idx, 1);
          expect(codeOf(() => r.cache.release(e.seq))).toBe('ERR_SEQUENCE_RELEASED');
        },
      })),
      pick.map((i) => ({
        // GPU work still reads the sequence when it is released: on cuda a
        // kernel that reads it after a short spin, on host a held stream.
        toString: () => `releaseWhileRead(#${i})`,
        check: (m: Model) => m.live.length > 0,
        run: (m: Model, r: Real) => {
          const idx = i % m.live.length;
          const e = m.live[idx]!;
          for (let l = 0; l < o.layers; l++) for (const k of KINDS) verify(r.cache, e, l, k);
          const slot = e.seq.slot;
          const mapped = r.cache.stats().slots[slot]!.mappedPages;
          let stream = 0n;
          if (b.name === 'cuda') {
            if (e.m.tokens > 0) spinThenReadU32(e.seq.address(0, 'k'), (e.m.tokens * r.cache.tokenBytes) / 4, 3e6);
          } else {
            stream = HELD_STREAM;
            holdHostStream(stream);
          }
          r.cache.release(e.seq, { stream });
          m.live.splice(idx, 1);
          if (b.name === 'host' && mapped > 0)
            m.fenced.set(slot, { pages: mapped, waitsBefore: r.cache.stats().driverCalls.fenceWait!.calls });
        },
      })),
      fc.constant({
        toString: () => 'gpuWorkDone()',
        check: () => true,
        run: (m: Model) => {
          if (b.name === 'cuda') synchronizeStream(0n); // a fault of a too-early unmap surfaces here
          else finishHostStream(HELD_STREAM);
          m.fenced.clear();
        },
      }),
      fc.option(fc.nat({ max: 64 * 4096 }), { nil: undefined }).map((bytes) => ({
        toString: () => `reclaim(${bytes})`,
        check: () => true,
        run: (_m: Model, r: Real) => {
          expect(r.cache.reclaim(bytes)).toBeGreaterThanOrEqual(0);
        },
      })),
      fc.tuple(pick, fc.option(tokenCount, { nil: undefined })).map(([i, n]) => ({
        // fork (n undefined) or a prefix of n tokens
        toString: () => (n === undefined ? `fork(#${i})` : `prefix(#${i}, ${n})`),
        check: (m: Model) => m.live.length > 0,
        run: (m: Model, r: Real) => {
          const e = pickSeq(m, i)!;
          const tokens = n === undefined ? e.m.tokens : n;
          let child: Sequence | undefined;
          const code = codeOf(() => {
            child = n === undefined ? r.cache.fork(e.seq) : r.cache.reserve({ prefix: { from: e.seq, tokens } });
          });
          if (tokens > maxTokens) expect(code).toBe('ERR_INVALID_ARGUMENT');
          else if (tokens > e.m.tokens) expect(code).toBe('ERR_OUT_OF_RANGE');
          else if (m.live.length === o.maxSequences) expect(code).toBe('ERR_NO_SLOT');
          else if (code !== null) expect(code).toBe('ERR_OUT_OF_MEMORY');
          if (code !== null) return;
          const written = new Map([...e.m.written].filter(([key]) => Number(key.split(':')[2]) < tokens));
          e.m.frozen = Math.max(e.m.frozen, tokens);
          m.live.push({ seq: child!, m: { tokens, written, frozen: tokens } });
          expect(child!.tokens).toBe(tokens);
        },
      })),
      fc.tuple(fc.nat({ max: PROMPT_COUNT - 1 }), tokenCount).map(([p, n]) => ({
        toString: () => `reserveTokens(prompt ${p}, ${n})`,
        check: () => true,
        run: (m: Model, r: Real) => {
          // (on cuda prompts of up to two page groups and a token: each publish writes every
          // layer's K and V of the prompt from the host, which at 2 MiB pages is most of the run)
          const len = Math.min(n, maxTokens, b.name === 'cuda' ? 2 * tpp + 1 : maxTokens);
          if (m.live.length === o.maxSequences) {
            expect(codeOf(() => r.cache.reserve({ tokens: promptIds(p, len) }))).toBe('ERR_NO_SLOT');
            return;
          }
          const seq = r.cache.reserve({ tokens: promptIds(p, len) });
          const got = seq.cachedTokens;
          expect(got).toBeLessThanOrEqual(len);
          // whole page groups (the last group of a slot ends at maxTokens)
          expect(got % tpp === 0 || got === maxTokens).toBe(true);
          expect(seq.tokens).toBe(got);
          const written = new Map<string, number>();
          for (let t = 0; t < got; t++)
            for (let layer = 0; layer < o.layers; layer++) for (const k of KINDS) written.set(`${layer}:${k}:${t}`, promptSeed(p, t));
          m.live.push({ seq, m: { tokens: got, written, frozen: got, prompt: { p, len, clean: true, upTo: got } } });
        },
      })),
      pick.map((i) => ({
        toString: () => `prefillAndPublish(#${i})`,
        check: (m: Model) => m.live.some((e) => e.m.prompt?.clean),
        run: (m: Model, r: Real) => {
          const candidates = m.live.filter((e) => e.m.prompt?.clean);
          const e = candidates[i % candidates.length]!;
          const { p, len, upTo } = e.m.prompt!;
          const c = r.cache;
          // tokens shared (a fork) before the prompt's bytes were written there: they can never be
          if (e.m.frozen > upTo) {
            e.m.prompt!.clean = false;
            return;
          }
          if (codeOf(() => c.grow(e.seq, len)) !== null) return; // out of memory: nothing changed
          e.m.tokens = Math.max(e.m.tokens, len);
          const from = upTo;
          if (len > from)
            for (let layer = 0; layer < o.layers; layer++)
              for (const k of KINDS) {
                const data = new Uint8Array((len - from) * c.tokenBytes);
                for (let t = from; t < len; t++) {
                  data.set(tokenBytesFor(promptSeed(p, t), c.tokenBytes), (t - from) * c.tokenBytes);
                  e.m.written.set(`${layer}:${k}:${t}`, promptSeed(p, t));
                }
                c.write(e.seq, { layer, kind: k, token: from }, data);
              }
          c.publish(e.seq, promptIds(p, len));
          e.m.prompt!.upTo = Math.max(upTo, len);
          e.m.frozen = Math.max(e.m.frozen, len); // published KV is not written again
        },
      })),
      fc.constant({
        toString: () => 'trim()',
        check: () => true,
        run: (_m: Model, r: Real) => {
          r.cache.trim();
          expect(r.cache.stats().pagesPooled).toBe(0);
        },
      }),
    ];

    // Every command runs, then the invariants; counts operations across runs.
    const counted = commands.map((arb) =>
      arb.map((cmd) => ({
        toString: cmd.toString,
        check: cmd.check,
        run: (m: Model, r: Real) => {
          operations++;
          cmd.run(m, r);
          invariants(m, r.cache);
        },
      })),
    );

    // The runs are shared out over the layouts: 560 host runs (40 cuda) in all.
    const runs = Math.ceil((b.name === 'host' ? 560 : 40) / layouts.length);
    afterAll(() => {
      console.log(`model-based (${b.name}): ${operations} operations, seed ${seed}`);
    });

    it(`holds every byte where the model says across random operations (${runs} runs, seed ${seed})`, () => {
      const before = operations;
      fc.assert(
        fc.property(fc.commands(counted, { maxCommands: 600, size: 'max' }), (cmds) => {
          const cache = new KVCache(o);
          try {
            fc.modelRun(() => ({ model: { live: [], swapped: [], fenced: new Map() } as Model, real: { cache } }), cmds);
          } finally {
            cache.close();
            if (b.name === 'cuda') synchronizeStream(0n);
            else finishHostStream(HELD_STREAM);
          }
          expect(liveResources()).toEqual({ ranges: 0, pages: 0, mappings: 0, fences: 0, contexts: 0 });
        }),
        { seed, numRuns: runs, endOnFailure: true },
      );
      if (b.name === 'host') expect(operations - before).toBeGreaterThanOrEqual(100_000 / layouts.length); // 100,000 over the layouts
    });

    it('with the prefetch worker on and growAsync in the mix, data stays where the model says', async () => {
      const withPrefetch = { ...b.options, prefetchTokens: tpp };
      const asyncCommands = [
        commands[0]!, // reserve
        commands[3]!, // write
        commands[4]!, // read and verify
        commands[5]!, // release
        commands[2]!, // step (the worker maps ahead after it)
        commands[9]!, // fork / prefix
        pick.map((i) => ({
          toString: () => `forkAsync(#${i})`,
          check: (m: Model) => m.live.length > 0,
          run: async (m: Model, r: Real) => {
            const e = pickSeq(m, i)!;
            const result = await r.cache.forkAsync(e.seq).then(
              (seq) => seq,
              (err: { code: string }) => err.code,
            );
            if (typeof result === 'string') {
              expect(result).toBe(m.live.length === o.maxSequences ? 'ERR_NO_SLOT' : 'ERR_OUT_OF_MEMORY');
              return;
            }
            e.m.frozen = Math.max(e.m.frozen, e.m.tokens);
            m.live.push({ seq: result, m: { tokens: e.m.tokens, written: new Map(e.m.written), frozen: e.m.tokens } });
            expect(result.tokens).toBe(e.m.tokens);
          },
        })),
        pick.map((i) => ({
          toString: () => `swapOut(#${i})`,
          check: (m: Model) => m.live.length > 0,
          run: async (m: Model, r: Real) => {
            const idx = i % m.live.length;
            const e = m.live[idx]!;
            const s = await r.cache.swapOut(e.seq);
            m.live.splice(idx, 1);
            expect(s.tokens).toBe(e.m.tokens);
            m.swapped.push({ s, m: e.m });
          },
        })),
        pick.map((i) => ({
          toString: () => `swapIn(#${i})`,
          check: (m: Model) => m.swapped.length > 0,
          run: async (m: Model, r: Real) => {
            const idx = i % m.swapped.length;
            const w = m.swapped[idx]!;
            const result = await r.cache.swapIn(w.s).then(
              (seq) => seq,
              (err: { code: string }) => err.code,
            );
            if (typeof result === 'string') {
              expect(result).toBe(m.live.length === o.maxSequences ? 'ERR_NO_SLOT' : 'ERR_OUT_OF_MEMORY');
              expect(w.s.gone).toBe(false);
              return;
            }
            m.swapped.splice(idx, 1);
            m.live.push({ seq: result, m: w.m });
            for (let l = 0; l < o.layers; l++) for (const k of KINDS) verify(r.cache, m.live.at(-1)!, l, k);
          },
        })),
        fc.tuple(fc.constantFrom('none', 'host') as fc.Arbitrary<'none' | 'host'>, fc.option(pick, { nil: undefined })).map(([keep, releaseWhile]) => ({
          toString: () => `suspendAndResume(${keep}${releaseWhile === undefined ? '' : `, release #${releaseWhile} while suspended`})`,
          check: () => true,
          run: async (m: Model, r: Real) => {
            const c = r.cache;
            const addresses = m.live.map((e) => e.seq.address(0, 'v'));
            await c.suspend({ keep });
            expect(c.stats().bytesBacked).toBe(0);
            if (m.live.length > 0) expect(codeOf(() => c.grow(m.live[0]!.seq, m.live[0]!.m.tokens))).toBe('ERR_SUSPENDED');
            if (releaseWhile !== undefined && m.live.length > 0) {
              const idx = releaseWhile % m.live.length;
              c.release(m.live[idx]!.seq);
              m.live.splice(idx, 1);
              addresses.splice(idx, 1);
            }
            await c.resume();
            expect(m.live.map((e) => e.seq.address(0, 'v'))).toEqual(addresses);
            for (const e of m.live) {
              expect(e.seq.tokens).toBe(e.m.tokens);
              if (keep === 'none') e.m.written.clear(); // contents undefined after resume
              else for (let l = 0; l < o.layers; l++) for (const k of KINDS) verify(c, e, l, k);
            }
          },
        })),
        fc.tuple(pick, tokenCount).map(([i, n]) => ({
          toString: () => `growAsync(#${i}, ${n})`,
          check: (m: Model) => m.live.length > 0,
          run: async (m: Model, r: Real) => {
            const e = pickSeq(m, i)!;
            const code = await r.cache.growAsync(e.seq, n).then(
              () => null,
              (err) => err.code,
            );
            if (n > maxTokens) expect(code).toBe('ERR_OUT_OF_RANGE');
            else if (code === null) e.m.tokens = Math.max(e.m.tokens, n);
            else expect(code).toBe('ERR_OUT_OF_MEMORY');
            expect(e.seq.tokens).toBe(e.m.tokens);
          },
        })),
      ].map((arb) =>
        (arb as fc.Arbitrary<{ toString(): string; check(m: Model): boolean; run(m: Model, r: Real): unknown }>).map((cmd) => ({
          toString: cmd.toString,
          check: cmd.check,
          run: async (m: Model, r: Real) => {
            operations++;
            await cmd.run(m, r);
            invariants(m, r.cache, false);
          },
        })),
      );
      await fc.assert(
        fc.asyncProperty(fc.commands(asyncCommands, { maxCommands: 200, size: 'max' }), async (cmds) => {
          const cache = new KVCache(withPrefetch);
          try {
            await fc.asyncModelRun(() => ({ model: { live: [], swapped: [], fenced: new Map() } as Model, real: { cache } }), cmds);
          } finally {
            cache.close();
          }
          expect(liveResources()).toEqual({ ranges: 0, pages: 0, mappings: 0, fences: 0, contexts: 0 });
        }),
        { seed, numRuns: b.name === 'host' ? 60 : 10, endOnFailure: true },
      );
    });
  });
}
