// AVX2 int8-activation 4-bit GEMV (kernels.def: lut4_q8, quantize_row_q8; MatmulPath::int8).
//
// As the AVX-512 kernel (see there), with 32-byte halves of each 64-byte chunk of codes and
// without VNNI: signed int8 weights T from one vpshufb, multiplied by vpmaddubsw as |T| times
// the activation carrying T's sign (vpsignb; |T|, |q| <= 127, so the int16 pair sums cannot
// saturate) and widened by vpmaddwd; no +128 to take out.
#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels/isa_kernels.h"
#include "kernels/q8.h"
#include "kernels/x86/avx2/simd.h"

namespace msbnb::kernels::MSBNB_ISA_NS {

namespace {

inline int32_t hsum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace

void quantize_row_q8(const float* x, int64_t kpad, int64_t block, int8_t* q, float* d, int32_t* sum) {
  const int64_t per_chunk = kLut4Chunk / block;  // 1 or 2 blocks a chunk
  const __m256i lo8 = _mm256_set1_epi32(0xff);
  float inv[2];
  for (int64_t c = 0; c < kpad / kLut4Chunk; ++c) {
    bool plain = true;
    for (int64_t b = 0; b < per_chunk; ++b) {
      const int64_t a = c * per_chunk + b;
      const float m = max_abs(x + a * block, block);
      d[a] = m / 127.0f;
      plain = plain && m > 0.0f && std::isfinite(m) && std::isfinite(127.0f / m);
      inv[b] = 127.0f / m;
    }
    const float* xc = x + c * kLut4Chunk;
    int8_t* qc = q + c * 128;
    if (!plain) {  // zeros, NaN / Inf, or a tiny scale: the reference's code for this chunk
      quantize_chunk_q8(x, c, block, q, sum);
      continue;
    }
    const __m256i pair =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kQ8Pair)));
    __m256i s01 = _mm256_setzero_si256(), s23 = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h)
      for (int half = 0; half < 2; ++half) {  // lanes t = 8 half .. 8 half + 7 of plane h
        __m256i p = _mm256_setzero_si256();
        for (int s = 0; s < 4; ++s) {
          const __m256 sv = _mm256_set1_ps(inv[per_chunk == 2 ? s / 2 : 0]);
          const __m256i v =
              _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xc + 32 * s + 16 * h + 8 * half), sv));
          if (s < 2)
            s01 = _mm256_add_epi32(s01, v);
          else
            s23 = _mm256_add_epi32(s23, v);
          p = _mm256_or_si256(p, _mm256_slli_epi32(_mm256_and_si256(v, lo8), 8 * s));
        }
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qc + 64 * h + 32 * half),
                            per_chunk == 2 ? _mm256_shuffle_epi8(p, pair) : p);
      }
    if (per_chunk == 1) {
      sum[c] = hsum8(_mm256_add_epi32(s01, s23));
    } else {
      sum[2 * c] = hsum8(s01);
      sum[2 * c + 1] = hsum8(s23);
    }
  }
}

namespace {

constexpr int64_t kQ8Prefetch = 4096;  // at least; two rows ahead for long rows (as AVX-512)

// Sum of the signed products of 32 weights w (|w| = aw) with 32 activations, into int32 lanes.
inline __m256i dot32(__m256i aw, __m256i w, const int8_t* x) {
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w)), _mm256_set1_epi16(1));
}

template <int N, bool Half>
void q8_rows(Q8Scales& k, __m256i tab, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  const Lut4Matrix& w = k.w;
  const int64_t pitch = k.x.pitch(), nb = k.nb, chunks = w.kpad / kLut4Chunk;
  const __m256i m0f = _mm256_set1_epi8(0x0f);
  const __m256i pair =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kQ8Pair)));
  const int64_t prefetch = std::max<int64_t>(kQ8Prefetch, w.kpad);
  for (int64_t r = r0; r < r1; ++r) {
    float zc[N];
    k.row<N>(r, zc);
    const uint8_t* codes = w.codes + r * (w.kpad / 2);
    __m256 ya[N];
    for (auto& a : ya) a = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(codes + 64 * c) + prefetch, _MM_HINT_T0);
      __m256i wl[2], wh[2], al[2], ah[2];
      for (int half = 0; half < 2; ++half) {
        __m256i q = _mm256_load_si256(reinterpret_cast<const __m256i*>(codes + 64 * c + 32 * half));
        if constexpr (Half) q = _mm256_shuffle_epi8(q, pair);  // int32 lanes: even block 2c, odd 2c + 1
        wl[half] = _mm256_shuffle_epi8(tab, _mm256_and_si256(q, m0f));
        wh[half] = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(q, 4), m0f));
        al[half] = _mm256_abs_epi8(wl[half]);
        ah[half] = _mm256_abs_epi8(wh[half]);
      }
      for (int i = 0; i < N; ++i) {
        const int8_t* xb = k.x.q + i * pitch + c * 128;
        const float* sc = k.sc.data() + i * nb;
        __m256i acc = _mm256_add_epi32(dot32(al[0], wl[0], xb), dot32(al[1], wl[1], xb + 32));
        acc = _mm256_add_epi32(acc, dot32(ah[0], wh[0], xb + 64));
        acc = _mm256_add_epi32(acc, dot32(ah[1], wh[1], xb + 96));
        __m256 s;
        if constexpr (Half) {
          double d;
          std::memcpy(&d, sc + 2 * c, 8);  // the two block scales, alternating over the lanes
          s = _mm256_castpd_ps(_mm256_set1_pd(d));
        } else {
          s = _mm256_set1_ps(sc[c]);
        }
        ya[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), s, ya[i]);
      }
    }
    for (int i = 0; i < N; ++i) y[i * ldy + r] = hsum8(ya[i]) - zc[i];
  }
}

template <bool Half, int N = 1>
void q8_dispatch(Q8Scales& k, __m256i tab, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  if constexpr (N < kGemvMaxRows)
    if (k.x.n > N) return q8_dispatch<Half, N + 1>(k, tab, r0, r1, y, ldy);
  q8_rows<N, Half>(k, tab, r0, r1, y, ldy);
}

}  // namespace

void lut4_q8(const Lut4Matrix& w, const Lut4Q8Rows& x, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  if (x.n <= 0 || r0 >= r1) return;
  if (x.n > kGemvMaxRows || q8_block(w) != x.block) return scalar::lut4_q8(w, x, r0, r1, y, ldy);
  const Q8Table t = q8_table(w);
  Q8Scales k(w, x, t);
  const __m256i tab = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t.t)));
  if (x.block == 64) return q8_dispatch<true>(k, tab, r0, r1, y, ldy);
  q8_dispatch<false>(k, tab, r0, r1, y, ldy);
}

}  // namespace msbnb::kernels::MSBNB_ISA_NS
