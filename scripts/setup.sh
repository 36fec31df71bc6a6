#!/usr/bin/env bash
# Installs the Debian 12 packages msbnb builds with, only those missing (as root, or via sudo).
set -euo pipefail
packages=(g++ cmake ninja-build clang-format libtorch-dev libopenblas0-pthread libgtest-dev libgmock-dev
          libbenchmark-dev nlohmann-json3-dev libcli11-dev clang libclang-rt-14-dev
          g++-aarch64-linux-gnu qemu-user-static zlib1g-dev dataset-fashion-mnist
          bible-kjv bible-kjv-text libgloo-dev python3)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present"
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
echo "setup: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
echo "setup: done"
