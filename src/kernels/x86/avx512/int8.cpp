// AVX-512: int8 affine quantize / dequantize, bit-identical to ref/int8.cpp.
#include <algorithm>

#include "kernels/isa_kernels.h"
#include "kernels/scalar_math.h"
#include "kernels/x86/avx512/simd.h"

namespace msbnb::kernels::MSBNB_ISA_NS {

namespace {

// q[0, len) from x elements [i, i + len) of one block.
template <DType D>
void quantize_segment(const void* x, int64_t i, int64_t len, float s, float zp, float lo, float hi,
                      int8_t* q) {
  if (s == 0.0f) {
    std::fill(q, q + len, static_cast<int8_t>(static_cast<int32_t>(zp)));
    return;
  }
  const Affine f{_mm512_set1_ps(s), _mm512_set1_ps(zp), _mm512_set1_ps(lo), _mm512_set1_ps(hi)};
  int64_t k = 0;
  for (; k + 32 <= len; k += 32) {
    // Truncating narrow (vpmovdb) = static_cast<int8_t>.
    const __m128i a = _mm512_cvtepi32_epi8(f(load16<D>(x, i + k)));
    const __m128i b = _mm512_cvtepi32_epi8(f(load16<D>(x, i + k + 16)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k),
                        _mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1));
  }
  for (; k < len; k += 16) {
    const __mmask16 m = mask_upto16(len - k);
    _mm512_mask_cvtepi32_storeu_epi8(q + k, m, f(load16<D>(x, i + k, m)));
  }
}

template <DType D>
void quantize_int8_t(const void* x, int64_t start, int64_t n, int64_t bs, const float* scale,
                     const int32_t* zero_point, int32_t lo, int32_t hi, int8_t* q) {
  for_each_block(start, n, bs, [&](int64_t b, int64_t i, int64_t end) {
    const float zp = zero_point ? static_cast<float>(zero_point[b]) : 0.0f;
    quantize_segment<D>(x, i, end - i, scale[b], zp, static_cast<float>(lo), static_cast<float>(hi), q + i);
  });
}

// dequant16 of 16 int8 lanes.
inline __m512 dequant16_i8(__m128i q8, __m512i zp, __m512 s) {
  return dequant16(_mm512_cvtepi8_epi32(q8), zp, s);
}

}  // namespace

void quantize_int8(const void* x, DType dt, int64_t start, int64_t n, int64_t bs, const float* scale,
                   const int32_t* zero_point, int32_t lo, int32_t hi, int8_t* q) {
  dispatch_dtype(dt, [&](auto d) {
    quantize_int8_t<decltype(d)::value>(x, start, n, bs, scale, zero_point, lo, hi, q);
  });
}

void dequantize_int8(const int8_t* q, int64_t start, int64_t n, int64_t bs, const float* scale,
                     const int32_t* zero_point, float* out) {
  for_each_block(start, n, bs, [&](int64_t b, int64_t i, int64_t end) {
    const __m512i zp = _mm512_set1_epi32(zero_point ? zero_point[b] : 0);
    const __m512 s = _mm512_set1_ps(scale[b]);
    for (; i + 64 <= end; i += 64) {
      const __m512i v = _mm512_loadu_si512(q + i);
      _mm512_storeu_ps(out + i, dequant16_i8(_mm512_castsi512_si128(v), zp, s));
      _mm512_storeu_ps(out + i + 16, dequant16_i8(_mm512_extracti32x4_epi32(v, 1), zp, s));
      _mm512_storeu_ps(out + i + 32, dequant16_i8(_mm512_extracti32x4_epi32(v, 2), zp, s));
      _mm512_storeu_ps(out + i + 48, dequant16_i8(_mm512_extracti32x4_epi32(v, 3), zp, s));
    }
    for (; i < end; i += 16) {
      const __mmask16 m = mask_upto16(end - i);
      _mm512_mask_storeu_ps(out + i, m, dequant16_i8(_mm_maskz_loadu_epi8(m, q + i), zp, s));
    }
  });
}

}  // namespace msbnb::kernels::MSBNB_ISA_NS
