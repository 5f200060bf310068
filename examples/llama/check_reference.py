#!/usr/bin/env python3
"""A second Llama implementation, in NumPy, for the files make-weights.mjs writes.

It shares no code with the JavaScript one: it reads config.json and
*.safetensors as the format defines them (an 8-byte little-endian header
length, a JSON header, raw little-endian tensors) and runs the forward pass
the way Hugging Face transformers' LlamaForCausalLM does (rotate_half RoPE,
Llama-3 rope scaling as _compute_llama3_parameters, grouped-query heads
h // (heads / kv_heads), RMSNorm in float32, SiLU-gated MLP), in float32.

Given reference.json's prompt and greedy tokens, one causal pass over
prompt + tokens gives, at each step, the next token's logits: its argmax must
be the token reference.json lists and the logit of that token the one it
lists. Prints a JSON summary; exit 0 when everything matches, 1 when not,
2 on bad input.

With --transformers the logits come from Hugging Face transformers itself
(LlamaForCausalLM.from_pretrained(DIR) in float32 on the CPU, eager
attention) instead of the NumPy pass: the files then load unchanged in the
implementation the format is defined by.

    python3 examples/llama/check_reference.py DIR [--tolerance 1e-3] [--transformers]
"""
import json
import math
import os
import struct
import sys

try:
    import numpy as np
except ImportError:
    print("check_reference.py needs NumPy (pip install numpy)", file=sys.stderr)
    sys.exit(2)


def read_safetensors(path):
    """name -> float32 array, from a file in the safetensors format."""
    with open(path, "rb") as f:
        data = f.read()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    body = data[8 + header_len :]
    tensors = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        start, end = t["data_offsets"]
        raw = body[start:end]
        if t["dtype"] == "F16":
            values = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        elif t["dtype"] == "BF16":
            values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif t["dtype"] == "F32":
            values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        else:
            raise ValueError(f"{name}: dtype {t['dtype']} is not a weight type")
        tensors[name] = values.reshape(t["shape"])
    return tensors


def inverse_frequencies(config, head_dim):
    theta = config.get("rope_theta", 10000.0)
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    scaling = config.get("rope_scaling")
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not checked here")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return np.where(medium, blended, scaled)


def rms_norm(x, weight, eps):
    return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def forward(config, w, ids):
    """Logits (len(ids) x vocab) of a causal pass over ids."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    eps = config.get("rms_norm_eps", 1e-6)
    n = len(ids)
    angles = np.outer(np.arange(n, dtype=np.float64), inverse_frequencies(config, head_dim))
    cos = np.cos(np.concatenate([angles, angles], axis=-1)).astype(np.float32)[:, None, :]
    sin = np.sin(np.concatenate([angles, angles], axis=-1)).astype(np.float32)[:, None, :]
    causal = np.triu(np.full((n, n), -np.inf, dtype=np.float32), k=1)
    h = w["model.embed_tokens.weight"][np.asarray(ids)]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        x = rms_norm(h, w[p + "input_layernorm.weight"], eps)
        q = (x @ w[p + "self_attn.q_proj.weight"].T).reshape(n, heads, head_dim)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).reshape(n, kv_heads, head_dim)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).reshape(n, kv_heads, head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = np.empty((n, heads, head_dim), dtype=np.float32)
        for head in range(heads):
            kv = head // (heads // kv_heads)
            scores = q[:, head, :] @ k[:, kv, :].T / math.sqrt(head_dim) + causal
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            out[:, head, :] = (scores / scores.sum(axis=-1, keepdims=True)) @ v[:, kv, :]
        h = h + out.reshape(n, heads * head_dim) @ w[p + "self_attn.o_proj.weight"].T
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        gate = x @ w[p + "mlp.gate_proj.weight"].T
        up = x @ w[p + "mlp.up_proj.weight"].T
        h = h + ((gate / (1 + np.exp(-gate))) * up) @ w[p + "mlp.down_proj.weight"].T
    h = rms_norm(h, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if config.get("tie_word_embeddings") else w["lm_head.weight"]
    return h @ head.T


def transformers_forward(folder, ids):
    """Logits (len(ids) x vocab) from transformers' LlamaForCausalLM, float32, CPU."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids], dtype=torch.long)).logits[0]
    return logits.float().numpy(), f"transformers {transformers.__version__} LlamaForCausalLM"


def main(argv):
    use_transformers = "--transformers" in argv
    args = [a for a in argv if not a.startswith("--")]
    tolerance = 1e-3
    if "--tolerance" in argv:
        tolerance = float(argv[argv.index("--tolerance") + 1])
        args.remove(argv[argv.index("--tolerance") + 1])
    if len(args) != 1 or "--help" in argv:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    folder = args[0]
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(folder, "reference.json")) as f:
        reference = json.load(f)
    prompt, tokens, want = reference["prompt"], reference["greedyTokens"], reference["greedyLogits"]
    if use_transformers:
        logits, implementation = transformers_forward(folder, prompt + tokens[:-1])
    else:
        weights = {}
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                weights.update(read_safetensors(os.path.join(folder, name)))
        logits, implementation = forward(config, weights, prompt + tokens[:-1]), "NumPy (this file)"
    logits = logits[len(prompt) - 1 :]
    picks = [int(np.argmax(row)) for row in logits]
    got = [float(row[t]) for row, t in zip(logits, tokens)]
    margins = [float(np.sort(row)[-1] - np.sort(row)[-2]) for row in logits]
    worst = max(abs(a - b) for a, b in zip(got, want))
    same = picks == tokens
    print(json.dumps({
        "implementation": implementation,
        "steps": len(tokens),
        "sameTokens": same,
        "firstDifferentStep": next((i for i, (a, b) in enumerate(zip(picks, tokens)) if a != b), None),
        "maxLogitDifference": worst,
        "smallestMargin": min(margins),
        "tolerance": tolerance,
    }))
    return 0 if same and worst <= tolerance else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
