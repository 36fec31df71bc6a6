#!/usr/bin/env python3
"""Generate tiny random LlamaForCausalLM fixtures (HF transformers layout) for msbnb's loader tests.

Writes tests/fixtures/llama/<case>/ (relative to the repo root, or --out DIR):
  plain         fp32, 4 kv heads, untied, rope_theta 10000
  plain_tf4     plain's files, config.json rewritten in the transformers-4 layout
  gqa_tied      fp32, 2 kv heads, tie_word_embeddings, rope_theta 500000
  sharded_bf16  plain architecture (other seed) in bf16, saved in >= 2 shards + index
  bnb_nf4       plain's weights, quantized by bitsandbytes nf4 + double quant (compute fp32)
  bnb_int8      plain's weights, quantized by bitsandbytes LLM.int8 (threshold 6.0)
each with expected.safetensors: input_ids int64 [2,7], logits float32 [2,7,96],
greedy int64 [1,15] (prompt row 0 + 8 greedy tokens).

Usage:  /work/venv/bin/python tools/make_llama_fixtures.py [--out DIR]
Needs:  torch, transformers (5.x), bitsandbytes (0.50.x), safetensors.
"""

import argparse
import json
import os
import shutil
import sys
import warnings

import torch

torch.set_num_threads(1)

import bitsandbytes  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()

INPUT_IDS = torch.tensor([[5, 17, 33, 8, 91, 40, 3], [60, 2 + 10, 77, 19, 45, 88, 23]], dtype=torch.int64)

SEED_PLAIN = 1001
SEED_GQA = 2002
SEED_BF16 = 3003


def make_config(num_kv_heads, tie, rope_theta):
    return LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )


def build_model(seed, num_kv_heads, tie, rope_theta):
    torch.manual_seed(seed)
    cfg = make_config(num_kv_heads, tie, rope_theta)
    model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    # Replace weights so the logits are not degenerate (deterministic module order).
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(seed + 7)
    seen = set()
    with torch.no_grad():
        for _name, m in model.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                w = m.weight
                if id(w) in seen:  # tied lm_head
                    continue
                seen.add(id(w))
                w.copy_(torch.randn(w.shape, generator=g) * 0.2)
            elif isinstance(m, LlamaRMSNorm):
                w = m.weight
                w.copy_(1.0 + 0.1 * torch.randn(w.shape, generator=g))
    if tie:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.eval()
    return model


@torch.no_grad()
def expected_outputs(model):
    model.eval()
    logits = model(INPUT_IDS).logits.float().contiguous()
    greedy = model.generate(
        INPUT_IDS[:1],
        attention_mask=torch.ones_like(INPUT_IDS[:1]),
        do_sample=False,
        max_new_tokens=8,
        min_new_tokens=8,
        eos_token_id=None,
        pad_token_id=0,
    ).to(torch.int64).contiguous()
    assert logits.shape == (2, 7, 96), logits.shape
    assert greedy.shape == (1, 15), greedy.shape
    return {"input_ids": INPUT_IDS.clone(), "logits": logits, "greedy": greedy}


@torch.no_grad()
def check_greedy_nocache(model, greedy):
    """Greedy continuation recomputed without a KV cache; returns True if identical."""
    ids = greedy[:, :7].clone()
    for _ in range(8):
        nxt = model(ids, use_cache=False).logits[:, -1, :].float().argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return torch.equal(ids, greedy)


def save_expected(d, exp):
    save_file(exp, os.path.join(d, "expected.safetensors"), metadata={"format": "pt"})


def report(case, d, exp, model):
    files = sorted(os.listdir(d))
    size = sum(os.path.getsize(os.path.join(d, f)) for f in files)
    same = check_greedy_nocache(model, exp["greedy"])
    print(f"[{case}] {size} bytes, files={files}")
    print(f"    greedy={exp['greedy'].tolist()[0]} (no-cache recompute identical: {same})")
    print(f"    logits[0,0,:4]={exp['logits'][0, 0, :4].tolist()}")


