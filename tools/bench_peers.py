#!/usr/bin/env python3
"""CPU timings of the Python peers of the quantized matmul library: bitsandbytes, torch.

Times y = x @ W.T (no bias) with W of shape [m=out, k=in] and x of shape [n, k] for
  * bitsandbytes Linear4bit NF4 (blocksize 64, compress_statistics off/on, compute_dtype fp32;
    x in fp32 and bf16), in eval mode (what inference gets) and in train mode (the
    dequantize_4bit + F.linear fallback, which is also what CPUs without AVX512-BF16 get);
  * bitsandbytes int8: Linear8bitLt (has_fp16_weights=False, threshold 0.0 and 6.0) in eval
    mode, Linear8bitLt in train mode, and the bnb.functional int8 path
    (int8_vectorwise_quant + int8_linear_matmul + int8_mm_dequant);
  * torch fp32 nn.Linear, torch.mv (n=1 only), torch bf16 nn.Linear;
  * torch dynamic int8 Linear (torch.ao.quantization.quantize_dynamic, qint8) with the
    quantized engines fbgemm, onednn and x86.

Weights come from DRAM: for every (peer, shape) a pool of distinct layers is built whose
weight bytes add up to at least --min-bytes (default 1 GiB; 4-bit formats count packed bytes
and their scales).  Only --distinct (default 2) layers are quantized from their own
random-normal fp32 weights (created one at a time, the fp32 source deleted after); the
others are deep copies of those (separate memory, same values: the memory traffic is the
same, and building the pool takes seconds instead of minutes).  Every timed call runs one
forward of the next layer in the cycle.  A pass is one call per cycled layer; median_us is
the median over passes of (pass time / layers), after one warm-up pass.

Slow cases are capped at about --max-case-s seconds (default 10): then fewer layers are
cycled, but never fewer than 4 x L3 (4 x 32 MiB) of weight bytes; cycled_bytes in the JSON
says how many bytes were cycled (pool_bytes is the whole pool), and "capped" is true.

Output: one JSON object per line on stdout:
  {"peer", "op", "format", "m", "k", "n", "threads", "median_us", "weight_bytes", "GB_s",
   "GFLOP_s", ...extra keys}
with GFLOP_s = 2*m*k*n / median time and GB_s = weight_bytes (of one layer) / median time
(GB = 1e9 bytes).  Extra keys: x_dtype, out_dtype, variant, kernel (what bnb/torch dispatched
to), min_call_us, median_call_us, passes, calls, layers (cycled), pool_layers, cycled_bytes,
pool_bytes, capped, other_cpu (CPUs' worth of time other processes used during the case,
from /proc/stat; anything above ~0.1 means the case shared the machine and is not clean).
--wait-idle S waits up to S seconds before each pool and each case for the machine to be
idle, and reruns a disturbed case up to --retries times (the JSON keeps the last attempt).
Progress and an environment summary go to stderr.

Usage (the venv is outside the repo; run from anywhere):
  /work/venv/bin/python tools/bench_peers.py --quick                 # 4096x4096, n 1,128, 2 threads
  /work/venv/bin/python tools/bench_peers.py > peers.jsonl           # everything (not yet run in full; the
      # 4096x4096, n 1,128, threads 2,1 subset needs roughly 10 min of machine time when idle)
  /work/venv/bin/python tools/bench_peers.py --shapes 4096x4096 --n 1,128 --threads 2,1 \
      --wait-idle 3600 --quiet-s 2 > p1.jsonl      # on a shared machine: wait for quiet CPUs
  /work/venv/bin/python tools/bench_peers.py --shapes 4096x4096,11008x4096 --n 1,128 \
      --threads 1,2 --peers bnb-nf4,torch-fp32 --min-bytes 1073741824 --max-case-s 10
Shapes are MxK (out x in).  --peers takes variant names or groups (see --list-peers):
  bnb-nf4        Linear4bit eval, x fp32 and bf16, compress_statistics 0 and 1
  bnb-nf4-train  Linear4bit train mode (dequantize_4bit + F.linear), x fp32
  bnb-int8       Linear8bitLt eval, threshold 0.0 and 6.0
  bnb-int8-train Linear8bitLt train mode (MatMul8bitFp: dequantize int8 + F.linear)
  bnb-int8-func  bnb.functional int8_vectorwise_quant + int8_linear_matmul + int8_mm_dequant
  torch-fp32     nn.Linear fp32;  torch-mv: torch.mv fp32 (n=1);  torch-bf16: nn.Linear bf16
  torch-dyn-fbgemm / torch-dyn-onednn / torch-dyn-x86   quantize_dynamic qint8
  groups: bnb, torch, torch-dyn, all (default)

What bitsandbytes 0.50.2 does on this CPU (read from its source, see `kernel` in the JSON):
  * Linear4bit.forward in eval mode on a CPU with AVX512-BF16 repacks the weight on the first
    forward (_convert_weight_packed_for_cpu: [N/32, K/2, 32] nibble layout, absmax
    decompressed to bf16 and transposed; compress_statistics no longer matters after that)
    and calls torch.ops.bitsandbytes.gemv_4bit -> libbitsandbytes_cpu
    gemv_4bit_inference_cpu_nf4_bf16 (x is cast to bf16, output cast back), for any n.  It
    first tries the kernels-community "quantization-bitsandbytes" hub kernel, which needs
    the `kernels` package and the Hugging Face hub; without them it logs a warning on import
    and uses the bundled kernel.  The repack happens in the build step here, not in a timed
    call.
  * Linear4bit in train mode (or a CPU without AVX512-BF16): gemm_4bit default =
    dequantize_4bit (libbitsandbytes_cpu cdequantize_blockwise_cpu_nf4_fp32; nested stats
    first dequantized) into a full fp32 [m, k] matrix, then F.linear (MKL sgemm).
  * Linear8bitLt eval: MatMul8bitLt: x cast to fp16, int8_vectorwise_quant in torch ops,
    torch._int_mm (int8 x int8 -> int32, registered for CPU when torch >= 2.6 and the CPU
    capability is AVX512), int8_mm_dequant in torch ops; threshold 6.0 adds the outlier
    search (random-normal x has no |x| >= 6, so no outlier columns here).
    Train mode uses MatMul8bitFp: CB.to(fp32) * SCB/127 then F.linear.
  bitsandbytes logs "inputs will be cast ... to float16" on every Linear8bitLt call; the
  bitsandbytes logger is set to ERROR here so that logging is not timed.
  libbitsandbytes_cpu uses OpenMP; it resolves to torch's libgomp in the same process, so
  torch.set_num_threads also sets bnb's thread count.
"""

