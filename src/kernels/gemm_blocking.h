// ISA-neutral control of the fused dequantize-matmul kernels (kernels/matmul.h), written once for
// every ISA folder: the GEMV / GEMM switch of the f32 entries, the GEMV column passes and batch
// size switch, the blocks of weight rows decoded once into a cache-resident buffer, and the walk
// of register tiles over a block. The ISA file supplies the intrinsics: the GEMV kernels
// lut4_gemv<N> / int8_gemv_rows<N, Offset> and the GEMM tiles tile<Op, NR, MR> (declared here,
// defined there), the dot ops (types, kNR x kMR tile shape) and the row decoders. In an unnamed
// namespace, as walk.h: each translation unit (compiled with its own ISA flags) keeps its own copy.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/isa_kernels.h"
#include "kernels/walk.h"
#include "msbnb/kernels/matmul.h"

namespace msbnb::kernels::MSBNB_ISA_NS {
namespace {

// f(std::integral_constant<int, V>{}) for V = V0 .. 7: the 8 vectors of 16 codes of a 64-byte
// chunk of a Lut4Matrix row, unrolled (the shift that picks a vector's codes is a constant).
template <int V, class F>
inline void for_each_v(F&& f) {
  if constexpr (V < 8) {
    f(std::integral_constant<int, V>{});
    for_each_v<V + 1>(f);
  }
}

// ---- GEMV: n <= kGemvMaxRows activation rows, weights decoded in registers ----------------------

// y[i * ldy + r] = dot(x row i, w row r) for the N rows of x and the weight rows [r0, r1). Defined
// by the ISA file; int8 rows with an offset (asymmetric) add it, symmetric ones skip the add.
template <int N>
void lut4_gemv(const Lut4Matrix& w, const float* x, int64_t ldx, int64_t r0, int64_t r1, float* y,
               int64_t ldy);
template <int N, bool Offset>
void int8_gemv_rows(const Int8Matrix& w, const float* x, int64_t ldx, int64_t r0, int64_t r1, float* y,
                    int64_t ldy);

// Columns per GEMV pass (a multiple of `unit`): the N activation rows of a pass (at most 16 KiB)
// stay in L1 while every weight row streams past them.
template <int N>
constexpr int64_t gemv_cols(int64_t unit) {
  return std::max<int64_t>(unit, (int64_t{16} << 10) / (4 * N) / unit * unit);
}

// Rows per group of the 4-bit GEMV when a row takes several column passes (the group's codes,
// 16 rows of up to some 10 KiB, stay in L2 across its passes).
constexpr int64_t kGemvGroupRows = 16;

// The GEMV kernels as gemv_n's K<N>::run.
template <int N>
struct Lut4Gemv {
  static void run(const Lut4Matrix& w, const float* x, int64_t ldx, int64_t r0, int64_t r1, float* y,
                  int64_t ldy) {
    lut4_gemv<N>(w, x, ldx, r0, r1, y, ldy);
  }
};
template <int N>
struct Int8Gemv {
  static void run(const Int8Matrix& w, const float* x, int64_t ldx, int64_t r0, int64_t r1, float* y,
                  int64_t ldy) {
    if (w.offset) return int8_gemv_rows<N, true>(w, x, ldx, r0, r1, y, ldy);
    int8_gemv_rows<N, false>(w, x, ldx, r0, r1, y, ldy);
  }
};

// ---- GEMM: weight rows decoded once per block, register tiles over whole rows -----------------

// y[i * ldy + m] = dot(x row i, w row m) over len elements (a multiple of Op::kStep), for
// NR <= Op::kNR activation rows and MR <= Op::kMR weight rows. Defined by the ISA file.
template <class Op, int NR, int MR>
void tile(const typename Op::X* x, int64_t ldx, const typename Op::W* w, int64_t ldw, int64_t len,
          typename Op::Out* y, int64_t ldy);

// tile<Op, NR, mr> for runtime mr <= MR.
template <class Op, int NR, int MR = Op::kMR>
void tile_m(int mr, const typename Op::X* x, int64_t ldx, const typename Op::W* w, int64_t ldw, int64_t len,
            typename Op::Out* y, int64_t ldy) {
  if constexpr (MR > 1)
    if (mr < MR) return tile_m<Op, NR, MR - 1>(mr, x, ldx, w, ldw, len, y, ldy);
  tile<Op, NR, MR>(x, ldx, w, ldw, len, y, ldy);
}
// tile<Op, nr, mr> for runtime nr <= Op::kNR, mr <= Op::kMR.
template <class Op, int NR = Op::kNR>
void tile_nm(int nr, int mr, const typename Op::X* x, int64_t ldx, const typename Op::W* w, int64_t ldw,
             int64_t len, typename Op::Out* y, int64_t ldy) {
  if constexpr (NR > 1)
    if (nr < NR) return tile_nm<Op, NR - 1>(nr, mr, x, ldx, w, ldw, len, y, ldy);
  tile_m<Op, NR>(mr, x, ldx, w, ldw, len, y, ldy);
}

// Activation rows used in place: xtile(i, nr) gives {rows i..i+nr-1, their stride}.
template <class T>
struct DirectRows {
  const T* x;
  int64_t ldx;
  std::pair<const T*, int64_t> operator()(int64_t i, int) const { return {x + i * ldx, ldx}; }
};

// Rows [0, mb) of a weight block (row m at w + m * ldw) against all n activation rows; y points
// at the block's first output column. xtile(i, nr) gives {rows i..i+nr-1, their stride} (the
// activations themselves, or a converted copy).
template <class Op, class XTile>
void block_gemm(int64_t n, XTile&& xtile, const typename Op::W* w, int64_t mb, int64_t ldw, int64_t len,
                typename Op::Out* y, int64_t ldy) {
  for (int64_t i = 0; i < n; i += Op::kNR) {
    const int nr = static_cast<int>(std::min<int64_t>(Op::kNR, n - i));
    const auto [xi, ldx] = xtile(i, nr);
    for (int64_t m = 0; m < mb; m += Op::kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(Op::kMR, mb - m));
      tile_nm<Op>(nr, mr, xi, ldx, w + m * ldw, ldw, len, y + i * ldy + m, ldy);
    }
  }
}

// Weight rows per block, a multiple of the tile's mr: the block (rows * kpad elements) should
// stay in L2.
inline int64_t block_rows(int64_t kpad, int64_t elem_bytes, int64_t mr) {
  return std::clamp<int64_t>((int64_t{512} << 10) / (kpad * elem_bytes) / mr * mr, mr, 64 / mr * mr);
}

// Weight rows [r0, r1) used as stored (w, kpad elements a row), in blocks of block_rows that stay
// in L2 across the activation tiles; after_block(b, rows) runs once each block's outputs are in.
template <class Op, class XTile, class AfterBlock>
void stored_gemm(const typename Op::W* w, int64_t kpad, int64_t n, XTile&& xtile, int64_t r0, int64_t r1,
                 typename Op::Out* y, int64_t ldy, AfterBlock&& after_block) {
  const int64_t mb = block_rows(kpad, sizeof(typename Op::W), Op::kMR);
  for (int64_t b = r0; b < r1; b += mb) {
    const int64_t rows = std::min(mb, r1 - b);
    block_gemm<Op>(n, xtile, w + b * kpad, rows, kpad, kpad, y + b, ldy);
    after_block(b, rows);
  }
}

// Weight rows [r0, r1) in blocks of block_rows, each row decoded once (decode(r, out): kpad
// elements of Op::W) into a buffer that stays in L2 while every activation tile passes over it.
template <class Op, class XTile, class Decode>
void decoded_gemm(int64_t kpad, int64_t n, XTile&& xtile, int64_t r0, int64_t r1, typename Op::Out* y,
                  int64_t ldy, Decode&& decode) {
  const int64_t mb = block_rows(kpad, sizeof(typename Op::W), Op::kMR);
  std::vector<typename Op::W> buf(static_cast<size_t>(mb * kpad));
  for (int64_t b = r0; b < r1; b += mb) {
    const int64_t rows = std::min(mb, r1 - b);
    for (int64_t m = 0; m < rows; ++m) decode(b + m, buf.data() + m * kpad);
    block_gemm<Op>(n, xtile, buf.data(), rows, kpad, kpad, y + b, ldy);
  }
}

// The exact f32 entries (lut4_f32, int8_f32): the register-decoded GEMV kernels for up to
// kGemvMaxRows activation rows, else the GEMM of Dot on rows decoded by DecodeRow(w, r, out). The
// SIMD 4-bit walk needs groups of whole vectors inside rows (Lut4Matrix::simd_friendly); other
// layouts take the scalar reference.
template <class Dot, auto DecodeRow, class M>
void exact_f32(const M& w, const float* x, int64_t n, int64_t ldx, int64_t r0, int64_t r1, float* y,
               int64_t ldy) {
  if constexpr (std::is_same_v<M, Lut4Matrix>)
    if (!w.simd_friendly()) return scalar::lut4_f32(w, x, n, ldx, r0, r1, y, ldy);
  if (n <= 0) return;
  if (n <= kGemvMaxRows) {
    if constexpr (std::is_same_v<M, Lut4Matrix>)
      return gemv_n<Lut4Gemv>(n, w, x, ldx, r0, r1, y, ldy);
    else
      return gemv_n<Int8Gemv>(n, w, x, ldx, r0, r1, y, ldy);
  }
  decoded_gemm<Dot>(w.kpad, n, DirectRows<float>{x, ldx}, r0, r1, y, ldy,
                    [&](int64_t r, float* out) { DecodeRow(w, r, out); });
}

// ---- transposed product over rows (small n) ------------------------------------------------------

// block(N, R, i, r) (N, R as integral constants) over the weight rows [r0, r1), R at a time then
// one at a time, for the rows of gy in passes of up to NMax from row i; zeroes gx [n][kpad] first
// unless accumulating. Each pass adds the rows in increasing order.
template <int R, int NMax, class Block>
void t_rows(int64_t kpad, int64_t n, int64_t r0, int64_t r1, float* gx, int64_t ldx, bool accumulate,
            const Block& block) {
  if (!accumulate)
    for (int64_t i = 0; i < n; ++i) std::fill(gx + i * ldx, gx + i * ldx + kpad, 0.0f);
  for (int64_t i = 0; i < n; i += NMax) {
    const auto pass = [&](auto nn) {
      int64_t r = r0;
      for (; r + R <= r1; r += R) block(nn, std::integral_constant<int, R>{}, i, r);
      for (; r < r1; ++r) block(nn, std::integral_constant<int, 1>{}, i, r);
    };
    const int64_t m = std::min<int64_t>(NMax, n - i);
    if (m == 1) pass(std::integral_constant<int, 1>{});
    if constexpr (NMax >= 2)
      if (m == 2) pass(std::integral_constant<int, 2>{});
    if constexpr (NMax >= 3)
      if (m == 3) pass(std::integral_constant<int, 3>{});
    if constexpr (NMax >= 4)
      if (m == 4) pass(std::integral_constant<int, 4>{});
    static_assert(NMax <= 4, "t_rows: passes of up to 4 rows of gy");
  }
}

}  // namespace
}  // namespace msbnb::kernels::MSBNB_ISA_NS
