// The Llama forward pass on the GPU over an external KV cache: weights
// uploaded once (fused Q/K/V and gate/up matrices), cuBLASLt GEMMs and the
// package's kernels (vattention/kernels), K/V written and read in place in
// whatever `kv` describes: a KVCache (kvcache-store.mjs) or paged blocks
// (paged-store.mjs). A batch call queues everything on one stream and reads
// back only the chosen tokens.
import * as kernels from 'vattention/kernels';
import * as gpu from 'vattention/testing';
import { ropeFrequencies, tensorList } from './config.mjs';
import { createSampler } from './sampling.mjs';
import { encode, normals, storageDtype } from './weights.mjs';

const BYTES = 2; // fp16 / bf16 activations and weights

/** Device buffers of the activations for up to `rows` tokens and `batch` sequences. */
function activations(m, rows, batch, device) {
  const qkvWidth = (m.heads + 2 * m.kvHeads) * m.headDim;
  const sizes = {
    resid: rows * m.hidden * BYTES,
    normed: rows * m.hidden * BYTES,
    qkv: rows * qkvWidth * BYTES,
    q: rows * m.heads * m.headDim * BYTES,
    kNew: rows * m.kvHeads * m.headDim * BYTES,
    vNew: rows * m.kvHeads * m.headDim * BYTES,
    attn: rows * m.heads * m.headDim * BYTES,
    proj: rows * m.hidden * BYTES,
    gateUp: rows * 2 * m.intermediate * BYTES,
    act: rows * m.intermediate * BYTES,
    last: batch * m.hidden * BYTES,
    logits: batch * m.vocab * 4,
    next: batch * 4,
    tokens: rows * 4,
    positions: rows * 4,
    lengths: batch * 4,
    starts: batch * 4,
    counts: batch * 4,
    lastRows: batch * 4,
  };
  const out = {};
  for (const [name, bytes] of Object.entries(sizes)) out[name] = gpu.allocate(Math.max(16, bytes), device);
  return out;
}

export class GpuModel {
  #buffers = [];
  #closed = false;

  /**
   * `m`: parseConfig's shape; `weight(name)`: a tensor's 16-bit storage
   * (Uint16Array, [out, in]), or `fill` instead to fill every weight on the
   * device from a seed (large shapes). `maxRows`: tokens one call may carry
   * (batch × query tokens); `maxBatch`: sequences per call.
   */
  constructor(m, { weight, fill, maxRows, maxBatch, device = 0, stream }) {
    this.m = m;
    this.dtype = m.dtype;
    this.device = device;
    this.stream = stream ?? gpu.createStream(device);
    this.ownsStream = stream === undefined;
    this.maxRows = maxRows;
    this.maxBatch = maxBatch;
    const source = weight ?? filledWeights(m, fill ?? {});
    this.w = this.#upload(source);
    this.a = activations(m, maxRows, maxBatch, device);
    this.#buffers.push(...Object.values(this.a));
    const frequencies = Float32Array.from(ropeFrequencies(m));
    this.frequencies = this.#alloc(frequencies.byteLength);
    gpu.copyToDevice(this.frequencies, frequencies, { device });
  }

