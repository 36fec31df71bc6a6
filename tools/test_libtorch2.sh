#!/usr/bin/env bash
# Builds msbnb against the libtorch 2.x that PyPI's torch wheel bundles and runs the whole test
# suite (Release, -Werror) with it. Not part of run_tests.sh: the wheel and its CUDA libraries
# are several GB. Debian's libtorch 1.13 stays the default build.
#
#   tools/test_libtorch2.sh [VENV] [BUILD_DIR]
#
# VENV: a virtual environment outside the repository; created and given `pip install torch` if
# it has no torch. Default: ../venv next to the checkout if it already has torch, else
# ../venv-torch2. BUILD_DIR: default build/torch2.
set -euo pipefail
cd "$(dirname "$0")/.."
parent=$(realpath ..)
venv=${1:-}
if [ -z "$venv" ]; then
  venv="$parent/venv-torch2"
  if "$parent/venv/bin/python" -c 'import torch' 2>/dev/null; then venv="$parent/venv"; fi
fi
build=${2:-build/torch2}
case "$(realpath -m "$venv")/" in
  "$(realpath .)"/*) echo "libtorch2: the venv must be outside the repository, not $venv"; exit 1 ;;
esac
if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  echo "libtorch2: installing torch into $venv (several GB)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet torch
fi
py="$venv/bin/python"
read -r version prefix abi cuda < <("$py" -c 'import torch
print(torch.__version__, torch.utils.cmake_prefix_path, int(torch._C._GLIBCXX_USE_CXX11_ABI), torch.version.cuda)')
echo "libtorch2: torch $version (CUDA $cuda, _GLIBCXX_USE_CXX11_ABI=$abi) from $prefix"
# Our own code and the system GoogleTest are built with the compiler's default ABI (the C++11 one
# since GCC 5); a wheel with the old ABI could not link against them.
[ "$abi" = 1 ] || { echo "libtorch2: this torch uses the pre-C++11 ABI; msbnb's tests need the C++11 one"; exit 1; }

# A CUDA wheel's TorchConfig looks for a CUDA toolkit (nvcc, headers) even though msbnb uses none
# of it; without one, configuring fails in Caffe2's cuda.cmake. It also puts the toolkit's lib
# folder on the executables' -rpath, which ld searches before libtorch_cuda.so's own RPATH
# ($ORIGIN/../../nvidia/*/lib): with an older toolkit ld takes its libnccl.so.2 and fails on
# missing nccl* symbols. -rpath-link to the wheel's nvidia libraries makes the link see the
# libraries the loader will load.
site=$("$py" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
nvidia_libs=$(find "$site/nvidia" -mindepth 2 -maxdepth 3 -type d -name lib 2>/dev/null | sort | paste -sd: || true)
mkdir -p "$build"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMSBNB_WERROR=ON -DMSBNB_BUILD_BENCH=OFF \
  -DMSBNB_FORMAT_CHECK=OFF -DCMAKE_PREFIX_PATH="$prefix" \
  "-DCMAKE_EXE_LINKER_FLAGS=${nvidia_libs:+-Wl,-rpath-link,$nvidia_libs}" >"$build/configure.log" 2>&1 ||
  { cat "$build/configure.log"; exit 1; }
grep -q "^Torch_DIR:PATH=$prefix" "$build/CMakeCache.txt" ||
  { echo "libtorch2: $build uses $(grep '^Torch_DIR' "$build/CMakeCache.txt"), not $prefix"; exit 1; }
ninja -C "$build" -j "$(nproc)"
ctest --test-dir "$build" --output-on-failure -j "$(nproc)"
echo "libtorch2: every test passed against torch $version"
