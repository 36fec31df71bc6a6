// AVX2 nearest-code search of a 256-entry codebook (Lut8), shared by the blockwise 8-bit quantizer
// (lut.cpp) and the 8-bit optimizer steps (optim8.cpp). Private to this folder, in an unnamed
// namespace (each translation unit keeps its own copy, see kernels/scalar_math.h).
#pragma once
#include "kernels/x86/avx2/simd.h"
#include "msbnb/kernels/formats.h"

namespace msbnb::kernels::MSBNB_ISA_NS {
namespace {

// The reference's branch-free search, p += (mid[p + step - 1] < xn) ? step : 0 for step = 128 ..
// 1, with the same compares on the same mid values (so it matches for any mid table). Before the
// step-s compare p is a multiple of 2s, so steps 128 .. 4 need at most 32 distinct mids: they come
// from registers by permutes (gathers are slow on some CPUs); steps 2, 1 and sorted_to_code gather.
struct Lut8Search {
  __m256 t128, t64, t32, t16, t8[2], t4[4];  // t_s[k] = mid[2sk + s - 1], 8 per register
  const Lut8* lut;

  explicit Lut8Search(const Lut8* l) : lut(l) {
    const float* m = l->mid;
    t128 = _mm256_set1_ps(m[127]);
    t64 = _mm256_setr_ps(m[63], m[191], 0, 0, 0, 0, 0, 0);
    t32 = _mm256_setr_ps(m[31], m[95], m[159], m[223], 0, 0, 0, 0);
    t16 = _mm256_setr_ps(m[15], m[47], m[79], m[111], m[143], m[175], m[207], m[239]);
    const __m256i by16 = _mm256_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112);
    const __m256i by8 = _mm256_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56);
    for (int r = 0; r < 2; ++r) t8[r] = _mm256_i32gather_ps(m + 128 * r + 7, by16, 4);
    for (int r = 0; r < 4; ++r) t4[r] = _mm256_i32gather_ps(m + 64 * r + 3, by8, 4);
  }

  // Lane j: (sign of sel[j] ? b : a)[idx[j] & 7].
  static __m256 pick(__m256 a, __m256 b, __m256i idx, __m256 sel) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(a, idx), _mm256_permutevar8x32_ps(b, idx), sel);
  }

  static __m256i step(__m256i p, __m256 m, __m256 xn, int s) {
    const __m256i lt = _mm256_castps_si256(_mm256_cmp_ps(m, xn, _CMP_LT_OQ));
    return _mm256_add_epi32(p, _mm256_and_si256(lt, _mm256_set1_epi32(s)));
  }

  // Sorted positions of 8 normalised values (sorted_position256), as int32.
  __m256i position(__m256 xn) const {
    __m256i p = step(_mm256_setzero_si256(), t128, xn, 128);
    p = step(p, _mm256_permutevar8x32_ps(t64, _mm256_srli_epi32(p, 7)), xn, 64);
    p = step(p, _mm256_permutevar8x32_ps(t32, _mm256_srli_epi32(p, 6)), xn, 32);
    p = step(p, _mm256_permutevar8x32_ps(t16, _mm256_srli_epi32(p, 5)), xn, 16);
    // 16 / 32 candidates: permps reads bits 0-2 of p >> 4 (p >> 3); bits 6 and 7 of p, moved to
    // the sign bit, pick the register.
    const __m256 bit7 = _mm256_castsi256_ps(_mm256_slli_epi32(p, 24));
    const __m256i i8 = _mm256_srli_epi32(p, 4);
    p = step(p, pick(t8[0], t8[1], i8, bit7), xn, 8);
    const __m256i i4 = _mm256_srli_epi32(p, 3);
    const __m256 bit6 = _mm256_castsi256_ps(_mm256_slli_epi32(p, 25));
    const __m256 m01 = pick(t4[0], t4[1], i4, bit6), m23 = pick(t4[2], t4[3], i4, bit6);
    p = step(p, _mm256_blendv_ps(m01, m23, bit7), xn, 4);
    p = step(p, _mm256_i32gather_ps(lut->mid + 1, p, 4), xn, 2);
    return step(p, _mm256_i32gather_ps(lut->mid, p, 4), xn, 1);
  }

  // Codes of 8 normalised values, as int32 (the low byte is the stored code).
  __m256i codes(__m256 xn) const { return _mm256_i32gather_epi32(lut->sorted_to_code, position(xn), 4); }
};

}  // namespace
}  // namespace msbnb::kernels::MSBNB_ISA_NS
