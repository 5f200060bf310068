// The Llama example model (examples/llama) on the GPU, the tiny shape
// against the float32 CPU reference: a ragged prompt batch (4080, 37, 1 and
// 300 tokens, prefilled in one call by the causal kernel) gives each prompt's
// logits within fp16 tolerance and then the same 32 greedy tokens, decoded
// in batches, over a KVCache of every layout and over paged blocks of 16;
// the same through the serving loop with a sequence preempted and
// re-admitted, and with a sequence forked mid-generation. The 4080-token
// prompt's decode crosses a 2 MiB page of the all-layers layout (4096
// tokens). The reference of the fp16 batch is test/fixtures (written by
// scripts/llama-batch-reference.mjs, checked against the live reference on
// CI by llama.test.ts); bf16 runs the short prompts against the live one.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KVCache } from '../lib/index.js';
import * as kernels from 'vattention/kernels';
import { GpuModel, gpuRunner } from '../examples/llama/gpu-model.mjs';
import { CacheKV, PagedKV } from '../examples/llama/kv-stores.mjs';
import { argmax } from '../examples/llama/reference.mjs';
import { makeWeights } from '../examples/llama/make-weights.mjs';
import { serve } from '../examples/llama/serve.mjs';
import { loadTokenizer } from '../examples/llama/tokenizer.mjs';
import { encode, storageDtype } from '../examples/llama/weights.mjs';
import { cudaSkip, layouts } from './backends.js';
import fixture from './fixtures/llama-tiny-batch-reference.json';
import { batchPrompts, BF16_LOGIT_TOLERANCE, tinyReference } from './llama-batch.mjs';
import { byteLevelTokenizer } from './tokenizer-files.mjs';

const library = kernels.linearLibrary();
const skip = cudaSkip ?? (library.available ? null : library.problem);
const STEPS = 32;

interface Expected {
  promptLogits: ArrayLike<number>;
  tokens: number[];
  logits: number[];
}

/** The largest logit error beyond tolerance (≤ 0 when all are within it). */
function excess(got: ArrayLike<number>, want: ArrayLike<number>, dtype: string): number {
  const [abs, rel] = dtype === 'float16' ? [0.02, 0.02] : [0.08, 0.05];
  let worst = -Infinity;
  for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(got[i]! - want[i]!) - (abs + rel * Math.abs(want[i]!)));
  return worst;
}

type Store = CacheKV | PagedKV;
interface Entry {
  seq: { slot: number };
  tokens: number[];
  position: number;
}

/** Prefills `prompts` in one call, then decodes STEPS - 1 batched steps; checks logits and tokens against `expected`. */
function checkGreedy(model: GpuModel, kv: Store, seqs: { slot: number }[], prompts: number[][], expected: Expected[], grow: (lengths: number[]) => void): void {
  const dtype = model.dtype;
  const first = model.forward(prompts.map((tokens, b): Entry => ({ seq: seqs[b]!, tokens, position: 0 })), kv, { logits: true });
  expected.forEach((e, b) => expect(excess(first.logits[b], e.promptLogits, dtype), `prompt ${b} (${prompts[b]!.length} tokens) logits`).toBeLessThanOrEqual(0));
  const got: number[][] = prompts.map(() => []);
  let next: number[] = first.next, logits: Float32Array[] = first.logits;
  const lengths = prompts.map((p) => p.length);
  for (let step = 0; step < STEPS; step++) {
    next.forEach((token, b) => {
      got[b]!.push(token);
      // the chosen token's logit against the reference's at this step
      expect(Math.abs(logits[b]![token]! - expected[b]!.logits[step]!), `entry ${b} step ${step}`).toBeLessThanOrEqual(dtype === 'float16' ? 0.05 : 0.2);
    });
    if (step === STEPS - 1) break;
    lengths.forEach((n, b) => (lengths[b] = n + 1));
    grow(lengths);
    ({ next, logits } = model.forward(seqs.map((seq, b) => ({ seq, tokens: [got[b]!.at(-1)!], position: lengths[b]! - 1 })), kv, { logits: true }));
  }
  expect(got).toEqual(expected.map((e) => e.tokens));
}

