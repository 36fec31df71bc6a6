// AVX-512 int8-activation 4-bit GEMV (kernels.def: lut4_q8, quantize_row_q8; MatmulPath::int8).
//
// A 64-byte chunk of a Lut4Matrix row holds 128 codes; masking its bytes with 0x0f (and shifting
// them down by 4) gives the indices of two planes of 64 columns, each turned into unsigned int8
// weights T + 128 by one vpshufb, and multiplied with the activations of the same plane (which
// quantize_row_q8 laid out in that order) by one vpdpbusd: per 128 weights two shuffles and two
// dot products, against eight vpermps and eight FMAs on the exact path. With blocks of 64 one
// more vpshufb reorders the code bytes (q8.h's kQ8Pair) so that even int32 lanes sum block 2c
// and odd ones block 2c + 1, scaled by one vector of alternating block scales. The +128 is taken out
// of each block's int32 sum by starting it at -128 * sum(q) (lane 0), the zero point (int4
// asymmetric) in float at the end of the row. Needs VNNI; below it the AVX2 kernel runs.
#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels/isa_kernels.h"
#include "kernels/q8.h"
#include "kernels/scalar_math.h"
#include "kernels/x86/avx512/simd.h"

namespace msbnb::kernels::MSBNB_ISA_NS {

namespace {

// A block's scale and whether the vector quantizer handles it (m > 0 finite, 127 / m finite).
inline bool plain_block(float m) { return m > 0.0f && std::isfinite(m) && std::isfinite(127.0f / m); }

}  // namespace

void quantize_row_q8(const float* x, int64_t kpad, int64_t block, int8_t* q, float* d, int32_t* sum) {
  const int64_t per_chunk = kLut4Chunk / block;  // 1 or 2 blocks a chunk
  const __m512i lo8 = _mm512_set1_epi32(0xff);
  const __m512i pair = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kQ8Pair)));
  float inv[2];
  for (int64_t c = 0; c < kpad / kLut4Chunk; ++c) {
    bool plain = true;
    for (int64_t b = 0; b < per_chunk; ++b) {
      const int64_t a = c * per_chunk + b;
      const float m = max_abs(x + a * block, block);
      d[a] = m / 127.0f;
      plain = plain && plain_block(m);
      inv[b] = 127.0f / m;
    }
    const float* xc = x + c * kLut4Chunk;
    int8_t* qc = q + c * 128;
    if (!plain) {  // zeros, NaN / Inf, or a tiny scale: the reference's code for this chunk
      quantize_chunk_q8(x, c, block, q, sum);
      continue;
    }
    __m512i s01 = _mm512_setzero_si512(), s23 = _mm512_setzero_si512();
    for (int h = 0; h < 2; ++h) {
      __m512i p = _mm512_setzero_si512();
      for (int s = 0; s < 4; ++s) {
        const __m512 sv = _mm512_set1_ps(inv[per_chunk == 2 ? s / 2 : 0]);
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xc + 32 * s + 16 * h), sv));
        if (s < 2)
          s01 = _mm512_add_epi32(s01, v);
        else
          s23 = _mm512_add_epi32(s23, v);
        p = _mm512_or_si512(p, _mm512_slli_epi32(_mm512_and_si512(v, lo8), 8 * s));
      }
      _mm512_storeu_si512(qc + 64 * h, per_chunk == 2 ? _mm512_shuffle_epi8(p, pair) : p);
    }
    if (per_chunk == 1) {
      sum[c] = _mm512_reduce_add_epi32(_mm512_add_epi32(s01, s23));
    } else {
      sum[2 * c] = _mm512_reduce_add_epi32(s01);
      sum[2 * c + 1] = _mm512_reduce_add_epi32(s23);
    }
  }
}

#if defined(__AVX512VNNI__)
namespace {

// How far ahead the code stream is prefetched (as the exact GEMV).
constexpr int64_t kQ8Prefetch = 4096;

// Two floats as the bits of one double (for a 64-bit broadcast).
inline double load_pair(const float* p) {
  double d;
  std::memcpy(&d, p, 8);
  return d;
}

// The call's scales (q8.h) and the unsigned weight table T + 128 in every 128-bit lane.
struct Q8Call : Q8Scales {
  __m512i tab;
  Q8Call(const Lut4Matrix& m, const Lut4Q8Rows& a, const Q8Table& t) : Q8Scales(m, a, t) {
    alignas(16) uint8_t u[16];
    for (int i = 0; i < 16; ++i) u[i] = static_cast<uint8_t>(t.t[i] + 128);
    tab = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(u)));
  }
};

