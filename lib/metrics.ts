/**
 * Prometheus text exposition of a cache's statistics (format 0.0.4), with
 * the usual names and base units (bytes, seconds, `_total` for counters).
 * `stats()` stays the source: this only formats it.
 */
import { InvalidArgumentRangeError, InvalidArgumentTypeError } from './errors.js';
import { checkObject, describe } from './options.js';
import type { CacheStats } from './stats.js';

export interface MetricsOptions {
  /** Prefix of every metric name. Default 'vattention'. */
  prefix?: string;
  /** Labels added to every sample, e.g. { cache: 'llama-8b' }. */
  labels?: Record<string, string>;
}

function escapeLabel(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');
}

function labelText(labels: Record<string, string>): string {
  const entries = Object.entries(labels);
  if (entries.length === 0) return '';
  return `{${entries.map(([k, v]) => `${k}="${escapeLabel(v)}"`).join(',')}}`;
}

/** The caller's labels, checked: valid Prometheus names, string values. */
function checkLabels(labels: unknown): Record<string, string> {
  if (labels === undefined) return {};
  const o = checkObject('options.labels', labels, false);
  for (const [k, v] of Object.entries(o)) {
    if (!/^[a-zA-Z_][a-zA-Z0-9_]*$/.test(k)) throw new InvalidArgumentRangeError('options.labels', `'${k}' is not a valid Prometheus label name`);
    if (typeof v !== 'string') throw new InvalidArgumentTypeError(`options.labels.${k}`, `must be a string, got ${describe(v)}`);
  }
  return o as Record<string, string>;
}

/** One metric and its samples, before formatting: shared by metrics() and the prom-client collector. */
export interface MetricFamily {
  name: string;
  type: 'gauge' | 'counter';
  help: string;
  samples: [Record<string, string>, number][];
}

/**
 * The metrics a cache exports, from one statistics snapshot. A cache over
 * several devices exports each device's figures with a `device` label (the
 * CUDA ordinal), so that sums over the label are the cache's totals.
 */
export function metricFamilies(stats: CacheStats): MetricFamily[] {
  const devices = stats.devices ?? [];
  if (devices.length <= 1) return familiesOf(stats);
  const perDevice = devices.map((d) => ({ device: String(d.device), families: familiesOf({ ...d, devices: [] }) }));
  return perDevice[0]!.families.map((family, i) => ({
    ...family,
    samples: perDevice.flatMap(({ device, families }) =>
      families[i]!.samples.map(([labels, value]): [Record<string, string>, number] => [{ ...labels, device }, value]),
    ),
  }));
}

