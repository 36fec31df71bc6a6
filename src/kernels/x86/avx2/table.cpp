// AVX2 table: every entry of kernels.def but these (dispatch.cpp fills them from the tier below).
#define MSBNB_LACKS_quantize_row_u8 MSBNB_LACKS
#include "kernels/isa_table.h"
