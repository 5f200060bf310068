// Llama-architecture configs in Hugging Face's config.json form (the keys
// Llama, Mistral and Qwen2 implementations load), the two named shapes of
// this example, and the normalised view the model code uses.

/** config.json of the named shapes, as `make-weights.mjs` writes them. */
export const SHAPES = Object.freeze({
  'llama-3-8b': {
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    hidden_size: 4096,
    intermediate_size: 14336,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: 8,
    head_dim: 128,
    vocab_size: 128256,
    max_position_embeddings: 131072,
    rms_norm_eps: 1e-5,
    rope_theta: 500000,
    rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 },
    tie_word_embeddings: false,
    hidden_act: 'silu',
    attention_bias: false,
    bos_token_id: 128000,
    eos_token_id: 128001,
    torch_dtype: 'bfloat16',
  },
  tiny: {
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    hidden_size: 256,
    intermediate_size: 512,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    head_dim: 64,
    vocab_size: 1000,
    max_position_embeddings: 4096,
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    rope_scaling: null,
    tie_word_embeddings: false,
    hidden_act: 'silu',
    attention_bias: false,
    bos_token_id: 1,
    eos_token_id: 2,
    torch_dtype: 'float16',
  },
});

export class ConfigError extends Error {
  constructor(message) {
    super(message);
    this.name = 'ConfigError';
    this.code = 'ERR_MODEL_CONFIG';
  }
}

function integer(c, key, fallback) {
  const v = c[key] ?? fallback;
  if (!Number.isSafeInteger(v) || v <= 0) throw new ConfigError(`config.json: ${key} must be a positive integer, got ${JSON.stringify(c[key])}`);
  return v;
}

function number(c, key, fallback) {
  const v = c[key] ?? fallback;
  if (typeof v !== 'number' || !(v > 0)) throw new ConfigError(`config.json: ${key} must be a positive number, got ${JSON.stringify(c[key])}`);
  return v;
}

/**
 * The model's shape from a parsed config.json: layers, hidden, heads,
 * kvHeads, headDim, intermediate, vocab, rmsNormEps, ropeTheta, ropeScaling
 * (Llama-3's parameters or null), tieWordEmbeddings, dtype ('float16' |
 * 'bfloat16'), maxPositions. Mistral and Qwen2 configs read the same way
 * (Qwen2's q/k/v biases are not supported: attention_bias must be false).
 * Both generations of transformers' keys are read: `torch_dtype`,
 * `rope_theta` and `rope_scaling` (before 4.56 / 5), and `dtype` and
 * `rope_parameters` (which holds the theta and the scaling) after. A sliding
 * window (Mistral 7B v0.1's `sliding_window`) caps maxPositions: the kernels
 * attend to the whole sequence, which is the same model only within it.
 */
export function parseConfig(c) {
  if (typeof c !== 'object' || c === null) throw new ConfigError('config.json must hold an object');
  const hidden = integer(c, 'hidden_size');
  const heads = integer(c, 'num_attention_heads');
  const kvHeads = integer(c, 'num_key_value_heads', heads);
  if (heads % kvHeads !== 0) throw new ConfigError(`config.json: num_attention_heads (${heads}) must be a multiple of num_key_value_heads (${kvHeads})`);
  const headDim = integer(c, 'head_dim', hidden / heads);
  if ((c.hidden_act ?? 'silu') !== 'silu') throw new ConfigError(`config.json: hidden_act ${JSON.stringify(c.hidden_act)} is not supported (silu only)`);
  if (c.attention_bias || c.model_type === 'qwen2') throw new ConfigError('config.json: attention biases (Qwen2) are not supported');
  const dtypeKey = c.dtype !== undefined ? 'dtype' : 'torch_dtype';
  const torchDtype = c[dtypeKey] ?? 'float16';
  if (torchDtype !== 'float16' && torchDtype !== 'bfloat16') throw new ConfigError(`config.json: ${dtypeKey} ${JSON.stringify(torchDtype)} (float16 or bfloat16)`);
  for (const key of ['rope_parameters', 'rope_scaling'])
    if (c[key] != null && (typeof c[key] !== 'object' || Array.isArray(c[key]))) throw new ConfigError(`config.json: ${key} must hold an object`);
  const rope = c.rope_parameters ?? {};
  let ropeScaling = null;
  const rs = c.rope_scaling ?? rope;
  if ((rs.rope_type ?? rs.type ?? 'default') !== 'default') {
    const type = rs.rope_type ?? rs.type;
    if (type !== 'llama3') throw new ConfigError(`config.json: rope_scaling type ${JSON.stringify(type)} is not supported (llama3 only)`);
    ropeScaling = {
      factor: number(rs, 'factor'),
      lowFreqFactor: number(rs, 'low_freq_factor'),
      highFreqFactor: number(rs, 'high_freq_factor'),
      originalMaxPositions: integer(rs, 'original_max_position_embeddings'),
    };
  }
  return {
    layers: integer(c, 'num_hidden_layers'),
    hidden,
    heads,
    kvHeads,
    headDim,
    intermediate: integer(c, 'intermediate_size'),
    vocab: integer(c, 'vocab_size'),
    rmsNormEps: number(c, 'rms_norm_eps', 1e-6),
    ropeTheta: rope.rope_theta !== undefined ? number(rope, 'rope_theta') : number(c, 'rope_theta', 10000),
    ropeScaling,
    tieWordEmbeddings: c.tie_word_embeddings === true,
    dtype: torchDtype,
    maxPositions: Math.min(integer(c, 'max_position_embeddings', 2048), slidingWindow(c)),
  };
}

