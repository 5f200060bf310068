// A complete serving loop with vattention, runnable as it is:
//   node examples/serving-loop.mjs
// It uses the GPU when one is present (backend 'auto'), host memory otherwise.
// Requests arrive, are prefilled, decode one token per step in a batch, and
// leave; the KV cache backs each sequence's K and V on demand.
import { KVCache, OutOfMemoryError } from 'vattention';

const cache = new KVCache({
  layers: 8,                 // a small model so the example runs anywhere
  kvHeads: 8,
  headDim: 128,
  dtype: 'float16',
  maxSequences: 16,
  maxTokens: 4096,
  memoryBudget: 512 * 2 ** 20,
});
cache.on('reclaim', (e) => console.log(`  reclaimed ${e.pages} pages for a ${e.operation}`));

// Your attention kernel takes plain contiguous tensors: these are its inputs.
const { k, v } = cache.tensors()[0];
console.log(`backend ${cache.backend}; layer 0 K at 0x${k.address.toString(16)}, shape [${k.shape}], strides [${k.strides}]`);

const incoming = Array.from({ length: 24 }, (_, i) => ({ id: i, prompt: 200 + ((i * 97) % 900), output: 20 + ((i * 31) % 60) }));
const running = []; // { req, seq, length }
let step = 0;
while (incoming.length || running.length) {
  // admit: reserve a slot (best fit among released ones) and prefill
  while (incoming.length && running.length < 8) {
    const req = incoming[0];
    const seq = cache.reserve({ expectedTokens: req.prompt + req.output });
    try {
      await cache.growAsync(seq, req.prompt); // big prefills map off the event loop
    } catch (e) {
      cache.release(seq);
      if (e instanceof OutOfMemoryError) break; // wait until memory frees up
      throw e;
    }
    incoming.shift();
    running.push({ req, seq, length: req.prompt });
  }
  // decode: one token for every running sequence; prefetch maps ahead meanwhile
  for (const r of running) r.length++;
  cache.step(running.map((r) => r.seq), running.map((r) => r.length));
  // ... launch attention with r.seq.address(layer, 'k' | 'v') and r.length here ...
  step++;
  for (let i = running.length - 1; i >= 0; i--) {
    const r = running[i];
    if (r.length - r.req.prompt >= r.req.output) {
      cache.release(r.seq); // pass { stream } when kernels may still read it
      running.splice(i, 1);
    }
  }
}
const s = cache.stats();
console.log(`served 24 requests in ${step} steps; pages reused ${s.pagesReused}, mapped ${s.driverCalls.map.calls}, JS-thread driver calls ${s.driverCallsOnJsThread}`);
console.log(cache.metrics().split('\n').filter((l) => l.startsWith('vattention_backed_bytes') || l.startsWith('vattention_prefetch_hits_total')).join('\n'));
cache.close();
console.log('done');
