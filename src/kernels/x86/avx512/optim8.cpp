// AVX-512 8-bit blockwise optimizer steps, bit-identical to ref/optim8.cpp: the same float
// operations per element (kernels/optim8_math.h) on 16 lanes (a block's last partial vector
// masked), the gather-free nearest-code search of lut.cpp (lut8_search.h), the old codes' values
// gathered from the 256-entry maps. Blocks are two passes: new states into a block buffer and
// its absmax, then parameters and requantized codes.
#include <algorithm>
#include <cfloat>
#include <cmath>

#include "kernels/isa_kernels.h"
#include "kernels/optim8_math.h"
#include "kernels/x86/avx512/lut8_search.h"
#include "kernels/x86/avx512/simd.h"

namespace msbnb::kernels::MSBNB_ISA_NS {
namespace {

struct Consts {
  __m512 b1, b2, omb1, omb2, step, eps, lr, decay, l2, fmax, nfmax, inf, one, zero;
  explicit Consts(const Optim8Params& k)
      : b1(_mm512_set1_ps(k.beta1)),
        b2(_mm512_set1_ps(k.beta2)),
        omb1(_mm512_set1_ps(k.one_minus_beta1)),
        omb2(_mm512_set1_ps(k.one_minus_beta2)),
        step(_mm512_set1_ps(k.step_size)),
        eps(_mm512_set1_ps(k.eps)),
        lr(_mm512_set1_ps(k.lr)),
        decay(_mm512_set1_ps(k.decay)),
        l2(_mm512_set1_ps(k.l2)),
        fmax(_mm512_set1_ps(FLT_MAX)),
        nfmax(_mm512_set1_ps(-FLT_MAX)),
        inf(_mm512_set1_ps(HUGE_VALF)),
        one(_mm512_set1_ps(1.0f)),
        zero(_mm512_setzero_ps()) {}
};

// code[q] * absmax for 16 stored codes (lanes outside m read code 0 and are never stored).
inline __m512 dequant16(const uint8_t* q, __mmask16 m, const float* code, __m512 a) {
  const __m512i idx = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, q));
  return _mm512_mul_ps(_mm512_i32gather_ps(idx, code, 4), a);
}
inline __m512 load_ps(const float* x, __mmask16 m) { return _mm512_maskz_loadu_ps(m, x); }
template <bool L2>
inline __m512 grad16(const float* g, const float* p, __mmask16 m, const Consts& c) {
  const __m512 gv = load_ps(g, m);
  if constexpr (L2) return _mm512_add_ps(gv, _mm512_mul_ps(c.l2, load_ps(p, m)));
  return gv;
}
inline __mmask16 finite16(__m512 g, const Consts& c) {
  return _mm512_cmp_ps_mask(_mm512_abs_ps(g), c.inf, _CMP_LT_OQ);
}

// optim8_code on 16 lanes: the sorted position of (x * pre) * inv, the sign rule, the code bytes.
struct Quant16 {
  const Search8 search;
  const Lut8* map;
  const bool identity;
  const __m512i zneg_minus1;
  const bool sign_rule;
  Quant16(const Lut8* l, int zneg)
      : search(l->mid),
        map(l),
        identity(optim8_identity(l)),
        zneg_minus1(_mm512_set1_epi32(zneg - 1)),
        sign_rule(zneg > 0) {}

  void store(__m512 x, __m512 pre, __m512 inv, __mmask16 m, uint8_t* q) const {
    __m512i pos = search.position(_mm512_mul_ps(_mm512_mul_ps(x, pre), inv));
    if (sign_rule) {
      const __mmask16 fix =
          _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ) & _mm512_cmpgt_epi32_mask(pos, zneg_minus1);
      pos = _mm512_mask_sub_epi32(pos, fix, pos, _mm512_set1_epi32(1));
    }
    if (!identity) pos = _mm512_i32gather_epi32(pos, map->sorted_to_code, 4);
    _mm512_mask_cvtepi32_storeu_epi8(q, m, pos);
  }
};

