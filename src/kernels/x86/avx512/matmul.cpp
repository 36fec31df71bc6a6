// AVX-512 fused dequantize-matmul (kernels/matmul.h).
//
// GEMV (n <= kGemvMaxRows, exact path): weights are decoded in registers and never stored. A
// 64-byte chunk of a Lut4Matrix row holds 128 codes; shifting its int32 lanes right by 4v bits
// leaves the code of element 16v + t in the low 4 bits of lane t, and vpermps looks 16 of them
// up at once in the segment's table (lut - zp) * scale, which is exactly what dequantize gives.
//
// GEMM (larger n, and the fast paths): a thread decodes a block of weight rows once into a
// cache-resident buffer (f32 for the exact path, bf16 for the fast 4-bit path; int8 codes are
// used as stored), then tiles of up to 4 activation rows x 4 weight rows accumulate dot
// products over the whole row (vfmadd / vdpbf16ps / vpdpbusd), reduced once per tile.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/gemm_blocking.h"
#include "kernels/q8.h"
#include "kernels/x86/avx512/simd.h"

namespace msbnb::kernels::MSBNB_ISA_NS {

namespace {

// How far ahead weight streams are prefetched: the hardware prefetcher alone leaves one thread
// at ~10 GB/s from DRAM, below what the decode keeps up with.
constexpr int64_t kPrefetchBytes = 4096;
inline void prefetch_ahead(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
}
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

// ---- decoding ----------------------------------------------------------------------------------

// Walks the segments (groups / blocks) of one row: table() is the row's current decode table.
struct Lut4Row {
  const Lut4Matrix& w;
  const __m512 lut;
  int64_t seg, next;  // current segment, and the column where the next one starts
  __m512 table_;

  // From column c0 of row r (a multiple of 16; groups lie inside rows, as simd_friendly()
  // guarantees, so the row's groups start at r * row_stride / group).
  Lut4Row(const Lut4Matrix& m, int64_t r, __m512 base, int64_t c0 = 0)
      : w(m),
        lut(base),
        seg(r * (m.row_stride / m.group) + c0 / m.group),
        next((c0 / m.group + 1) * m.group) {
    build();
  }
  void build() {
    // Padding columns past the row's own segments (nf4 blocks of the next row) decode to 0
    // whatever that segment's scale is: 0 * Inf there would make the whole row NaN.
    if (next - w.group >= w.row_stride) {
      table_ = _mm512_setzero_ps();
      return;
    }
    __m512 t = lut;
    if (w.zero_point) t = _mm512_sub_ps(t, _mm512_set1_ps(w.zero_point[seg]));
    table_ = _mm512_mul_ps(t, _mm512_set1_ps(w.scale[seg]));
  }
  // Table for the 16 columns starting at j (called with increasing j, a multiple of 16).
  __m512 at(int64_t j) {
    if (j == next) {
      ++seg;
      next += w.group;
      build();
    }
    return table_;
  }
};

// Element 16v + t of a chunk of codes q, decoded with table tab.
template <int V>
inline __m512 decode16(__m512i q, __m512 tab) {
  if constexpr (V == 0) return _mm512_permutexvar_ps(q, tab);
  return _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4 * V), tab);
}

// Row r of w decoded to floats (kpad of them) into out.
inline void decode_lut4_row_f32(const Lut4Matrix& w, int64_t r, float* out) {
  Lut4Row row(w, r, _mm512_loadu_ps(w.lut));
  const uint8_t* codes = w.codes + r * (w.kpad / 2);
  for (int64_t c = 0; c < w.kpad; c += kLut4Chunk) {
    prefetch_ahead(codes + c / 2);
    const __m512i q = _mm512_load_si512(codes + c / 2);
    for_each_v<0>([&](auto v) {
      constexpr int V = decltype(v)::value;
      _mm512_storeu_ps(out + c + 16 * V, decode16<V>(q, row.at(c + 16 * V)));
    });
  }
}

#if defined(__AVX512BF16__)
inline void decode_lut4_row_bf16(const Lut4Matrix& w, int64_t r, uint16_t* out) {
  Lut4Row row(w, r, _mm512_loadu_ps(w.lut));
  const uint8_t* codes = w.codes + r * (w.kpad / 2);
  for (int64_t c = 0; c < w.kpad; c += kLut4Chunk) {
    prefetch_ahead(codes + c / 2);
    const __m512i q = _mm512_load_si512(codes + c / 2);
    for_each_v<0>([&](auto v) {
      constexpr int V = decltype(v)::value;
      if constexpr (V % 2 == 0) {
        const __m512 lo = decode16<V>(q, row.at(c + 16 * V));
        const __m512 hi = decode16<V + 1>(q, row.at(c + 16 * V + 16));
        _mm512_storeu_si512(out + c + 16 * V, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
    });
  }
}
#endif

inline void decode_int8_row_f32(const Int8Matrix& w, int64_t r, float* out) {
  const int8_t* q = w.codes + r * w.kpad;
  const __m512 off = _mm512_set1_ps(w.offset ? w.offset[r] : 0.0f), s = _mm512_set1_ps(w.scale[r]);
  for (int64_t j = 0; j < w.kpad; j += 16) {
    const __m512 v =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(q + j))));
    _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_add_ps(v, off), s));
  }
}

