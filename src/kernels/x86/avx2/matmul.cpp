// AVX2 fused dequantize-matmul (kernels/matmul.h): the structure of the AVX-512 version with
// 256-bit vectors (AVX2 + FMA only: no VNNI, no BF16 instructions).
//
// GEMV (n <= kGemvMaxRows, exact path): weights are decoded in registers and never stored. A
// 64-byte chunk of a Lut4Matrix row is two 32-byte halves; half u holds lanes t = 8u..8u+7, so
// shifting its int32 lanes right by 4v bits leaves the code of element 16v + t in the low 4 bits
// of lane t: 8 consecutive elements. Two vpermps look the low 3 bits of each code up in the two
// 8-entry halves of the segment's table (lut - zp) * scale and a blend on bit 3 (shifted to the
// sign bit) picks one: exactly what dequantize gives. The rows are walked in passes of a few
// hundred columns so that the activations of a pass stay in L1.
//
// GEMM (larger n, and the fast paths): a thread decodes a block of weight rows once into a
// cache-resident buffer, then tiles of a few activation rows x a few weight rows accumulate dot
// products over the whole row, reduced once per tile:
//   exact      f32 weights, vfmadd.
//   fast 4-bit f32 weights holding bf16 values (the segment tables are rounded to bf16, which
//              rounds every value they decode to) and bf16 activations widened to f32 a tile at
//              a time; bf16 x bf16 products are exact in f32, so the sums are the reference's
//              up to order.
//   int8       (xu - 128) and q sign-extended to int16 (in the loop for a few rows, else widened
//              into buffers once per block), vpmaddwd: exact int32 sums.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "kernels/gemm_blocking.h"
#include "kernels/q8.h"
#include "kernels/x86/avx2/simd.h"

namespace msbnb::kernels::MSBNB_ISA_NS {

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
  return _mm_cvtsi128_si32(s);
}

// ---- decoding ----------------------------------------------------------------------------------

