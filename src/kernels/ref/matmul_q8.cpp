// Scalar reference of the int8-activation 4-bit kernels (kernels.def: quantize_row_q8, lut4_q8):
// one column at a time, integer dot products per block, sums in double.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/isa_kernels.h"
#include "kernels/q8.h"

namespace msbnb::kernels::MSBNB_ISA_NS {

void quantize_row_q8(const float* x, int64_t kpad, int64_t block, int8_t* q, float* d, int32_t* sum) {
  std::memset(q, 0, static_cast<size_t>(kpad));
  for (int64_t a = 0; a < kpad / block; ++a) {
    const float* xb = x + a * block;
    float m = 0.0f;
    for (int64_t j = 0; j < block; ++j)
      if (std::isnan(xb[j]) || std::fabs(xb[j]) > m) m = std::isnan(m) ? m : std::fabs(xb[j]);
    d[a] = m / 127.0f;
    sum[a] = 0;
    if (!(m > 0.0f) || !std::isfinite(m)) continue;  // zeros, or NaN / Inf: q = 0
    const Q8Inv inv = q8_inv(m);
    for (int64_t j = 0; j < block; ++j) {
      const int32_t v = q8_round(xb[j], inv);
      q[q8_offset(a * block + j, block)] = static_cast<int8_t>(v);
      sum[a] += v;
    }
  }
}

void lut4_q8(const Lut4Matrix& w, const Lut4Q8Rows& x, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  const Q8Table t = q8_table(w);
  const int64_t bs = x.block, pitch = x.pitch(), nb = x.blocks();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* codes = w.codes + r * (w.kpad / 2);
    for (int64_t i = 0; i < x.n; ++i) {
      const int8_t* qi = x.q + i * pitch;
      double acc = 0.0;
      for (int64_t a = 0; a < nb && a * bs < w.row_stride; ++a) {
        const int64_t seg = (r * w.row_stride + a * bs) / w.group;
        int64_t dot = 0;
        for (int64_t j = a * bs; j < (a + 1) * bs; ++j)
          dot += int64_t{t.t[lut4_index(codes, j)]} * qi[q8_offset(j, bs)];
        const float sc = w.scale[seg] * (t.f * x.d[i * nb + a]);
        const double zp = w.zero_point ? w.zero_point[seg] : 0.0;
        acc += static_cast<double>(sc) * (static_cast<double>(dot) - zp * x.sum[i * nb + a]);
      }
      y[i * ldy + r] = static_cast<float>(acc);
    }
  }
}

}  // namespace msbnb::kernels::MSBNB_ISA_NS
