// examples/llama/tokenizer.mjs on tokenizer.json files built here in the two
// shapes Llama-family checkpoints ship (byte-level BPE as in Llama 3,
// SentencePiece-style BPE with byte fallback as in Llama 2), small enough to
// work out each expected id by hand, and on files Hugging Face's tokenizers
// wrote, against what that library gives for them. No GPU, no network.
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
// @ts-expect-error: an example in JavaScript, without types
import { loadTokenizer, mergeByRank, splitRegExp } from '../examples/llama/tokenizer.mjs';
import { byteLevelTokenizer, LLAMA3_SPLIT } from './tokenizer-files.mjs';

const byteLevel = (merges: string[], extra: Record<string, unknown> = {}) => ({ ...byteLevelTokenizer({ merges }), ...extra });

/** A Llama-2-style tokenizer.json: <unk> <s> </s>, 256 byte tokens, a few characters and merges. */
function sentencePiece(extra: Record<string, unknown> = {}) {
  const vocab: Record<string, number> = { '<unk>': 0, '<s>': 1, '</s>': 2 };
  for (let b = 0; b < 256; b++) vocab[`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`] = 3 + b;
  for (const ch of ['▁', 'h', 'e', 'l', 'o', 'w', 'r', 'd']) vocab[ch] = Object.keys(vocab).length;
  const merges = ['▁ h', 'l l', 'e ll', '▁h ell', '▁hell o', '▁ w', 'o r', '▁w or', 'l d', '▁wor ld'];
  for (const m of merges) vocab[m.replace(' ', '')] = Object.keys(vocab).length;
  return {
    version: '1.0',
    added_tokens: [
      { id: 0, content: '<unk>', special: true },
      { id: 1, content: '<s>', special: true },
      { id: 2, content: '</s>', special: true },
    ],
    normalizer: { type: 'Sequence', normalizers: [{ type: 'Prepend', prepend: '▁' }, { type: 'Replace', pattern: { String: ' ' }, content: '▁' }] },
    pre_tokenizer: null,
    post_processor: { type: 'TemplateProcessing', single: [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }], pair: [], special_tokens: { '<s>': { id: '<s>', ids: [1], tokens: ['<s>'] } } },
    decoder: { type: 'Sequence', decoders: [{ type: 'Replace', pattern: { String: '▁' }, content: ' ' }, { type: 'ByteFallback' }, { type: 'Fuse' }, { type: 'Strip', content: ' ', start: 1, stop: 0 }] },
    model: { type: 'BPE', dropout: null, unk_token: '<unk>', continuing_subword_prefix: null, end_of_word_suffix: null, fuse_unk: true, byte_fallback: true, vocab, merges },
    ...extra,
  };
}

/** Strings that reach every byte-level path: ASCII words and digits, contractions, newlines, accents, CJK, emoji, specials. */
const SAMPLES = ['hello world', "It's 12345 DON'T\n\n  ok", 'héllo wörld — naïve café', '日本語のテキスト', '🦙 llamas 🦙🦙', '  leading and trailing  ', 'tabs\tand\r\nreturns', 'x<|eot_id|>y', ''];

const code = (c: string) => expect.objectContaining({ code: c });

describe('tokenizer.json, byte-level BPE (Llama 3)', () => {
  const merges = ['h e', 'l l', 'he ll', 'hell o', 'Ġ w', 'o r', 'Ġw or', 'Ġwor l', 'Ġworl d'];
  const tok = loadTokenizer(byteLevel(merges));
  const id = (t: string) => tok.idOf(t) as number;

  it('splits as Llama 3 does: contractions of either case, digits in threes, spaces kept with the next word', () => {
    const re = splitRegExp(LLAMA3_SPLIT);
    expect("Hello world, it's 12345 DON'T\n\n  ok".match(re)).toEqual(['Hello', ' world', ',', ' it', "'s", ' ', '123', '45', ' DON', "'T", '\n\n', ' ', ' ok']);
  });

  it('merges by rank within each piece and puts the template prefix first', () => {
    expect(tok.encode('hello world')).toEqual([1000, id('hello'), id('Ġworld')]);
    expect(tok.encode('hello world', { special: false })).toEqual([id('hello'), id('Ġworld')]);
    // 'hellhello': 'hell' + 'o' would need a merge across the piece's end; inside one piece: hell·hello
    expect(tok.encode('hellhello', { special: false })).toEqual([id('hell'), id('hello')]);
    // unmerged bytes are their byte tokens
    expect(tok.encode('h!', { special: false })).toEqual([0x68, 0x21]);
  });

  it('a lower rank wins where two merges compete for a symbol', () => {
    const bcFirst = loadTokenizer(byteLevel(['b c', 'a b']));
    const abFirst = loadTokenizer(byteLevel(['a b', 'b c']));
    expect(bcFirst.encode('abc', { special: false })).toEqual([0x61, bcFirst.idOf('bc')]);
    expect(abFirst.encode('abc', { special: false })).toEqual([abFirst.idOf('ab'), 0x63]);
  });

  it('special tokens in the text are matched first and never merged; decode can leave them out', () => {
    const ids = tok.encode('hello<|eot_id|> world', { special: false });
    expect(ids).toEqual([id('hello'), 1001, id('Ġworld')]);
    expect(tok.decode(ids)).toBe('hello<|eot_id|> world');
    expect(tok.decode([1000, ...ids], { skipSpecial: true })).toBe('hello world');
  });

  it('decode(encode(text)) is the text, for every sample', () => {
    for (const s of SAMPLES) expect(tok.decode(tok.encode(s)), JSON.stringify(s)).toBe(`<|begin_of_text|>${s}`);
    for (const s of SAMPLES) expect(tok.decode(tok.encode(s, { special: false })), JSON.stringify(s)).toBe(s);
  });

  it('merges written as pairs (newer files) read the same as "a b" strings', () => {
    const pairs = loadTokenizer(byteLevel([]));
    const json = byteLevel(merges);
    const asPairs = loadTokenizer({ ...json, model: { ...json.model, merges: merges.map((m) => m.split(' ')) } });
    expect(asPairs.encode('hello world')).toEqual(tok.encode('hello world'));
    expect(pairs.encode('he', { special: false })).toEqual([0x68, 0x65]);
  });

  it('reads a file path', () => {
    const dir = mkdtempSync(join(tmpdir(), 'vat-tok-'));
    writeFileSync(join(dir, 'tokenizer.json'), JSON.stringify(byteLevel(merges)));
    expect(loadTokenizer(join(dir, 'tokenizer.json')).encode('hello world')).toEqual(tok.encode('hello world'));
  });
});

