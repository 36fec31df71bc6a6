#!/usr/bin/env python3
"""Write the PEFT adapter fixtures of tests/fixtures/peft/ with the real Hugging Face `peft` and
`transformers` (tests/lora/peft_test.cpp loads them into msbnb's LoRA layers).

The model: a tiny LlamaForCausalLM built from a LlamaConfig (hidden 32, 2 layers, 4 heads,
2 key/value heads, so k_proj / v_proj are 32 -> 16; intermediate 64, vocab 32, attention_bias
True so q/k/v/o have biases, mlp_bias False) under torch.manual_seed(SEED), initializer_range 0.2,
biases set to N(0, 0.1) (transformers zeroes them). Its files:

  base/config.json, base/model.safetensors   the base model (save_pretrained): every weight
                                             under its transformers name, the LoRA-free model
                                             a later LLaMA loader can also use
  <case>/adapter_model.safetensors           PEFT's save_pretrained, unchanged
  <case>/adapter_config.json                 PEFT's save_pretrained, unchanged
  <case>/expected.safetensors                per targeted module path p: `x.<p>` a fixed input
                                             [2, in] (float32, torch.Generator seeded from the
                                             case and path) and `y.<p>` PEFT's output of that
                                             LoRA layer, module.forward(x) in eval mode, float32;
                                             `input_ids` [1, 8] and `logits` [1, 8, 32] of the
                                             whole PeftModel in eval mode (for the LLaMA issue)
  index.json                                 versions, the model config, per case its PEFT
                                             arguments, the module paths with in / out / bias /
                                             r / alpha / scaling, and the saved keys

task_type "CAUSAL_LM" for qv_r4 and all_linear_r2 (PeftModelForCausalLM), none for the others
(PeftModel; PEFT then writes an auto_mapping field). Cases (LoRA weights: init_lora_weights=False, so B is random too and outputs differ from the
base; a few are then set by hand where a case needs it):
  qv_r4           target_modules ["q_proj", "v_proj"], r 4, alpha 8
  rslora_r8_bias  ["q_proj", "k_proj", "v_proj", "o_proj"], r 8, alpha 16, use_rslora,
                  lora_dropout 0.1 (inactive in eval), bias "all": the q_proj biases are moved
                  by +0.25 after wrapping, so the saved biases differ from the base's
  all_linear_r2   target_modules "all-linear", r 2, alpha 4 (what PEFT writes into the config
                  for it is recorded in index.json)
  regex_pattern   target_modules r".*\\.layers\\.1\\.(mlp\\.(up|down)_proj|self_attn\\.q_proj)"
                  (a regex string), r 3, alpha 6, rank_pattern {"down_proj": 5},
                  alpha_pattern {"q_proj": 2}

Deterministic (fixed seeds; README.md files of save_pretrained are removed, they are cards).
Usage: /work/venv/bin/python tools/make_peft_fixtures.py [--out DIR]
"""

import argparse
import json
import os
import shutil
import sys
import warnings
import zlib

import torch
from safetensors.torch import save_file

SEED = 20261202
NAME = "msbnb/tiny-llama-fixture"
HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, VOCAB = 32, 2, 4, 2, 64, 32

CASES = {
    "qv_r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    "rslora_r8_bias": dict(
        r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.1, bias="all",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "all_linear_r2": dict(r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM"),
    "regex_pattern": dict(
        r=3, lora_alpha=6,
        target_modules=r".*\.layers\.1\.(mlp\.(up|down)_proj|self_attn\.q_proj)",
        rank_pattern={"down_proj": 5}, alpha_pattern={"q_proj": 2}),
}


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, intermediate_size=INTER, vocab_size=VOCAB,
        max_position_embeddings=64, attention_bias=True, mlp_bias=False,
        initializer_range=0.2, tie_word_embeddings=False, torch_dtype="float32")


def tiny_model():
    """The base model, deterministic. Also used by tools/check_peft_interop.py."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(tiny_config())
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.config._name_or_path = NAME
    model.name_or_path = NAME  # what PEFT writes as base_model_name_or_path
    return model.eval()


def load_base(base_dir):
    """The base model from base/ (what the fixtures were made with)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    model.config._name_or_path = NAME
    model.name_or_path = NAME  # what PEFT writes as base_model_name_or_path
    return model.eval()


