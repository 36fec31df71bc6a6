// AVX2 per-block absmax and min / max. As in the reference, the maximum is an integer maximum on
// the magnitude bits (absmax) or on order keys (min / max), so it is exact, independent of order,
// and NaN / Inf come out bit for bit the same. f16 and bf16 are reduced in their own 16-bit
// encoding (16 lanes per vector): the maps to float are strictly monotonic on magnitudes and on
// order keys, so reducing first and converting the one result gives the reference's bits, and
// signalling-NaN payloads are kept exactly (vcvtph2ps would quiet them).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>

#include "kernels/isa_kernels.h"
#include "kernels/reduce_blocks.h"
#include "kernels/scalar_math.h"
#include "kernels/x86/avx2/simd.h"

namespace msbnb::kernels::MSBNB_ISA_NS {
namespace {

inline __m256i load_si256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// The two element widths the reductions run on: f32 patterns (8 lanes) and 16-bit float patterns
// (16 lanes). Mag is a pattern with its sign cleared, Key its signed order key
// k ^ ((k >> sign) & magnitude mask); the largest Key is the magnitude mask.
struct Bits32 {
  using Elem = float;
  using Mag = uint32_t;
  using Key = int32_t;
  static constexpr int64_t kLanes = 8;
  static __m256i set1(Key k) { return _mm256_set1_epi32(k); }
  static __m256i min(__m256i a, __m256i b) { return _mm256_min_epi32(a, b); }
  static __m256i max(__m256i a, __m256i b) { return _mm256_max_epi32(a, b); }
  static Key hmin(__m256i v) {
    __m128i m = _mm_min_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    m = _mm_min_epi32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
    m = _mm_min_epi32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(m);
  }
  static Key hmax(__m256i v) {
    __m128i m = _mm_max_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(m);
  }
  static __m256i key(__m256i k) {
    return _mm256_xor_si256(k, _mm256_srli_epi32(_mm256_srai_epi32(k, 31), 1));
  }
  static Key key(float x) { return order_key(x); }
  static Mag mag(float x) { return float_bits(x) & 0x7fffffffu; }
};

struct Bits16 {
  using Elem = uint16_t;
  using Mag = uint16_t;
  using Key = int16_t;
  static constexpr int64_t kLanes = 16;
  static __m256i set1(Key k) { return _mm256_set1_epi16(k); }
  static __m256i min(__m256i a, __m256i b) { return _mm256_min_epi16(a, b); }
  static __m256i max(__m256i a, __m256i b) { return _mm256_max_epi16(a, b); }
  static Key hmin(__m256i v) {
    __m128i m = _mm_min_epi16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    m = _mm_min_epi16(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
    m = _mm_min_epi16(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
    m = _mm_min_epi16(m, _mm_srli_epi32(m, 16));
    return static_cast<Key>(_mm_cvtsi128_si32(m));
  }
  static Key hmax(__m256i v) {
    __m128i m = _mm_max_epi16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    m = _mm_max_epi16(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
    m = _mm_max_epi16(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
    m = _mm_max_epi16(m, _mm_srli_epi32(m, 16));
    return static_cast<Key>(_mm_cvtsi128_si32(m));
  }
  static __m256i key(__m256i k) {
    return _mm256_xor_si256(k, _mm256_srli_epi16(_mm256_srai_epi16(k, 15), 1));
  }
  static Key key(uint16_t h) { return key16(h); }
  static Mag mag(uint16_t h) { return static_cast<uint16_t>(h & 0x7fffu); }
};

// Every magnitude pattern is at most the largest Key, so the signed max is the unsigned one; the
// tail goes through the scalar maps.
template <class L>
typename L::Mag absmax_bits(const typename L::Elem* x, int64_t len) {
  constexpr int64_t V = L::kLanes;
  const __m256i mask = L::set1(std::numeric_limits<typename L::Key>::max());
  __m256i m0 = _mm256_setzero_si256(), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 4 * V <= len; i += 4 * V) {
    m0 = L::max(m0, _mm256_and_si256(load_si256(x + i), mask));
    m1 = L::max(m1, _mm256_and_si256(load_si256(x + i + V), mask));
    m2 = L::max(m2, _mm256_and_si256(load_si256(x + i + 2 * V), mask));
    m3 = L::max(m3, _mm256_and_si256(load_si256(x + i + 3 * V), mask));
  }
  for (; i + V <= len; i += V) m0 = L::max(m0, _mm256_and_si256(load_si256(x + i), mask));
  m0 = L::max(L::max(m0, m1), L::max(m2, m3));
  auto m = static_cast<typename L::Mag>(L::hmax(m0));
  for (; i < len; ++i) m = std::max(m, L::mag(x[i]));
  return m;
}

template <class L>
std::pair<typename L::Key, typename L::Key> minmax_keys(const typename L::Elem* x, int64_t len) {
  using Key = typename L::Key;
  constexpr int64_t V = L::kLanes;
  __m256i lo0 = L::set1(std::numeric_limits<Key>::max()), lo1 = lo0;
  __m256i hi0 = L::set1(std::numeric_limits<Key>::min()), hi1 = hi0;
  int64_t i = 0;
  for (; i + 2 * V <= len; i += 2 * V) {
    const __m256i k0 = L::key(load_si256(x + i)), k1 = L::key(load_si256(x + i + V));
    lo0 = L::min(lo0, k0);
    hi0 = L::max(hi0, k0);
    lo1 = L::min(lo1, k1);
    hi1 = L::max(hi1, k1);
  }
  for (; i + V <= len; i += V) {
    const __m256i k = L::key(load_si256(x + i));
    lo0 = L::min(lo0, k);
    hi0 = L::max(hi0, k);
  }
  Key lo = L::hmin(L::min(lo0, lo1)), hi = L::hmax(L::max(hi0, hi1));
  for (; i < len; ++i) {
    const Key k = L::key(x[i]);
    lo = std::min(lo, k);
    hi = std::max(hi, k);
  }
  return {lo, hi};
}

}  // namespace

// Every block length has a vector path (scalar tails), so no block is left to the scalar walk.
void absmax_blocks(const void* x, DType dt, int64_t n, int64_t bs, float* out) {
  absmax_blocks_walk<Bits32, Bits16, 0>(x, dt, n, bs, out);
}

void minmax_blocks(const void* x, DType dt, int64_t n, int64_t bs, float* mins, float* maxs) {
  minmax_blocks_walk<Bits32, Bits16, 0>(x, dt, n, bs, mins, maxs);
}

}  // namespace msbnb::kernels::MSBNB_ISA_NS
