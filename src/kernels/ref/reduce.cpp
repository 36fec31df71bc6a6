// Scalar reference: per-block absmax and min / max.
#include <algorithm>

#include "kernels/isa_kernels.h"
#include "kernels/scalar_math.h"

namespace msbnb::kernels::MSBNB_ISA_NS {

void absmax_blocks(const void* x, DType dt, int64_t n, int64_t bs, float* out) {
  for (int64_t b = 0; b * bs < n; ++b) {
    const int64_t end = std::min(n, (b + 1) * bs);
    uint32_t m = 0;
    for (int64_t i = b * bs; i < end; ++i) m = std::max(m, float_bits(load_elem(x, dt, i)) & 0x7fffffffu);
    out[b] = bits_float(m);
  }
}

void minmax_blocks(const void* x, DType dt, int64_t n, int64_t bs, float* mins, float* maxs) {
  for (int64_t b = 0; b * bs < n; ++b) {
    const int64_t end = std::min(n, (b + 1) * bs);
    int32_t lo = INT32_MAX, hi = INT32_MIN;
    for (int64_t i = b * bs; i < end; ++i) {
      const int32_t k = order_key(load_elem(x, dt, i));
      lo = std::min(lo, k);
      hi = std::max(hi, k);
    }
    mins[b] = key_float(lo);
    maxs[b] = key_float(hi);
  }
}

}  // namespace msbnb::kernels::MSBNB_ISA_NS
