#!/usr/bin/env python3
"""Layer fixtures from the real bitsandbytes: Linear4bit (NF4 / FP4) and Linear8bitLt state dicts.

For each case the script builds a bitsandbytes layer on the CPU, quantizes it there (Params4bit /
Int8Params quantize on `.to("cpu")`), and writes `tests/fixtures/bnb_layers/<case>.safetensors`
with `safetensors.torch.save_file`:

  * the layer's state dict under the prefix `proj.` exactly as bitsandbytes saves it (the
    Hugging Face key layout): 4-bit `proj.weight`, `proj.weight.absmax`, `proj.weight.quant_map`,
    [`proj.weight.nested_absmax`, `proj.weight.nested_quant_map`],
    `proj.weight.quant_state.bitsandbytes__{nf4,fp4}`, [`proj.bias`]; int8 `proj.weight`,
    `proj.SCB`, `proj.weight_format`, [`proj.bias`]; int8 also `__outlier_cols` int64;
  * `__input` [3, in_features] in the layer's dtype (float32; one bfloat16 case) (int8 cases:
    values representable in float16, since bitsandbytes casts the activations to float16
    before quantizing them);
  * `__dequantized_weight` float32 [out, in] (the float32 product; bitsandbytes' dequantize_4bit
    rounds it to the layer's dtype) and `__absmax` float32 [blocks] (4-bit): computed in NumPy from the stored codes with the
    formula (see `dequantize_formula`), NOT through bitsandbytes' CPU dequantize (its AVX-512
    kernel is wrong for some shapes, see tools/README.md); int8: `__dequantized_weight`
    float32 = CB * SCB / 127 rounded once;
  * `__expected_output` float64 [3, out]: x · W'ᵀ + bias summed in float64 from the formula's
    float32 W' (4-bit), or LLM.int8()'s integer product and outlier columns in float64 (int8);
    int8 also `__expected_output_dequantized` float64: x · (CB * SCB / 127)ᵀ + bias (what a
    layer that multiplies fp32 activations with the dequantized weight gives) and
    `__output_magnitude` float64: |Σ qx qw| · SCA · SCB / 127² + Σ_outliers |x w'| + |bias|;
  * `__bnb_output` (the layer's dtype): what the bitsandbytes layer's forward returned in
    train mode (its path: dequantize_4bit + F.linear, or LLM.int8()), and `__bnb_output_eval` where its
    eval-mode AVX512-BF16 path ran (4-bit: it needs out_features % 32 == 0 and in_features %
    blocksize == 0; otherwise the failure is recorded in the index instead).

The weights come from integer arithmetic (splitmix64, `weights`), so the C++ test can quantize
the same float weight with msbnb and compare the bytes with bitsandbytes'; the inputs are
stored. `index.json` lists every case with its parameters, the versions, and what bitsandbytes' own
dequantize / outputs did against the formula (`bnb_agreement`). Deterministic: NumPy PCG64
seeds, no timestamps; reruns give byte-identical files.

Usage:  /work/venv/bin/python tools/make_bnb_layer_fixtures.py [--out DIR]
Needs:  torch, bitsandbytes 0.50.x, safetensors, numpy.
"""

import argparse
import json
import os
import platform
import sys

import numpy as np
import torch

import bitsandbytes
import bitsandbytes.functional as F
import safetensors
from bitsandbytes.nn import Linear4bit, Linear8bitLt
from safetensors.torch import save_file

PREFIX = "proj."
BATCH = 3
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256  # bitsandbytes' quantize_4bit double-quantizes absmax in blocks of 256

