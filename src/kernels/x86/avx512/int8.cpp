// AVX-512: int8 affine quantize / dequantize, bit-identical to ref/int8.cpp.
// GCC 12 flags the intrinsics' own _mm512_undefined_*() as maybe-uninitialized once inlined
// (GCC bug 105593); the warning points into the header, so silence it there only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>

#include "kernels/isa_kernels.h"
#include "kernels/scalar_math.h"

namespace msbnb::kernels::avx512 {

namespace {

inline __mmask16 tail_mask16(int64_t k) { return static_cast<__mmask16>((1u << k) - 1u); }

// 16 elements from element i of x as float, exactly as load_elem (cvtph is exact for every
// half; a signalling NaN comes out quiet, which no quantized value depends on).
template <DType D>
inline __m512 load16(const void* x, int64_t i) {
  if constexpr (D == DType::f32) {
    return _mm512_loadu_ps(static_cast<const float*>(x) + i);
  } else {
    const __m256i h =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i));
    if constexpr (D == DType::f16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}
template <DType D>
inline __m512 load16(const void* x, int64_t i, __mmask16 m) {
  if constexpr (D == DType::f32) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(x) + i);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(x) + i);
    if constexpr (D == DType::f16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// quantize_affine on 16 lanes: same float ops in the same order. max_ps(t, lo) returns lo for a
// NaN t, as fmax does; t is a whole number in [lo, hi] afterwards, so the conversion is exact.
struct Affine {
  __m512 s, zp, lo, hi;
  __m512i operator()(__m512 x) const {
    __m512 t = _mm512_roundscale_ps(_mm512_div_ps(x, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    t = _mm512_add_ps(t, zp);
    t = _mm512_min_ps(_mm512_max_ps(t, lo), hi);
    return _mm512_cvtps_epi32(t);
  }
};

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
    const __mmask16 m = len - k >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask16(len - k);
    _mm512_mask_cvtepi32_storeu_epi8(q + k, m, f(load16<D>(x, i + k, m)));
  }
}

template <DType D>
void quantize_int8_t(const void* x, int64_t start, int64_t n, int64_t bs, const float* scale,
                     const int32_t* zero_point, int32_t lo, int32_t hi, int8_t* q) {
  // One segment [i, end) per block; a division only for the first one.
  for (int64_t b = start / bs, i = 0, end = std::min(n, (b + 1) * bs - start); i < n;
       i = end, ++b, end = std::min(n, end + bs)) {
    const float zp = zero_point ? static_cast<float>(zero_point[b]) : 0.0f;
    quantize_segment<D>(x, i, end - i, scale[b], zp, static_cast<float>(lo), static_cast<float>(hi), q + i);
  }
}

// out = float(q - zp) * s for 16 int8 lanes.
inline __m512 dequant16(__m128i q8, __m512i zp, __m512 s) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepi8_epi32(q8), zp)), s);
}

}  // namespace

void quantize_int8(const void* x, DType dt, int64_t start, int64_t n, int64_t bs, const float* scale,
                   const int32_t* zero_point, int32_t lo, int32_t hi, int8_t* q) {
  switch (dt) {
    case DType::f32:
      return quantize_int8_t<DType::f32>(x, start, n, bs, scale, zero_point, lo, hi, q);
    case DType::f16:
      return quantize_int8_t<DType::f16>(x, start, n, bs, scale, zero_point, lo, hi, q);
    case DType::bf16:
      return quantize_int8_t<DType::bf16>(x, start, n, bs, scale, zero_point, lo, hi, q);
  }
}

void dequantize_int8(const int8_t* q, int64_t start, int64_t n, int64_t bs, const float* scale,
                     const int32_t* zero_point, float* out) {
  // One segment [i, end) per block; a division only for the first one.
  for (int64_t b = start / bs, i = 0, end = std::min(n, (b + 1) * bs - start); i < n;
       i = end, ++b, end = std::min(n, end + bs)) {
    const __m512i zp = _mm512_set1_epi32(zero_point ? zero_point[b] : 0);
    const __m512 s = _mm512_set1_ps(scale[b]);
    for (; i + 64 <= end; i += 64) {
      const __m512i v = _mm512_loadu_si512(q + i);
      _mm512_storeu_ps(out + i, dequant16(_mm512_castsi512_si128(v), zp, s));
      _mm512_storeu_ps(out + i + 16, dequant16(_mm512_extracti32x4_epi32(v, 1), zp, s));
      _mm512_storeu_ps(out + i + 32, dequant16(_mm512_extracti32x4_epi32(v, 2), zp, s));
      _mm512_storeu_ps(out + i + 48, dequant16(_mm512_extracti32x4_epi32(v, 3), zp, s));
    }
    for (; i < end; i += 16) {
      const __mmask16 m = end - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask16(end - i);
      _mm512_mask_storeu_ps(out + i, m, dequant16(_mm_maskz_loadu_epi8(m, q + i), zp, s));
    }
  }
}

}  // namespace msbnb::kernels::avx512
