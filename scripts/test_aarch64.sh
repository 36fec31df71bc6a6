#!/usr/bin/env bash
# Cross-compiles the kernels library and its tests for aarch64 (scalar path only: no torch, no
# bench / examples) with Debian's aarch64-linux-gnu-g++, and runs the kernel tests under
# qemu-aarch64-static. Idempotent: googletest is cross-built once into build/aarch64/gtest.
# Needs: g++-aarch64-linux-gnu qemu-user-static libgtest-dev (scripts/setup.sh installs them).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${MSBNB_AARCH64_BUILD:-$root/build/aarch64}"
jobs="${JOBS:-$(nproc)}"
for tool in aarch64-linux-gnu-g++ qemu-aarch64-static; do
  command -v "$tool" >/dev/null || { echo "test_aarch64: $tool missing (run scripts/setup.sh)" >&2; exit 1; }
done
[ -d /usr/src/googletest ] || { echo "test_aarch64: /usr/src/googletest missing (libgtest-dev)" >&2; exit 1; }
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)

# googletest for aarch64, from the sources libgtest-dev ships.
prefix="$out/gtest"
if [ ! -f "$prefix/lib/cmake/GTest/GTestConfig.cmake" ]; then
  cmake -S /usr/src/googletest -B "$out/gtest-build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_TOOLCHAIN_FILE="$root/cmake/aarch64-linux-gnu.cmake" -DCMAKE_INSTALL_PREFIX="$prefix" \
    -DBUILD_GMOCK=OFF -DINSTALL_GTEST=ON "${launcher[@]}" >/dev/null
  cmake --build "$out/gtest-build" -j "$jobs" >/dev/null
  cmake --install "$out/gtest-build" >/dev/null
fi

cmake -S "$root" -B "$out/msbnb" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DMSBNB_WERROR=ON \
  -DCMAKE_TOOLCHAIN_FILE="$root/cmake/aarch64-linux-gnu.cmake" -DMSBNB_AARCH64_PREFIX="$prefix" \
  -DCMAKE_PREFIX_PATH="$prefix" -DMSBNB_WITH_TORCH=OFF -DMSBNB_BUILD_BENCH=OFF -DMSBNB_BUILD_EXAMPLES=OFF \
  -DMSBNB_FORMAT_CHECK=OFF "${launcher[@]}" >/dev/null
cmake --build "$out/msbnb" -j "$jobs"
file "$out/msbnb/tests/msbnb_kernel_tests" | grep -q "ARM aarch64" ||
  { echo "test_aarch64: msbnb_kernel_tests is not an aarch64 binary" >&2; exit 1; }
# ctest runs each test through CMAKE_CROSSCOMPILING_EMULATOR (qemu-aarch64-static).
(cd "$out/msbnb" && ctest --output-on-failure -j "$jobs" -R '^kernels\.')
echo "test_aarch64: kernel tests passed under qemu-aarch64-static"
