#include "kernels/isa_kernels.h"

namespace msbnb::kernels::scalar {

const KernelTable table = {
    Isa::scalar,     absmax_blocks,
    minmax_blocks,   quantize_int8,
    dequantize_int8, quantize_int4,
    dequantize_int4, quantize_lut4,
    dequantize_lut4, quantize_lut8,
    dequantize_lut8, {lut4_f32, int8_f32, lut4_bf16, int8_i8, lut4_t_f32, int8_t_f32, quantize_row_u8},
};

}  // namespace msbnb::kernels::scalar
