#!/usr/bin/env node
// Writes random Llama weights for a named shape in the files Llama
// implementations load: config.json and model.safetensors (Hugging Face's
// names, shapes and dtypes), and for small shapes reference.json: a prompt,
// the first greedy tokens and their logits from the CPU reference in float32,
// so that another implementation can be compared on the same files.
//   node examples/llama/make-weights.mjs --shape tiny --out DIR [--seed 1] [--std X] [--steps 32]
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { parseConfig, SHAPES, tensorList } from './config.mjs';
import { greedy, ReferenceModel } from './reference.mjs';
import { writeSafetensors } from './safetensors.mjs';
import { encode, normals, randomWeights, storageDtype } from './weights.mjs';

const usage = `usage: node examples/llama/make-weights.mjs --shape <${Object.keys(SHAPES).join('|')}> --out DIR [options]
  --seed N     seed of the weights and the prompt (default 1)
  --std X      standard deviation of the matrices (default 1/sqrt(hidden_size))
  --steps N    greedy tokens in reference.json (default 32; small shapes only)
  --help       this text`;

/** The fixed prompt of a seed: ragged lengths are the GPU test's business; one prompt here. */
export function referencePrompt(m, seed, length = 12) {
  const next = normals(seed + 1000);
  return Array.from({ length }, () => Math.floor(Math.abs(next() * 997)) % m.vocab);
}

/**
 * Writes the files for `shape` under `out`; returns what it wrote. `config`:
 * keys of config.json that replace the shape's (say `torch_dtype`,
 * `rope_scaling`, `tie_word_embeddings`), for variants of a named shape.
 */
export function makeWeights({ shape, out, seed = 1, std, steps = 32, config: overrides = {} }) {
  if (!SHAPES[shape]) throw new Error(`unknown shape '${shape}' (${Object.keys(SHAPES).join(', ')})`);
  const config = { ...SHAPES[shape], ...overrides };
  const m = parseConfig(config);
  const weights = randomWeights(m, { seed, ...(std === undefined ? {} : { std }) });
  mkdirSync(out, { recursive: true });
  writeFileSync(join(out, 'config.json'), JSON.stringify(config, null, 2) + '\n');
  const dtype = storageDtype(m.dtype);
  const tensors = tensorList(m).map(({ name, shape: dims }) => ({ name, dtype, shape: dims, data: encode(weights.get(name).values, dtype) }));
  writeSafetensors(join(out, 'model.safetensors'), tensors, { format: 'pt', generator: 'vattention examples/llama/make-weights.mjs', seed: String(seed) });
  const written = ['config.json', 'model.safetensors'];
  const params = tensorList(m).reduce((a, t) => a + t.shape.reduce((x, d) => x * d, 1), 0);
  if (params <= 50e6) {
    const model = new ReferenceModel(m, new Map([...weights].map(([n, w]) => [n, w.values])));
    const prompt = referencePrompt(m, seed);
    const { tokens, logits } = greedy(model, prompt, steps);
    writeFileSync(join(out, 'reference.json'), JSON.stringify({ shape, seed, prompt, greedyTokens: tokens, greedyLogits: logits, computedBy: 'CPU reference, float32 (examples/llama/reference.mjs)' }, null, 2) + '\n');
    written.push('reference.json');
  }
  return { written, params };
}

if (import.meta.url === `file://${process.argv[1]}`) {
  let args;
  try {
    args = parseArgs({ options: { shape: { type: 'string' }, out: { type: 'string' }, seed: { type: 'string' }, std: { type: 'string' }, steps: { type: 'string' }, help: { type: 'boolean' } } }).values;
  } catch (e) {
    console.error(`${e.message}\n${usage}`);
    process.exit(2);
  }
  if (args.help) {
    console.log(usage);
    process.exit(0);
  }
  if (!args.shape || !args.out) {
    console.error(usage);
    process.exit(2);
  }
  const num = (v, name) => {
    if (v === undefined) return undefined;
    const n = Number(v);
    if (!Number.isFinite(n)) {
      console.error(`--${name} must be a number, got '${v}'`);
      process.exit(2);
    }
    return n;
  };
  try {
    const { written, params } = makeWeights({ shape: args.shape, out: args.out, seed: num(args.seed, 'seed'), std: num(args.std, 'std'), steps: num(args.steps, 'steps') });
    console.log(`${args.shape}: ${(params / 1e6).toFixed(1)}M parameters; wrote ${written.join(', ')} in ${args.out}`);
  } catch (e) {
    console.error(e.message);
    process.exit(1);
  }
}
