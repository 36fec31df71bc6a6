#!/usr/bin/env python3
"""Write a random-weight LLaMA-7B-shaped Hugging Face checkpoint in bfloat16, streaming.

    python tools/make_7b_checkpoint.py OUT_DIR [--shard-gb 2.0] [--seed 0] [--scale-down] [--verify]

Full size: 6.74e9 parameters = 13.5 GB in 7 shards of <= 2 GB:
  config.json (LlamaForCausalLM, transformers-4 layout: top-level rope_theta, torch_dtype),
  generation_config.json, model-0000k-of-0000N.safetensors, model.safetensors.index.json.
Key names are the HF ones (model.embed_tokens.weight, model.layers.{i}.self_attn.{q,k,v,o}_proj.weight,
model.layers.{i}.mlp.{gate,up,down}_proj.weight, model.layers.{i}.{input,post_attention}_layernorm.weight,
model.norm.weight, lm_head.weight).

Memory stays around 100 MB: the safetensors headers are written by hand (u64 LE header length,
JSON header padded with spaces to a multiple of 8, then the data), and the data of every matrix is
copied in 8 MiB chunks from one pool of 32M normal(0, 0.02) values converted to bfloat16 bit
patterns (top 16 bits of the float32, round-to-nearest-even), each chunk from a random offset.
The values are realistic, not independent.  Norm weights are bfloat16 ones.

--scale-down divides hidden/intermediate/vocab/heads/max_positions by 16 and the layers by 8
(hidden 256, intermediate 688, 2 heads of 128, 4 layers, vocab 2000) for testing the script;
--verify then loads the result with safetensors and transformers and checks it.
Needs only numpy (and torch + transformers + safetensors for --verify).
"""

import argparse
import json
import os
import struct
import sys
import time

import numpy as np

POOL = 32 * 1024 * 1024  # elements
CHUNK = 4 * 1024 * 1024  # elements per write (8 MiB)
BF16_ONE = 0x3F80


def dims(scale_down):
    d = dict(hidden=4096, inter=11008, layers=32, heads=32, kv=32, vocab=32000, maxpos=4096)
    if scale_down:
        d = dict(hidden=4096 // 16, inter=11008 // 16, layers=32 // 8, heads=32 // 16, kv=32 // 16,
                 vocab=32000 // 16, maxpos=4096 // 16)
    return d


def tensor_list(d):
    h, i, hd = d["hidden"], d["inter"], d["hidden"] // d["heads"]
    kvd = d["kv"] * hd
    ts = [("model.embed_tokens.weight", [d["vocab"], h], "rand")]
    for L in range(d["layers"]):
        p = f"model.layers.{L}."
        ts += [
            (p + "input_layernorm.weight", [h], "ones"),
            (p + "self_attn.q_proj.weight", [h, h], "rand"),
            (p + "self_attn.k_proj.weight", [kvd, h], "rand"),
            (p + "self_attn.v_proj.weight", [kvd, h], "rand"),
            (p + "self_attn.o_proj.weight", [h, h], "rand"),
            (p + "post_attention_layernorm.weight", [h], "ones"),
            (p + "mlp.gate_proj.weight", [i, h], "rand"),
            (p + "mlp.up_proj.weight", [i, h], "rand"),
            (p + "mlp.down_proj.weight", [h, i], "rand"),
        ]
    ts += [("model.norm.weight", [h], "ones"), ("lm_head.weight", [d["vocab"], h], "rand")]
    return ts


def nbytes(shape):
    n = 2
    for s in shape:
        n *= s
    return n


def make_pool(seed):
    rng = np.random.default_rng(seed)
    pool = np.empty(POOL, dtype=np.uint16)
    step = 4 * 1024 * 1024
    for a in range(0, POOL, step):
        f = rng.standard_normal(min(step, POOL - a), dtype=np.float32) * np.float32(0.02)
        u = f.view(np.uint32)
        # round to nearest even on the dropped 16 bits (no NaN/Inf in the pool)
        r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        pool[a:a + f.size] = r.astype(np.uint16)
    return pool


def plan_shards(ts, shard_bytes):
    shards, cur, cur_b = [], [], 0
    for t in ts:
        b = nbytes(t[1])
        if cur and cur_b + b > shard_bytes:
            shards.append(cur)
            cur, cur_b = [], 0
        cur.append(t)
        cur_b += b
    if cur:
        shards.append(cur)
    return shards


def header_bytes(tensors):
    hdr = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape, _kind in tensors:
        b = nbytes(shape)
        hdr[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + b]}
        off += b
    js = json.dumps(hdr, separators=(",", ":")).encode("utf-8")
    js += b" " * ((-len(js)) % 8)
    return struct.pack("<Q", len(js)) + js, off


