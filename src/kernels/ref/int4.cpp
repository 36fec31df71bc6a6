// Scalar reference: int4 per group, qint4x2 packing (DESIGN.md "int4 per-group").
#include "kernels/isa_kernels.h"
#include "kernels/scalar_math.h"

namespace msbnb::kernels::MSBNB_ISA_NS {

void quantize_int4(const void* x, DType dt, int64_t rows, int64_t cols, int64_t gs, const float* scale,
                   const int32_t* zero_point, uint8_t* packed) {
  const int64_t groups = ceil_div(cols, gs), row_bytes = (cols + 1) / 2;
  const float lo = zero_point ? 0.0f : -7.0f, hi = zero_point ? 15.0f : 7.0f;
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* dst = packed + r * row_bytes;
    for (int64_t c = 0; c < row_bytes * 2; ++c) {
      int32_t q = 0;  // odd cols: the pad nibble is 0
      if (c < cols) {
        const int64_t g = r * groups + c / gs;
        const float zp = zero_point ? static_cast<float>(zero_point[g]) : 0.0f;
        q = quantize_affine(load_elem(x, dt, r * cols + c), scale[g], zp, lo, hi);
      }
      const uint8_t nib = static_cast<uint8_t>(q & 0xf);
      if (c % 2 == 0)
        dst[c / 2] = nib;
      else
        dst[c / 2] = static_cast<uint8_t>(dst[c / 2] | (nib << 4));
    }
  }
}

void dequantize_int4(const uint8_t* packed, int64_t rows, int64_t cols, int64_t gs, const float* scale,
                     const int32_t* zero_point, float* out) {
  const int64_t groups = ceil_div(cols, gs), row_bytes = (cols + 1) / 2;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const uint8_t byte = packed[r * row_bytes + c / 2];
      int32_t q = (c % 2 == 0) ? (byte & 0xf) : (byte >> 4);
      const int64_t g = r * groups + c / gs;
      if (!zero_point) q = (q ^ 8) - 8;  // sign-extend the two's-complement nibble
      const int32_t zp = zero_point ? zero_point[g] : 0;
      out[r * cols + c] = static_cast<float>(q - zp) * scale[g];
    }
  }
}

}  // namespace msbnb::kernels::MSBNB_ISA_NS