  #alloc(bytes) {
    const address = gpu.allocate(Math.max(16, bytes), this.device);
    this.#buffers.push(address);
    return address;
  }

  #put(parts) {
    const bytes = parts.reduce((n, p) => n + p.byteLength, 0);
    const address = this.#alloc(bytes);
    let at = 0n;
    for (const p of parts) {
      uploadPart(address + at, p, this.device);
      at += BigInt(p.byteLength);
    }
    return address;
  }

  // Fused matrices: [q; k; v] rows of the QKV projection, [gate; up] of the MLP.
  #upload(weight) {
    const m = this.m;
    const layers = [];
    for (let l = 0; l < m.layers; l++) {
      const p = `model.layers.${l}.`;
      layers.push({
        inputNorm: this.#put([weight(`${p}input_layernorm.weight`)]),
        qkv: this.#put(['q', 'k', 'v'].map((x) => weight(`${p}self_attn.${x}_proj.weight`))),
        o: this.#put([weight(`${p}self_attn.o_proj.weight`)]),
        postNorm: this.#put([weight(`${p}post_attention_layernorm.weight`)]),
        gateUp: this.#put([weight(`${p}mlp.gate_proj.weight`), weight(`${p}mlp.up_proj.weight`)]),
        down: this.#put([weight(`${p}mlp.down_proj.weight`)]),
      });
    }
    const embed = this.#put([weight('model.embed_tokens.weight')]);
    return {
      layers,
      embed,
      norm: this.#put([weight('model.norm.weight')]),
      head: m.tieWordEmbeddings ? embed : this.#put([weight('lm_head.weight')]),
    };
  }

  /**
   * Runs new tokens of a batch through the model and picks each sequence's
   * next token. `batch`: [{ tokens: number[], position }] (position: where
   * the first new token goes; the KV store must already hold room for
   * them); `kv`: the store's `layer(l)` and `prepare(batch)`. Queues every
   * kernel, then reads back the tokens (or, with `{ read: false }`, leaves
   * them in `this.a.next` and returns null). `logits: true` also returns the
   * float32 logits of each sequence's last token.
   */
  forward(batch, kv, { logits = false, read = true, temperature = 0, seed = 0n } = {}) {
    this.#check(batch);
    this.upload(batch, kv);
    this.queue(batch.length, Math.max(...batch.map((e) => e.tokens.length)), kv, { temperature, seed });
    if (!read) return null;
    gpu.synchronizeStream(this.stream, this.device);
    const next = Array.from(gpu.copyFromDevice(new Int32Array(batch.length), this.a.next, this.device));
    if (!logits) return { next };
    const values = gpu.copyFromDevice(new Float32Array(batch.length * this.m.vocab), this.a.logits, this.device);
    return { next, logits: batch.map((_, b) => values.subarray(b * this.m.vocab, (b + 1) * this.m.vocab)) };
  }

  #check(batch) {
    if (this.#closed) throw new Error('GpuModel: closed');
    const width = Math.max(...batch.map((e) => e.tokens.length));
    if (batch.length === 0 || batch.length > this.maxBatch || batch.length * width > this.maxRows)
      throw new RangeError(`GpuModel: ${batch.length} sequences × ${width} tokens exceed maxBatch ${this.maxBatch} / maxRows ${this.maxRows}`);
  }

  /** The host → device part of a call: tokens, positions and lengths (padded to the longest entry), the store's tables. */
  upload(batch, kv) {
    const width = Math.max(...batch.map((e) => e.tokens.length)), rows = batch.length * width;
    const tokens = new Int32Array(rows), positions = new Int32Array(rows).fill(-1);
    const lengths = new Int32Array(batch.length), starts = new Int32Array(batch.length);
    const counts = new Int32Array(batch.length), lastRows = new Int32Array(batch.length);
    batch.forEach((e, b) => {
      e.tokens.forEach((t, i) => {
        tokens[b * width + i] = t;
        positions[b * width + i] = e.position + i;
      });
      starts[b] = e.position;
      counts[b] = e.tokens.length;
      lengths[b] = e.position + e.tokens.length;
      lastRows[b] = b * width + e.tokens.length - 1;
    });
    const put = (dst, data) => gpu.copyToDevice(dst, data, { device: this.device, stream: this.stream });
    put(this.a.tokens, tokens);
    put(this.a.positions, positions);
    put(this.a.lengths, lengths);
    put(this.a.starts, starts);
    put(this.a.counts, counts);
    put(this.a.lastRows, lastRows);
    kv.prepare(batch, this.stream);
    this.liveLengths = lengths;
  }

  /**
   * Queues the forward pass of `batch` entries × `width` query tokens whose
   * inputs `upload` wrote (fixed device addresses: capturable in a CUDA
   * graph once every shape has run once).
   */
  queue(batch, width, kv, { temperature = 0, seed = 0n, decode = { liveLengths: this.liveLengths }, mark = () => {} } = {}) {
    const { m, a, w, dtype } = this, rows = batch * width;
    const q = { device: this.device, stream: this.stream };
    // mark(kind) after each kernel: a profile's event (bench/model.mjs); kinds gemm, attention, elementwise
    kernels.gatherRows({ ...q, rows, tableRows: m.vocab, width: m.hidden, table: w.embed, ids: a.tokens, out: a.resid });
    mark('elementwise');
    w.layers.forEach((layer, l) => {
      const norm = l === 0 ? { x: a.resid } : { x: a.proj, residual: a.resid };
      kernels.rmsNorm({ ...q, dtype, rows, width: m.hidden, eps: m.rmsNormEps, ...norm, weight: layer.inputNorm, out: a.normed });
      mark('elementwise');
      this.#linear(rows, m.hidden, (m.heads + 2 * m.kvHeads) * m.headDim, a.normed, layer.qkv, a.qkv);
      mark('gemm');
      kernels.rotaryEmbedding({ ...q, dtype, rows, qHeads: m.heads, kvHeads: m.kvHeads, headDim: m.headDim, qkv: a.qkv, positions: a.positions, frequencies: this.frequencies, q: a.q, k: a.kNew, v: a.vNew });
      mark('elementwise');
      const cache = { ...q, dtype, kvHeads: m.kvHeads, headDim: m.headDim, ...kv.layer(l) };
      kernels.appendKV({ ...cache, batch, newTokens: width, kNew: a.kNew, vNew: a.vNew, positions: a.starts, counts: a.counts });
      const attention = { ...cache, batch, qHeads: m.heads, q: a.q, out: a.attn, lengths: a.lengths };
      if (width === 1) kernels.decodeAttention({ ...attention, ...decode });
      else kernels.prefillAttention({ ...attention, queryTokens: width, counts: a.counts });
      mark('attention');
      this.#linear(rows, m.heads * m.headDim, m.hidden, a.attn, layer.o, a.proj);
      mark('gemm');
      kernels.rmsNorm({ ...q, dtype, rows, width: m.hidden, eps: m.rmsNormEps, x: a.proj, residual: a.resid, weight: layer.postNorm, out: a.normed });
      mark('elementwise');
      this.#linear(rows, m.hidden, 2 * m.intermediate, a.normed, layer.gateUp, a.gateUp);
      mark('gemm');
      kernels.siluMul({ ...q, dtype, rows, width: m.intermediate, gateUp: a.gateUp, out: a.act });
      mark('elementwise');
      this.#linear(rows, m.intermediate, m.hidden, a.act, layer.down, a.proj);
      mark('gemm');
    });
    kernels.rmsNorm({ ...q, dtype, rows, width: m.hidden, eps: m.rmsNormEps, x: a.proj, residual: a.resid, weight: w.norm, out: a.normed });
    kernels.gatherRows({ ...q, rows: batch, tableRows: rows, width: m.hidden, table: a.normed, ids: a.lastRows, out: a.last });
    mark('elementwise');
    kernels.linear({ ...q, dtype, rows: batch, inFeatures: m.hidden, outFeatures: m.vocab, input: a.last, weight: w.head, output: a.logits, outputDtype: 'float32' });
    mark('gemm');
    kernels.argmax({ ...q, rows: batch, vocab: m.vocab, logits: a.logits, out: a.next, temperature, seed });
    mark('elementwise');
  }

  #linear(rows, inFeatures, outFeatures, input, weight, output) {
    kernels.linear({ device: this.device, stream: this.stream, dtype: this.dtype, rows, inFeatures, outFeatures, input, weight, output });
  }

  /** Bytes of weights one forward pass reads (every matrix once; the embedding only by row). */
  weightBytes() {
    const m = this.m;
    const perLayer = m.hidden * (m.heads + 2 * m.kvHeads) * m.headDim + m.heads * m.headDim * m.hidden + 3 * m.hidden * m.intermediate + 2 * m.hidden;
    return (m.layers * perLayer + m.hidden + m.vocab * m.hidden) * BYTES;
  }

  close() {
    if (this.#closed) return;
    this.#closed = true;
    gpu.synchronizeStream(this.stream, this.device);
    for (const b of this.#buffers.splice(0)) gpu.free(b, this.device);
    if (this.ownsStream) gpu.destroyStream(this.stream, this.device);
  }

  [Symbol.dispose]() {
    this.close();
  }
}

/**
 * Weights for shapes too large to write to a file: each tensor filled from
 * one seeded block of normals (std as randomWeights'), norm weights ~1.
 * The values repeat every block; for timing and memory they are as real.
 */
function filledWeights(m, { seed = 1, std = 1 / Math.sqrt(m.hidden), blockElements = 1 << 22 }) {
  const next = normals(seed), dtype = storageDtype(m.dtype);
  const block = encode(Float32Array.from({ length: blockElements }, () => std * next()), dtype);
  const ones = encode(new Float32Array(Math.max(m.hidden, 8)).fill(1), dtype);
  const shapes = new Map(tensorList(m).map((t) => [t.name, t.shape]));
  return (name) => {
    const count = shapes.get(name).reduce((x, d) => x * d, 1);
    if (name.endsWith('norm.weight')) return ones.subarray(0, count);
    return new RepeatedBlock(block, count);
  };
}

/** A tensor's storage as one block repeated, uploaded block by block. */
class RepeatedBlock {
  constructor(block, count) {
    this.block = block;
    this.count = count;
    this.byteLength = count * BYTES;
  }
}

function uploadPart(address, part, device) {
  if (!(part instanceof RepeatedBlock)) return gpu.copyToDevice(address, part, { device });
  for (let done = 0; done < part.count; done += part.block.length) {
    const n = Math.min(part.block.length, part.count - done);
    gpu.copyToDevice(address + BigInt(done * BYTES), part.block.subarray(0, n), { device });
  }
}

/** The serving loop's runner (serve.mjs) for the GPU model over `kv` (CacheKV or PagedKV). */
export function gpuRunner(model, kv, sampler = createSampler()) {
  const run = (entries, tokensOf) => {
    const batch = entries.map((e) => ({ seq: e.state.seq, tokens: tokensOf(e), position: e.state.length }));
    // greedy: the argmax kernel's tokens; sampling: the logits, picked on the host (sampling.mjs)
    const { next, logits } = model.forward(batch, kv, { logits: !sampler.greedy });
    entries.forEach((e, i) => (e.state.length += batch[i].tokens.length));
    return sampler.greedy ? next : entries.map((e, i) => sampler.pick(logits[i], e.state.key, e.state.length));
  };
  return {
    start: (seq, key = 0) => ({ seq, length: 0, key }),
    prefill: (entries) => run(entries, (e) => e.tokens),
    decode: (entries) => run(entries, (e) => [e.token]),
  };
}
