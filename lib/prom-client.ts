/**
 * `vattention/prom-client`: a cache's metrics in a prom-client registry, for
 * servers that already expose one. prom-client is an optional peer
 * dependency: this module never loads it, it only needs the registry. The metrics and their
 * names are those of `cache.metrics()`; each scrape reads `cache.stats()` once.
 */
import { ClosedError, InvalidArgumentRangeError, InvalidArgumentTypeError } from './errors.js';
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

/**
 * A metric as a prom-client registry collects it (any prom-client >= 14):
 * `get()` gives its samples at scrape time. Written here rather than made
 * from prom-client's Gauge and Counter, which always report an unlabelled
 * metric's sample (0 when unset): a closed cache must report none.
 */
interface CollectedMetric {
  name: string;
  help: string;
  type: 'gauge' | 'counter';
  aggregator: 'sum';
  get(): Promise<{ name: string; help: string; type: string; aggregator: 'sum'; values: { labels: Record<string, string>; value: number }[] }>;
  reset(): void;
}

/**
 * Registers the cache's gauges and counters in `options.registry`. Returns a
 * function that removes them again (call it before `cache.close()` when the
 * registry outlives the cache; a closed cache's metrics report no samples).
 * A name the registry holds already (another cache registered with the same
 * prefix and no distinguishing labels) is ERR_INVALID_ARGUMENT, with nothing
 * registered.
 */
export function registerCacheMetrics(cache: KVCache, options: RegisterOptions): () => void {
  const { registry, ...rest } = (options ?? {}) as RegisterOptions;
  if (typeof registry?.registerMetric !== 'function' || typeof registry.removeSingleMetric !== 'function')
    throw new InvalidArgumentTypeError('options.registry', 'must be a prom-client Registry');
  const { prefix, labels: base } = checkMetricsOptions(rest);
  const families = metricFamilies(cache.stats());
  // One stats() per scrape: the registry collects the metrics one after another.
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
  const unregister = () => {
    for (const name of names.splice(0)) registry.removeSingleMetric(name);
  };
  for (const [index, family] of families.entries()) {
    const name = `${prefix}_${family.name}`;
    const metric: CollectedMetric = {
      name,
      help: family.help,
      type: family.type,
      aggregator: 'sum',
      async get() {
        const samples = current()?.[index]?.samples ?? [];
        return { name, help: family.help, type: family.type, aggregator: 'sum', values: samples.map(([labels, value]) => ({ labels: { ...base, ...labels }, value })) };
      },
      reset() {}, // the values are the cache's: nothing to reset
    };
    try {
      registry.registerMetric(metric);
    } catch (e) {
      unregister(); // all or nothing
      throw new InvalidArgumentRangeError('options.registry', `cannot register ${name}: ${(e as Error).message} (give each cache its own prefix or labels)`);
    }
    names.push(name);
  }
  return unregister;
}
