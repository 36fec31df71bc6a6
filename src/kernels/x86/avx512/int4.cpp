// AVX-512: int4 per group, qint4x2 packing (LOW nibble first), bit-identical to ref/int4.cpp.
#include <algorithm>

#include "kernels/isa_kernels.h"
#include "kernels/scalar_math.h"
#include "kernels/x86/avx512/simd.h"

namespace msbnb::kernels::MSBNB_ISA_NS {

namespace {

// quantize_affine of x elements [i, i + len) into one byte each (its low nibble is the code).
template <DType D>
void quantize_segment(const void* x, int64_t i, int64_t len, float s, float zp, float lo, float hi,
                      uint8_t* q) {
  if (s == 0.0f) {
    std::fill(q, q + len, static_cast<uint8_t>(static_cast<int32_t>(zp)));
    return;
  }
  const Affine f{_mm512_set1_ps(s), _mm512_set1_ps(zp), _mm512_set1_ps(lo), _mm512_set1_ps(hi)};
  for (int64_t k = 0; k < len; k += 16) {
    const __mmask16 m = mask_upto16(len - k);
    _mm512_mask_cvtepi32_storeu_epi8(q + k, m, f(load16<D>(x, i + k, m)));
  }
}

template <DType D>
void quantize_int4_t(const void* x, int64_t rows, int64_t cols, int64_t gs, const float* scale,
                     const int32_t* zero_point, uint8_t* packed) {
  const int64_t groups = ceil_div(cols, gs), row_bytes = (cols + 1) / 2;
  const float lo = zero_point ? 0.0f : -7.0f, hi = zero_point ? 15.0f : 7.0f;
  alignas(64) uint8_t buf[kTile];
  for (int64_t r = 0; r < rows; ++r) {
    // Columns [c, c + len) of group gi of row r; odd cols: the pad nibble is 0.
    code_and_pack<NibbleOrder::low_first>(
        0, cols, gs, 0, buf, packed + r * row_bytes, [&](int64_t gi, int64_t c, int64_t len, uint8_t* q) {
          const int64_t g = r * groups + gi;
          const float zp = zero_point ? static_cast<float>(zero_point[g]) : 0.0f;
          quantize_segment<D>(x, r * cols + c, len, scale[g], zp, lo, hi, q);
        });
  }
}

// out[c] = tbl[nibble c] for c in [c, end) of one row; src is the row's first byte.
void dequant_segment(const uint8_t* src, int64_t c, int64_t end, __m512 tbl, float* out) {
  if (c % 2 && c < end) {  // odd start (odd group size): the high nibble of a shared byte
    alignas(64) float t[16];
    _mm512_store_ps(t, tbl);
    out[c] = t[src[c / 2] >> 4];
    ++c;
  }
  lookup_nibbles<NibbleOrder::low_first>(src, c, end, tbl, out);
}

}  // namespace

void quantize_int4(const void* x, DType dt, int64_t rows, int64_t cols, int64_t gs, const float* scale,
                   const int32_t* zero_point, uint8_t* packed) {
  dispatch_dtype(
      dt, [&](auto d) { quantize_int4_t<decltype(d)::value>(x, rows, cols, gs, scale, zero_point, packed); });
}

void dequantize_int4(const uint8_t* packed, int64_t rows, int64_t cols, int64_t gs, const float* scale,
                     const int32_t* zero_point, float* out) {
  const int64_t groups = ceil_div(cols, gs), row_bytes = (cols + 1) / 2;
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // Nibble value per code: two's complement (q ^ 8) - 8 when symmetric.
  const __m512i q =
      zero_point ? iota
                 : _mm512_sub_epi32(_mm512_xor_si512(iota, _mm512_set1_epi32(8)), _mm512_set1_epi32(8));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int64_t g = r * groups + gi;
      // The 16 possible outputs of this group, each (q - zp) * scale as the reference computes it.
      const __m512 tbl =
          dequant16(q, _mm512_set1_epi32(zero_point ? zero_point[g] : 0), _mm512_set1_ps(scale[g]));
      dequant_segment(packed + r * row_bytes, gi * gs, std::min(cols, (gi + 1) * gs), tbl, out + r * cols);
    }
  }
}

}  // namespace msbnb::kernels::MSBNB_ISA_NS
