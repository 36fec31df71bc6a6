#!/usr/bin/env python3
"""Hugging Face peer of msbnb's C++ benchmark on the built-in byte-level model (CPU).

Loads models/msbnb-kjv-tiny with transformers in three variants:
  fp32   float32 weights
  nf4    bitsandbytes 4-bit nf4 + double quant, compute dtype float32
  int8   bitsandbytes LLM.int8 (threshold 6.0)
and for each measures
  prefill  tokens/s of one forward over a 128-token prompt (use_cache=True, logits for all positions),
           median of --reps runs after one warm-up;
  decode   tokens/s of a manual greedy loop feeding one token at a time with past_key_values,
           128 new tokens after the prompt bytes of "In the beginning God created" (prefill not timed),
           median of --reps runs;
  generate tokens/s of model.generate(do_sample=False, use_cache=True, min/max_new_tokens=128,
           eos None), time of generate minus one prefill of the prompt.
The generated ids of the manual loop and of generate() must agree (checked, reported).

Saves --out (safetensors): prompt_ids int64 [1, T]; prefill_ids int64 [1, 128]; per variant
<variant>.logits float32 [1, T, 256] = model(prompt_ids).logits and <variant>.generated int64
[1, T+128] (prompt + greedy tokens).  Writes --json with the numbers, prints a table.

prefill_ids = the UTF-8 bytes of the prompt repeated, cut to 128 bytes.

Usage:  /work/venv/bin/python tools/bench_hf_tiny.py [--threads 2] [--model DIR] [--out FILE] [--json FILE]
                                                     [--variants fp32,nf4,int8] [--reps 3]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")

PROMPT = "In the beginning God created"
NEW_TOKENS = 128
PREFILL_TOKENS = 128


def load(variant, model_dir, bnb_repack):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    kw = dict(dtype=torch.float32, attn_implementation="sdpa")
    if variant == "fp32":
        m = LlamaForCausalLM.from_pretrained(model_dir, **kw)
    elif variant == "nf4":
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
        m = LlamaForCausalLM.from_pretrained(model_dir, quantization_config=qc, device_map="cpu", **kw)
    elif variant == "int8":
        qc = BitsAndBytesConfig(load_in_8bit=True)
        m = LlamaForCausalLM.from_pretrained(model_dir, quantization_config=qc, device_map="cpu", **kw)
    else:
        raise ValueError(variant)
    info = {}
    if variant == "nf4":
        import bitsandbytes as bnb

        mods = [mm for mm in m.modules() if isinstance(mm, bnb.nn.Linear4bit)]
        if not bnb_repack:
            for mm in mods:
                mm.support_avx512bf16_for_cpu = False
        info["linear4bit_modules"] = len(mods)
        info["avx512bf16_repack"] = bool(mods and mods[0].support_avx512bf16_for_cpu)
    m.eval()
    return m, info


@torch.no_grad()
def prefill_time(m, ids):
    t = time.perf_counter()
    out = m(ids, use_cache=True)
    return time.perf_counter() - t, out


@torch.no_grad()
def manual_decode(m, prompt_ids, n):
    out = m(prompt_ids, use_cache=True)
    past = out.past_key_values
    nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
    toks = [nxt]
    t = time.perf_counter()
    for _ in range(n - 1):
        out = m(nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
        toks.append(nxt)
    dt = time.perf_counter() - t
    return dt, torch.cat([prompt_ids] + toks, dim=1)


@torch.no_grad()
def run_generate(m, prompt_ids, n):
    t = time.perf_counter()
    g = m.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False, use_cache=True,
                   max_new_tokens=n, min_new_tokens=n, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    return time.perf_counter() - t, g


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.abspath(os.path.join(here, ".."))
    ap.add_argument("--model", default=os.path.join(root, "models", "msbnb-kjv-tiny"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(root, "build", "hf_tiny_peer.safetensors"))
    ap.add_argument("--json", default=os.path.join(root, "build", "hf_tiny_peer.json"))
    ap.add_argument("--variants", default="fp32,nf4,int8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    ap.add_argument("--no-bnb-cpu-repack", action="store_true",
                    help="disable bitsandbytes' AVX512-BF16 weight repacking of Linear4bit (portable path)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    import bitsandbytes
    import transformers
    from safetensors.torch import save_file

    transformers.logging.set_verbosity_error()

    prompt_ids = torch.tensor([list(PROMPT.encode("utf-8"))], dtype=torch.long)
    rep = (PROMPT.encode("utf-8") * (PREFILL_TOKENS // len(PROMPT) + 1))[:PREFILL_TOKENS]
    prefill_ids = torch.tensor([list(rep)], dtype=torch.long)
    n = args.new_tokens

    tensors = {"prompt_ids": prompt_ids.clone(), "prefill_ids": prefill_ids.clone()}
    results = {}
    for v in [s for s in args.variants.split(",") if s]:
        try:
            m, info = load(v, args.model, not args.no_bnb_cpu_repack)
            with torch.no_grad():
                logits = m(prompt_ids).logits.float().contiguous()
            # prefill
            prefill_time(m, prefill_ids)
            pts = [prefill_time(m, prefill_ids)[0] for _ in range(args.reps)]
            # decode (manual loop)
            manual_decode(m, prompt_ids, 8)
            dts, gen_manual = [], None
            for _ in range(args.reps):
                dt, gen_manual = manual_decode(m, prompt_ids, n)
                dts.append(dt)
            # generate()
            gts = []
            gen = None
            for _ in range(args.reps):
                gt, gen = run_generate(m, prompt_ids, n)
                pt, _ = prefill_time(m, prompt_ids)
                gts.append(max(gt - pt, 1e-9))
            same = torch.equal(gen.to(torch.long), gen_manual)
            p_med, d_med, g_med = statistics.median(pts), statistics.median(dts), statistics.median(gts)
            results[v] = dict(
                ok=True,
                prefill_tokens=PREFILL_TOKENS,
                prefill_s=p_med,
                prefill_tokens_per_s=PREFILL_TOKENS / p_med,
                decode_tokens=n - 1,
                decode_s=d_med,
                decode_tokens_per_s=(n - 1) / d_med,
                generate_tokens_per_s=n / g_med,
                generate_matches_manual_loop=same,
                **info,
            )
            tensors[f"{v}.logits"] = logits
            tensors[f"{v}.generated"] = gen.to(torch.int64).contiguous()
            del m
        except Exception as ex:  # noqa: BLE001
            results[v] = dict(ok=False, error=f"{type(ex).__name__}: {ex}")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(tensors, args.out, metadata={"format": "pt", "prompt": PROMPT})
    meta = dict(
        model=os.path.relpath(args.model, root) if args.model.startswith(root) else args.model,
        threads=torch.get_num_threads(),
        prompt=PROMPT,
        new_tokens=n,
        reps=args.reps,
        torch=torch.__version__,
        transformers=transformers.__version__,
        bitsandbytes=bitsandbytes.__version__,
        machine=platform.machine(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        variants=results,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")

    print(f"HF transformers {transformers.__version__} / bitsandbytes {bitsandbytes.__version__}, "
          f"{meta['threads']} threads, prompt {len(PROMPT)} bytes, {n} new tokens, median of {args.reps}")
    print(f"{'variant':8} {'prefill tok/s':>14} {'decode tok/s':>13} {'generate tok/s':>15}  generate==loop")
    for v, r in results.items():
        if r["ok"]:
            print(f"{v:8} {r['prefill_tokens_per_s']:14.1f} {r['decode_tokens_per_s']:13.1f} "
                  f"{r['generate_tokens_per_s']:15.1f}  {r['generate_matches_manual_loop']}")
        else:
            print(f"{v:8} FAILED: {r['error']}")
    for v in results:
        if results[v]["ok"] and int(tensors[v + ".generated"].max()) < 256:
            print(f"{v} sample: {bytes(tensors[v + '.generated'][0].tolist()).decode('utf-8', 'replace')!r}")
    print(f"wrote {args.out} and {args.json}")


if __name__ == "__main__":
    sys.exit(main())