import argparse
import copy
import gc
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings

L3_BYTES = 32 << 20

VARIANTS = [
    "bnb-nf4", "bnb-nf4-train", "bnb-int8", "bnb-int8-train", "bnb-int8-func",
    "torch-fp32", "torch-mv", "torch-bf16",
    "torch-dyn-fbgemm", "torch-dyn-onednn", "torch-dyn-x86",
]
GROUPS = {
    "all": VARIANTS,
    "bnb": [v for v in VARIANTS if v.startswith("bnb-")],
    "torch": ["torch-fp32", "torch-mv", "torch-bf16"],
    "torch-dyn": [v for v in VARIANTS if v.startswith("torch-dyn-")],
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only 4096x4096, n in {1,128}, threads 2")
    p.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="comma list of MxK (out x in)")
    p.add_argument("--n", default="1,4,16,128,512", help="comma list of batch rows")
    p.add_argument("--threads", default="2,1", help="comma list of torch.set_num_threads values")
    p.add_argument("--peers", default="all", help="comma list of variants/groups (--list-peers)")
    p.add_argument("--min-bytes", type=int, default=1 << 30, help="weight bytes per pool (default 1 GiB)")
    p.add_argument("--max-case-s", type=float, default=10.0, help="time budget per case, seconds")
    p.add_argument("--max-passes", type=int, default=15, help="most timed passes per case")
    p.add_argument("--distinct", type=int, default=2, help="independently quantized layers per pool")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-idle", type=float, default=0.0,
                   help="before each pool and case, wait up to this many seconds for other processes "
                        "to stop using CPU; a case disturbed anyway (other_cpu > 0.1) is rerun up to --retries times")
    p.add_argument("--retries", type=int, default=4)
    p.add_argument("--quiet-s", type=float, default=3.0, help="seconds of quiet --wait-idle asks for")
    p.add_argument("--list-peers", action="store_true")
    a = p.parse_args()
    if a.list_peers:
        print("variants:", " ".join(VARIANTS))
        for g, vs in GROUPS.items():
            print(f"group {g}:", " ".join(vs))
        sys.exit(0)
    if a.quick:
        a.shapes, a.n, a.threads = "4096x4096", "1,128", "2"
    a.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",") if s]
    a.n = [int(v) for v in a.n.split(",") if v]
    a.threads = [int(v) for v in a.threads.split(",") if v]
    peers = []
    for name in a.peers.split(","):
        name = name.strip()
        if not name:
            continue
        if name in GROUPS:
            peers += GROUPS[name]
        elif name in VARIANTS:
            peers.append(name)
        else:
            p.error(f"unknown peer {name!r}; see --list-peers")
    a.peers = [v for v in VARIANTS if v in peers]  # keep canonical order, dedupe
    return a


