/**
 * `vattention/prom-client`: a cache's metrics in a prom-client registry, for
 * servers that already expose one. prom-client is an optional peer
 * dependency: this module loads it only when called. The metrics and their
 * names are those of `cache.metrics()`; each scrape reads `cache.stats()` once.
 */
import { ClosedError, InvalidArgumentTypeError } from './errors.js';
import type { KVCache } from './kv-cache.js';
import { checkMetricsOptions, metricFamilies, type MetricFamily, type MetricsOptions } from './metrics.js';
import type { CacheStats } from './stats.js';

/** The parts of a prom-client `Registry` used here (any prom-client ≥ 14). */
export interface PromRegistry {
  registerMetric(metric: unknown): void;
  removeSingleMetric(name: string): void;
}

export interface RegisterOptions extends MetricsOptions {
  /** The registry to add the cache's metrics to (e.g. prom-client's `register`). */
  registry: PromRegistry;
}

interface PromMetric {
  reset(): void;
  set?(labels: Record<string, string>, value: number): void;
  inc?(labels: Record<string, string>, value: number): void;
}

type MetricClass = new (config: {
  name: string;
  help: string;
  labelNames: string[];
  registers: unknown[];
  collect(this: PromMetric): void;
}) => PromMetric;

/**
 * Registers the cache's gauges and counters in `options.registry`. Returns a
 * function that removes them again (call it before `cache.close()` when the
 * registry outlives the cache; a closed cache's metrics report no samples).
 */
export function registerCacheMetrics(cache: KVCache, options: RegisterOptions): () => void {
  const { registry, ...rest } = (options ?? {}) as RegisterOptions;
  if (typeof registry?.registerMetric !== 'function' || typeof registry.removeSingleMetric !== 'function')
    throw new InvalidArgumentTypeError('options.registry', 'must be a prom-client Registry');
  const { prefix, labels: base } = checkMetricsOptions(rest);
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const prom = require('prom-client') as { Gauge: MetricClass; Counter: MetricClass };
  const families = metricFamilies(cache.stats());
  // One stats() per scrape: prom-client collects the metrics one after another.
  let snapshot: { at: number; families: MetricFamily[] | null } = { at: -Infinity, families: null };
  const current = (): MetricFamily[] | null => {
    const now = performance.now();
    if (now - snapshot.at > 50) {
      let stats: CacheStats | null = null;
      try {
        stats = cache.stats();
      } catch (e) {
        if (!(e instanceof ClosedError)) throw e;
      }
      snapshot = { at: now, families: stats && metricFamilies(stats) };
    }
    return snapshot.families;
  };
  const names: string[] = [];
  for (const [index, family] of families.entries()) {
    const labelNames = [...new Set([...Object.keys(base), ...family.samples.flatMap(([l]) => Object.keys(l))])];
    const name = `${prefix}_${family.name}`;
    const Metric = family.type === 'gauge' ? prom.Gauge : prom.Counter;
    const metric = new Metric({
      name,
      help: family.help,
      labelNames,
      registers: [],
      collect(this: PromMetric) {
        this.reset();
        const now = current()?.[index];
        if (!now) return;
        for (const [labels, value] of now.samples) {
          if (this.set) this.set({ ...base, ...labels }, value);
          else this.inc!({ ...base, ...labels }, value); // a counter's total: reset, then its current value
        }
      },
    });
    registry.registerMetric(metric);
    names.push(name);
  }
  return () => {
    for (const name of names) registry.removeSingleMetric(name);
  };
}