def input_for(case, path, n_in):
    g = torch.Generator().manual_seed(zlib.crc32(f"{case}/{path}".encode()))
    return torch.randn(2, n_in, generator=g)


def input_ids():
    g = torch.Generator().manual_seed(SEED + 2)
    return torch.randint(0, VOCAB, (1, 8), generator=g)


def lora_modules(peft_model):
    """(path without the PeftModel prefix, module) of every LoRA layer."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, m in peft_model.named_modules():
        if isinstance(m, LoraLayer):
            assert name.startswith("base_model.model."), name
            out.append((name[len("base_model.model."):], m))
    return out


def versions():
    import peft
    import safetensors
    import transformers

    return {
        "python": sys.version.split()[0], "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def make_case(out, case, kwargs, base_dir):
    from peft import LoraConfig, get_peft_model

    model = load_base(base_dir)
    cfg = LoraConfig(lora_dropout=kwargs.pop("lora_dropout", 0.0), init_lora_weights=False, **kwargs)
    torch.manual_seed(zlib.crc32(case.encode()))
    pm = get_peft_model(model, cfg)
    if case == "rslora_r8_bias":
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if name.endswith("q_proj.base_layer.bias"):
                    p.add_(0.25)
    pm.eval()
    d = os.path.join(out, case)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm.save_pretrained(d)
    readme = os.path.join(d, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    expected, modules = {}, []
    with torch.no_grad():
        for path, m in lora_modules(pm):
            base = m.base_layer
            x = input_for(case, path, base.in_features)
            y = m(x)
            expected["x." + path] = x.contiguous()
            expected["y." + path] = y.contiguous()
            a = m.lora_A["default"].weight
            modules.append({
                "path": path, "in": base.in_features, "out": base.out_features,
                "bias": base.bias is not None, "r": m.r["default"],
                "lora_alpha": m.lora_alpha["default"], "scaling": m.scaling["default"],
                "lora_A_shape": list(a.shape),
                "lora_B_shape": list(m.lora_B["default"].weight.shape),
            })
        ids = input_ids()
        expected["input_ids"] = ids
        expected["logits"] = pm(input_ids=ids).logits.contiguous()
    save_file(expected, os.path.join(d, "expected.safetensors"))
    from safetensors import safe_open

    with safe_open(os.path.join(d, "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
        meta = f.metadata()
    with open(os.path.join(d, "adapter_config.json")) as f:
        saved_cfg = json.load(f)
    return {
        "name": case, "peft_arguments": {
            k: sorted(v) if isinstance(v, set) else v for k, v in cfg.to_dict().items()
            if k in kwargs or k in ("r", "lora_alpha", "lora_dropout", "use_rslora", "bias", "init_lora_weights")},
        "saved_target_modules": saved_cfg["target_modules"], "modules": modules,
        "keys": keys, "safetensors_metadata": meta,
        "save_warnings": [str(w.message) for w in caught],
    }


def main():
    # PEFT writes target_modules as list(set): its order is the string hash order. A fixed hash
    # seed makes the files reproducible.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    ap = argparse.ArgumentParser()
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    ap.add_argument("--out", default=os.path.join(root, "tests", "fixtures", "peft"))
    out = ap.parse_args().out
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    base_dir = os.path.join(out, "base")
    tiny_model().save_pretrained(base_dir, safe_serialization=True)
    for f in os.listdir(base_dir):
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(base_dir, f))
    cases = [make_case(out, name, dict(kw), base_dir) for name, kw in CASES.items()]
    index = {"meta": versions(), "seed": SEED, "model_config": tiny_config().to_diff_dict(),
             "cases": cases}
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
        f.write("\n")
    total = 0
    for dirpath, _, files in os.walk(out):
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            total += os.path.getsize(p)
            print(os.path.relpath(p, out), os.path.getsize(p))
    print("total", total)


if __name__ == "__main__":
    main()
