// The GPU model test's fixed inputs, shared with the script that writes its
// reference (scripts/llama-batch-reference.mjs): the tiny shape's seeded
// weights and a ragged prompt batch.
import { parseConfig, SHAPES } from '../examples/llama/config.mjs';
import { ReferenceModel } from '../examples/llama/reference.mjs';
import { randomWeights } from '../examples/llama/weights.mjs';

export const BATCH_SEED = 5;

/** The tiny shape in `dtype`, its seeded weights and the CPU reference over them. */
export function tinyReference(dtype) {
  const m = parseConfig({ ...SHAPES.tiny, torch_dtype: dtype });
  const weights = randomWeights(m, { seed: BATCH_SEED });
  const model = new ReferenceModel(m, new Map([...weights].map(([name, w]) => [name, w.values])));
  return { m, weights, model };
}

/** Prompts of 4080 (its decode crosses the 4096 tokens of a 2 MiB page in the all-layers layout), 37, 1 and 300 tokens. */
export function batchPrompts(m, lengths = [4080, 37, 1, 300]) {
  return lengths.map((n, b) => Array.from({ length: n }, (_, i) => (i * 7919 + b * 104729 + 13) % m.vocab));
}