// A decoded row requantized to int8 (q8.h's requantize_row_i8, bit for bit); `sum` gets the sum
// of its codes.
inline float requantize_row(const float* v, int64_t kpad, int8_t* q, int32_t& sum) {
  const float mx = max_abs(v, kpad);
  if (!(mx > 0.0f) || !std::isfinite(mx) || !std::isfinite(127.0f / mx)) {
    const float s = requantize_row_i8(v, kpad, q);
    sum = 0;
    for (int64_t j = 0; j < kpad; ++j) sum += q[j];
    return s;
  }
  const __m512 inv = _mm512_set1_ps(127.0f / mx);
  __m512i acc = _mm512_setzero_si512();
  for (int64_t j = 0; j < kpad; j += 16) {
    const __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + j), inv));
    acc = _mm512_add_epi32(acc, c);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j), _mm512_cvtepi32_epi8(c));
  }
  sum = _mm512_reduce_add_epi32(acc);
  return mx / 127.0f;
}

// ---- GEMV: decode in registers -------------------------------------------------------------------

// Accumulators for N activation rows; with few rows, several per row hide the FMA latency.
template <int N>
constexpr int kAccPerRow = N >= 4 ? 1 : 4 / N;

// Multi: rows longer than one column pass (see below); otherwise one pass, the plain walk.
template <int N, bool Multi>
void lut4_gemv_walk(const Lut4Matrix& w, const float* x, int64_t ldx, int64_t r0, int64_t r1, float* y,
                    int64_t ldy) {
  constexpr int A = kAccPerRow<N>;
  const __m512 base = _mm512_loadu_ps(w.lut);
  const int64_t pitch = w.kpad / 2, per_row = w.row_stride / w.group;
  // Rows longer than one column pass are walked kGemvGroupRows at a time, pass by pass (each
  // row's passes still in order: the same sums), while the next group's codes stream into L2 in
  // address order, a line per chunk read: the passes alone read short runs of each row, which
  // the hardware prefetcher follows poorly.
  const int64_t group = Multi ? kGemvGroupRows : r1 - r0;
  for (int64_t g0 = r0; g0 < r1; g0 += group) {
    const int64_t g1 = std::min(r1, g0 + group);
    const uint8_t* ahead = w.codes + g1 * pitch;
    const uint8_t* const ahead_end = w.codes + std::min(r1, g1 + group) * pitch;
    for (int64_t cb = 0; cb < w.kpad; cb += gemv_cols<N>(kLut4Chunk)) {
      const int64_t ce = std::min(w.kpad, cb + gemv_cols<N>(kLut4Chunk));
      for (int64_t r = g0; r < g1; ++r) {
        Lut4Row row(w, r, base, cb);
        const uint8_t* codes = w.codes + r * pitch;
        __m512 acc[N][A];
        for (auto& a : acc)
          for (auto& b : a) b = _mm512_setzero_ps();
        for (int64_t c = cb; c < ce; c += kLut4Chunk) {
          prefetch(codes + c / 2 + 2 * pitch);  // the same columns, two rows on
          if constexpr (Multi) {
            // Their statistics too (the passes read short runs of them as well).
            prefetch(w.scale + row.seg + 2 * per_row);
            if (w.zero_point) prefetch(w.zero_point + row.seg + 2 * per_row);
            if (ahead < ahead_end) {
              _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T1);
              ahead += 64;
            }
          }
          const __m512i q = _mm512_load_si512(codes + c / 2);
          for_each_v<0>([&](auto v) {
            constexpr int V = decltype(v)::value;
            const __m512 wv = decode16<V>(q, row.at(c + 16 * V));
            for (int i = 0; i < N; ++i)
              acc[i][V % A] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + i * ldx + c + 16 * V), acc[i][V % A]);
          });
        }
        for (int i = 0; i < N; ++i) {
          __m512 s = acc[i][0];
          for (int a = 1; a < A; ++a) s = _mm512_add_ps(s, acc[i][a]);
          y[i * ldy + r] = (cb ? y[i * ldy + r] : 0.0f) + _mm512_reduce_add_ps(s);
        }
      }
    }
  }
}

template <int N>
void lut4_gemv(const Lut4Matrix& w, const float* x, int64_t ldx, int64_t r0, int64_t r1, float* y,
               int64_t ldy) {
  if (w.kpad > gemv_cols<N>(kLut4Chunk)) return lut4_gemv_walk<N, true>(w, x, ldx, r0, r1, y, ldy);
  lut4_gemv_walk<N, false>(w, x, ldx, r0, r1, y, ldy);
}

