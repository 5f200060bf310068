// vattention/kernels: every bad argument is a coded error raised before the
// driver is touched (so these run everywhere, GPU or not); on a machine
// without CUDA a well-formed call reaches the driver and says so. The
// kernels' results are checked on the GPU in cuda-attention.test.ts.
import { describe, expect, it } from 'vitest';
import { InvalidArgumentRangeError, InvalidArgumentTypeError, LibraryUnavailableError } from '../lib/errors.js';
import * as kernels from '../lib/kernels.js';
import { KVCache } from '../lib/index.js';
import * as gpu from '../lib/testing.js';
import { cudaSkip } from './backends.js';

// Addresses that are never dereferenced: each call below is refused first.
const at = 1n << 32n;
const valid: kernels.DecodeAttentionArgs = {
  dtype: 'float16',
  batch: 2,
  qHeads: 32,
  kvHeads: 8,
  headDim: 128,
  q: at,
  out: at,
  lengths: at,
  maxLength: 4096,
  k: at,
  v: at,
  strides: { row: 4096 * 1024, token: 1024, head: 128 },
};
const validAppend: kernels.AppendKVArgs = {
  dtype: 'float16',
  batch: 2,
  newTokens: 1,
  kvHeads: 8,
  headDim: 128,
  kNew: at,
  vNew: at,
  positions: at,
  maxLength: 4096,
  k: at,
  v: at,
  strides: { row: 4096 * 1024, token: 1024, head: 128 },
};

const bad: [string, Record<string, unknown>, string][] = [
  ['a head dim outside the set', { headDim: 100 }, '64, 80, 96, 128, 192, 256'],
  ['qHeads not a multiple of kvHeads', { qHeads: 12, kvHeads: 8 }, 'multiple of kvHeads'],
  ['a misaligned query', { q: at + 2n }, 'q must be a 16-byte aligned'],
  ['a misaligned K base', { k: at + 8n }, 'k must be a 16-byte aligned'],
  ['a token stride not a multiple of 16 bytes', { strides: { row: 4096 * 1024, token: 1020, head: 128 } }, 'strides.token'],
  ['an fp8 head stride not a multiple of 16 bytes', { dtype: 'float8_e4m3', queryDtype: 'float16', strides: { row: 4096 * 1024, token: 1024, head: 8 } }, 'strides.head'],
  ['an unknown dtype', { dtype: 'float32' }, "'float16', 'bfloat16' or 'float8_e4m3'"],
  ['fp8 without a query type', { dtype: 'float8_e4m3' }, 'queryDtype'],
  ['a bf16 query for an fp16 cache', { queryDtype: 'bfloat16' }, 'float16 queries'],
  ['kvScale on a 16-bit cache', { kvScale: { k: 2 } }, 'float8_e4m3 caches only'],
  ['a zero fp8 scale', { dtype: 'float8_e4m3', queryDtype: 'float16', kvScale: { k: 0 } }, 'kvScale.k'],
  ['a block table too short for maxLength', { paged: { blockTable: at, maxBlocksPerSequence: 10, blockSize: 16 } }, 'block table is too short'],
  ['a zero block size', { paged: { blockTable: at, maxBlocksPerSequence: 10, blockSize: 0 } }, 'paged.blockSize'],
  ['rows and paged together', { rows: at, paged: { blockTable: at, maxBlocksPerSequence: 256, blockSize: 16 } }, 'exclude each other'],
  ['a live length above maxLength', { liveLengths: [10, 4097] }, 'liveLengths[1]'],
  ['live lengths of another batch', { liveLengths: [10] }, 'batch (2)'],
  ['a negative soft-cap', { softcap: -1 }, 'softcap'],
  ['a zero window', { window: 0 }, 'window'],
  ['zero splits', { splits: 0 }, 'splits'],
  ['a misspelt option', { strem: 0n }, 'not a known option'],
  ['a stream that is not a bigint', { stream: 1 }, 'CUstream'],
  ['a workspace that is not an AttentionWorkspace', { workspace: { address: at, bytes: 100 } }, 'AttentionWorkspace'],
  ['a batch of 0', { batch: 0 }, 'args.batch'],
  ['an address of 0', { lengths: 0n }, 'args.lengths'],
];

