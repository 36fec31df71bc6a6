#!/usr/bin/env bash
# Configures and builds msbnb (Release, warnings are errors) into build/release.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=Release -DMSBNB_WERROR=ON "$@" >/dev/null
# Two cores: building with torch headers needs about 1.5 GiB per job.
ninja -C build/release -j "$(nproc)"
