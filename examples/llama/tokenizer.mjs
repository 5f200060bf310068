// Text ↔ token ids for a checkpoint's tokenizer.json (the Hugging Face
// tokenizers format that Llama-family checkpoints ship), BPE models of the
// two kinds they use:
//   byte-level   Llama 3, Qwen2, Mistral-Nemo, GPT-2: a Split (regex) and/or
//                ByteLevel pre-tokenizer, every byte a symbol of GPT-2's
//                byte → character table, merges by rank within each piece
//   SentencePiece-style   Llama 2, Mistral 7B: spaces as '▁' (a Prepend +
//                Replace normalizer or a Metaspace pre-tokenizer), merges by
//                rank, characters without a token as their UTF-8 bytes
//                ('<0xNN>', byte fallback)
// Added tokens (<|begin_of_text|>, <s>, ...) are matched in the text first
// and never merged; the post-processor's template gives the tokens put
// before a prompt (BOS); decode runs the file's decoder steps. Anything else
// in the file (WordPiece, Unigram, other normalizers) is refused with
// ERR_TOKENIZER_UNSUPPORTED rather than tokenized differently from the
// model's training.
import { readFileSync } from 'node:fs';

/** What this reader does not implement, rather than tokenize differently from the model's training. */
export class TokenizerError extends Error {
  constructor(message) {
    super(`tokenizer: ${message}`);
    this.name = 'TokenizerError';
    this.code = 'ERR_TOKENIZER_UNSUPPORTED';
  }
}
const unsupported = (what) => new TokenizerError(`${what} is not supported (byte-level or SentencePiece-style BPE only)`);
/** A bad argument of encode / decode: `Type` (TypeError, RangeError) with code ERR_INVALID_ARGUMENT. */
const invalid = (Type, message) => Object.assign(new Type(`tokenizer: ${message}`), { code: 'ERR_INVALID_ARGUMENT' });
/** `text` matched literally inside a RegExp. */
const escapeRegExp = (text) => text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/** GPT-2's table: each byte a printable character (printable Latin-1 bytes are themselves, the rest from U+0100 on). */
function byteCharacters() {
  const chars = new Array(256);
  let next = 256;
  for (let b = 0; b < 256; b++) {
    const printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
    chars[b] = String.fromCodePoint(printable ? b : next++);
  }
  return chars;
}
const BYTE_CHAR = byteCharacters();
const utf8 = new TextEncoder();
const utf8d = new TextDecoder();
const utf8Strict = new TextDecoder('utf-8', { fatal: true });
const CHAR_BYTE = new Map(BYTE_CHAR.map((c, b) => [c, b]));

// GPT-2's split, which ByteLevel applies when its use_regex is on.
const GPT2_SPLIT = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

/**
 * A tokenizer.json pattern as a JavaScript RegExp. Node 20's engine has no
 * inline modifier groups: Llama 3's `(?i:'s|'t|...)` becomes a group whose
 * letters are classes of both cases.
 */