/** The positions a sliding window (when the config has one in use) leaves: Infinity without one. */
function slidingWindow(c) {
  if (c.sliding_window == null || c.use_sliding_window === false) return Infinity;
  return integer(c, 'sliding_window');
}

/** The tensors of a model of shape `m`: [{ name, shape }] in Hugging Face's names and [out, in] layout. */
export function tensorList(m) {
  const list = [{ name: 'model.embed_tokens.weight', shape: [m.vocab, m.hidden] }];
  for (let l = 0; l < m.layers; l++) {
    const p = `model.layers.${l}.`;
    list.push(
      { name: `${p}input_layernorm.weight`, shape: [m.hidden] },
      { name: `${p}self_attn.q_proj.weight`, shape: [m.heads * m.headDim, m.hidden] },
      { name: `${p}self_attn.k_proj.weight`, shape: [m.kvHeads * m.headDim, m.hidden] },
      { name: `${p}self_attn.v_proj.weight`, shape: [m.kvHeads * m.headDim, m.hidden] },
      { name: `${p}self_attn.o_proj.weight`, shape: [m.hidden, m.heads * m.headDim] },
      { name: `${p}post_attention_layernorm.weight`, shape: [m.hidden] },
      { name: `${p}mlp.gate_proj.weight`, shape: [m.intermediate, m.hidden] },
      { name: `${p}mlp.up_proj.weight`, shape: [m.intermediate, m.hidden] },
      { name: `${p}mlp.down_proj.weight`, shape: [m.hidden, m.intermediate] },
    );
  }
  list.push({ name: 'model.norm.weight', shape: [m.hidden] });
  if (!m.tieWordEmbeddings) list.push({ name: 'lm_head.weight', shape: [m.vocab, m.hidden] });
  return list;
}

/**
 * RoPE inverse frequencies (headDim / 2 of them), with Llama-3's scaling
 * when the config has it: long wavelengths divided by `factor`, short ones
 * kept, a smooth blend between (as transformers' _compute_llama3_parameters).
 */
export function ropeFrequencies(m) {
  const half = m.headDim / 2;
  const out = new Float64Array(half);
  for (let i = 0; i < half; i++) {
    let f = 1 / m.ropeTheta ** ((2 * i) / m.headDim);
    const s = m.ropeScaling;
    if (s) {
      const wavelength = (2 * Math.PI) / f;
      const low = s.originalMaxPositions / s.lowFreqFactor, high = s.originalMaxPositions / s.highFreqFactor;
      if (wavelength > low) f /= s.factor;
      else if (wavelength >= high) {
        const smooth = (s.originalMaxPositions / wavelength - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
        f = (1 - smooth) * (f / s.factor) + smooth * f;
      }
    }
    out[i] = f;
  }
  return out;
}