# ------------------------------------------------------------------------------- imports
warnings.filterwarnings("ignore")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # before import: hub-kernel warning too

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

try:
    import bitsandbytes as bnb  # noqa: E402
    import bitsandbytes.functional as bnbF  # noqa: E402
    from bitsandbytes.backends.cpu import ops as bnb_cpu_ops  # noqa: E402
except Exception as exc:  # pragma: no cover
    bnb = None
    bnb_import_error = repr(exc)
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


# ------------------------------------------------------------------------------- pools
class Pool:
    """A list of layers plus a call fn(layer, x) -> y and the bytes of one layer."""

    def __init__(self, layers, fn, weight_bytes, meta):
        self.layers = layers
        self.fn = fn
        self.weight_bytes = weight_bytes
        self.meta = meta  # dict: peer, op, format, kernel, variant, x_dtypes


def fill_pool(make_one, layer_bytes, min_bytes, distinct, seed, m, k):
    """Build distinct layers from random-normal fp32 weights, then deep copies up to min_bytes.

    layer_bytes: an int, or a function of the first built layer."""
    layers = []

    def src(i):
        g = torch.Generator().manual_seed(seed * 1000003 + i)
        return torch.randn(m, k, generator=g, dtype=torch.float32)

    layers.append(make_one(src(0)))
    if callable(layer_bytes):
        layer_bytes = layer_bytes(layers[0])
    count = max(1, math.ceil(min_bytes / layer_bytes))
    for i in range(1, min(distinct, count)):
        layers.append(make_one(src(i)))  # the fp32 source is freed right after
        gc.collect()
    d = len(layers)
    i = 0
    while len(layers) < count:
        layers.append(copy.deepcopy(layers[i % d]))
        i += 1
    return layers, layer_bytes


def nf4_bytes(lin):
    qs = lin.weight.quant_state
    b = lin.weight.data.nbytes + qs.absmax.nbytes
    if getattr(qs, "nested", False):
        b += qs.state2.absmax.nbytes + qs.state2.code.nbytes + 4  # + fp32 offset
    return b


