// ISA-neutral control code of the kernels: the dtype switch and the block walk, written once for
// every ISA folder. In an unnamed namespace, as scalar_math.h: each translation unit (compiled
// with its own ISA flags) keeps its own copy.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "msbnb/kernels/matmul.h"
#include "msbnb/kernels/types.h"

namespace msbnb::kernels {
namespace {

// Calls f(std::integral_constant<DType, dt>{}): one instantiation of a kernel per input type.
template <class F>
inline void dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::f32:
      return f(std::integral_constant<DType, DType::f32>{});
    case DType::f16:
      return f(std::integral_constant<DType, DType::f16>{});
    case DType::bf16:
      return f(std::integral_constant<DType, DType::bf16>{});
  }
}

// The segment loops walk blocks b = start / bs, b + 1, ...: no division per block (it would cost
// as much as a short block). End of block b's segment of the range [0, n) that starts at `start`:
inline int64_t block_end(int64_t start, int64_t b, int64_t n, int64_t bs) {
  return std::min(n, (b + 1) * bs - start);
}

// f(b, i, end) for each block b's segment [i, end) of the range [0, n) that starts at element
// `start` of blocks of bs elements; a division only for the first block.
template <class F>
inline void for_each_block(int64_t start, int64_t n, int64_t bs, F&& f) {
  for (int64_t b = start / bs, i = 0, end = block_end(start, b, n, bs); i < n;
       i = end, ++b, end += std::min(bs, n - end))
    f(b, i, end);
}

// The GEMV batch-size switch: K<N>::run(w, x, ldx, args...) for the n <= kGemvMaxRows (= 8)
// activation rows, N a compile-time constant so the kernel keeps N accumulators in registers.
static_assert(kGemvMaxRows == 8, "gemv_n instantiates N = 1 .. 8");
template <template <int> class K, class W, class... Args>
void gemv_n(int64_t n, const W& w, const float* x, int64_t ldx, Args... args) {
  switch (n) {
    case 1:
      return K<1>::run(w, x, ldx, args...);
    case 2:
      return K<2>::run(w, x, ldx, args...);
    case 3:
      return K<3>::run(w, x, ldx, args...);
    case 4:
      return K<4>::run(w, x, ldx, args...);
    case 5:
      return K<5>::run(w, x, ldx, args...);
    case 6:
      return K<6>::run(w, x, ldx, args...);
    case 7:
      return K<7>::run(w, x, ldx, args...);
    default:
      return K<8>::run(w, x, ldx, args...);
  }
}

}  // namespace
}  // namespace msbnb::kernels
