#!/usr/bin/env bash
# msbnb beside transformers + bitsandbytes in one run, on the built-in model: the peer
# (tools/bench_hf_tiny.py, PyPI venv) runs first and saves its logits, greedy tokens and speeds;
# then `msbnb bench --peer` runs the same prompt and prefill on the same checkpoint and prints
# both side by side, with our logits against theirs.
# Usage: tools/compare_hf_tiny.sh [PYTHON] [OUT_PREFIX]   (not a CI test: needs the venv)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3} out=${2:-build/hf_tiny_peer}
threads=$(nproc)
"$py" tools/bench_hf_tiny.py --threads "$threads" --out "$out.safetensors" --json "$out.json"
build/release/bin/msbnb --threads "$threads" bench --model models/msbnb-kjv-tiny --formats fp32,nf4-dq,int8 --peer "$out"