def build_pool(variant, cs, m, k, args):
    """Return a list of Pools for one variant (some variants give several formats)."""
    min_bytes, distinct, seed = args.min_bytes, args.distinct, args.seed
    x1 = torch.randn(1, k)

    if variant in ("bnb-nf4", "bnb-nf4-train"):
        train = variant == "bnb-nf4-train"
        pools = []
        for cstat in (False, True):
            def make(w, cstat=cstat):
                lin = bnb.nn.Linear4bit(k, m, bias=False, compute_dtype=torch.float32,
                                        compress_statistics=cstat, quant_type="nf4", device="meta")
                lin.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=cstat,
                                               quant_type="nf4", blocksize=64, module=lin).to("cpu")
                lin.train(train)
                lin(x1)  # eval: triggers the one-time CPU repack (not timed)
                return lin
            layers, lb = fill_pool(make, nf4_bytes, min_bytes, distinct, seed, m, k)
            packed = bool(getattr(layers[0].weight.quant_state, "packing_format_for_cpu", False))
            if packed:
                kernel = ("gemv_4bit cpu: libbitsandbytes_cpu gemv_4bit_inference_cpu_nf4_bf16 "
                          "(AVX512-BF16, weight repacked, absmax bf16; x cast to bf16)")
                if getattr(bnb_cpu_ops, "gemm_4bit_forward_kernel", None) is not None:
                    kernel = "gemv_4bit cpu: kernels-community gemm_4bit_forward (hub kernel)"
                op = "Linear4bit.forward (eval)"
            else:
                kernel = ("gemm_4bit default: dequantize_4bit (libbitsandbytes_cpu "
                          "cdequantize_blockwise_cpu_nf4_fp32) + F.linear")
                op = "Linear4bit.forward (train mode)" if train else "Linear4bit.forward (eval, no AVX512-BF16)"
            pools.append(Pool(layers, lambda lin, x: lin(x), lb, dict(
                peer="bitsandbytes", op=op, format=f"nf4 b64 cs{int(cstat)}", kernel=kernel,
                variant=variant, x_dtypes=["float32"] if train else ["float32", "bfloat16"],
                compress_statistics=cstat)))
        return pools

    if variant in ("bnb-int8", "bnb-int8-train"):
        train = variant == "bnb-int8-train"
        pools = []
        for th in ((0.0,) if train else (0.0, 6.0)):
            def make(w, th=th):
                lin = bnb.nn.Linear8bitLt(k, m, bias=False, has_fp16_weights=False, threshold=th, device="meta")
                lin.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to("cpu")
                lin.train(train)
                lin(x1)  # moves CB/SCB into lin.state
                return lin
            lb = m * k + 4 * m  # int8 CB + fp32 SCB
            layers, lb = fill_pool(make, lb, min_bytes, distinct, seed, m, k)
            assert layers[0].state.CB.dtype == torch.int8
            if train:
                kernel = "MatMul8bitFp: CB.to(fp32)*SCB/127 + F.linear"
            else:
                kernel = ("MatMul8bitLt: x->fp16, int8_vectorwise_quant (torch ops), "
                          "int8_linear_matmul cpu = torch._int_mm, int8_mm_dequant (torch ops)")
                if th > 0:
                    kernel += ", int8_mixed_scaled_mm (outlier search)"
            pools.append(Pool(layers, lambda lin, x: lin(x), lb, dict(
                peer="bitsandbytes", op=f"Linear8bitLt.forward ({'train mode' if train else 'eval'}, threshold={th})",
                format="int8 rowwise (LLM.int8)", kernel=kernel, variant=variant, x_dtypes=["float32"],
                threshold=th)))
        return pools

    if variant == "bnb-int8-func":
        def make(w):
            cb, scb, _ = bnbF.int8_vectorwise_quant(w.to(torch.float16))
            return (cb, scb)

        def fn(layer, x):
            ca, sca, _ = bnbF.int8_vectorwise_quant(x)
            return bnbF.int8_mm_dequant(bnbF.int8_linear_matmul(ca, layer[0]), sca, layer[1])
        lb = m * k + 4 * m
        layers, lb = fill_pool(make, lb, min_bytes, distinct, seed, m, k)
        return [Pool(layers, fn, lb, dict(
            peer="bitsandbytes", op="F.int8_vectorwise_quant + F.int8_linear_matmul + F.int8_mm_dequant",
            format="int8 rowwise (LLM.int8)", variant=variant, x_dtypes=["float32"],
            kernel="int8_vectorwise_quant default (torch ops, on fp32 x), torch._int_mm, "
                   "int8_mm_dequant default (fp16 out)"))]

    if variant in ("torch-fp32", "torch-mv", "torch-bf16"):
        dt = torch.bfloat16 if variant == "torch-bf16" else torch.float32
        lb = m * k * dt.itemsize

        def make(w):
            lin = nn.Linear(k, m, bias=False, device="meta")
            lin.weight = nn.Parameter(w.to(dt).contiguous(), requires_grad=False)
            return lin
        layers, lb = fill_pool(make, lb, min_bytes, distinct, seed, m, k)
        if variant == "torch-mv":
            fn = lambda lin, x: torch.mv(lin.weight, x[0])  # noqa: E731
            op, kernel = "torch.mv", "aten mv (MKL sgemv)"
        else:
            fn = lambda lin, x: lin(x)  # noqa: E731
            op = "nn.Linear.forward"
            kernel = "aten linear (MKL sgemm)" if dt == torch.float32 else "aten linear bf16 (oneDNN/MKL)"
        name = "float32" if dt == torch.float32 else "bfloat16"
        return [Pool(layers, fn, lb, dict(peer="torch", op=op, format=name, kernel=kernel,
                                          variant=variant, x_dtypes=[name]))]

    if variant.startswith("torch-dyn-"):
        eng = variant[len("torch-dyn-"):]
        if eng not in torch.backends.quantized.supported_engines:
            log(f"  {variant}: engine {eng} not supported here, skipped")
            return []
        torch.backends.quantized.engine = eng

        def make(w):
            lin = nn.Linear(k, m, bias=False, device="meta")
            lin.weight = nn.Parameter(w, requires_grad=False)
            return torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
        lb = m * k  # int8 values; per-tensor scale/zero point not counted
        layers, lb = fill_pool(make, lb, min_bytes, distinct, seed, m, k)
        return [Pool(layers, lambda q, x: q(x), lb, dict(
            peer="torch", op="quantize_dynamic Linear.forward", format="qint8 per-tensor (dynamic act quant)",
            kernel=f"quantized::linear_dynamic ({eng} engine)", variant=variant, x_dtypes=["float32"],
            engine=eng))]

    raise ValueError(variant)


