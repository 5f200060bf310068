#!/usr/bin/env node
// Generates tokens with the GPU model over the cache: loads a checkpoint
// (config.json + *.safetensors) or random weights of a named shape, serves
// a batch of requests by continuous batching (serve.mjs) over a KVCache or
// paged blocks, prints each request's tokens and the decode rate.
//   node node_modules/vattention/examples/llama/generate.mjs --help
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { KVCache } from 'vattention';
import * as kernels from 'vattention/kernels';
import { parseConfig, SHAPES } from './config.mjs';
import { GpuModel, gpuRunner } from './gpu-model.mjs';
import { CacheKV, PagedKV } from './kv-stores.mjs';
import { openSafetensors } from './safetensors.mjs';
import { createSampler } from './sampling.mjs';
import { serve } from './serve.mjs';
import { loadTokenizer } from './tokenizer.mjs';
import { encode, randomWeights, storageDtype } from './weights.mjs';

const HELP = `generate.mjs: a Llama-architecture model decoding through vattention's KV cache on the GPU

  --model DIR           a checkpoint: config.json and *.safetensors (Llama 2/3, Mistral), fp16 or bf16
  --shape NAME          random weights instead: tiny | llama-3-8b (seeded; llama-3-8b filled on the device)
  --seed N              seed of random weights and prompts (default 1)
  --text TEXT           every request's prompt as text, through the checkpoint's tokenizer.json (BOS first);
                        each request's output is printed as text as well
  --tokenizer FILE      a tokenizer.json elsewhere than in --model DIR
  --prompt IDS          comma-separated token ids of every request's prompt instead
  --prompt-length N     random prompts of N tokens instead (default 16)
  --requests N          requests served at once (default 4)
  --max-new-tokens N    tokens generated per request (default 32); a request ends earlier at the config's eos_token_id
  --ignore-eos          generate --max-new-tokens tokens whatever they are
  --prefill-chunk N     prefill prompts N tokens per call, between decode steps (default: a prompt in one call)
  --temperature T       0: greedy (default); above: sample softmax(logits / T), seeded by --seed and the request
  --top-p P             with a temperature: sample only the most likely tokens whose probability adds up to P (default 1)
  --store NAME          per-layer | all-layers | layer-groups:N (a KVCache) | paged (blocks of 16); default per-layer
  --memory-budget MiB   the KVCache's budget (default: free memory); smaller preempts
  --device N            CUDA device (default 0)
  --help                this text

Prints each request's generated token ids, the preemptions and the tokens per second.`;

function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--help') return { help: true };
    if (a === '--ignore-eos') {
      out['ignore-eos'] = true;
      continue;
    }
    if (!a.startsWith('--') || i + 1 >= argv.length) throw new Error(`generate: unexpected argument '${a}' (see --help)`);
    out[a.slice(2)] = argv[++i];
  }
  return out;
}

const integer = (args, key, fallback) => {
  const v = args[key] === undefined ? fallback : Number(args[key]);
  if (!Number.isSafeInteger(v) || v < 0) throw new Error(`generate: --${key} must be a non-negative integer, got '${args[key]}'`);
  return v;
};

const fraction = (args, key, fallback) => {
  const v = args[key] === undefined ? fallback : Number(args[key]);
  if (!Number.isFinite(v) || v < 0) throw new Error(`generate: --${key} must be a non-negative number, got '${args[key]}'`);
  return v;
};

/** The sampler of --temperature, --top-p and --seed. */
function samplerOf(args) {
  try {
    return createSampler({ temperature: fraction(args, 'temperature', 0), topP: fraction(args, 'top-p', 1), seed: integer(args, 'seed', 1) });
  } catch (e) {
    if (e.code !== 'ERR_SAMPLING_OPTIONS') throw e;
    const flag = { temperature: '--temperature', topP: '--top-p', seed: '--seed' }[e.option];
    throw new Error(`generate: ${flag}: ${e.message}`);
  }
}

/** The shape and a weight(name) → 16-bit storage of a checkpoint directory, or random weights. */
function loadWeights(args) {
  if (args.model) {
    const config = JSON.parse(readFileSync(join(args.model, 'config.json'), 'utf8'));
    const m = parseConfig(config);
    const files = readdirSync(args.model).filter((f) => f.endsWith('.safetensors')).map((f) => openSafetensors(join(args.model, f)));
    if (files.length === 0) throw new Error(`generate: no *.safetensors in ${args.model}`);
    const weight = (name) => {
      const file = files.find((f) => f.tensors.has(name));
      if (!file) throw new Error(`generate: the checkpoint has no tensor '${name}'`);
      const t = file.tensors.get(name);
      if (t.dtype !== storageDtype(m.dtype)) throw new Error(`generate: tensor '${name}' is ${t.dtype}, the config says ${m.dtype}`);
      const bytes = file.readTensor(name);
      return new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2);
    };
    return { m, weight, eos: config.eos_token_id, close: () => files.forEach((f) => f.close()) };
  }
  const shape = args.shape ?? 'tiny';
  if (!SHAPES[shape]) throw new Error(`generate: unknown shape '${shape}' (${Object.keys(SHAPES).join(', ')})`);
  const m = parseConfig(SHAPES[shape]);
  const seed = integer(args, 'seed', 1);
  if (m.hidden * m.vocab > 1e8) return { m, fill: { seed }, close() {} }; // too large for JS memory: filled on the device
  const weights = randomWeights(m, { seed });
  return { m, weight: (name) => encode(weights.get(name).values, storageDtype(m.dtype)), close() {} };
}