def rewrite_tf4(cfg_path):
    with open(cfg_path) as f:
        cfg = json.load(f)
    rp = cfg.pop("rope_parameters", None)
    theta = 10000.0
    if isinstance(rp, dict) and "rope_theta" in rp:
        theta = float(rp["rope_theta"])
    if "rope_theta" in cfg:
        theta = float(cfg.pop("rope_theta"))
    cfg.pop("rope_scaling", None)
    out = {}
    for k, v in cfg.items():
        if k == "dtype":
            out["torch_dtype"] = v
        else:
            out[k] = v
    out["rope_theta"] = theta
    out["rope_scaling"] = None
    out["transformers_version"] = "4.46.0"
    out = dict(sorted(out.items()))
    with open(cfg_path, "w") as f:
        json.dump(out, f, indent=2, sort_keys=True)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "llama"))
    ap.add_argument("--skip-int8", action="store_true")
    args = ap.parse_args()
    root = os.path.abspath(args.out)
    os.makedirs(root, exist_ok=True)
    notes = []

    def fresh(case):
        d = os.path.join(root, case)
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d)
        return d

    # ---- plain
    d_plain = fresh("plain")
    m = build_model(SEED_PLAIN, 4, False, 10000)
    m.save_pretrained(d_plain, safe_serialization=True)
    exp = expected_outputs(m)
    save_expected(d_plain, exp)
    report("plain", d_plain, exp, m)

    # ---- plain_tf4
    d_tf4 = fresh("plain_tf4")
    for f in sorted(os.listdir(d_plain)):
        shutil.copyfile(os.path.join(d_plain, f), os.path.join(d_tf4, f))
    rewrite_tf4(os.path.join(d_tf4, "config.json"))
    # sanity: transformers still loads the tf4 layout and gives the same logits
    m4 = LlamaForCausalLM.from_pretrained(d_tf4, attn_implementation="eager").eval()
    with torch.no_grad():
        l4 = m4(INPUT_IDS).logits.float()
    print(f"[plain_tf4] reload max|dlogits| = {(l4 - exp['logits']).abs().max().item():.3g}, "
          f"rope_theta seen by transformers = {m4.config.rope_parameters}")
    del m4

    # ---- gqa_tied
    d = fresh("gqa_tied")
    mg = build_model(SEED_GQA, 2, True, 500000)
    mg.save_pretrained(d, safe_serialization=True)
    e = expected_outputs(mg)
    save_expected(d, e)
    report("gqa_tied", d, e, mg)

    # ---- sharded_bf16
    d = fresh("sharded_bf16")
    mb = build_model(SEED_BF16, 4, False, 10000)
    mb = mb.to(torch.bfloat16)
    mb.save_pretrained(d, safe_serialization=True, max_shard_size="60KB")
    shards = [f for f in os.listdir(d) if f.endswith(".safetensors")]
    assert len(shards) >= 2 and os.path.exists(os.path.join(d, "model.safetensors.index.json")), shards
    # fp32 math on the bf16-rounded weights.  Not mb.float(): model.to(bfloat16) also rounds the
    # non-persistent RoPE inv_freq buffer, which a loader recomputes in fp32 from rope_theta.
    sd = {k: v.float() for k, v in mb.state_dict().items()}
    mb = LlamaForCausalLM(mb.config)
    mb.config._attn_implementation = "eager"
    mb.load_state_dict(sd, strict=True)
    mb = mb.float().eval()
    assert mb.model.rotary_emb.inv_freq.dtype == torch.float32
    e = expected_outputs(mb)
    save_expected(d, e)
    report("sharded_bf16", d, e, mb)

    # ---- bnb_nf4
    d = fresh("bnb_nf4")
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.float32)
    mq = LlamaForCausalLM.from_pretrained(d_plain, quantization_config=qc, device_map="cpu",
                                          attn_implementation="eager", dtype=torch.float32).eval()
    # bitsandbytes 0.50.2 on an AVX512-BF16 CPU repacks Linear4bit weights at the first eval forward
    # (_convert_weight_packed_for_cpu), which asserts out_features % 32 == 0 and fails for
    # intermediate_size 112.  Use the portable path (dequantize_4bit + F.linear in fp32) everywhere.
    n4 = 0
    for mod in mq.modules():
        if isinstance(mod, bitsandbytes.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False
            n4 += 1
    print(f"[bnb_nf4] {n4} Linear4bit modules (AVX512-BF16 repacking disabled)")
    mq.save_pretrained(d, safe_serialization=True)
    e = expected_outputs(mq)
    save_expected(d, e)
    report("bnb_nf4", d, e, mq)
    print(f"    max|logits - plain logits| = {(e['logits'] - exp['logits']).abs().max().item():.4g}")
    del mq

    # ---- bnb_int8
    if not args.skip_int8:
        d = fresh("bnb_int8")
        try:
            qc8 = BitsAndBytesConfig(load_in_8bit=True)
            m8 = LlamaForCausalLM.from_pretrained(d_plain, quantization_config=qc8, device_map="cpu",
                                                  attn_implementation="eager", dtype=torch.float32).eval()
            m8.save_pretrained(d, safe_serialization=True)
            e = expected_outputs(m8)
            save_expected(d, e)
            report("bnb_int8", d, e, m8)
            print(f"    max|logits - plain logits| = {(e['logits'] - exp['logits']).abs().max().item():.4g}")
        except Exception as ex:  # noqa: BLE001
            shutil.rmtree(d, ignore_errors=True)
            notes.append(f"bnb_int8 skipped: {type(ex).__name__}: {ex}")
            print(notes[-1])

    # ---- README
    write_readme(root, notes)
    total = 0
    for dp, _dn, fn in os.walk(root):
        total += sum(os.path.getsize(os.path.join(dp, f)) for f in fn)
    print(f"total size of {root}: {total} bytes")


def write_readme(root, notes):
    text = f"""# tests/fixtures/llama

Tiny random `LlamaForCausalLM` checkpoints in the Hugging Face layout, written by
`tools/make_llama_fixtures.py` (regenerate: `/work/venv/bin/python tools/make_llama_fixtures.py`).

Architecture (all cases): vocab_size 96, hidden_size 64, intermediate_size 112, 2 layers,
4 attention heads (head_dim 16), max_position_embeddings 64, rms_norm_eps 1e-5, bos 1, eos 2, silu,
no biases, eager attention.  Weights: transformers init with `torch.manual_seed(seed)`, then every
Linear/Embedding weight replaced by `randn*0.2` and every RMSNorm weight by `1+0.1*randn`
(a `torch.Generator` seeded with `seed+7`, module order of `named_modules()`).

| case | contents |
|---|---|
| `plain` | fp32, num_key_value_heads 4, untied, rope_theta 10000 (seed {SEED_PLAIN}); transformers-5 config (`rope_parameters`, `dtype`) |
| `plain_tf4` | plain's files; config.json rewritten to the transformers-4 layout: top-level `rope_theta` 10000.0, `rope_scaling` null, no `rope_parameters`, `torch_dtype` instead of `dtype`, `transformers_version` "4.46.0". Same expected outputs as plain |
| `gqa_tied` | fp32, num_key_value_heads 2, tie_word_embeddings true (no `lm_head.weight` in the file), rope_theta 500000 (seed {SEED_GQA}) |
| `sharded_bf16` | plain architecture, seed {SEED_BF16}, `model.to(torch.bfloat16)`, `save_pretrained(max_shard_size="60KB")`: several `model-0000k-of-0000N.safetensors` + `model.safetensors.index.json`. Expected outputs = fp32 math on the bf16-rounded weights (the bf16 state dict upcast and loaded into a fresh fp32 model, so the RoPE inv_freq buffer stays fp32; equal to `from_pretrained(dir, dtype=torch.float32)`) |
| `bnb_nf4` | plain's weights loaded with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)`, `device_map="cpu"`, saved by `save_pretrained` (Params4bit + quant_state tensors). Expected outputs = the quantized model's, computed with bitsandbytes' portable CPU path (`support_avx512bf16_for_cpu = False` on each Linear4bit: dequantize_4bit to fp32, then `F.linear`); bnb 0.50.2's AVX512-BF16 repacking asserts out_features % 32 == 0 and fails on 112 |
| `bnb_int8` | plain's weights loaded with `BitsAndBytesConfig(load_in_8bit=True)` (llm_int8_threshold 6.0), saved by `save_pretrained` (int8 `weight` + `SCB`). Expected outputs = the quantized model's |

`expected.safetensors` in every case:
- `input_ids` int64 [2, 7] = `[[5,17,33,8,91,40,3],[60,12,77,19,45,88,23]]`
- `logits` float32 [2, 7, 96] = `model(input_ids).logits` (eval, no_grad, no attention mask)
- `greedy` int64 [1, 15] = `model.generate(input_ids[:1], do_sample=False, max_new_tokens=8,
  min_new_tokens=8, eos_token_id=None, pad_token_id=0)` (prompt + 8 tokens; for every case except
  bnb_int8 identical to a no-cache argmax loop)

Made with torch {torch.__version__} (CPU, 1 thread), transformers {transformers.__version__},
bitsandbytes {bitsandbytes.__version__}, safetensors {safetensors.__version__}.
Checks done when they were made: plain_tf4 reloads in transformers with identical logits; for
bnb_nf4 an fp32 model whose Linear weights are `dequantize_4bit` of the stored tensors gives
bit-identical logits (max |diff| 0.0).  For bnb_int8 the greedy row comes from `generate` with the KV
cache; bitsandbytes' LLM.int8 casts activations to float16 and picks outlier columns (|x| >= 6) over all
rows of the current input, so a row's result depends on the other rows of the same call, and a no-cache re-run over the whole sequence gives (slightly) different
logits and here also a different greedy continuation -- compare cached decoding with cached decoding.
Logits of the quantized cases come from the bitsandbytes CPU kernels, so compare them with a
tolerance (float32 summation order differs between implementations).
"""
    if notes:
        text += "\nNotes:\n" + "".join(f"- {n}\n" for n in notes)
    with open(os.path.join(root, "README.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())
