// ISA-neutral block walk of absmax_blocks / minmax_blocks, written once for every ISA folder: the
// blocks of [0, n) (bs elements, the last one shorter), each reduced on its f32 or 16-bit float
// patterns by the ISA's absmax_bits<L> / minmax_keys<L> (L = its Bits32 or Bits16: declared
// here, defined there), and only the result widened to float (the maps are strictly increasing,
// so reducing first gives the reference's bits). Blocks under MinVector elements take the
// reference's scalar helpers. In an unnamed namespace, as walk.h: each translation unit (compiled
// with its own ISA flags) keeps its own copy.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>

#include "kernels/scalar_math.h"
#include "msbnb/kernels/types.h"

namespace msbnb::kernels::MSBNB_ISA_NS {
namespace {

// Largest magnitude bit pattern (sign cleared) of p[0, len); smallest and largest signed order
// key of p[0, len) (len >= 1). Defined by the ISA file.
template <class L>
typename L::Mag absmax_bits(const typename L::Elem* p, int64_t len);
template <class L>
std::pair<typename L::Key, typename L::Key> minmax_keys(const typename L::Elem* p, int64_t len);

// 16-bit float pattern -> float, exactly as load_elem does.
inline float widen16(uint16_t h, DType dt) { return dt == DType::f16 ? half_to_float(h) : bf16_to_float(h); }

// Signed order key of a 16-bit sign-magnitude pattern (f16 and bf16 both keep the sign in bit 15)
// and back: the map is its own inverse.
inline int16_t key16(uint16_t h) {
  const int16_t k = static_cast<int16_t>(h);
  return static_cast<int16_t>(k ^ ((k >> 15) & 0x7fff));
}
inline uint16_t unkey16(int16_t k) { return static_cast<uint16_t>(key16(static_cast<uint16_t>(k))); }

template <class Bits32, class Bits16, int64_t MinVector>
void absmax_blocks_walk(const void* x, DType dt, int64_t n, int64_t bs, float* out) {
  for (int64_t b = 0; b * bs < n; ++b) {
    const int64_t first = b * bs, len = std::min(n, first + bs) - first;
    if (MinVector > 0 && len < MinVector) {  // folded away for MinVector = 0
      uint32_t m = 0;
      for (int64_t i = first; i < first + len; ++i)
        m = std::max(m, float_bits(load_elem(x, dt, i)) & 0x7fffffffu);
      out[b] = bits_float(m);
    } else if (dt == DType::f32) {
      out[b] = bits_float(absmax_bits<Bits32>(static_cast<const float*>(x) + first, len));
    } else {
      out[b] = widen16(absmax_bits<Bits16>(static_cast<const uint16_t*>(x) + first, len), dt);
    }
  }
}

template <class Bits32, class Bits16, int64_t MinVector>
void minmax_blocks_walk(const void* x, DType dt, int64_t n, int64_t bs, float* mins, float* maxs) {
  for (int64_t b = 0; b * bs < n; ++b) {
    const int64_t first = b * bs, len = std::min(n, first + bs) - first;
    if (MinVector > 0 && len < MinVector) {  // folded away for MinVector = 0
      int32_t lo = std::numeric_limits<int32_t>::max(), hi = std::numeric_limits<int32_t>::min();
      for (int64_t i = first; i < first + len; ++i) {
        const int32_t k = order_key(load_elem(x, dt, i));
        lo = std::min(lo, k);
        hi = std::max(hi, k);
      }
      mins[b] = key_float(lo);
      maxs[b] = key_float(hi);
    } else if (dt == DType::f32) {
      const auto [lo, hi] = minmax_keys<Bits32>(static_cast<const float*>(x) + first, len);
      mins[b] = key_float(lo);
      maxs[b] = key_float(hi);
    } else {
      const auto [lo, hi] = minmax_keys<Bits16>(static_cast<const uint16_t*>(x) + first, len);
      mins[b] = widen16(unkey16(lo), dt);
      maxs[b] = widen16(unkey16(hi), dt);
    }
  }
}

}  // namespace
}  // namespace msbnb::kernels::MSBNB_ISA_NS