describe.skipIf(skip !== null)(`the Llama example model on the GPU${skip ? ` (skipped: ${skip})` : ''}`, () => {
  const { m, weights } = tinyReference('float16');
  const prompts = batchPrompts(m);
  const expected = fixture.entries as Expected[];
  const maxTokens = Math.max(...prompts.map((p) => p.length)) + STEPS + 16;
  let model: GpuModel;
  beforeAll(() => {
    const weight = (name: string) => encode(weights.get(name)!.values, storageDtype(m.dtype));
    model = new GpuModel(m, { weight, maxRows: prompts.length * maxTokens, maxBatch: 8 });
  });
  afterAll(() => model?.close());
  const cacheOptions = { backend: 'cuda', layers: m.layers, kvHeads: m.kvHeads, headDim: m.headDim, dtype: 'float16', maxSequences: 6, maxTokens, prefetchTokens: 0 } as const;

  it('the fixture is the batch of this file (prompt lengths, seed)', () => {
    expect(expected.map((e) => (e as unknown as { length: number }).length)).toEqual(prompts.map((p) => p.length));
  });

  for (const { name, layout } of layouts) {
    it(`matches the CPU reference (prompt logits, then ${STEPS} greedy tokens) over a KVCache, ${name} layout`, () => {
      using cache = new KVCache({ ...cacheOptions, layout });
      cache.release(cache.reserve()); // entries do not sit in slots 0..3
      const kv = new CacheKV(cache);
      try {
        const seqs = prompts.map((p) => {
          const seq = cache.reserve();
          cache.grow(seq, p.length);
          return seq;
        });
        checkGreedy(model, kv, seqs, prompts, expected, (lengths) => cache.step(seqs, lengths));
      } finally {
        kv.close();
      }
    });
  }

  it(`matches the CPU reference over paged blocks of 16, blocks of the sequences interleaved`, () => {
    const kv = new PagedKV(m, { blocks: 4 * Math.ceil(maxTokens / 16), maxSequences: 6, maxTokens });
    try {
      const seqs = prompts.map(() => kv.reserve());
      // grow 16 tokens at a time round robin: each sequence's blocks are scattered through the pool
      for (let n = 16; n < maxTokens; n += 16) seqs.forEach((s, b) => kv.grow(s, Math.min(n, prompts[b]!.length)));
      checkGreedy(model, kv, seqs, prompts, expected, (lengths) => kv.step(seqs, lengths));
    } finally {
      kv.close();
    }
  });

  it('serves the batch by continuous batching, a sequence preempted and re-admitted, with the reference tokens', async () => {
    // all-layers: a 2 MiB page holds 4096 tokens of K (or V) of both layers; the
    // budget holds each request's first page pair, so the 4080-token request
    // crossing into its second page group preempts the newest.
    using cache = new KVCache({ ...cacheOptions, layout: 'all-layers', memoryBudget: 8 * 2 ** 21 });
    const kv = new CacheKV(cache);
    try {
      const requests = prompts.map((prompt, id) => ({ id, prompt, maxNewTokens: STEPS }));
      const { outputs, preemptions } = await serve({ cache, runner: gpuRunner(model, kv), requests });
      expect(preemptions).toBeGreaterThan(0);
      expect(prompts.map((_, id) => outputs.get(id))).toEqual(expected.map((e) => e.tokens));
    } finally {
      kv.close();
    }
  });

  it('serves the same batch over paged blocks, preempting when the pool runs out', async () => {
    // blocks for the prompts and a few tokens more: the decode steps run the pool dry
    const blocks = prompts.reduce((n, p) => n + Math.ceil(p.length / 16), 0) + 2;
    const kv = new PagedKV(m, { blocks, maxSequences: 6, maxTokens });
    try {
      const requests = prompts.map((prompt, id) => ({ id, prompt, maxNewTokens: STEPS }));
      const { outputs, preemptions } = await serve({ cache: kv, runner: gpuRunner(model, kv), requests });
      expect(preemptions).toBeGreaterThan(0);
      expect(prompts.map((_, id) => outputs.get(id))).toEqual(expected.map((e) => e.tokens));
    } finally {
      kv.close();
    }
  });

  // Chunked prefill: a chunk's queries attend to the chunks before it in the
  // cache (prefillAttention with a start > 0), and decode steps run between.
  for (const [store, chunk] of [['per-layer', 512], ['paged', 1000]] as const)
    it(`serves the batch with prompts prefilled in chunks of ${chunk} tokens (${store}): the reference tokens`, async () => {
      const cache = store === 'paged' ? null : new KVCache({ ...cacheOptions, layout: store });
      const kv = cache ? new CacheKV(cache) : new PagedKV(m, { blocks: 6 * Math.ceil(maxTokens / 16), maxSequences: 6, maxTokens });
      try {
        const requests = prompts.map((prompt, id) => ({ id, prompt, maxNewTokens: STEPS }));
        const { outputs, prefillCalls } = await serve({ cache: cache ?? kv, runner: gpuRunner(model, kv), requests, prefillChunk: chunk });
        expect(prefillCalls).toBe(prompts.reduce((n, p) => n + Math.ceil(p.length / chunk), 0));
        expect(prompts.map((_, id) => outputs.get(id))).toEqual(expected.map((e) => e.tokens));
      } finally {
        kv.close();
        cache?.close();
      }
    });

  for (const layout of ['per-layer', 'all-layers'] as const) {
    it(`a sequence forked after 5 tokens decodes the same continuation as its parent (${layout})`, () => {
      using cache = new KVCache({ ...cacheOptions, layout });
      const kv = new CacheKV(cache);
      try {
        const b = 3, prompt = prompts[b]!, want = expected[b]!.tokens;
        const parent = cache.reserve();
        cache.grow(parent, prompt.length);
        let [token] = model.forward([{ seq: parent, tokens: prompt, position: 0 }], kv).next;
        const got = [token!];
        for (let i = 1; i < 5; i++) {
          cache.grow(parent, prompt.length + i);
          [token] = model.forward([{ seq: parent, tokens: [got.at(-1)!], position: prompt.length + i - 1 }], kv).next;
          got.push(token!);
        }
        // the child holds the parent's prompt.length + 4 tokens; the last chosen one is not yet in either
        const child = cache.fork(parent);
        const twins = [got.slice(), got.slice()];
        const seqs = [parent, child];
        for (let i = 5; i < STEPS; i++) {
          const length = prompt.length + i;
          cache.step(seqs, [length, length]);
          const next = model.forward(seqs.map((seq, j) => ({ seq, tokens: [twins[j]!.at(-1)!], position: length - 1 })), kv).next;
          next.forEach((t: number, j: number) => twins[j]!.push(t));
        }
        expect(twins[0]).toEqual(want);
        expect(twins[1]).toEqual(want);
      } finally {
        kv.close();
      }
    });
  }

  for (const [store, sampling] of [['all-layers', []], ['paged', ['--prefill-chunk', '5']], ['per-layer', ['--temperature', '0.8', '--top-p', '0.9']]] as const)
    it(`examples/llama/generate.mjs serves random-weight requests end to end (${['--store', store, ...sampling].join(' ')})`, () => {
      const script = fileURLToPath(new URL('../examples/llama/generate.mjs', import.meta.url));
      const run = spawnSync(process.execPath, [script, '--shape', 'tiny', '--requests', '3', '--max-new-tokens', '8', '--store', store, ...sampling], { encoding: 'utf8' });
      expect(run.stderr).toBe('');
      expect(run.status).toBe(0);
      const lines = run.stdout.split('\n').filter((l) => l.startsWith('request '));
      expect(lines).toHaveLength(3);
      for (const line of lines) expect(line.split(': ')[1]!.split(',')).toHaveLength(8);
      expect(run.stdout).toMatch(/24 tokens in .* s \(\d+ tokens\/s/);
    });

  it('generate.mjs --model DIR reads the files make-weights wrote: --prompt gives reference.json\'s greedy tokens; --text goes through tokenizer.json and ends at eos', () => {
    const script = fileURLToPath(new URL('../examples/llama/generate.mjs', import.meta.url));
    const dir = mkdtempSync(join(tmpdir(), 'vat-generate-'));
    makeWeights({ shape: 'tiny', out: dir, seed: 1, steps: 12 });
    const ref = JSON.parse(readFileSync(join(dir, 'reference.json'), 'utf8'));
    const generate = (...args: string[]) => {
      const run = spawnSync(process.execPath, [script, '--model', dir, '--requests', '2', '--max-new-tokens', '12', ...args], { encoding: 'utf8' });
      expect(run.stderr).toBe('');
      expect(run.status).toBe(0);
      const lines = (prefix: string) => run.stdout.split('\n').filter((l) => l.startsWith(prefix)).map((l) => l.slice(l.indexOf(': ') + 2));
      return { tokens: lines('request ').map((l) => l.split(',').map(Number)), texts: lines('text ').map((l) => JSON.parse(l)) };
    };
    const byIds = generate('--prompt', ref.prompt.join(','), '--ignore-eos');
    expect(byIds.tokens).toEqual([ref.greedyTokens, ref.greedyTokens]);
    expect(byIds.texts).toEqual([]); // no tokenizer.json: ids only
    // the tiny config's eos_token_id is 2: the fixture's <|eot_id|>; every other id a token
    writeFileSync(join(dir, 'tokenizer.json'), JSON.stringify(byteLevelTokenizer({ merges: ['h e', 'l l', 'he ll', 'hell o', 'Ġ w', 'o r', 'Ġw or', 'Ġwor l', 'Ġworl d'], firstByte: 3, bos: 1, eot: 2, vocabSize: 1000 })));
    const tokenizer = loadTokenizer(join(dir, 'tokenizer.json'));
    const ids = tokenizer.encode('hello world');
    expect(ids).toEqual([1, tokenizer.idOf('hello'), tokenizer.idOf('Ġworld')]);
    const [all] = generate('--prompt', ids.join(','), '--ignore-eos').tokens;
    const cut = all!.includes(2) ? all!.slice(0, all!.indexOf(2) + 1) : all!;
    const byText = generate('--text', 'hello world');
    expect(byText.tokens).toEqual([cut, cut]);
    expect(byText.texts).toEqual([tokenizer.decode(cut, { skipSpecial: true }), tokenizer.decode(cut, { skipSpecial: true })]);
  });

  // A checkpoint as transformers itself writes one (save_pretrained: its
  // config.json keys of today, its safetensors writer), where python3 has
  // torch + transformers (the GPU host's image).
  const hf = spawnSync('python3', ['-c', 'import torch, transformers'], { encoding: 'utf8' });
  const hfSkip = hf.error ? `no python3 (${hf.error.message})` : hf.status !== 0 ? 'python3 has no torch + transformers' : null;
  for (const dtype of ['float16'])
    it.skipIf(hfSkip !== null)(`generate.mjs --model on what transformers' save_pretrained wrote (${dtype}) gives reference.json's greedy tokens${hfSkip ? ` (skipped: ${hfSkip})` : ''}`, () => {
      const script = fileURLToPath(new URL('../examples/llama/generate.mjs', import.meta.url));
      const dir = mkdtempSync(join(tmpdir(), 'vat-hf-'));
      makeWeights({ shape: 'tiny', out: join(dir, 'ours'), seed: 1, steps: 12, config: { torch_dtype: dtype } });
      const save = spawnSync('python3', ['-c', [
        'import sys, torch, transformers',
        'transformers.logging.set_verbosity_error()',
        `m = transformers.LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=torch.${dtype})`,
        'm.save_pretrained(sys.argv[2])',
      ].join('\n'), join(dir, 'ours'), join(dir, 'saved')], { encoding: 'utf8', timeout: 120_000 });
      expect(save.status, save.stderr).toBe(0);
      const written = JSON.parse(readFileSync(join(dir, 'saved', 'config.json'), 'utf8'));
      const ref = JSON.parse(readFileSync(join(dir, 'ours', 'reference.json'), 'utf8'));
      const run = spawnSync(process.execPath, [script, '--model', join(dir, 'saved'), '--requests', '1', '--max-new-tokens', '12', '--prompt', ref.prompt.join(','), '--ignore-eos'], { encoding: 'utf8' });
      expect(run.stderr, JSON.stringify(written)).toBe('');
      expect(run.status).toBe(0);
      const line = run.stdout.split('\n').find((l) => l.startsWith('request 0: '))!;
      expect(line.slice('request 0: '.length).split(',').map(Number)).toEqual(ref.greedyTokens);
    }, 300_000);

  // bf16's logits are within BF16_LOGIT_TOLERANCE (sized in llama-batch.mjs). The GPU is fed the reference's tokens
  // (teacher forcing): bf16 breaks near ties (a margin of 0.01) differently from float32, which would send the two
  // down different continuations; where their argmaxes differ, the reference must rate the GPU's pick within the
  // tolerance of its own.
  it('bf16: the short prompts match the live CPU reference over a KVCache, step by step on its tokens', () => {
    const ref = tinyReference('bfloat16');
    const short = batchPrompts(ref.m, [37, 1, 300]);
    const want = short.map((prompt) => {
      const seq = ref.model.newSequence();
      const steps: ArrayLike<number>[] = [ref.model.forward(seq, prompt).at(-1)!];
      const tokens: number[] = [];
      for (let i = 0; i < STEPS; i++) {
        const best = argmax(steps.at(-1)!);
        tokens.push(best);
        if (i < STEPS - 1) steps.push(ref.model.forward(seq, [best])[0]!);
      }
      return { steps, tokens };
    });
    const weight = (name: string) => encode(ref.weights.get(name)!.values, storageDtype(ref.m.dtype));
    using bf = new GpuModel(ref.m, { weight, maxRows: 3 * 400, maxBatch: 4 });
    using cache = new KVCache({ ...cacheOptions, dtype: 'bfloat16', maxTokens: 400 });
    const kv = new CacheKV(cache);
    try {
      const seqs = short.map((p) => {
        const seq = cache.reserve();
        cache.grow(seq, p.length);
        return seq;
      });
      const lengths = short.map((p) => p.length);
      let got = bf.forward(short.map((tokens, b) => ({ seq: seqs[b]!, tokens, position: 0 })), kv, { logits: true });
      for (let step = 0; step < STEPS; step++) {
        want.forEach((w, b) => {
          const gpu = got.logits[b]!, cpu = w.steps[step]!;
          let worst = -Infinity;
          for (let i = 0; i < cpu.length; i++) worst = Math.max(worst, Math.abs(gpu[i]! - cpu[i]!) - BF16_LOGIT_TOLERANCE);
          expect(worst, `entry ${b} step ${step} logits`).toBeLessThanOrEqual(0);
          const pick = got.next[b]!, own = w.tokens[step]!;
          expect(cpu[own]! - cpu[pick]!, `entry ${b} step ${step}: GPU picks ${pick}, reference ${own}`).toBeLessThanOrEqual(BF16_LOGIT_TOLERANCE);
        });
        if (step === STEPS - 1) break;
        lengths.forEach((n, b) => (lengths[b] = n + 1));
        cache.step(seqs, lengths);
        got = bf.forward(seqs.map((seq, b) => ({ seq, tokens: [want[b]!.tokens[step]!], position: lengths[b]! - 1 })), kv, { logits: true });
      }
    } finally {
      kv.close();
    }
  });
});
