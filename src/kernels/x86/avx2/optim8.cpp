// AVX2 8-bit blockwise optimizer steps, bit-identical to ref/optim8.cpp: the same float
// operations per element (kernels/optim8_math.h) on 8 lanes, the nearest-code search of lut.cpp
// (lut8_search.h), the old codes' values gathered from the 256-entry maps. Blocks are two passes:
// new states into a block buffer and its absmax, then parameters and requantized codes.
#include <algorithm>
#include <cfloat>
#include <cmath>

#include "kernels/isa_kernels.h"
#include "kernels/optim8_math.h"
#include "kernels/x86/avx2/lut8_search.h"
#include "kernels/x86/avx2/simd.h"

namespace msbnb::kernels::MSBNB_ISA_NS {
namespace {

struct Consts {
  __m256 b1, b2, omb1, omb2, step, eps, lr, decay, l2, fmax, nfmax, inf, abs, one, zero;
  explicit Consts(const Optim8Params& k)
      : b1(_mm256_set1_ps(k.beta1)),
        b2(_mm256_set1_ps(k.beta2)),
        omb1(_mm256_set1_ps(k.one_minus_beta1)),
        omb2(_mm256_set1_ps(k.one_minus_beta2)),
        step(_mm256_set1_ps(k.step_size)),
        eps(_mm256_set1_ps(k.eps)),
        lr(_mm256_set1_ps(k.lr)),
        decay(_mm256_set1_ps(k.decay)),
        l2(_mm256_set1_ps(k.l2)),
        fmax(_mm256_set1_ps(FLT_MAX)),
        nfmax(_mm256_set1_ps(-FLT_MAX)),
        inf(_mm256_set1_ps(HUGE_VALF)),
        abs(_mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))),
        one(_mm256_set1_ps(1.0f)),
        zero(_mm256_setzero_ps()) {}
};

inline __m256i idx8(const uint8_t* q) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
}
// code[q] * absmax for 8 stored codes.
inline __m256 dequant8(const uint8_t* q, const float* code, __m256 a) {
  return _mm256_mul_ps(_mm256_i32gather_ps(code, idx8(q), 4), a);
}
// optim8_grad and optim8_finite on 8 lanes.
template <bool L2>
inline __m256 grad8(const float* g, const float* p, const Consts& c) {
  const __m256 gv = _mm256_loadu_ps(g);
  if constexpr (L2) return _mm256_add_ps(gv, _mm256_mul_ps(c.l2, _mm256_loadu_ps(p)));
  return gv;
}
inline __m256 finite8(__m256 g, const Consts& c) {
  return _mm256_cmp_ps(_mm256_and_ps(g, c.abs), c.inf, _CMP_LT_OQ);
}
inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// optim8_code on 8 lanes: the sorted position of (x * pre) * inv, the sign rule, the code bytes.
struct Quant8 {
  const Lut8Search search;
  const bool identity;
  const __m256i zneg_minus1;
  const bool sign_rule;
  Quant8(const Lut8* map, int zneg)
      : search(map),
        identity(optim8_identity(map)),
        zneg_minus1(_mm256_set1_epi32(zneg - 1)),
        sign_rule(zneg > 0) {}

  void store(__m256 x, __m256 pre, __m256 inv, uint8_t* q) const {
    __m256i pos = search.position(_mm256_mul_ps(_mm256_mul_ps(x, pre), inv));
    if (sign_rule) {
      const __m256i neg = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
      const __m256i at_zero = _mm256_cmpgt_epi32(pos, zneg_minus1);
      pos = _mm256_add_epi32(pos, _mm256_and_si256(neg, at_zero));  // -1 where both
    }
    if (!identity) pos = _mm256_i32gather_epi32(search.lut->sorted_to_code, pos, 4);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q), low_bytes8(pos));
  }
};

