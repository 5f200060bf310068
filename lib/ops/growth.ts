/**
 * Growth: grow, step, stepAsync, growAsync. A step's batch is read into
 * scratch arrays reused from call to call (a decode loop makes no garbage).
 */
import type { GrowAsyncOptions } from '../call-options.js';
import {
  AbortedError,
  ClosedError,
  InvalidArgumentRangeError,
  InvalidArgumentTypeError,
  ReentrantCallError,
  SequenceReleasedError,
  fromNative,
} from '../errors.js';
import { checkObject, describe } from '../options.js';
import type { Sequence } from '../sequence.js';
import type { CacheContext } from './context.js';

export function grow(ctx: CacheContext, seq: Sequence, tokens: number): void {
  const native = ctx.open();
  const generation = ctx.check(seq);
  ctx.checkTokens(tokens);
  ctx.afterGrowth('grow', ctx.call(() => native.grow(seq.slot, generation, tokens), 'grow'));
}

/** The batch of a step, checked, in arrays the native side reads. */
export class StepBatch {
  slots = new Uint32Array(64);
  generations = new Uint32Array(64);
  tokens = new Uint32Array(64);
  #filling = false;
  // seen[slot] === pass: the slot is in this batch already (no clearing per call)
  #seen = new Uint32Array(0);
  #pass = 0;

  /**
   * Checks step()'s arguments into the arrays; returns the entries. A getter
   * on them that called step() again would overwrite the entries being read:
   * refused.
   */
  fill(ctx: CacheContext, call: string, seqs: readonly Sequence[], tokens: readonly number[] | number): number {
    if (this.#filling) throw new ReentrantCallError(`${call}() was called from inside step() (a getter or proxy on its arguments)`);
    this.#filling = true;
    try {
      return this.#fill(ctx, seqs, tokens);
    } finally {
      this.#filling = false;
    }
  }

  #fill(ctx: CacheContext, seqs: readonly Sequence[], tokens: readonly number[] | number): number {
    if (!Array.isArray(seqs)) throw new InvalidArgumentTypeError('seqs', `must be an array of Sequence, got ${describe(seqs)}`);
    const n = seqs.length;
    if (typeof tokens !== 'number' && !Array.isArray(tokens))
      throw new InvalidArgumentTypeError('tokens', `must be a number or an array of numbers, got ${describe(tokens)}`);
    if (Array.isArray(tokens) && tokens.length !== n)
      throw new InvalidArgumentRangeError('tokens', `has ${tokens.length} entries for ${n} sequences`);
    if (this.slots.length < n) this.#resize(Math.max(n, this.slots.length * 2));
    if (this.#seen.length !== ctx.options.maxSequences) this.#seen = new Uint32Array(ctx.options.maxSequences);
    if (++this.#pass === 0xffff_ffff) {
      this.#seen.fill(0);
      this.#pass = 1;
    }
    for (let i = 0; i < n; i++) {
      const seq = seqs[i]!;
      const generation = ctx.check(seq);
      if (this.#seen[seq.slot] === this.#pass)
        throw new InvalidArgumentRangeError(`seqs[${i}]`, `is a sequence already in the batch (slot ${seq.slot}): each sequence once per step`);
      this.#seen[seq.slot] = this.#pass;
      const t = typeof tokens === 'number' ? tokens : tokens[i];
      if (typeof t !== 'number') throw new InvalidArgumentTypeError(`tokens[${i}]`, `must be a number, got ${describe(t)}`);
      if (!Number.isInteger(t) || t < 0 || t > 0xffff_ffff)
        throw new InvalidArgumentRangeError(`tokens[${i}]`, `must be a non-negative integer, got ${t}`);
      this.slots[i] = seq.slot;
      this.generations[i] = generation;
      this.tokens[i] = t;
    }
    return n;
  }

  #resize(size: number): void {
    this.slots = new Uint32Array(size);
    this.generations = new Uint32Array(size);
    this.tokens = new Uint32Array(size);
  }
}

export function step(ctx: CacheContext, batch: StepBatch, seqs: readonly Sequence[], tokens: readonly number[] | number): void {
  const native = ctx.open();
  const n = batch.fill(ctx, 'step', seqs, tokens);
  const reclaimed = ctx.call(() => native.step(batch.slots, batch.generations, batch.tokens, n), 'step');
  ctx.afterGrowth('step', reclaimed);
}

export async function stepAsync(
  ctx: CacheContext,
  batch: StepBatch,
  seqs: readonly Sequence[],
  tokens: readonly number[] | number,
): Promise<void> {
  const native = ctx.open();
  const n = batch.fill(ctx, 'stepAsync', seqs, tokens);
  if (ctx.call(() => native.stepIfBacked(batch.slots, batch.generations, batch.tokens, n), 'step')) return;
  let reclaimed: number;
  try {
    reclaimed = await ctx.callAsync(() => native.stepAsync(batch.slots, batch.generations, batch.tokens, n));
  } catch (e) {
    throw ctx.noteOutOfMemory(e, 'step');
  }
  ctx.afterGrowth('step', reclaimed);
}

export async function growAsync(ctx: CacheContext, seq: Sequence, tokens: number, options?: GrowAsyncOptions): Promise<void> {
  const native = ctx.open();
  const generation = ctx.check(seq);
  ctx.checkTokens(tokens);
  const signal = checkObject('options', options, true, ['signal']).signal;
  if (signal !== undefined && !(signal instanceof AbortSignal))
    throw new InvalidArgumentTypeError('options.signal', `must be an AbortSignal, got ${describe(signal)}`);
  if (signal?.aborted) throw new AbortedError('the growth was aborted before it started');
  const [promise, cancel] = ctx.call(() => native.growAsync(seq.slot, generation, tokens));
  signal?.addEventListener('abort', cancel, { once: true });
  try {
    await promise;
  } catch (e) {
    throw ctx.noteOutOfMemory(fromNative(e), 'growAsync');
  } finally {
    signal?.removeEventListener('abort', cancel);
  }
  // Released (or swapped out) while the growth ran: nothing is backed for
  // the caller, who must not go on as if it were.
  if (ctx.native === null) throw new ClosedError('the KV cache was closed during growAsync');
  if (seq.released) throw new SequenceReleasedError(`the sequence in slot ${seq.slot} was released during growAsync`);
}
