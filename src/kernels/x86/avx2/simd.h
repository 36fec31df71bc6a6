// Helpers shared by the AVX2 kernels of this folder. Private to it: every file here is compiled
// with the AVX2 flags, and everything is in an unnamed namespace so each translation unit keeps
// its own copy (see kernels/scalar_math.h). The AVX-512 folder has its own simd.h.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/walk.h"  // dispatch_dtype, for_each_block (shared by every ISA)
#include "msbnb/kernels/types.h"

namespace msbnb::kernels::MSBNB_ISA_NS {
namespace {

// 8 elements from x + i as float (exact for every f16 / bf16 value, denormals included).
template <DType DT>
inline __m256 load8(const void* x, int64_t i) {
  if constexpr (DT == DType::f32) {
    return _mm256_loadu_ps(static_cast<const float*>(x) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
    if constexpr (DT == DType::f16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

struct AffineParams {
  __m256 s, zp, lo, hi;
};

// clamp(rne(x / s) + zp, lo, hi) as int32, in the reference's order. max_ps returns its second
// operand when the first is NaN, like std::fmax(NaN, lo) = lo.
inline __m256i quantize8(__m256 x, const AffineParams& p) {
  __m256 t = _mm256_round_ps(_mm256_div_ps(x, p.s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  t = _mm256_add_ps(t, p.zp);
  t = _mm256_min_ps(_mm256_max_ps(t, p.lo), p.hi);
  return _mm256_cvttps_epi32(t);
}

// float(q - zp) * s: the reference's operations (q - zp in int32, exact to float, times scale).
inline __m256 dequant8(__m256i q, __m256i zp, __m256 s) {
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, zp)), s);
}

// Low byte of each int32 (static_cast<int8_t> / <uint8_t> wraps, so mask before the saturating packs).
inline __m128i low_bytes8(__m256i q) {
  q = _mm256_and_si256(q, _mm256_set1_epi32(0xff));
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
  return _mm_packus_epi16(w, w);
}

// 16 int32 in [0, 255] (elements 0-7 in a, 8-15 in b) -> 16 bytes in element order.
inline __m128i bytes16(__m256i a, __m256i b) {
  const __m128i wa = _mm_packus_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  const __m128i wb = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  return _mm_packus_epi16(wa, wb);
}

// Which nibble of a packed byte holds the even element: qint4x2 (int4) puts it in the low one,
// the codebook formats (NF4 / FP4) in the high one.
enum class NibbleOrder { low_first, high_first };

// 16 codes, one per byte in element order -> 8 bytes (the low half), two codes per byte.
// low_first keeps the low nibble of each code; high_first needs codes < 16.
template <NibbleOrder O>
inline __m128i pack_nibbles(__m128i e) {
  // As 16-bit words: low byte = even element, high byte = odd element.
  __m128i w;
  if constexpr (O == NibbleOrder::low_first) {
    w = _mm_or_si128(_mm_and_si128(e, _mm_set1_epi16(0x000f)),
                     _mm_and_si128(_mm_srli_epi16(e, 4), _mm_set1_epi16(0x00f0)));
  } else {
    w = _mm_or_si128(_mm_and_si128(_mm_slli_epi16(e, 4), _mm_set1_epi16(0x00f0)), _mm_srli_epi16(e, 8));
  }
  return _mm_packus_epi16(w, w);
}

// max |x| over x[0, n) (n a multiple of the vector width), on the magnitude bits: exact, and NaN if
// any element is NaN (the int8 quantizers' absmax).
inline float max_abs(const float* x, int64_t n) {
  __m256i m = _mm256_setzero_si256();
  const __m256i abs = _mm256_set1_epi32(0x7fffffff);
  for (int64_t j = 0; j < n; j += 8)
    m = _mm256_max_epu32(m,
                         _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j)), abs));
  alignas(32) uint32_t l[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(l), m);
  const uint32_t bits = *std::max_element(l, l + 8);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace
}  // namespace msbnb::kernels::MSBNB_ISA_NS
