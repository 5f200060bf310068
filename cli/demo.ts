/**
 * A simulated serving loop (the CLI's `demo`): requests arrive with prompt
 * and output lengths drawn from long-tailed distributions, like chat
 * traffic; continuous batching admits them while slots and memory allow;
 * every step grows each running sequence by one token; finished sequences
 * are released (their slots keep their pages for the next request).
 * When memory runs out the newest sequence is preempted and requeued.
 *
 * It behaves like a server: a prompt's pages are mapped by `growAsync` off
 * the serving thread (the request joins the batch once they are), and every
 * iteration takes the GPU time a real model would — a roofline: the weights
 * and the KV bytes of the batch read once, over the memory bandwidth — during
 * which the serving thread waits for its stream (a GPU spin kernel on cuda;
 * a sleep, scaled down 10x, on the host backend) and the prefetch worker maps
 * and reclaims ahead.
 *
 * With `sharedPrefix` every request's prompt begins with the same system
 * prompt of that many tokens: one sequence holds it for the whole run, and
 * each request is placed with `reserve({ prefix })`, sharing its whole page
 * groups (the partial one copied) instead of backing it again.
 */
import * as testing from 'vattention/testing';
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
  /**
   * Bytes of weights read per iteration, for the simulated GPU time (default:
   * Llama-3-8B's 16 GB in fp16, scaled with layers / 32). 0: no simulated
   * compute (the loop runs back to back).
   */
  weightBytes?: number;
  /**
   * Tokens of a system prompt every request's prompt starts with, shared by
   * mapping the same pages (reserve({ prefix })). 0: none (default).
   */
  sharedPrefix?: number;
  /**
   * Automatic prefix caching: prompts carry token ids (the system prompt's,
   * when sharedPrefix is set, then the request's own), are placed with
   * reserve({ tokens }) and published once prefilled, instead of sharing a
   * system sequence held by the demo.
   */
  prefixCache?: boolean;
  /**
   * Preempt the newest sequence before a step when the memory the worker can
   * still map ahead runs low (default true); false: only when step() runs out
   * of memory.
   */
  preemptAhead?: boolean;
  /** Called every step with the fraction of requests finished. */
  onProgress?: (done: number, total: number) => void;
}

export interface DemoTracePoint {
  step: number;
  /** Serving-thread time in library calls during this step (µs). */
  libraryMicros: number;
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
  /** Of them, decided before the step (preemptAhead) rather than after step() ran out of memory. */
  preemptionsAhead: number;
  /** Iterations whose stepAsync found a page missing and ran step() on a pool thread (the worker had not caught up, or a preemption moved pages). */
  stepsOffThread: number;
  peakBytesBacked: number;
  meanBytesBacked: number;
  meanBytesUsed: number;
  /** The sharedPrefix option (0: none). */
  sharedPrefix: number;
  /** The prefixCache option, and with it stats().prefixCache at the end and the prompt tokens requests got from it. */
  prefixCache: boolean;
  prefixCacheHitRate: number;
  prefillTokens: number;
  prefillTokensSkipped: number;
  /** Mean and peak of stats().bytesSavedBySharing: memory the shared prefix did not need again. */
  meanBytesSavedBySharing: number;
  peakBytesSavedBySharing: number;
  /** Mean of (backed + saved by sharing - used): bytes mapped in slots but not holding tokens. */
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
  /** Backend calls on the serving thread during steps that began with the budget fully created (memory full). */
  driverCallsOnJsThreadWhileFull: number;
  /** Of those, calls in iterations whose step() ran out of memory and was retried after a preemption (not steady state). */
  driverCallsOnJsThreadAfterPreemption: number;
  /** Serving-thread time inside library calls (reserve, growAsync's call, step, release), and its share of wall time. */
  servingThreadLibrarySeconds: number;
  servingThreadLibraryShare: number;
  /** step() on the serving thread, µs (an iteration's calls, with the retries after a preemption). */
  stepMicros: { p50: number; p99: number; max: number };
  /** The same over the iterations with no preemption (the steady state), and how many of those there were. */
  steadyStepMicros: { p50: number; p99: number; max: number };
  steadySteps: number;
  /** Simulated GPU time per iteration (mean, ms) and whether it ran as a GPU kernel. */
  simulatedComputeMs: number;
  computeOnGpu: boolean;
  pagesMappedAhead: number;
  pagesMappedOnDemand: number;
  pagesReclaimedAhead: number;
  pagesReclaimedOnDemand: number;
  /** Prompts mapped by growAsync (off the serving thread). */
  prefillsAsync: number;
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
  /** Token ids of the prompt (prefix caching only). */
  ids?: number[];
  output: number;
  generated: number;
}