describe('tokenizer.json, SentencePiece-style BPE with byte fallback (Llama 2)', () => {
  const tok = loadTokenizer(sentencePiece());
  const id = (t: string) => tok.idOf(t) as number;
  const byte = (b: number) => 3 + b;

  it("spaces become '▁', one goes before the text; characters without a token are their UTF-8 bytes", () => {
    expect(tok.encode('hello world')).toEqual([1, id('▁hello'), id('▁world')]);
    expect(tok.encode('hé', { special: false })).toEqual([id('▁h'), byte(0xc3), byte(0xa9)]);
    expect(tok.decode(tok.encode('hello world'), { skipSpecial: true })).toBe('hello world');
  });

  it('decode(encode(text)) is the text, for every sample (byte fallback makes every character representable)', () => {
    for (const s of SAMPLES.filter((x) => !x.includes('<|'))) {
      expect(tok.decode(tok.encode(s, { special: false })), JSON.stringify(s)).toBe(s);
      expect(tok.decode(tok.encode(s), { skipSpecial: true }), JSON.stringify(s)).toBe(s);
    }
  });

  it("a Metaspace pre-tokenizer (prepend_scheme 'first', split) reads the same words", () => {
    // (the decoder stays Replace, ByteFallback, Fuse, Strip, as in Mistral's files)
    const json = sentencePiece({ normalizer: null, pre_tokenizer: { type: 'Metaspace', replacement: '▁', prepend_scheme: 'first', split: true } });
    const meta = loadTokenizer(json);
    expect(meta.encode('hello world')).toEqual(tok.encode('hello world'));
    // as Hugging Face decodes (the fixtures below check it against that library): the <s> kept in front means Strip
    // finds no space to take; text that begins with a space got no '▁' put before it
    for (const s of SAMPLES.filter((x) => !x.includes('<|'))) {
      expect(meta.decode(meta.encode(s)), JSON.stringify(s)).toBe(s === '' || s.startsWith(' ') ? `<s>${s}` : `<s> ${s}`);
      if (!s.startsWith(' ')) expect(meta.decode(meta.encode(s), { skipSpecial: true }), JSON.stringify(s)).toBe(s);
    }
    // after an added token the text does not begin the input: no '▁' before it
    expect(meta.encode('</s>hello', { special: false })).toEqual([2, id('h'), id('ell'), id('o')]);
  });
});

