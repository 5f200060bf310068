// vattention/prom-client against the real prom-client: the cache's metrics in
// a registry, the same names and values as metrics(), one stats() per scrape.
import { Registry } from 'prom-client';
import { describe, expect, it } from 'vitest';
import { KVCache } from '../lib/index.js';
import { registerCacheMetrics } from '../lib/prom-client.js';
import { backends } from './backends.js';

const host = backends.find((b) => b.name === 'host')!;

function sample(text: string, line: string): number {
  const found = text.split('\n').find((l) => l.startsWith(line + ' '));
  if (!found) throw new Error(`no sample ${line} in:\n${text}`);
  return Number(found.slice(line.length + 1));
}

describe('prom-client integration', () => {
  it('registers gauges and counters whose values follow the cache, with the given prefix and labels', async () => {
    const cache = new KVCache({ ...host.options, prefetchTokens: 0 });
    const registry = new Registry();
    const unregister = registerCacheMetrics(cache, { registry, prefix: 'kv', labels: { model: 'tiny' } });
    const seq = cache.reserve();
    cache.grow(seq, 40);
    let text = await registry.metrics();
    const s = cache.stats();
    expect(sample(text, 'kv_backed_bytes{model="tiny"}')).toBe(s.bytesBacked);
    expect(sample(text, 'kv_used_bytes{model="tiny"}')).toBe(s.bytesUsed);
    expect(sample(text, 'kv_pages{model="tiny",state="mapped"}')).toBe(s.pagesMapped);
    expect(sample(text, 'kv_driver_calls_total{model="tiny",op="map"}')).toBe(s.driverCalls.map!.calls);
    expect(text).toContain('# TYPE kv_pages_reclaimed_total counter');
    expect(text).toContain('# TYPE kv_backed_bytes gauge');
    // the same families as metrics()
    const names = (t: string) => t.split('\n').filter((l) => l.startsWith('# TYPE')).sort();
    expect(names(text)).toEqual(names(cache.metrics({ prefix: 'kv' })));
    // counters follow the cache (monotonic)
    cache.grow(seq, 90);
    await new Promise((r) => setTimeout(r, 60));
    text = await registry.metrics();
    expect(sample(text, 'kv_driver_calls_total{model="tiny",op="map"}')).toBe(cache.stats().driverCalls.map!.calls);
    // a closed cache reports no samples, and the scrape still works
    cache.close();
    await new Promise((r) => setTimeout(r, 60));
    text = await registry.metrics();
    expect(text).not.toMatch(/kv_backed_bytes\{/);
    unregister();
    expect(await registry.metrics()).toBe('\n');
  });

  it('issue 27 item 25: a closed cache registered without labels reports no samples (not 0)', async () => {
    const cache = new KVCache({ ...host.options, prefetchTokens: 0 });
    const registry = new Registry();
    const unregister = registerCacheMetrics(cache, { registry });
    cache.grow(cache.reserve(), 10);
    expect(sample(await registry.metrics(), 'vattention_backed_bytes')).toBe(cache.stats().bytesBacked);
    cache.close();
    await new Promise((r) => setTimeout(r, 60));
    const text = await registry.metrics();
    expect(text).toContain('# TYPE vattention_backed_bytes gauge');
    expect(text).not.toMatch(/^vattention_backed_bytes /m);
    unregister();
  });

  it('issue 27 item 25: a second cache under the same names is ERR_INVALID_ARGUMENT, registering nothing; with its own labels it works', async () => {
    const a = new KVCache({ ...host.options, prefetchTokens: 0 });
    const b = new KVCache({ ...host.options, prefetchTokens: 0 });
    try {
      const registry = new Registry();
      const unregister = registerCacheMetrics(a, { registry });
      const before = await registry.metrics();
      expect(() => registerCacheMetrics(b, { registry })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }));
      expect((await registry.metrics()).split('\n').length).toBe(before.split('\n').length);
      unregister();
      const other = new Registry();
      registerCacheMetrics(b, { registry: other, labels: { cache: 'b' } });
      expect(sample(await other.metrics(), 'vattention_backed_bytes{cache="b"}')).toBe(0);
    } finally {
      a.close();
      b.close();
    }
  });

  it('refuses a missing registry and bad labels with a code', () => {
    const cache = new KVCache({ ...host.options, prefetchTokens: 0 });
    try {
      expect(() => registerCacheMetrics(cache, {} as never)).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }));
      expect(() => registerCacheMetrics(cache, { registry: new Registry(), labels: { a: 1 } as never })).toThrow(
        expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }),
      );
    } finally {
      cache.close();
    }
  });
});