describe('vattention/kernels argument checks (no GPU needed)', () => {
  for (const [what, change, message] of bad)
    it(`decodeAttention refuses ${what} with a coded error naming it`, () => {
      let thrown: unknown;
      try {
        kernels.decodeAttention({ ...valid, ...change } as kernels.DecodeAttentionArgs);
      } catch (e) {
        thrown = e;
      }
      expect(thrown).toBeInstanceOf(Error);
      expect((thrown as { code: string }).code).toMatch(/^ERR_INVALID_ARG/);
      expect((thrown as Error).message).toContain(message);
    });

  it('planDecodeAttention checks exactly as decodeAttention does', () => {
    expect(() => kernels.planDecodeAttention({ ...valid, headDim: 48 })).toThrow(expect.objectContaining({ code: expect.stringMatching(/^ERR_INVALID_ARG/) }));
  });

  for (const [what, change, message] of [
    ['a misaligned new-K buffer', { kNew: at + 4n }, 'kNew must be a 16-byte aligned'],
    ['zero new tokens', { newTokens: 0 }, 'newTokens'],
    ['a head dim outside the set', { headDim: 72 }, '64, 80, 96'],
    ['a misaligned counts array', { counts: at + 2n }, 'counts must be an int32'],
    ['an unknown option', { position: at }, 'not a known option'],
  ] as [string, Record<string, unknown>, string][])
    it(`appendKV refuses ${what}`, () => {
      expect(() => kernels.appendKV({ ...validAppend, ...change } as kernels.AppendKVArgs)).toThrow(expect.objectContaining({ message: expect.stringContaining(message) }));
    });

  const validPrefill: kernels.PrefillAttentionArgs = { ...valid, queryTokens: 64 };
  for (const [what, change, message] of [
    ['zero query tokens', { queryTokens: 0 }, 'args.queryTokens'],
    ['a misaligned counts array', { counts: at + 2n }, 'counts must be an int32'],
    ['splits (prefill runs in one)', { splits: 2 }, 'not a known option'],
    ['a head dim outside the set', { headDim: 72 }, '64, 80, 96'],
    ['qHeads not a multiple of kvHeads', { qHeads: 12 }, 'multiple of kvHeads'],
  ] as [string, Record<string, unknown>, string][])
    it(`prefillAttention refuses ${what}`, () => {
      expect(() => kernels.prefillAttention({ ...validPrefill, ...change } as kernels.PrefillAttentionArgs)).toThrow(
        expect.objectContaining({ code: expect.stringMatching(/^ERR_INVALID_ARG/), message: expect.stringContaining(message) }),
      );
    });

  // The model kernels: each refuses a bad call before the driver (or cuBLASLt) is touched.
  const modelCalls: [string, () => void, string][] = [
    ['linear with features not a multiple of 8', () => kernels.linear({ dtype: 'float16', rows: 4, inFeatures: 12, outFeatures: 16, input: at, weight: at, output: at }), 'multiples of 8'],
    ['linear with a misaligned weight', () => kernels.linear({ dtype: 'float16', rows: 4, inFeatures: 16, outFeatures: 16, input: at, weight: at + 2n, output: at }), 'weight must be a 16-byte'],
    ['linear with an fp16 input and a bf16 output', () => kernels.linear({ dtype: 'float16', rows: 4, inFeatures: 16, outFeatures: 16, input: at, weight: at, output: at, outputDtype: 'bfloat16' }), 'outputDtype'],
    ['linear with an unknown dtype', () => kernels.linear({ dtype: 'float32' as 'float16', rows: 4, inFeatures: 16, outFeatures: 16, input: at, weight: at, output: at }), 'args.dtype'],
    ['rmsNorm wider than a block holds', () => kernels.rmsNorm({ dtype: 'float16', rows: 1, width: 16384, x: at, weight: at, out: at }), 'at most 8192'],
    ['rmsNorm with a zero eps', () => kernels.rmsNorm({ dtype: 'float16', rows: 1, width: 64, eps: 0, x: at, weight: at, out: at }), 'args.eps'],
    ['rmsNorm with a misaligned residual', () => kernels.rmsNorm({ dtype: 'float16', rows: 1, width: 64, x: at, residual: at + 4n, weight: at, out: at }), 'residual must be'],
    ['rotaryEmbedding with qHeads not a multiple of kvHeads', () => kernels.rotaryEmbedding({ dtype: 'bfloat16', rows: 1, qHeads: 6, kvHeads: 4, headDim: 64, qkv: at, positions: at, frequencies: at, q: at, k: at, v: at }), 'multiple of kvHeads'],
    ['rotaryEmbedding with an odd head dim', () => kernels.rotaryEmbedding({ dtype: 'bfloat16', rows: 1, qHeads: 8, kvHeads: 4, headDim: 72, qkv: at, positions: at, frequencies: at, q: at, k: at, v: at }), 'headDim'],
    ['siluMul with a width not a multiple of 8', () => kernels.siluMul({ dtype: 'float16', rows: 2, width: 100, gateUp: at, out: at }), 'multiple of 8'],
    ['gatherRows with zero rows', () => kernels.gatherRows({ rows: 0, tableRows: 10, width: 64, table: at, ids: at, out: at }), 'args.rows'],
    ['argmax with a stride below the vocabulary', () => kernels.argmax({ rows: 2, vocab: 100, stride: 99, logits: at, out: at }), 'args.stride'],
    ['argmax with a negative temperature', () => kernels.argmax({ rows: 2, vocab: 100, logits: at, out: at, temperature: -1 }), 'temperature'],
    ['argmax with a seed that is not a bigint', () => kernels.argmax({ rows: 2, vocab: 100, logits: at, out: at, temperature: 1, seed: 3 as unknown as bigint }), 'args.seed'],
    ['a misspelt option', () => kernels.siluMul({ dtype: 'float16', rows: 2, width: 64, gateUp: at, out: at, strem: 0n } as kernels.SiluMulArgs), 'not a known option'],
  ];
  for (const [what, run, message] of modelCalls)
    it(`${what} is refused with a coded error naming it`, () => {
      expect(run).toThrow(expect.objectContaining({ code: expect.stringMatching(/^ERR_INVALID_ARG/), message: expect.stringContaining(message) }));
    });

  it('linearLibrary says whether cuBLASLt loaded, and from where or why not, without a GPU', () => {
    const l = kernels.linearLibrary();
    expect(typeof l.available).toBe('boolean');
    if (l.available) expect(l.library).toMatch(/cublasLt/i);
    else expect(l.problem).toMatch(/libcublasLt\.so\.13.*libcublasLt\.so\.12/);
  });

  it('argument errors are the package\'s typed errors', () => {
    expect(() => kernels.decodeAttention({ ...valid, batch: 1.5 })).toThrow(InvalidArgumentRangeError);
    expect(() => kernels.decodeAttention({ ...valid, q: 5 as unknown as bigint })).toThrow(InvalidArgumentTypeError);
    expect(() => new kernels.AttentionWorkspace({ bytes: 0 })).toThrow(InvalidArgumentRangeError);
  });

  it('releaseStream checks its options; with nothing kept for any stream it is false and needs no driver', () => {
    expect(() => kernels.releaseStream({ stream: 5 as unknown as bigint })).toThrow(InvalidArgumentTypeError);
    expect(() => kernels.releaseStream({ stream: -1n })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT', message: expect.stringContaining('options.stream') }));
    expect(() => kernels.releaseStream({ stream: 0n, device: -1 })).toThrow(InvalidArgumentRangeError);
    expect(() => kernels.releaseStream({ stream: 0n, strem: 1n } as { stream: bigint })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }));
    expect(() => kernels.releaseStream(undefined as unknown as { stream: bigint })).toThrow(expect.objectContaining({ code: 'ERR_INVALID_ARGUMENT' }));
    // this file's calls were all refused before the device: nothing is kept (on CI there is no driver to ask)
    expect(kernels.releaseStream({ stream: 0n })).toBe(false);
    expect(kernels.releaseStream({ stream: 1234n, device: 3 })).toBe(false);
  });

  it('HEAD_DIMS lists the supported head dimensions and cannot be changed', () => {
    expect(kernels.HEAD_DIMS).toEqual([64, 80, 96, 128, 192, 256]);
    expect(Object.isFrozen(kernels.HEAD_DIMS)).toBe(true);
  });

  it.skipIf(cudaSkip === null)(`a well-formed call without CUDA reaches the driver and says it is unavailable${cudaSkip === null ? ' (skipped: this machine has CUDA; the kernels are run in cuda-attention.test.ts)' : ''}`, () => {
    expect(() => kernels.decodeAttention(valid)).toThrow(expect.objectContaining({ code: 'ERR_CUDA_UNAVAILABLE' }));
    expect(() => kernels.appendKV(validAppend)).toThrow(expect.objectContaining({ code: 'ERR_CUDA_UNAVAILABLE' }));
    expect(() => new kernels.AttentionWorkspace({ bytes: 1024 })).toThrow(expect.objectContaining({ code: 'ERR_CUDA_UNAVAILABLE' }));
    expect(() => kernels.prefillAttention({ ...valid, queryTokens: 8 })).toThrow(expect.objectContaining({ code: 'ERR_CUDA_UNAVAILABLE' }));
    expect(() => kernels.siluMul({ dtype: 'float16', rows: 2, width: 64, gateUp: at, out: at })).toThrow(expect.objectContaining({ code: 'ERR_CUDA_UNAVAILABLE' }));
    // linear says what is missing: cuBLASLt (checked with the arguments, before the device) or the driver
    const linearCall = () => kernels.linear({ dtype: 'float16', rows: 4, inFeatures: 16, outFeatures: 16, input: at, weight: at, output: at });
    if (kernels.linearLibrary().available) expect(linearCall).toThrow(expect.objectContaining({ code: 'ERR_CUDA_UNAVAILABLE' }));
    else {
      expect(linearCall).toThrow(LibraryUnavailableError);
      expect(linearCall).toThrow(expect.objectContaining({ code: 'ERR_LIBRARY_UNAVAILABLE', message: expect.stringContaining('libcublasLt.so.13') }));
    }
  });
});

