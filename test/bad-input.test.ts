// Bad input: every option and argument with wrong types and values gets a
// TypeError / RangeError with code ERR_INVALID_ARGUMENT (or a library error
// with its code), never a crash, and changes nothing.
import { afterAll, describe, expect, it } from 'vitest';
import { KVCache, type KVCacheOptions, autoBackend } from '../lib/index.js';
import { stateOf } from './backends.js';
import { liveResources } from '../lib/testing.js';

const good: KVCacheOptions = {
  backend: 'host',
  layers: 2,
  kvHeads: 2,
  headDim: 64,
  dtype: 'float16',
  maxSequences: 2,
  maxTokens: 64,
  pageSize: 4096,
  memoryBudget: 64 * 4096,
};

const wrongOptions: [string, unknown, 'TypeError' | 'RangeError'][] = [
  ['options itself', null, 'TypeError'],
  ['options itself', 42, 'TypeError'],
  ['options itself', [], 'TypeError'],
  ['layers', { ...good, layers: undefined }, 'TypeError'],
  ['layers', { ...good, layers: '2' }, 'TypeError'],
  ['layers', { ...good, layers: 0 }, 'RangeError'],
  ['layers', { ...good, layers: -1 }, 'RangeError'],
  ['layers', { ...good, layers: 1.5 }, 'RangeError'],
  ['layers', { ...good, layers: NaN }, 'RangeError'],
  ['layers', { ...good, layers: Infinity }, 'RangeError'],
  ['kvHeads', { ...good, kvHeads: 2n }, 'TypeError'],
  ['kvHeads', { ...good, kvHeads: 1e9 }, 'RangeError'],
  ['headDim', { ...good, headDim: 0 }, 'RangeError'],
  ['dtype', { ...good, dtype: 'fp16' }, 'RangeError'],
  ['dtype', { ...good, dtype: 2 }, 'TypeError'],
  ['dtype', { ...good, dtype: 'toString' }, 'RangeError'],
  ['maxSequences', { ...good, maxSequences: 0 }, 'RangeError'],
  ['maxSequences', { ...good, maxSequences: 2 ** 40 }, 'RangeError'],
  ['maxTokens', { ...good, maxTokens: -5 }, 'RangeError'],
  ['maxTokens', { ...good, maxTokens: null }, 'TypeError'],
  ['device', { ...good, device: -1 }, 'RangeError'],
  ['device', { ...good, device: '0' }, 'TypeError'],
  ['backend', { ...good, backend: 'gpu' }, 'RangeError'],
  ['backend', { ...good, backend: true }, 'TypeError'],
  ['memoryBudget', { ...good, memoryBudget: 0 }, 'RangeError'],
  ['memoryBudget', { ...good, memoryBudget: -1n }, 'RangeError'],
  ['memoryBudget', { ...good, memoryBudget: 2 ** 60 }, 'RangeError'],
  ['memoryBudget', { ...good, memoryBudget: '1GB' }, 'TypeError'],
  ['pageSize', { ...good, pageSize: 1000 }, 'RangeError'],
  ['pageSize', { ...good, pageSize: 4097 * 2 }, 'RangeError'],
  ['poolPrefill', { ...good, poolPrefill: -1 }, 'RangeError'],
  ['poolPrefill', { ...good, poolPrefill: 1e12 }, 'RangeError'],
  ['unknown option', { ...good, maxSeqs: 4 }, 'RangeError'],
  ['address space', { ...good, layers: 1024, maxSequences: 1 << 20, maxTokens: 1 << 20 }, 'RangeError'],
];

describe('bad options', () => {
  for (const [what, options, kind] of wrongOptions) {
    it(`${what}: ${kind} with code ERR_INVALID_ARGUMENT for ${JSON.stringify(options, (_, v) => (typeof v === 'bigint' ? `${v}n` : v))?.slice(0, 80)}`, () => {
      let error: any;
      try {
        new KVCache(options as KVCacheOptions);
      } catch (e) {
        error = e;
      }
      expect(error).toBeInstanceOf(kind === 'TypeError' ? TypeError : RangeError);
      expect(error.code).toBe('ERR_INVALID_ARGUMENT');
    });
  }
});

