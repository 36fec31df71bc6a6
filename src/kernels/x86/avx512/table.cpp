// One folder, three rows of isa.def (avx512, avx512_vnni, avx512_bf16): the kernels that need
// VNNI or BF16 are compiled only with those flags and left null below them (dispatch.cpp fills
// them from the tier below: avx512's int8_i8 is avx2's).
#if !defined(__AVX512VNNI__)
#define MSBNB_LACKS_int8_i8 MSBNB_LACKS
#define MSBNB_LACKS_lut4_i8 MSBNB_LACKS
#define MSBNB_LACKS_lut4_q8 MSBNB_LACKS
#endif
#if !defined(__AVX512BF16__)
#define MSBNB_LACKS_lut4_bf16 MSBNB_LACKS
#endif
#include "kernels/isa_table.h"
