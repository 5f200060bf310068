/**
 * Placing sequences and taking them out: reserve (with or without a shared
 * prefix), fork, release. The decisions (which slot, what is shared) are the
 * native core's; this checks the arguments and wraps the result.
 */
import type { ForkOptions, PublishOptions, ReleaseOptions, ReserveOptions } from '../call-options.js';
import { ForeignSequenceError, InvalidArgumentRangeError, InvalidArgumentTypeError } from '../errors.js';
import type { NativeCache } from '../native.js';
import { checkBytes, checkInteger, checkObject, describe } from '../options.js';
import { Sequence } from '../sequence.js';
import type { CacheContext } from './context.js';

// The keys each call's options object may hold (anything else is ERR_INVALID_ARGUMENT).
export const STREAM_KEYS = ['stream', 'streams'] as const;
const FORK_KEYS = ['tokens', 'stream', 'streams'] as const;
const RESERVE_KEYS = ['expectedTokens', 'prefix', 'stream', 'streams', 'tokens', 'salt'] as const;

type Streams = (bigint | undefined)[] | undefined;
interface ReservePlan {
  expected?: number;
  share?: { slot: number; generation: number; tokens: number; stream: Streams };
  /** options.tokens given: a prefix-cache lookup (the options, checked later). */
  cached?: Record<string, unknown>;
}

export function reserve(ctx: CacheContext, options?: ReserveOptions): Sequence {
  const native = ctx.open();
  const plan = reservePlan(ctx, options);
  if (plan.cached) return reserveCached(ctx, plan.cached, plan.expected);
  if (plan.share) {
    const { slot: s, generation: g, tokens, stream } = plan.share;
    const [slot, gen] = ctx.call(() => native.share(s, g, tokens, true, stream));
    return new Sequence(ctx.cache, slot, gen);
  }
  const [slot, generation] = ctx.call(() => native.reserve(plan.expected));
  return new Sequence(ctx.cache, slot, generation);
}

export async function reserveAsync(ctx: CacheContext, options?: ReserveOptions): Promise<Sequence> {
  const native = ctx.open();
  const plan = reservePlan(ctx, options);
  if (plan.cached) return reserveCachedAsync(ctx, plan.cached, plan.expected);
  if (!plan.share) return reserve(ctx, options);
  const { slot: s, generation: g, tokens, stream } = plan.share;
  const [slot, gen] = await ctx.callAsync(() => native.shareAsync(s, g, tokens, true, stream));
  return new Sequence(ctx.cache, slot, gen);
}

function reservePlan(ctx: CacheContext, options: unknown): ReservePlan {
  const o = checkObject('options', options, true, RESERVE_KEYS);
  const expected =
    o.expectedTokens === undefined ? undefined : checkInteger('options.expectedTokens', o.expectedTokens, 0, ctx.options.maxTokens);
  if (o.tokens !== undefined) return { expected, cached: o };
  if (o.salt !== undefined) throw new InvalidArgumentRangeError('options.salt', 'only applies with options.tokens');
  if (o.prefix !== undefined) {
    const p = checkObject('options.prefix', o.prefix, false, ['from', 'tokens']);
    const generation = Sequence.reservedGeneration(p.from);
    if (generation === undefined)
      throw new InvalidArgumentTypeError('options.prefix.from', `must be a Sequence from reserve(), got ${describe(p.from)}`);
    const from = p.from as Sequence;
    if (from.cache !== ctx.cache) throw new ForeignSequenceError(`the sequence in slot ${from.slot} belongs to another cache`);
    const tokens = checkInteger('options.prefix.tokens', p.tokens, 0, ctx.options.maxTokens);
    const stream = ctx.streamsOption(o);
    return { expected, share: { slot: from.slot, generation, tokens, stream } };
  }
  if (o.stream !== undefined) throw new InvalidArgumentRangeError('options.stream', 'only applies with options.prefix');
  if (o.streams !== undefined) throw new InvalidArgumentRangeError('options.streams', 'only applies with options.prefix');
  return { expected };
}

export function fork(ctx: CacheContext, seq: Sequence, options?: ForkOptions): Sequence {
  const { native, generation, tokens, copyLast, stream } = forkPlan(ctx, seq, options);
  const [slot, gen] = ctx.call(() => native.share(seq.slot, generation, tokens, false, stream, copyLast));
  return new Sequence(ctx.cache, slot, gen);
}

export async function forkAsync(ctx: CacheContext, seq: Sequence, options?: ForkOptions): Promise<Sequence> {
  const { native, generation, tokens, copyLast, stream } = forkPlan(ctx, seq, options);
  const [slot, gen] = await ctx.callAsync(() => native.shareAsync(seq.slot, generation, tokens, false, stream, copyLast));
  return new Sequence(ctx.cache, slot, gen);
}

