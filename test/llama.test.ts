// examples/llama without a GPU: the safetensors reader and writer, the
// config parsing, the random weights and the CPU reference forward pass on
// the tiny shape (against values computed once and checked in, and against
// itself: decoding with its KV cache equals recomputing from scratch).
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { afterAll, describe, expect, it } from 'vitest';
// @ts-expect-error: the example is plain JavaScript
import { ConfigError, parseConfig, ropeFrequencies, SHAPES, tensorList } from '../examples/llama/config.mjs';
// @ts-expect-error: the example is plain JavaScript
import { argmax, cacheStore, greedy, ReferenceModel, referenceRunner } from '../examples/llama/reference.mjs';
// @ts-expect-error: the example is plain JavaScript
import { serve } from '../examples/llama/serve.mjs';
// @ts-expect-error: the example is plain JavaScript
import { createSampler, nucleus, uniform } from '../examples/llama/sampling.mjs';
import { KVCache } from '../lib/index.js';
// @ts-expect-error: the example is plain JavaScript
import { openSafetensors, SafetensorsError, writeSafetensors } from '../examples/llama/safetensors.mjs';
// @ts-expect-error: the example is plain JavaScript
import { decode, encode, randomWeights } from '../examples/llama/weights.mjs';
// @ts-expect-error: the example is plain JavaScript
import { makeWeights, referencePrompt } from '../examples/llama/make-weights.mjs';
import { batchPrompts, BATCH_SEED, BF16_LOGIT_TOLERANCE, tinyReference } from './llama-batch.mjs';
import { linearLibrary } from '../lib/kernels.js';

