#!/usr/bin/env bash
# ggml's CPU matmul beside msbnb's (issue 13): builds the CPU backend of a ggml checkout
# (github:ggml-org/ggml) or of ik_llama.cpp (its ggml/ folder) out of tree, with our harness
# (tools/ggml_harness) against it, and runs the harness: JSON lines in bench_matmul's format on
# stdout, progress on stderr. Not used by CI or the msbnb build.
#
#   tools/bench_ggml.sh [--isa=native|avx2|avx512] [--build-dir=DIR] [--jobs=N] [--build-only]
#                       SRC [harness flags ...] > results.jsonl
#
#   SRC           a ggml checkout (holding include/ggml.h) or an ik_llama.cpp checkout (ggml/)
#   --isa=native  GGML_NATIVE=ON (default)
#   --isa=avx2    GGML_NATIVE=OFF with AVX AVX2 FMA F16C BMI2 on and every AVX-512 option off
#   --isa=avx512  GGML_NATIVE=OFF with AVX2 and AVX512 / _VNNI / _BF16 / _VBMI on
#   --build-dir   default /tmp/ggml-build/<name of SRC>-<isa>
#   --jobs        build jobs (default 2; the build runs under nice)
#   --build-only  build, print the harness path, do not run it
#   harness flags: --shapes=4096x4096,4096x11008 --n=1,128 --threads=1,2 --formats=...
#                  --min-bytes=1G --case-seconds=1.0 --wait-idle=S --no-hugepages (see the header
#                  of tools/ggml_harness/harness.cpp)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
isa=native build_dir="" jobs=2 build_only=0 src=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --isa=*) isa="${1#*=}" ;;
    --build-dir=*) build_dir="${1#*=}" ;;
    --jobs=*) jobs="${1#*=}" ;;
    --build-only) build_only=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    -*) if [[ -z "$src" ]]; then echo "bench_ggml.sh: unknown option '$1' before SRC" >&2; exit 2; fi; break ;;
    *) if [[ -z "$src" ]]; then src="$1"; shift; break; fi ;;
  esac
  shift
done
[[ -n "$src" ]] || { echo "bench_ggml.sh: expected SRC, a ggml or ik_llama.cpp checkout (see --help)" >&2; exit 2; }
src="$(cd "$src" && pwd)"
if [[ -f "$src/include/ggml.h" ]]; then ggml_dir="$src"
elif [[ -f "$src/ggml/include/ggml.h" ]]; then ggml_dir="$src/ggml"
else echo "bench_ggml.sh: SRC '$src' holds neither include/ggml.h nor ggml/include/ggml.h" >&2; exit 2; fi

case "$isa" in
  native) isa_flags=(-DGGML_NATIVE=ON) ;;
  avx2) isa_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
                   -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX512_VBMI=OFF) ;;
  avx512) isa_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
                     -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON) ;;
  *) echo "bench_ggml.sh: --isa expects native, avx2 or avx512, got '$isa'" >&2; exit 2 ;;
esac
[[ -n "$build_dir" ]] || build_dir="/tmp/ggml-build/$(basename "$src")-$isa"

extra=()
command -v ccache >/dev/null && extra+=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
command -v ninja >/dev/null && extra+=(-G Ninja)
# ik_llama.cpp: FlashAttention for every K/V type is a large share of the build and unused here
# (GGML_IQK_FLASH_ATTENTION=OFF itself does not link: ggml.c still calls iqk_flash_attn_noalibi).
[[ -f "$ggml_dir/include/ggml-cpu.h" ]] || extra+=(-DGGML_IQK_FLASH_ATTENTION=ON -DGGML_IQK_FA_ALL_QUANTS=OFF)

echo "bench_ggml.sh: building $ggml_dir ($isa) in $build_dir" >&2
cmake -S "$here/ggml_harness" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DGGML_SOURCE_DIR="$ggml_dir" \
  -DGGML_OPENMP=ON "${isa_flags[@]}" "${extra[@]}" >"$build_dir.configure.log" 2>&1 ||
  { tail -30 "$build_dir.configure.log" >&2; exit 1; }
nice cmake --build "$build_dir" --target ggml_harness -j "$jobs" >"$build_dir.build.log" 2>&1 ||
  { tail -30 "$build_dir.build.log" >&2; exit 1; }
harness="$build_dir/ggml_harness"
if [[ $build_only == 1 ]]; then echo "$harness"; exit 0; fi

rev=""
if git -C "$src" rev-parse --short HEAD >/dev/null 2>&1; then rev="$(git -C "$src" rev-parse --short HEAD)"; fi
exec "$harness" --label="$(basename "$src")${rev:+@$rev} isa=$isa" "$@"
