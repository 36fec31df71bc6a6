#!/usr/bin/env python3
"""Load adapters msbnb wrote into Hugging Face PEFT and check PEFT computes what msbnb computed.

Not in CI (it needs the Python venv). First let the C++ test write the files:

  MSBNB_EXPORT_DIR=/tmp/msbnb_peft ./build/release/tests/msbnb_lora_tests --gtest_filter='PeftInterop*'
  /work/venv/bin/python tools/check_peft_interop.py /tmp/msbnb_peft

Every sub-folder of the export folder holds adapter_model.safetensors + adapter_config.json
(msbnb's save_adapter) and msbnb_outputs.safetensors (`x.<path>` inputs, `y.<path>` msbnb's
LoRA-layer outputs in eval mode). For each, the script builds the tiny base model from
tests/fixtures/peft/base (the model the fixtures were made from), loads the folder with
PeftModel.from_pretrained, and checks:
  - no warning or log record from PEFT / transformers while loading (PEFT warns about missing
    adapter keys and unknown config fields): any is a failure, printed;
  - every key of the file is a parameter of the PeftModel, with the file's value (PEFT itself
    ignores unexpected keys silently), biases of bias "all" included;
  - the LoRA layers PEFT created are exactly the modules of msbnb_outputs, with msbnb's r;
  - PEFT's lora_A / lora_B (adapter "default") equal the tensors of msbnb's file, bit for bit;
  - PEFT's output of each LoRA layer on msbnb's x is within the float32 summation bound of
    msbnb's y (tests/lora/peft_test.cpp derives it: 2 (in + r + 4) u T_i, u = 2^-24);
  - the loaded adapter changes the whole model's logits (the adapter is live, not ignored).
Ends with `ALL ADAPTERS MATCH` or a list of failures (exit status 1).
"""

import argparse
import logging
import os
import sys
import warnings

import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_peft_fixtures import input_ids, load_base, lora_modules  # noqa: E402

BASE = os.path.join(HERE, "..", "tests", "fixtures", "peft", "base")


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        if record.levelno >= logging.WARNING:
            self.records.append(f"{record.name}: {record.getMessage()}")


def bound(x, peft_layer, name="default"):
    """(in + r + 4) u T_i for every output (float64)."""
    base = peft_layer.base_layer
    xd = x.double()
    w = base.weight.detach().double()
    a = peft_layer.lora_A[name].weight.detach().double()
    b = peft_layer.lora_B[name].weight.detach().double()
    s = peft_layer.scaling[name]
    t = xd @ a.T
    T = xd.abs() @ w.abs().T + s * ((t.abs() + xd.abs() @ a.abs().T) @ b.abs().T)
    if base.bias is not None:
        T = T + base.bias.detach().double().abs()
    n = base.in_features + peft_layer.r[name] + 4
    return n * 2.0**-24 * T


def check(folder, failures):
    from peft import PeftModel

    name = os.path.basename(folder.rstrip("/"))
    fail = lambda msg: failures.append(f"{name}: {msg}")  # noqa: E731
    ours = load_file(os.path.join(folder, "msbnb_outputs.safetensors"))
    adapter = load_file(os.path.join(folder, "adapter_model.safetensors"))
    paths = sorted(k[2:] for k in ours if k.startswith("x."))

    model = load_base(BASE)
    ids = input_ids()
    with torch.no_grad():
        logits_base = model(input_ids=ids).logits
    handler = Records()
    loggers = [logging.getLogger(n) for n in ("peft", "transformers", "")]
    for lg in loggers:
        lg.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(model, folder)
    for lg in loggers:
        lg.removeHandler(handler)
    complaints = [f"{w.category.__name__}: {w.message}" for w in caught
                  if "is_gradient_checkpointing" not in str(w.message)] + handler.records
    for c in complaints:
        fail(f"loading said: {c}")
    pm.eval()

    # PEFT 0.21.2 warns about missing adapter keys but ignores unexpected ones silently: check
    # that every key of the file names a parameter of the PeftModel (adapter name inserted).
    params = dict(pm.named_parameters())
    for key in adapter:
        k = key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        if k not in params:
            fail(f"{key}: no such parameter in the PeftModel (PEFT ignores it silently)")
        elif not torch.equal(params[k].detach(), adapter[key]):
            fail(f"{key}: PEFT's parameter differs from the file")
    layers = dict(lora_modules(pm))
    if sorted(layers) != paths:
        fail(f"PEFT's LoRA layers {sorted(layers)} != msbnb's {paths}")
    worst = 0.0
    with torch.no_grad():
        for path in paths:
            m = layers.get(path)
            if m is None:
                continue
            for ab in ("lora_A", "lora_B"):
                key = f"base_model.model.{path}.{ab}.weight"
                got = getattr(m, ab)["default"].weight
                if key not in adapter:
                    fail(f"{key} not in msbnb's file")
                elif not torch.equal(got, adapter[key]):
                    fail(f"{key}: PEFT's tensor differs from the file")
            x, y = ours["x." + path], ours["y." + path]
            y_peft = m(x)
            ratio = ((y_peft.double() - y.double()).abs() / (2 * bound(x, m) + 1e-30)).max().item()
            worst = max(worst, ratio)
            if ratio > 1:
                fail(f"{path}: |PEFT - msbnb| is {ratio:.3g} times the bound")
        logits = pm(input_ids=ids).logits
    changed = (logits - logits_base).abs().max().item()
    if changed == 0:
        fail("the adapter does not change the logits")
    cfg = pm.peft_config["default"]
    print(f"{name}: {len(paths)} LoRA layers, r {cfg.r} alpha {cfg.lora_alpha} rslora {cfg.use_rslora} "
          f"rank_pattern {dict(cfg.rank_pattern)} target_modules {cfg.target_modules!r}; "
          f"max |PEFT - msbnb| / bound = {worst:.3g}; logits moved by {changed:.3g}; "
          f"{len(complaints)} warnings")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export_dir")
    args = ap.parse_args()
    import peft
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    folders = sorted(os.path.join(args.export_dir, d) for d in os.listdir(args.export_dir)
                     if os.path.isfile(os.path.join(args.export_dir, d, "adapter_config.json")))
    if not folders:
        sys.exit(f"no adapter folders in {args.export_dir}")
    failures = []
    for f in folders:
        check(f, failures)
    if failures:
        print("FAILURES:")
        for f in failures:
            print("  " + f)
        sys.exit(1)
    print("ALL ADAPTERS MATCH")


if __name__ == "__main__":
    main()
