#!/usr/bin/env bash
# Fails if a per-ISA kernel object defines a weak symbol (nm types W, V, u). A weak definition in
# an AVX-512 object (an inline function or template instantiated there) may be the copy the
# linker keeps for every caller, scalar ones included: AVX-512 code on a CPU without it
# (numpy/numpy#25274). Usage: check_weak_symbols.sh [build dir, default build/release].
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/release}
# DW.ref.__gxx_personality_v0 is data, not code: the pointer to the C++ personality routine that
# GCC emits (weak, identical everywhere) in every PIC object with exception tables.
allowed='^DW\.ref\.__gxx_personality_v0$'

isas=$(sed -n 's/^MSBNB_ISA(\([a-z0-9_]*\),.*/\1/p' include/msbnb/kernels/isa.def)
[ -n "$isas" ] || { echo "weak symbols: no MSBNB_ISA row in include/msbnb/kernels/isa.def"; exit 1; }
offenders=0
objects=0
for isa in $isas; do
  dir="$build/CMakeFiles/msbnb_kernels_$isa.dir"
  mapfile -t objs < <(find "$dir" -name '*.o' 2>/dev/null | sort)
  if [ ${#objs[@]} -eq 0 ]; then
    echo "weak symbols: no objects for ISA $isa under $dir (build $build first)"
    exit 1
  fi
  for o in "${objs[@]}"; do
    objects=$((objects + 1))
    # Mangled names for the allow-list, demangled ones for the report.
    while read -r type sym; do
      [[ $sym =~ $allowed ]] && continue
      offenders=$((offenders + 1))
      echo "  $isa ${o#"$dir"/}: $type $(echo "$sym" | c++filt)"
    done < <(nm --defined-only "$o" | awk '$2 ~ /^[WVu]$/ {print $2, $3}')
  done
done
if [ "$offenders" -ne 0 ]; then
  echo "weak symbols: $offenders weak definitions in the per-ISA objects above (make them static," \
    "put them in an anonymous or per-ISA namespace, or define them outside the ISA folders)"
  exit 1
fi
echo "weak symbols: none in $objects per-ISA objects ($(echo $isas))"
