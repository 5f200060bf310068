// The Llama forward pass on the CPU in float32 over weights decoded to
// Float32Array: the reference the GPU model is checked against, and what
// writes the expected tokens and logits next to generated weights. Slow on
// purpose (plain loops, one token at a time) and small-model only.
import { fromBFloat16Bits, fromFloat16Bits, toBFloat16Bits, toFloat16Bits } from 'vattention/testing';
import { ropeFrequencies } from './config.mjs';
import { argmax, createSampler } from './sampling.mjs';

export { argmax };

const identity = (x) => x;

/** Rounds `x` in place to float16 or bfloat16 and returns it. */
function roundTo(dtype) {
  const [to, from] = dtype === 'bfloat16' ? [toBFloat16Bits, fromBFloat16Bits] : [toFloat16Bits, fromFloat16Bits];
  return (x) => {
    for (let i = 0; i < x.length; i++) x[i] = from(to(x[i]));
    return x;
  };
}

function matvec(w, x, rows, cols, out = new Float32Array(rows)) {
  for (let r = 0; r < rows; r++) {
    let sum = 0;
    const at = r * cols;
    for (let c = 0; c < cols; c++) sum += w[at + c] * x[c];
    out[r] = sum;
  }
  return out;
}

function rmsNorm(x, weight, eps) {
  let sum = 0;
  for (let i = 0; i < x.length; i++) sum += x[i] * x[i];
  const scale = 1 / Math.sqrt(sum / x.length + eps);
  const out = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) out[i] = x[i] * scale * weight[i];
  return out;
}

/** Rotates each head of `x` (heads × headDim) for position `pos`, the halves convention of Hugging Face's Llama. */
function rope(x, heads, headDim, pos, frequencies) {
  const half = headDim / 2;
  for (let h = 0; h < heads; h++) {
    const at = h * headDim;
    for (let i = 0; i < half; i++) {
      const angle = pos * frequencies[i], c = Math.cos(angle), s = Math.sin(angle);
      const a = x[at + i], b = x[at + i + half];
      x[at + i] = a * c - b * s;
      x[at + i + half] = b * c + a * s;
    }
  }
}

export class ReferenceModel {
  /**
   * `m`: parseConfig's shape; `weights`: Map of tensor name → Float32Array (Hugging Face names, [out, in]).
   * `rounding: true` rounds to `m.dtype` wherever the GPU model stores 16 bits (each kernel's output, the K/V, the
   * attention probabilities of the tensor-core product), the logits staying float32: what the GPU's rounding alone
   * costs, without its order of summation, for sizing the GPU tests' tolerances.
   */
  constructor(m, weights, { rounding = false } = {}) {
    this.m = m;
    this.round = rounding ? roundTo(m.dtype) : identity;
    this.w = (name) => {
      const t = weights.get(name);
      if (!t) throw new Error(`reference model: no weight '${name}'`);
      return t;
    };
    this.frequencies = ropeFrequencies(m);
  }

  /**
   * A sequence's state: its length and where its K and V rows live (`kv`:
   * append(layer, position, k, v) and read(layer, count) → { k, v } as
   * contiguous Float32Arrays of count × kvHeads × headDim). By default in JS
   * memory; `cacheStore` keeps them in a KVCache.
   */
  newSequence(kv = memoryStore(this.m.layers)) {
    return { length: 0, kv };
  }

