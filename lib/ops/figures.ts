/**
 * What a scheduler and a dashboard read: stats over every device, the
 * layout's page group, and the admission figures (bytesForTokens, fits,
 * obtainableBytes). None makes a driver call.
 */
import type { CacheStats, DeviceStats, LayoutStats } from '../stats.js';
import { sumDeviceStats } from '../stats.js';
import { InvalidArgumentTypeError } from '../errors.js';
import { checkInteger, checkObject, describe } from '../options.js';
import type { CacheContext } from './context.js';

export function stats(ctx: CacheContext): CacheStats {
  const native = ctx.open();
  const l = layout(ctx);
  const own = ctx.options.devices.map((_, i) => ctx.call(() => native.stats(i)));
  // The layout is the same on every device: attached after the sum, not added up.
  const perDevice: DeviceStats[] = own.map((st, i) => ({ ...st, layout: l, device: ctx.options.devices[i]! }));
  return { ...sumDeviceStats(own), layout: l, devices: perDevice };
}

export function layout(ctx: CacheContext): LayoutStats {
  const l = ctx.layout;
  return {
    name: l.layout,
    layerGroups: l.layerGroups,
    pagesPerPageGroup: l.pagesPerGroup,
    bytesPerPageGroup: l.pagesPerGroup * l.pageSize,
    tokensPerPageGroup: l.pageSize / l.tokenPitch,
  };
}

export function bytesForTokens(ctx: CacheContext, tokens: number): number {
  ctx.open();
  checkInteger('tokens', tokens, 0, ctx.options.maxTokens);
  const l = ctx.layout;
  return Math.ceil((tokens * l.tokenPitch) / l.pageSize) * l.pagesPerGroup * l.pageSize;
}

export function fits(ctx: CacheContext, tokens: number): boolean {
  ctx.open();
  checkInteger('tokens', tokens, 0, Number.MAX_SAFE_INTEGER);
  if (tokens > ctx.options.maxTokens) return false;
  const bytes = bytesForTokens(ctx, tokens);
  ctx.budgetBytes ??= Math.min(...stats(ctx).devices.map((d) => d.budgetBytes));
  return bytes <= ctx.budgetBytes;
}

export function obtainableBytes(ctx: CacheContext, options?: { lookAhead?: boolean }): number {
  const native = ctx.open();
  const o = checkObject('options', options, true, ['lookAhead']);
  if (o.lookAhead !== undefined && typeof o.lookAhead !== 'boolean')
    throw new InvalidArgumentTypeError('options.lookAhead', `must be a boolean, got ${describe(o.lookAhead)}`);
  return ctx.call(() => native.obtainableBytes(o.lookAhead !== false));
}