# ------------------------------------------------------------------------------- timing
_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_snapshot():
    """(system busy jiffies over all CPUs, this process's utime+stime jiffies)."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        busy = sum(v[:8]) - v[3] - v[4]  # all but idle and iowait (guest is inside user)
        with open("/proc/self/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()
        return busy, int(st[11]) + int(st[12])
    except (OSError, ValueError, IndexError):
        return None


def other_cpu(before, after, wall):
    """CPUs' worth of time used by other processes between two snapshots (0 = machine was ours)."""
    if not before or not after or wall <= 0:
        return None
    return round(max(0, (after[0] - before[0]) - (after[1] - before[1])) / _CLK / wall, 3)


def wait_idle(max_wait_s, threshold=0.1, quiet_s=1.0):
    """Wait up to max_wait_s until other processes have used < threshold CPUs for quiet_s seconds.

    Returns the other-CPU figure of the last window (logs a warning if it gave up)."""
    t0 = time.perf_counter()
    step, quiet, said = 0.25, 0.0, False
    while True:
        a = cpu_snapshot()
        time.sleep(step)
        o = other_cpu(a, cpu_snapshot(), step)
        if o is None:
            return None
        quiet = quiet + step if o < threshold else 0.0
        if quiet >= quiet_s:
            return o
        waited = time.perf_counter() - t0
        if waited >= max_wait_s:
            log(f"  WARNING: other processes use {o:.2f} CPUs; timings will be disturbed")
            return o
        if o >= threshold and not said:
            log(f"  other processes use {o:.2f} CPUs; waiting up to {max_wait_s:.0f}s for {quiet_s:.0f}s of quiet")
            said = True