template <bool L2>
void adam_blocks(float* p, const float* g, uint8_t* s1, uint8_t* s2, float* absmax1, float* absmax2,
                 int64_t n, int64_t bs, const Optim8Params& k, const Lut8* map1, const Lut8* map2) {
  const Consts c(k);
  const int zneg = optim8_negative_codes(map1);
  const Quant8 quant1(map1, zneg), quant2(map2, 0);
  alignas(32) float m[kOptim8MaxBlock], v[kOptim8MaxBlock];
  for (int64_t b = 0, i0 = 0; i0 < n; ++b, i0 += bs) {
    const int64_t len = std::min(bs, n - i0), vlen = len / 8 * 8;
    float* pb = p + i0;
    const float* gb = g + i0;
    uint8_t *q1 = s1 + i0, *q2 = s2 + i0;
    const float a1 = absmax1[b], a2 = absmax2[b];
    const __m256 va1 = _mm256_set1_ps(a1), va2 = _mm256_set1_ps(a2);
    __m256 n1 = c.zero, n2 = c.zero;
    for (int64_t j = 0; j < vlen; j += 8) {
      const __m256 gi = grad8<L2>(gb + j, pb + j, c);
      const __m256 ok = finite8(gi, c);
      const __m256 mo = dequant8(q1 + j, map1->code, va1), vo = dequant8(q2 + j, map2->code, va2);
      __m256 mj = _mm256_add_ps(_mm256_mul_ps(mo, c.b1), _mm256_mul_ps(c.omb1, gi));
      __m256 vj = _mm256_add_ps(_mm256_mul_ps(vo, c.b2), _mm256_mul_ps(_mm256_mul_ps(c.omb2, gi), gi));
      mj = _mm256_min_ps(_mm256_max_ps(_mm256_and_ps(mj, ok), c.nfmax), c.fmax);
      vj = _mm256_min_ps(_mm256_and_ps(vj, ok), c.fmax);
      _mm256_store_ps(m + j, mj);
      _mm256_store_ps(v + j, vj);
      n1 = _mm256_max_ps(n1, _mm256_and_ps(mj, c.abs));
      n2 = _mm256_max_ps(n2, vj);
    }
    float f1 = hmax8(n1), f2 = hmax8(n2);
    for (int64_t j = vlen; j < len; ++j) {
      const float gi = optim8_grad(gb[j], pb[j], k);
      optim8_adam_moments(gi, map1->code[q1[j]] * a1, map2->code[q2[j]] * a2, k, &m[j], &v[j]);
      f1 = std::fmax(f1, std::fabs(m[j]));
      f2 = std::fmax(f2, v[j]);
    }
    absmax1[b] = f1;
    absmax2[b] = f2;
    const Lut8Scale l1 = lut8_scale(f1), l2 = lut8_scale(f2);
    const __m256 pre1 = _mm256_set1_ps(l1.pre), inv1 = _mm256_set1_ps(l1.inv);
    const __m256 pre2 = _mm256_set1_ps(l2.pre), inv2 = _mm256_set1_ps(l2.inv);
    for (int64_t j = 0; j < vlen; j += 8) {
      const __m256 pv = _mm256_loadu_ps(pb + j);
      const __m256 gi = grad8<L2>(gb + j, pb + j, c);
      const __m256 mj = _mm256_load_ps(m + j), vj = _mm256_load_ps(v + j);
      const __m256 upd = _mm256_div_ps(mj, _mm256_add_ps(_mm256_sqrt_ps(vj), c.eps));
      const __m256 np = _mm256_sub_ps(_mm256_mul_ps(pv, c.decay), _mm256_mul_ps(c.step, upd));
      _mm256_storeu_ps(pb + j, _mm256_blendv_ps(pv, np, finite8(gi, c)));
      quant1.store(mj, pre1, inv1, q1 + j);
      quant2.store(vj, pre2, inv2, q2 + j);
    }
    for (int64_t j = vlen; j < len; ++j) {
      const float gi = optim8_grad(gb[j], pb[j], k);
      pb[j] = optim8_adam_param(pb[j], gi, m[j], v[j], k);
      q1[j] = optim8_code(m[j], l1, map1, zneg);
      q2[j] = optim8_code(v[j], l2, map2, 0);
    }
  }
}

}  // namespace