// y = sum_j ((q + offset) * scale) * x: each weight is exactly the dequantized one (symmetric
// weights skip the offset add).
template <int N, bool Offset>
void int8_gemv_rows(const Int8Matrix& w, const float* x, int64_t ldx, int64_t r0, int64_t r1, float* y,
                    int64_t ldy) {
  constexpr int A = kAccPerRow<N>;
  for (int64_t cb = 0; cb < w.kpad; cb += gemv_cols<N>(64)) {
    const int64_t ce = std::min(w.kpad, cb + gemv_cols<N>(64));
    for (int64_t r = r0; r < r1; ++r) {
      const int8_t* q = w.codes + r * w.kpad;
      const __m512 off = _mm512_set1_ps(Offset ? w.offset[r] : 0.0f), scale = _mm512_set1_ps(w.scale[r]);
      __m512 acc[N][A];
      for (auto& a : acc)
        for (auto& b : a) b = _mm512_setzero_ps();
      for (int64_t j = cb; j < ce; j += 64) {
        prefetch(q + j + 2 * w.kpad);  // the same columns, two rows on
        for (int v = 0; v < 4; ++v) {
          __m512 wv = _mm512_cvtepi32_ps(
              _mm512_cvtepi8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(q + j + 16 * v))));
          if constexpr (Offset) wv = _mm512_add_ps(wv, off);
          wv = _mm512_mul_ps(wv, scale);
          for (int i = 0; i < N; ++i)
            acc[i][v % A] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + i * ldx + j + 16 * v), acc[i][v % A]);
        }
      }
      for (int i = 0; i < N; ++i) {
        __m512 s = acc[i][0];
        for (int a = 1; a < A; ++a) s = _mm512_add_ps(s, acc[i][a]);
        y[i * ldy + r] = (cb ? y[i * ldy + r] : 0.0f) + _mm512_reduce_add_ps(s);
      }
    }
  }
}
// ---- GEMM tiles: dot products over whole rows ---------------------------------------------------

struct F32Dot {
  using X = float;
  using W = float;
  using Acc = __m512;
  using Out = float;
  static constexpr int kStep = 16;
  static constexpr int kNR = 4, kMR = 4;
  static constexpr bool kStreamsFromDram = false;
  static Acc zero() { return _mm512_setzero_ps(); }
  static __m512i load(const void* p) { return _mm512_loadu_si512(p); }
  static Acc step(Acc a, __m512i x, __m512i w) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(w), a);
  }
  static Out reduce(Acc a) { return _mm512_reduce_add_ps(a); }
};
#if defined(__AVX512BF16__)
struct Bf16Dot {
  using X = uint16_t;
  using W = uint16_t;
  using Acc = __m512;
  using Out = float;
  static constexpr int kStep = 32;
  static constexpr int kNR = 4, kMR = 4;
  static constexpr bool kStreamsFromDram = false;
  static Acc zero() { return _mm512_setzero_ps(); }
  static __m512i load(const void* p) { return _mm512_loadu_si512(p); }
  static Acc step(Acc a, __m512i x, __m512i w) { return _mm512_dpbf16_ps(a, (__m512bh)x, (__m512bh)w); }
  static Out reduce(Acc a) { return _mm512_reduce_add_ps(a); }
};
#endif
#if defined(__AVX512VNNI__)
struct I8Dot {
  using X = uint8_t;
  using W = int8_t;
  using Acc = __m512i;
  using Out = int32_t;
  static constexpr int kStep = 64;
  static constexpr int kNR = 6, kMR = 4;
  static constexpr bool kStreamsFromDram = true;
  static Acc zero() { return _mm512_setzero_si512(); }
  static __m512i load(const void* p) { return _mm512_loadu_si512(p); }
  static Acc step(Acc a, __m512i x, __m512i w) { return _mm512_dpbusd_epi32(a, x, w); }
  // Wrapping (mod 2^32) horizontal sum: lanes may wrap before the -128 * row_sum correction
  // brings the total back into range; _mm512_reduce_add_epi32 adds in signed int (UB on wrap).
  static Out reduce(Acc a) {
    const __m256i s = _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
    return _mm_cvtsi128_si32(t);
  }
};
// The same on rows decoded into a buffer that is in L2 already (lut4_i8): no prefetching.
struct I8DotL2 : I8Dot {
  static constexpr bool kStreamsFromDram = false;
};
#endif

