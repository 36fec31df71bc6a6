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
echo "cli: all commands and error cases passed"