const root = join(__dirname, '..');
const dir = mkdtempSync(join(tmpdir(), 'vattention-llama-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

type Tensor = { dtype: string; shape: number[]; offset: number; bytes: number };

describe('safetensors', () => {
  it('writes and reads back tensors of every dtype with their metadata, the header padded to 8 bytes', () => {
    const file = join(dir, 'round.safetensors');
    const f32 = Float32Array.from([1.5, -2, 3.25, 0]);
    const f16 = encode(Float32Array.from([0.5, -1, 2, 65504, 1e-3, -0]), 'F16');
    const bf16 = encode(Float32Array.from([1e30, -3.5]), 'BF16');
    writeSafetensors(file, [
      { name: 'a.f32', dtype: 'F32', shape: [2, 2], data: f32 },
      { name: 'b.f16', dtype: 'F16', shape: [3, 2], data: f16 },
      { name: 'c.bf16', dtype: 'BF16', shape: [2], data: bf16 },
      { name: 'empty', dtype: 'F16', shape: [0, 4], data: new Uint16Array(0) },
    ], { format: 'pt' });
    const bytes = readFileSync(file);
    expect(Number(bytes.readBigUInt64LE(0)) % 8).toBe(0);
    const st = openSafetensors(file);
    try {
      expect(st.metadata).toEqual({ format: 'pt' });
      expect([...st.tensors.keys()]).toEqual(['a.f32', 'b.f16', 'c.bf16', 'empty']);
      expect((st.tensors.get('b.f16') as Tensor).shape).toEqual([3, 2]);
      expect(Array.from(decode(st.readTensor('a.f32'), 'F32'))).toEqual([1.5, -2, 3.25, 0]);
      expect(Array.from(decode(st.readTensor('b.f16'), 'F16'))).toEqual([0.5, -1, 2, 65504, Math.fround(0.0010004043579101562), -0]);
      expect(decode(st.readTensor('c.bf16'), 'BF16')[1]).toBe(-3.5);
      expect(st.readTensor('empty').length).toBe(0);
      expect(() => st.readTensor('missing')).toThrow(expect.objectContaining({ code: 'ERR_SAFETENSORS', message: expect.stringContaining("no tensor 'missing'") }));
    } finally {
      st.close();
    }
  });

  /** A file with `header` (a JSON object) and `data` bytes. */
  function fileWith(name: string, header: unknown, data = 0, lengthOverride?: bigint): string {
    const json = Buffer.from(JSON.stringify(header));
    const length = Buffer.alloc(8);
    length.writeBigUInt64LE(lengthOverride ?? BigInt(json.length));
    const file = join(dir, name);
    writeFileSync(file, Buffer.concat([length, json, Buffer.alloc(data)]));
    return file;
  }

  for (const [what, file, message] of [
    ['a file shorter than the length field', () => (writeFileSync(join(dir, 'short'), Buffer.alloc(5)), join(dir, 'short')), 'shorter than the 8-byte'],
    ['a header length past the end', () => fileWith('long', {}, 0, 1000n), 'does not fit'],
    ['a header that is not JSON', () => (writeFileSync(join(dir, 'notjson'), Buffer.concat([Buffer.from([3, 0, 0, 0, 0, 0, 0, 0]), Buffer.from('{x]')])), join(dir, 'notjson')), 'not JSON'],
    ['an unknown dtype', () => fileWith('dtype', { t: { dtype: 'F12', shape: [1], data_offsets: [0, 2] } }, 2), 'F12'],
    ['a size that does not match the shape', () => fileWith('size', { t: { dtype: 'F16', shape: [3], data_offsets: [0, 4] } }, 4), 'needs 6'],
    ['a range past the data', () => fileWith('range', { t: { dtype: 'F16', shape: [4], data_offsets: [0, 8] } }, 4), 'outside the 4 data bytes'],
    ['two tensors that overlap', () => fileWith('overlap', { a: { dtype: 'F16', shape: [2], data_offsets: [0, 4] }, b: { dtype: 'F16', shape: [2], data_offsets: [2, 6] } }, 6), 'overlap'],
  ] as [string, () => string, string][])
    it(`refuses ${what} with ERR_SAFETENSORS`, () => {
      let thrown: unknown;
      try {
        openSafetensors(file());
      } catch (e) {
        thrown = e;
      }
      expect(thrown).toBeInstanceOf(SafetensorsError);
      expect((thrown as { code: string }).code).toBe('ERR_SAFETENSORS');
      expect((thrown as Error).message).toContain(message);
    });
});

describe('Llama configs', () => {
  it('reads the named shapes as Llama implementations do', () => {
    expect(parseConfig(SHAPES['llama-3-8b'])).toEqual({
      layers: 32, hidden: 4096, heads: 32, kvHeads: 8, headDim: 128, intermediate: 14336, vocab: 128256, rmsNormEps: 1e-5, ropeTheta: 500000,
      ropeScaling: { factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 8192 }, tieWordEmbeddings: false, dtype: 'bfloat16', maxPositions: 131072,
    });
    const tiny = parseConfig(SHAPES.tiny);
    expect([tiny.layers, tiny.hidden, tiny.heads, tiny.kvHeads, tiny.headDim, tiny.intermediate, tiny.vocab]).toEqual([2, 256, 4, 2, 64, 512, 1000]);
    // head_dim defaults to hidden / heads; kv heads to heads
    const { head_dim: _h, num_key_value_heads: _k, ...older } = SHAPES.tiny;
    expect(parseConfig(older)).toMatchObject({ headDim: 64, kvHeads: 4 });
  });

  it('reads the keys newer transformers writes (dtype, rope_parameters) as the older ones', () => {
    const { torch_dtype, rope_theta, rope_scaling, ...rest } = SHAPES['llama-3-8b'];
    const newer = { ...rest, dtype: torch_dtype, rope_parameters: { rope_theta, ...rope_scaling } };
    expect(parseConfig(newer)).toEqual(parseConfig(SHAPES['llama-3-8b']));
    const { torch_dtype: t, rope_theta: theta, rope_scaling: _s, ...tinyRest } = SHAPES.tiny;
    const tinyNewer = { ...tinyRest, dtype: t, rope_parameters: { rope_type: 'default', rope_theta: 20000 } };
    expect(parseConfig(tinyNewer)).toEqual({ ...parseConfig(SHAPES.tiny), ropeTheta: 20000 });
    expect(theta).not.toBe(20000);
    expect(() => parseConfig({ ...tinyNewer, dtype: 'float32' })).toThrow('dtype "float32"');
  });

  // test/fixtures/llama-3-8b-config-transformers-5.17.json is what transformers 5.17 wrote for SHAPES['llama-3-8b']
  // (AutoConfig.from_pretrained(dir with that config.json).save_pretrained(out), on the GPU host, 2026-12-07)
  it('reads the config.json transformers 5.17 itself wrote for the Llama-3-8B shape as that shape', () => {
    const written = JSON.parse(readFileSync(join(root, 'test/fixtures/llama-3-8b-config-transformers-5.17.json'), 'utf8'));
    expect(written).toHaveProperty('rope_parameters.rope_type', 'llama3');
    expect(written).not.toHaveProperty('torch_dtype');
    expect(parseConfig(written)).toEqual(parseConfig(SHAPES['llama-3-8b']));
  });

  it('a sliding window in use (Mistral 7B v0.1) caps the positions; one turned off (Qwen2) does not', () => {
    expect(parseConfig({ ...SHAPES.tiny, max_position_embeddings: 32768, sliding_window: 4096 }).maxPositions).toBe(4096);
    expect(parseConfig({ ...SHAPES.tiny, max_position_embeddings: 32768, sliding_window: 4096, use_sliding_window: false }).maxPositions).toBe(32768);
    expect(parseConfig({ ...SHAPES.tiny, max_position_embeddings: 32768, sliding_window: null }).maxPositions).toBe(32768);
    expect(() => parseConfig({ ...SHAPES.tiny, sliding_window: -1 })).toThrow(ConfigError);
  });

  for (const [what, change, message] of [
    ['a missing hidden_size', { hidden_size: undefined }, 'hidden_size'],
    ['heads not a multiple of kv heads', { num_key_value_heads: 3 }, 'multiple of num_key_value_heads'],
    ['attention biases (Qwen2)', { attention_bias: true }, 'biases'],
    ['an unknown rope scaling', { rope_scaling: { rope_type: 'yarn', factor: 4 } }, 'yarn'],
    ['fp32 weights', { torch_dtype: 'float32' }, 'torch_dtype'],
    ['a rope_scaling that is no object', { rope_scaling: 'llama3' }, 'rope_scaling must hold an object'],
    ['a rope_parameters that is no object', { rope_parameters: [1] }, 'rope_parameters must hold an object'],
  ] as [string, Record<string, unknown>, string][])
    it(`refuses ${what} with ERR_MODEL_CONFIG naming it`, () => {
      expect(() => parseConfig({ ...SHAPES.tiny, ...change })).toThrow(ConfigError);
      expect(() => parseConfig({ ...SHAPES.tiny, ...change })).toThrow(message);
    });

  it("Llama-3's rope scaling keeps short wavelengths, divides long ones by the factor, blends between", () => {
    const m = parseConfig(SHAPES['llama-3-8b']);
    const plain = ropeFrequencies({ ...m, ropeScaling: null }), scaled = ropeFrequencies(m);
    const wavelength = (f: number) => (2 * Math.PI) / f;
    let kept = 0, divided = 0, blended = 0;
    for (let i = 0; i < plain.length; i++) {
      if (wavelength(plain[i]) < 8192 / 4) (kept++, expect(scaled[i]).toBe(plain[i]));
      else if (wavelength(plain[i]) > 8192) (divided++, expect(scaled[i]).toBeCloseTo(plain[i] / 8, 15));
      else (blended++, expect(scaled[i]).toBeLessThan(plain[i]), expect(scaled[i]).toBeGreaterThan(plain[i] / 8));
    }
    expect([kept > 0, divided > 0, blended > 0]).toEqual([true, true, true]);
  });

  it('names every tensor as Hugging Face checkpoints do, [out, in]', () => {
    const names = tensorList(parseConfig(SHAPES.tiny)).map((t: { name: string }) => t.name);
    expect(names).toContain('model.layers.1.self_attn.k_proj.weight');
    expect(names).toContain('model.layers.0.mlp.down_proj.weight');
    expect(names.at(-1)).toBe('lm_head.weight');
    expect(tensorList(parseConfig({ ...SHAPES.tiny, tie_word_embeddings: true })).some((t: { name: string }) => t.name === 'lm_head.weight')).toBe(false);
  });
});

describe('sampling (examples/llama/sampling.mjs)', () => {
  const probabilities = [0.5, 0.3, 0.15, 0.05];
  const logits = Float32Array.from([0.15, 0.5, 0.05, 0.3].map(Math.log)); // shuffled: token 1 is the likeliest

  it('cuts to the nucleus: the fewest likeliest tokens whose probability reaches top-p', () => {
    const cut = (topP: number) => nucleus(logits, 1, topP).indices;
    expect(cut(0.4)).toEqual([1]);
    expect(cut(0.5)).toEqual([1]);
    expect(cut(0.6)).toEqual([1, 3]);
    expect(cut(0.8)).toEqual([1, 3]);
    expect(cut(0.81)).toEqual([1, 3, 0]);
    expect(cut(0.96)).toEqual([1, 3, 0, 2]);
    expect(nucleus(logits, 1, 1).indices.sort()).toEqual([0, 1, 2, 3]);
    // equals in index order; a temperature flattens the weights
    expect(nucleus(Float32Array.from([2, 5, 5, 1]), 1, 0.4).indices).toEqual([1]);
    expect(nucleus(Float32Array.from([2, 5, 5, 1]), 1, 0.9).indices).toEqual([1, 2]);
    const hot = nucleus(logits, 4, 1);
    expect(Math.max(...hot.weights) / Math.min(...hot.weights)).toBeCloseTo((0.5 / 0.05) ** 0.25, 5);
  });

  it('draws from the nucleus in proportion to probability, the same token for the same (seed, request, position)', () => {
    const sampler = createSampler({ temperature: 1, topP: 0.8, seed: 3 });
    const counts = [0, 0, 0, 0];
    for (let position = 0; position < 8000; position++) counts[sampler.pick(logits, 5, position)]++;
    expect(counts[0]).toBe(0);
    expect(counts[2]).toBe(0);
    expect(counts[1]! / 8000).toBeGreaterThan(0.5 / 0.8 - 0.03);
    expect(counts[1]! / 8000).toBeLessThan(0.5 / 0.8 + 0.03);
    const all = createSampler({ temperature: 1, seed: 3 }), seen = [0, 0, 0, 0];
    for (let position = 0; position < 8000; position++) seen[all.pick(logits, 5, position)]++;
    [1, 3, 0, 2].forEach((token, rank) => expect(Math.abs(seen[token]! / 8000 - probabilities[rank]!), `token ${token}`).toBeLessThan(0.03));
    const again = Array.from({ length: 50 }, (_, p) => sampler.pick(logits, 5, p));
    expect(Array.from({ length: 50 }, (_, p) => sampler.pick(logits, 5, p))).toEqual(again);
    expect(Array.from({ length: 50 }, (_, p) => createSampler({ temperature: 1, topP: 0.8, seed: 4 }).pick(logits, 5, p))).not.toEqual(again);
    expect(Array.from({ length: 50 }, (_, p) => sampler.pick(logits, 6, p))).not.toEqual(again);
    for (const [seed, key, position] of [[0, 0, 0], [2 ** 40, 7, 1e6], [1, 2 ** 31, 3]]) {
      const u = uniform(seed, key, position);
      expect(u >= 0 && u < 1).toBe(true);
    }
  });

  it('greedy at temperature 0: the first of the largest logits', () => {
    const sampler = createSampler();
    expect(sampler.greedy).toBe(true);
    expect(sampler.pick(Float32Array.from([1, 9, 9, 2]), 0, 0)).toBe(1);
  });

  for (const [what, options, option] of [
    ['a negative temperature', { temperature: -1 }, 'temperature'],
    ['an infinite temperature', { temperature: Infinity }, 'temperature'],
    ['top-p of 0', { temperature: 1, topP: 0 }, 'topP'],
    ['top-p above 1', { temperature: 1, topP: 1.5 }, 'topP'],
    ['top-p NaN', { temperature: 1, topP: NaN }, 'topP'],
    ['top-p without a temperature', { topP: 0.9 }, 'topP'],
    ['a fractional seed', { temperature: 1, seed: 1.5 }, 'seed'],
  ] as const)
    it(`refuses ${what} with ERR_SAMPLING_OPTIONS, naming the option`, () => {
      expect(() => createSampler(options)).toThrow(expect.objectContaining({ code: 'ERR_SAMPLING_OPTIONS', option }));
    });

  it('generate.mjs names the flag of a bad sampling option, exit 1 (before it looks for a GPU)', () => {
    const script = join(root, 'examples/llama/generate.mjs');
    const run = spawnSync(process.execPath, [script, '--temperature', '1', '--top-p', '2'], { encoding: 'utf8' });
    expect(run.status).toBe(1);
    expect(run.stderr).toContain('generate: --top-p: topP must be in (0, 1], got 2');
  });
});

describe('the CPU reference on the tiny shape', () => {
  const m = parseConfig(SHAPES.tiny);
  const weights = randomWeights(m, { seed: 1 });
  const values = new Map([...weights].map(([n, w]: [string, { values: Float32Array }]) => [n, w.values]));
  const model = new ReferenceModel(m, values);

  it('decoding with its KV cache gives the logits of recomputing the whole sequence', () => {
    const tokens = [5, 17, 999, 0, 431, 77, 12];
    const incremental = model.newSequence();
    model.forward(incremental, tokens.slice(0, 4));
    const stepwise = tokens.slice(4).map((t) => model.forward(incremental, [t])[0]);
    const full = model.forward(model.newSequence(), tokens).slice(4);
    for (let i = 0; i < full.length; i++)
      for (let j = 0; j < m.vocab; j++) expect(Math.abs(stepwise[i][j] - full[i][j])).toBeLessThan(1e-5);
  });

  it('attends causally: a later token does not change an earlier position', () => {
    const a = model.forward(model.newSequence(), [3, 4, 5]);
    const b = model.forward(model.newSequence(), [3, 4, 900]);
    expect(Array.from(a[1])).toEqual(Array.from(b[1]));
    expect(argmax(a[2])).not.toBe(-1);
  });

  it('gives the greedy tokens and logits checked in (test/fixtures/llama-tiny-reference.json)', () => {
    const want = JSON.parse(readFileSync(join(root, 'test/fixtures/llama-tiny-reference.json'), 'utf8'));
    expect(referencePrompt(m, 1)).toEqual(want.prompt);
    const got = greedy(model, want.prompt, want.greedyTokens.length);
    expect(got.tokens).toEqual(want.greedyTokens);
    got.logits.forEach((l: number, i: number) => expect(l).toBeCloseTo(want.greedyLogits[i], 4));
    // the sequence is not degenerate: a reference that repeats one token proves little
    expect(new Set(got.tokens).size).toBeGreaterThan(8);
  });

  it('keeps its K/V in a KVCache as well as in JS memory: the same logits', () => {
    using cache = new KVCache({ backend: 'host', layers: m.layers, kvHeads: m.kvHeads, headDim: m.headDim, dtype: 'float32', maxSequences: 2, maxTokens: 64 });
    const seq = cache.reserve();
    cache.grow(seq, 10);
    const tokens = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0];
    const inCache = model.forward(model.newSequence(cacheStore(cache, seq)), tokens);
    const inMemory = model.forward(model.newSequence(), tokens);
    expect(inCache.map((l: Float32Array) => Array.from(l))).toEqual(inMemory.map((l: Float32Array) => Array.from(l)));
  });

  it('serves requests by continuous batching over a host KVCache, preempting under a small budget, with exactly the greedy tokens', async () => {
    // all-layers layout, 4 KiB pages: 4 tokens a page, 8 KiB (K and V) per 4 tokens; 160 KiB holds about two requests
    using cache = new KVCache({ backend: 'host', layers: m.layers, kvHeads: m.kvHeads, headDim: m.headDim, dtype: 'float32', maxSequences: 4, maxTokens: 128, pageSize: 4096, memoryBudget: 160 * 1024 });
    const requests = [12, 20, 7, 30, 15, 9].map((n, i) => ({ id: i, prompt: Array.from({ length: n }, (_, t) => (i * 131 + t * 17) % m.vocab), maxNewTokens: 12 }));
    const { outputs, preemptions } = await serve({ cache, runner: referenceRunner(model, cache), requests });
    expect(preemptions).toBeGreaterThan(0);
    for (const r of requests) expect(outputs.get(r.id), `request ${r.id}`).toEqual(greedy(model, r.prompt, r.maxNewTokens).tokens);
    expect(cache.stats().activeSequences).toBe(0);
  });

  describe('the serving loop: chunked prefill, repeated preemption', () => {
    const options = { backend: 'host' as const, layers: m.layers, kvHeads: m.kvHeads, headDim: m.headDim, dtype: 'float32' as const, maxSequences: 4, maxTokens: 160, pageSize: 4096 };
    const requests = [12, 41, 7, 30, 15, 9].map((n, i) => ({ id: i, prompt: Array.from({ length: n }, (_, t) => (i * 131 + t * 17) % m.vocab), maxNewTokens: 10 + 3 * i }));
    const expected = new Map(requests.map((r) => [r.id, greedy(model, r.prompt, r.maxNewTokens).tokens]));
    // A runner that logs its calls: which request, prefill (how many tokens) or decode.
    const logged = (runner: { start: Function; prefill: Function; decode: Function }) => {
      const log: { call: 'start' | 'prefill' | 'decode'; ids: number[]; tokens?: number }[] = [];
      return {
        log,
        start: (seq: unknown, key: number) => (log.push({ call: 'start', ids: [key] }), runner.start(seq, key)),
        prefill: (entries: { state: { key: number }; tokens: number[] }[]) => (log.push({ call: 'prefill', ids: entries.map((e) => e.state.key), tokens: entries[0]!.tokens.length }), runner.prefill(entries)),
        decode: (entries: { state: { key: number } }[]) => (log.push({ call: 'decode', ids: entries.map((e) => e.state.key) }), runner.decode(entries)),
      };
    };
    // The cache, but every `every`-th step of two or more sequences fails as if memory were short.
    const shortOfMemory = (cache: KVCache, every: number) => {
      let calls = 0;
      return {
        options: cache.options,
        reserve: () => cache.reserve(),
        growAsync: (seq: never, n: number) => cache.growAsync(seq, n),
        release: (seq: never) => cache.release(seq),
        stepAsync: (seqs: never[], lengths: number[]) =>
          ++calls % every === 0 && seqs.length >= 2 ? Promise.reject(Object.assign(new Error('injected'), { code: 'ERR_OUT_OF_MEMORY' })) : cache.stepAsync(seqs, lengths),
      };
    };

    for (const chunk of [1, 4, 16])
      it(`prefills prompts in chunks of ${chunk} tokens between decode steps: the same greedy tokens`, async () => {
        using cache = new KVCache(options);
        const runner = logged(referenceRunner(model, cache));
        const { outputs, prefillCalls } = await serve({ cache, runner, requests, prefillChunk: chunk });
        for (const r of requests) expect(outputs.get(r.id), `request ${r.id}`).toEqual(expected.get(r.id));
        const prefills = runner.log.filter((e) => e.call === 'prefill');
        expect(prefills.length).toBe(prefillCalls);
        expect(Math.max(...prefills.map((e) => e.tokens!))).toBe(Math.min(chunk, 41));
        expect(prefillCalls).toBe(requests.reduce((n, r) => n + Math.ceil(r.prompt.length / chunk), 0));
        // the 41-token prompt's chunks are interleaved with the others' decode steps
        const mine = runner.log.map((e, i) => (e.call === 'prefill' && e.ids[0] === 1 ? i : -1)).filter((i) => i >= 0);
        const between = runner.log.slice(mine[0], mine.at(-1)).filter((e) => e.call === 'decode').length;
        if (chunk < 41) expect(between).toBeGreaterThan(0);
        expect(cache.stats().activeSequences).toBe(0);
      });

    it('a request preempted twice, while decoding and while prefilling, continues with exactly its greedy tokens', async () => {
      for (const chunk of [Infinity, 5]) {
        using cache = new KVCache(options);
        const runner = logged(referenceRunner(model, cache));
        const { outputs, preemptions } = await serve({ cache: shortOfMemory(cache, 4), runner, requests, prefillChunk: chunk });
        for (const r of requests) expect(outputs.get(r.id), `request ${r.id}, chunks of ${chunk}`).toEqual(expected.get(r.id));
        const admissions = new Map<number, number>();
        for (const e of runner.log) if (e.call === 'start') admissions.set(e.ids[0]!, (admissions.get(e.ids[0]!) ?? 0) + 1);
        expect(Math.max(...admissions.values())).toBeGreaterThanOrEqual(3); // some request came back twice
        expect(preemptions).toBe([...admissions.values()].reduce((n, a) => n + a - 1, 0));
        expect(cache.stats().activeSequences).toBe(0);
      }
    });

    it('a request ends at its first stop token (kept in its output), preempted or not; the others run their length', async () => {
      // each request's stop token: the greedy token at its position 3 (its first occurrence ends the request)
      const stopping = requests.map((r) => ({ ...r, stopTokens: [expected.get(r.id)![3]!] }));
      const cut = (r: (typeof stopping)[number]) => {
        const tokens = expected.get(r.id)!;
        return tokens.slice(0, tokens.indexOf(r.stopTokens[0]!) + 1);
      };
      for (const chunk of [Infinity, 5]) {
        using cache = new KVCache(options);
        const { outputs } = await serve({ cache, runner: referenceRunner(model, cache), requests: stopping, prefillChunk: chunk });
        for (const r of stopping) expect(outputs.get(r.id), `request ${r.id}`).toEqual(cut(r));
        expect(Math.max(...stopping.map((r) => cut(r).length))).toBeLessThanOrEqual(4);
        const { outputs: preempted, preemptions } = await serve({ cache: shortOfMemory(cache, 3), runner: referenceRunner(model, cache), requests: stopping, prefillChunk: chunk });
        expect(preemptions).toBeGreaterThan(0);
        for (const r of stopping) expect(preempted.get(r.id), `request ${r.id}, preempted`).toEqual(cut(r));
        expect(cache.stats().activeSequences).toBe(0);
      }
      // a stop token that never comes: the request runs maxNewTokens
      using cache = new KVCache(options);
      const { outputs } = await serve({ cache, runner: referenceRunner(model, cache), requests: requests.map((r) => ({ ...r, stopTokens: [m.vocab + 1] })) });
      for (const r of requests) expect(outputs.get(r.id)).toEqual(expected.get(r.id));
    });

    it('refuses a prefillChunk that is not a positive integer, and a request without prompt tokens', async () => {
      using cache = new KVCache(options);
      for (const prefillChunk of [0, -1, 1.5, NaN, '4'])
        await expect(serve({ cache, runner: referenceRunner(model, cache), requests, prefillChunk })).rejects.toThrow(/prefillChunk must be a positive integer/);
      await expect(serve({ cache, runner: referenceRunner(model, cache), requests: [{ id: 7, prompt: [], maxNewTokens: 1 }] })).rejects.toThrow(/request 7 has no prompt tokens/);
      expect(cache.stats().activeSequences).toBe(0);
    });
  });

  it('samples the same tokens whether or not a request is preempted; top-p that keeps one token is greedy', async () => {
    const options = { backend: 'host' as const, layers: m.layers, kvHeads: m.kvHeads, headDim: m.headDim, dtype: 'float32' as const, maxSequences: 4, maxTokens: 128, pageSize: 4096 };
    const requests = [12, 20, 7, 30, 15, 9].map((n, i) => ({ id: i, prompt: Array.from({ length: n }, (_, t) => (i * 131 + t * 17) % m.vocab), maxNewTokens: 12 }));
    const run = async (sampler: unknown, memoryBudget?: number) => {
      using cache = new KVCache({ ...options, ...(memoryBudget ? { memoryBudget } : {}) });
      return await serve({ cache, runner: referenceRunner(model, cache, sampler), requests });
    };
    const sampler = createSampler({ temperature: 1, topP: 0.9, seed: 7 });
    const roomy = await run(sampler);
    const tight = await run(sampler, 160 * 1024);
    expect(roomy.preemptions).toBe(0);
    expect(tight.preemptions).toBeGreaterThan(0);
    expect([...tight.outputs]).toEqual([...roomy.outputs]);
    const greedyTokens = requests.map((r) => greedy(model, r.prompt, r.maxNewTokens).tokens);
    expect(requests.map((r) => roomy.outputs.get(r.id))).not.toEqual(greedyTokens); // it does sample
    const narrow = await run(createSampler({ temperature: 1, topP: 1e-9, seed: 7 }));
    expect(requests.map((r) => narrow.outputs.get(r.id))).toEqual(greedyTokens);
  });

  it('rounding to bf16 where the GPU stores 16 bits moves the logits by under a third of the GPU test\'s bf16 tolerance; to fp16, by under a quarter of bf16\'s', () => {
    const worst = (dtype: string) => {
      const exact = tinyReference(dtype), rounded = tinyReference(dtype, { rounding: true });
      let far = 0;
      for (const prompt of batchPrompts(exact.m, [37, 1])) {
        const a = exact.model.newSequence(), b = rounded.model.newSequence();
        let x = exact.model.forward(a, prompt).at(-1)!, y = rounded.model.forward(b, prompt).at(-1)!;
        for (let step = 0; step < 32; step++) {
          for (let i = 0; i < x.length; i++) far = Math.max(far, Math.abs(x[i]! - y[i]!));
          const token = argmax(x); // both fed the exact reference's tokens
          [x, y] = [exact.model.forward(a, [token])[0]!, rounded.model.forward(b, [token])[0]!];
        }
      }
      return far;
    };
    const bf16 = worst('bfloat16'), fp16 = worst('float16');
    expect(bf16).toBeGreaterThan(0); // it does round
    expect(bf16).toBeLessThan(BF16_LOGIT_TOLERANCE / 3);
    expect(fp16).toBeLessThan(bf16 / 4);
  });

  it('the GPU test\'s batch reference (test/fixtures/llama-tiny-batch-reference.json) is the reference\'s output for its short prompts', () => {
    const batch = JSON.parse(readFileSync(new URL('./fixtures/llama-tiny-batch-reference.json', import.meta.url), 'utf8'));
    const { m, model: ref } = tinyReference(batch.dtype);
    const prompts = batchPrompts(m);
    expect(batch.seed).toBe(BATCH_SEED);
    expect(batch.entries.map((e: { length: number }) => e.length)).toEqual(prompts.map((p) => p.length));
    // the short ones (the 4080-token prompt takes the reference a minute: its entry stands on the script that wrote it)
    for (const b of [1, 2, 3]) {
      const seq = ref.newSequence();
      const last = ref.forward(seq, prompts[b]!).at(-1)!;
      const entry = batch.entries[b];
      expect(Math.max(...entry.promptLogits.map((x: number, i: number) => Math.abs(x - last[i]!)))).toBeLessThan(1e-5);
      const { tokens } = greedy(ref, prompts[b]!, 32);
      expect(tokens).toEqual(entry.tokens);
    }
  });

  it('make-weights writes files that load back as the same weights and the same reference', () => {
    const out = join(dir, 'tiny');
    const { written } = makeWeights({ shape: 'tiny', out, seed: 1, steps: 8 });
    expect(written).toEqual(['config.json', 'model.safetensors', 'reference.json']);
    const config = JSON.parse(readFileSync(join(out, 'config.json'), 'utf8'));
    expect(parseConfig(config)).toEqual(m);
    const st = openSafetensors(join(out, 'model.safetensors'));
    try {
      expect([...st.tensors.keys()].sort()).toEqual(tensorList(m).map((t: { name: string }) => t.name).sort());
      for (const [name, t] of st.tensors as Map<string, Tensor>) {
        expect(t.dtype).toBe('F16');
        expect(Buffer.from(decode(st.readTensor(name), 'F16').buffer).equals(Buffer.from(values.get(name)!.buffer))).toBe(true);
      }
    } finally {
      st.close();
    }
    const written8 = JSON.parse(readFileSync(join(out, 'reference.json'), 'utf8'));
    const checkedIn = JSON.parse(readFileSync(join(root, 'test/fixtures/llama-tiny-reference.json'), 'utf8'));
    expect(written8.greedyTokens).toEqual(checkedIn.greedyTokens.slice(0, 8));
  });

  // A second implementation (NumPy, transformers' conventions, its own
  // safetensors reader: examples/llama/check_reference.py) reads the files
  // and must find reference.json's greedy tokens and logits, for the tiny
  // shape and for variants that change what the config decides.
  const numpy = spawnSync('python3', ['-c', 'import numpy'], { encoding: 'utf8' });
  const numpySkip = numpy.error ? `no python3 (${numpy.error.message})` : numpy.status !== 0 ? 'python3 has no NumPy' : null;
  const variants: [string, Record<string, unknown>][] = [
    ['tiny as it is (float16)', {}],
    ['bfloat16 weights', { torch_dtype: 'bfloat16' }],
    ['Llama-3 rope scaling (theta 500000)', { rope_theta: 500000, rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 } }],
    ['tied embeddings, head_dim 32 with 8/2 heads', { tie_word_embeddings: true, num_attention_heads: 8, head_dim: 32 }],
  ];
  // The same check with transformers itself doing the forward pass
  // (check_reference.py --transformers), where python3 has it (the GPU host's
  // image does; CI's machine does not).
  const hf = numpySkip === null ? spawnSync('python3', ['-c', 'import torch, transformers'], { encoding: 'utf8' }) : null;
  const transformersSkip = numpySkip ?? (hf!.status !== 0 ? 'python3 has no torch + transformers' : null);
  const implementations = [
    { label: 'an independent NumPy implementation', flags: [] as string[], skip: numpySkip },
    { label: "Hugging Face transformers' LlamaForCausalLM", flags: ['--transformers'], skip: transformersSkip },
  ];
  for (const { label, flags, skip } of implementations)
    for (const [name, config] of variants) {
      it.skipIf(skip !== null)(`${label} reads make-weights' files and finds its reference (${name})${skip ? ` (skipped: ${skip})` : ''}`, () => {
        const out = join(dir, `check-${flags.length}-${variants.findIndex((v) => v[0] === name)}`);
        makeWeights({ shape: 'tiny', out, seed: 3, steps: 16, config });
        const check = () => spawnSync('python3', [join(root, 'examples/llama/check_reference.py'), out, ...flags], { encoding: 'utf8', timeout: 120_000 });
        const run = check();
        if (flags.length === 0) expect(run.stderr).toBe('');
        expect(run.stdout, run.stderr).not.toBe('');
        const result = JSON.parse(run.stdout);
        expect(result).toMatchObject({ steps: 16, sameTokens: true });
        expect(result.implementation).toContain(flags.length === 0 ? 'NumPy' : 'transformers');
        expect(result.maxLogitDifference).toBeLessThan(1e-3);
        expect(run.status).toBe(0);
        // and it can fail: a reference with another token is found out
        const ref = JSON.parse(readFileSync(join(out, 'reference.json'), 'utf8'));
        ref.greedyTokens[5] = (ref.greedyTokens[5] + 1) % 1000;
        writeFileSync(join(out, 'reference.json'), JSON.stringify(ref));
        const wrong = check();
        expect(wrong.status).toBe(1);
        expect(JSON.parse(wrong.stdout)).toMatchObject({ sameTokens: false, firstDifferentStep: 5 });
      }, 300_000); // importing torch takes seconds, twice
    }

  it('make-weights --help prints its usage; a bad shape or number is an error, not a crash', () => {
    const script = join(root, 'examples/llama/make-weights.mjs');
    const help = spawnSync(process.execPath, [script, '--help'], { encoding: 'utf8' });
    expect(help.status).toBe(0);
    expect(help.stdout).toContain('--shape <llama-3-8b|tiny>');
    const bad = spawnSync(process.execPath, [script, '--shape', 'llama-9', '--out', join(dir, 'x')], { encoding: 'utf8' });
    expect(bad.status).toBe(1);
    expect(bad.stderr).toContain("unknown shape 'llama-9'");
    const nan = spawnSync(process.execPath, [script, '--shape', 'tiny', '--out', join(dir, 'y'), '--seed', 'abc'], { encoding: 'utf8' });
    expect(nan.status).toBe(2);
  });

  it('generate --help prints its usage; a bad argument is exit 1; without cuBLASLt or CUDA it says which, exit 3', () => {
    const script = join(root, 'examples/llama/generate.mjs');
    const help = spawnSync(process.execPath, [script, '--help'], { encoding: 'utf8' });
    expect(help.status).toBe(0);
    expect(help.stdout).toContain('--store NAME');
    const bad = spawnSync(process.execPath, [script, '--requests', '-2'], { encoding: 'utf8' });
    expect(bad.status).toBe(1); // the arguments are checked before it looks for a GPU
    const chunk = spawnSync(process.execPath, [script, '--prefill-chunk', '0'], { encoding: 'utf8' });
    expect(chunk.status).toBe(1);
    expect(chunk.stderr).toContain('--prefill-chunk must be a positive integer');
    const text = spawnSync(process.execPath, [script, '--text', 'hello'], { encoding: 'utf8' });
    expect(text.status).toBe(1);
    expect(text.stderr).toContain('--text needs a tokenizer.json');
    const both = spawnSync(process.execPath, [script, '--text', 'hello', '--prompt', '1,2'], { encoding: 'utf8' });
    expect(both.status).toBe(1);
    expect(both.stderr).toContain('pick one');
    const long = spawnSync(process.execPath, [script, '--shape', 'tiny', '--max-new-tokens', '5000'], { encoding: 'utf8' });
    expect(long.status).toBe(1);
    expect(long.stderr).toContain('take 5016 positions; the model has 4096');
    const stray = spawnSync(process.execPath, [script, 'tiny'], { encoding: 'utf8' });
    expect(stray.status).toBe(1);
    expect(stray.stderr).toContain("unexpected argument 'tiny'");
    if (!linearLibrary().available) {
      const run = spawnSync(process.execPath, [script, '--shape', 'tiny'], { encoding: 'utf8' });
      expect(run.status).toBe(3);
      expect(run.stderr).toContain('libcublasLt.so.13');
    }
  });
});