// bf16(v) as a float (low 16 bits zero), rounded to nearest even as float_to_bf16 does (NaN
// quieted).
struct RoundBf16 {
  __m256 operator()(__m256 v) const {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
    const __m256i nan = _mm256_or_si256(u, _mm256_set1_epi32(0x00400000));
    const __m256i out = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(nan),
                                                             _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    return _mm256_castsi256_ps(_mm256_and_si256(out, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
};
struct Exact {
  __m256 operator()(__m256 v) const { return v; }
};

// Walks the segments (groups / blocks) of one row: lo / hi are the two halves (indices 0-7 and
// 8-15) of the row's current decode table, its values mapped by Post. Decoding is a lookup, so
// rounding the table to bf16 gives bf16 of every decoded value.
template <class Post = Exact>
struct Lut4Row {
  const Lut4Matrix& w;
  const __m256 base_lo, base_hi;
  int64_t seg, next;  // current segment, and the column where the next one starts
  __m256 lo, hi;

  Lut4Row(const Lut4Matrix& m, int64_t r, __m256 blo, __m256 bhi)
      : w(m), base_lo(blo), base_hi(bhi), seg(r * m.row_stride / m.group), next(m.group) {
    build();
  }
  // Starts at column j (a multiple of 16) instead of the row start.
  void seek(int64_t r, int64_t j) {
    seg = (r * w.row_stride + j) / w.group;
    next = (j / w.group + 1) * w.group;
    build();
  }
  void build() {
    // Padding columns past the row's own segments (nf4 blocks of the next row) decode to 0
    // whatever that segment's scale is: 0 * Inf there would make the whole row NaN.
    if (next - w.group >= w.row_stride) {
      lo = hi = _mm256_setzero_ps();
      return;
    }
    __m256 a = base_lo, b = base_hi;
    if (w.zero_point) {
      const __m256 zp = _mm256_set1_ps(w.zero_point[seg]);
      a = _mm256_sub_ps(a, zp);
      b = _mm256_sub_ps(b, zp);
    }
    const __m256 s = _mm256_set1_ps(w.scale[seg]);
    lo = Post{}(_mm256_mul_ps(a, s));
    hi = Post{}(_mm256_mul_ps(b, s));
  }
  // Moves to the segment of the 16 columns starting at j (called with increasing j, a multiple
  // of 16).
  void at(int64_t j) {
    if (j == next) {
      ++seg;
      next += w.group;
      build();
    }
  }
};

// Elements 16v + 8u + (0..7) of a chunk, from its half u (q), decoded with the table (lo, hi).
template <int V>
inline __m256 decode8(__m256i q, __m256 lo, __m256 hi) {
  const __m256i idx = V == 0 ? q : _mm256_srli_epi32(q, 4 * V);
  // Bit 3 of the index (bit 4V + 3 of the lane) to the sign bit.
  const __m256 sel = _mm256_castsi256_ps(V == 7 ? q : _mm256_slli_epi32(q, 28 - 4 * V));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), sel);
}

// Columns [cb, ce) of row r of w decoded to floats at out (cb a multiple of kLut4Chunk; whole
// chunks are written, up to ce rounded up to kLut4Chunk), mapped by Post (bf16 or exact).
template <class Post>
inline void decode_lut4_cols(const Lut4Matrix& w, int64_t r, int64_t cb, int64_t ce, float* out) {
  Lut4Row<Post> row(w, r, _mm256_loadu_ps(w.lut), _mm256_loadu_ps(w.lut + 8));
  if (cb) row.seek(r, cb);
  const uint8_t* codes = w.codes + r * (w.kpad / 2);
  for (int64_t c = cb; c < ce; c += kLut4Chunk) {
    const __m256i q0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(codes + c / 2));
    const __m256i q1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(codes + c / 2 + 32));
    float* o = out + (c - cb);
    for_each_v<0>([&](auto v) {
      constexpr int V = decltype(v)::value;
      row.at(c + 16 * V);
      _mm256_storeu_ps(o + 16 * V, decode8<V>(q0, row.lo, row.hi));
      _mm256_storeu_ps(o + 16 * V + 8, decode8<V>(q1, row.lo, row.hi));
    });
  }
}

inline void decode_lut4_row_f32(const Lut4Matrix& w, int64_t r, float* out) {
  decode_lut4_cols<Exact>(w, r, 0, w.kpad, out);
}
inline void decode_lut4_row_bf16(const Lut4Matrix& w, int64_t r, float* out) {
  decode_lut4_cols<RoundBf16>(w, r, 0, w.kpad, out);
}

// 8 int8 codes at q as floats.
inline __m256 cvt8_i8(const int8_t* q) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}

// Columns [cb, ce) of row r of an Int8Matrix: (q + offset) * scale, in whole vectors of 8.
inline void decode_int8_cols(const Int8Matrix& w, int64_t r, int64_t cb, int64_t ce, float* out) {
  const int8_t* q = w.codes + r * w.kpad;
  const __m256 off = _mm256_set1_ps(w.offset ? w.offset[r] : 0.0f), s = _mm256_set1_ps(w.scale[r]);
  for (int64_t j = cb; j < ce; j += 8)
    _mm256_storeu_ps(out + (j - cb), _mm256_mul_ps(_mm256_add_ps(cvt8_i8(q + j), off), s));
}
inline void decode_int8_row_f32(const Int8Matrix& w, int64_t r, float* out) {
  decode_int8_cols(w, r, 0, w.kpad, out);
}

// ---- GEMV: decode in registers -------------------------------------------------------------------

// Accumulators for N activation rows; with few rows, several per row hide the FMA latency.
template <int N>
constexpr int kAccPerRow = N >= 5 ? 1 : (N >= 3 ? 2 : 4);

