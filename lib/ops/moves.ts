/**
 * Memory moving under a running cache: swap a sequence to host memory and
 * back, suspend and resume the whole cache, reclaim and trim.
 */
import type { SuspendOptions, SwapOutOptions } from '../call-options.js';
import { InvalidArgumentRangeError, InvalidArgumentTypeError } from '../errors.js';
import { checkBytes, checkObject, describe } from '../options.js';
import { Sequence, SwappedSequence } from '../sequence.js';
import type { CacheContext } from './context.js';
import { STREAM_KEYS } from './placement.js';

export async function swapOut(ctx: CacheContext, seq: Sequence, options?: SwapOutOptions): Promise<SwappedSequence> {
  const native = ctx.open();
  const generation = ctx.check(seq);
  const streams = ctx.streamsOption(checkObject('options', options, true, STREAM_KEYS));
  // The tokens the copy holds, not those before the call: a growth still
  // running (growAsync) ends before the copy starts.
  const [handle, tokens] = await ctx.callAsync(() => native.swapOut(seq.slot, generation, streams));
  Sequence.markReleased(seq);
  const discard = (h: number) => ctx.open().discardSwapped(h);
  return new SwappedSequence(ctx.cache, handle, tokens, tokens * ctx.cache.bytesPerToken, discard);
}

export async function swapIn(ctx: CacheContext, swapped: SwappedSequence): Promise<Sequence> {
  const native = ctx.open();
  const handle = SwappedSequence.beginSwapIn(swapped, ctx.cache);
  let ok = false;
  try {
    const [slot, generation] = await ctx.callAsync(() => native.swapIn(handle));
    ok = true;
    return new Sequence(ctx.cache, slot, generation);
  } finally {
    SwappedSequence.endSwapIn(swapped, ok);
  }
}

export async function suspend(ctx: CacheContext, options?: SuspendOptions): Promise<void> {
  const native = ctx.open();
  const keep = checkObject('options', options, true, ['keep']).keep ?? 'none';
  if (keep !== 'none' && keep !== 'host') {
    if (typeof keep !== 'string') throw new InvalidArgumentTypeError('options.keep', `must be 'none' or 'host', got ${describe(keep)}`);
    throw new InvalidArgumentRangeError('options.keep', `must be 'none' or 'host', got '${keep}'`);
  }
  await ctx.callAsync(() => native.suspend(keep === 'host'));
}

export async function resume(ctx: CacheContext): Promise<void> {
  const native = ctx.open();
  await ctx.callAsync(() => native.resume());
}

export function suspended(ctx: CacheContext): boolean {
  const native = ctx.native;
  return native !== null && ctx.options.devices.some((_, i) => native.stats(i).suspended);
}

export function reclaim(ctx: CacheContext, bytes?: number | bigint): number {
  const native = ctx.open();
  const b = bytes === undefined ? undefined : checkBytes('bytes', bytes, 0n);
  if (b === 0n) return 0;
  return ctx.call(() => native.reclaim(b === undefined || b > BigInt(Number.MAX_SAFE_INTEGER) ? undefined : Number(b)));
}

export function trim(ctx: CacheContext): number {
  const native = ctx.open();
  return ctx.call(() => native.trim());
}
