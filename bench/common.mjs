// Shared helpers of the benchmarks: percentiles, tables, JSON results.
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { driverInfo } from '../dist/esm/index.mjs';

export const here = dirname(fileURLToPath(import.meta.url));

export function percentile(sorted, p) {
  if (sorted.length === 0) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i];
}

export function summarize(values) {
  const s = Float64Array.from(values).sort();
  const sum = s.reduce((a, b) => a + b, 0);
  return { n: s.length, mean: sum / s.length, p50: percentile(s, 50), p99: percentile(s, 99), max: s[s.length - 1] };
}

export function nowNs() {
  return process.hrtime.bigint();
}

export function table(rows, columns) {
  const cells = [columns.map((c) => c.title), ...rows.map((r) => columns.map((c) => String(c.value(r))))];
  const widths = columns.map((_, i) => Math.max(...cells.map((row) => row[i].length)));
  const line = (row) => row.map((cell, i) => (i === 0 ? cell.padEnd(widths[i]) : cell.padStart(widths[i]))).join('  ');
  return [line(cells[0]), widths.map((w) => '-'.repeat(w)).join('  '), ...cells.slice(1).map(line)].join('\n');
}

export function environment() {
  const info = driverInfo();
  const gpu = info.devices[0];
  return {
    date: new Date().toISOString(),
    node: process.version,
    driverVersion: info.version,
    gpu: gpu ? gpu.name : null,
    gpuMemoryBytes: gpu ? gpu.totalBytes : null,
  };
}

/**
 * Writes $BENCH_OUT/<name>.json, or bench/results/<name>.json in a clone of
 * the repository when BENCH_OUT is not set. An installed package never writes
 * inside itself (its folder may be read-only): the CLI always sets BENCH_OUT.
 */
export function saveResult(name, result) {
  const body = JSON.stringify({ benchmark: name, environment: environment(), ...result }, null, 2);
  const dirs = [process.env.BENCH_OUT || join(here, 'results')];
  for (const dir of dirs) {
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, `${name}.json`), body + '\n');
  }
  return body;
}

export function cudaPresent() {
  const info = driverInfo();
  return Boolean(info.devices[0]?.vmmSupported);
}

export const fmt = {
  us: (ns) => (ns / 1e3).toFixed(1),
  ms: (ns) => (ns / 1e6).toFixed(2),
  int: (x) => Math.round(x).toLocaleString('en-US'),
};

/**
 * The steps at or above the p99 of `wallNs` (with the part spent in the native
 * library, `nativeNs[i]`), each split by the thread's usage
 * taken around it (`before[i]`, `after[i]`: testing.threadUsage()): time on
 * the CPU, time off it (waiting: a lock, a page fault behind the address-space
 * lock, preemption), the switches and faults, and whether a GC overlapped it.
 */
export function tailBreakdown(wallNs, nativeNs, before, after, gcOverlap) {
  const sorted = Float64Array.from(wallNs).sort();
  const p99 = percentile(sorted, 99);
  const rows = [];
  for (let i = 0; i < wallNs.length; i++) {
    if (wallNs[i] < p99) continue;
    const a = before[i], z = after[i];
    const cpuNs = z.cpuNs - a.cpuNs;
    rows.push({
      step: i,
      wallNs: wallNs[i],
      nativeNs: nativeNs[i],
      cpuNs,
      offCpuNs: Math.max(0, wallNs[i] - cpuNs),
      faults: z.minorFaults - a.minorFaults,
      waits: z.voluntarySwitches - a.voluntarySwitches,
      preemptions: z.involuntarySwitches - a.involuntarySwitches,
      gc: gcOverlap[i],
    });
  }
  return rows.sort((x, y) => y.wallNs - x.wallNs);
}