template <class Op, int NR, int MR>
void tile(const typename Op::X* x, int64_t ldx, const typename Op::W* w, int64_t ldw, int64_t len,
          typename Op::Out* y, int64_t ldy) {
  typename Op::Acc acc[NR][MR];
  for (auto& a : acc)
    for (auto& b : a) b = Op::zero();
  for (int64_t j = 0; j < len; j += Op::kStep) {
    __m512i wv[MR];
    for (int m = 0; m < MR; ++m) {
      // Stored int8 codes stream from DRAM; decoded bf16 / f32 rows are in L2 already, and
      // prefetching them only crowds L1 (the bf16 GEMM ran 1.5x slower with it).
      if constexpr (Op::kStreamsFromDram)
        _mm_prefetch(reinterpret_cast<const char*>(w + m * ldw + j) + 8192, _MM_HINT_T0);
      wv[m] = Op::load(w + m * ldw + j);
    }
    for (int i = 0; i < NR; ++i) {
      const __m512i xv = Op::load(x + i * ldx + j);
      for (int m = 0; m < MR; ++m) acc[i][m] = Op::step(acc[i][m], xv, wv[m]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int m = 0; m < MR; ++m) y[i * ldy + m] = Op::reduce(acc[i][m]);
}

// The full 4 x 4 tiles with the products in asm statements and named accumulators: GCC 12 wraps
// each vpdpbusd / vdpbf16ps / vfmadd231ps of the unrolled loop in two register copies of its
// accumulator (32 extra vector moves per 16 products; with an array of accumulators as asm
// operands it spills them instead), which cost the int8 kernel a third of its throughput. One
// asm may have at most 30 operands, so each step is two statements of 8 products.
#define MSBNB_ASM_HALF(INSN, A, B, XA, XB)                                                       \
  __asm__(INSN " %[w0], %[xa], %[p0]\n\t" INSN " %[w1], %[xa], %[p1]\n\t" INSN                   \
               " %[w2], %[xa], %[p2]\n\t" INSN " %[w3], %[xa], %[p3]\n\t" INSN                   \
               " %[w0], %[xb], %[q0]\n\t" INSN " %[w1], %[xb], %[q1]\n\t" INSN                   \
               " %[w2], %[xb], %[q2]\n\t" INSN " %[w3], %[xb], %[q3]"                            \
          : [p0] "+v"(A##0), [p1] "+v"(A##1), [p2] "+v"(A##2), [p3] "+v"(A##3), [q0] "+v"(B##0), \
            [q1] "+v"(B##1), [q2] "+v"(B##2), [q3] "+v"(B##3)                                    \
          : [w0] "v"(w0), [w1] "v"(w1), [w2] "v"(w2), [w3] "v"(w3), [xa] "v"(XA), [xb] "v"(XB))

#define MSBNB_ASM_TILE(OP, INSN)                                                                         \
  template <>                                                                                            \
  void tile<OP, 4, 4>(const OP::X* x, int64_t ldx, const OP::W* w, int64_t ldw, int64_t len, OP::Out* y, \
                      int64_t ldy) {                                                                     \
    OP::Acc a0 = OP::zero(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0, c0 = a0,     \
            c1 = a0, c2 = a0, c3 = a0, d0 = a0, d1 = a0, d2 = a0, d3 = a0;                               \
    for (int64_t j = 0; j < len; j += OP::kStep) {                                                       \
      const OP::W* wj = w + j;                                                                           \
      const OP::X* xj = x + j;                                                                           \
      if constexpr (OP::kStreamsFromDram)                                                                \
        for (int m = 0; m < 4; ++m)                                                                      \
          _mm_prefetch(reinterpret_cast<const char*>(wj + m * ldw) + 8192, _MM_HINT_T0);                 \
      const __m512i w0 = OP::load(wj), w1 = OP::load(wj + ldw), w2 = OP::load(wj + 2 * ldw),             \
                    w3 = OP::load(wj + 3 * ldw);                                                         \
      const __m512i x0 = OP::load(xj), x1 = OP::load(xj + ldx), x2 = OP::load(xj + 2 * ldx),             \
                    x3 = OP::load(xj + 3 * ldx);                                                         \
      MSBNB_ASM_HALF(INSN, a, b, x0, x1);                                                                \
      MSBNB_ASM_HALF(INSN, c, d, x2, x3);                                                                \
    }                                                                                                    \
    const OP::Acc r[4][4] = {{a0, a1, a2, a3}, {b0, b1, b2, b3}, {c0, c1, c2, c3}, {d0, d1, d2, d3}};    \
    for (int i = 0; i < 4; ++i)                                                                          \
      for (int m = 0; m < 4; ++m) y[i * ldy + m] = OP::reduce(r[i][m]);                                  \
  }

#if defined(__AVX512VNNI__)
MSBNB_ASM_TILE(I8Dot, "vpdpbusd")
// y[0..3] = the wrapping int32 sums of a, b, c, d (14 instructions for 4 sums, against 4 x 7).
inline void reduce4_store(__m512i a, __m512i b, __m512i c, __m512i d, int32_t* y) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  // Per 128-bit lane: [sum a, sum b, sum c, sum d] of that lane.
  const __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(y),
                   _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}

// 6 activation rows x 4 weight rows: 24 accumulators, 10 loads per 24 products (4 x 4: 8 per 16).
template <class Op>
void tile6x4(const typename Op::X* x, int64_t ldx, const typename Op::W* w, int64_t ldw, int64_t len,
             typename Op::Out* y, int64_t ldy) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0, c0 = a0,
          c1 = a0, c2 = a0, c3 = a0, d0 = a0, d1 = a0, d2 = a0, d3 = a0, e0 = a0, e1 = a0, e2 = a0, e3 = a0,
          f0 = a0, f1 = a0, f2 = a0, f3 = a0;
  for (int64_t j = 0; j < len; j += 64) {
    const I8Dot::W* wj = w + j;
    const I8Dot::X* xj = x + j;
    if constexpr (Op::kStreamsFromDram)
      for (int m = 0; m < 4; ++m)
        _mm_prefetch(reinterpret_cast<const char*>(wj + m * ldw) + 8192, _MM_HINT_T0);
    const __m512i w0 = _mm512_loadu_si512(wj), w1 = _mm512_loadu_si512(wj + ldw),
                  w2 = _mm512_loadu_si512(wj + 2 * ldw), w3 = _mm512_loadu_si512(wj + 3 * ldw);
    {
      const __m512i x0 = _mm512_loadu_si512(xj), x1 = _mm512_loadu_si512(xj + ldx);
      MSBNB_ASM_HALF("vpdpbusd", a, b, x0, x1);
    }
    {
      const __m512i x2 = _mm512_loadu_si512(xj + 2 * ldx), x3 = _mm512_loadu_si512(xj + 3 * ldx);
      MSBNB_ASM_HALF("vpdpbusd", c, d, x2, x3);
    }
    {
      const __m512i x4 = _mm512_loadu_si512(xj + 4 * ldx), x5 = _mm512_loadu_si512(xj + 5 * ldx);
      MSBNB_ASM_HALF("vpdpbusd", e, f, x4, x5);
    }
  }
  reduce4_store(a0, a1, a2, a3, y);
  reduce4_store(b0, b1, b2, b3, y + ldy);
  reduce4_store(c0, c1, c2, c3, y + 2 * ldy);
  reduce4_store(d0, d1, d2, d3, y + 3 * ldy);
  reduce4_store(e0, e1, e2, e3, y + 4 * ldy);
  reduce4_store(f0, f1, f2, f3, y + 5 * ldy);
}
template <>
void tile<I8Dot, 6, 4>(const I8Dot::X* x, int64_t ldx, const I8Dot::W* w, int64_t ldw, int64_t len,
                       I8Dot::Out* y, int64_t ldy) {
  tile6x4<I8Dot>(x, ldx, w, ldw, len, y, ldy);
}
template <>
void tile<I8DotL2, 6, 4>(const I8DotL2::X* x, int64_t ldx, const I8DotL2::W* w, int64_t ldw, int64_t len,
                         I8DotL2::Out* y, int64_t ldy) {
  tile6x4<I8DotL2>(x, ldx, w, ldw, len, y, ldy);
}
#endif
#if defined(__AVX512BF16__)
MSBNB_ASM_TILE(Bf16Dot, "vdpbf16ps")
#endif
MSBNB_ASM_TILE(F32Dot, "vfmadd231ps")
#undef MSBNB_ASM_TILE
#undef MSBNB_ASM_HALF

// ---- transposed product ---------------------------------------------------------------------------

// gx[i][c, c + width) (+)= sum_r gy[i][r] * w[r][c, c + 16 VN) for NR rows of gy: one column
// chunk, every weight row decoded in registers (decode(r, f) calls f(V, w) for V < VN) and
// multiplied into NR x VN accumulators, which are stored once at the end.
template <int NR, int VN, class Decode>
void transposed_tile(int64_t rows, const float* gy, int64_t ldy, int64_t width, float* gx, int64_t ldx,
                     bool accumulate, const Decode& decode) {
  __m512 acc[NR][VN];
  for (auto& a : acc)
    for (auto& b : a) b = _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    __m512 g[NR];
    for (int i = 0; i < NR; ++i) g[i] = _mm512_set1_ps(gy[i * ldy + r]);
    decode(r, [&](auto v, __m512 wv) {
      constexpr int V = decltype(v)::value;
      for (int i = 0; i < NR; ++i) acc[i][V] = _mm512_fmadd_ps(g[i], wv, acc[i][V]);
    });
  }
  for (int i = 0; i < NR; ++i)
    for (int v = 0; v < VN && 16 * v < width; ++v) {
      const __mmask16 m = mask_upto16(width - 16 * v);  // nothing past the range is touched
      float* out = gx + i * ldx + 16 * v;
      const __m512 a = accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(m, out), acc[i][v]) : acc[i][v];
      _mm512_mask_storeu_ps(out, m, a);
    }
}

// The columns [c0, c1) in chunks of 16 VN, the rows of gy in tiles of up to NR.
template <int NR, int VN, class MakeDecode>
void transposed(int64_t rows, const float* gy, int64_t n, int64_t ldy, int64_t c0, int64_t c1, float* gx,
                int64_t ldx, bool accumulate, MakeDecode make_decode) {
  for (int64_t c = c0; c < c1; c += 16 * VN) {
    const auto decode = make_decode(c);
    const int64_t width = std::min<int64_t>(16 * VN, c1 - c);
    for (int64_t i = 0; i < n; i += NR) {
      const float* g = gy + i * ldy;
      float* out = gx + i * ldx + c;
      switch (std::min<int64_t>(NR, n - i)) {
        case 1:
          transposed_tile<1, VN>(rows, g, ldy, width, out, ldx, accumulate, decode);
          break;
        case 2:
          transposed_tile<2, VN>(rows, g, ldy, width, out, ldx, accumulate, decode);
          break;
        case 3:
          transposed_tile<3, VN>(rows, g, ldy, width, out, ldx, accumulate, decode);
          break;
        case 4:
          transposed_tile<(NR >= 4 ? 4 : 1), VN>(rows, g, ldy, width, out, ldx, accumulate, decode);
          break;
        case 5:
          transposed_tile<(NR >= 5 ? 5 : 1), VN>(rows, g, ldy, width, out, ldx, accumulate, decode);
          break;
        default:
          transposed_tile<NR, VN>(rows, g, ldy, width, out, ldx, accumulate, decode);
          break;
      }
    }
  }
}

// ---- transposed product over rows (small n) -------------------------------------------------------

// gx[i][0, kpad) += sum of gy[i][r + q] * w[r + q][:] for the R weight rows from r and N rows of gy:
// the R rows stream in order, each 16-column piece of them is decoded once and added into gx
// (L1 / L2 resident) in row order. Groups lie inside rows (simd_friendly), so every row's
// segments start at the same columns (multiples of group).
template <int N, int R>
void lut4_t_rows_block(const Lut4Matrix& w, __m512 base, const float* gy, int64_t ldy, int64_t r, float* gx,
                       int64_t ldx) {
  const int64_t pitch = w.kpad / 2, per_row = w.row_stride / w.group, group = w.group;
  const float* scale = w.scale;
  const float* zp = w.zero_point;
  const uint8_t* codes = w.codes + r * pitch;
  __m512 g[N][R];
  for (int i = 0; i < N; ++i)
    for (int q = 0; q < R; ++q) g[i][q] = _mm512_set1_ps(gy[i * ldy + r + q]);
  __m512 tab[R];
  int64_t seg = 0, next = group;  // the segment (within a row) and where the next starts
  auto build = [&] {
    // Padding past the row's own segments decodes to 0 (0 * Inf must not make columns NaN).
    const bool past = seg * group >= w.row_stride;
    for (int q = 0; q < R; ++q) {
      if (past) {
        tab[q] = _mm512_setzero_ps();
        continue;
      }
      const int64_t s = (r + q) * per_row + seg;
      __m512 t = base;
      if (zp) t = _mm512_sub_ps(t, _mm512_set1_ps(zp[s]));
      tab[q] = _mm512_mul_ps(t, _mm512_set1_ps(scale[s]));
    }
  };
  build();
  for (int64_t c = 0; c < w.kpad; c += kLut4Chunk) {
    __m512i qv[R];
    for (int q = 0; q < R; ++q) {
      prefetch(codes + q * pitch + c / 2 + R * pitch);  // the same columns of the next rows
      qv[q] = _mm512_load_si512(codes + q * pitch + c / 2);
    }
    for_each_v<0>([&](auto v) {
      constexpr int V = decltype(v)::value;
      if (c + 16 * V == next) {
        ++seg;
        next += group;
        build();
      }
      __m512 wv[R];
      for (int q = 0; q < R; ++q) wv[q] = decode16<V>(qv[q], tab[q]);
      for (int i = 0; i < N; ++i) {
        float* o = gx + i * ldx + c + 16 * V;
        __m512 a = _mm512_loadu_ps(o);
        for (int q = 0; q < R; ++q) a = _mm512_fmadd_ps(g[i][q], wv[q], a);
        _mm512_storeu_ps(o, a);
      }
    });
  }
}

template <int N, bool Offset, int R>
void int8_t_rows_block(const Int8Matrix& w, const float* gy, int64_t ldy, int64_t r, float* gx, int64_t ldx) {
  const int64_t kpad = w.kpad;
  const int8_t* codes = w.codes + r * kpad;
  __m512 g[N][R], off[R], s[R];
  for (int q = 0; q < R; ++q) {
    off[q] = _mm512_set1_ps(Offset ? w.offset[r + q] : 0.0f);
    s[q] = _mm512_set1_ps(w.scale[r + q]);
    for (int i = 0; i < N; ++i) g[i][q] = _mm512_set1_ps(gy[i * ldy + r + q]);
  }
  for (int64_t j = 0; j < kpad; j += 64) {
    for (int q = 0; q < R; ++q) prefetch(codes + q * kpad + j + R * kpad);
    for (int v = 0; v < 4; ++v) {
      __m512 wv[R];
      for (int q = 0; q < R; ++q) {
        wv[q] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_load_si128(reinterpret_cast<const __m128i*>(codes + q * kpad + j + 16 * v))));
        if constexpr (Offset) wv[q] = _mm512_add_ps(wv[q], off[q]);
        wv[q] = _mm512_mul_ps(wv[q], s[q]);
      }
      for (int i = 0; i < N; ++i) {
        float* o = gx + i * ldx + j + 16 * v;
        __m512 a = _mm512_loadu_ps(o);
        for (int q = 0; q < R; ++q) a = _mm512_fmadd_ps(g[i][q], wv[q], a);
        _mm512_storeu_ps(o, a);
      }
    }
  }
}

}  // namespace