function percentileOf(sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))]!;
}

const H100_BANDWIDTH = 3.35e12; // bytes/s, the roofline's default

export async function runDemo(options: DemoOptions = {}): Promise<DemoReport> {
  const backend = !options.backend || options.backend === 'auto' ? autoBackend() : options.backend;
  // On a GPU: Llama-3-8B's KV shape in an 8 GiB budget. On host memory a
  // quarter of the layers in 1 GiB, so the demo fits any machine.
  const onGpu = backend === 'cuda';
  const model = options.model ?? { layers: onGpu ? 32 : 8, kvHeads: 8, headDim: 128, dtype: 'float16' as DType };
  const maxSequences = options.maxSequences ?? (onGpu ? 64 : 32);
  const maxTokens = options.maxTokens ?? 8192;
  const requests = options.requests ?? 300;
  const sharedPrefix = options.sharedPrefix ?? 0;
  if (!Number.isInteger(sharedPrefix) || sharedPrefix < 0 || sharedPrefix >= maxTokens / 2)
    throw new RangeError(`sharedPrefix must be an integer in [0, ${maxTokens / 2}), got ${sharedPrefix}`);
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
  const weightBytes = options.weightBytes ?? 16.06e9 * (model.layers / 32);
  // The GPU time of one iteration: weights + the batch's KV, over the bandwidth (10x less on host).
  const computeNs = (kvTokens: number) => ((weightBytes + kvTokens * cache.bytesPerToken) / H100_BANDWIDTH) * 1e9 * (onGpu ? 1 : 0.1);
  const gpu = onGpu ? testing : null;
  const stream = gpu ? gpu.createStream() : 0n;
  const spinAt = cache.tensor(0, 'k').address;
  const sleeper = new Int32Array(new SharedArrayBuffer(4));
  const waitForCompute = (ns: number) => {
    if (ns <= 0) return;
    if (gpu) {
      gpu.spinThenFillU32(spinAt, 0, 0, Math.round(ns), { stream });
      gpu.synchronizeStream(stream);
    } else {
      Atomics.wait(sleeper, 0, 0, ns / 1e6);
    }
  };
  const nextTick = () => new Promise<void>((r) => setImmediate(r));
  const started = process.hrtime.bigint();
  let libraryNs = 0;
  const byCall = new Map<string, number>();
  // The synchronous part of an asynchronous call is the serving thread's; its wait is not.
  const timedAsync = (fn: () => Promise<void>, what: string): Promise<void> => timed(fn, what);
  const timed = <T>(fn: () => T, what = 'other'): T => {
    const t0 = process.hrtime.bigint();
    try {
      return fn();
    } finally {
      const ns = Number(process.hrtime.bigint() - t0);
      libraryNs += ns;
      if (process.env.VATTENTION_DEMO_PROFILE) byCall.set(what, (byCall.get(what) ?? 0) + ns);
    }
  };
  try {
    // The system prompt: held by one sequence for the whole run (sharing by
    // hand), or found by its ids (prefix caching).
    const prefixCache = options.prefixCache ?? false;
    const system = sharedPrefix > 0 && !prefixCache ? timed(() => cache.reserve()) : null;
    if (system) timed(() => cache.grow(system, sharedPrefix));
    const systemIds = Array.from({ length: sharedPrefix }, (_, i) => i * 7 + 1);
    let nextId = 1_000_000;
    const queue: Request[] = Array.from({ length: requests }, () => {
      const prompt = sharedPrefix + Math.max(1, Math.min(Math.round(random.logNormal(500, 1.0)), maxTokens / 2 - sharedPrefix));
      const ids = prefixCache ? [...systemIds, ...Array.from({ length: prompt - sharedPrefix }, () => nextId++)] : undefined;
      return { prompt, ids, output: Math.max(1, Math.min(Math.round(random.logNormal(180, 1.0)), maxTokens / 2)), generated: 0 };
    });
    let prefillTokens = 0;
    let prefillTokensSkipped = 0;
    const waiting: Request[] = [];
    const running: { req: Request; seq: Sequence }[] = [];
    // Prompts being mapped off the serving thread: they join the batch when done.
    const prefilling: { req: Request; seq: Sequence | null; state: 'mapping' | 'done' | 'failed' }[] = [];
    const trace: DemoTracePoint[] = [];
    const stepNs: number[] = [];
    const steadyStepNs: number[] = [];
    let served = 0;
    let steps = 0;
    let tokensGenerated = 0;
    let preemptions = 0;
    let preemptionsAhead = 0;
    let bytesMapping = 0; // prompts admitted and still mapping
    const preemptAhead = options.preemptAhead ?? true;
    let prefillsAsync = 0;
    let sumBacked = 0;
    let sumUsed = 0;
    let sumBeyond = 0;
    let sumReleased = 0;
    let sumPooled = 0;
    let sumSaved = 0;
    let peakSaved = 0;
    let sumBeyondPerRequest = 0;
    let sumRoundingPerRequest = 0;
    let sumRounding = 0;
    let sumSpare = 0;
    let stepsWithActive = 0;
    let sumComputeNs = 0;
    let callsWhileFull = 0;
    let callsAfterPreemption = 0;
    let stepsOffThread = 0;
    let peak = 0;
    const budgetPages = cache.stats().budgetBytes / cache.pageSize;
    const preemptNewest = () => {
      const victim = running.pop()!;
      timed(() => cache.release(victim.seq));
      // recompute later: the prompt now includes what was generated
      waiting.unshift({ prompt: victim.req.prompt + victim.req.generated, output: victim.req.output - victim.req.generated, generated: 0 });
      preemptions++;
    };
    while (served < requests) {
      const libraryAtStart = libraryNs;
      const before = cache.stats();
      const full = before.pagesCreated >= budgetPages;
      // arrivals
      for (let k = random.poisson(options.arrivalRate ?? 1.5); k > 0 && queue.length; k--) waiting.push(queue.shift()!);
      if (running.length === 0 && prefilling.length === 0 && waiting.length === 0 && queue.length) waiting.push(queue.shift()!);
      // prompts whose pages are mapped join the batch; failed ones (memory) wait again
      for (let i = 0; i < prefilling.length; ) {
        const p = prefilling[i]!;
        if (p.state === 'mapping') {
          i++;
          continue;
        }
        prefilling.splice(i, 1);
        if (p.state === 'done') running.push({ req: p.req, seq: p.seq! });
        else {
          const seq = p.seq;
          if (seq) timed(() => cache.release(seq));
          waiting.unshift(p.req);
        }
      }
      // admission: a prompt's pages are mapped off the serving thread (growAsync)
      while (waiting.length && running.length + prefilling.length < maxSequences - (system ? 1 : 0) && prefilling.length < 4) {
        const req = waiting[0]!;
        // Admitted only with room left for the batch to grow over the next 32
        // steps (a watermark, as vLLM keeps for decode), so admission does not
        // take the pages the next steps need.
        const { tokensPerPageGroup, bytesPerPageGroup } = cache.layout;
        const watermark = Math.ceil(((running.length + prefilling.length + 1) * 32) / tokensPerPageGroup) * bytesPerPageGroup;
        const ownTokens = req.prompt - (system ? sharedPrefix : 0);
        // (the look-ahead of running sequences left out: admission must not eat it, nor make the next
        // preemption; nor the prompts still mapping, which obtainableBytes() does not know of yet)
        const promptBytes = ownTokens * cache.bytesPerToken;
        if (timed(() => cache.obtainableBytes({ lookAhead: !preemptAhead }), 'obtainableBytes') - bytesMapping < promptBytes + watermark) break; // wait for memory
        bytesMapping += promptBytes;
        waiting.shift();
        const entry: (typeof prefilling)[number] = { req, seq: null, state: 'mapping' };
        prefilling.push(entry);
        prefillsAsync++;
        // The slot (with the system prompt's pages shared, mapped on a worker
        // thread), then the rest of the prompt and the first generated
        // token's place: it joins the batch with no mapping left to do.
        const placed = req.ids
          ? timed(() => cache.reserveAsync({ tokens: req.ids!, expectedTokens: Math.min(maxTokens, req.prompt + 180) }), 'reserve')
          : system
            ? timed(() => cache.reserveAsync({ prefix: { from: system, tokens: sharedPrefix } }), 'reserve')
            : Promise.resolve(timed(() => cache.reserve({ expectedTokens: Math.min(maxTokens, req.prompt + 180) }), 'reserve'));
        placed
          .then((seq) => {
            entry.seq = seq;
            prefillTokens += req.prompt;
            prefillTokensSkipped += seq.cachedTokens;
            return timed(() => cache.growAsync(seq, Math.min(maxTokens, req.prompt + 1)), 'growAsync');
          })
          .then(
            () => {
              // the prefill's kernels have written the prompt: later prompts find it
              if (req.ids && entry.seq) timed(() => cache.publish(entry.seq!, req.ids!), 'publish');
              entry.state = 'done';
            },
            (e: unknown) => {
              if (!(e instanceof OutOfMemoryError)) throw e;
              entry.state = 'failed';
            },
          )
          .finally(() => (bytesMapping -= promptBytes));
      }
      // Preemption ahead of need: when what the worker can still map ahead
      // (without taking a running sequence's look-ahead) would not give a
      // quarter of the batch its next page group, the newest sequence goes
      // now, and the worker moves its pages to the others while the GPU
      // computes. Left to step(), the same preemption would come as an
      // out-of-memory error, and the pages would be moved on this thread.
      if (preemptAhead && running.length > 1) {
        const reserveBytes = Math.ceil(running.length / 4) * cache.layout.bytesPerPageGroup;
        if (timed(() => cache.obtainableBytes({ lookAhead: false }), 'obtainableBytes') < reserveBytes) {
          preemptNewest();
          preemptionsAhead++;
        }
      }
      // one decode step for every running sequence, as a server should make
      // it: `await stepAsync()` is step() on this thread when the batch is
      // backed (the steady state), and step() on a pool thread when a page is
      // missing (the worker fell behind, or a preemption must move pages), so
      // this thread never waits on a driver call. stepTook: this thread's
      // time in the call (the synchronous part).
      let stepTook = 0;
      const preemptionsBefore = preemptions;
      const missesBefore = before.prefetch.misses;
      for (;;) {
        // the batch is the server's own work: built before the library call is timed
        const seqs = running.map((r) => r.seq);
        const lengths = running.map((r) => Math.min(maxTokens, r.req.prompt + r.req.generated + 1));
        const t0 = process.hrtime.bigint();
        let pending: Promise<void> | undefined;
        try {
          pending = timedAsync(() => cache.stepAsync(seqs, lengths), 'step');
        } finally {
          stepTook += Number(process.hrtime.bigint() - t0);
        }
        try {
          await pending;
          break;
        } catch (e) {
          if (!(e instanceof OutOfMemoryError) || running.length <= 1) throw e;
          preemptNewest();
        }
      }
      if (cache.stats().prefetch.misses > missesBefore) stepsOffThread++;
      stepNs.push(stepTook);
      if (preemptions === preemptionsBefore) steadyStepNs.push(stepTook);
      // the GPU computes the iteration; the worker maps and reclaims meanwhile
      const kvTokens = running.reduce((n, r) => n + r.req.prompt + r.req.generated, 0);
      const ns = options.weightBytes === 0 ? 0 : computeNs(kvTokens);
      sumComputeNs += ns;
      waitForCompute(ns);
      await nextTick(); // settled growAsync promises run here
      steps++;
      for (let i = running.length - 1; i >= 0; i--) {
        const r = running[i]!;
        r.req.generated++;
        tokensGenerated++;
        if (r.req.generated >= r.req.output || r.req.prompt + r.req.generated >= maxTokens) {
          timed(() => cache.release(r.seq), 'release');
          running.splice(i, 1);
          served++;
        }
      }
      const s = cache.stats();
      if (full) callsWhileFull += s.driverCallsOnJsThread - before.driverCallsOnJsThread;
      if (full && preemptions > preemptionsBefore) callsAfterPreemption += s.driverCallsOnJsThread - before.driverCallsOnJsThread;
      sumBacked += s.bytesBacked;
      sumUsed += s.bytesUsed;
      sumBeyond += s.bytesBeyondTokens;
      sumReleased += s.bytesInReleasedSlots;
      sumPooled += s.bytesPooled;
      sumSaved += s.bytesSavedBySharing;
      peakSaved = Math.max(peakSaved, s.bytesSavedBySharing);
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
          libraryMicros: (libraryNs - libraryAtStart) / 1e3,
          bytesBacked: s.bytesBacked,
          bytesUsed: s.bytesUsed,
          bytesInReleasedSlots: s.bytesInReleasedSlots,
          active: running.length,
        });
      options.onProgress?.(served, requests);
    }
    if (process.env.VATTENTION_DEMO_PROFILE) console.error(Object.fromEntries([...byCall].map(([k, v]) => [k, `${(v / 1e6).toFixed(1)} ms`])));
    const s = cache.stats();
    const mappingNs = ['createPage', 'map', 'setAccess', 'unmap'].reduce((t, op) => t + (s.driverCalls[op]?.nanoseconds ?? 0), 0);
    const wallSeconds = Number(process.hrtime.bigint() - started) / 1e9;
    const sortedSteps = Float64Array.from(stepNs).sort();
    const sortedSteady = Float64Array.from(steadyStepNs).sort();
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
      preemptionsAhead,
      stepsOffThread,
      peakBytesBacked: peak,
      meanBytesBacked: sumBacked / steps,
      meanBytesUsed: sumUsed / steps,
      sharedPrefix,
      prefixCache,
      prefixCacheHitRate: s.prefixCache.queryTokens ? s.prefixCache.hitTokens / s.prefixCache.queryTokens : 0,
      prefillTokens,
      prefillTokensSkipped,
      meanBytesSavedBySharing: sumSaved / steps,
      peakBytesSavedBySharing: peakSaved,
      meanWasteBytes: (sumBacked + sumSaved - sumUsed) / steps,
      wasteFraction: sumBacked + sumSaved ? (sumBacked + sumSaved - sumUsed) / (sumBacked + sumSaved) : 0,
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
      driverCallsOnJsThreadWhileFull: callsWhileFull,
      driverCallsOnJsThreadAfterPreemption: callsAfterPreemption,
      servingThreadLibrarySeconds: libraryNs / 1e9,
      servingThreadLibraryShare: libraryNs / 1e9 / wallSeconds,
      stepMicros: { p50: percentileOf(sortedSteps, 50) / 1e3, p99: percentileOf(sortedSteps, 99) / 1e3, max: percentileOf(sortedSteps, 100) / 1e3 },
      steadyStepMicros: { p50: percentileOf(sortedSteady, 50) / 1e3, p99: percentileOf(sortedSteady, 99) / 1e3, max: percentileOf(sortedSteady, 100) / 1e3 },
      steadySteps: steadyStepNs.length,
      simulatedComputeMs: sumComputeNs / steps / 1e6,
      computeOnGpu: gpu !== null,
      pagesMappedAhead: s.prefetch.pagesAhead,
      pagesMappedOnDemand: s.prefetch.pagesOnDemand,
      pagesReclaimedAhead: s.prefetch.pagesReclaimedAhead,
      pagesReclaimedOnDemand: s.pagesReclaimed - s.prefetch.pagesReclaimedAhead,
      prefillsAsync,
      wallSeconds,
      trace,
    };
  } finally {
    cache.close();
    if (gpu) gpu.destroyStream(stream);
  }
}
