// ISA-neutral block walk of quantize_lut8, written once for every ISA folder. In an unnamed
// namespace, as walk.h: each translation unit (compiled with its own ISA flags) keeps its own copy.
#pragma once
#include <cstdint>

#include "kernels/scalar_math.h"
#include "kernels/walk.h"
#include "msbnb/kernels/types.h"

namespace msbnb::kernels::MSBNB_ISA_NS {
namespace {

// quantize_lut8 over the range [0, n) that starts at element `start` of blocks of bs elements:
// segment(i, end, inv) codes the block segment [i, end) as sorted_to_code[sorted_position256(x *
// inv)]; a block whose absmax is denormal (pre-scaled by lut8_scale) is rare and done here, in
// scalar with ref/lut.cpp's operations.
template <DType D, class Segment>
void quantize_lut8_walk(const void* x, int64_t start, int64_t n, int64_t bs, const float* absmax,
                        const Lut8* lut, uint8_t* q, Segment&& segment) {
  for_each_block(start, n, bs, [&](int64_t b, int64_t i, int64_t end) {
    const Lut8Scale sc = lut8_scale(absmax[b]);
    if (sc.pre != 1.0f) {
      for (; i < end; ++i) {
        const float xn = (load_elem(x, D, i) * sc.pre) * sc.inv;
        q[i] = static_cast<uint8_t>(lut->sorted_to_code[sorted_position256(xn, lut->mid)]);
      }
      return;
    }
    segment(i, end, sc.inv);
  });
}

}  // namespace
}  // namespace msbnb::kernels::MSBNB_ISA_NS