// y[i][r] = (y[i][r] unless first) + the sum of row i's accumulators.
template <int N, int A>
inline void reduce_store(__m256 (&acc)[N][A], float* y, int64_t ldy, int64_t r, bool first) {
  for (int i = 0; i < N; ++i) {
    __m256 s = acc[i][0];
    for (int a = 1; a < A; ++a) s = _mm256_add_ps(s, acc[i][a]);
    const float v = hsum(s);
    y[i * ldy + r] = first ? v : y[i * ldy + r] + v;
  }
}

// Multi: rows longer than one column pass (see below); otherwise one pass, the plain walk.
template <int N, bool Multi>
void lut4_gemv_walk(const Lut4Matrix& w, const float* x, int64_t ldx, int64_t r0, int64_t r1, float* y,
                    int64_t ldy) {
  constexpr int A = kAccPerRow<N>;
  const __m256 base_lo = _mm256_loadu_ps(w.lut), base_hi = _mm256_loadu_ps(w.lut + 8);
  const int64_t per_row = w.row_stride / w.group, pitch = w.kpad / 2;
  // Rows longer than one column pass are walked kGemvGroupRows at a time, pass by pass (each
  // row's passes still in order: the same sums), while the next group's codes stream into L2 in
  // address order, a line per chunk read (as in the AVX-512 kernel).
  const int64_t group = Multi ? kGemvGroupRows : r1 - r0;
  for (int64_t g0 = r0; g0 < r1; g0 += group) {
    const int64_t g1 = std::min(r1, g0 + group);
    const uint8_t* ahead = w.codes + g1 * pitch;
    const uint8_t* const ahead_end = w.codes + std::min(r1, g1 + group) * pitch;
    for (int64_t cb = 0; cb < w.kpad; cb += gemv_cols<N>(kLut4Chunk)) {
      const int64_t ce = std::min(w.kpad, cb + gemv_cols<N>(kLut4Chunk));
      for (int64_t r = g0; r < g1; ++r) {
        Lut4Row<> row(w, r, base_lo, base_hi);
        if (cb) row.seek(r, cb);
        const uint8_t* codes = w.codes + r * pitch;
        __m256 acc[N][A];
        for (auto& a : acc)
          for (auto& b : a) b = _mm256_setzero_ps();
        // One pointer per activation row, advanced a chunk at a time (constant offsets below).
        const float* xp[N];
        for (int i = 0; i < N; ++i) xp[i] = x + i * ldx + cb;
        for (int64_t c = cb; c < ce; c += kLut4Chunk) {
          // Without running ahead, one thread reads only ~10 GB/s from DRAM.
          _mm_prefetch(reinterpret_cast<const char*>(codes + c / 2) + 4096, _MM_HINT_T0);
          if constexpr (Multi) {
            // The statistics two rows on: a pass reads short runs of each row's statistics,
            // which the hardware prefetcher does not follow.
            _mm_prefetch(reinterpret_cast<const char*>(w.scale + row.seg + 2 * per_row), _MM_HINT_T0);
            if (w.zero_point)
              _mm_prefetch(reinterpret_cast<const char*>(w.zero_point + row.seg + 2 * per_row), _MM_HINT_T0);
            if (ahead < ahead_end) {
              _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T1);
              ahead += 64;
            }
          }
          const __m256i q0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(codes + c / 2));
          const __m256i q1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(codes + c / 2 + 32));
          for_each_v<0>([&](auto v) {
            constexpr int V = decltype(v)::value;
            row.at(c + 16 * V);
            const __m256 w0 = decode8<V>(q0, row.lo, row.hi);
            for (int i = 0; i < N; ++i)
              acc[i][(2 * V) % A] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp[i] + 16 * V), acc[i][(2 * V) % A]);
            const __m256 w1 = decode8<V>(q1, row.lo, row.hi);
            for (int i = 0; i < N; ++i)
              acc[i][(2 * V + 1) % A] =
                  _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp[i] + 16 * V + 8), acc[i][(2 * V + 1) % A]);
          });
          for (int i = 0; i < N; ++i) xp[i] += kLut4Chunk;
        }
        reduce_store<N, A>(acc, y, ldy, r, cb == 0);
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

