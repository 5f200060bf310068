#!/usr/bin/env node
// Writes test/fixtures/llama-tiny-batch-reference.json: the CPU reference
// (examples/llama/reference.mjs, float32) on the tiny shape's seeded weights
// for the GPU test's ragged prompt batch: each prompt's last logits, its 32
// greedy tokens and their logits. The longest prompt (4080 tokens: its
// decode crosses the 4096 tokens of a 2 MiB page in the all-layers layout)
// takes the reference about a minute, too long to recompute in every GPU
// run; test/llama.test.ts recomputes the short prompts on CI and checks
// they match this file.
//   node scripts/llama-batch-reference.mjs
import { writeFileSync } from 'node:fs';
import { batchPrompts, BATCH_SEED, tinyReference } from '../test/llama-batch.mjs';

const { m, model } = tinyReference('float16');
const entries = batchPrompts(m).map((prompt) => {
  const seq = model.newSequence();
  const last = model.forward(seq, prompt).at(-1);
  const tokens = [], logits = [];
  let current = last;
  for (let i = 0; i < 32; i++) {
    let best = 0;
    for (let j = 1; j < current.length; j++) if (current[j] > current[best]) best = j;
    tokens.push(best);
    logits.push(current[best]);
    current = model.forward(seq, [best])[0];
  }
  return { length: prompt.length, promptLogits: Array.from(last, (x) => Number(x.toPrecision(7))), tokens, logits: logits.map((x) => Number(x.toPrecision(7))) };
});
writeFileSync(new URL('../test/fixtures/llama-tiny-batch-reference.json', import.meta.url), JSON.stringify({ seed: BATCH_SEED, dtype: 'float16', entries }) + '\n');
console.log('wrote test/fixtures/llama-tiny-batch-reference.json');
