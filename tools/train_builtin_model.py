#!/usr/bin/env python3
"""Train msbnb's built-in default model: a tiny byte-level LlamaForCausalLM on the KJV Bible.

Data:   the output of `bible -f Gen1:1-Rev22:21` (Debian package bible-kjv) as UTF-8 bytes.
        train = bytes[:floor(0.95*len)], held-out = bytes[floor(0.95*len):].
Tokens: raw bytes 0..255 (vocab 256, no bos/eos/pad).
Model:  hidden 256, intermediate 768, 4 layers, 8 heads, 4 kv heads, max_pos 512, rope 10000,
        untied, rms_norm_eps 1e-5, float32.
Train:  AdamW(lr 3e-3, betas (0.9, 0.95), weight_decay 0.1 on matrices only), grad-norm clip 1.0,
        linear warmup 50 steps then cosine to 3e-4 at the last step, batches of 16 random
        256-byte windows, 1 thread.

The number of steps: --steps N trains exactly N steps (fully deterministic given --seed).
Without --steps, the script times steps 3..12 and sets N so that the run fits --minutes
(the README then records N, and `--steps N --seed S` rebuilds the same weights).

Usage:  /work/venv/bin/python tools/train_builtin_model.py [--minutes 18] [--steps N] [--seed 1234]
                                                          [--out models/msbnb-kjv-tiny]
"""

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

torch.set_num_threads(1)
torch.set_num_interop_threads(1)

import safetensors  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()

BIBLE_CMD = ["bible", "-f", "Gen1:1-Rev22:21"]
CTX = 256
BATCH = 16
WARMUP = 50
LR_MAX = 3e-3
LR_MIN = 3e-4
WD = 0.1
EVAL_WINDOWS = 320
PROMPT = "In the beginning"
GEN_BYTES = 200


def load_bytes():
    out = subprocess.run(BIBLE_CMD, check=True, stdout=subprocess.PIPE).stdout
    return out


def make_config():
    return LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )


def lr_at(step, total):
    if step < WARMUP:
        return LR_MAX * (step + 1) / WARMUP
    t = (step - WARMUP) / max(1, total - 1 - WARMUP)
    t = min(1.0, t)
    return LR_MIN + 0.5 * (LR_MAX - LR_MIN) * (1.0 + math.cos(math.pi * t))


def batch(data, gen):
    starts = torch.randint(0, data.numel() - CTX - 1, (BATCH,), generator=gen)
    idx = starts[:, None] + torch.arange(CTX + 1)[None, :]
    w = data[idx]
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


@torch.no_grad()
def eval_loss(model, data, n_windows):
    """Mean cross entropy (nats/byte) over n_windows evenly spaced (CTX+1)-byte windows."""
    model.eval()
    span = data.numel() - CTX - 1
    starts = torch.linspace(0, span, n_windows).long()
    tot, cnt = 0.0, 0
    for i in range(0, n_windows, 16):
        s = starts[i:i + 16]
        idx = s[:, None] + torch.arange(CTX + 1)[None, :]
        w = data[idx]
        logits = model(w[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), w[:, 1:].reshape(-1), reduction="sum")
        tot += loss.item()
        cnt += w[:, 1:].numel()
    model.train()
    return tot / cnt