void lut4_f32(const Lut4Matrix& w, const float* x, int64_t n, int64_t ldx, int64_t r0, int64_t r1, float* y,
              int64_t ldy) {
  exact_f32<F32Dot, decode_lut4_row_f32>(w, x, n, ldx, r0, r1, y, ldy);
}

void int8_f32(const Int8Matrix& w, const float* x, int64_t n, int64_t ldx, int64_t r0, int64_t r1, float* y,
              int64_t ldy) {
  exact_f32<F32Dot, decode_int8_row_f32>(w, x, n, ldx, r0, r1, y, ldy);
}

#if defined(__AVX512BF16__)
void lut4_bf16(const Lut4Matrix& w, const uint16_t* x, int64_t n, int64_t ldx, int64_t r0, int64_t r1,
               float* y, int64_t ldy) {
  if (!w.simd_friendly()) return scalar::lut4_bf16(w, x, n, ldx, r0, r1, y, ldy);
  decoded_gemm<Bf16Dot>(w.kpad, n, DirectRows<uint16_t>{x, ldx}, r0, r1, y, ldy,
                        [&](int64_t r, uint16_t* out) { decode_lut4_row_bf16(w, r, out); });
}
#endif

#if defined(__AVX512VNNI__)
void int8_i8(const Int8Matrix& w, const uint8_t* xu, int64_t n, int64_t ldx, int64_t r0, int64_t r1,
             int32_t* acc, int64_t ldy) {
  // Codes are used as stored.
  stored_gemm<I8Dot>(
      w.codes, w.kpad, n, DirectRows<uint8_t>{xu, ldx}, r0, r1, acc, ldy, [&](int64_t b, int64_t rows) {
        // sum (xu - 128) q = sum xu q - 128 sum q (while the block's outputs are in cache).
        // In uint32: the biased sum may wrap; the true value fits (the driver keeps k <= 2^17).
        for (int64_t i = 0; i < n; ++i)
          for (int64_t m = 0; m < rows; ++m)
            acc[i * ldy + b + m] = static_cast<int32_t>(static_cast<uint32_t>(acc[i * ldy + b + m]) -
                                                        128u * static_cast<uint32_t>(w.row_sum[b + m]));
      });
}
#endif