  /** Runs `tokens` through the model after what `seq` holds; returns the logits after each token. */
  forward(seq, tokens) {
    return tokens.map((token) => this.#step(seq, token));
  }

  #step(seq, token) {
    const { m } = this;
    const pos = seq.length;
    const r = this.round;
    let x = this.w('model.embed_tokens.weight').slice(token * m.hidden, (token + 1) * m.hidden);
    for (let l = 0; l < m.layers; l++) {
      const p = `model.layers.${l}.`;
      const h = r(rmsNorm(x, this.w(`${p}input_layernorm.weight`), m.rmsNormEps));
      const q = r(matvec(this.w(`${p}self_attn.q_proj.weight`), h, m.heads * m.headDim, m.hidden));
      const k = r(matvec(this.w(`${p}self_attn.k_proj.weight`), h, m.kvHeads * m.headDim, m.hidden));
      const v = r(matvec(this.w(`${p}self_attn.v_proj.weight`), h, m.kvHeads * m.headDim, m.hidden));
      rope(q, m.heads, m.headDim, pos, this.frequencies);
      rope(k, m.kvHeads, m.headDim, pos, this.frequencies);
      seq.kv.append(l, pos, r(k), v);
      const rows = seq.kv.read(l, pos + 1);
      const attended = r(this.#attend(r(q), rows.k, rows.v, pos + 1));
      const o = r(matvec(this.w(`${p}self_attn.o_proj.weight`), attended, m.hidden, m.heads * m.headDim));
      x = r(x.map((xi, i) => xi + o[i]));
      const h2 = r(rmsNorm(x, this.w(`${p}post_attention_layernorm.weight`), m.rmsNormEps));
      const gate = r(matvec(this.w(`${p}mlp.gate_proj.weight`), h2, m.intermediate, m.hidden));
      const up = r(matvec(this.w(`${p}mlp.up_proj.weight`), h2, m.intermediate, m.hidden));
      for (let i = 0; i < m.intermediate; i++) gate[i] = (gate[i] / (1 + Math.exp(-gate[i]))) * up[i];
      const down = r(matvec(this.w(`${p}mlp.down_proj.weight`), r(gate), m.hidden, m.intermediate));
      x = r(x.map((xi, i) => xi + down[i]));
    }
    seq.length++;
    const final = r(rmsNorm(x, this.w('model.norm.weight'), m.rmsNormEps));
    const head = this.w(m.tieWordEmbeddings ? 'model.embed_tokens.weight' : 'lm_head.weight');
    return matvec(head, final, m.vocab, m.hidden);
  }

  /** Causal attention of one query over the `count` rows so far (contiguous, kvHeads × headDim each), grouped-query. */
  #attend(q, k, v, count) {
    const { heads, kvHeads, headDim } = this.m;
    const group = heads / kvHeads, scale = 1 / Math.sqrt(headDim), row = kvHeads * headDim;
    const out = new Float32Array(heads * headDim);
    const scores = new Float64Array(count);
    for (let h = 0; h < heads; h++) {
      const kv = Math.floor(h / group) * headDim, qa = h * headDim;
      let max = -Infinity;
      for (let t = 0; t < count; t++) {
        let dot = 0;
        for (let d = 0; d < headDim; d++) dot += q[qa + d] * k[t * row + kv + d];
        scores[t] = dot * scale;
        if (scores[t] > max) max = scores[t];
      }
      let sum = 0;
      for (let t = 0; t < count; t++) sum += scores[t] = Math.exp(scores[t] - max);
      // the GPU multiplies unnormalised probabilities, rounded to 16 bits, into V, and divides by the sum after
      const probabilities = this.round === identity ? scores : this.round(Float32Array.from(scores));
      for (let t = 0; t < count; t++) {
        const w = probabilities[t];
        for (let d = 0; d < headDim; d++) out[qa + d] += w * v[t * row + kv + d];
      }
      for (let d = 0; d < headDim; d++) out[qa + d] /= sum;
    }
    return out;
  }
}

/** K and V rows in JS memory: one growing buffer per layer and kind, read as a view (no copy per token). */
function memoryStore(layers) {
  const make = () => ({ data: new Float32Array(0), width: 0 });
  const k = Array.from({ length: layers }, make), v = Array.from({ length: layers }, make);
  const put = (store, pos, row) => {
    const need = (pos + 1) * row.length;
    if (store.data.length < need) {
      const grown = new Float32Array(Math.max(need, 2 * store.data.length));
      grown.set(store.data);
      store.data = grown;
    }
    store.data.set(row, pos * row.length);
    store.width = row.length;
  };
  return {
    append(layer, pos, kRow, vRow) {
      put(k[layer], pos, kRow);
      put(v[layer], pos, vRow);
    },
    read: (layer, count) => ({ k: k[layer].data.subarray(0, count * k[layer].width), v: v[layer].data.subarray(0, count * v[layer].width) }),
  };
}

/**
 * K and V rows in a float32 KVCache (any backend, any layout): each token's
 * rows written to `seq` with cache.write, read back with cache.read; the
 * sequence must already be grown past the positions written.
 */
export function cacheStore(cache, seq) {
  const asFloats = (bytes) => new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
  return {
    append(layer, pos, kRow, vRow) {
      cache.write(seq, { layer, kind: 'k', token: pos }, kRow);
      cache.write(seq, { layer, kind: 'v', token: pos }, vRow);
    },
    read: (layer, count) => ({
      k: asFloats(cache.read(seq, { layer, kind: 'k', token: 0, count })),
      v: asFloats(cache.read(seq, { layer, kind: 'v', token: 0, count })),
    }),
  };
}

/** The serving loop's runner (serve.mjs) for the CPU reference, its K/V in `cache` (cacheStore); greedy unless a sampler (sampling.mjs) says otherwise. */
export function referenceRunner(model, cache, sampler = createSampler()) {
  const pick = (state, tokens) => sampler.pick(model.forward(state, tokens).at(-1), state.key, state.length);
  return {
    start: (seq, key = 0) => Object.assign(model.newSequence(cacheStore(cache, seq)), { key }),
    prefill: (entries) => entries.map((e) => pick(e.state, e.tokens)),
    decode: (entries) => entries.map((e) => pick(e.state, [e.token])),
  };
}

/** Greedy decoding: the prompt, then `steps` tokens; returns { tokens, logits } of the generated ones. */
export function greedy(model, prompt, steps) {
  const seq = model.newSequence();
  let last = model.forward(seq, prompt).at(-1);
  const tokens = [], logits = [];
  for (let i = 0; i < steps; i++) {
    const next = argmax(last);
    tokens.push(next);
    logits.push(last[next]);
    last = model.forward(seq, [next])[0];
  }
  return { tokens, logits };
}