@torch.no_grad()
def greedy_bytes(model, prompt, n):
    model.eval()
    ids = torch.tensor([list(prompt.encode("utf-8"))], dtype=torch.long)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         min_new_tokens=n, eos_token_id=None, pad_token_id=0, bos_token_id=None)
    return bytes(out[0].tolist())


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--minutes", type=float, default=18.0)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default=os.path.join(here, "..", "models", "msbnb-kjv-tiny"))
    args = ap.parse_args()
    out_dir = os.path.abspath(args.out)

    raw = load_bytes()
    n = len(raw)
    split = math.floor(0.95 * n)
    data = torch.tensor(list(raw), dtype=torch.uint8).long()
    train, held = data[:split], data[split:]
    line_start = raw.rfind(b"\n", 0, split) + 1
    held_start_ref = raw[line_start:raw.find(b" ", line_start)].decode()
    print(f"corpus: {n} bytes; train {split}, held-out {n - split} (split at floor(0.95*len) = {split})", flush=True)

    torch.manual_seed(args.seed)
    cfg = make_config()
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    model.train()
    nparams = sum(p.numel() for p in model.parameters())
    print(f"params: {nparams}", flush=True)

    decay = [p for nm, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for nm, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR_MAX, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed + 1)

    total = args.steps if args.steps is not None else 10 ** 9
    budget = args.minutes * 60.0
    t0 = time.time()
    t_cal = None
    step = 0
    ema = None
    recent = []
    while step < total:
        if step == 3:
            t_cal = time.time()
        if step == 13 and args.steps is None:
            per = (time.time() - t_cal) / 10.0
            # leave room for the final evaluation and saving (~1 min)
            total = max(WARMUP + 10, int((budget - 60.0) / per))
            print(f"calibration: {per:.3f} s/step -> total steps {total}", flush=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total if total < 10 ** 9 else 10 ** 6)
        x, y = batch(train, gen)
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lv = loss.item()
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        recent.append(lv)
        recent = recent[-25:]
        step += 1
        el = time.time() - t0
        if step % 25 == 0 or step == total:
            print(f"step {step}/{total if total < 10**9 else '?'}  loss {lv:.4f}  ema {ema:.4f}  "
                  f"lr {opt.param_groups[0]['lr']:.2e}  elapsed {el:.0f}s", flush=True)
        if args.steps is None and el > budget * 1.15:
            print(f"wall-time budget exceeded at step {step}; stopping early", flush=True)
            break
    train_time = time.time() - t0
    steps_done = step
    final_train_loss = sum(recent) / len(recent)

    model.eval()
    t1 = time.time()
    held_loss = eval_loss(model, held, EVAL_WINDOWS)
    train_eval_loss = eval_loss(model, train, EVAL_WINDOWS)
    print(f"held-out: {held_loss:.4f} nats/byte (ppl {math.exp(held_loss):.3f}, {held_loss / math.log(2):.4f} bits/byte); "
          f"train-eval {train_eval_loss:.4f}; eval took {time.time() - t1:.0f}s", flush=True)

    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.save_pretrained(out_dir, safe_serialization=True)
    with open(os.path.join(out_dir, "msbnb_tokenizer.json"), "w") as f:
        f.write('{"type": "byte"}')

    sample = greedy_bytes(model, PROMPT, GEN_BYTES)
    sample_txt = sample.decode("utf-8", errors="replace")
    print("greedy sample:\n" + sample_txt, flush=True)

    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    cmd = f"/work/venv/bin/python tools/train_builtin_model.py --steps {steps_done} --seed {args.seed}"
    readme = f"""# msbnb-kjv-tiny

msbnb's built-in default model: a tiny byte-level `LlamaForCausalLM` (Hugging Face layout,
float32 safetensors) trained on the King James Bible.  It is small enough to ship in the
repository and good enough to produce Bible-like text, so examples, the CLI and benchmarks
work without downloading anything.  It is a toy, not a useful language model.

Files: `config.json`, `generation_config.json`, `model.safetensors` (float32, {nparams} parameters),
`msbnb_tokenizer.json` (`{{"type": "byte"}}`: token id = byte value 0..255; no bos/eos/pad).

## Data

Text = the output of `{' '.join(BIBLE_CMD)}` (Debian package bible-kjv), taken as UTF-8 bytes
({n} bytes; every line is `<Book><chapter>:<verse> <text>`, e.g. `Ge1:1 In the beginning ...`).
Train = `bytes[:floor(0.95*len)]` = bytes[:{split}], held-out = `bytes[floor(0.95*len):]` =
bytes[{split}:] ({n - split} bytes; it starts mid-verse in {held_start_ref}).

## Architecture

vocab_size 256, hidden_size 256, intermediate_size 768, num_hidden_layers 4, num_attention_heads 8
(head_dim 32), num_key_value_heads 4, max_position_embeddings 512, rope_theta 10000 (default RoPE),
tie_word_embeddings false, rms_norm_eps 1e-5, silu MLP, no biases.

## Training

float32 on the CPU with `torch.set_num_threads(1)`, seed {args.seed} (`torch.manual_seed` for the
init, a `torch.Generator(seed+1)` for the batches).  AdamW (lr 3e-3, betas (0.9, 0.95), eps 1e-8,
weight_decay 0.1 on 2-D weights only), gradient-norm clip 1.0, linear warmup for 50 steps, then
cosine decay to 3e-4 at the last step; each step a batch of 16 random 256-byte windows (next-byte
cross entropy over all 256 positions).

- steps trained: {steps_done} ({steps_done * BATCH * CTX} predicted bytes)
- training time: {train_time:.0f} s ({train_time / 60:.1f} min, 1 thread, 2-core x86_64 machine shared with a C++ build)
- final train loss (mean of the last 25 batches): {final_train_loss:.4f} nats/byte
- train loss on {EVAL_WINDOWS} evenly spaced 256-byte windows of the train split: {train_eval_loss:.4f} nats/byte
- held-out loss on {EVAL_WINDOWS} evenly spaced 256-byte windows of the held-out split: {held_loss:.4f} nats/byte
  = {held_loss / math.log(2):.4f} bits/byte, perplexity per byte {math.exp(held_loss):.3f}

Rebuild (deterministic for a given torch build and CPU; the steps count was chosen by
`--minutes {args.minutes:g}`):

```sh
{cmd}
```

## Greedy sample

200 bytes generated greedily (`generate(do_sample=False)`, KV cache) after the prompt `{PROMPT}`:

```
{sample_txt}
```

## Versions

python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__},
safetensors {safetensors.__version__}, {platform.machine()}.

## Licence

The King James Version text is in the public domain (in the United Kingdom its printing is
subject to Crown letters patent).  These weights are a statistical model trained on that text.

Total size of this directory: {size} bytes (+ this README).
"""
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(readme)
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    print(f"wrote {out_dir}: {sorted(os.listdir(out_dir))}, {size} bytes", flush=True)
    assert size <= 20 * 1024 * 1024


if __name__ == "__main__":
    sys.exit(main())
