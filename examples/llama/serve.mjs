// Continuous batching of a Llama model over a KV cache, as the package's
// README teaches it: admission (reserve + growAsync for the prompt, the
// prompt prefilled in one batched call), one stepAsync per decode iteration
// for the whole running batch, preemption of the newest sequence on
// ERR_OUT_OF_MEMORY (its prompt and what it generated go back to the queue,
// recomputed when it is admitted again; nothing is admitted until a request
// finishes), release when a request is done.
// `cache` is a KVCache or anything with its reserve / growAsync / stepAsync
// / release (PagedKV); `runner` drives a model over it (referenceRunner of
// reference.mjs on the CPU, gpuRunner of gpu-model.mjs on the GPU):
//   start(seq, key) → state   a sequence's model state, nothing computed yet
//                             (key: the request's id, which seeds its samples)
//   prefill([{ state, tokens }]) → next token of each (greedy or sampled)
//   decode([{ state, token }]) → next token of each

// By code, not class: the cache may come from another copy of the package.
const outOfMemory = (e) => e?.code === 'ERR_OUT_OF_MEMORY';

/**
 * Serves `requests` ([{ id: integer, prompt: number[], maxNewTokens }]) as the runner picks tokens;
 * returns { outputs: Map id → generated tokens, preemptions, steps }.
 */
export async function serve({ cache, runner, requests, onToken }) {
  const waiting = requests.map((r) => ({ id: r.id, prompt: r.prompt, left: r.maxNewTokens, out: [] }));
  const running = [];
  const outputs = new Map(requests.map((r) => [r.id, []]));
  let preemptions = 0, steps = 0;
  // After a preemption nothing is admitted until a request finishes: the
  // preempted one would otherwise come straight back and be preempted again.
  let admitting = true;
  const emit = (r, token) => {
    r.out.push(token);
    r.left--;
    outputs.set(r.id, r.out);
    onToken?.(r.id, token);
  };
  while (waiting.length > 0 || running.length > 0) {
    if (waiting.length > 0 && (admitting || running.length === 0) && running.length < cache.options.maxSequences) await admit(waiting.shift());
    if (running.length === 0) continue;
    const lengths = running.map((r) => r.state.length + 1);
    try {
      await cache.stepAsync(running.map((r) => r.seq), lengths);
    } catch (e) {
      if (!outOfMemory(e) || running.length < 2) throw e;
      const victim = running.pop(); // the newest: it loses the least work
      cache.release(victim.seq);
      waiting.unshift({ ...victim, prompt: [...victim.prompt, ...victim.out.slice(0, -1)], pending: victim.out.at(-1) });
      preemptions++;
      admitting = false;
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
  return { outputs, preemptions, steps };

  // Reserves and grows the prompt's pages, runs the prompt; on
  // ERR_OUT_OF_MEMORY the request waits for a sequence to finish.
  async function admit(r) {
    const seq = cache.reserve();
    try {
      await cache.growAsync(seq, r.prompt.length);
    } catch (e) {
      cache.release(seq);
      if (!outOfMemory(e) || running.length === 0) throw e; // alone, it never fits
      waiting.unshift(r);
      return;
    }
    const state = runner.start(seq, r.id);
    const [next] = runner.prefill([{ state, tokens: r.prompt }]);
    const entry = { ...r, seq, state };
    // a re-admitted request's last token is already chosen: recomputing its prefix gives the same logits
    if (r.pending === undefined) emit(entry, next);
    else entry.out = [...r.out];
    delete entry.pending;
    if (entry.left > 0) running.push(entry);
    else cache.release(seq);
  }
}