// y = sum_j ((q + offset) * scale) * x: each weight decoded to exactly what dequantize gives
// before it is multiplied (symmetric weights skip the offset add).
template <int N, bool Offset>
void int8_gemv_rows(const Int8Matrix& w, const float* x, int64_t ldx, int64_t r0, int64_t r1, float* y,
                    int64_t ldy) {
  constexpr int A = kAccPerRow<N>;
  for (int64_t cb = 0; cb < w.kpad; cb += gemv_cols<N>(kLut4Chunk)) {
    const int64_t ce = std::min(w.kpad, cb + gemv_cols<N>(kLut4Chunk));
    for (int64_t r = r0; r < r1; ++r) {
      const int8_t* q = w.codes + r * w.kpad;
      const __m256 off = _mm256_set1_ps(Offset ? w.offset[r] : 0.0f), sc = _mm256_set1_ps(w.scale[r]);
      __m256 acc[N][A];
      for (auto& a : acc)
        for (auto& b : a) b = _mm256_setzero_ps();
      const float* xp[N];
      for (int i = 0; i < N; ++i) xp[i] = x + i * ldx + cb;
      for (int64_t j = cb; j < ce; j += 64) {
        for (int v = 0; v < 8; ++v) {
          __m256 wv = cvt8_i8(q + j + 8 * v);
          if constexpr (Offset) wv = _mm256_add_ps(wv, off);
          wv = _mm256_mul_ps(wv, sc);
          for (int i = 0; i < N; ++i)
            acc[i][v % A] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp[i] + 8 * v), acc[i][v % A]);
        }
        for (int i = 0; i < N; ++i) xp[i] += 64;
      }
      reduce_store<N, A>(acc, y, ldy, r, cb == 0);
    }
  }
}
// ---- GEMM tiles: dot products over whole rows ---------------------------------------------------

// Tiles of up to kNR activation rows x kMR weight rows: kNR * kMR accumulators, kMR weight
// vectors and one activation vector fit the 16 ymm registers.
struct F32Dot {
  using X = float;
  using W = float;
  using Vec = __m256;
  using Out = float;
  static constexpr int kStep = 8;
  static constexpr int kNR = 4, kMR = 3;
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec load_x(const X* p) { return _mm256_loadu_ps(p); }
  static Vec load_w(const W* p) { return _mm256_loadu_ps(p); }
  static Vec step(Vec a, Vec x, Vec w) { return _mm256_fmadd_ps(x, w, a); }
  static Out reduce(Vec a) { return hsum(a); }
};
// (xu - 128) and q sign-extended to int16; vpmaddwd sums pairs of products exactly in int32
// (|products| <= 2^14, no saturation).
struct I8Dot {
  using X = uint8_t;
  using W = int8_t;
  using Vec = __m256i;
  using Out = int32_t;
  static constexpr int kStep = 16;
  static constexpr int kNR = 3, kMR = 3;
  static Vec zero() { return _mm256_setzero_si256(); }
  static Vec load_x(const X* p) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtepi8_epi16(_mm_xor_si128(v, _mm_set1_epi8(static_cast<char>(0x80))));
  }
  static Vec load_w(const W* p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static Vec step(Vec a, Vec x, Vec w) { return _mm256_add_epi32(a, _mm256_madd_epi16(x, w)); }
  static Out reduce(Vec a) { return hsum_epi32(a); }
};

// Activation rows xu - 128 widened to int16 (I16Dot's X), nr rows at a time into buf.
struct Int16Rows {
  const uint8_t* xu;
  int64_t ldx, kpad;
  int16_t* buf;
  std::pair<const int16_t*, int64_t> operator()(int64_t i, int nr) const {
    for (int k = 0; k < nr; ++k) {
      const uint8_t* src = xu + (i + k) * ldx;
      int16_t* dst = buf + k * kpad;
      for (int64_t j = 0; j < kpad; j += 16) {
        const __m128i v = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j)),
                                        _mm_set1_epi8(static_cast<char>(0x80)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), _mm256_cvtepi8_epi16(v));
      }
    }
    return {buf, kpad};
  }
};

