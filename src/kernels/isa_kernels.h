// Declarations of the ISA kernels, generated from kernels.def: each ISA folder defines these names
// in its own namespace msbnb::kernels::MSBNB_ISA_NS (CMake passes -DMSBNB_ISA_NS=<isa.def id>, so a
// folder compiled for several rows never defines one symbol twice) and one `table` (isa_table.h).
// The scalar reference is declared everywhere: SIMD files fall back to it for odd layouts.
#pragma once
#include "msbnb/kernels/kernel_table.h"

#define MSBNB_KERNEL(name, params) void name params;
#define MSBNB_MATMUL_KERNEL(name, params) void name params;
namespace msbnb::kernels::scalar {
#include "msbnb/kernels/kernels.def"
}  // namespace msbnb::kernels::scalar
#if defined(MSBNB_ISA_NS)
namespace msbnb::kernels::MSBNB_ISA_NS {
#include "msbnb/kernels/kernels.def"
}  // namespace msbnb::kernels::MSBNB_ISA_NS
#endif
#undef MSBNB_KERNEL
#undef MSBNB_MATMUL_KERNEL

// Every row's table (only the rows of the target architecture are built; see dispatch.cpp).
#define MSBNB_ISA(id, arch, folder, features, flags) \
  namespace msbnb::kernels::id {                     \
  extern const KernelTable table;                    \
  }
#include "msbnb/kernels/isa.def"
#undef MSBNB_ISA