template <int N, bool Half>
void q8_rows(Q8Call& k, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  const Lut4Matrix& w = k.w;
  const int64_t pitch = k.x.pitch(), nb = k.nb, chunks = w.kpad / kLut4Chunk;
  const __m512i m0f = _mm512_set1_epi8(0x0f);
  const __m512i pair = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kQ8Pair)));
  // Codes two rows ahead (at least kQ8Prefetch bytes): long rows need more in flight.
  const int64_t prefetch = std::max<int64_t>(kQ8Prefetch, w.kpad);
  for (int64_t r = r0; r < r1; ++r) {
    float zc[N];
    k.row<N>(r, zc);
    const uint8_t* codes = w.codes + r * (w.kpad / 2);
    __m512 ya[N][2];
    for (auto& a : ya) a[0] = a[1] = _mm512_setzero_ps();
    auto chunk = [&](int64_t c, auto slot) {
      constexpr int S = decltype(slot)::value;
      _mm_prefetch(reinterpret_cast<const char*>(codes + 64 * c) + prefetch, _MM_HINT_T0);
      __m512i q = _mm512_load_si512(codes + 64 * c);
      if constexpr (Half) q = _mm512_shuffle_epi8(q, pair);  // int32 lanes: even block 2c, odd 2c + 1
      const __m512i wl = _mm512_shuffle_epi8(k.tab, _mm512_and_si512(q, m0f));
      const __m512i wh = _mm512_shuffle_epi8(k.tab, _mm512_and_si512(_mm512_srli_epi16(q, 4), m0f));
      for (int i = 0; i < N; ++i) {
        const int8_t* xr = k.x.q + i * pitch + c * 128;
        const float* sc = k.sc.data() + i * nb;
        const int32_t* c128 = k.c128.data() + i * nb;
        if constexpr (!Half) {
          __m512i acc = _mm512_zextsi128_si512(_mm_cvtsi32_si128(c128[c]));
          acc = _mm512_dpbusd_epi32(acc, wl, _mm512_loadu_si512(xr));
          acc = _mm512_dpbusd_epi32(acc, wh, _mm512_loadu_si512(xr + 64));
          ya[i][S] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(sc[c]), ya[i][S]);
        } else {
          // Lanes 0 / 1 start at -128 sum(q) of blocks 2c / 2c + 1; scales alternate the same way.
          __m512i acc =
              _mm512_zextsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c128 + 2 * c)));
          acc = _mm512_dpbusd_epi32(acc, wl, _mm512_loadu_si512(xr));
          acc = _mm512_dpbusd_epi32(acc, wh, _mm512_loadu_si512(xr + 64));
          const __m512 s2 = _mm512_castpd_ps(_mm512_set1_pd(load_pair(sc + 2 * c)));
          ya[i][S] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), s2, ya[i][S]);
        }
      }
    };
    int64_t c = 0;
    for (; c + 1 < chunks; c += 2) {
      chunk(c, std::integral_constant<int, 0>{});
      chunk(c + 1, std::integral_constant<int, 1>{});
    }
    if (c < chunks) chunk(c, std::integral_constant<int, 0>{});
    for (int i = 0; i < N; ++i)
      y[i * ldy + r] = _mm512_reduce_add_ps(_mm512_add_ps(ya[i][0], ya[i][1])) - zc[i];
  }
}

template <bool Half, int N = 1>
void q8_dispatch(Q8Call& k, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  if constexpr (N < kGemvMaxRows)
    if (k.x.n > N) return q8_dispatch<Half, N + 1>(k, r0, r1, y, ldy);
  q8_rows<N, Half>(k, r0, r1, y, ldy);
}

}  // namespace

void lut4_q8(const Lut4Matrix& w, const Lut4Q8Rows& x, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  if (x.n <= 0 || r0 >= r1) return;
  if (x.n > kGemvMaxRows || q8_block(w) != x.block) return scalar::lut4_q8(w, x, r0, r1, y, ldy);
  Q8Call k(w, x, q8_table(w));
  if (x.block == 64) return q8_dispatch<true>(k, r0, r1, y, ldy);
  q8_dispatch<false>(k, r0, r1, y, ldy);
}
#endif

}  // namespace msbnb::kernels::MSBNB_ISA_NS
