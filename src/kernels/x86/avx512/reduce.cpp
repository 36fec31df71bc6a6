// AVX-512: per-block absmax and min / max, bit-identical to ref/reduce.cpp.
//
// Everything is an integer max / min: on the magnitude bits (absmax) or on the order keys
// (min / max), so NaN and Inf come out exactly as in the reference. f16 and bf16 are reduced on
// their raw 16-bit patterns (32 lanes) and only the result is widened: half -> float and
// bf16 -> float are strictly increasing in both the magnitude bits and the order key, so the max
// commutes with the conversion (and a signalling-NaN half keeps its payload, which cvtph would
// quieten).
// GCC 12 flags the intrinsics' own _mm512_undefined_*() as maybe-uninitialized once inlined
// (GCC bug 105593); the warning points into the header, so silence it there only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <climits>

#include "kernels/isa_kernels.h"
#include "kernels/scalar_math.h"

namespace msbnb::kernels::avx512 {

namespace {

// Blocks shorter than a vector are cheaper in scalar code (same helpers as the reference).
constexpr int64_t kMinVectorBlock = 16;

inline __mmask16 tail_mask16(int64_t k) { return static_cast<__mmask16>((1u << k) - 1u); }
inline __mmask32 tail_mask32(int64_t k) { return static_cast<__mmask32>((uint64_t{1} << k) - 1u); }

inline int16_t hmax_epi16(__m512i v) {
  __m256i a = _mm256_max_epi16(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
  __m128i b = _mm_max_epi16(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  b = _mm_max_epi16(b, _mm_shuffle_epi32(b, _MM_SHUFFLE(1, 0, 3, 2)));
  b = _mm_max_epi16(b, _mm_shuffle_epi32(b, _MM_SHUFFLE(2, 3, 0, 1)));
  b = _mm_max_epi16(b, _mm_srli_epi32(b, 16));
  return static_cast<int16_t>(_mm_cvtsi128_si32(b));
}
inline int16_t hmin_epi16(__m512i v) {
  __m256i a = _mm256_min_epi16(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
  __m128i b = _mm_min_epi16(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  b = _mm_min_epi16(b, _mm_shuffle_epi32(b, _MM_SHUFFLE(1, 0, 3, 2)));
  b = _mm_min_epi16(b, _mm_shuffle_epi32(b, _MM_SHUFFLE(2, 3, 0, 1)));
  b = _mm_min_epi16(b, _mm_srli_epi32(b, 16));
  return static_cast<int16_t>(_mm_cvtsi128_si32(b));
}

// 16-bit pattern -> float, exactly as load_elem does.
inline float widen16(uint16_t h, DType dt) { return dt == DType::f16 ? half_to_float(h) : bf16_to_float(h); }

// Signed order key of a 16-bit sign-magnitude pattern, and back (its own inverse).
inline __m512i key16(__m512i h) {
  return _mm512_xor_si512(h, _mm512_and_si512(_mm512_srai_epi16(h, 15), _mm512_set1_epi16(0x7fff)));
}
inline uint16_t unkey16(int16_t k) {
  return static_cast<uint16_t>(k ^ (static_cast<int16_t>(k >> 15) & 0x7fff));
}
inline __m512i key32(__m512i k) {
  return _mm512_xor_si512(k, _mm512_and_si512(_mm512_srai_epi32(k, 31), _mm512_set1_epi32(0x7fffffff)));
}

uint32_t absmax_f32(const float* p, int64_t len) {
  const __m512i mag = _mm512_set1_epi32(0x7fffffff);
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 64 <= len; i += 64) {
    a0 = _mm512_max_epu32(a0, _mm512_and_si512(_mm512_loadu_si512(p + i), mag));
    a1 = _mm512_max_epu32(a1, _mm512_and_si512(_mm512_loadu_si512(p + i + 16), mag));
    a2 = _mm512_max_epu32(a2, _mm512_and_si512(_mm512_loadu_si512(p + i + 32), mag));
    a3 = _mm512_max_epu32(a3, _mm512_and_si512(_mm512_loadu_si512(p + i + 48), mag));
  }
  for (; i + 16 <= len; i += 16) a0 = _mm512_max_epu32(a0, _mm512_and_si512(_mm512_loadu_si512(p + i), mag));
  if (i < len)
    a1 = _mm512_max_epu32(a1, _mm512_and_si512(_mm512_maskz_loadu_epi32(tail_mask16(len - i), p + i), mag));
  a0 = _mm512_max_epu32(_mm512_max_epu32(a0, a1), _mm512_max_epu32(a2, a3));
  return _mm512_reduce_max_epu32(a0);
}

// Max of the 15 magnitude bits of 16-bit patterns.
uint16_t absmax_u16(const uint16_t* p, int64_t len) {
  const __m512i mag = _mm512_set1_epi16(0x7fff);
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 128 <= len; i += 128) {
    a0 = _mm512_max_epi16(a0, _mm512_and_si512(_mm512_loadu_si512(p + i), mag));
    a1 = _mm512_max_epi16(a1, _mm512_and_si512(_mm512_loadu_si512(p + i + 32), mag));
    a2 = _mm512_max_epi16(a2, _mm512_and_si512(_mm512_loadu_si512(p + i + 64), mag));
    a3 = _mm512_max_epi16(a3, _mm512_and_si512(_mm512_loadu_si512(p + i + 96), mag));
  }
  for (; i + 32 <= len; i += 32) a0 = _mm512_max_epi16(a0, _mm512_and_si512(_mm512_loadu_si512(p + i), mag));
  if (i < len)
    a1 = _mm512_max_epi16(a1, _mm512_and_si512(_mm512_maskz_loadu_epi16(tail_mask32(len - i), p + i), mag));
  a0 = _mm512_max_epi16(_mm512_max_epi16(a0, a1), _mm512_max_epi16(a2, a3));
  return static_cast<uint16_t>(hmax_epi16(a0));
}

void minmax_f32(const float* p, int64_t len, float* mn, float* mx) {
  __m512i lo0 = _mm512_set1_epi32(INT32_MAX), lo1 = lo0;
  __m512i hi0 = _mm512_set1_epi32(INT32_MIN), hi1 = hi0;
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    const __m512i k0 = key32(_mm512_loadu_si512(p + i)), k1 = key32(_mm512_loadu_si512(p + i + 16));
    lo0 = _mm512_min_epi32(lo0, k0);
    hi0 = _mm512_max_epi32(hi0, k0);
    lo1 = _mm512_min_epi32(lo1, k1);
    hi1 = _mm512_max_epi32(hi1, k1);
  }
  for (; i + 16 <= len; i += 16) {
    const __m512i k = key32(_mm512_loadu_si512(p + i));
    lo0 = _mm512_min_epi32(lo0, k);
    hi0 = _mm512_max_epi32(hi0, k);
  }
  if (i < len) {
    const __mmask16 m = tail_mask16(len - i);
    const __m512i k = key32(_mm512_maskz_loadu_epi32(m, p + i));
    lo1 = _mm512_mask_min_epi32(lo1, m, lo1, k);
    hi1 = _mm512_mask_max_epi32(hi1, m, hi1, k);
  }
  *mn = key_float(_mm512_reduce_min_epi32(_mm512_min_epi32(lo0, lo1)));
  *mx = key_float(_mm512_reduce_max_epi32(_mm512_max_epi32(hi0, hi1)));
}

void minmax_u16(const uint16_t* p, int64_t len, DType dt, float* mn, float* mx) {
  __m512i lo0 = _mm512_set1_epi16(INT16_MAX), lo1 = lo0;
  __m512i hi0 = _mm512_set1_epi16(INT16_MIN), hi1 = hi0;
  int64_t i = 0;
  for (; i + 64 <= len; i += 64) {
    const __m512i k0 = key16(_mm512_loadu_si512(p + i)), k1 = key16(_mm512_loadu_si512(p + i + 32));
    lo0 = _mm512_min_epi16(lo0, k0);
    hi0 = _mm512_max_epi16(hi0, k0);
    lo1 = _mm512_min_epi16(lo1, k1);
    hi1 = _mm512_max_epi16(hi1, k1);
  }
  for (; i + 32 <= len; i += 32) {
    const __m512i k = key16(_mm512_loadu_si512(p + i));
    lo0 = _mm512_min_epi16(lo0, k);
    hi0 = _mm512_max_epi16(hi0, k);
  }
  if (i < len) {
    const __mmask32 m = tail_mask32(len - i);
    const __m512i k = key16(_mm512_maskz_loadu_epi16(m, p + i));
    lo1 = _mm512_mask_min_epi16(lo1, m, lo1, k);
    hi1 = _mm512_mask_max_epi16(hi1, m, hi1, k);
  }
  *mn = widen16(unkey16(hmin_epi16(_mm512_min_epi16(lo0, lo1))), dt);
  *mx = widen16(unkey16(hmax_epi16(_mm512_max_epi16(hi0, hi1))), dt);
}

}  // namespace

void absmax_blocks(const void* x, DType dt, int64_t n, int64_t bs, float* out) {
  for (int64_t b = 0; b * bs < n; ++b) {
    const int64_t first = b * bs, len = std::min(n, first + bs) - first;
    if (len < kMinVectorBlock) {
      uint32_t m = 0;
      for (int64_t i = first; i < first + len; ++i)
        m = std::max(m, float_bits(load_elem(x, dt, i)) & 0x7fffffffu);
      out[b] = bits_float(m);
    } else if (dt == DType::f32) {
      out[b] = bits_float(absmax_f32(static_cast<const float*>(x) + first, len));
    } else {
      out[b] = widen16(absmax_u16(static_cast<const uint16_t*>(x) + first, len), dt);
    }
  }
}

void minmax_blocks(const void* x, DType dt, int64_t n, int64_t bs, float* mins, float* maxs) {
  for (int64_t b = 0; b * bs < n; ++b) {
    const int64_t first = b * bs, len = std::min(n, first + bs) - first;
    if (len < kMinVectorBlock) {
      int32_t lo = INT32_MAX, hi = INT32_MIN;
      for (int64_t i = first; i < first + len; ++i) {
        const int32_t k = order_key(load_elem(x, dt, i));
        lo = std::min(lo, k);
        hi = std::max(hi, k);
      }
      mins[b] = key_float(lo);
      maxs[b] = key_float(hi);
    } else if (dt == DType::f32) {
      minmax_f32(static_cast<const float*>(x) + first, len, mins + b, maxs + b);
    } else {
      minmax_u16(static_cast<const uint16_t*>(x) + first, len, dt, mins + b, maxs + b);
    }
  }
}

}  // namespace msbnb::kernels::avx512
