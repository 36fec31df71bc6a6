// The per-ISA kernel table. Each ISA folder (rows of isa.def) exports one constant KernelTable
// whose entries are those of kernels.def; dispatch.cpp completes every null entry from the tier
// below and picks one table per process. Entries are single-threaded and work on a range; ops.h
// splits work across threads and calls them.
#pragma once
#include <cstdint>

#include "msbnb/kernels/formats.h"
#include "msbnb/kernels/matmul.h"
#include "msbnb/kernels/types.h"

namespace msbnb::kernels {

struct KernelTable {
  Isa isa;
  // One field per MSBNB_KERNEL row of kernels.def (the contract of each entry is documented there).
#define MSBNB_KERNEL(name, params) void(*name) params;
#define MSBNB_MATMUL_KERNEL(name, params)
#include "msbnb/kernels/kernels.def"
#undef MSBNB_KERNEL
#undef MSBNB_MATMUL_KERNEL
  /// Fused dequantize-matmul kernels (matmul.h).
  MatmulKernels matmul;
};

/// True if this CPU can run `isa` (cpuid, and the OS saves the registers).
bool isa_supported(Isa isa);
/// Best ISA of this CPU, or the one forced by MSBNB_ISA=<any id of isa.def> (throws
/// std::runtime_error naming the variable, the value and the accepted ids if the value is
/// unknown or the CPU lacks it).
Isa active_isa();
/// The table of the active ISA, chosen once per process.
const KernelTable& active_kernels();
/// The table of `isa`, for tests and benchmarks; throws if the CPU lacks it.
const KernelTable& kernels_for(Isa isa);
/// Parses an id of isa.def ("scalar", "avx2", "avx512_vnni", ...); throws std::invalid_argument.
Isa isa_from_name(const char* name);
/// The ISA whose table fills this one's null entries: the row above of the same architecture
/// (scalar for the lowest tier, scalar itself for scalar).
Isa isa_base(Isa isa);
/// "scalar, avx2, ...": every id of isa.def, for messages.
const char* isa_names();

}  // namespace msbnb::kernels
