// Scalar reference: codebook formats. 4-bit (NF4, FP4: bitsandbytes quantize_4bit, HIGH nibble
// first) and 8-bit (dynamic map: bitsandbytes quantize_blockwise).
#include "kernels/isa_kernels.h"
#include "kernels/scalar_math.h"

namespace msbnb::kernels::MSBNB_ISA_NS {

void quantize_lut4(const void* x, DType dt, int64_t start, int64_t n, int64_t bs, const float* absmax,
                   const Lut4* lut, uint8_t* packed) {
  for (int64_t i = 0; i < n; i += 2) {
    uint8_t byte = 0;
    for (int64_t j = i; j < i + 2; ++j) {
      uint8_t q = lut->zero_code;  // odd n: pad with the code of 0
      if (j < n) {
        const float xn = load_elem(x, dt, j) * inverse_absmax(absmax[(start + j) / bs]);
        q = lut->sorted_to_code[sorted_position16(xn, lut->mid)];
      }
      byte = static_cast<uint8_t>(byte << 4 | q);
    }
    packed[i / 2] = byte;
  }
}

void dequantize_lut4(const uint8_t* packed, int64_t start, int64_t n, int64_t bs, const float* absmax,
                     const float* code16, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t byte = packed[i / 2];
    const int q = (i % 2 == 0) ? (byte >> 4) : (byte & 0xf);
    out[i] = code16[q] * absmax[(start + i) / bs];
  }
}

void quantize_lut8(const void* x, DType dt, int64_t start, int64_t n, int64_t bs, const float* absmax,
                   const Lut8* lut, uint8_t* q) {
  for (int64_t i = 0; i < n; ++i) {
    const Lut8Scale s = lut8_scale(absmax[(start + i) / bs]);
    const float xn = (load_elem(x, dt, i) * s.pre) * s.inv;
    q[i] = static_cast<uint8_t>(lut->sorted_to_code[sorted_position256(xn, lut->mid)]);
  }
}

void dequantize_lut8(const uint8_t* q, int64_t start, int64_t n, int64_t bs, const float* absmax,
                     const float* code256, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = code256[q[i]] * absmax[(start + i) / bs];
}

}  // namespace msbnb::kernels::MSBNB_ISA_NS
