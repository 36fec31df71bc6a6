// AVX2 per-block absmax and min / max. As in the reference, the maximum is an integer maximum on
// the magnitude bits (absmax) or on order keys (min / max), so it is exact, independent of order,
// and NaN / Inf come out bit for bit the same. f16 and bf16 are reduced in their own 16-bit
// encoding (16 lanes per vector): the maps to float are strictly monotonic on magnitudes and on
// order keys, so reducing first and converting the one result gives the reference's bits, and
// signalling-NaN payloads are kept exactly (vcvtph2ps would quiet them).
#include <immintrin.h>

#include <algorithm>
#include <climits>

#include "kernels/isa_kernels.h"
#include "kernels/scalar_math.h"

namespace msbnb::kernels::avx2 {
namespace {

inline __m128i max4_epi32(__m256i v) {
  __m128i m = _mm_max_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_max_epi32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
}
inline int32_t hmax_epi32(__m256i v) { return _mm_cvtsi128_si32(max4_epi32(v)); }
inline int32_t hmin_epi32(__m256i v) {
  __m128i m = _mm_min_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_min_epi32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm_min_epi32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(m);
}
inline int16_t hmax_epi16(__m256i v) {
  __m128i m = _mm_max_epi16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epi16(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm_max_epi16(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
  m = _mm_max_epi16(m, _mm_srli_epi32(m, 16));
  return static_cast<int16_t>(_mm_cvtsi128_si32(m));
}
inline int16_t hmin_epi16(__m256i v) {
  __m128i m = _mm_min_epi16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_min_epi16(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm_min_epi16(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
  m = _mm_min_epi16(m, _mm_srli_epi32(m, 16));
  return static_cast<int16_t>(_mm_cvtsi128_si32(m));
}

inline __m256i load_si256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// Order key of a float / 16-bit float pattern: k ^ ((k >> sign) & magnitude mask), an involution.
inline __m256i key_epi32(__m256i k) {
  return _mm256_xor_si256(k, _mm256_srli_epi32(_mm256_srai_epi32(k, 31), 1));
}
inline __m256i key_epi16(__m256i k) {
  return _mm256_xor_si256(k, _mm256_srli_epi16(_mm256_srai_epi16(k, 15), 1));
}
inline int16_t key16(uint16_t h) {
  const int16_t k = static_cast<int16_t>(h);
  return static_cast<int16_t>(k ^ ((k >> 15) & 0x7fff));
}

// Largest magnitude bit pattern (sign cleared) of x[0, len) as uint32 (all patterns <= 0x7fffffff,
// so the signed max is the unsigned one).
uint32_t absmax_bits_f32(const float* x, int64_t len) {
  const __m256i mask = _mm256_set1_epi32(0x7fffffff);
  __m256i m0 = _mm256_setzero_si256(), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    m0 = _mm256_max_epi32(m0, _mm256_and_si256(load_si256(x + i), mask));
    m1 = _mm256_max_epi32(m1, _mm256_and_si256(load_si256(x + i + 8), mask));
    m2 = _mm256_max_epi32(m2, _mm256_and_si256(load_si256(x + i + 16), mask));
    m3 = _mm256_max_epi32(m3, _mm256_and_si256(load_si256(x + i + 24), mask));
  }
  for (; i + 8 <= len; i += 8) m0 = _mm256_max_epi32(m0, _mm256_and_si256(load_si256(x + i), mask));
  m0 = _mm256_max_epi32(_mm256_max_epi32(m0, m1), _mm256_max_epi32(m2, m3));
  uint32_t m = static_cast<uint32_t>(hmax_epi32(m0));
  for (; i < len; ++i) m = std::max(m, float_bits(x[i]) & 0x7fffffffu);
  return m;
}

// Same for 16-bit floats (f16 or bf16: both keep the sign in bit 15).
uint16_t absmax_bits_16(const uint16_t* x, int64_t len) {
  const __m256i mask = _mm256_set1_epi16(0x7fff);
  __m256i m0 = _mm256_setzero_si256(), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 64 <= len; i += 64) {
    m0 = _mm256_max_epi16(m0, _mm256_and_si256(load_si256(x + i), mask));
    m1 = _mm256_max_epi16(m1, _mm256_and_si256(load_si256(x + i + 16), mask));
    m2 = _mm256_max_epi16(m2, _mm256_and_si256(load_si256(x + i + 32), mask));
    m3 = _mm256_max_epi16(m3, _mm256_and_si256(load_si256(x + i + 48), mask));
  }
  for (; i + 16 <= len; i += 16) m0 = _mm256_max_epi16(m0, _mm256_and_si256(load_si256(x + i), mask));
  m0 = _mm256_max_epi16(_mm256_max_epi16(m0, m1), _mm256_max_epi16(m2, m3));
  uint16_t m = static_cast<uint16_t>(hmax_epi16(m0));
  for (; i < len; ++i) m = std::max(m, static_cast<uint16_t>(x[i] & 0x7fffu));
  return m;
}

void minmax_keys_f32(const float* x, int64_t len, int32_t* lo_out, int32_t* hi_out) {
  __m256i lo0 = _mm256_set1_epi32(INT32_MAX), lo1 = lo0, hi0 = _mm256_set1_epi32(INT32_MIN), hi1 = hi0;
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m256i k0 = key_epi32(load_si256(x + i)), k1 = key_epi32(load_si256(x + i + 8));
    lo0 = _mm256_min_epi32(lo0, k0);
    hi0 = _mm256_max_epi32(hi0, k0);
    lo1 = _mm256_min_epi32(lo1, k1);
    hi1 = _mm256_max_epi32(hi1, k1);
  }
  for (; i + 8 <= len; i += 8) {
    const __m256i k = key_epi32(load_si256(x + i));
    lo0 = _mm256_min_epi32(lo0, k);
    hi0 = _mm256_max_epi32(hi0, k);
  }
  int32_t lo = hmin_epi32(_mm256_min_epi32(lo0, lo1)), hi = hmax_epi32(_mm256_max_epi32(hi0, hi1));
  for (; i < len; ++i) {
    const int32_t k = order_key(x[i]);
    lo = std::min(lo, k);
    hi = std::max(hi, k);
  }
  *lo_out = lo;
  *hi_out = hi;
}

// Min / max 16-bit order keys; returned as the 16-bit patterns they stand for.
void minmax_bits_16(const uint16_t* x, int64_t len, uint16_t* lo_out, uint16_t* hi_out) {
  __m256i lo0 = _mm256_set1_epi16(INT16_MAX), lo1 = lo0, hi0 = _mm256_set1_epi16(INT16_MIN), hi1 = hi0;
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    const __m256i k0 = key_epi16(load_si256(x + i)), k1 = key_epi16(load_si256(x + i + 16));
    lo0 = _mm256_min_epi16(lo0, k0);
    hi0 = _mm256_max_epi16(hi0, k0);
    lo1 = _mm256_min_epi16(lo1, k1);
    hi1 = _mm256_max_epi16(hi1, k1);
  }
  for (; i + 16 <= len; i += 16) {
    const __m256i k = key_epi16(load_si256(x + i));
    lo0 = _mm256_min_epi16(lo0, k);
    hi0 = _mm256_max_epi16(hi0, k);
  }
  int16_t lo = hmin_epi16(_mm256_min_epi16(lo0, lo1)), hi = hmax_epi16(_mm256_max_epi16(hi0, hi1));
  for (; i < len; ++i) {
    const int16_t k = key16(x[i]);
    lo = std::min(lo, k);
    hi = std::max(hi, k);
  }
  // key16 is its own inverse.
  *lo_out = static_cast<uint16_t>(key16(static_cast<uint16_t>(lo)));
  *hi_out = static_cast<uint16_t>(key16(static_cast<uint16_t>(hi)));
}

inline float to_float16(uint16_t h, DType dt) {
  return dt == DType::f16 ? half_to_float(h) : bf16_to_float(h);
}

}  // namespace

void absmax_blocks(const void* x, DType dt, int64_t n, int64_t bs, float* out) {
  for (int64_t b = 0; b * bs < n; ++b) {
    const int64_t first = b * bs, len = std::min(n - first, bs);
    if (dt == DType::f32) {
      out[b] = bits_float(absmax_bits_f32(static_cast<const float*>(x) + first, len));
    } else {
      out[b] = to_float16(absmax_bits_16(static_cast<const uint16_t*>(x) + first, len), dt);
    }
  }
}

void minmax_blocks(const void* x, DType dt, int64_t n, int64_t bs, float* mins, float* maxs) {
  for (int64_t b = 0; b * bs < n; ++b) {
    const int64_t first = b * bs, len = std::min(n - first, bs);
    if (dt == DType::f32) {
      int32_t lo, hi;
      minmax_keys_f32(static_cast<const float*>(x) + first, len, &lo, &hi);
      mins[b] = key_float(lo);
      maxs[b] = key_float(hi);
    } else {
      uint16_t lo, hi;
      minmax_bits_16(static_cast<const uint16_t*>(x) + first, len, &lo, &hi);
      mins[b] = to_float16(lo, dt);
      maxs[b] = to_float16(hi, dt);
    }
  }
}

}  // namespace msbnb::kernels::avx2