describe('BPE merging', () => {
  /** The textbook loop: rescan for the lowest-rank pair (leftmost among equals), merge it, repeat. */
  const naive = (symbols: string[], ranks: Map<string, number>) => {
    let s = symbols.slice();
    for (;;) {
      let best = -1, bestRank = Infinity;
      for (let i = 0; i + 1 < s.length; i++) {
        const r = ranks.get(`${s[i]} ${s[i + 1]}`);
        if (r !== undefined && r < bestRank) [best, bestRank] = [i, r];
      }
      if (best < 0) return s;
      s = [...s.slice(0, best), s[best]! + s[best + 1]!, ...s.slice(best + 2)];
    }
  };

  it('merges exactly as the textbook loop does, on random texts and merge lists (repeats, equal ranks, chains)', () => {
    let x = 12345;
    const rand = (n: number) => ((x = (x * 1103515245 + 12345) % 2 ** 31), x % n);
    for (let trial = 0; trial < 300; trial++) {
      const alphabet = 'abc'.slice(0, 2 + rand(2));
      const text = Array.from({ length: 1 + rand(40) }, () => alphabet[rand(alphabet.length)]!);
      // merges built from pairs of strings the text can form, some ranks shared by several pairs
      const pieces = [...alphabet];
      const ranks = new Map<string, number>();
      for (let k = 0; k < 3 + rand(12); k++) {
        const [a, b] = [pieces[rand(pieces.length)]!, pieces[rand(pieces.length)]!];
        if (!ranks.has(`${a} ${b}`)) ranks.set(`${a} ${b}`, rand(6));
        pieces.push(a + b);
      }
      expect(mergeByRank(text, ranks), `${text.join('')} with ${[...ranks].join(';')}`).toEqual(naive(text, ranks));
    }
  });

  it('a whole SentencePiece-style prompt (one piece) of 20,000 characters is encoded and decoded back', () => {
    const tok = loadTokenizer(sentencePiece());
    const text = Array.from({ length: 2000 }, (_, i) => ['hello', 'world', 'hé', 'low', 'red'][i % 5]).join(' ');
    expect(tok.decode(tok.encode(text, { special: false }))).toBe(text);
  });
});

describe('tokenizer.json, what is refused', () => {
  it('bad arguments are ERR_INVALID_ARGUMENT', () => {
    const tok = loadTokenizer(byteLevel([]));
    expect(() => tok.encode(5)).toThrow(code('ERR_INVALID_ARGUMENT'));
    expect(() => tok.decode('abc')).toThrow(code('ERR_INVALID_ARGUMENT'));
    expect(() => tok.decode([99999])).toThrow(code('ERR_INVALID_ARGUMENT'));
  });

  it('models and steps it does not implement are ERR_TOKENIZER_UNSUPPORTED, not tokenized differently', () => {
    const json = byteLevel([]);
    expect(() => loadTokenizer({ ...json, model: { type: 'WordPiece', vocab: {} } })).toThrow(code('ERR_TOKENIZER_UNSUPPORTED'));
    expect(() => loadTokenizer({ ...json, model: { ...json.model, continuing_subword_prefix: '##' } })).toThrow(code('ERR_TOKENIZER_UNSUPPORTED'));
    expect(() => loadTokenizer({ ...json, normalizer: { type: 'Lowercase' } })).toThrow(code('ERR_TOKENIZER_UNSUPPORTED'));
    expect(() => loadTokenizer({ ...json, pre_tokenizer: { type: 'Split', pattern: { Regex: ' ' }, behavior: 'Removed', invert: false } })).toThrow(code('ERR_TOKENIZER_UNSUPPORTED'));
    expect(() => loadTokenizer({ ...json, pre_tokenizer: { type: 'Whitespace' } })).toThrow(code('ERR_TOKENIZER_UNSUPPORTED'));
    expect(() => splitRegExp('(?s:.)')).toThrow(code('ERR_TOKENIZER_UNSUPPORTED'));
    // a character with no token, no byte fallback and no unknown token
    const noBytes = { ...json, model: { ...json.model, vocab: { a: 0 }, merges: [] } };
    expect(() => loadTokenizer(noBytes).encode('b')).toThrow(code('ERR_TOKENIZER_UNSUPPORTED'));
  });
});

// Against Hugging Face's `tokenizers` itself: test/fixtures/tokenizers holds
// four tokenizer.json files that library trained and wrote (Llama 3, Qwen2,
// Llama 2 and Mistral shapes, on this repository's docs) and what it gives
// for each text (make_fixtures.py, run where python3 has `tokenizers`).
describe('tokenizer.json files written by Hugging Face tokenizers: the same ids and text as that library', () => {
  const fixtures = join(__dirname, 'fixtures/tokenizers');
  const expected = JSON.parse(readFileSync(join(fixtures, 'expected.json'), 'utf8')) as {
    tokenizers: string;
    texts: string[];
    files: Record<string, { ids: number[]; idsWithoutSpecial: number[]; decoded: string; decodedSkippingSpecial: string }[]>;
  };
  for (const [name, rows] of Object.entries(expected.files)) {
    describe(`${name} (tokenizers ${expected.tokenizers})`, () => {
      const tok = loadTokenizer(join(fixtures, `${name}.json`));
      it('encode gives its ids, with and without the special prefix', () => {
        for (const [i, text] of expected.texts.entries()) {
          expect(tok.encode(text), `text ${i}: ${JSON.stringify(text.slice(0, 60))}`).toEqual(rows[i].ids);
          expect(tok.encode(text, { special: false }), `text ${i} without special`).toEqual(rows[i].idsWithoutSpecial);
        }
      });
      it('decode gives its text, keeping and skipping special tokens', () => {
        for (const [i, row] of rows.entries()) {
          expect(tok.decode(row.ids), `text ${i}`).toBe(row.decoded);
          expect(tok.decode(row.ids, { skipSpecial: true }), `text ${i} skipping special`).toBe(row.decodedSkippingSpecial);
        }
      });
    });
  }
});