describe('fp8 e4m3 on the host', () => {
  it('every e4m3 code decodes and encodes back to itself (NaN aside); rounding is to nearest even; values saturate at ±448', () => {
    for (let b = 0; b < 256; b++) {
      if ((b & 0x7f) === 0x7f) {
        expect(gpu.fromFloat8E4M3Bits(b)).toBeNaN();
        continue;
      }
      expect(gpu.toFloat8E4M3Bits(gpu.fromFloat8E4M3Bits(b)), `code 0x${b.toString(16)}`).toBe(b);
    }
    expect(gpu.fromFloat8E4M3Bits(0x7e)).toBe(448);
    expect(gpu.toFloat8E4M3Bits(1000)).toBe(0x7e);
    expect(gpu.toFloat8E4M3Bits(-1e9)).toBe(0xfe);
    // 1.0625 lies halfway between 1 (0x38) and 1.125 (0x39): to the even code
    expect(gpu.toFloat8E4M3Bits(1.0625)).toBe(0x38);
    expect(gpu.toFloat8E4M3Bits(1.1875)).toBe(0x3a);
    expect(gpu.toFloat8E4M3Bits(2 ** -10)).toBe(0); // half the smallest subnormal: to even (0)
    expect(gpu.toFloat8E4M3Bits(3 * 2 ** -10)).toBe(2);
  });

  it('a float8_e4m3 cache holds one byte per element and moves raw bytes', () => {
    using c = new KVCache({ backend: 'host', layers: 2, kvHeads: 2, headDim: 64, dtype: 'float8_e4m3', maxSequences: 2, maxTokens: 256 });
    expect(c.tokenBytes).toBe(2 * 64);
    const seq = c.reserve();
    c.grow(seq, 10);
    const bytes = Uint8Array.from({ length: 10 * c.tokenBytes }, (_, i) => gpu.toFloat8E4M3Bits(((i % 37) - 18) / 4));
    c.write(seq, { layer: 1, kind: 'v', token: 0 }, bytes);
    expect(Buffer.from(c.read(seq, { layer: 1, kind: 'v', token: 0, count: 10 })).equals(Buffer.from(bytes))).toBe(true);
  });

  it("the old name 'float8' is refused, naming the supported ones", () => {
    expect(() => new KVCache({ backend: 'host', layers: 1, kvHeads: 1, headDim: 64, dtype: 'float8' as never, maxSequences: 1, maxTokens: 16 })).toThrow(/float8_e4m3/);
  });
});
