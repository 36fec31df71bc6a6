// AVX-512 nearest-code search of a 256-entry codebook (Lut8), shared by the blockwise 8-bit
// quantizer (lut.cpp) and the 8-bit optimizer steps (optim8.cpp). Private to this folder, in an
// unnamed namespace (each translation unit keeps its own copy, see kernels/scalar_math.h).
#pragma once
#include "kernels/x86/avx512/simd.h"

namespace msbnb::kernels::MSBNB_ISA_NS {
namespace {

// sorted_position256 (p += mid[p + step - 1] < x ? step : 0 for step = 128 .. 1) without
// gathers: before the step of size s, p is a multiple of 2s, so that step compares against one
// of the 128 / s values mid[j * 2s + s - 1], j = p / 2s, picked by in-register permutes.
struct Search8 {
  __m512 top;                  // mid[127]
  __m512 c64, c32, c16, c8;    // the 2, 4, 8, 16 candidates of steps 64 .. 8 (vpermps)
  __m512 c4[2], c2[4], c1[8];  // the 32, 64, 128 candidates of steps 4, 2, 1 (vpermt2ps trees)

  explicit Search8(const float* mid) {
    alignas(64) float c[128];
    auto fill = [&](int step, __m512* v, int nvec) {
      for (int j = 0; j < 16 * nvec; ++j) c[j] = j < 128 / step ? mid[j * 2 * step + step - 1] : 0.0f;
      for (int k = 0; k < nvec; ++k) v[k] = _mm512_load_ps(c + 16 * k);
    };
    top = _mm512_set1_ps(mid[127]);
    fill(64, &c64, 1);
    fill(32, &c32, 1);
    fill(16, &c16, 1);
    fill(8, &c8, 1);
    fill(4, c4, 2);
    fill(2, c2, 4);
    fill(1, c1, 8);
  }

  // One step: p += step where the candidate is below x.
  static __m512i advance(__m512i p, __m512 cand, __m512 xn, int step) {
    return _mm512_mask_add_epi32(p, _mm512_cmp_ps_mask(cand, xn, _CMP_LT_OQ), p, _mm512_set1_epi32(step));
  }

  __m512i position(__m512 xn) const {
    __m512i p = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(top, xn, _CMP_LT_OQ), _mm512_set1_epi32(128));
    p = advance(p, _mm512_permutexvar_ps(_mm512_srli_epi32(p, 7), c64), xn, 64);
    p = advance(p, _mm512_permutexvar_ps(_mm512_srli_epi32(p, 6), c32), xn, 32);
    p = advance(p, _mm512_permutexvar_ps(_mm512_srli_epi32(p, 5), c16), xn, 16);
    p = advance(p, _mm512_permutexvar_ps(_mm512_srli_epi32(p, 4), c8), xn, 8);
    __m512i j = _mm512_srli_epi32(p, 3);  // < 32
    p = advance(p, _mm512_permutex2var_ps(c4[0], j, c4[1]), xn, 4);
    j = _mm512_srli_epi32(p, 2);  // < 64
    __mmask16 b5 = _mm512_test_epi32_mask(j, _mm512_set1_epi32(32));
    p = advance(p,
                _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(c2[0], j, c2[1]),
                                     _mm512_permutex2var_ps(c2[2], j, c2[3])),
                xn, 2);
    j = _mm512_srli_epi32(p, 1);  // < 128
    b5 = _mm512_test_epi32_mask(j, _mm512_set1_epi32(32));
    const __mmask16 b6 = _mm512_test_epi32_mask(j, _mm512_set1_epi32(64));
    const __m512 lo = _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(c1[0], j, c1[1]),
                                           _mm512_permutex2var_ps(c1[2], j, c1[3]));
    const __m512 hi = _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(c1[4], j, c1[5]),
                                           _mm512_permutex2var_ps(c1[6], j, c1[7]));
    return advance(p, _mm512_mask_blend_ps(b6, lo, hi), xn, 1);
  }
};

}  // namespace
}  // namespace msbnb::kernels::MSBNB_ISA_NS
