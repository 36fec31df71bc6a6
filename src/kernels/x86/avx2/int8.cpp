// AVX2 int8 affine quantize / dequantize. Same operations in the same order as the reference
// (x / scale, round to nearest even, + zp, max(lo) then min(hi), truncate), so every result is
// bit-identical; the last n % 8 elements of a block go through the scalar helpers.
#include <cstring>

#include "kernels/isa_kernels.h"
#include "kernels/scalar_math.h"
#include "kernels/x86/avx2/simd.h"

namespace msbnb::kernels::MSBNB_ISA_NS {
namespace {

// Low bytes of 32 int32 (a: elements 0-7, b: 8-15, ...), in element order.
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
  for_each_block(start, n, bs, [&](int64_t b, int64_t i, int64_t end) {
    const float s = scale[b];
    const float zp = zero_point ? static_cast<float>(zero_point[b]) : 0.0f;
    if (s == 0.0f) {  // the whole block codes as zp
      const int8_t z = static_cast<int8_t>(quantize_affine(0.0f, s, zp, flo, fhi));
      std::memset(q + i, z, static_cast<size_t>(end - i));
      return;
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
  });
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
    const float s = scale[b];
    const int32_t zp = zero_point ? zero_point[b] : 0;
    const __m256 vs = _mm256_set1_ps(s);
    const __m256i vz = _mm256_set1_epi32(zp);
    auto step8 = [&](int64_t j) {
      const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j)));
      _mm256_storeu_ps(out + j, dequant8(v, vz, vs));
    };
    for (; i + 32 <= end; i += 32) {
      step8(i);
      step8(i + 8);
      step8(i + 16);
      step8(i + 24);
    }
    for (; i + 8 <= end; i += 8) step8(i);
    for (; i < end; ++i) out[i] = static_cast<float>(q[i] - zp) * s;
  });
}

}  // namespace msbnb::kernels::MSBNB_ISA_NS