/**
 * The tokens a fork shares and whether its last backed token's group is
 * copied (the default: see ForkOptions.tokens).
 */
function forkPlan(ctx: CacheContext, seq: Sequence, options: unknown) {
  const native: NativeCache = ctx.open();
  const generation = ctx.check(seq);
  const o = checkObject('options', options, true, FORK_KEYS);
  const stream = ctx.streamsOption(o);
  const backed = ctx.call(() => native.tokens(seq.slot, generation));
  const copyLast = o.tokens === undefined;
  const tokens = copyLast ? backed : checkInteger('options.tokens', o.tokens, 0, backed);
  return { native, generation, tokens, copyLast, stream };
}

export function release(ctx: CacheContext, seq: Sequence, options?: ReleaseOptions): void {
  const native = ctx.open();
  const generation = ctx.check(seq);
  const streams = ctx.streamsOption(checkObject('options', options, true, STREAM_KEYS));
  ctx.call(() => native.release(seq.slot, generation, streams));
  Sequence.markReleased(seq);
}

// ---- prefix caching ----------------------------------------------------------------

/** Token ids checked into the array the native side reads. */
export function tokenIds(name: string, ids: unknown): Uint32Array {
  if (ids instanceof Uint32Array) return ids;
  if (ids instanceof Int32Array) {
    for (let i = 0; i < ids.length; i++)
      if (ids[i]! < 0) throw new InvalidArgumentRangeError(`${name}[${i}]`, `must be a token id in [0, 2^32), got ${ids[i]}`);
    return new Uint32Array(ids.buffer, ids.byteOffset, ids.length);
  }
  if (!Array.isArray(ids))
    throw new InvalidArgumentTypeError(name, `must be an Int32Array, Uint32Array or array of token ids, got ${describe(ids)}`);
  const out = new Uint32Array(ids.length);
  for (let i = 0; i < ids.length; i++) {
    const id: unknown = ids[i];
    if (typeof id !== 'number') throw new InvalidArgumentTypeError(`${name}[${i}]`, `must be a number, got ${describe(id)}`);
    if (!Number.isInteger(id) || id < 0 || id > 0xffff_ffff)
      throw new InvalidArgumentRangeError(`${name}[${i}]`, `must be a token id in [0, 2^32), got ${id}`);
    out[i] = id;
  }
  return out;
}

function saltOf(value: unknown): bigint {
  return value === undefined ? 0n : checkBytes('options.salt', value as number | bigint, 0n);
}

function cachedPlan(ctx: CacheContext, o: Record<string, unknown>, expected: number | undefined) {
  if (o.prefix !== undefined) throw new InvalidArgumentRangeError('options.tokens', 'give prefix or tokens, not both');
  if (o.stream !== undefined || o.streams !== undefined)
    throw new InvalidArgumentRangeError('options.stream', 'only applies with options.prefix');
  const ids = tokenIds('options.tokens', o.tokens);
  if (ids.length > ctx.options.maxTokens)
    throw new InvalidArgumentRangeError('options.tokens', `has ${ids.length} ids, more than maxTokens (${ctx.options.maxTokens})`);
  return { ids, salt: saltOf(o.salt), expected };
}

/** reserve({ tokens }): the longest cached prefix, shared; cachedTokens from the sequence's backed length. */
function reserveCached(ctx: CacheContext, o: Record<string, unknown>, expected: number | undefined): Sequence {
  const native = ctx.open();
  const { ids, salt } = cachedPlan(ctx, o, expected);
  const [slot, gen] = ctx.call(() => native.reserveCached(ids, salt, expected));
  return new Sequence(ctx.cache, slot, gen, ctx.call(() => native.tokens(slot, gen)));
}

async function reserveCachedAsync(ctx: CacheContext, o: Record<string, unknown>, expected: number | undefined): Promise<Sequence> {
  const native = ctx.open();
  const { ids, salt } = cachedPlan(ctx, o, expected);
  const [slot, gen] = await ctx.callAsync(() => native.reserveCachedAsync(ids, salt, expected));
  return new Sequence(ctx.cache, slot, gen, ctx.call(() => ctx.open().tokens(slot, gen)));
}

export function publish(ctx: CacheContext, seq: Sequence, tokens: unknown, options?: PublishOptions): void {
  const native = ctx.open();
  const generation = ctx.check(seq);
  const ids = tokenIds('tokens', tokens);
  const salt = saltOf(checkObject('options', options, true, ['salt']).salt);
  ctx.call(() => native.publish(seq.slot, generation, ids, salt));
}