def time_case(pool, x, args):
    fn, layers = pool.fn, pool.layers
    perf = time.perf_counter
    # estimate one call (two calls on one layer, the second one timed)
    fn(layers[0], x)
    t0 = perf()
    fn(layers[-1], x)
    t_est = max(perf() - t0, 1e-6)

    budget = args.max_case_s
    min_layers = min(len(layers), max(1, math.ceil(4 * L3_BYTES / pool.weight_bytes)))
    nl = len(layers)
    capped = False
    if t_est * nl * 3 > budget:  # want warm-up + >= 2 timed passes over the whole pool
        nl = max(min_layers, min(nl, int(budget / (3 * t_est))))
        capped = nl < len(layers)
    cyc = layers[:nl]

    # warm-up pass (skipped for very slow cases: a few calls only)
    if t_est * nl <= budget / 2:
        for lay in cyc:
            fn(lay, x)
    snap0, w0 = cpu_snapshot(), perf()
    pass_est = t_est * nl
    min_passes = 3 if 4 * pass_est <= budget else 1
    pass_avgs, calls = [], []
    t_start = perf()
    while True:
        tp = perf()
        for lay in cyc:
            t0 = perf()
            fn(lay, x)
            calls.append(perf() - t0)
        pass_avgs.append((perf() - tp) / nl)
        spent = perf() - t_start
        if len(pass_avgs) >= args.max_passes:
            break
        if len(pass_avgs) >= min_passes and spent + pass_avgs[-1] * nl > budget:
            break
    oc = other_cpu(snap0, cpu_snapshot(), perf() - w0)
    return dict(
        other_cpu=oc, median_s=statistics.median(pass_avgs), median_call_s=statistics.median(calls), min_call_s=min(calls),
        passes=len(pass_avgs), calls=len(calls), layers=nl, pool_layers=len(layers),
        cycled_bytes=nl * pool.weight_bytes, pool_bytes=len(layers) * pool.weight_bytes, capped=capped)


