// AVX-512: per-block absmax and min / max, bit-identical to ref/reduce.cpp.
//
// Everything is an integer max / min: on the magnitude bits (absmax) or on the order keys
// (min / max), so NaN and Inf come out exactly as in the reference. f16 and bf16 are reduced on
// their raw 16-bit patterns (32 lanes) and only the result is widened: half -> float and
// bf16 -> float are strictly increasing in both the magnitude bits and the order key, so the max
// commutes with the conversion (and a signalling-NaN half keeps its payload, which cvtph would
// quieten).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>

#include "kernels/isa_kernels.h"
#include "kernels/reduce_blocks.h"
#include "kernels/scalar_math.h"
#include "kernels/x86/avx512/simd.h"

namespace msbnb::kernels::MSBNB_ISA_NS {

namespace {

// Blocks shorter than a vector are cheaper in scalar code (same helpers as the reference).
constexpr int64_t kMinVectorBlock = 16;

// The two element widths the reductions run on: f32 patterns (16 lanes) and 16-bit float patterns
// (32 lanes). Mag is a pattern with its sign cleared, Key its signed order key
// k ^ ((k >> sign) & magnitude mask); the largest Key is the magnitude mask.
struct Bits32 {
  using Elem = float;
  using Mag = uint32_t;
  using Key = int32_t;
  using Mask = __mmask16;
  static constexpr int64_t kLanes = 16;
  static Mask tail(int64_t k) { return tail_mask16(k); }
  static __m512i maskz_load(Mask m, const Elem* p) { return _mm512_maskz_loadu_epi32(m, p); }
  static __m512i set1(Key k) { return _mm512_set1_epi32(k); }
  static __m512i mag_max(__m512i a, __m512i b) { return _mm512_max_epu32(a, b); }
  static Mag reduce_mag_max(__m512i v) { return _mm512_reduce_max_epu32(v); }
  static __m512i min(__m512i a, __m512i b) { return _mm512_min_epi32(a, b); }
  static __m512i max(__m512i a, __m512i b) { return _mm512_max_epi32(a, b); }
  static __m512i mask_min(__m512i a, Mask m, __m512i k) { return _mm512_mask_min_epi32(a, m, a, k); }
  static __m512i mask_max(__m512i a, Mask m, __m512i k) { return _mm512_mask_max_epi32(a, m, a, k); }
  static Key reduce_min(__m512i v) { return _mm512_reduce_min_epi32(v); }
  static Key reduce_max(__m512i v) { return _mm512_reduce_max_epi32(v); }
  static __m512i key(__m512i k) {
    return _mm512_xor_si512(k, _mm512_and_si512(_mm512_srai_epi32(k, 31), _mm512_set1_epi32(0x7fffffff)));
  }
};

struct Bits16 {
  using Elem = uint16_t;
  using Mag = uint16_t;
  using Key = int16_t;
  using Mask = __mmask32;
  static constexpr int64_t kLanes = 32;
  static Mask tail(int64_t k) { return tail_mask32(k); }
  static __m512i maskz_load(Mask m, const Elem* p) { return _mm512_maskz_loadu_epi16(m, p); }
  static __m512i set1(Key k) { return _mm512_set1_epi16(k); }
  static __m512i mag_max(__m512i a, __m512i b) { return _mm512_max_epi16(a, b); }
  static Mag reduce_mag_max(__m512i v) { return static_cast<uint16_t>(reduce_max(v)); }
  static __m512i min(__m512i a, __m512i b) { return _mm512_min_epi16(a, b); }
  static __m512i max(__m512i a, __m512i b) { return _mm512_max_epi16(a, b); }
  static __m512i mask_min(__m512i a, Mask m, __m512i k) { return _mm512_mask_min_epi16(a, m, a, k); }
  static __m512i mask_max(__m512i a, Mask m, __m512i k) { return _mm512_mask_max_epi16(a, m, a, k); }
  static Key reduce_min(__m512i v) {
    __m256i a = _mm256_min_epi16(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
    __m128i b = _mm_min_epi16(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    b = _mm_min_epi16(b, _mm_shuffle_epi32(b, _MM_SHUFFLE(1, 0, 3, 2)));
    b = _mm_min_epi16(b, _mm_shuffle_epi32(b, _MM_SHUFFLE(2, 3, 0, 1)));
    b = _mm_min_epi16(b, _mm_srli_epi32(b, 16));
    return static_cast<Key>(_mm_cvtsi128_si32(b));
  }
  static Key reduce_max(__m512i v) {
    __m256i a = _mm256_max_epi16(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
    __m128i b = _mm_max_epi16(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    b = _mm_max_epi16(b, _mm_shuffle_epi32(b, _MM_SHUFFLE(1, 0, 3, 2)));
    b = _mm_max_epi16(b, _mm_shuffle_epi32(b, _MM_SHUFFLE(2, 3, 0, 1)));
    b = _mm_max_epi16(b, _mm_srli_epi32(b, 16));
    return static_cast<Key>(_mm_cvtsi128_si32(b));
  }
  static __m512i key(__m512i h) {
    return _mm512_xor_si512(h, _mm512_and_si512(_mm512_srai_epi16(h, 15), _mm512_set1_epi16(0x7fff)));
  }
};

template <class L>
typename L::Mag absmax_bits(const typename L::Elem* p, int64_t len) {
  constexpr int64_t V = L::kLanes;
  const __m512i mag = L::set1(std::numeric_limits<typename L::Key>::max());
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 4 * V <= len; i += 4 * V) {
    a0 = L::mag_max(a0, _mm512_and_si512(_mm512_loadu_si512(p + i), mag));
    a1 = L::mag_max(a1, _mm512_and_si512(_mm512_loadu_si512(p + i + V), mag));
    a2 = L::mag_max(a2, _mm512_and_si512(_mm512_loadu_si512(p + i + 2 * V), mag));
    a3 = L::mag_max(a3, _mm512_and_si512(_mm512_loadu_si512(p + i + 3 * V), mag));
  }
  for (; i + V <= len; i += V) a0 = L::mag_max(a0, _mm512_and_si512(_mm512_loadu_si512(p + i), mag));
  if (i < len) a1 = L::mag_max(a1, _mm512_and_si512(L::maskz_load(L::tail(len - i), p + i), mag));
  a0 = L::mag_max(L::mag_max(a0, a1), L::mag_max(a2, a3));
  return L::reduce_mag_max(a0);
}

template <class L>
std::pair<typename L::Key, typename L::Key> minmax_keys(const typename L::Elem* p, int64_t len) {
  using Key = typename L::Key;
  constexpr int64_t V = L::kLanes;
  __m512i lo0 = L::set1(std::numeric_limits<Key>::max()), lo1 = lo0;
  __m512i hi0 = L::set1(std::numeric_limits<Key>::min()), hi1 = hi0;
  int64_t i = 0;
  for (; i + 2 * V <= len; i += 2 * V) {
    const __m512i k0 = L::key(_mm512_loadu_si512(p + i)), k1 = L::key(_mm512_loadu_si512(p + i + V));
    lo0 = L::min(lo0, k0);
    hi0 = L::max(hi0, k0);
    lo1 = L::min(lo1, k1);
    hi1 = L::max(hi1, k1);
  }
  for (; i + V <= len; i += V) {
    const __m512i k = L::key(_mm512_loadu_si512(p + i));
    lo0 = L::min(lo0, k);
    hi0 = L::max(hi0, k);
  }
  if (i < len) {
    const typename L::Mask m = L::tail(len - i);
    const __m512i k = L::key(L::maskz_load(m, p + i));
    lo1 = L::mask_min(lo1, m, k);
    hi1 = L::mask_max(hi1, m, k);
  }
  return {L::reduce_min(L::min(lo0, lo1)), L::reduce_max(L::max(hi0, hi1))};
}

}  // namespace

void absmax_blocks(const void* x, DType dt, int64_t n, int64_t bs, float* out) {
  absmax_blocks_walk<Bits32, Bits16, kMinVectorBlock>(x, dt, n, bs, out);
}

void minmax_blocks(const void* x, DType dt, int64_t n, int64_t bs, float* mins, float* maxs) {
  minmax_blocks_walk<Bits32, Bits16, kMinVectorBlock>(x, dt, n, bs, mins, maxs);
}

}  // namespace msbnb::kernels::MSBNB_ISA_NS