#if defined(__AVX512VNNI__)
void lut4_i8(const Lut4Matrix& w, const uint8_t* xu, int64_t n, int64_t ldx, int64_t r0, int64_t r1,
             int32_t* acc, int64_t ldy, float* wscale) {
  if (!w.simd_friendly()) return scalar::lut4_i8(w, xu, n, ldx, r0, r1, acc, ldy, wscale);
  std::vector<float> v(static_cast<size_t>(w.kpad));
  std::vector<int32_t> sums(static_cast<size_t>(r1 - r0));
  decoded_gemm<I8DotL2>(w.kpad, n, DirectRows<uint8_t>{xu, ldx}, r0, r1, acc, ldy,
                        [&](int64_t r, int8_t* out) {
                          decode_lut4_row_f32(w, r, v.data());
                          std::fill(v.begin() + w.cols, v.end(), 0.0f);
                          wscale[r] = requantize_row(v.data(), w.kpad, out, sums[r - r0]);
                        });
  // sum (xu - 128) w8 = sum xu w8 - 128 sum w8, in uint32 (the biased sum may wrap).
  for (int64_t i = 0; i < n; ++i)
    for (int64_t r = r0; r < r1; ++r)
      acc[i * ldy + r] = static_cast<int32_t>(static_cast<uint32_t>(acc[i * ldy + r]) -
                                              128u * static_cast<uint32_t>(sums[r - r0]));
}
#endif

