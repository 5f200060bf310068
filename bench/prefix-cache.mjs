// Automatic prefix caching in a serving loop: requests arrive, are placed with
// reserve({ tokens: prompt }), prefill what the cache did not have (grow +
// publish), decode with step(), publish their answer and are released. Three
// workloads, each with the cache on and off (prefixCache: false), in one run:
//   system   a shared system prompt (--system tokens) + a varied question
//   chat     multi-turn chats: each turn re-sends the whole history
//   none     prompts that share nothing (0% hits): what the cache costs
// Figures: token hit rate, prefill tokens skipped, memory the cache holds
// (sampled after every admission), time in step() and reserve() (p50/p99, on
// vs off). The KV bytes themselves are not written (the library's work is
// the same whatever they hold); on a GPU the pages are real device memory.
//   node bench/prefix-cache.mjs [--requests 400] [--batch 16] [--system 2048] [--decode 32]
import { KVCache } from '../dist/esm/index.mjs';
import { cudaPresent, fmt, nowNs, saveResult, summarize, table } from './common.mjs';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const onGpu = cudaPresent();
const backend = onGpu ? 'cuda' : 'host';
const requests = Number(args.requests ?? 400);
const batch = Number(args.batch ?? 16);
const systemTokens = Number(args.system ?? 2048);
const decode = Number(args.decode ?? 32);
const model = { layers: onGpu ? 32 : 8, kvHeads: 8, headDim: 128, dtype: 'float16' };
const maxTokens = 8192;

// Deterministic pseudo-random ids (one stream per workload, the same for on and off).
function rng(seed) {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}
const randomIds = (next, n) => Array.from({ length: n }, () => next() % 128_000);

/** The prompts of a workload, in arrival order, and what each request decodes. */
function workload(name) {
  const next = rng(name.length * 7919);
  if (name === 'system') {
    const system = randomIds(next, systemTokens);
    return Array.from({ length: requests }, () => ({ prompt: [...system, ...randomIds(next, 64 + (next() % 192))] }));
  }
  if (name === 'chat') {
    // 32 chats of up to 8 turns, interleaved: turn t of a chat re-sends turns 0..t-1 with their answers
    const chats = Array.from({ length: 32 }, () => ({ history: randomIds(next, 256) }));
    return Array.from({ length: requests }, (_, i) => {
      const chat = chats[i % chats.length];
      // (on host, histories up to half of maxTokens: the batch's prompts fit its 2 GiB budget)
      if (chat.history.length + 128 + decode > (onGpu ? maxTokens : maxTokens / 2)) chat.history = randomIds(next, 256);
      const prompt = [...chat.history, ...randomIds(next, 64)];
      const answer = randomIds(next, decode);
      chat.history = [...prompt, ...answer];
      return { prompt, answer };
    });
  }
  return Array.from({ length: requests }, () => ({ prompt: randomIds(next, 512 + (next() % 1024)) }));
}

