// AVX2 int8 affine quantize / dequantize. Same operations in the same order as the reference
// (x / scale, round to nearest even, + zp, max(lo) then min(hi), truncate), so every result is
// bit-identical; the last n % 8 elements of a block go through the scalar helpers.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels/isa_kernels.h"
#include "kernels/scalar_math.h"

namespace msbnb::kernels::avx2 {
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

// clamp(rne(x / s) + zp, lo, hi) as int32. max_ps returns its second operand when the first is
// NaN, like std::fmax(NaN, lo) = lo.
inline __m256i quantize8(__m256 x, const AffineParams& p) {
  __m256 t = _mm256_round_ps(_mm256_div_ps(x, p.s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  t = _mm256_add_ps(t, p.zp);
  t = _mm256_min_ps(_mm256_max_ps(t, p.lo), p.hi);
  return _mm256_cvttps_epi32(t);
}

// Low byte of each int32 (static_cast<int8_t> wraps, so mask before the saturating packs).
inline __m128i low_bytes8(__m256i q) {
  q = _mm256_and_si256(q, _mm256_set1_epi32(0xff));
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
  return _mm_packus_epi16(w, w);
}
inline __m256i low_bytes32(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i m = _mm256_set1_epi32(0xff);
  const __m256i ab = _mm256_packus_epi32(_mm256_and_si256(a, m), _mm256_and_si256(b, m));
  const __m256i cd = _mm256_packus_epi32(_mm256_and_si256(c, m), _mm256_and_si256(d, m));
  // Per 128-bit lane: a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7; put the dwords back in order.
  return _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

template <DType DT>
void quantize_int8_t(const void* x, int64_t start, int64_t n, int64_t bs, const float* scale,
                     const int32_t* zero_point, int32_t lo, int32_t hi, int8_t* q) {
  const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  // One segment per block; no division per block (it would cost as much as a short block).
  for (int64_t i = 0, b = start / bs; i < n; ++b) {
    const int64_t end = std::min(n, (b + 1) * bs - start);
    const float s = scale[b];
    const float zp = zero_point ? static_cast<float>(zero_point[b]) : 0.0f;
    if (s == 0.0f) {  // the whole block codes as zp
      const int8_t z = static_cast<int8_t>(quantize_affine(0.0f, s, zp, flo, fhi));
      std::memset(q + i, z, static_cast<size_t>(end - i));
      i = end;
      continue;
    }
    const AffineParams p = {_mm256_set1_ps(s), _mm256_set1_ps(zp), _mm256_set1_ps(flo), _mm256_set1_ps(fhi)};
    for (; i + 32 <= end; i += 32) {
      const __m256i r = low_bytes32(quantize8(load8<DT>(x, i), p), quantize8(load8<DT>(x, i + 8), p),
                                    quantize8(load8<DT>(x, i + 16), p), quantize8(load8<DT>(x, i + 24), p));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), r);
    }
    for (; i + 8 <= end; i += 8)
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), low_bytes8(quantize8(load8<DT>(x, i), p)));
    for (; i < end; ++i) q[i] = static_cast<int8_t>(quantize_affine(load_elem(x, DT, i), s, zp, flo, fhi));
  }
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
  // One segment per block; no division per block (it would cost as much as a short block).
  for (int64_t i = 0, b = start / bs; i < n; ++b) {
    const int64_t end = std::min(n, (b + 1) * bs - start);
    const float s = scale[b];
    const int32_t zp = zero_point ? zero_point[b] : 0;
    const __m256 vs = _mm256_set1_ps(s);
    const __m256i vz = _mm256_set1_epi32(zp);
    // (q - zp) in int32, to float (exact), times scale: the reference's operations.
    auto step8 = [&](int64_t j) {
      const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j)));
      _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(v, vz)), vs));
    };
    for (; i + 32 <= end; i += 32) {
      step8(i);
      step8(i + 8);
      step8(i + 16);
      step8(i + 24);
    }
    for (; i + 8 <= end; i += 8) step8(i);
    for (; i < end; ++i) out[i] = static_cast<float>(q[i] - zp) * s;
  }
}

}  // namespace msbnb::kernels::avx2
