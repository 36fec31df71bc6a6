// The table of the ISA folder being compiled (namespace MSBNB_ISA_NS), one entry per row of
// kernels.def. Its table.cpp includes this once; before that, a folder without an entry (or a
// row whose flags lack what the entry needs) marks it null with
//   #define MSBNB_LACKS_<name> MSBNB_LACKS
// and dispatch.cpp fills it from the tier below.
#pragma once
#include "kernels/isa_kernels.h"

#if !defined(MSBNB_ISA_NS)
#error "isa_table.h: compile the ISA folder with -DMSBNB_ISA_NS=<isa.def id> (cmake/isa.cmake does)"
#endif

// MSBNB_ENTRY(name) is nullptr if MSBNB_LACKS_<name> is defined as MSBNB_LACKS, else name: the
// probe expands to two arguments and shifts the 1 into SECOND's place.
#define MSBNB_LACKS ~, 1
#define MSBNB_CAT_(a, b) a##b
#define MSBNB_CAT(a, b) MSBNB_CAT_(a, b)
#define MSBNB_SECOND_(a, b, ...) b
#define MSBNB_SECOND(...) MSBNB_SECOND_(__VA_ARGS__)
#define MSBNB_IS_LACKING(name) MSBNB_SECOND(MSBNB_CAT(MSBNB_LACKS_, name), 0, ~)
#define MSBNB_PICK_0(name) name
#define MSBNB_PICK_1(name) nullptr
#define MSBNB_ENTRY(name) MSBNB_CAT(MSBNB_PICK_, MSBNB_IS_LACKING(name))(name)

namespace msbnb::kernels::MSBNB_ISA_NS {
namespace {
constexpr KernelTable make_table() {
  KernelTable t{};
  t.isa = Isa::MSBNB_ISA_NS;
#define MSBNB_KERNEL(name, params) t.name = MSBNB_ENTRY(name);
#define MSBNB_MATMUL_KERNEL(name, params) t.matmul.name = MSBNB_ENTRY(name);
#include "msbnb/kernels/kernels.def"
#undef MSBNB_KERNEL
#undef MSBNB_MATMUL_KERNEL
  return t;
}
}  // namespace

// Constant-initialised: no static-initialisation order with dispatch.cpp.
constexpr KernelTable table = make_table();

}  // namespace msbnb::kernels::MSBNB_ISA_NS
