// The GPU model test's fixed inputs, shared with the script that writes its
// reference (scripts/llama-batch-reference.mjs): the tiny shape's seeded
// weights and a ragged prompt batch.
import { parseConfig, SHAPES } from '../examples/llama/config.mjs';
import { ReferenceModel } from '../examples/llama/reference.mjs';
import { randomWeights } from '../examples/llama/weights.mjs';

export const BATCH_SEED = 5;

/**
 * How far the GPU's bf16 logits may be from the float32 reference's, fed the same tokens. bf16 keeps 8
 * significant bits: the reference rounding as the GPU does (ReferenceModel's `rounding`) lands 0.054 away at worst
 * on the short prompts (llama.test.ts holds it under a third of this); the rest is the GPU's order of summation.
 */
export const BF16_LOGIT_TOLERANCE = 0.25;

/** The tiny shape in `dtype`, its seeded weights and the CPU reference over them (rounding as the GPU does, or not). */
export function tinyReference(dtype, { rounding = false } = {}) {
  const m = parseConfig({ ...SHAPES.tiny, torch_dtype: dtype });
  const weights = randomWeights(m, { seed: BATCH_SEED });
  const model = new ReferenceModel(m, new Map([...weights].map(([name, w]) => [name, w.values])), { rounding });
  return { m, weights, model };
}

/** Prompts of 4080 (its decode crosses the 4096 tokens of a 2 MiB page in the all-layers layout), 37, 1 and 300 tokens. */
export function batchPrompts(m, lengths = [4080, 37, 1, 300]) {
  return lengths.map((n, b) => Array.from({ length: n }, (_, i) => (i * 7919 + b * 104729 + 13) % m.vocab));
}
