// Metrics and events for servers.
import { describe, expect, it } from 'vitest';
import { KVCache } from '../lib/index.js';
import { backends } from './backends.js';

const host = backends[0]!.options;

describe('metrics and events', () => {
  it('metrics() is Prometheus text with the usual names, units and labels', () => {
    using c = new KVCache({ ...host, prefetchTokens: 0 });
    const seq = c.reserve();
    c.grow(seq, 20);
    const text = c.metrics({ labels: { cache: 'test "one"' } });
    const s = c.stats();
    expect(text).toContain('# TYPE vattention_backed_bytes gauge');
    expect(text).toContain(`vattention_backed_bytes{cache="test \\"one\\""} ${s.bytesBacked}`);
    expect(text).toContain(`vattention_used_bytes{cache="test \\"one\\""} ${20 * c.bytesPerToken}`);
    expect(text).toContain(`vattention_pages{cache="test \\"one\\"",state="mapped"} ${s.pagesMapped}`);
    expect(text).toContain('# TYPE vattention_driver_calls_total counter');
    expect(text).toMatch(/vattention_driver_calls_total\{cache="test \\"one\\"",op="map"\} \d+/);
    expect(text).toMatch(/vattention_driver_call_seconds_total\{cache="test \\"one\\"",op="setAccess"\} [0-9.e-]+/);
    expect(text).toContain('vattention_prefetch_hits_total');
    expect(text).toContain('vattention_stall_seconds_total');
    // every sample line is `name{labels} number`
    for (const line of text.trim().split('\n').filter((l) => !l.startsWith('#')))
      expect(line).toMatch(/^[a-z_]+(\{[^}]*\})? -?[0-9.e+-]+$/);
    expect(() => c.metrics({ labels: { 'bad-name': 'x' } })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }));
  });

  it("emits 'reclaim' when a growth takes pages from released slots, and 'outOfMemory' when refused", () => {
    using c = new KVCache({ ...host, prefetchTokens: 0 });
    const reclaims: unknown[] = [];
    const ooms: unknown[] = [];
    c.on('reclaim', (e) => reclaims.push(e));
    c.on('outOfMemory', (e) => ooms.push(e));
    const a = c.reserve();
    const d = c.reserve();
    c.grow(a, host.maxTokens);
    expect(() => c.grow(d, host.maxTokens)).toThrow();
    expect(ooms).toEqual([expect.objectContaining({ operation: 'grow', requestedBytes: expect.any(Number) })]);
    c.release(a);
    c.grow(d, host.maxTokens);
    expect(reclaims).toEqual([expect.objectContaining({ operation: 'grow', pages: expect.any(Number) })]);
    expect((reclaims[0] as { bytes: number }).bytes).toBe((reclaims[0] as { pages: number }).pages * c.pageSize);
  });
});