template <bool L2>
void adam_blocks(float* p, const float* g, uint8_t* s1, uint8_t* s2, float* absmax1, float* absmax2,
                 int64_t n, int64_t bs, const Optim8Params& k, const Lut8* map1, const Lut8* map2) {
  const Consts c(k);
  const int zneg = optim8_negative_codes(map1);
  const Quant16 quant1(map1, zneg), quant2(map2, 0);
  alignas(64) float m[kOptim8MaxBlock + 16], v[kOptim8MaxBlock + 16];
  for (int64_t b = 0, i0 = 0; i0 < n; ++b, i0 += bs) {
    const int64_t len = std::min(bs, n - i0);
    float* pb = p + i0;
    const float* gb = g + i0;
    uint8_t *q1 = s1 + i0, *q2 = s2 + i0;
    const __m512 va1 = _mm512_set1_ps(absmax1[b]), va2 = _mm512_set1_ps(absmax2[b]);
    __m512 n1 = c.zero, n2 = c.zero;
    for (int64_t j = 0; j < len; j += 16) {
      const __mmask16 lanes = mask_upto16(len - j);
      const __m512 gi = grad16<L2>(gb + j, pb + j, lanes, c);
      const __mmask16 ok = finite16(gi, c) & lanes;
      const __m512 mo = dequant16(q1 + j, lanes, map1->code, va1),
                   vo = dequant16(q2 + j, lanes, map2->code, va2);
      __m512 mj = _mm512_add_ps(_mm512_mul_ps(mo, c.b1), _mm512_mul_ps(c.omb1, gi));
      __m512 vj = _mm512_add_ps(_mm512_mul_ps(vo, c.b2), _mm512_mul_ps(_mm512_mul_ps(c.omb2, gi), gi));
      mj = _mm512_min_ps(_mm512_max_ps(_mm512_maskz_mov_ps(ok, mj), c.nfmax), c.fmax);
      vj = _mm512_min_ps(_mm512_maskz_mov_ps(ok, vj), c.fmax);
      _mm512_store_ps(m + j, mj);
      _mm512_store_ps(v + j, vj);
      n1 = _mm512_max_ps(n1, _mm512_abs_ps(mj));  // lanes outside the block are 0
      n2 = _mm512_max_ps(n2, vj);
    }
    const float f1 = _mm512_reduce_max_ps(n1), f2 = _mm512_reduce_max_ps(n2);
    absmax1[b] = f1;
    absmax2[b] = f2;
    const Lut8Scale l1 = lut8_scale(f1), l2 = lut8_scale(f2);
    const __m512 pre1 = _mm512_set1_ps(l1.pre), inv1 = _mm512_set1_ps(l1.inv);
    const __m512 pre2 = _mm512_set1_ps(l2.pre), inv2 = _mm512_set1_ps(l2.inv);
    for (int64_t j = 0; j < len; j += 16) {
      const __mmask16 lanes = mask_upto16(len - j);
      const __m512 pv = load_ps(pb + j, lanes);
      const __m512 gi = grad16<L2>(gb + j, pb + j, lanes, c);
      const __m512 mj = _mm512_load_ps(m + j), vj = _mm512_load_ps(v + j);
      const __m512 upd = _mm512_div_ps(mj, _mm512_add_ps(_mm512_sqrt_ps(vj), c.eps));
      const __m512 np = _mm512_sub_ps(_mm512_mul_ps(pv, c.decay), _mm512_mul_ps(c.step, upd));
      _mm512_mask_storeu_ps(pb + j, finite16(gi, c) & lanes, np);
      quant1.store(mj, pre1, inv1, lanes, q1 + j);
      quant2.store(vj, pre2, inv2, lanes, q2 + j);
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
  const Consts c(*prm);
  const int zneg = optim8_negative_codes(map1);
  const Quant16 quant1(map1, zneg);
  alignas(64) float m[kOptim8MaxBlock + 16];
  for (int64_t b = 0, i0 = 0; i0 < n; ++b, i0 += bs) {
    const int64_t len = std::min(bs, n - i0);
    float* pb = p + i0;
    const float* gb = g + i0;
    uint8_t* q1 = s1 + i0;
    const __m512 va1 = _mm512_set1_ps(absmax1[b]);
    __m512 n1 = c.zero;
    for (int64_t j = 0; j < len; j += 16) {
      const __mmask16 lanes = mask_upto16(len - j);
      const __m512 gi = load_ps(gb + j, lanes);
      const __mmask16 ok = finite16(gi, c) & lanes;
      const __m512 mo = dequant16(q1 + j, lanes, map1->code, va1);
      const __m512 dir = _mm512_add_ps(_mm512_mul_ps(mo, c.b1), _mm512_mul_ps(c.omb1, gi));
      __m512 mj = _mm512_add_ps(_mm512_mul_ps(mo, c.b2), _mm512_mul_ps(c.omb2, gi));
      mj = _mm512_min_ps(_mm512_max_ps(_mm512_maskz_mov_ps(ok, mj), c.nfmax), c.fmax);
      _mm512_store_ps(m + j, mj);
      n1 = _mm512_max_ps(n1, _mm512_abs_ps(mj));
      // sign(dir) = (dir > 0) - (dir < 0) as float.
      const __m512 sign =
          _mm512_sub_ps(_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(dir, c.zero, _CMP_GT_OQ), c.one),
                        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(dir, c.zero, _CMP_LT_OQ), c.one));
      const __m512 pv = load_ps(pb + j, lanes);
      const __m512 np = _mm512_sub_ps(_mm512_mul_ps(pv, c.decay), _mm512_mul_ps(c.lr, sign));
      _mm512_mask_storeu_ps(pb + j, ok, np);
    }
    const float f1 = _mm512_reduce_max_ps(n1);
    absmax1[b] = f1;
    const Lut8Scale l1 = lut8_scale(f1);
    const __m512 pre1 = _mm512_set1_ps(l1.pre), inv1 = _mm512_set1_ps(l1.inv);
    for (int64_t j = 0; j < len; j += 16)
      quant1.store(_mm512_load_ps(m + j), pre1, inv1, mask_upto16(len - j), q1 + j);
  }
}

}  // namespace msbnb::kernels::MSBNB_ISA_NS
