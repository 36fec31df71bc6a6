#!/usr/bin/env bash
# The whole test suite: install, build with -Werror, check formatting, run every test (each ISA
# tier this CPU has; the others are reported SKIPPED), check the per-ISA objects for weak symbols,
# install the package and build an out-of-tree consumer against it, cross-build the kernels for
# aarch64 and run their tests under qemu, then the sanitizer stage and the libFuzzer targets.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
echo "== CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
for f in avx2 avx512f avx512_vnni avx512_bf16; do
  grep -qw "$f" /proc/cpuinfo && echo "   has $f" || echo "   lacks $f (its kernels are compiled, their tests SKIPPED)"
done
echo "== tests (Release, -Werror)"
ctest --test-dir build/release --output-on-failure -j "$(nproc)"
echo "== weak symbols in the per-ISA objects (Release)"
bash scripts/check_weak_symbols.sh build/release
echo "== cmake --install + find_package(msbnb CONFIG) consumer"
bash scripts/test_install.sh build/release
echo "== aarch64: cross-built kernels and their tests under qemu-aarch64-static"
bash scripts/test_aarch64.sh
echo "== every test under AddressSanitizer + UndefinedBehaviorSanitizer"
bash scripts/test_sanitize.sh
echo "== libFuzzer: safetensors header and quant_state JSON parsers (60 s each)"
bash scripts/test_fuzz.sh
