/**
 * A simulated serving loop (the CLI's `demo`): requests arrive with prompt
 * and output lengths drawn from long-tailed distributions, like chat
 * traffic; continuous batching admits them while slots and memory allow;
 * every step grows each running sequence by one token; finished sequences
 * are released (their slots keep their pages for the next request).
 * When memory runs out the newest sequence is preempted and requeued.
 */
import { KVCache, OutOfMemoryError, autoBackend, type BackendChoice, type DType, type KVLayoutChoice, type Sequence } from 'vattention';

export interface DemoOptions {
  backend?: BackendChoice;
  requests?: number;
  /** Mean new requests per step. */
  arrivalRate?: number;
  seed?: number;
  /** Physical memory budget in bytes. */
  memoryBudget?: number;
  model?: { layers: number; kvHeads: number; headDim: number; dtype: DType };
  maxSequences?: number;
  maxTokens?: number;
  prefetchTokens?: number;
  /** The cache's layout (default: the library's default). */
  layout?: KVLayoutChoice;
  /** Called every step with the fraction of requests finished. */
  onProgress?: (done: number, total: number) => void;
}

export interface DemoTracePoint {
  step: number;
  bytesBacked: number;
  bytesUsed: number;
  bytesInReleasedSlots: number;
  active: number;
}

export interface DemoReport {
  backend: 'cuda' | 'host';
  /** The layout and its page group (what one growth step maps). */
  layout: { name: string; bytesPerPageGroup: number; tokensPerPageGroup: number };
  model: { layers: number; kvHeads: number; headDim: number; dtype: DType };
  maxSequences: number;
  maxTokens: number;
  memoryBudget: number;
  requests: number;
  served: number;
  steps: number;
  tokensGenerated: number;
  preemptions: number;
  peakBytesBacked: number;
  meanBytesBacked: number;
  meanBytesUsed: number;
  /** Mean of (backed - used): bytes mapped but not holding tokens. */
  meanWasteBytes: number;
  wasteFraction: number;
  /** Means of where the backed bytes were: past the tokens of active sequences, kept by released slots. */
  meanBytesBeyondTokens: number;
  meanBytesInReleasedSlots: number;
  /** Mean bytes of idle pages in the pool. */
  meanBytesPooled: number;
  /** Mean over steps of bytesBeyondTokens / active sequences: what one running request holds past its tokens. */
  meanBytesBeyondTokensPerRequest: number;
  /** Mean over steps of bytesPageRounding / active sequences: internal fragmentation per running request. */
  meanBytesPageRoundingPerRequest: number;
  /** Means of bytesPageRounding and bytesSpareGroups (their sum is meanBytesBeyondTokens). */
  meanBytesPageRounding: number;
  meanBytesSpareGroups: number;
  /** Mapped pages new sequences found in their slot (deferred reclamation). */
  pagesReused: number;
  /** Pages newly mapped (map calls). */
  pagesMapped: number;
  pagesCreated: number;
  /** Time grow/step spent mapping, reclaiming or waiting for the worker on the serving loop's thread. */
  criticalPathMappingSeconds: number;
  /** Time the backend spent creating, mapping, granting access to and unmapping pages, all threads. */
  totalMappingSeconds: number;
  driverCallsOnJsThread: number;
  wallSeconds: number;
  trace: DemoTracePoint[];
}

/** Deterministic generator (xorshift32) so a seed replays the same traffic. */
function rng(seed: number) {
  let x = seed >>> 0 || 0x9e3779b9;
  const next = () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 2 ** 32;
  };
  const normal = () => Math.sqrt(-2 * Math.log(next() || 1e-12)) * Math.cos(2 * Math.PI * next());
  return {
    next,
    // Long-tailed lengths: log-normal around `median`.
    logNormal: (median: number, sigma: number) => Math.exp(Math.log(median) + sigma * normal()),
    poisson: (mean: number) => {
      let k = 0;
      let p = Math.exp(-mean);
      let s = p;
      const u = next();
      while (u > s && k < 100) {
        k++;
        p *= mean / k;
        s += p;
      }
      return k;
    },
  };
}

interface Request {
  prompt: number;
  output: number;
  generated: number;
}