# (name, quant_type, out, in, compress_statistics, bias[, dtype])
# in 128: a multiple of the blocksize; 100 / 200: not, and not of 16 (the last block spans rows);
# 96: a multiple of 16 but not of 64 (the shape where bitsandbytes' AVX-512 dequantize is wrong).
# out 64: the eval-mode AVX512-BF16 path runs; 48 / 172: not a multiple of 32, it asserts.
# 172 x 200 = 34400 weights -> 538 blocks -> 3 nested blocks, the last one partial.
CASES_4BIT = [
    ("nf4_o64_i128", "nf4", 64, 128, False, True),
    ("nf4_o64_i128_dq", "nf4", 64, 128, True, False),
    ("fp4_o64_i128", "fp4", 64, 128, False, False),
    ("fp4_o64_i128_dq", "fp4", 64, 128, True, True),
    ("nf4_o48_i100", "nf4", 48, 100, False, False),
    ("nf4_o48_i100_dq", "nf4", 48, 100, True, True),
    ("fp4_o48_i100", "fp4", 48, 100, False, True),
    ("fp4_o48_i100_dq", "fp4", 48, 100, True, False),
    ("nf4_o172_i200_dq", "nf4", 172, 200, True, True),
    ("fp4_o172_i200", "fp4", 172, 200, False, False),
    ("nf4_o48_i96", "nf4", 48, 96, False, True),
    ("nf4_o48_i96_dq", "nf4", 48, 96, True, False),
    ("fp4_o48_i96", "fp4", 48, 96, False, False),
    ("fp4_o48_i96_dq", "fp4", 48, 96, True, True),
    # A Hugging Face checkpoint in bfloat16: quant_state dtype "bfloat16", bias bfloat16.
    ("nf4_o64_i128_dq_bf16", "nf4", 64, 128, True, True, "bfloat16"),
]

# (name, out, in, threshold, bias)
CASES_INT8 = [
    ("int8_o64_i128_t0", 64, 128, 0.0, True),
    ("int8_o64_i128_t6", 64, 128, 6.0, True),
    ("int8_o48_i100_t6", 48, 100, 6.0, False),
]


def seed_of(name):
    """A seed from the case name (FNV-1a 32), so adding a case changes no other case."""
    h = 0x811C9DC5
    for c in name.encode():
        h = ((h ^ c) * 0x01000193) & 0xFFFFFFFF
    return h


def versions():
    return {
        "generator": "tools/make_bnb_layer_fixtures.py",
        "bitsandbytes_version": bitsandbytes.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "safetensors_version": safetensors.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bnb_has_avx512bf16": bool(F.has_avx512bf16()),
        "machine": platform.machine(),
        "device": "cpu",
    }


SPLITMIX_GAMMA = 0x9E3779B97F4A7C15