def env_summary():
    d = dict(python=platform.python_version(), torch=torch.__version__,
             bitsandbytes=getattr(bnb, "__version__", None) if bnb else None,
             torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
             quantized_engines=list(torch.backends.quantized.supported_engines),
             nproc=os.cpu_count(), mkldnn=torch.backends.mkldnn.is_available())
    if bnb:
        d["bnb_has_avx512bf16"] = bool(bnbF.has_avx512bf16())
        d["bnb_hub_gemm_4bit_kernel"] = getattr(bnb_cpu_ops, "gemm_4bit_forward_kernel", None) is not None
        d["bnb_cpu_int8_linear_matmul_is_int_mm"] = bool(getattr(bnb_cpu_ops, "_has_avx512", False))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    d["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return d


def main():
    args = parse_args()
    if bnb is None and any(v.startswith("bnb") for v in args.peers):
        log(f"bitsandbytes import failed ({bnb_import_error}); bnb peers skipped")
        args.peers = [v for v in args.peers if not v.startswith("bnb")]
    log("env: " + json.dumps(env_summary()))
    log(f"shapes={args.shapes} n={args.n} threads={args.threads} peers={args.peers} "
        f"min_bytes={args.min_bytes} max_case_s={args.max_case_s}")
    t_all = time.perf_counter()
    with torch.inference_mode():
        for (m, k) in args.shapes:
            for variant in args.peers:
                ns = [1] if variant == "torch-mv" else args.n
                ns = [n for n in ns if n in args.n]
                if not ns:
                    continue
                wait_idle(args.wait_idle, quiet_s=args.quiet_s)
                t0 = time.perf_counter()
                torch.set_num_threads(max(args.threads))
                try:
                    pools = build_pool(variant, None, m, k, args)
                except Exception as exc:
                    log(f"  {variant} {m}x{k}: build failed: {exc!r}")
                    continue
                log(f"[{time.perf_counter() - t_all:7.1f}s] built {variant} {m}x{k}: "
                    f"{len(pools)} pool(s) x {len(pools[0].layers) if pools else 0} layers "
                    f"in {time.perf_counter() - t0:.1f}s")
                for pool in pools:
                    meta = pool.meta
                    if "engine" in meta:
                        torch.backends.quantized.engine = meta["engine"]
                    for xdt_name in meta["x_dtypes"]:
                        xdt = getattr(torch, xdt_name)
                        if meta["peer"] == "bitsandbytes" and meta["op"].startswith("Linear4bit"):
                            for lin in pool.layers:  # bf16 x: bf16 compute_dtype (fp32 otherwise)
                                lin.compute_dtype = xdt
                        for th in args.threads:
                            torch.set_num_threads(th)
                            for n in ns:
                                g = torch.Generator().manual_seed(args.seed + 7 * n)
                                x = torch.randn(n, k, generator=g).to(xdt)
                                try:
                                    y = pool.fn(pool.layers[0], x)
                                    for attempt in range(args.retries + 1 if args.wait_idle > 0 else 1):
                                        if args.wait_idle > 0:
                                            wait_idle(args.wait_idle, quiet_s=args.quiet_s)
                                        r = time_case(pool, x, args)
                                        if r["other_cpu"] is None or r["other_cpu"] < 0.1:
                                            break
                                        log(f"  disturbed (other_cpu={r['other_cpu']}), attempt {attempt + 1}")
                                except Exception as exc:
                                    log(f"  {meta['variant']} {meta['format']} n={n} t={th}: failed: {exc!r}")
                                    continue
                                sec = r["median_s"]
                                rec = dict(peer=meta["peer"], op=meta["op"], format=meta["format"], m=m, k=k,
                                           n=n, threads=th, median_us=round(sec * 1e6, 2),
                                           weight_bytes=pool.weight_bytes,
                                           GB_s=round(pool.weight_bytes / sec / 1e9, 3),
                                           GFLOP_s=round(2.0 * m * k * n / sec / 1e9, 3),
                                           x_dtype=xdt_name, out_dtype=str(y.dtype).replace("torch.", ""),
                                           variant=meta["variant"], kernel=meta["kernel"],
                                           median_call_us=round(r["median_call_s"] * 1e6, 2),
                                           min_call_us=round(r["min_call_s"] * 1e6, 2),
                                           passes=r["passes"], calls=r["calls"], layers=r["layers"],
                                           pool_layers=r["pool_layers"], cycled_bytes=r["cycled_bytes"],
                                           pool_bytes=r["pool_bytes"], capped=r["capped"],
                                           other_cpu=r["other_cpu"])
                                for key in ("engine", "threshold", "compress_statistics"):
                                    if key in meta:
                                        rec[key] = meta[key]
                                print(json.dumps(rec), flush=True)
                                log(f"[{time.perf_counter() - t_all:7.1f}s] {meta['variant']:<16} "
                                    f"{meta['format']:<12} x={xdt_name:<8} {m}x{k} n={n:<3} t={th} "
                                    f"{sec * 1e6:10.1f} us {rec['GB_s']:7.2f} GB/s {rec['GFLOP_s']:8.2f} GFLOP/s "
                                    f"({r['passes']}p x {r['layers']}/{r['pool_layers']} layers"
                                    f"{', capped' if r['capped'] else ''})"
                                    f"{'' if not r['other_cpu'] or r['other_cpu'] < 0.1 else ' OTHER LOAD %.2f CPU' % r['other_cpu']}")
                        if meta["peer"] == "bitsandbytes" and meta["op"].startswith("Linear4bit"):
                            for lin in pool.layers:
                                lin.compute_dtype = torch.float32
                del pools
                gc.collect()
    log(f"done in {time.perf_counter() - t_all:.1f}s")


if __name__ == "__main__":
    main()