void lut4_t_f32(const Lut4Matrix& w, const float* gy, int64_t n, int64_t ldy, int64_t c0, int64_t c1,
                float* gx, int64_t ldx, bool accumulate) {
  if (!w.simd_friendly()) return scalar::lut4_t_f32(w, gy, n, ldy, c0, c1, gx, ldx, accumulate);
  const __m512 base = _mm512_loadu_ps(w.lut);
  const int64_t segs_per_row = w.row_stride / w.group;
  // The segment walk is spelled out with locals here: built on Lut4Row (a struct holding a
  // reference) inside the nested lambdas, this kernel measured 2x slower.
  transposed<3, 8>(w.rows, gy, n, ldy, c0, c1, gx, ldx, accumulate, [&](int64_t c) {
    // Groups lie inside rows, so the chunk's first group is r * segs_per_row + c / group.
    const int64_t first = c / w.group, next0 = (first + 1) * w.group;
    return [&w, base, segs_per_row, first, next0, c](int64_t r, auto&& f) {
      int64_t seg = r * segs_per_row + first, next = next0;
      auto segment_table = [&] {
        __m512 t = base;
        if (w.zero_point) t = _mm512_sub_ps(t, _mm512_set1_ps(w.zero_point[seg]));
        return _mm512_mul_ps(t, _mm512_set1_ps(w.scale[seg]));
      };
      __m512 tab = segment_table();
      const __m512i q = _mm512_load_si512(w.codes + r * (w.kpad / 2) + c / 2);
      for_each_v<0>([&](auto v) {
        constexpr int V = decltype(v)::value;
        if (c + 16 * V == next) {
          ++seg;
          next += w.group;
          tab = segment_table();
        }
        f(v, decode16<V>(q, tab));
      });
    };
  });
}