describe('bad arguments to methods leave the cache unchanged', () => {
  const c = new KVCache(good);
  const other = new KVCache(good);
  afterAll(() => {
    c.close();
    other.close();
  });
  const seq = c.reserve();
  c.grow(seq, 10);
  const stale = c.reserve();
  c.release(stale);
  const foreign = other.reserve();
  const one = new Uint8Array(c.tokenBytes);

  const calls: [string, () => unknown, string, ('TypeError' | 'RangeError')?][] = [
    ['reserve(null)', () => c.reserve(null as never), 'ERR_INVALID_ARGUMENT', 'TypeError'],
    ['reserve expectedTokens -1', () => c.reserve({ expectedTokens: -1 }), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['reserve expectedTokens NaN', () => c.reserve({ expectedTokens: NaN }), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['reserve expectedTokens past maxTokens', () => c.reserve({ expectedTokens: 65 }), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['grow(undefined)', () => c.grow(undefined as never, 1), 'ERR_INVALID_ARGUMENT', 'TypeError'],
    ['grow({slot:0})', () => c.grow({ slot: 0 } as never, 1), 'ERR_INVALID_ARGUMENT', 'TypeError'],
    ['grow tokens "5"', () => c.grow(seq, '5' as never), 'ERR_INVALID_ARGUMENT', 'TypeError'],
    ['grow tokens -1', () => c.grow(seq, -1), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['grow tokens 1.5', () => c.grow(seq, 1.5), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['grow tokens NaN', () => c.grow(seq, NaN), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['grow tokens huge', () => c.grow(seq, 2 ** 52), 'ERR_OUT_OF_RANGE'],
    ['grow past maxTokens', () => c.grow(seq, 65), 'ERR_OUT_OF_RANGE'],
    ['grow stale', () => c.grow(stale, 1), 'ERR_SEQUENCE_RELEASED'],
    ['grow foreign', () => c.grow(foreign, 1), 'ERR_FOREIGN_SEQUENCE'],
    ['release stream number', () => c.release(seq, { stream: 0 as never }), 'ERR_INVALID_ARGUMENT', 'TypeError'],
    ['release stream negative', () => c.release(seq, { stream: -1n }), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['release stale', () => c.release(stale), 'ERR_SEQUENCE_RELEASED'],
    ['reclaim(-1)', () => c.reclaim(-1), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['reclaim("all")', () => c.reclaim('all' as never), 'ERR_INVALID_ARGUMENT', 'TypeError'],
    ['reclaim(1.5)', () => c.reclaim(1.5), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['write no range', () => c.write(seq, undefined as never, one), 'ERR_INVALID_ARGUMENT', 'TypeError'],
    ['write layer 2', () => c.write(seq, { layer: 2, kind: 'k', token: 0 }, one), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['write kind "q"', () => c.write(seq, { layer: 0, kind: 'q' as never, token: 0 }, one), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['write kind 0', () => c.write(seq, { layer: 0, kind: 0 as never, token: 0 }, one), 'ERR_INVALID_ARGUMENT', 'TypeError'],
    ['write token -1', () => c.write(seq, { layer: 0, kind: 'k', token: -1 }, one), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['write data array', () => c.write(seq, { layer: 0, kind: 'k', token: 0 }, [1, 2] as never), 'ERR_INVALID_ARGUMENT', 'TypeError'],
    ['write partial token', () => c.write(seq, { layer: 0, kind: 'k', token: 0 }, new Uint8Array(3)), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['write past tokens', () => c.write(seq, { layer: 0, kind: 'k', token: 10 }, one), 'ERR_OUT_OF_RANGE'],
    ['read count missing', () => c.read(seq, { layer: 0, kind: 'k', token: 0 } as never), 'ERR_INVALID_ARGUMENT', 'TypeError'],
    ['read past tokens', () => c.read(seq, { layer: 0, kind: 'v', token: 9, count: 2 }), 'ERR_OUT_OF_RANGE'],
    ['read into too small', () => c.read(seq, { layer: 0, kind: 'v', token: 0, count: 2 }, one), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['tensor layer 5', () => c.tensor(5, 'k'), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['tensor kind x', () => c.tensor(0, 'x' as never), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['sequenceAddress stale', () => c.sequenceAddress(stale, 0, 'k'), 'ERR_SEQUENCE_RELEASED'],
    ['step not an array', () => c.step(seq as never, 5), 'ERR_INVALID_ARGUMENT', 'TypeError'],
    ['step tokens a string', () => c.step([seq], '5' as never), 'ERR_INVALID_ARGUMENT', 'TypeError'],
    ['step lengths differ', () => c.step([seq], [5, 6]), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['step token -1', () => c.step([seq], [-1]), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['step token NaN', () => c.step([seq], NaN), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['step token 2^32', () => c.step([seq], 2 ** 32), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['step entry not a Sequence', () => c.step([seq, {} as never], 5), 'ERR_INVALID_ARGUMENT', 'TypeError'],
    ['step with a stale sequence', () => c.step([seq, stale], 5), 'ERR_SEQUENCE_RELEASED'],
    ['step with a foreign sequence', () => c.step([seq, foreign], 5), 'ERR_FOREIGN_SEQUENCE'],
    ['step past maxTokens', () => c.step([seq], 65), 'ERR_OUT_OF_RANGE'],
    ['metrics bad label name', () => c.metrics({ labels: { 'a-b': 'x' } }), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['metrics bad prefix', () => c.metrics({ prefix: '9x' }), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    // unknown keys in a call's options (plain JS: a misspelt `stream` would drop the fence in silence)
    ['release { strem }', () => c.release(seq, { strem: 0n } as never), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['reserve { expectedToken }', () => c.reserve({ expectedToken: 5 } as never), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['reserve prefix { from, token }', () => c.reserve({ prefix: { from: seq, token: 1 } as never }), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['fork { stram }', () => c.fork(seq, { stram: 0n } as never), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['write range { count }', () => c.write(seq, { layer: 0, kind: 'k', token: 0, count: 1 } as never, one), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['read range { tokens }', () => c.read(seq, { layer: 0, kind: 'k', token: 0, count: 1, tokens: 1 } as never), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['tensor { devices }', () => c.tensor(0, 'k', { devices: 0 } as never), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['obtainableBytes { lookahead }', () => c.obtainableBytes({ lookahead: false } as never), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['metrics { label }', () => c.metrics({ label: {} } as never), 'ERR_INVALID_ARGUMENT', 'RangeError'],
  ];

  const asyncCalls: [string, () => Promise<unknown>, string, ('TypeError' | 'RangeError')?][] = [
    ['growAsync tokens "5"', () => c.growAsync(seq, '5' as never), 'ERR_INVALID_ARGUMENT', 'TypeError'],
    ['growAsync tokens -1', () => c.growAsync(seq, -1), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['growAsync signal not an AbortSignal', () => c.growAsync(seq, 11, { signal: {} as never }), 'ERR_INVALID_ARGUMENT', 'TypeError'],
    ['growAsync stale', () => c.growAsync(stale, 1), 'ERR_SEQUENCE_RELEASED'],
    ['growAsync foreign', () => c.growAsync(foreign, 1), 'ERR_FOREIGN_SEQUENCE'],
    ['growAsync past maxTokens', () => c.growAsync(seq, 65), 'ERR_OUT_OF_RANGE'],
    ['growAsync { signa }', () => c.growAsync(seq, 11, { signa: undefined } as never), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['swapOut { strem }', () => c.swapOut(seq, { strem: 0n } as never), 'ERR_INVALID_ARGUMENT', 'RangeError'],
    ['suspend { keeep }', () => c.suspend({ keeep: 'host' } as never), 'ERR_INVALID_ARGUMENT', 'RangeError'],
  ];
  for (const [name, call, code, kind] of asyncCalls) {
    it(`${name}: rejects with ${code}${kind ? ` (${kind})` : ''}, state unchanged`, async () => {
      const before = stateOf(c);
      const error: any = await call().then(
        () => undefined,
        (e) => e,
      );
      expect(error?.code).toBe(code);
      if (kind) expect(error).toBeInstanceOf(kind === 'TypeError' ? TypeError : RangeError);
      expect(stateOf(c)).toEqual(before);
      expect(seq.tokens).toBe(10);
    });
  }

  for (const [name, call, code, kind] of calls) {
    it(`${name}: ${code}${kind ? ` (${kind})` : ''}, state unchanged`, () => {
      const before = stateOf(c);
      let error: any;
      try {
        call();
      } catch (e) {
        error = e;
      }
      expect(error?.code).toBe(code);
      if (kind) expect(error).toBeInstanceOf(kind === 'TypeError' ? TypeError : RangeError);
      expect(stateOf(c)).toEqual(before);
      expect(seq.tokens).toBe(10);
    });
  }
});

describe('budgets and helpers a new user gets wrong', () => {
  const host = { backend: 'host' as const, layout: 'per-layer' as const, layers: 2, kvHeads: 2, headDim: 64, dtype: 'float16' as const, maxSequences: 2, maxTokens: 64, pageSize: 4096 };

  for (const memoryBudget of [1, 4096, 3 * 4096]) {
    it(`memoryBudget ${memoryBudget} (below one page group of 4 pages) is a RangeError naming the option`, () => {
      let error: any;
      try {
        new KVCache({ ...host, memoryBudget });
      } catch (e) {
        error = e;
      }
      expect(error).toBeInstanceOf(RangeError);
      expect(error.code).toBe('ERR_INVALID_ARGUMENT');
      expect(error.argument).toBe('options.memoryBudget');
      expect(error.message).toMatch(/less than one page group/);
    });
  }

  it('a budget of exactly one page group is accepted and backs one group', () => {
    const c = new KVCache({ ...host, memoryBudget: 4 * 4096 });
    c.grow(c.reserve(), 1);
    expect(c.stats().pagesMapped).toBe(4);
    c.close();
  });

  it('the default layout is all-layers: a page group is 2 pages whatever the layers', () => {
    const { layout: _perLayer, ...shape } = host;
    using c = new KVCache({ ...shape, layers: 6, memoryBudget: 2 * 4096 });
    c.grow(c.reserve(), 1);
    expect(c.stats().pagesMapped).toBe(2);
    expect(c.layout.name).toBe('all-layers');
  });

  for (const [layout, why] of [['rows', 'an unknown name'], [{ layerGroups: 3 }, 'a count that does not divide layers'], [{ layerGroups: 0 }, 'zero'], [{ groups: 2 }, 'an unknown key']] as const)
    it(`layout ${JSON.stringify(layout)} (${why}) is a RangeError naming the option, and nothing is created`, () => {
      expect(() => new KVCache({ ...host, layout: layout as never })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT', argument: expect.stringMatching(/^options\.layout/) }));
      expect(liveResources()).toEqual({ ranges: 0, pages: 0, mappings: 0, fences: 0, contexts: 0 });
    });

  it("autoBackend('0') is a TypeError with a code, not a silent answer", () => {
    expect(() => autoBackend('0' as never)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT', name: 'InvalidArgumentTypeError' }));
    expect(() => autoBackend(-1)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }));
  });
});