def write_config(out, d):
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
        "hidden_act": "silu",
        "hidden_size": d["hidden"],
        "intermediate_size": d["inter"],
        "initializer_range": 0.02,
        "max_position_embeddings": d["maxpos"],
        "mlp_bias": False,
        "num_attention_heads": d["heads"],
        "num_hidden_layers": d["layers"],
        "num_key_value_heads": d["kv"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.0",
        "use_cache": True,
        "vocab_size": d["vocab"],
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                   "transformers_version": "4.46.0"}, f, indent=2)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="max shard size in GB (1e9 bytes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale-down", action="store_true")
    ap.add_argument("--verify", action="store_true", help="load the result with safetensors + transformers")
    args = ap.parse_args()

    d = dims(args.scale_down)
    ts = tensor_list(d)
    total = sum(nbytes(s) for _n, s, _k in ts)
    shard_bytes = int(args.shard_gb * 1e9)
    if args.scale_down:
        shard_bytes = max(1, min(shard_bytes, total // 3 + 1))  # still get several shards
    shards = plan_shards(ts, shard_bytes)
    nsh = len(shards)
    os.makedirs(args.out_dir, exist_ok=True)
    print(f"{sum(np.prod(s) for _n, s, _k in ts):,} parameters, {total / 1e9:.2f} GB bf16, {nsh} shards "
          f"-> {args.out_dir}", flush=True)

    t0 = time.time()
    pool = make_pool(args.seed)
    ones = np.full(max(d["hidden"], 1), BF16_ONE, dtype=np.uint16)
    rng = np.random.default_rng(args.seed + 1)
    print(f"pool of {POOL:,} bf16 values ready in {time.time() - t0:.1f}s", flush=True)

    weight_map = {}
    written = 0
    next_report = 1e9
    t0 = time.time()
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{nsh:05d}.safetensors"
        hdr, data_len = header_bytes(tensors)
        path = os.path.join(args.out_dir, fname)
        with open(path, "wb", buffering=16 * 1024 * 1024) as f:
            f.write(hdr)
            for name, shape, kind in tensors:
                weight_map[name] = fname
                n = nbytes(shape) // 2
                if kind == "ones":
                    assert n <= ones.size
                    f.write(ones[:n])
                else:
                    left = n
                    while left > 0:
                        c = min(CHUNK, left)
                        o = int(rng.integers(0, POOL - c + 1))
                        f.write(pool[o:o + c])
                        left -= c
                written += 2 * n
                if written >= next_report:
                    el = time.time() - t0
                    print(f"  {written / 1e9:6.2f} / {total / 1e9:.2f} GB  {written / 1e9 / max(el, 1e-9):.2f} GB/s",
                          flush=True)
                    next_report += 1e9
        assert os.path.getsize(path) == len(hdr) + data_len, path
    with open(os.path.join(args.out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        f.write("\n")
    write_config(args.out_dir, d)
    el = time.time() - t0
    print(f"done: {written / 1e9:.2f} GB in {el:.1f}s ({written / 1e9 / max(el, 1e-9):.2f} GB/s)", flush=True)

    if args.verify:
        verify(args.out_dir, ts)


def verify(out, ts):
    import torch
    import transformers
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    idx = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    seen = {}
    for fname in sorted(set(idx["weight_map"].values())):
        with safe_open(os.path.join(out, fname), "pt") as f:
            for k in f.keys():
                seen[k] = f.get_tensor(k)
    for name, shape, kind in ts:
        t = seen[name]
        assert t.dtype == torch.bfloat16 and list(t.shape) == shape, (name, t.dtype, t.shape)
        if kind == "ones":
            assert bool((t == 1).all()), name
        else:
            s = t.float().std().item()
            assert 0.015 < s < 0.025 and bool(torch.isfinite(t).all()), (name, s)
    print(f"safetensors: {len(seen)} tensors, dtypes/shapes/values OK "
          f"(std of embed {seen['model.embed_tokens.weight'].float().std().item():.4f})")
    m = LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    sd = m.state_dict()
    for name, _s, _k in ts:
        assert torch.equal(sd[name], seen[name]), name
    with torch.no_grad():
        logits = m(torch.tensor([[1, 5, 9, 300]])).logits
    assert bool(torch.isfinite(logits.float()).all())
    print(f"transformers: loaded {type(m).__name__}, config rope={m.config.rope_parameters}, "
          f"all {len(ts)} weights identical, logits {tuple(logits.shape)} finite")


if __name__ == "__main__":
    sys.exit(main())
