#!/usr/bin/env python3
"""Markdown tables from the JSON lines of bench/msbnb_bench_matmul and tools/bench_peers.py.

  ./build/release/bench/msbnb_bench_matmul > ours.jsonl
  /work/venv/bin/python tools/bench_peers.py > peers.jsonl
  python3 tools/bench_report.py ours.jsonl [peers.jsonl] > table.md

One table per shape: each msbnb case (median µs, GB/s of weight bytes, % of the read bandwidth
measured just before it, GFLOP/s) with its speedup over torch fp32 Linear and torch.mv from the
same run, and over the fastest bitsandbytes CPU variant of the same format, n and threads in the
peers file; "check" is the bench's comparison with the scalar kernels before timing (ok / FAIL;
- for files written before it existed). Cases that failed it are listed first. Standard library only.
"""
import json
import sys


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().startswith("{")]


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    ours = load(sys.argv[1])
    peers = load(sys.argv[2]) if len(sys.argv) > 2 else []
    key = lambda r: (r["m"], r["k"], r["n"], r["threads"])
    torch = {}
    for r in ours:
        if r.get("op") in ("torch_linear", "torch_mv"):
            torch[(r["op"],) + key(r)] = r["median_us"]
    bnb = {}
    for r in peers:
        if r.get("peer") == "bitsandbytes" or str(r.get("peer", "")).startswith("bnb"):
            fmt = "nf4" if "nf4" in r.get("format", "") else "int8" if "int8" in r.get("format", "") else None
            if fmt is None or "median_us" not in r:
                continue
            k = (fmt,) + key(r)
            bnb[k] = min(bnb.get(k, float("inf")), r["median_us"])
    failed = [r for r in ours if r.get("check") == "FAIL"]
    for r in failed:
        print(f"- **check FAILED**: {r['op']} {r['format']} {r['path']} {r['m']}x{r['k']} n={r['n']} "
              f"threads={r['threads']} (its timing is of a wrong result)")
    for r in ours:
        if r.get("op") == "read_bandwidth":
            print(f"- read bandwidth at start, {r['threads']} thread(s): {r['GB_s']:.1f} GB/s")
    print()
    shapes = sorted({(r["m"], r["k"]) for r in ours if "m" in r}, key=lambda s: (s[0] * s[1], s))
    for m, k in shapes:
        print(f"\n#### {m} x {k} (out x in)\n")
        print("| op | format | path | n | thr | µs | GB/s | % read bw | GFLOP/s | × torch Linear | × torch.mv | × bnb | check |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in ours:
            if r.get("m") != m or r.get("k") != k or not r.get("op", "").startswith("matmul"):
                continue
            t = r["median_us"]
            lin = torch.get(("torch_linear",) + key(r))
            mv = torch.get(("torch_mv",) + key(r))
            fam = "nf4" if r["format"] in ("nf4", "fp4") else "int8" if "int8" in r["format"] else None
            b = bnb.get((fam,) + key(r)) if fam else None
            f = lambda v: f"{v / t:.2f}" if v else "-"
            print(f"| {r['op']} | {r['format']} | {r['path']} | {r['n']} | {r['threads']} | {t:.0f} | "
                  f"{r['GB_s']:.1f} | {r.get('pct_bw', 0):.0f} | {r['GFLOP_s']:.0f} | {f(lin)} | {f(mv)} | {f(b)} | "
                  f"{r.get('check', '-')} |")


if __name__ == "__main__":
    main()
