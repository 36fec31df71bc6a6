#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/*.cpp: the safetensors header parser and the bitsandbytes
# quant_state JSON parser, both without libtorch) with clang, -fsanitize=fuzzer,address,undefined,
# into build/fuzz, and runs each for FUZZ_SECONDS (default 60) from its committed seed corpus
# (fuzz/corpus/<target>, read only: new inputs go to build/fuzz/corpus/<target>). Any crash, leak,
# sanitizer report or timeout fails; the reproducer is left in build/fuzz/ (crash-*, leak-*, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-60}"
cxx="${FUZZ_CXX:-clang++}"
out=build/fuzz
mkdir -p "$out"
flags=(-std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
       -Iinclude -Isrc/io -Wall -Wextra -Werror)
build() {  # target, sources...
  local target=$1
  shift
  "$cxx" "${flags[@]}" "fuzz/fuzz_$target.cpp" "$@" -o "$out/fuzz_$target"
}
build safetensors src/io/safetensors_format.cpp &
pid1=$!
build quant_state src/io/quant_state.cpp &
pid2=$!
wait $pid1
wait $pid2
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
for target in safetensors quant_state; do
  mkdir -p "$out/corpus/$target"
  echo "fuzz_$target: ${seconds} s"
  # -timeout: an input taking over 10 s is a hang; -rss_limit_mb: the header is bounded at 100 MB.
  (cd "$out" && "./fuzz_$target" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      "-dict=../../fuzz/$target.dict" "corpus/$target" "../../fuzz/corpus/$target" 2>"fuzz_$target.log") || {
    tail -50 "$out/fuzz_$target.log"
    echo "fuzz_$target: FAILED (log: $out/fuzz_$target.log)"
    exit 1
  }
  # The last status line (cov: edges, ft: features, corp: corpus) and the executions.
  grep -E "^#[0-9]+" "$out/fuzz_$target.log" | tail -1
  grep -E "^stat::number_of_executed_units" "$out/fuzz_$target.log"
done
echo "fuzz: both targets clean"
