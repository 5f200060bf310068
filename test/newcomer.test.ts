// What a new user trips over first (issue 32): call arguments checked like
// the constructor's, every library error a VattentionError, the figures the
// options report, metric names as given.
import { afterEach, describe, expect, it } from 'vitest';
import { InvalidArgumentRangeError, InvalidArgumentTypeError, KVCache, VattentionError } from '../lib/index.js';
import { backends, label, stateOf } from './backends.js';

for (const b of backends.filter((x) => x.layoutName === 'all-layers')) {
  describe.skipIf(b.skip !== null)(`a newcomer's first calls, ${label(b)}`, () => {
    const open: KVCache[] = [];
    const make = (extra: Record<string, unknown> = {}) => {
      const c = new KVCache({ ...b.options, prefetchTokens: 0, ...extra });
      open.push(c);
      return c;
    };
    afterEach(() => {
      for (const c of open.splice(0)) c.close();
    });

    it('a step that names one sequence twice is ERR_INVALID_ARGUMENT and changes nothing', () => {
      const c = make();
      const a = c.reserve();
      const other = c.reserve();
      c.step([a, other], [1, 1]);
      const before = stateOf(c);
      expect(() => c.step([a, other, a], [2, 2, 3])).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT', argument: 'seqs[2]' }));
      expect(stateOf(c)).toEqual(before);
      c.step([a, other], [2, 2]); // the next step is not confused by the refused one
      expect([a.tokens, other.tokens]).toEqual([2, 2]);
    });

    it('argument errors are VattentionErrors as well as TypeError / RangeError', () => {
      const c = make();
      let type: unknown, range: unknown;
      try {
        c.reserve({ expectedTokens: 'x' as unknown as number });
      } catch (e) {
        type = e;
      }
      try {
        c.reserve({ expectedToken: 3 } as object);
      } catch (e) {
        range = e;
      }
      expect(type).toBeInstanceOf(InvalidArgumentTypeError);
      expect(type).toBeInstanceOf(TypeError);
      expect(type).toBeInstanceOf(VattentionError);
      expect(range).toBeInstanceOf(InvalidArgumentRangeError);
      expect(range).toBeInstanceOf(RangeError);
      expect(range).toBeInstanceOf(VattentionError);
      expect(new Error('plain')).not.toBeInstanceOf(VattentionError);
      expect(range).not.toBeInstanceOf(InvalidArgumentTypeError); // the subclasses still tell them apart
    });

    it('options.memoryBudget reports the budget the cache chose when defaulted', () => {
      const c = new KVCache({ ...b.options, memoryBudget: undefined, prefetchTokens: 0 });
      open.push(c);
      expect(c.options.memoryBudget).toBe(BigInt(c.stats().budgetBytes));
      expect(c.options.memoryBudget > 0n).toBe(true);
      const given = make();
      expect(given.options.memoryBudget).toBe(BigInt(b.options.memoryBudget!));
    });

    it("a metrics prefix ending in '_' is not doubled", () => {
      const c = make();
      expect(c.metrics({ prefix: 'nc_' })).toContain('nc_budget_bytes ');
      expect(c.metrics({ prefix: 'nc_' })).not.toContain('nc__');
      expect(c.metrics({ prefix: 'nc' })).toContain('nc_budget_bytes ');
    });
  });
}
