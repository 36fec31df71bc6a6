#!/usr/bin/env bash
# The `msbnb` commands end to end on the test fixtures and the built-in model: each must succeed
# with the expected output, and bad input must give exactly one error line and exit code != 0.
# Usage: cli_test.sh MSBNB_BINARY SOURCE_DIR WORK_DIR
set -euo pipefail
msbnb=$1 src=$2 work=$3
rm -rf "$work" && mkdir -p "$work"
fx=$src/tests/fixtures/llama
tiny=$src/models/msbnb-kjv-tiny
fail() { echo "FAIL: $*" >&2; exit 1; }

# quantize: every format, a loadable folder, the memory table
for f in int8 int4 nf4 fp4; do
  "$msbnb" quantize "$tiny" "$work/q_$f" --format "$f" --double-quant > "$work/q_$f.txt"
  grep -q "saved" "$work/q_$f.txt" || fail "quantize $f: no memory table"
  grep -q "quantization_config" "$work/q_$f/config.json" || fail "quantize $f: no quantization_config"
done
"$msbnb" quantize "$fx/plain" "$work/q_json" --format nf4 --json | grep -q '"bytes_after"' || fail "quantize --json"

# eval / generate on the quantized output and with quantize-on-load
bible -f Gen1:1-Gen2:25 > "$work/gen.txt"
"$msbnb" eval "$work/q_nf4" --text "$work/gen.txt" --max-tokens 600 --json > "$work/eval.json"
ppl=$(grep -o '"perplexity": [0-9.e+-]*' "$work/eval.json" | awk '{print $2}')
awk -v p="$ppl" 'BEGIN { exit !(p > 1 && p < 30) }' || fail "eval: perplexity '$ppl' out of range (1, 30)"
"$msbnb" generate "$tiny" --quantize nf4-dq --prompt "In the beginning" --max-new-tokens 20 > "$work/gen_out.txt" 2>/dev/null
[ "$(wc -c < "$work/gen_out.txt")" -ge 30 ] || fail "generate: too little text"
"$msbnb" generate "$work/q_int8" --prompt "And God said" --max-new-tokens 8 --temperature 0.8 --top-k 20 --top-p 0.9 \
  --seed 3 --json | grep -q '"decode_tokens_per_second"' || fail "generate --json"

# errors: one line, exit code != 0
expect_error() {  # expect_error PATTERN COMMAND...
  local pat=$1; shift
  if "$@" > /dev/null 2> "$work/err.txt"; then fail "expected failure: $*"; fi
  [ "$(wc -l < "$work/err.txt")" -eq 1 ] || { cat "$work/err.txt" >&2; fail "expected one error line: $*"; }
  grep -q -- "$pat" "$work/err.txt" || { cat "$work/err.txt" >&2; fail "expected '$pat' in the error: $*"; }
}
mkdir -p "$work/bad_json" && cp "$fx/plain/model.safetensors" "$work/bad_json/" && echo '{"model_type": "llama",' > "$work/bad_json/config.json"
expect_error "well-formed JSON" "$msbnb" eval "$work/bad_json" --text "$work/gen.txt"
mkdir -p "$work/gpt2" && cp "$fx/plain/model.safetensors" "$work/gpt2/" && sed 's/"llama"/"gpt2"/' "$fx/plain/config.json" > "$work/gpt2/config.json"
expect_error "unsupported architecture" "$msbnb" quantize "$work/gpt2" "$work/gpt2_q" --format nf4
mkdir -p "$work/shard" && cp "$fx/sharded_bf16/"* "$work/shard/" && rm "$work/shard/model-00002-of-00004.safetensors"
expect_error "missing" "$msbnb" generate "$work/shard" --prompt x
expect_error "not empty" "$msbnb" quantize "$tiny" "$work/q_nf4" --format nf4
expect_error "no such folder" "$msbnb" eval "$work/nope" --text "$work/gen.txt"
if "$msbnb" quantize "$tiny" "$work/x" --format int3 2> /dev/null; then fail "bad --format accepted"; fi
# finetune: QLoRA on a license text; a PEFT adapter folder and an SVG; an interrupted run resumes
# to the same losses as an uninterrupted one; 2 processes take the same steps as one.
lic=/usr/share/common-licenses/GPL-3
ft() { "$msbnb" --threads 1 finetune "$tiny" --text "$lic" --steps 6 --batch 4 --context 64 --lr "${FT_LR:-1e-3}" --save-every 2 --json "$@"; }
losses() { python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print(' '.join('%.6f' % l for l in j['losses']))" "$1"; }
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }
ft --out "$work/ft_a" > "$work/ft_a.json"
for f in adapter_model.safetensors adapter_config.json loss.svg checkpoint/optimizer.pt; do
  [ -s "$work/ft_a/$f" ] || fail "finetune: no $f"
