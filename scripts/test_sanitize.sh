#!/usr/bin/env bash
# The whole suite (kernels, torch layer, examples; every ISA this CPU has) built with
# AddressSanitizer + UndefinedBehaviorSanitizer (LeakSanitizer included) into build/sanitize.
# Debian's libtorch 1.13 needs no suppressions: it is not instrumented, its static state is not
# reported as leaked, and no new/delete mismatch, ODR or container-overflow report comes from it.
# -O1: the suite runs in about a minute instead of several at -O0; one ctest test per binary and
# ISA (MSBNB_TEST_PER_CASE=OFF), since each sanitized libtorch process takes seconds to start.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build/sanitize -G Ninja -DCMAKE_BUILD_TYPE=Debug "-DCMAKE_CXX_FLAGS_DEBUG=-O1 -g1" \
  -DMSBNB_SANITIZE=ON -DMSBNB_WERROR=ON -DMSBNB_WITH_TORCH=ON -DMSBNB_BUILD_EXAMPLES=ON -DMSBNB_TEST_PER_CASE=OFF \
  -DMSBNB_BUILD_BENCH=OFF -DMSBNB_FORMAT_CHECK=OFF >/dev/null
ninja -C build/sanitize -j "$(nproc)"
# A build without the runtimes would pass vacuously.
for exe in build/sanitize/tests/msbnb_kernel_tests build/sanitize/tests/msbnb_tests; do
  syms=$(nm "$exe")
  for sym in __asan_init __ubsan_handle_; do
    grep -q "$sym" <<<"$syms" || { echo "sanitize: $exe lacks $sym"; exit 1; }
  done
done
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:check_initialization_order=1:strict_init_order=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
ctest --test-dir build/sanitize --output-on-failure -j "$(nproc)"