export function splitRegExp(pattern) {
  const source = pattern.replace(/\(\?i:((?:[^()\\]|\\.)*)\)/g, (_, body) => `(?:${body.replace(/[a-zA-Z]/g, (ch) => `[${ch.toLowerCase()}${ch.toUpperCase()}]`)})`);
  if (/\(\?[a-z]/i.test(source.replace(/\(\?[:=!<]/g, ''))) throw unsupported(`the split pattern ${JSON.stringify(pattern)}`);
  return new RegExp(source, 'gu');
}

/** The pieces of `text` for a Split pre-tokenizer with behaviour 'Isolated': the matches and the text between them. */
function splitIsolated(text, re) {
  const pieces = [];
  let at = 0;
  for (const m of text.matchAll(re)) {
    if (m[0].length === 0) continue;
    if (m.index > at) pieces.push(text.slice(at, m.index));
    pieces.push(m[0]);
    at = m.index + m[0].length;
  }
  if (at < text.length) pieces.push(text.slice(at));
  return pieces;
}

const listOf = (step) => (step?.type === 'Sequence' ? (step.pretokenizers ?? step.normalizers ?? step.decoders ?? step.processors ?? []) : step ? [step] : []);

/**
 * The pre-tokenizer as { pieces(text, atStart) → pieces in the model's symbol
 * alphabet }, the normalizer's steps included.
 * `atStart`: the text begins the input (no added token before it).
 */
function preTokenizer(json) {
  let byteLevel = false, nfc = false;
  let spaces = null; // SentencePiece-style: { prepend: 'always' | 'first' | 'never', split: boolean }
  const splits = [];
  for (const n of listOf(json.normalizer)) {
    if (n.type === 'Prepend' && n.prepend === '▁') spaces = { split: false, ...spaces, prepend: 'always' };
    else if (n.type === 'Replace' && n.pattern?.String === ' ' && n.content === '▁') spaces = { prepend: 'never', split: false, ...spaces };
    else if (n.type === 'NFC') nfc = true;
    else throw unsupported(`the normalizer '${n.type}'`);
  }
  for (const s of listOf(json.pre_tokenizer)) {
    if (s.type === 'Split') {
      if (s.behavior !== 'Isolated' || s.invert) throw unsupported(`a Split pre-tokenizer with behavior '${s.behavior}'${s.invert ? ' inverted' : ''}`);
      splits.push(splitRegExp(s.pattern.Regex ?? escapeRegExp(s.pattern.String)));
    } else if (s.type === 'ByteLevel') {
      if (s.add_prefix_space) throw unsupported('ByteLevel with add_prefix_space');
      byteLevel = true;
      if (s.use_regex !== false) splits.push(new RegExp(GPT2_SPLIT, 'gu'));
    } else if (s.type === 'Metaspace') {
      if (s.replacement !== '▁') throw unsupported(`Metaspace with replacement '${s.replacement}'`);
      const prepend = s.prepend_scheme ?? (s.add_prefix_space === false ? 'never' : 'always');
      // unlike the Prepend normalizer, Metaspace puts no '▁' before text that begins with one
      spaces = { prepend, split: s.split !== false, unlessThere: true };
    } else throw unsupported(`the pre-tokenizer '${s.type}'`);
  }
  if (byteLevel && spaces) throw unsupported('ByteLevel together with SentencePiece spaces');
  const prepends = (atStart) => spaces !== null && (spaces.prepend === 'always' || (spaces.prepend === 'first' && atStart));
  return {
    pieces(text, atStart) {
      if (nfc) text = text.normalize('NFC');
      if (spaces) {
        text = text.replaceAll(' ', '▁');
        if (prepends(atStart) && !(spaces.unlessThere && text.startsWith('▁'))) text = '▁' + text;
        return spaces.split ? text.split(/(?=▁)/u).filter((p) => p.length > 0) : [text];
      }
      let pieces = [text];
      for (const re of splits) pieces = pieces.flatMap((p) => splitIsolated(p, re));
      return byteLevel ? pieces.map((p) => Array.from(utf8.encode(p), (b) => BYTE_CHAR[b]).join('')) : pieces;
    },
  };
}

/**
 * The file's decoder section as a function from token strings to text, each
 * step as Hugging Face's library applies it to the list of tokens (added
 * tokens included): ByteLevel (characters back to bytes, a token with a
 * character outside the table as its own UTF-8), Metaspace ('▁' to spaces,
 * all of them dropped in the first token unless prepend_scheme is 'never'),
 * Replace, ByteFallback (runs of <0xNN> as UTF-8, one U+FFFD per byte of a
 * run that is not), Fuse (one string) and Strip (of each token). No decoder:
 * the tokens joined by spaces.
 */
function decoderOf(json) {
  const steps = listOf(json.decoder).map((d) => {
    switch (d.type) {
      case 'ByteLevel':
        return (tokens) => [utf8d.decode(new Uint8Array(tokens.flatMap((t) => (Array.from(t).every((c) => CHAR_BYTE.has(c)) ? Array.from(t, (c) => CHAR_BYTE.get(c)) : [...utf8.encode(t)]))))];
      case 'Metaspace': {
        if (d.replacement !== '▁') throw unsupported(`a Metaspace decoder with replacement '${d.replacement}'`);
        const prepend = (d.prepend_scheme ?? (d.add_prefix_space === false ? 'never' : 'always')) !== 'never';
        return (tokens) => tokens.map((t, i) => (i === 0 && prepend ? t.replaceAll('▁', '') : t.replaceAll('▁', ' ')));
      }
      case 'Replace':
        if (typeof d.pattern?.String !== 'string') throw unsupported('a Replace decoder with a regex');
        return (tokens) => tokens.map((t) => t.replaceAll(d.pattern.String, d.content));
      case 'ByteFallback':
        return byteFallback;
      case 'Fuse':
        return (tokens) => [tokens.join('')];
      case 'Strip':
        return (tokens) => tokens.map((t) => strip(t, d.content, d.start, d.stop));
      default:
        throw unsupported(`the decoder '${d.type}'`);
    }
  });
  if (steps.length === 0) return (tokens) => tokens.join(' ');
  return (tokens) => steps.reduce((list, step) => step(list), tokens).join('');
}

function byteFallback(tokens) {
  const out = [];
  let bytes = [];
  const flush = () => {
    if (bytes.length === 0) return;
    try {
      out.push(utf8Strict.decode(new Uint8Array(bytes)));
    } catch {
      for (let i = 0; i < bytes.length; i++) out.push('\uFFFD');
    }
    bytes = [];
  };
  for (const t of tokens) {
    if (/^<0x[0-9A-Fa-f]{2}>$/.test(t)) bytes.push(parseInt(t.slice(3, 5), 16));
    else (flush(), out.push(t));
  }
  flush();
  return out;
}

/** `token` less up to `start` leading and `stop` trailing characters equal to `content`. */
function strip(token, content, start, stop) {
  const chars = Array.from(token);
  let from = 0, to = chars.length;
  while (from < start && from < to && chars[from] === content) from++;
  while (chars.length - to < stop && to > from && chars[to - 1] === content) to--;
  return chars.slice(from, to).join('');
}

/**
 * Applies the merges to `symbols` as BPE does: the adjacent pair of lowest
 * rank first, the leftmost among equal ranks, until no pair has a rank. A
 * heap of candidate pairs over a linked list keeps a long piece (Llama 2's
 * whole prompt is one) at O(n log n) instead of a rescan per merge.
 */
export function mergeByRank(symbols, ranks) {
  const n = symbols.length;
  const text = symbols.slice(), next = Array.from({ length: n }, (_, i) => i + 1), prev = Array.from({ length: n }, (_, i) => i - 1);
  const heap = []; // [rank, left, right, left's length, right's length]: stale once either symbol changed
  const less = (a, b) => a[0] < b[0] || (a[0] === b[0] && a[1] < b[1]);
  const push = (item) => {
    let i = heap.push(item) - 1;
    while (i > 0 && less(heap[i], heap[(i - 1) >> 1])) [heap[i], heap[(i - 1) >> 1]] = [heap[(i - 1) >> 1], heap[i]], (i = (i - 1) >> 1);
  };
  const pop = () => {
    const top = heap[0], last = heap.pop();
    if (heap.length > 0) {
      heap[0] = last;
      for (let i = 0; ; ) {
        const l = 2 * i + 1, r = l + 1;
        let m = i;
        if (l < heap.length && less(heap[l], heap[m])) m = l;
        if (r < heap.length && less(heap[r], heap[m])) m = r;
        if (m === i) break;
        [heap[i], heap[m]] = [heap[m], heap[i]];
        i = m;
      }
    }
    return top;
  };
  const consider = (left, right) => {
    if (left < 0 || right >= n) return;
    const rank = ranks.get(`${text[left]} ${text[right]}`);
    if (rank !== undefined) push([rank, left, right, text[left].length, text[right].length]);
  };
  for (let i = 0; i + 1 < n; i++) consider(i, i + 1);
  while (heap.length > 0) {
    const [, left, right, leftLength, rightLength] = pop();
    if (text[left] === null || text[right] === null || next[left] !== right || text[left].length !== leftLength || text[right].length !== rightLength) continue;
    text[left] += text[right];
    text[right] = null;
    next[left] = next[right];
    if (next[right] < n) prev[next[right]] = left;
    consider(prev[left], left);
    consider(left, next[left]);
  }
  return text.filter((t) => t !== null);
}

/** The tokens the post-processor puts before a single sequence (BOS), as ids. */
function prefixTokens(json, ids) {
  const template = listOf(json.post_processor).find((p) => p.type === 'TemplateProcessing');
  if (!template) return [];
  const prefix = [];
  for (const item of template.single) {
    if (item.Sequence) break;
    const name = item.SpecialToken?.id;
    const id = template.special_tokens?.[name]?.ids?.[0] ?? ids.get(name);
    if (id === undefined) throw unsupported(`a template token '${name}' without an id`);
    prefix.push(id);
  }
  return prefix;
}

/**
 * Reads a tokenizer.json (a path, or the parsed object) and returns
 * { encode(text, { special = true }) → ids, decode(ids, { skipSpecial = false }) → text,
 *   idOf(token), tokenOf(id), vocabSize, prefix }.
 * `special`: put the post-processor's prefix (BOS) first.
 */
export function loadTokenizer(source) {
  const json = typeof source === 'string' ? JSON.parse(readFileSync(source, 'utf8')) : source;
  const model = json.model;
  if (model?.type !== 'BPE') throw unsupported(`the model type '${model?.type}'`);
  if (model.continuing_subword_prefix || model.end_of_word_suffix) throw unsupported('BPE with subword prefixes or suffixes');
  const ids = new Map(Object.entries(model.vocab));
  const added = (json.added_tokens ?? []).map((t) => ({ content: t.content, id: t.id, special: t.special }));
  for (const t of added) ids.set(t.content, t.id);
  const tokens = new Map([...ids].map(([t, id]) => [id, t]));
  const ranks = new Map(model.merges.map((m, rank) => [Array.isArray(m) ? `${m[0]} ${m[1]}` : m, rank]));
  const pre = preTokenizer(json);
  const decoder = decoderOf(json);
  const prefix = prefixTokens(json, ids);
  const specialIds = new Set(added.filter((t) => t.special).map((t) => t.id));
  const unk = model.unk_token === null || model.unk_token === undefined ? undefined : ids.get(model.unk_token);
  // the longest added token first where one is a prefix of another
  const addedRe = added.length > 0 ? new RegExp(added.map((t) => t.content).sort((a, b) => b.length - a.length).map(escapeRegExp).join('|'), 'gu') : null;

  /** BPE of one piece: its symbols merged by rank, lowest first (leftmost among equals), as ids. */
  function bpe(piece, out) {
    if (model.ignore_merges && ids.has(piece)) return out.push(ids.get(piece));
    const symbols = mergeByRank(Array.from(piece), ranks);
    for (const s of symbols) {
      const id = ids.get(s);
      if (id !== undefined) out.push(id);
      else if (model.byte_fallback) for (const b of utf8.encode(s)) out.push(byteToken(b));
      else if (unk !== undefined) out.push(unk);
      else throw new TokenizerError(`no token for ${JSON.stringify(s)} and no byte fallback or unknown token`);
    }
  }
  function byteToken(b) {
    const id = ids.get(`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`);
    if (id === undefined) throw new TokenizerError(`byte fallback without the token for byte ${b}`);
    return id;
  }

  function encode(text, { special = true } = {}) {
    if (typeof text !== 'string') throw invalid(TypeError, 'encode takes a string');
    const out = special ? [...prefix] : [];
    for (const part of segments(text)) {
      if (part.added !== undefined) out.push(part.added);
      else for (const piece of pre.pieces(part.text, part.atStart)) bpe(piece, out);
    }
    return out;
  }

  /** The text as plain runs ({ text, atStart }) and added tokens ({ added: id }), in order. */
  function* segments(text) {
    let at = 0;
    if (addedRe)
      for (const m of text.matchAll(addedRe)) {
        if (m.index > at) yield { text: text.slice(at, m.index), atStart: at === 0 };
        yield { added: ids.get(m[0]) };
        at = m.index + m[0].length;
      }
    if (at < text.length) yield { text: text.slice(at), atStart: at === 0 };
  }

  // As Hugging Face's library decodes: the tokens' strings (special ones
  // left out on request) through the file's decoder steps.
  function decode(list, { skipSpecial = false } = {}) {
    if (!Array.isArray(list) && !ArrayBuffer.isView(list)) throw invalid(TypeError, 'decode takes an array of token ids');
    const strings = [];
    for (const id of Array.from(list)) {
      const token = tokens.get(id);
      if (token === undefined) throw invalid(RangeError, `no token has id ${id}`);
      if (!(skipSpecial && specialIds.has(id))) strings.push(token);
    }
    return decoder(strings);
  }

  return { encode, decode, idOf: (t) => ids.get(t), tokenOf: (id) => tokens.get(id), vocabSize: tokens.size, prefix };
}
