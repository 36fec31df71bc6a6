#!/usr/bin/env bash
# The 7B scale check (not a CI test): a random-weight LLaMA-7B-shaped bf16 checkpoint (13.5 GB,
# tools/make_7b_checkpoint.py, needs the PyPI venv with numpy) is quantized to NF4 + double
# quant by `msbnb quantize`; prints time, peak RSS (goal < 3 GB), output size, and the decode
# speed of the quantized model. Usage: scripts/scale_check_7b.sh WORK_DIR [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:?usage: scale_check_7b.sh WORK_DIR [PYTHON]} py=${2:-python3}
msbnb=build/release/bin/msbnb
[ -f "$work/llama7b/config.json" ] || "$py" tools/make_7b_checkpoint.py "$work/llama7b"
echo "== input: $(du -sh "$work/llama7b" | cut -f1)"
rm -rf "$work/llama7b-nf4"
/usr/bin/time -v "$msbnb" quantize "$work/llama7b" "$work/llama7b-nf4" --format nf4 --double-quant 2> "$work/time.txt"
grep -E "Elapsed|Maximum resident" "$work/time.txt"
echo "== output: $(du -sb "$work/llama7b-nf4" | cut -f1) bytes ($(du -sh "$work/llama7b-nf4" | cut -f1))"
# Decode speed of the quantized checkpoint against the bandwidth bound (random prompt ids: no tokenizer).
"$msbnb" bench --model "$work/llama7b-nf4" --formats stored --decode 16 --prefill 128
