// Continuous batching of a Llama model over a KV cache, as the package's
// README teaches it: admission (reserve + growAsync for the whole prompt),
// the prompt prefilled in chunks of at most `prefillChunk` tokens, one chunk
// per iteration next to the decode step of the running batch (chunked
// prefill: a long prompt joining does not stall the others' tokens for its
// whole length), one stepAsync per decode iteration for the running batch,
// preemption of the newest sequence on ERR_OUT_OF_MEMORY (its prompt and
// what it generated go back to the queue, recomputed when it is admitted
// again; nothing is admitted until a request finishes), release when a
// request is done.
// `cache` is a KVCache or anything with its reserve / growAsync / stepAsync
// / release (PagedKV); `runner` drives a model over it (referenceRunner of
// reference.mjs on the CPU, gpuRunner of gpu-model.mjs on the GPU):
//   start(seq, key) → state   a sequence's model state, nothing computed yet
//                             (key: the request's id, which seeds its samples)
//   prefill([{ state, tokens }]) → next token of each (greedy or sampled),
//                             the tokens following what the state holds
//   decode([{ state, token }]) → next token of each

// By code, not class: the cache may come from another copy of the package.
const outOfMemory = (e) => e?.code === 'ERR_OUT_OF_MEMORY';

/**
 * Serves `requests` ([{ id: integer, prompt: number[], maxNewTokens, stopTokens?: number[] }]) as the runner picks tokens;
 * a request ends after maxNewTokens tokens or after one of its stopTokens (end of sequence), which is kept in its output.
 * `prefillChunk`: the most prompt tokens one prefill call carries (default: the whole prompt in one call).
 * Returns { outputs: Map id → generated tokens, preemptions, steps, prefillCalls }.
 */
export async function serve({ cache, runner, requests, onToken, prefillChunk = Infinity }) {
  if (!(prefillChunk === Infinity || (Number.isSafeInteger(prefillChunk) && prefillChunk > 0)))
    throw new RangeError(`serve: prefillChunk must be a positive integer (tokens), got ${prefillChunk}`);
  for (const r of requests)
    if (!Array.isArray(r.prompt) || r.prompt.length === 0) throw new RangeError(`serve: request ${r.id} has no prompt tokens`);
  const waiting = requests.map((r) => ({ id: r.id, prompt: r.prompt, left: r.maxNewTokens, out: [], stop: new Set(r.stopTokens ?? []) }));
  const prefilling = []; // admitted, prompt partly prefilled; oldest first
  const running = []; // decoding; oldest first
  const outputs = new Map(requests.map((r) => [r.id, []]));
  let preemptions = 0, steps = 0, prefillCalls = 0;
  // After a preemption nothing is admitted until a request finishes: the
  // preempted one would otherwise come straight back and be preempted again.
  let admitting = true;
  const emit = (r, token) => {
    r.out.push(token);
    r.left = r.stop.has(token) ? 0 : r.left - 1;
    outputs.set(r.id, r.out);
    onToken?.(r.id, token);
  };
  while (waiting.length > 0 || prefilling.length > 0 || running.length > 0) {
    const admitted = prefilling.length + running.length;
    if (waiting.length > 0 && (admitting || admitted === 0) && admitted < cache.options.maxSequences) await admit(waiting.shift());
    if (prefilling.length > 0) prefillNextChunk(prefilling[0]);
    if (running.length === 0) continue;
    const lengths = running.map((r) => r.state.length + 1);
    try {
      await cache.stepAsync(running.map((r) => r.seq), lengths);
    } catch (e) {
      if (!outOfMemory(e) || prefilling.length + running.length < 2) throw e;
      preempt();
      continue;
    }
    steps++;
    const next = runner.decode(running.map((r) => ({ state: r.state, token: r.out.at(-1) })));
    running.forEach((r, i) => emit(r, next[i]));
    for (const r of running.filter((x) => x.left === 0)) {
      cache.release(r.seq);
      admitting = true;
    }
    running.splice(0, running.length, ...running.filter((x) => x.left > 0));
  }
  return { outputs, preemptions, steps, prefillCalls };

  // Reserves and grows the pages of everything to prefill (the chunks then
  // need no memory of their own); on ERR_OUT_OF_MEMORY the request waits
  // for a sequence to finish. A request preempted after it generated tokens
  // prefills its prompt and those tokens but the last, which is its next
  // input (recomputing the prefix gives the same logits).
  async function admit(r) {
    const tokens = r.out.length > 0 ? [...r.prompt, ...r.out.slice(0, -1)] : r.prompt;
    const seq = cache.reserve();
    try {
      await cache.growAsync(seq, tokens.length);
    } catch (e) {
      cache.release(seq);
      if (!outOfMemory(e) || prefilling.length + running.length === 0) throw e; // alone, it never fits
      waiting.unshift(r);
      return;
    }
    prefilling.push({ ...r, seq, state: runner.start(seq, r.id), tokens, prefilled: 0 });
  }

  // One chunk of the oldest prompt; after its last chunk the request decodes.
  function prefillNextChunk(entry) {
    const chunk = entry.tokens.slice(entry.prefilled, entry.prefilled + prefillChunk);
    const [next] = runner.prefill([{ state: entry.state, tokens: chunk }]);
    prefillCalls++;
    entry.prefilled += chunk.length;
    if (entry.prefilled < entry.tokens.length) return;
    prefilling.shift();
    if (entry.out.length === 0) emit(entry, next); // else its next token was chosen before it was preempted
    if (entry.left > 0) running.push(entry);
    else cache.release(entry.seq);
  }

  // The newest admitted request goes back to the front of the queue, as it
  // came (its prompt and what it generated): one still prefilling (it lost
  // the least), else the newest decoding one.
  function preempt() {
    const victim = prefilling.length > 0 ? prefilling.pop() : running.pop();
    cache.release(victim.seq);
    waiting.unshift({ id: victim.id, prompt: victim.prompt, left: victim.left, out: victim.out, stop: victim.stop });
    preemptions++;
    admitting = false;
  }
}
