#include "kernels/isa_kernels.h"

namespace msbnb::kernels::avx2 {

// Null entries fall back to the scalar reference (dispatch.cpp).
const KernelTable table = {
    Isa::avx2,       absmax_blocks, minmax_blocks,   quantize_int8, dequantize_int8, quantize_int4,
    dequantize_int4, quantize_lut4, dequantize_lut4, quantize_lut8, dequantize_lut8,
    {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr},
};

}  // namespace msbnb::kernels::avx2
