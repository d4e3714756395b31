#!/usr/bin/env python3
"""llama_ref.py - an independent NumPy Llama forward pass, the oracle of test_llama.

usage: llama_ref.py MODEL_DIR TOKEN[,TOKEN...]

Reads MODEL_DIR/config.json and its safetensors (model.safetensors, or the shards
named by model.safetensors.index.json) with its own small parser (json +
numpy.frombuffer; bf16 widened through a uint16 -> uint32 shift), runs the whole
token sequence at once in float64 with a causal mask (Hugging Face's
LlamaForCausalLM: RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU),
and prints {"logits": [[vocab floats] for every position]} as JSON on stdout.

It shares no code with the C implementation: the C side runs token by token
over a KV cache in float32; agreement of the two is the test.
"""
import json
import os
import struct
import sys

import numpy as np


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    data = raw[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        buf = data[begin:end]
        shape = tuple(info["shape"])
        dtype = info["dtype"]
        if dtype == "F32":
            a = np.frombuffer(buf, dtype="<f4")
        elif dtype == "F16":
            a = np.frombuffer(buf, dtype="<f2")
        elif dtype == "BF16":
            a = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise SystemExit("%s: tensor %s: unsupported dtype %s" % (path, name, dtype))
        out[name] = a.astype(np.float64).reshape(shape)
    return out


def read_weights(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        weights = {}
        for shard in sorted(set(weight_map.values())):
            weights.update(read_safetensors(os.path.join(model_dir, shard)))
        return weights
    return read_safetensors(os.path.join(model_dir, "model.safetensors"))


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, positions, theta):
    # x: [tokens][heads][head_dim]; pairs (i, i + head_dim/2)
    d = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # [d/2]
    ang = positions[:, None] * inv_freq[None, :]  # [tokens][d/2]
    cos = np.cos(ang)[:, None, :]
    sin = np.sin(ang)[:, None, :]
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def forward(cfg, w, tokens):
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or hidden // heads
    eps = cfg.get("rms_norm_eps", 1e-6)
    theta = cfg.get("rope_theta", 10000.0)
    n = len(tokens)
    pos = np.arange(n, dtype=np.float64)
    mask = np.triu(np.full((n, n), -np.inf), k=1)  # [query][key]

    x = w["model.embed_tokens.weight"][np.array(tokens)]  # [n][hidden]
    for l in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % l
        h = rmsnorm(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(n, heads, head_dim)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(n, kv_heads, head_dim)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(n, kv_heads, head_dim)
        q = rope(q, pos, theta)
        k = rope(k, pos, theta)
        rep = heads // kv_heads
        k = np.repeat(k, rep, axis=1)  # head h uses kv head h // rep
        v = np.repeat(v, rep, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head_dim) + mask[None]
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        att = np.einsum("hqk,khd->qhd", probs, v).reshape(n, heads * head_dim)
        x = x + att @ w[p + "self_attn.o_proj.weight"].T
        h = rmsnorm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rmsnorm(x, w["model.norm.weight"], eps)
    lm_head = w.get("lm_head.weight")
    if lm_head is None or cfg.get("tie_word_embeddings", False) and "lm_head.weight" not in w:
        lm_head = w["model.embed_tokens.weight"]
    return x @ lm_head.T  # [n][vocab]


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    model_dir = sys.argv[1]
    tokens = [int(t) for t in sys.argv[2].split(",") if t]
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    logits = forward(cfg, read_weights(model_dir), tokens)
    json.dump({"logits": logits.tolist()}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
