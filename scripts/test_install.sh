#!/usr/bin/env bash
# Installs a built msbnb into a temporary prefix, then configures, builds and runs
# tests/install_consumer against it (find_package(msbnb CONFIG), msbnb::kernels, msbnb::msbnb)
# from outside the source tree. Usage: test_install.sh [build dir, default build/release].
set -euo pipefail
cd "$(dirname "$0")/.."
build=$(realpath "${1:-build/release}")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
# The consumer must find msbnb from the installed tree only (not the build tree's package registry).
cmake -S tests/install_consumer -B "$tmp/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$tmp/prefix" -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF -DCMAKE_CXX_FLAGS="-Wall -Wextra -Werror" \
  >"$tmp/configure.log" ||
  { cat "$tmp/configure.log"; exit 1; }
grep -q "msbnb_DIR:PATH=$tmp/prefix/" "$tmp/build/CMakeCache.txt" || { echo "install: msbnb not found in $tmp/prefix"; exit 1; }
ninja -C "$tmp/build" >/dev/null || { ninja -C "$tmp/build"; exit 1; }
ctest --test-dir "$tmp/build" -V >"$tmp/ctest.log" 2>&1 || { cat "$tmp/ctest.log"; exit 1; }
grep -E '^[0-9]+: consumer_|tests passed' "$tmp/ctest.log"
echo "install: $(find "$tmp/prefix" -type f | wc -l) files installed; the consumer built and ran against them"