/** The tokenizer of --text (required) or of a checkpoint that has one (to print text), else null. */
function tokenizerOf(args) {
  if (args.text !== undefined && args.prompt !== undefined) throw new Error('generate: --text and --prompt are two ways to give the prompt: pick one');
  const path = args.tokenizer ?? (args.model === undefined ? undefined : join(args.model, 'tokenizer.json'));
  if (path === undefined || !existsSync(path)) {
    if (args.text !== undefined) throw new Error(`generate: --text needs a tokenizer.json: ${path === undefined ? 'give --model DIR (with one) or --tokenizer FILE' : `none at ${path}`}`);
    return null;
  }
  try {
    return loadTokenizer(path);
  } catch (e) {
    if (args.text !== undefined || args.tokenizer !== undefined) throw new Error(`generate: ${path}: ${e.message}`);
    console.error(`generate: ${path} not used, outputs printed as ids only: ${e.message}`); // it was only for printing
    return null;
  }
}

/** The token ids that end a request: the checkpoint config's eos_token_id (one or a list), unless --ignore-eos. */
function stopTokensOf(args, eos) {
  return args['ignore-eos'] ? [] : [eos].flat().filter((t) => Number.isInteger(t));
}

/** The tokens as text (JSON-quoted), or why not: a checkpoint's embedding may have ids its tokenizer lacks (padding). */
function textOf(tokenizer, tokens) {
  try {
    return JSON.stringify(tokenizer.decode(tokens, { skipSpecial: true }));
  } catch (e) {
    if (e.code !== 'ERR_INVALID_ARGUMENT') throw e;
    return `(not text: ${e.message})`;
  }
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  if (args.help) return console.log(HELP);
  const sampler = samplerOf(args);
  const requests = integer(args, 'requests', 4), maxNewTokens = integer(args, 'max-new-tokens', 32), device = integer(args, 'device', 0);
  const seed = integer(args, 'seed', 1), length = integer(args, 'prompt-length', 16);
  const prefillChunk = args['prefill-chunk'] === undefined ? Infinity : integer(args, 'prefill-chunk', 0);
  if (prefillChunk === 0) throw new Error('generate: --prefill-chunk must be a positive integer');
  const tokenizer = tokenizerOf(args);
  const source = loadWeights(args);
  const { m } = source;
  const fixed = args.text !== undefined ? tokenizer.encode(args.text) : args.prompt?.split(',').map(Number);
  if (fixed?.some((t) => !Number.isInteger(t) || t < 0 || t >= m.vocab)) throw new Error(`generate: ${args.text !== undefined ? 'the tokenizer gives ids' : '--prompt ids must be integers'} outside [0, ${m.vocab})`);
  if (fixed?.length === 0) throw new Error('generate: the prompt has no tokens');
  const stopTokens = stopTokensOf(args, source.eos);
  const prompts = Array.from({ length: requests }, (_, r) => fixed ?? Array.from({ length }, (_, i) => (seed * 7919 + r * 104729 + i * 31) % m.vocab));
  const maxTokens = Math.max(...prompts.map((p) => p.length)) + maxNewTokens + 1;
  if (maxTokens - 1 > m.maxPositions) throw new Error(`generate: a prompt and --max-new-tokens take ${maxTokens - 1} positions; the model has ${m.maxPositions} (max_position_embeddings, or its sliding window)`);
  // the rows of the largest call: a prompt's chunk, or one token of every request
  const maxRows = Math.max(Math.min(maxTokens, prefillChunk), requests);
  const lib = kernels.linearLibrary(); // the arguments are all checked: now the GPU
  if (!lib.available) throw Object.assign(new Error(`generate: ${lib.problem}`), { code: 'ERR_LIBRARY_UNAVAILABLE' });
  const model = new GpuModel(m, { weight: source.weight, fill: source.fill, maxRows, maxBatch: requests, device });
  source.close();
  const storeName = args.store ?? 'per-layer';
  let cache, kv;
  if (storeName === 'paged') {
    kv = cache = new PagedKV(m, { blocks: requests * Math.ceil(maxTokens / 16), maxSequences: requests, maxTokens, device });
  } else {
    const layout = storeName.startsWith('layer-groups:') ? { layerGroups: Number(storeName.split(':')[1]) } : storeName;
    const budget = args['memory-budget'] === undefined ? {} : { memoryBudget: integer(args, 'memory-budget', 0) * 2 ** 20 };
    cache = new KVCache({ backend: 'cuda', device, layers: m.layers, kvHeads: m.kvHeads, headDim: m.headDim, dtype: m.dtype, maxSequences: requests, maxTokens, layout, ...budget });
    kv = new CacheKV(cache, { device });
  }
  try {
    const start = process.hrtime.bigint();
    const { outputs, preemptions, steps } = await serve({ cache, runner: gpuRunner(model, kv, sampler), requests: prompts.map((prompt, id) => ({ id, prompt, maxNewTokens, stopTokens })), prefillChunk });
    const seconds = Number(process.hrtime.bigint() - start) / 1e9;
    for (const [id, tokens] of outputs) {
      console.log(`request ${id}: ${tokens.join(',')}`);
      if (tokenizer) console.log(`text ${id}: ${textOf(tokenizer, tokens)}`);
    }
    const generated = [...outputs.values()].reduce((n, t) => n + t.length, 0);
    console.log(`${generated} tokens in ${seconds.toFixed(2)} s (${(generated / seconds).toFixed(0)} tokens/s, prefill included), ${steps} decode steps, ${preemptions} preemptions, store ${storeName}`);
  } finally {
    kv.close();
    if (cache !== kv) cache.close();
    model.close();
  }
}

main().catch((e) => {
  console.error(e.message);
  process.exit(e.code === 'ERR_CUDA_UNAVAILABLE' || e.code === 'ERR_LIBRARY_UNAVAILABLE' ? 3 : 1);
});