function familiesOf(stats: CacheStats): MetricFamily[] {
  const families: MetricFamily[] = [];
  const metric = (name: string, type: 'gauge' | 'counter', help: string, samples: [Record<string, string>, number][]) =>
    families.push({ name, type, help, samples });
  metric('page_size_bytes', 'gauge', 'Bytes per physical page.', [[{ backend: stats.backend }, stats.pageSize]]);
  metric('page_group_bytes', 'gauge', 'Bytes one growth step maps: a page of every tensor of the layout.', [[{ layout: stats.layout.name }, stats.layout.bytesPerPageGroup]]);
  metric('page_group_tokens', 'gauge', 'Tokens one page group holds.', [[{ layout: stats.layout.name }, stats.layout.tokensPerPageGroup]]);
  metric('budget_bytes', 'gauge', 'Bytes of physical memory the cache may back.', [[{}, stats.budgetBytes]]);
  metric('backed_bytes', 'gauge', 'Bytes of physical pages mapped into sequences.', [[{}, stats.bytesBacked]]);
  metric('used_bytes', 'gauge', 'Bytes holding tokens of active sequences.', [[{}, stats.bytesUsed]]);
  metric('memory_bytes', 'gauge', 'Physical memory by what it holds: tokens, the rest of the page groups they need, whole page groups past them (look-ahead, inherited), kept by released slots, idle in the pool.', [
    [{ kind: 'tokens' }, stats.bytesUsed],
    [{ kind: 'page_rounding' }, stats.bytesPageRounding],
    [{ kind: 'spare_groups' }, stats.bytesSpareGroups],
    [{ kind: 'released_slots' }, stats.bytesInReleasedSlots],
    [{ kind: 'pooled' }, stats.bytesPooled],
  ]);
  metric('pages', 'gauge', 'Physical pages by state.', [
    [{ state: 'mapped' }, stats.pagesMapped],
    [{ state: 'pooled' }, stats.pagesPooled],
    [{ state: 'stranded' }, stats.pagesStranded],
    [{ state: 'suspended' }, stats.pagesSuspended],
    [{ state: 'in_flight' }, stats.pagesInFlight],
  ]);
  metric('suspended', 'gauge', '1 while the cache is suspended (its pages given back to the driver).', [[{}, stats.suspended ? 1 : 0]]);
  metric('host_bytes', 'gauge', 'Host memory of swap and suspend: held (page-locked on cuda), of it idle, swapped-out sequences, a suspended cache\'s copy.', [
    [{ kind: 'held' }, stats.host.bytesHeld],
    [{ kind: 'idle' }, stats.host.bytesIdle],
    [{ kind: 'swapped' }, stats.host.bytesSwapped],
    [{ kind: 'suspend_copy' }, stats.host.bytesSuspendCopy],
  ]);
  metric('swapped_sequences', 'gauge', 'Sequences swapped out to host memory.', [[{}, stats.host.swappedSequences]]);
  metric('swaps_total', 'counter', 'Completed swaps, by direction.', [
    [{ direction: 'out' }, stats.host.swapOuts],
    [{ direction: 'in' }, stats.host.swapIns],
  ]);
  metric('active_sequences', 'gauge', 'Sequences holding a slot.', [[{}, stats.activeSequences]]);
  metric('pages_reused_total', 'counter', 'Mapped pages a new sequence found in its slot (deferred reclamation).', [[{}, stats.pagesReused]]);
  metric('pages_shared', 'gauge', 'Physical pages mapped in more than one slot (fork, prefix sharing).', [[{}, stats.pagesShared]]);
  metric('sharing_saved_bytes', 'gauge', 'Memory that sharing pages between sequences saved (mappings beyond a page\'s first).', [[{}, stats.bytesSavedBySharing]]);
  metric('pages_reclaimed_total', 'counter', 'Pages unmapped from released slots or prefetched tails, by who did it: the prefetch worker ahead of need, or a growth / reclaim() on demand.', [
    [{ by: 'ahead' }, stats.prefetch.pagesReclaimedAhead],
    [{ by: 'demand' }, stats.pagesReclaimed - stats.prefetch.pagesReclaimedAhead],
  ]);
  const ops = Object.entries(stats.driverCalls);
  metric('driver_calls_total', 'counter', 'Backend (driver or OS) calls by operation.', ops.map(([op, c]) => [{ op }, c.calls]));
  metric('driver_call_seconds_total', 'counter', 'Time spent in backend calls by operation.', ops.map(([op, c]) => [{ op }, c.nanoseconds / 1e9]));
  metric('driver_calls_js_thread_total', 'counter', 'Backend calls made on the JS thread (critical path).', [[{}, stats.driverCallsOnJsThread]]);
  metric('prefetch_hits_total', 'counter', 'step() entries already backed by prefetch.', [[{}, stats.prefetch.hits]]);
  metric('prefetch_misses_total', 'counter', 'step() entries that mapped or waited on the caller thread.', [[{}, stats.prefetch.misses]]);
  metric('prefetch_pages_total', 'counter', 'Pages mapped by the prefetch worker and growAsync.', [[{}, stats.prefetch.pagesAhead]]);
  metric('demand_pages_total', 'counter', 'Pages mapped on the caller thread by grow and step.', [[{}, stats.prefetch.pagesOnDemand]]);
  metric('stall_seconds_total', 'counter', 'Time grow and step spent mapping or waiting on the caller thread.', [[{}, stats.prefetch.stallNanoseconds / 1e9]]);
  metric('step_lock_waits_total', 'counter', 'step() calls that found the cache lock held by another thread.', [[{}, stats.prefetch.lockWaits]]);
  metric('step_lock_wait_seconds_total', 'counter', 'Time step() waited for the cache lock.', [[{}, stats.prefetch.lockWaitNanoseconds / 1e9]]);
  metric('steps_total', 'counter', 'step() calls (stepAsync included).', [[{}, stats.prefetch.steps]]);
  metric('step_seconds_total', 'counter', 'Time step() calls spent in the native library.', [[{}, stats.prefetch.stepNanoseconds / 1e9]]);
  metric('prefetch_errors_total', 'counter', 'Prefetch mappings that failed.', [[{}, stats.prefetch.errors]]);
  const pc = stats.prefixCache;
  metric('prefix_cache_queries_total', 'counter', 'reserve({ tokens }) calls.', [[{}, pc.queries]]);
  metric('prefix_cache_hits_total', 'counter', 'Of them, those that got a cached prefix.', [[{}, pc.hits]]);
  metric('prefix_cache_query_tokens_total', 'counter', 'Prompt tokens asked for.', [[{}, pc.queryTokens]]);
  metric('prefix_cache_hit_tokens_total', 'counter', 'Prompt tokens found in the cache (no prefill).', [[{}, pc.hitTokens]]);
  metric('prefix_cache_groups', 'gauge', 'Published page groups findable, kept by released sequences or held by running ones.', [
    [{ held_by: 'released' }, pc.cachedGroups],
    [{ held_by: 'running' }, pc.publishedGroups],
  ]);
  metric('prefix_cache_bytes', 'gauge', 'Bytes of the page groups released sequences keep for later hits.', [[{}, pc.cachedBytes]]);
  metric('prefix_cache_evictions_total', 'counter', 'Published page groups lost to reclaim or to a new sequence in their slot.', [[{}, pc.evictions]]);
  return families;
}

/** Checks metrics options: a valid prefix and labels with valid names and string values. */
export function checkMetricsOptions(options: unknown): { prefix: string; labels: Record<string, string> } {
  const o = checkObject('options', options, true, ['prefix', 'labels']);
  if (o.prefix !== undefined && typeof o.prefix !== 'string')
    throw new InvalidArgumentTypeError('options.prefix', `must be a string, got ${describe(o.prefix)}`);
  const prefix = (o.prefix as string | undefined) ?? 'vattention';
  if (!/^[a-zA-Z_:][a-zA-Z0-9_:]*$/.test(prefix))
    throw new InvalidArgumentRangeError('options.prefix', `'${prefix}' is not a valid Prometheus metric name prefix`);
  // 'nc_' and 'nc' both name nc_budget_bytes
  return { prefix: prefix.replace(/_+$/, '') || prefix, labels: checkLabels(o.labels) };
}

export function formatPrometheus(stats: CacheStats, options?: MetricsOptions): string {
  const { prefix, labels: base } = checkMetricsOptions(options);
  const out: string[] = [];
  for (const family of metricFamilies(stats)) {
    const full = `${prefix}_${family.name}`;
    out.push(`# HELP ${full} ${family.help}`, `# TYPE ${full} ${family.type}`);
    for (const [labels, value] of family.samples) out.push(`${full}${labelText({ ...base, ...labels })} ${value}`);
  }
  return out.join('\n') + '\n';
}
