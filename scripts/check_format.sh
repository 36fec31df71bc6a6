#!/usr/bin/env bash
# Fails if any C++ file differs from clang-format's output (.clang-format at the root).
set -euo pipefail
cd "$(dirname "$0")/.."
files=$(git ls-files '*.h' '*.cpp' 2>/dev/null || find include src tests bench examples -name '*.h' -o -name '*.cpp')
clang-format --dry-run -Werror $files
echo "clang-format: $(echo "$files" | wc -w) files clean"