// A decoded row requantized to int8 (q8.h's requantize_row_i8, bit for bit).
inline float requantize_row(const float* v, int64_t kpad, int8_t* q) {
  const float mx = max_abs(v, kpad);
  if (!(mx > 0.0f) || !std::isfinite(mx) || !std::isfinite(127.0f / mx)) return requantize_row_i8(v, kpad, q);
  const __m256 inv = _mm256_set1_ps(127.0f / mx);
  for (int64_t j = 0; j < kpad; j += 16) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + j), inv));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + j + 8), inv));
    // packs: 16 int16 in lane order a0-3 b0-3 a4-7 b4-7; then to bytes and back in order.
    const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8);
    const __m128i w8 = _mm_packs_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j), w8);
  }
  return mx / 127.0f;
}

// The same on int16 copies of both operands.
struct I16Dot {
  using X = int16_t;
  using W = int16_t;
  using Vec = __m256i;
  using Out = int32_t;
  static constexpr int kStep = 16;
  static constexpr int kNR = 4, kMR = 3;
  static Vec zero() { return _mm256_setzero_si256(); }
  static Vec load_x(const X* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static Vec load_w(const W* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static Vec step(Vec a, Vec x, Vec w) { return _mm256_add_epi32(a, _mm256_madd_epi16(x, w)); }
  static Out reduce(Vec a) { return hsum_epi32(a); }
};

template <class Op, int NR, int MR>
void tile(const typename Op::X* x, int64_t ldx, const typename Op::W* w, int64_t ldw, int64_t len,
          typename Op::Out* y, int64_t ldy) {
  typename Op::Vec acc[NR][MR];
  for (auto& a : acc)
    for (auto& b : a) b = Op::zero();
  for (int64_t j = 0; j < len; j += Op::kStep) {
    typename Op::Vec wv[MR];
    for (int m = 0; m < MR; ++m) wv[m] = Op::load_w(w + m * ldw + j);
    for (int i = 0; i < NR; ++i) {
      const typename Op::Vec xv = Op::load_x(x + i * ldx + j);
      for (int m = 0; m < MR; ++m) acc[i][m] = Op::step(acc[i][m], xv, wv[m]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int m = 0; m < MR; ++m) y[i * ldy + m] = Op::reduce(acc[i][m]);
}

// bf16 activation rows widened to f32 into a buffer of kNR rows, a tile at a time.
struct Bf16Rows {
  const uint16_t* x;
  int64_t ldx, kpad;
  float* buf;
  std::pair<const float*, int64_t> operator()(int64_t i, int nr) const {
    for (int k = 0; k < nr; ++k) {
      const uint16_t* src = x + (i + k) * ldx;
      float* dst = buf + k * kpad;
      for (int64_t j = 0; j < kpad; j += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
        _mm256_storeu_ps(dst + j, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
      }
    }
    return {buf, kpad};
  }
};

// ---- transposed product ---------------------------------------------------------------------------

// gx[i][c0, c1) += sum_r gy[i][r] * w[r][c0, c1), four weight rows at a time, decoded into a
// small buffer (columns in blocks of kCols so the gx block stays in L2).
template <class Decode>
void transposed_f32(int64_t rows, const float* gy, int64_t n, int64_t ldy, int64_t c0, int64_t c1, float* gx,
                    int64_t ldx, bool accumulate, Decode decode_cols) {
  if (!accumulate)
    for (int64_t i = 0; i < n; ++i) std::fill(gx + i * ldx + c0, gx + i * ldx + c1, 0.0f);
  constexpr int64_t kCols = 512;
  std::vector<float> wbuf(4 * kCols);
  const float* w0 = wbuf.data();
  const float* w1 = w0 + kCols;
  const float* w2 = w1 + kCols;
  const float* w3 = w2 + kCols;
  for (int64_t cb = c0; cb < c1; cb += kCols) {
    const int64_t ce = std::min(c1, cb + kCols), width = ce - cb, vec_width = width / 8 * 8;
    for (int64_t r = 0; r < rows; r += 4) {
      const int rr = static_cast<int>(std::min<int64_t>(4, rows - r));
      for (int m = 0; m < rr; ++m) decode_cols(r + m, cb, ce, wbuf.data() + m * kCols);
      for (int m = rr; m < 4; ++m)
        std::fill(wbuf.begin() + m * kCols, wbuf.begin() + m * kCols + width, 0.0f);
      for (int64_t i = 0; i < n; ++i) {
        const float* g = gy + i * ldy + r;
        const float s0 = g[0], s1 = rr > 1 ? g[1] : 0.0f, s2 = rr > 2 ? g[2] : 0.0f,
                    s3 = rr > 3 ? g[3] : 0.0f;
        const __m256 g0 = _mm256_set1_ps(s0), g1 = _mm256_set1_ps(s1), g2 = _mm256_set1_ps(s2),
                     g3 = _mm256_set1_ps(s3);
        float* out = gx + i * ldx + cb;
        int64_t j = 0;
        for (; j < vec_width; j += 8) {
          __m256 a = _mm256_loadu_ps(out + j);
          a = _mm256_fmadd_ps(g0, _mm256_loadu_ps(w0 + j), a);
          a = _mm256_fmadd_ps(g1, _mm256_loadu_ps(w1 + j), a);
          a = _mm256_fmadd_ps(g2, _mm256_loadu_ps(w2 + j), a);
          a = _mm256_fmadd_ps(g3, _mm256_loadu_ps(w3 + j), a);
          _mm256_storeu_ps(out + j, a);
        }
        for (; j < width; ++j) {  // a range ending at cols: the same operations per element
          float a = out[j];
          a = std::fma(s0, w0[j], a);
          a = std::fma(s1, w1[j], a);
          a = std::fma(s2, w2[j], a);
          out[j] = std::fma(s3, w3[j], a);
        }
      }
    }
  }
}

// ---- transposed product over rows (small n) -------------------------------------------------------

// gx[i][0, kpad) += sum of gy[i][r + q] * w[r + q][:] for the R weight rows from r and N rows of gy:
// the rows stream in order, each 8-column piece of them decoded once and added into gx (L1 / L2
// resident) in row order. Groups lie inside rows (simd_friendly), so every row's segments start
// at the same columns (multiples of group).
template <int N, int R>
void lut4_t_rows_block(const Lut4Matrix& w, __m256 base_lo, __m256 base_hi, const float* gy, int64_t ldy,
                       int64_t r, float* gx, int64_t ldx) {
  const int64_t pitch = w.kpad / 2, per_row = w.row_stride / w.group, group = w.group;
  const float* scale = w.scale;
  const float* zp = w.zero_point;
  const uint8_t* codes = w.codes + r * pitch;
  float g[N][R];
  for (int i = 0; i < N; ++i)
    for (int q = 0; q < R; ++q) g[i][q] = gy[i * ldy + r + q];
  __m256 lo[R], hi[R];
  int64_t seg = 0, next = group;  // the segment (within a row) and where the next starts
  auto build = [&] {
    // Padding past the row's own segments decodes to 0 (0 * Inf must not make columns NaN).
    const bool past = seg * group >= w.row_stride;
    for (int q = 0; q < R; ++q) {
      if (past) {
        lo[q] = hi[q] = _mm256_setzero_ps();
        continue;
      }
      const int64_t s = (r + q) * per_row + seg;
      __m256 a = base_lo, b = base_hi;
      if (zp) {
        const __m256 z = _mm256_set1_ps(zp[s]);
        a = _mm256_sub_ps(a, z);
        b = _mm256_sub_ps(b, z);
      }
      const __m256 sc = _mm256_set1_ps(scale[s]);
      lo[q] = _mm256_mul_ps(a, sc);
      hi[q] = _mm256_mul_ps(b, sc);
    }
  };
  build();
  for (int64_t c = 0; c < w.kpad; c += kLut4Chunk) {
    for (int q = 0; q < R; ++q)
      _mm_prefetch(reinterpret_cast<const char*>(codes + q * pitch + c / 2 + R * pitch), _MM_HINT_T0);
    for_each_v<0>([&](auto v) {
      constexpr int V = decltype(v)::value;
      if (c + 16 * V == next) {
        ++seg;
        next += group;
        build();
      }
      for (int u = 0; u < 2; ++u) {
        __m256 wv[R];
        for (int q = 0; q < R; ++q)
          wv[q] = decode8<V>(
              _mm256_load_si256(reinterpret_cast<const __m256i*>(codes + q * pitch + c / 2 + 32 * u)), lo[q],
              hi[q]);
        for (int i = 0; i < N; ++i) {
          float* o = gx + i * ldx + c + 16 * V + 8 * u;
          __m256 a = _mm256_loadu_ps(o);
          for (int q = 0; q < R; ++q) a = _mm256_fmadd_ps(_mm256_set1_ps(g[i][q]), wv[q], a);
          _mm256_storeu_ps(o, a);
        }
      }
    });
  }
}

template <int N, bool Offset, int R>
void int8_t_rows_block(const Int8Matrix& w, const float* gy, int64_t ldy, int64_t r, float* gx, int64_t ldx) {
  const int64_t kpad = w.kpad;
  const int8_t* codes = w.codes + r * kpad;
  float g[N][R], off[R], s[R];
  for (int q = 0; q < R; ++q) {
    off[q] = Offset ? w.offset[r + q] : 0.0f;
    s[q] = w.scale[r + q];
    for (int i = 0; i < N; ++i) g[i][q] = gy[i * ldy + r + q];
  }
  for (int64_t j = 0; j < kpad; j += 64) {
    for (int q = 0; q < R; ++q)
      _mm_prefetch(reinterpret_cast<const char*>(codes + q * kpad + j + R * kpad), _MM_HINT_T0);
    for (int v = 0; v < 8; ++v) {
      __m256 wv[R];
      for (int q = 0; q < R; ++q) {
        wv[q] = cvt8_i8(codes + q * kpad + j + 8 * v);
        if constexpr (Offset) wv[q] = _mm256_add_ps(wv[q], _mm256_set1_ps(off[q]));
        wv[q] = _mm256_mul_ps(wv[q], _mm256_set1_ps(s[q]));
      }
      for (int i = 0; i < N; ++i) {
        float* o = gx + i * ldx + j + 8 * v;
        __m256 a = _mm256_loadu_ps(o);
        for (int q = 0; q < R; ++q) a = _mm256_fmadd_ps(_mm256_set1_ps(g[i][q]), wv[q], a);
        _mm256_storeu_ps(o, a);
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

void lut4_bf16(const Lut4Matrix& w, const uint16_t* x, int64_t n, int64_t ldx, int64_t r0, int64_t r1,
               float* y, int64_t ldy) {
  if (!w.simd_friendly()) return scalar::lut4_bf16(w, x, n, ldx, r0, r1, y, ldy);
  std::vector<float> xbuf(static_cast<size_t>(F32Dot::kNR * w.kpad));
  decoded_gemm<F32Dot>(w.kpad, n, Bf16Rows{x, ldx, w.kpad, xbuf.data()}, r0, r1, y, ldy,
                       [&](int64_t r, float* out) { decode_lut4_row_bf16(w, r, out); });
}

void int8_i8(const Int8Matrix& w, const uint8_t* xu, int64_t n, int64_t ldx, int64_t r0, int64_t r1,
             int32_t* acc, int64_t ldy) {
  // Few activation rows: codes used as stored, widened in the loop.
  if (n < 4)
    return stored_gemm<I8Dot>(w.codes, w.kpad, n, DirectRows<uint8_t>{xu, ldx}, r0, r1, acc, ldy,
                              [](int64_t, int64_t) {});
  const int64_t kpad = w.kpad;
  std::vector<int16_t> xbuf(static_cast<size_t>(I16Dot::kNR * kpad));
  decoded_gemm<I16Dot>(
      kpad, n, Int16Rows{xu, ldx, kpad, xbuf.data()}, r0, r1, acc, ldy, [&](int64_t r, int16_t* dst) {
        const int8_t* src = w.codes + r * kpad;
        for (int64_t j = 0; j < kpad; j += 16)
          _mm256_storeu_si256(
              reinterpret_cast<__m256i*>(dst + j),
              _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(src + j))));
      });
}

void lut4_i8(const Lut4Matrix& w, const uint8_t* xu, int64_t n, int64_t ldx, int64_t r0, int64_t r1,
             int32_t* acc, int64_t ldy, float* wscale) {
  if (!w.simd_friendly()) return scalar::lut4_i8(w, xu, n, ldx, r0, r1, acc, ldy, wscale);
  const int64_t kpad = w.kpad;
  std::vector<int16_t> xbuf(static_cast<size_t>(I16Dot::kNR * kpad));
  std::vector<float> v(static_cast<size_t>(kpad));
  std::vector<int8_t> q(static_cast<size_t>(kpad));
  // The activations are taken as xu - 128 here, so no correction follows.
  decoded_gemm<I16Dot>(
      kpad, n, Int16Rows{xu, ldx, kpad, xbuf.data()}, r0, r1, acc, ldy, [&](int64_t r, int16_t* dst) {
        decode_lut4_row_f32(w, r, v.data());
        std::fill(v.begin() + w.cols, v.end(), 0.0f);
        wscale[r] = requantize_row(v.data(), kpad, q.data());
        for (int64_t j = 0; j < kpad; j += 16)
          _mm256_storeu_si256(
              reinterpret_cast<__m256i*>(dst + j),
              _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q.data() + j))));
      });
}

void lut4_t_f32(const Lut4Matrix& w, const float* gy, int64_t n, int64_t ldy, int64_t c0, int64_t c1,
                float* gx, int64_t ldx, bool accumulate) {
  if (!w.simd_friendly()) return scalar::lut4_t_f32(w, gy, n, ldy, c0, c1, gx, ldx, accumulate);
  transposed_f32(
      w.rows, gy, n, ldy, c0, c1, gx, ldx, accumulate,
      [&](int64_t r, int64_t cb, int64_t ce, float* out) { decode_lut4_cols<Exact>(w, r, cb, ce, out); });
}

void int8_t_f32(const Int8Matrix& w, const float* gy, int64_t n, int64_t ldy, int64_t c0, int64_t c1,
                float* gx, int64_t ldx, bool accumulate) {
  transposed_f32(w.rows, gy, n, ldy, c0, c1, gx, ldx, accumulate,
                 [&](int64_t r, int64_t cb, int64_t ce, float* out) { decode_int8_cols(w, r, cb, ce, out); });
}

void lut4_t_rows_f32(const Lut4Matrix& w, const float* gy, int64_t n, int64_t ldy, int64_t r0, int64_t r1,
                     float* gx, int64_t ldx, bool accumulate) {
  if (!w.simd_friendly()) return scalar::lut4_t_rows_f32(w, gy, n, ldy, r0, r1, gx, ldx, accumulate);
  const __m256 base_lo = _mm256_loadu_ps(w.lut), base_hi = _mm256_loadu_ps(w.lut + 8);
  t_rows<2, 4>(w.kpad, n, r0, r1, gx, ldx, accumulate, [&](auto nn, auto rr, int64_t i, int64_t r) {
    lut4_t_rows_block<decltype(nn)::value, decltype(rr)::value>(w, base_lo, base_hi, gy + i * ldy, ldy, r,
                                                                gx + i * ldx, ldx);
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

}  // namespace msbnb::kernels::MSBNB_ISA_NS
