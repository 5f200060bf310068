// tokenizer.json files built for tests (tokenizer.test.ts, llama-gpu.test.ts):
// small enough to work out each expected id by hand, in the shapes
// Llama-family checkpoints ship.

export const LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

const direct = (b) => (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);

/** GPT-2's byte → character table, written out independently of examples/llama/tokenizer.mjs. */
export function byteChar(b) {
  if (direct(b)) return String.fromCodePoint(b);
  let n = 0;
  for (let x = 0; x < b; x++) if (!direct(x)) n++;
  return String.fromCodePoint(256 + n);
}

/**
 * A Llama-3-style tokenizer.json: the 256 byte tokens from id `firstByte`, `merges` (rank order) next,
 * the special tokens <|begin_of_text|> (`bos`, put first by the template) and <|eot_id|> (`eot`); with
 * `vocabSize`, every id left below it a reserved special token, as Llama 3's.
 */
export function byteLevelTokenizer({ merges, firstByte = 0, bos = 1000, eot = 1001, vocabSize = 0 }) {
  const vocab = {};
  for (let b = 0; b < 256; b++) vocab[byteChar(b)] = firstByte + b;
  let next = firstByte + 256;
  for (const m of merges) vocab[m.replace(' ', '')] ??= next++;
  const added = [
    { id: bos, content: '<|begin_of_text|>', special: true },
    { id: eot, content: '<|eot_id|>', special: true },
  ];
  const used = new Set([...Object.values(vocab), bos, eot]);
  for (let id = 0; id < vocabSize; id++) if (!used.has(id)) added.push({ id, content: `<|reserved_special_token_${id}|>`, special: true });
  return {
    version: '1.0',
    added_tokens: added,
    normalizer: null,
    pre_tokenizer: { type: 'Sequence', pretokenizers: [{ type: 'Split', pattern: { Regex: LLAMA3_SPLIT }, behavior: 'Isolated', invert: false }, { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: false }] },
    post_processor: { type: 'TemplateProcessing', single: [{ SpecialToken: { id: '<|begin_of_text|>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }], pair: [], special_tokens: { '<|begin_of_text|>': { id: '<|begin_of_text|>', ids: [bos], tokens: ['<|begin_of_text|>'] } } },
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: { type: 'BPE', dropout: null, unk_token: null, continuing_subword_prefix: null, end_of_word_suffix: null, fuse_unk: false, byte_fallback: false, ignore_merges: true, vocab, merges },
  };
}
