// A complete serving loop with vattention, runnable as it is:
//   node examples/serving-loop.mjs
// It uses the GPU when one is present (backend 'auto'), host memory otherwise.
// Requests arrive, are prefilled, decode one token per step in a batch, and
// leave; the KV cache backs each sequence's K and V on demand. When memory
// runs out, the newest sequence is preempted, and nothing new is admitted
// until a sequence finishes (so a preempted request cannot cycle back in).
import { KVCache, OutOfMemoryError } from 'vattention';

const cache = new KVCache({
  layers: 8,                 // a small model so the example runs anywhere
  kvHeads: 8,
  headDim: 128,
  dtype: 'float16',
  maxSequences: 16,
  maxTokens: 4096,
  memoryBudget: 160 * 2 ** 20, // small on purpose: sequences get preempted
});
cache.on('reclaim', (e) => console.log(`  reclaimed ${e.pages} pages for a ${e.operation}`));

// Your attention kernel takes plain contiguous tensors: these are its inputs.
const { k, v } = cache.tensors()[0];
console.log(`backend ${cache.backend}; layer 0 K at 0x${k.address.toString(16)}, shape [${k.shape}], strides [${k.strides}]`);

const waiting = Array.from({ length: 24 }, (_, i) => ({ id: i, prompt: 200 + ((i * 97) % 900), output: 20 + ((i * 31) % 60) }));
const running = []; // { req, seq, length, admittedAt }
let step = 0;
let preemptions = 0;
let mayAdmit = true; // false after a preemption until a sequence finishes: a preempted request cannot cycle
while (waiting.length || running.length) {
  // admit: reserve a slot (best fit among released ones); the prefill happens in the next step()
  while ((mayAdmit || running.length === 0) && waiting.length && running.length < 8) {
    const req = waiting.shift();
    running.push({ req, seq: cache.reserve({ expectedTokens: req.prompt + req.output }), length: 0, admittedAt: step });
  }
  // one iteration: prefill the new ones, one more token for the others; all or nothing
  const next = running.map((r) => (r.length === 0 ? r.req.prompt : r.length + 1));
  try {
    cache.step(running.map((r) => r.seq), next); // prefetch maps ahead meanwhile
  } catch (e) {
    if (!(e instanceof OutOfMemoryError)) throw e;
    // preempt the newest (least work lost); it waits at the front of the queue
    const victim = running.reduce((a, b) => (b.admittedAt > a.admittedAt ? b : a));
    cache.release(victim.seq); // pass { stream } when kernels may still read it
    running.splice(running.indexOf(victim), 1);
    if (running.length === 0) throw new Error(`request ${victim.req.id} does not fit in memory on its own`);
    waiting.unshift(victim.req);
    preemptions++;
    mayAdmit = false;
    continue;
  }
  running.forEach((r, i) => (r.length = next[i]));
  // ... launch attention with r.seq.address(layer, 'k' | 'v') and r.length here ...
  step++;
  for (let i = running.length - 1; i >= 0; i--) {
    const r = running[i];
    if (r.length - r.req.prompt >= r.req.output) {
      cache.release(r.seq); // pass { stream } when kernels may still read it
      running.splice(i, 1);
      mayAdmit = true;
    }
  }
}
const s = cache.stats();
console.log(`served 24 requests in ${step} steps (${preemptions} preemptions); pages reused ${s.pagesReused}, mapped ${s.driverCalls.map.calls}, JS-thread driver calls ${s.driverCallsOnJsThread}`);
console.log(cache.metrics().split('\n').filter((l) => l.startsWith('vattention_backed_bytes') || l.startsWith('vattention_prefetch_hits_total')).join('\n'));
cache.close();
console.log('done');