void optim8_adam_blocks(float* p, const float* g, uint8_t* s1, uint8_t* s2, float* absmax1, float* absmax2,
                        int64_t n, int64_t bs, const Optim8Params* prm, const Lut8* map1, const Lut8* map2) {
  if (prm->l2 != 0.0f)
    adam_blocks<true>(p, g, s1, s2, absmax1, absmax2, n, bs, *prm, map1, map2);
  else
    adam_blocks<false>(p, g, s1, s2, absmax1, absmax2, n, bs, *prm, map1, map2);
}

void optim8_lion_blocks(float* p, const float* g, uint8_t* s1, float* absmax1, int64_t n, int64_t bs,
                        const Optim8Params* prm, const Lut8* map1) {
  const Optim8Params& k = *prm;
  const Consts c(k);
  const int zneg = optim8_negative_codes(map1);
  const Quant8 quant1(map1, zneg);
  alignas(32) float m[kOptim8MaxBlock];
  for (int64_t b = 0, i0 = 0; i0 < n; ++b, i0 += bs) {
    const int64_t len = std::min(bs, n - i0), vlen = len / 8 * 8;
    float* pb = p + i0;
    const float* gb = g + i0;
    uint8_t* q1 = s1 + i0;
    const float a1 = absmax1[b];
    const __m256 va1 = _mm256_set1_ps(a1);
    __m256 n1 = c.zero;
    for (int64_t j = 0; j < vlen; j += 8) {
      const __m256 gi = _mm256_loadu_ps(gb + j);
      const __m256 ok = finite8(gi, c);
      const __m256 mo = dequant8(q1 + j, map1->code, va1);
      const __m256 dir = _mm256_add_ps(_mm256_mul_ps(mo, c.b1), _mm256_mul_ps(c.omb1, gi));
      __m256 mj = _mm256_add_ps(_mm256_mul_ps(mo, c.b2), _mm256_mul_ps(c.omb2, gi));
      mj = _mm256_min_ps(_mm256_max_ps(_mm256_and_ps(mj, ok), c.nfmax), c.fmax);
      _mm256_store_ps(m + j, mj);
      n1 = _mm256_max_ps(n1, _mm256_and_ps(mj, c.abs));
      // sign(dir) = (dir > 0) - (dir < 0) as float.
      const __m256 sign = _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(dir, c.zero, _CMP_GT_OQ), c.one),
                                        _mm256_and_ps(_mm256_cmp_ps(dir, c.zero, _CMP_LT_OQ), c.one));
      const __m256 pv = _mm256_loadu_ps(pb + j);
      const __m256 np = _mm256_sub_ps(_mm256_mul_ps(pv, c.decay), _mm256_mul_ps(c.lr, sign));
      _mm256_storeu_ps(pb + j, _mm256_blendv_ps(pv, np, ok));
    }
    float f1 = hmax8(n1);
    for (int64_t j = vlen; j < len; ++j) {
      const float m_old = map1->code[q1[j]] * a1;
      m[j] = optim8_lion_moment(gb[j], m_old, k);
      pb[j] = optim8_lion_param(pb[j], gb[j], optim8_lion_direction(gb[j], m_old, k), k);
      f1 = std::fmax(f1, std::fabs(m[j]));
    }
    absmax1[b] = f1;
    const Lut8Scale l1 = lut8_scale(f1);
    const __m256 pre1 = _mm256_set1_ps(l1.pre), inv1 = _mm256_set1_ps(l1.inv);
    for (int64_t j = 0; j < vlen; j += 8) quant1.store(_mm256_load_ps(m + j), pre1, inv1, q1 + j);
    for (int64_t j = vlen; j < len; ++j) q1[j] = optim8_code(m[j], l1, map1, zneg);
  }
}

}  // namespace msbnb::kernels::MSBNB_ISA_NS
