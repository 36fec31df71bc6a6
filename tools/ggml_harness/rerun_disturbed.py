#!/usr/bin/env python3
"""Reruns the cases of a ggml_harness JSONL that shared the CPUs (other_cpu >= 0.1 or unknown),
one harness call per case with --wait-idle, appending the new lines to OUT.

  python3 tools/ggml_harness/rerun_disturbed.py HARNESS IN.jsonl OUT.jsonl [--wait-idle=30] [--n=1]

HARNESS: the binary bench_ggml.sh built (bench_ggml.sh --build-only prints it); --n: only the
cases with these n (comma separated), e.g. the GEMVs first on a busy machine.
"""
import json
import subprocess
import sys

args = [a for a in sys.argv[1:] if not a.startswith("--")]
opts = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
if len(args) != 3:
    sys.exit(__doc__)
harness, src, out = args
wait = opts.get("wait-idle", "30")
only_n = {int(v) for v in opts["n"].split(",")} if "n" in opts else None
rows = [json.loads(line) for line in open(src) if line.startswith("{")]
bad = [r for r in rows if r["op"] == "ggml_mul_mat" and not (r["other_cpu"] is not None and r["other_cpu"] < 0.1)
       and (only_n is None or r["n"] in only_n)]
print(f"{len(bad)} disturbed cases", file=sys.stderr)
with open(out, "a") as f:
    for r in bad:
        cmd = [harness, f"--shapes={r['m']}x{r['k']}", f"--formats={r['format']}", f"--n={r['n']}",
               f"--threads={r['threads']}", f"--wait-idle={wait}", "--retries=2", "--case-seconds=0.5",
               "--label=rerun"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        for line in p.stdout.splitlines():
            if '"ggml_mul_mat"' in line:
                f.write(line + "\n")
                f.flush()
        tail = p.stderr.strip().splitlines()
        print(tail[-1] if tail else f"no output, rc {p.returncode}", file=sys.stderr)
