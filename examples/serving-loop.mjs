// A complete serving loop with vattention, runnable as it is:
//   node examples/serving-loop.mjs
// It uses the GPU when one is present (backend 'auto'), host memory otherwise.
// Requests arrive; a prompt's pages are mapped off the event loop
// (growAsync) and the request joins the batch once they are; the batch
// decodes one token per step (stepAsync: the event loop never waits on the
// driver); finished requests leave, their slots keeping
// their pages for the next ones. When memory runs out, the newest sequence
// is preempted, and nothing new is admitted until a sequence finishes (so a
// preempted request cannot cycle back in).
import { KVCache, OutOfMemoryError } from 'vattention';

const cache = new KVCache({
  layers: 8,                 // a small model so the example runs anywhere
  kvHeads: 8,
  headDim: 128,
  dtype: 'float16',
  maxSequences: 16,
  maxTokens: 4096,
  memoryBudget: 64 * 2 ** 20, // small on purpose: eight prompts need more, so some wait or get preempted
});
cache.on('reclaim', (e) => console.log(`  reclaimed ${e.pages} pages for a ${e.operation}`));

// Your attention kernel's inputs: every layer's K and V are [maxSequences,
// maxTokens, kvHeads, headDim] views; pass the strides (by default all layers
// share one tensor, so a token's stride spans every layer).
const { k } = cache.tensors()[0];
console.log(`backend ${cache.backend}, ${cache.layout.name} layout; layer 0 K at 0x${k.address.toString(16)}, shape [${k.shape}], strides [${k.strides}]`);

const waiting = Array.from({ length: 24 }, (_, i) => ({ id: i, prompt: 200 + ((i * 97) % 900), output: 20 + ((i * 31) % 60) }));
waiting.push({ id: 24, prompt: 4000, output: 50 }); // needs more than the whole budget: rejected at admission
const rejected = [];
const running = []; // { req, seq, length, admittedAt }
const admitting = []; // { req, seq, state: 'mapping' | 'mapped' | 'no memory' }
let step = 0;
let preemptions = 0;
let requeued = 0; // prompts that found no memory and waited again
let mayAdmit = true; // false after a preemption until a sequence finishes: a preempted request cannot cycle
while (waiting.length || running.length || admitting.length) {
  // admit: a slot (best fit among released ones), the prompt and its first new token mapped off the event loop
  while ((mayAdmit || running.length === 0) && waiting.length && running.length + admitting.length < 8) {
    const req = waiting.shift();
    if (!cache.fits(req.prompt + req.output)) {
      rejected.push(req.id); // more than the whole budget: it could never be served, so it is not queued
      continue;
    }
    const a = { req, seq: cache.reserve({ expectedTokens: req.prompt + req.output }), state: 'mapping' };
    admitting.push(a);
    cache.growAsync(a.seq, req.prompt + 1).then(
      () => (a.state = 'mapped'),
      (e) => {
        if (!(e instanceof OutOfMemoryError)) throw e;
        a.state = 'no memory';
      },
    );
  }
  for (const a of admitting.splice(0)) {
    if (a.state === 'mapped') running.push({ req: a.req, seq: a.seq, length: a.req.prompt, admittedAt: step });
    else if (a.state === 'mapping') admitting.push(a);
    else {
      cache.release(a.seq); // no memory for the prompt now: back to the front of the queue
      waiting.unshift(a.req);
      requeued++;
      mayAdmit = false;
    }
  }
  if (running.length === 0) {
    await new Promise((resolve) => setImmediate(resolve)); // prompts still mapping
    continue;
  }
  // one iteration: one more token for every running sequence; all or nothing
  const next = running.map((r) => r.length + 1);
  try {
    // step() itself when the batch is backed (prefetch mapped ahead); on a worker thread when a page is missing
    await cache.stepAsync(running.map((r) => r.seq), next);
  } catch (e) {
    if (!(e instanceof OutOfMemoryError)) throw e;
    mayAdmit = false;
    // prompts mapped while the step ran have decoded nothing yet: they give their memory back first
    const mapped = admitting.filter((a) => a.state === 'mapped');
    for (const a of mapped) {
      cache.release(a.seq);
      admitting.splice(admitting.indexOf(a), 1);
      waiting.unshift(a.req);
      requeued++;
    }
    if (mapped.length > 0) continue;
    if (running.length === 1) {
      if (admitting.length === 0) throw new Error(`request ${running[0].req.id} does not fit in memory on its own`);
      await new Promise((resolve) => setImmediate(resolve)); // a prompt still mapping holds memory: it joins, then the newest goes
      continue;
    }
    // preempt the newest (least work lost); it waits at the front of the queue
    const victim = running.reduce((a, b) => (b.admittedAt > a.admittedAt ? b : a));
    cache.release(victim.seq); // pass { stream } when kernels may still read it
    running.splice(running.indexOf(victim), 1);
    waiting.unshift(victim.req);
    preemptions++;
    continue;
  }
  running.forEach((r, i) => (r.length = next[i]));
  // ... launch attention with r.seq.address(layer, 'k' | 'v'), the strides and r.length here,
  // then wait for the GPU without blocking the event loop:
  await new Promise((resolve) => setImmediate(resolve));
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
console.log(`rejected ${rejected.length} request(s) that can never fit (${rejected.join(', ')})`);
console.log(`served ${24} requests in ${step} steps (${preemptions} preemptions, ${requeued} prompts requeued for memory); pages reused ${s.pagesReused}, mapped ${s.driverCalls.map.calls}, JS-thread driver calls ${s.driverCallsOnJsThread}`);
console.log(cache.metrics().split('\n').filter((l) => l.startsWith('vattention_backed_bytes') || l.startsWith('vattention_prefetch_hits_total')).join('\n'));
cache.close();
console.log('done');
