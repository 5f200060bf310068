// Where the GPU model keeps K/V, behind one small interface: `prepare(batch,
// stream)` uploads what the batch's kernels index by (cache slots, block
// tables) and `layer(l)` gives one layer's cache arguments for
// vattention/kernels.
//   CacheKV  a KVCache: each sequence virtually contiguous in its slot, any
//            layout; the kernels read it in place.
//   PagedKV  vLLM-style blocks of `blockSize` tokens in one pool per layer,
//            found through a block table, with the reserve / growAsync /
//            stepAsync / release subset of the KVCache API the serving loop
//            uses, so the same loop runs over both.
import * as kernels from 'vattention/kernels';
import * as gpu from 'vattention/testing';

const BYTES = 2;

export class CacheKV {
  constructor(cache, { device = 0 } = {}) {
    this.cache = cache;
    this.device = device;
    this.rows = gpu.allocate(cache.options.maxSequences * 4, device);
    this.layers = Array.from({ length: cache.options.layers }, (_, l) => ({
      ...kernels.cacheKV(cache.tensor(l, 'k'), cache.tensor(l, 'v')),
      rows: this.rows,
      maxLength: cache.options.maxTokens,
    }));
  }

  prepare(batch, stream) {
    gpu.copyToDevice(this.rows, Int32Array.from(batch, (e) => e.seq.slot), { device: this.device, stream });
  }

  layer(l) {
    return this.layers[l];
  }

  close() {
    if (this.rows) gpu.free(this.rows, this.device);
    this.rows = 0n;
  }
}

class PagedOutOfMemory extends Error {
  code = 'ERR_OUT_OF_MEMORY';
}

export class PagedKV {
  /** `m`: the model's shape; `blocks` per layer pool; sequences up to `maxTokens`. */
  constructor(m, { blocks, blockSize = 16, maxSequences, maxTokens, device = 0 }) {
    this.m = m;
    this.device = device;
    this.blockSize = blockSize;
    this.maxBlocks = Math.ceil(maxTokens / blockSize);
    this.options = { maxSequences, maxTokens, layers: m.layers };
    const row = m.kvHeads * m.headDim;
    const poolBytes = blocks * blockSize * row * BYTES;
    this.pools = Array.from({ length: m.layers }, () => ({ k: gpu.allocate(poolBytes, device), v: gpu.allocate(poolBytes, device) }));
    this.free = Array.from({ length: blocks }, (_, i) => blocks - 1 - i); // block 0 handed out first
    this.freeSlots = Array.from({ length: maxSequences }, (_, i) => maxSequences - 1 - i);
    this.table = gpu.allocate(maxSequences * this.maxBlocks * 4, device);
    this.strides = { row: blockSize * row, token: row, head: m.headDim };
  }

  reserve() {
    if (this.freeSlots.length === 0) throw Object.assign(new Error('PagedKV: every sequence slot is taken'), { code: 'ERR_NO_SLOT' });
    return { slot: this.freeSlots.pop(), blocks: [], tokens: 0 };
  }

  /** Blocks `seq` needs to hold `tokens`, beyond those it has. */
  #needed(seq, tokens) {
    if (tokens > this.options.maxTokens) throw Object.assign(new RangeError(`PagedKV: ${tokens} tokens exceed maxTokens`), { code: 'ERR_OUT_OF_RANGE' });
    return Math.max(0, Math.ceil(tokens / this.blockSize) - seq.blocks.length);
  }

  grow(seq, tokens) {
    this.step([seq], [tokens]);
  }

  /** All or nothing: every sequence grows, or none does (ERR_OUT_OF_MEMORY). */
  step(seqs, lengths) {
    const needed = seqs.map((s, i) => this.#needed(s, lengths[i]));
    const total = needed.reduce((a, b) => a + b, 0);
    if (total > this.free.length) throw new PagedOutOfMemory(`PagedKV: ${total} blocks needed, ${this.free.length} free`);
    seqs.forEach((s, i) => {
      for (let n = 0; n < needed[i]; n++) s.blocks.push(this.free.pop());
      s.tokens = Math.max(s.tokens, lengths[i]);
    });
  }

  async growAsync(seq, tokens) {
    this.grow(seq, tokens);
  }

  async stepAsync(seqs, lengths) {
    this.step(seqs, lengths);
  }

  release(seq) {
    this.free.push(...seq.blocks.reverse());
    seq.blocks = [];
    this.freeSlots.push(seq.slot);
  }

  get freeBlocks() {
    return this.free.length;
  }

  prepare(batch, stream) {
    const table = new Int32Array(batch.length * this.maxBlocks);
    batch.forEach((e, b) => table.set(e.seq.blocks, b * this.maxBlocks));
    gpu.copyToDevice(this.table, table, { device: this.device, stream });
  }

  layer(l) {
    return {
      ...this.pools[l],
      strides: this.strides,
      paged: { blockTable: this.table, maxBlocksPerSequence: this.maxBlocks, blockSize: this.blockSize },
      maxLength: this.maxBlocks * this.blockSize,
    };
  }

  close() {
    for (const p of this.pools.splice(0)) {
      gpu.free(p.k, this.device);
      gpu.free(p.v, this.device);
    }
    if (this.table) gpu.free(this.table, this.device);
    this.table = 0n;
  }
}
