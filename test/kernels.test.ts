// vattention/kernels: every bad argument is a coded error raised before the
// driver is touched (so these run everywhere, GPU or not); on a machine
// without CUDA a well-formed call reaches the driver and says so. The
// kernels' results are checked on the GPU in cuda-attention.test.ts.
import { describe, expect, it } from 'vitest';
import { InvalidArgumentRangeError, InvalidArgumentTypeError } from '../lib/errors.js';
import * as kernels from '../lib/kernels.js';
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

  it('argument errors are the package\'s typed errors', () => {
    expect(() => kernels.decodeAttention({ ...valid, batch: 1.5 })).toThrow(InvalidArgumentRangeError);
    expect(() => kernels.decodeAttention({ ...valid, q: 5 as unknown as bigint })).toThrow(InvalidArgumentTypeError);
    expect(() => new kernels.AttentionWorkspace({ bytes: 0 })).toThrow(InvalidArgumentRangeError);
  });

  it('HEAD_DIMS lists the supported head dimensions and cannot be changed', () => {
    expect(kernels.HEAD_DIMS).toEqual([64, 80, 96, 128, 192, 256]);
    expect(Object.isFrozen(kernels.HEAD_DIMS)).toBe(true);
  });

  it.skipIf(cudaSkip === null)(`a well-formed call without CUDA reaches the driver and says it is unavailable${cudaSkip === null ? ' (skipped: this machine has CUDA; the kernels are run in cuda-attention.test.ts)' : ''}`, () => {
    expect(() => kernels.decodeAttention(valid)).toThrow(expect.objectContaining({ code: 'ERR_CUDA_UNAVAILABLE' }));
    expect(() => kernels.appendKV(validAppend)).toThrow(expect.objectContaining({ code: 'ERR_CUDA_UNAVAILABLE' }));
    expect(() => new kernels.AttentionWorkspace({ bytes: 1024 })).toThrow(expect.objectContaining({ code: 'ERR_CUDA_UNAVAILABLE' }));
  });
});