void int8_t_f32(const Int8Matrix& w, const float* gy, int64_t n, int64_t ldy, int64_t c0, int64_t c1,
                float* gx, int64_t ldx, bool accumulate) {
  transposed<6, 4>(w.rows, gy, n, ldy, c0, c1, gx, ldx, accumulate, [&](int64_t c) {
    return [&w, c](int64_t r, auto&& f) {
      const int8_t* q = w.codes + r * w.kpad + c;
      const __m512 off = _mm512_set1_ps(w.offset ? w.offset[r] : 0.0f), s = _mm512_set1_ps(w.scale[r]);
      auto one = [&](auto v) {
        constexpr int V = decltype(v)::value;
        const __m512 wv = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(q + 16 * V))));
        f(v, _mm512_mul_ps(_mm512_add_ps(wv, off), s));
      };
      one(std::integral_constant<int, 0>{});
      one(std::integral_constant<int, 1>{});
      one(std::integral_constant<int, 2>{});
      one(std::integral_constant<int, 3>{});
    };
  });
}

void lut4_t_rows_f32(const Lut4Matrix& w, const float* gy, int64_t n, int64_t ldy, int64_t r0, int64_t r1,
                     float* gx, int64_t ldx, bool accumulate) {
  if (!w.simd_friendly()) return scalar::lut4_t_rows_f32(w, gy, n, ldy, r0, r1, gx, ldx, accumulate);
  const __m512 base = _mm512_loadu_ps(w.lut);
  t_rows<4, 4>(w.kpad, n, r0, r1, gx, ldx, accumulate, [&](auto nn, auto rr, int64_t i, int64_t r) {
    lut4_t_rows_block<decltype(nn)::value, decltype(rr)::value>(w, base, gy + i * ldy, ldy, r, gx + i * ldx,
                                                                ldx);
  });
}

void int8_t_rows_f32(const Int8Matrix& w, const float* gy, int64_t n, int64_t ldy, int64_t r0, int64_t r1,
                     float* gx, int64_t ldx, bool accumulate) {
  t_rows<4, 4>(w.kpad, n, r0, r1, gx, ldx, accumulate, [&](auto nn, auto rr, int64_t i, int64_t r) {
    constexpr int N = decltype(nn)::value, R = decltype(rr)::value;
    if (w.offset)
      int8_t_rows_block<N, true, R>(w, gy + i * ldy, ldy, r, gx + i * ldx, ldx);
    else
      int8_t_rows_block<N, false, R>(w, gy + i * ldy, ldy, r, gx + i * ldx, ldx);
  });
}

void quantize_row_u8(const float* x, int64_t cols, float inv, uint8_t* xu) {
  const __m512 s = _mm512_set1_ps(inv);
  const __m512i bias = _mm512_set1_epi32(128);
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 m = mask_upto16(cols - j);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + j), s);
    const __m512i q = _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm512_mask_cvtepi32_storeu_epi8(xu + j, m, _mm512_add_epi32(q, bias));
  }
}

}  // namespace msbnb::kernels::MSBNB_ISA_NS
