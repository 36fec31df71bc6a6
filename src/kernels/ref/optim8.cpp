// Scalar reference of the 8-bit blockwise optimizer steps (kernels.def: optim8_adam_blocks,
// optim8_lion_blocks; bitsandbytes' kOptimizerStatic8bit2StateBlockwise / 1StateBlockwise).
// Per block: new fp32 states from the dequantized old ones, the block's new absmax, the
// parameter update from the fp32 states, then the states requantized with the new absmax.
#include <algorithm>
#include <cmath>

#include "kernels/isa_kernels.h"
#include "kernels/optim8_math.h"

namespace msbnb::kernels::MSBNB_ISA_NS {

void optim8_adam_blocks(float* p, const float* g, uint8_t* s1, uint8_t* s2, float* absmax1, float* absmax2,
                        int64_t n, int64_t bs, const Optim8Params* prm, const Lut8* map1, const Lut8* map2) {
  const Optim8Params& k = *prm;
  const int zneg = optim8_negative_codes(map1);
  float m[kOptim8MaxBlock], v[kOptim8MaxBlock];
  for (int64_t b = 0, i0 = 0; i0 < n; ++b, i0 += bs) {
    const int64_t len = std::min(bs, n - i0);
    const float a1 = absmax1[b], a2 = absmax2[b];
    float n1 = 0.0f, n2 = 0.0f;
    for (int64_t j = 0; j < len; ++j) {
      const int64_t i = i0 + j;
      const float gi = optim8_grad(g[i], p[i], k);
      optim8_adam_moments(gi, map1->code[s1[i]] * a1, map2->code[s2[i]] * a2, k, &m[j], &v[j]);
      n1 = std::fmax(n1, std::fabs(m[j]));
      n2 = std::fmax(n2, v[j]);
    }
    absmax1[b] = n1;
    absmax2[b] = n2;
    const Lut8Scale q1 = lut8_scale(n1), q2 = lut8_scale(n2);
    for (int64_t j = 0; j < len; ++j) {
      const int64_t i = i0 + j;
      const float gi = optim8_grad(g[i], p[i], k);
      p[i] = optim8_adam_param(p[i], gi, m[j], v[j], k);
      s1[i] = optim8_code(m[j], q1, map1, zneg);
      s2[i] = optim8_code(v[j], q2, map2, 0);
    }
  }
}

void optim8_lion_blocks(float* p, const float* g, uint8_t* s1, float* absmax1, int64_t n, int64_t bs,
                        const Optim8Params* prm, const Lut8* map1) {
  const Optim8Params& k = *prm;
  const int zneg = optim8_negative_codes(map1);
  float m[kOptim8MaxBlock];
  for (int64_t b = 0, i0 = 0; i0 < n; ++b, i0 += bs) {
    const int64_t len = std::min(bs, n - i0);
    const float a1 = absmax1[b];
    float n1 = 0.0f;
    for (int64_t j = 0; j < len; ++j) {
      const int64_t i = i0 + j;
      const float m_old = map1->code[s1[i]] * a1;
      m[j] = optim8_lion_moment(g[i], m_old, k);
      // The parameter update needs only the old momentum: done in this pass.
      p[i] = optim8_lion_param(p[i], g[i], optim8_lion_direction(g[i], m_old, k), k);
      n1 = std::fmax(n1, std::fabs(m[j]));
    }
    absmax1[b] = n1;
    const Lut8Scale q1 = lut8_scale(n1);
    for (int64_t j = 0; j < len; ++j) s1[i0 + j] = optim8_code(m[j], q1, map1, zneg);
  }
}

}  // namespace msbnb::kernels::MSBNB_ISA_NS