def splitmix64(seed, n):
    """z_i = mix(seed + (i + 1) * gamma), i = 0..n-1 (splitmix64's sequence), as uint64."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(SPLITMIX_GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def splitmix_uniform(seed, n):
    """float32 ((z_i >> 40) - 2^23) * 2^-27: uniform on [-1/16, 1/16), exact in float32 (integer
    arithmetic only, so the C++ test rebuilds the weights bit for bit)."""
    m = (splitmix64(seed, n) >> np.uint64(40)).astype(np.int64) - (1 << 23)
    return np.ldexp(m.astype(np.float64), -27).astype(np.float32)


WEIGHT_NOTE = ("weight [out, in] row-major = splitmix_uniform(seed, out * in), bias = "
               "splitmix_uniform(seed + 1, out); splitmix_uniform(s, n)_i = float32(((z_i >> 40) - 2^23) "
               "* 2^-27), z_i = splitmix64 output i (mix(s + (i + 1) * 0x9E3779B97F4A7C15)); then "
               "rounded to the layer's dtype (bfloat16 case)")


def weights(seed, out_f, in_f):
    """Weight and bias from splitmix64 (WEIGHT_NOTE)."""
    return splitmix_uniform(seed, out_f * in_f).reshape(out_f, in_f), splitmix_uniform(seed + 1, out_f)


# ----------------------------------------------------------------------------- formulas
def unpack_codes(packed, n):
    """uint8 [(n+1)/2, 1] -> code indices [n]: first element of a pair in the HIGH nibble."""
    p = packed.reshape(-1).astype(np.int64)
    idx = np.empty(p.size * 2, np.int64)
    idx[0::2] = p >> 4
    idx[1::2] = p & 0xF
    return idx[:n]


def absmax_formula(sd):
    """float32 absmax per block from the stored state dict. Double quant, as bitsandbytes'
    dequantize_4bit: dequantize_blockwise gives fl32(nested_code[q] * nested_absmax[b // 256]),
    then `absmax += offset` adds in float32."""
    a = sd[PREFIX + "weight.absmax"].numpy()
    if PREFIX + "weight.nested_absmax" not in sd:
        return a.astype(np.float32)
    qs = quant_state_json(sd)
    code2 = sd[PREFIX + "weight.nested_quant_map"].numpy().astype(np.float32)
    absmax2 = sd[PREFIX + "weight.nested_absmax"].numpy().astype(np.float32)
    q = a.astype(np.int64)
    blk = np.arange(q.size) // int(qs["nested_blocksize"])
    prod = (code2[q] * absmax2[blk]).astype(np.float32)
    return (prod + np.float32(qs["nested_offset"])).astype(np.float32)


def dequantize_formula(sd, shape, blocksize):
    """W'[i] = code[idx[i]] * absmax[i // blocksize] over the flattened weight, in float32."""
    n = int(np.prod(shape))
    code = sd[PREFIX + "weight.quant_map"].numpy().astype(np.float32)
    absmax = absmax_formula(sd)
    idx = unpack_codes(sd[PREFIX + "weight"].numpy(), n)
    w = (code[idx] * absmax[np.arange(n) // blocksize]).astype(np.float32)
    return w.reshape(shape), absmax


def quant_state_json(sd):
    for k, v in sd.items():
        if k.startswith(PREFIX + "weight.quant_state."):
            return json.loads(bytes(v.numpy().tobytes()).decode("utf-8"))
    raise KeyError("no quant_state key")


def linear_f64(x, w, b):
    y = x.astype(np.float64) @ w.astype(np.float64).T
    if b is not None:
        y += b.astype(np.float64)
    return y


def int8_quant_rows(x, threshold):
    """bitsandbytes' int8_vectorwise_quant (CPU, default backend) in NumPy: with threshold > 0
    elements |x| >= t leave the row absmax, their columns are zeroed in the codes; the scale is
    `127.0 / row_stats` = fl(fl(1 / absmax) * 127) (Tensor.__rdiv__), codes round half to even."""
    x = x.astype(np.float32).copy()
    cols = np.zeros(0, np.int64)
    if threshold > 0:
        out_mask = np.abs(x) >= np.float32(threshold)
        cols = np.nonzero(out_mask.any(axis=0))[0]
        x[out_mask] = 0
    absmax = np.abs(x).max(axis=1).astype(np.float32)
    with np.errstate(divide="ignore"):
        scale = (np.float32(1) / absmax).astype(np.float32) * np.float32(127)
    q = np.rint(x * scale[:, None].astype(np.float32)).astype(np.int8)
    if cols.size and x.shape[0] > 1:
        q[:, cols] = 0
    return q, absmax, cols


def tobytes_equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def diff_stats(got, ref, bound=None):
    got = got.astype(np.float64)
    ref = ref.astype(np.float64)
    d = np.abs(got - ref)
    r = {"bit_exact": bool(np.array_equal(got, ref)), "max_abs_diff": float(d.max()),
         "mismatches": int(np.sum(got != ref)), "count": int(ref.size)}
    if bound is not None:
        r["max_diff_over_fp32_bound"] = float((d / bound).max())
    return r


def fp32_sum_bound(x, w, b):
    """Error bound of an fp32 dot product of length K (any order): K * 2^-24 * sum |x w| (+ the
    bias add and the final rounding), as the C++ test derives it; for the record only."""
    k = x.shape[-1]
    s = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    if b is not None:
        s += np.abs(b.astype(np.float64))
    return (k + 2) * 2.0**-24 * s + 1e-30


def bf16_bound(x, w, b, y):
    """The eval path rounds x and absmax to bfloat16 (2^-9 relative each), sums in fp32 and
    rounds the result to bfloat16: (2 * 2^-9 + K * 2^-24) * sum |x w| + 2^-9 |y|."""
    k = x.shape[-1]
    s = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    if b is not None:
        s += np.abs(b.astype(np.float64))
    return (2 * 2.0**-9 + (k + 2) * 2.0**-24) * s + 2.0**-9 * np.abs(y) + 1e-30


# ----------------------------------------------------------------------------- cases
def to_dtype_f32(a, dtype):
    """float32 array -> the values of `dtype` (round to nearest even), as float32."""
    return torch.from_numpy(a).to(dtype).float().numpy()


def make_4bit(name, quant_type, out_f, in_f, dq, bias, dtype="float32"):
    tdt = getattr(torch, dtype)
    rng = np.random.default_rng(seed_of(name))
    w, b = weights(seed_of(name), out_f, in_f)
    x = rng.standard_normal((BATCH, in_f)).astype(np.float32)
    w, b, x = (to_dtype_f32(a, tdt) for a in (w, b, x))

    layer = Linear4bit(in_f, out_f, bias=bias, compress_statistics=dq, quant_type=quant_type, device="cpu")
    with torch.no_grad():
        layer.weight.data = torch.from_numpy(w.copy()).to(tdt)
        if bias:
            layer.bias.data = torch.from_numpy(b).to(tdt)
    layer.weight.blocksize = BLOCKSIZE
    layer = layer.to("cpu")  # Params4bit._quantize runs here
    assert layer.weight.bnb_quantized
    # The state dict before any forward: the eval-mode forward repacks the weight in place.
    sd = {PREFIX + k: v.detach().clone().contiguous() for k, v in layer.state_dict().items()}
    qs = layer.weight.quant_state

    wq, absmax = dequantize_formula(sd, (out_f, in_f), BLOCKSIZE)
    # dequantize_4bit gives the float32 product rounded to the weight's dtype; the expected
    # output uses the float32 product (what the fused kernels multiply with).
    wq_dt = torch.from_numpy(wq).to(tdt)
    bb = b if bias else None
    expected = linear_f64(x, wq, bb)
    bound = fp32_sum_bound(x, wq, bb)

    agree = {}
    bnb_w = F.dequantize_4bit(layer.weight.data, qs).float().numpy()
    agree["dequantize_4bit"] = diff_stats(bnb_w, wq_dt.float().numpy())
    if qs.nested:
        bnb_absmax = (F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).numpy()
        agree["nested_absmax_recovery"] = diff_stats(bnb_absmax, absmax)
    xt = torch.from_numpy(x).to(tdt)
    layer.train()
    with torch.no_grad():
        y_train = layer(xt).float().numpy()
    agree["forward_train"] = diff_stats(y_train, expected, bound)
    agree["forward_train"]["path"] = f"matmul_4bit -> gemm_4bit (default): dequantize_4bit + F.linear, {dtype}"
    if dtype != "float32":
        agree["forward_train"]["max_diff_over_bf16_bound"] = float(
            (np.abs(y_train - expected) / bf16_bound(x, wq, bb, expected)).max())

    extra = {"__bnb_output": y_train.astype(np.float32)}
    layer.eval()
    try:
        with torch.no_grad():
            y_eval = layer(xt).float().numpy()
        extra["__bnb_output_eval"] = y_eval.astype(np.float32)
        agree["forward_eval"] = diff_stats(y_eval, expected, bound)
        agree["forward_eval"]["max_diff_over_bf16_bound"] = float(
            (np.abs(y_eval - expected) / bf16_bound(x, wq, bb, expected)).max())
        agree["forward_eval"]["path"] = "AVX512-BF16 gemv_4bit (x and absmax rounded to bfloat16)"
    except Exception as e:  # bnb 0.50.2: N % 32 != 0 or K % blocksize != 0 asserts / fails
        agree["forward_eval"] = {"failed": f"{type(e).__name__}: {e}".strip()}

    tensors = dict(sd)
    tensors["__input"] = xt
    tensors["__dequantized_weight"] = torch.from_numpy(wq)
    tensors["__absmax"] = torch.from_numpy(absmax)
    tensors["__expected_output"] = torch.from_numpy(expected)
    for k, v in extra.items():
        tensors[k] = torch.from_numpy(v).to(tdt)
    record = {
        "name": name,
        "kind": "linear4bit",
        "quant_type": quant_type,
        "in_features": in_f,
        "out_features": out_f,
        "bias": bias,
        "blocksize": BLOCKSIZE,
        "compress_statistics": dq,
        "dtype": dtype,
        "prefix": PREFIX,
        "seed": seed_of(name),
        "weight_recipe": WEIGHT_NOTE,
        "quant_state": quant_state_json(sd),
        "bnb_agreement": agree,
    }
    return tensors, record


def make_int8(name, out_f, in_f, threshold, bias):
    rng = np.random.default_rng(seed_of(name))
    w, b = weights(seed_of(name), out_f, in_f)
    # Activations representable in float16 (bitsandbytes quantizes x.to(float16)); with a
    # threshold, outliers in a few columns, one exactly at the threshold (|x| >= t counts).
    x = rng.standard_normal((BATCH, in_f)).astype(np.float16).astype(np.float32)
    if threshold > 0:
        x[0, 5] = 7.5
        x[2, 17] = -np.float32(threshold)
        x[1, in_f - 1] = 11.25
    layer = Linear8bitLt(in_f, out_f, bias=bias, has_fp16_weights=False, threshold=threshold, device="cpu")
    with torch.no_grad():
        layer.weight.data = torch.from_numpy(w.copy())
        if bias:
            layer.bias.copy_(torch.from_numpy(b))
    layer.weight.requires_grad_(False)
    layer = layer.to("cpu")  # Int8Params._quantize: weight.to(float16) -> int8_vectorwise_quant
    sd = {PREFIX + k: v.detach().clone().contiguous() for k, v in layer.state_dict().items()}
    cb = sd[PREFIX + "weight"].numpy()
    scb = sd[PREFIX + "SCB"].numpy()

    agree = {}
    # The weight codes from the formula (weight rounded to float16 first, as bitsandbytes does).
    qw, absw, _ = int8_quant_rows(w.astype(np.float16).astype(np.float32), 0.0)
    agree["weight_codes_formula"] = {"CB_equal": bool(np.array_equal(qw, cb)),
                                     "SCB_equal": bool(np.array_equal(absw, scb))}
    wdq = cb.astype(np.float64) * scb.astype(np.float64)[:, None] / 127.0
    qx, sx, cols = int8_quant_rows(x, threshold)
    bnb_qx, bnb_sx, bnb_cols = F.int8_vectorwise_quant(torch.from_numpy(x).to(torch.float16), threshold=threshold)
    bnb_cols = np.zeros(0, np.int64) if bnb_cols is None else bnb_cols.numpy()
    agree["activation_codes_formula"] = {"CA_equal": bool(np.array_equal(qx, bnb_qx.numpy())),
                                         "SCA_equal": bool(np.array_equal(sx, bnb_sx.numpy())),
                                         "outlier_cols_equal": bool(np.array_equal(cols, bnb_cols))}
    # LLM.int8(): integer product (exact) scaled by SCA * SCB / 127^2, plus the outlier columns
    # of x times the dequantized weight columns, plus bias; all in float64.
    acc = qx.astype(np.int64) @ cb.astype(np.int64).T
    expected = acc.astype(np.float64) * sx.astype(np.float64)[:, None] * scb.astype(np.float64)[None, :] / 127.0**2
    # What every rounding of a float32 evaluation is relative to (the C++ test's bound).
    magnitude = np.abs(acc).astype(np.float64) * sx.astype(np.float64)[:, None] * scb.astype(np.float64)[None, :] / 127.0**2
    if cols.size:
        expected += x[:, cols].astype(np.float64) @ wdq[:, cols].T
        magnitude += np.abs(x[:, cols].astype(np.float64)) @ np.abs(wdq[:, cols]).T
    if bias:
        expected += b.astype(np.float64)
        magnitude += np.abs(b.astype(np.float64))
    xt = torch.from_numpy(x)
    layer.eval()
    with torch.no_grad():
        y = layer(xt).numpy()
    agree["forward"] = diff_stats(y, expected)
    agree["forward"]["path"] = "MatMul8bitLt: int8_scaled_mm (int32 matmul, * 6.200124e-05) [+ outlier addmm]"
    # int8_mm_dequant multiplies by 6.200124e-05, which is 1/127^2 = 6.2000124e-05 times
    # (1 + 1.8e-5): the int8 part of every output is that much too large.
    yi = y.astype(np.float64) - (b.astype(np.float64) if bias else 0.0)
    ei = expected - (b.astype(np.float64) if bias else 0.0)
    if cols.size:
        ei = ei - x[:, cols].astype(np.float64) @ wdq[:, cols].T
        yi = yi - x[:, cols].astype(np.float64) @ wdq[:, cols].T
    rel = yi / ei - 1.0
    agree["forward"]["int8_part_relative_deviation_median"] = float(np.median(rel))
    agree["forward"]["bnb_dequant_constant_relative_error"] = float(6.200124e-05 * 127.0**2 - 1.0)
    tensors = dict(sd)
    tensors["__input"] = xt
    tensors["__dequantized_weight"] = torch.from_numpy(wdq.astype(np.float32))
    tensors["__expected_output"] = torch.from_numpy(expected)
    tensors["__output_magnitude"] = torch.from_numpy(magnitude)
    tensors["__expected_output_dequantized"] = torch.from_numpy(linear_f64(x, wdq, b if bias else None))
    tensors["__bnb_output"] = torch.from_numpy(y.astype(np.float32))
    tensors["__outlier_cols"] = torch.from_numpy(cols.astype(np.int64))
    record = {
        "name": name,
        "kind": "linear8bitlt",
        "in_features": in_f,
        "out_features": out_f,
        "bias": bias,
        "threshold": threshold,
        "has_fp16_weights": False,
        "dtype": "float32",
        "prefix": PREFIX,
        "seed": seed_of(name),
        "weight_recipe": WEIGHT_NOTE,
        "outlier_cols": [int(c) for c in cols],
        "bnb_agreement": agree,
    }
    return tensors, record


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "bnb_layers"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)  # nn.Linear's init runs before the weights are overwritten
    index = {"meta": versions(), "cases": []}
    jobs = [(make_4bit, c) for c in CASES_4BIT] + [(make_int8, c) for c in CASES_INT8]
    total = 0
    for fn, case in jobs:
        tensors, record = fn(*case)
        path = os.path.join(args.out, record["name"] + ".safetensors")
        save_file(tensors, path)
        record["file"] = os.path.basename(path)
        record["keys"] = sorted(k for k in tensors if not k.startswith("__"))
        record["fixture_keys"] = sorted(k for k in tensors if k.startswith("__"))
        index["cases"].append(record)
        size = os.path.getsize(path)
        total += size
        ag = record["bnb_agreement"]
        summary = {k: (v.get("bit_exact", v.get("failed", v)) if isinstance(v, dict) else v) for k, v in ag.items()}
        print(f"{record['name']:<22} {size:>7} B  {json.dumps(summary)}")
    with open(os.path.join(args.out, "index.json"), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True, allow_nan=False)
        f.write("\n")
    print(f"total {total} bytes in {len(jobs)} files + index.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