export function runDemo(options: DemoOptions = {}): DemoReport {
  const backend = !options.backend || options.backend === 'auto' ? autoBackend() : options.backend;
  // On a GPU: Llama-3-8B's KV shape in an 8 GiB budget. On host memory a
  // quarter of the layers in 1 GiB, so the demo fits any machine.
  const onGpu = backend === 'cuda';
  const model = options.model ?? { layers: onGpu ? 32 : 8, kvHeads: 8, headDim: 128, dtype: 'float16' as DType };
  const maxSequences = options.maxSequences ?? (onGpu ? 64 : 32);
  const maxTokens = options.maxTokens ?? 8192;
  const requests = options.requests ?? 300;
  const random = rng(options.seed ?? 42);
  const cache = new KVCache({
    ...model,
    backend,
    maxSequences,
    maxTokens,
    memoryBudget: options.memoryBudget ?? (onGpu ? 8 : 1) * 2 ** 30,
    prefetchTokens: options.prefetchTokens ?? 64,
    ...(options.layout === undefined ? {} : { layout: options.layout }),
  });
  const started = process.hrtime.bigint();
  try {
    const queue: Request[] = Array.from({ length: requests }, () => ({
      prompt: Math.max(1, Math.min(Math.round(random.logNormal(500, 1.0)), maxTokens / 2)),
      output: Math.max(1, Math.min(Math.round(random.logNormal(180, 1.0)), maxTokens / 2)),
      generated: 0,
    }));
    const waiting: Request[] = [];
    const running: { req: Request; seq: Sequence }[] = [];
    const trace: DemoTracePoint[] = [];
    let served = 0;
    let steps = 0;
    let tokensGenerated = 0;
    let preemptions = 0;
    let sumBacked = 0;
    let sumUsed = 0;
    let sumBeyond = 0;
    let sumReleased = 0;
    let sumPooled = 0;
    let sumBeyondPerRequest = 0;
    let sumRoundingPerRequest = 0;
    let sumRounding = 0;
    let sumSpare = 0;
    let stepsWithActive = 0;
    let peak = 0;
    const preemptNewest = () => {
      const victim = running.pop()!;
      cache.release(victim.seq);
      // recompute later: the prompt now includes what was generated
      waiting.unshift({ prompt: victim.req.prompt + victim.req.generated, output: victim.req.output - victim.req.generated, generated: 0 });
      preemptions++;
    };
    while (served < requests) {
      // arrivals
      for (let k = random.poisson(options.arrivalRate ?? 1.5); k > 0 && queue.length; k--) waiting.push(queue.shift()!);
      if (running.length === 0 && waiting.length === 0 && queue.length) waiting.push(queue.shift()!);
      // admission: prefill while slots and memory allow
      while (waiting.length && running.length < maxSequences) {
        const req = waiting[0]!;
        const seq = cache.reserve({ expectedTokens: Math.min(maxTokens, req.prompt + 180) });
        try {
          cache.grow(seq, req.prompt);
        } catch (e) {
          cache.release(seq);
          if (e instanceof OutOfMemoryError) break; // wait for memory
          throw e;
        }
        waiting.shift();
        running.push({ req, seq });
      }
      // one decode step for every running sequence
      for (;;) {
        try {
          cache.step(
            running.map((r) => r.seq),
            running.map((r) => Math.min(maxTokens, r.req.prompt + r.req.generated + 1)),
          );
          break;
        } catch (e) {
          if (!(e instanceof OutOfMemoryError) || running.length <= 1) throw e;
          preemptNewest();
        }
      }
      steps++;
      for (let i = running.length - 1; i >= 0; i--) {
        const r = running[i]!;
        r.req.generated++;
        tokensGenerated++;
        if (r.req.generated >= r.req.output || r.req.prompt + r.req.generated >= maxTokens) {
          cache.release(r.seq);
          running.splice(i, 1);
          served++;
        }
      }
      const s = cache.stats();
      sumBacked += s.bytesBacked;
      sumUsed += s.bytesUsed;
      sumBeyond += s.bytesBeyondTokens;
      sumReleased += s.bytesInReleasedSlots;
      sumPooled += s.bytesPooled;
      sumRounding += s.bytesPageRounding;
      sumSpare += s.bytesSpareGroups;
      if (s.activeSequences > 0) {
        sumBeyondPerRequest += s.bytesBeyondTokens / s.activeSequences;
        sumRoundingPerRequest += s.bytesPageRounding / s.activeSequences;
        stepsWithActive++;
      }
      peak = Math.max(peak, s.bytesBacked);
      if (steps % 4 === 0)
        trace.push({
          step: steps,
          bytesBacked: s.bytesBacked,
          bytesUsed: s.bytesUsed,
          bytesInReleasedSlots: s.bytesInReleasedSlots,
          active: running.length,
        });
      options.onProgress?.(served, requests);
    }
    const s = cache.stats();
    const mappingNs = ['createPage', 'map', 'setAccess', 'unmap'].reduce((t, op) => t + (s.driverCalls[op]?.nanoseconds ?? 0), 0);
    const { name, bytesPerPageGroup, tokensPerPageGroup } = cache.layout;
    return {
      backend: cache.backend,
      layout: { name, bytesPerPageGroup, tokensPerPageGroup },
      model,
      maxSequences,
      maxTokens,
      memoryBudget: s.budgetBytes,
      requests,
      served,
      steps,
      tokensGenerated,
      preemptions,
      peakBytesBacked: peak,
      meanBytesBacked: sumBacked / steps,
      meanBytesUsed: sumUsed / steps,
      meanWasteBytes: (sumBacked - sumUsed) / steps,
      wasteFraction: sumBacked ? (sumBacked - sumUsed) / sumBacked : 0,
      meanBytesBeyondTokens: sumBeyond / steps,
      meanBytesInReleasedSlots: sumReleased / steps,
      meanBytesPooled: sumPooled / steps,
      meanBytesBeyondTokensPerRequest: stepsWithActive ? sumBeyondPerRequest / stepsWithActive : 0,
      meanBytesPageRoundingPerRequest: stepsWithActive ? sumRoundingPerRequest / stepsWithActive : 0,
      meanBytesPageRounding: sumRounding / steps,
      meanBytesSpareGroups: sumSpare / steps,
      pagesReused: s.pagesReused,
      pagesMapped: s.driverCalls.map?.calls ?? 0,
      pagesCreated: s.driverCalls.createPage?.calls ?? 0,
      criticalPathMappingSeconds: s.prefetch.stallNanoseconds / 1e9,
      totalMappingSeconds: mappingNs / 1e9,
      driverCallsOnJsThread: s.driverCallsOnJsThread,
      wallSeconds: Number(process.hrtime.bigint() - started) / 1e9,
      trace,
    };
  } finally {
    cache.close();
  }
}