function run(name, cacheOn) {
  const cache = new KVCache({
    ...model,
    backend,
    maxSequences: 64,
    maxTokens,
    prefetchTokens: 64,
    memoryBudget: (onGpu ? 16 : 2) * 2 ** 30,
    prefixCache: cacheOn,
  });
  try {
    const queue = workload(name);
    const running = [];
    const stepNs = [];
    const reserveNs = [];
    const memory = [];
    let prefillTokens = 0;
    let skipped = 0;
    let requeued = 0;
    let admitted = 0;
    const admit = () => {
      while (running.length < batch && queue.length > 0) {
        const r = queue.shift();
        const t0 = nowNs();
        const seq = cache.reserve({ tokens: r.prompt });
        reserveNs.push(Number(nowNs() - t0));
        try {
          cache.grow(seq, r.prompt.length); // the prefill of what was not cached
        } catch (e) {
          if (e.code !== 'ERR_OUT_OF_MEMORY') throw e;
          cache.release(seq); // no room now: admitted again once a request ends
          queue.unshift(r);
          requeued++;
          break;
        }
        skipped += seq.cachedTokens;
        prefillTokens += r.prompt.length;
        cache.publish(seq, r.prompt);
        running.push({ seq, r, left: decode, tokens: r.prompt.length });
        // memory over time: one sample every requests / 50 admissions (a small JSON)
        if (admitted++ % Math.max(1, Math.floor(requests / 50)) === 0) {
          const s = cache.stats();
          memory.push({ request: admitted, cachedBytes: s.prefixCache.cachedBytes, bytesBacked: s.bytesBacked });
        }
      }
    };
    admit();
    while (running.length > 0) {
      const lengths = running.map((e) => e.tokens + 1);
      const t0 = nowNs();
      try {
        cache.step(running.map((e) => e.seq), lengths);
      } catch (e) {
        if (e.code !== 'ERR_OUT_OF_MEMORY' || running.length === 1) throw e;
        const newest = running.pop(); // preempted: its request starts again later
        cache.release(newest.seq);
        queue.unshift(newest.r);
        requeued++;
        continue;
      }
      stepNs.push(Number(nowNs() - t0));
      for (const e of running) {
        e.tokens++;
        e.left--;
      }
      for (let i = running.length - 1; i >= 0; i--) {
        const e = running[i];
        if (e.left > 0) continue;
        // the answer is KV too: a chat's next turn finds it
        const answer = e.r.answer ?? Array.from({ length: decode }, (_, k) => 127_000 + k);
        cache.publish(e.seq, [...e.r.prompt, ...answer.slice(0, e.tokens - e.r.prompt.length)]);
        cache.release(e.seq);
        running.splice(i, 1);
      }
      admit();
    }
    const st = cache.stats();
    return {
      workload: name,
      cache: cacheOn ? 'on' : 'off',
      hitRate: st.prefixCache.queryTokens ? st.prefixCache.hitTokens / st.prefixCache.queryTokens : 0,
      hits: st.prefixCache.hits,
      queries: st.prefixCache.queries,
      prefillTokens,
      skipped,
      evictions: st.prefixCache.evictions,
      requeued,
      memory,
      maxCachedBytes: Math.max(...memory.map((m) => m.cachedBytes)),
      step: summarize(stepNs),
      reserve: summarize(reserveNs),
      stepTotalNs: stepNs.reduce((a, b) => a + b, 0),
    };
  } finally {
    cache.close();
  }
}

const results = [];
for (const name of ['system', 'chat', 'none']) {
  // off first, then on, then off again: the two offs bound the noise
  const off = run(name, false);
  const on = run(name, true);
  const off2 = run(name, false);
  results.push(off, on, { ...off2, cache: 'off (again)' });
}
console.log(
  `Prefix cache (${backend}): ${model.layers} layers x ${model.kvHeads} KV heads x ${model.headDim} dims fp16, ${requests} requests per workload, ${batch} at once, ${decode} decode steps each; system prompt ${systemTokens} tokens`,
);
console.log(
  table(results, [
    { title: 'workload', value: (r) => r.workload },
    { title: 'cache', value: (r) => r.cache },
    { title: 'token hit rate', value: (r) => `${(100 * r.hitRate).toFixed(1)}%` },
    { title: 'hits / queries', value: (r) => `${r.hits} / ${r.queries}` },
    { title: 'prefill skipped', value: (r) => `${fmt.int(r.skipped)} of ${fmt.int(r.prefillTokens)}` },
    { title: 'cache MiB max', value: (r) => (r.maxCachedBytes / 2 ** 20).toFixed(0) },
    { title: 'evicted groups', value: (r) => r.evictions },
    { title: 'requeued', value: (r) => r.requeued },
    { title: 'step p50 µs', value: (r) => fmt.us(r.step.p50) },
    { title: 'step p99 µs', value: (r) => fmt.us(r.step.p99) },
    { title: 'reserve p50 µs', value: (r) => fmt.us(r.reserve.p50) },
    { title: 'reserve p99 µs', value: (r) => fmt.us(r.reserve.p99) },
  ]),
);
for (const name of ['system', 'chat', 'none']) {
  const [off, on, off2] = results.filter((r) => r.workload === name);
  const offNs = Math.min(off.step.mean, off2.step.mean);
  console.log(
    `${name}: step mean on / off ${fmt.us(on.step.mean)} / ${fmt.us(offNs)} µs (${((on.step.mean / offNs - 1) * 100).toFixed(1)}%; the two off runs differ by ${((Math.abs(off.step.mean - off2.step.mean) / offNs) * 100).toFixed(1)}%)`,
  );
}
saveResult('prefix-cache', { backend, model, requests, batch, systemTokens, decode, results });
