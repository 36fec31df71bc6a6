// Scalar reference: int8 affine quantize / dequantize (DESIGN.md "int8").
#include "kernels/isa_kernels.h"
#include "kernels/scalar_math.h"

namespace msbnb::kernels::MSBNB_ISA_NS {

void quantize_int8(const void* x, DType dt, int64_t start, int64_t n, int64_t bs, const float* scale,
                   const int32_t* zero_point, int32_t lo, int32_t hi, int8_t* q) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = (start + i) / bs;
    const float zp = zero_point ? static_cast<float>(zero_point[b]) : 0.0f;
    q[i] = static_cast<int8_t>(
        quantize_affine(load_elem(x, dt, i), scale[b], zp, static_cast<float>(lo), static_cast<float>(hi)));
  }
}

void dequantize_int8(const int8_t* q, int64_t start, int64_t n, int64_t bs, const float* scale,
                     const int32_t* zero_point, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = (start + i) / bs;
    const int32_t zp = zero_point ? zero_point[b] : 0;
    out[i] = static_cast<float>(q[i] - zp) * scale[b];
  }
}

}  // namespace msbnb::kernels::MSBNB_ISA_NS