done
grep -q '"peft_type": "LORA"' "$work/ft_a/adapter_config.json" || fail "finetune: adapter_config.json is not PEFT's"
grep -q "<polyline" "$work/ft_a/loss.svg" || fail "finetune: no loss curve in the SVG"
awk -v b="$(field "$work/ft_a.json" perplexity_before)" -v a="$(field "$work/ft_a.json" perplexity_after)" \
  'BEGIN { exit !(a < b) }' || fail "finetune: held-out perplexity did not fall"
ft --out "$work/ft_b" --max-seconds 0.000001 > "$work/ft_b1.json"
[ "$(field "$work/ft_b1.json" step)" = 1 ] || fail "finetune --max-seconds: expected to stop after step 1"
ft --out "$work/ft_b" > "$work/ft_b2.json"
[ "$(field "$work/ft_b2.json" resumed_from)" = 1 ] || fail "finetune: did not resume from step 1"
[ "$(losses "$work/ft_a.json")" = "$(losses "$work/ft_b2.json")" ] || fail "finetune: resumed losses differ"
cmp "$work/ft_a/adapter_model.safetensors" "$work/ft_b/adapter_model.safetensors" || fail "finetune: resumed adapter differs"
FT_LR=2e-3 expect_error "lr = 0.001, this run has 0.002" ft --out "$work/ft_b"
"$msbnb" finetune "$tiny" --text "$lic" --steps 6 --batch 4 --context 64 --lr 1e-3 --json --nproc 2 --out "$work/ft_c" \
  > "$work/ft_c.json"
[ "$(field "$work/ft_c.json" processes)" = 2 ] || fail "finetune --nproc 2: not 2 processes"
python3 - "$work/ft_a.json" "$work/ft_c.json" <<'PY' || fail "finetune --nproc 2: losses differ from 1 process"
import json, sys
a, c = (json.load(open(p))["losses"] for p in sys.argv[1:])
# the same batches, gradients averaged over 2 shards instead of 1: equal up to float rounding
assert len(a) == len(c) and all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(a, c)), (a, c)
PY
"$msbnb" eval "$tiny" --quantize nf4-dq --adapter "$work/ft_a" --text "$lic" --max-tokens 600 --json | grep -q perplexity \
  || fail "eval --adapter of the finetune output"

# inspect: per-layer table with errors, the SVG with histograms and levels
"$msbnb" inspect "$tiny" --format nf4 --svg "$work/inspect.svg" > "$work/inspect.txt"
[ "$(grep -c "^model.layers.*nf4" "$work/inspect.txt")" = 28 ] || fail "inspect: expected 28 nf4 layers"
grep -q "16 levels" "$work/inspect.svg" || fail "inspect --svg: no nf4 levels"
"$msbnb" inspect "$work/q_int8" --reference "$tiny" --json > "$work/inspect.json"
python3 - "$work/inspect.json" <<'PY' || fail "inspect --reference: errors out of range"
import json, sys
j = json.load(open(sys.argv[1]))
# int8 rows: |err| <= absmax / 254 per row, so the relative RMS error is well under 1 %
assert len(j["layers"]) == 28 and all(0 < l["relative_rms_error"] < 0.01 for l in j["layers"]), j["layers"][:2]
PY
expect_error "reference" "$msbnb" inspect "$work/q_int8" --reference "$fx/plain"

# bench: the tiny shape in its short mode, every number positive
"$msbnb" bench --short --formats fp32,nf4,int8 --json > "$work/bench.json"
python3 - "$work/bench.json" <<'PY' || fail "bench --short"
import json, sys
j = json.load(open(sys.argv[1]))
assert [c["format"] for c in j["cases"]] == ["fp32", "nf4", "nf4 int8", "int8"], [c["format"] for c in j["cases"]]
assert all(c["decode_tokens_per_second"] > 0 and c["read_bandwidth_GBs"] > 0 and c["prefill_tokens_per_second"] > 0
           for c in j["cases"]), j
PY
expect_error "format" "$msbnb" bench --short --formats nf3
echo "cli: all commands and error cases passed"
