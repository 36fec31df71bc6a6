// Fused dequantize-matmul on the CPU: y = x · dequant(W)ᵀ (+ bias) and the transposed product
// grad_x = grad_y · dequant(W), without materialising dequant(W). No torch here.
//
// Weights are repacked once into a private layout (docs/matmul.md) and unpacked back to the
// interchange layout of DESIGN.md bit for bit:
//   Lut4Matrix  every 4-bit format (int4 sym / asym, nf4, fp4): value(r, j) =
//               (lut[idx] - zp[s]) * scale[s], s = (r * row_stride + j) / group. nf4 / fp4 blocks of
//               the flattened tensor (row_stride = cols) and int4 groups per row (row_stride =
//               groups * group) are both this. Codes of a row come in chunks of 128 elements
//               (64 bytes): byte 4t + s (t < 16, s < 4) holds element 32s + t in its low nibble
//               and element 32s + 16 + t in its high nibble, so shifting an int32 lane by 4h + 8s
//               bits puts element 16(2s + h) + t in its low 4 bits: one vpermps decodes 16
//               consecutive elements. Rows are padded to a multiple of 128 with index 0.
//   Int8Matrix  int8 per output channel: value(r, j) = (q + offset[r]) * scale[r]; rows padded
//               to a multiple of 64 with 0; row_sum[r] = sum of q[r][:] for the int8 product.
//
// Paths (MatmulPath):
//   exact  fp32 activations; each weight is decoded to exactly the float dequantize() gives and
//          multiplied in fp32. Differs from "dequantize, then matmul" by summation order only.
//   fast   int8 weights: activations quantized per row to int8 (q = rne(x * 127 / absmax)),
//          integer dot products (int32 kernels over chunks of 2^17 columns, summed in int64:
//          exact for any k), exact across ISAs and thread counts (LLM.int8()'s numerics);
//          error <= absmax(x) / 254 * scale * sum |q| per output, typically
//          absmax / (127 √12 rms(x)) relative: about 0.9 % for Gaussian rows of 4096.
//          4-bit weights, more than kGemvMaxRows rows (fewer run the exact GEMV, which is as
//          fast): weights and activations rounded to bf16, products summed in fp32;
//          error <= (2^-7 + 2^-16) sum |x w| per output (two roundings of at most 2^-8),
//          typically about 0.23 % relative.
//   int8   int8 activations for every format. 4-bit weights, n <= kGemvMaxRows: activations
//          quantized per block of 64 or 128 columns (Lut4Q8Rows), each 4-bit code turned into
//          an int8 by a 16-entry byte table (integral tables as they are, nf4 / fp4 as
//          rne(127 lut / max|lut|)), exact int32 dot products per block, one scale multiply per
//          block. More rows: each weight row requantized to int8 per row (rne(v * 127 / max|v|)
//          of the dequantized values v) and the int8 GEMM of the fast int8 path, activations
//          per row (lut4_i8). int8 weights: the same as fast. Errors: docs/matmul.md.
//   auto   exact for every n: the fast paths change the class of error (bf16 operands; int8
//          activations without outlier handling lose 10-15 % on rows with an LLM outlier
//          feature), so they are opt-in; LLM.int8() with a threshold is matmul_llm_int8.
// NaN / Inf in an activation row give NaN / Inf outputs for that row on every path (as fp32).
// Padding columns decode to 0 whatever the statistics after a row's end hold.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "msbnb/kernels/types.h"

namespace msbnb::kernels {

struct KernelTable;
const KernelTable& active_kernels();

inline constexpr int64_t kLut4Chunk = 128;  // elements per 64-byte chunk of a Lut4Matrix row
inline constexpr int64_t kInt8Chunk = 64;   // row padding of an Int8Matrix
inline constexpr int64_t kGemvMaxRows = 8;  // batches up to this size take the GEMV path

/// Double-quantized statistics (bitsandbytes' compress_statistics): statistic s is
/// fl(fl(code[q[s]] * nested[s / block]) + *offset) for s < count (each operation rounded, as
/// dequantize gives it) and 0 beyond (the padding a SIMD kernel may look up).
struct Lut4NestedScale {
  const uint8_t* q = nullptr;     // [count]
  const float* code = nullptr;    // [256]
  const float* nested = nullptr;  // [ceil(count / block)]
  const float* offset = nullptr;  // [1]
  int64_t block = 0, count = 0;
};

/// A 4-bit weight [rows, cols] in the private layout (see above). Views; PackedLut4 owns them.
struct Lut4Matrix {
  int64_t rows = 0, cols = 0, kpad = 0;  // kpad = cols rounded up to kLut4Chunk
  int64_t group = 0, row_stride = 0;     // scale index of (r, j) = (r * row_stride + j) / group
  float lut[16] = {};                    // value of each 4-bit index before zp and scale
  const uint8_t* codes = nullptr;        // rows * kpad / 2 bytes, rows 64-byte aligned
  const float* scale = nullptr;          // per group / block
  const float* zero_point = nullptr;     // per group / block (integral values), or null
  /// With scale null: the statistics double-quantized. The drivers (matmul, matmul_transposed)
  /// decode them for the kernels, which always read `scale`.
  Lut4NestedScale nested;
  /// True if every group lies inside one row and is a multiple of 16 elements: the SIMD paths
  /// need it; other layouts run the scalar kernels.
  bool simd_friendly() const { return group % 16 == 0 && row_stride % group == 0; }
};

/// An int8 weight [rows, cols], one scale (and offset) per row. Views; PackedInt8 owns them.
struct Int8Matrix {
  int64_t rows = 0, cols = 0, kpad = 0;  // kpad = cols rounded up to kInt8Chunk
  const int8_t* codes = nullptr;         // rows * kpad, rows 64-byte aligned
  const float* scale = nullptr;          // [rows]
  const float* offset = nullptr;         // [rows] or null (symmetric)
  const int32_t* row_sum = nullptr;      // [rows]
};

/// The 4-bit index of element j of a Lut4Matrix row (see the chunk layout above).
inline int lut4_index(const uint8_t* row, int64_t j) {
  const int64_t e = j % kLut4Chunk, q = e / 16, t = e % 16;
  const uint8_t byte = row[(j - e) / 2 + 4 * t + q / 2];
  return (q % 2 ? byte >> 4 : byte) & 0xf;
}

/// Owning storage of a repacked weight; `view` stays valid while this object lives.
struct PackedLut4 {
  PackedLut4() = default;
  PackedLut4(PackedLut4&&) = default;
  PackedLut4& operator=(PackedLut4&&) = default;
  PackedLut4(const PackedLut4&) = delete;  // a copy's view would point into the original
  PackedLut4& operator=(const PackedLut4&) = delete;
  Lut4Matrix view;
  std::shared_ptr<uint8_t> codes;
  std::vector<float> scale, zero_point;
  // Double-quantized statistics (view.nested points here; scale is empty).
  std::vector<uint8_t> nested_q;
  std::vector<float> nested_code, nested_absmax, nested_offset;
  int64_t bytes() const;  // codes + statistics, as read by one matmul
};
struct PackedInt8 {
  PackedInt8() = default;
  PackedInt8(PackedInt8&&) = default;
  PackedInt8& operator=(PackedInt8&&) = default;
  PackedInt8(const PackedInt8&) = delete;
  PackedInt8& operator=(const PackedInt8&) = delete;
  Int8Matrix view;
  std::shared_ptr<int8_t> codes;
  std::vector<float> scale, offset;
  std::vector<int32_t> row_sum;
  int64_t bytes() const;
};

/// Pack into caller storage (the caller owns the memory, e.g. as torch tensors): a size query,
/// a pack-into function and views over memory already packed (after a copy or a load).
/// Storage: `codes` 64-byte aligned (the SIMD kernels load whole 64-byte chunks; checked, throws
/// std::invalid_argument naming the argument), statistics float aligned. Sizes derive from
/// overflow-checked counts (rows * padded cols <= 2^59, else std::invalid_argument).
struct Lut4Layout {
  int64_t kpad = 0, group = 0, row_stride = 0;  // as in Lut4Matrix
  int64_t codes_bytes = 0;                      // rows * kpad / 2
  int64_t stats = 0;        // floats of scale (and of zero_point if asymmetric), padded for SIMD
  int64_t stats_given = 0;  // the interchange statistics: the first stats_given of them
};
Lut4Layout lut4_bnb_layout(int64_t rows, int64_t cols, int64_t blocksize);
Lut4Layout int4_layout(int64_t rows, int64_t cols, int64_t group);
/// pack_lut4_bnb / pack_int4 into caller storage of the layout's sizes; returns the view over it.
Lut4Matrix pack_lut4_bnb_into(const uint8_t* packed, int64_t rows, int64_t cols, int64_t blocksize,
                              const float* absmax, const float* code16, uint8_t* codes, float* scale);
Lut4Matrix pack_int4_into(const uint8_t* packed, int64_t rows, int64_t cols, int64_t group,
                          const float* scale, const int32_t* zero_point, uint8_t* codes, float* scale_out,
                          float* zero_point_out);
/// Views over storage a pack_*_into filled (or a byte copy of it). A null scale: the statistics
/// are double-quantized, given by with_nested_scale.
Lut4Matrix lut4_bnb_view(int64_t rows, int64_t cols, int64_t blocksize, const float* code16,
                         const uint8_t* codes, const float* scale);
Lut4Matrix int4_view(int64_t rows, int64_t cols, int64_t group, bool asym, const uint8_t* codes,
                     const float* scale, const float* zero_point);
/// The view `w` with its statistics double-quantized (w.scale becomes null): checks the sizes
/// (nested.count = the layout's stats_given, ceil(count / block) nested values), throws
/// std::invalid_argument naming the argument.
Lut4Matrix with_nested_scale(Lut4Matrix w, const Lut4NestedScale& nested);
/// Statistics [s0, s1) of a double-quantized weight, as the kernels see them.
void decode_nested_scale(const Lut4NestedScale& nested, int64_t s0, int64_t s1, float* out,
                         const KernelTable& k = active_kernels());
/// Int8: codes rows * round_up(cols, kInt8Chunk) bytes (64-byte aligned); scale, offset (if
/// any) and row_sum [rows].
int64_t int8_codes_bytes(int64_t rows, int64_t cols);
Int8Matrix pack_int8_into(const int8_t* q, int64_t rows, int64_t cols, const float* scale,
                          const float* offset, int8_t* codes, float* scale_out, float* offset_out,
                          int32_t* row_sum);
Int8Matrix int8_view(int64_t rows, int64_t cols, const int8_t* codes, const float* scale, const float* offset,
                     const int32_t* row_sum);

/// Owning forms (the pack-into functions over aligned_alloc memory), for torch-free callers.
/// Repacks bitsandbytes nf4 / fp4 codes (flattened row-major [rows, cols], blocks of `blocksize`,
/// HIGH nibble first) with their float32 absmax per block and the 16-value codebook.
PackedLut4 pack_lut4_bnb(const uint8_t* packed, int64_t rows, int64_t cols, int64_t blocksize,
                         const float* absmax, const float* code16);
/// The same with double-quantized absmax (bitsandbytes' compress_statistics): absmax_q
/// [ceil(rows * cols / blocksize)] codes into code256, nested_absmax per nested_block of them,
/// and offset; the kernels decode them (Lut4NestedScale).
PackedLut4 pack_lut4_bnb_nested(const uint8_t* packed, int64_t rows, int64_t cols, int64_t blocksize,
                                const uint8_t* absmax_q, const float* code256, const float* nested_absmax,
                                int64_t nested_block, float offset, const float* code16);
/// Repacks MindSpore qint4x2 int4 (LOW nibble first, (cols + 1) / 2 bytes a row), groups of
/// `group` along a row, scale [rows, groups] and, for asymmetric uint4, zero_point [rows, groups]
/// (value = (q - zp) * scale); symmetric when zero_point is null.
PackedLut4 pack_int4(const uint8_t* packed, int64_t rows, int64_t cols, int64_t group, const float* scale,
                     const int32_t* zero_point);
/// The inverse of pack_lut4_bnb / pack_int4 for the codes: writes the interchange bytes exactly
/// (the statistics are the caller's, unchanged). `high_first` selects the bnb layout.
void unpack_lut4_codes(const Lut4Matrix& w, bool high_first, uint8_t* packed);
/// Repacks int8 codes [rows, cols] with per-row scale and optional offset (w = (q + offset) * scale).
PackedInt8 pack_int8(const int8_t* q, int64_t rows, int64_t cols, const float* scale, const float* offset);
/// The inverse of pack_int8 for the codes.
void unpack_int8_codes(const Int8Matrix& w, int8_t* q);

enum class MatmulPath : uint8_t { automatic, exact, fast, int8 };
/// The path `path` resolves to for a batch of n rows.
MatmulPath resolve_path(MatmulPath path, int64_t n);

/// Activations of the int8-activation 4-bit GEMV (MatmulPath::int8, kernel lut4_q8), made by
/// quantize_row_q8 from rows of kpad floats (zero tail): block a of `block` (64 or 128) columns
/// of row i holds q = rne(x * fl(127 / m)) with m = max |x| over the block, d[a] = fl(m / 127)
/// (m = 0: q = 0, d = 0; m Inf or NaN: q = 0, d = m / 127, so the row's outputs are NaN) and
/// sum[a] = the sum of its q. In each 128-column chunk the codes lie in the order of the weight
/// codes' nibbles (matmul.h's Lut4Matrix layout): plane 0 byte 4t + s = column 32s + t, plane 1
/// byte 4t + s = column 32s + 16 + t; the chunk is [plane 0, plane 1] (128 bytes). With blocks
/// of 64 the bytes of each 16-byte lane of a plane are reordered (q8.h's kQ8Pair: new byte p =
/// old byte kQ8Pair[p]) so that every 4 bytes an int32 lane of a dot product sums belong to one
/// block (the kernel shuffles the weight codes the same way).
struct Lut4Q8Rows {
  const int8_t* q = nullptr;     // [n][pitch], pitch = kpad * 128 / block bytes
  const float* d = nullptr;      // [n][kpad / block]
  const int32_t* sum = nullptr;  // [n][kpad / block]
  int64_t n = 0, block = 0, kpad = 0;
  int64_t pitch() const { return kpad; }
  int64_t blocks() const { return block > 0 ? kpad / block : 0; }
};
/// The activation block of the int8 GEMV for a weight: 128 if its groups are multiples of 128,
/// 64 if of 64, else 0 (that layout has no int8 GEMV; the driver takes lut4_i8 for every n).
int64_t q8_block(const Lut4Matrix& w);

/// Whether MatmulPath::int8 runs the int8 GEMM (lut4_i8) with table k for batches above
/// kGemvMaxRows (and layouts without an int8 GEMV): not on AVX2 / AVX-512 without VNNI, whose
/// int8 GEMM is slower than their exact f32 GEMM, which runs instead.
bool int8_gemm_pays(const KernelTable& k);

/// Activations and outputs: row-major, row i of x at x + i * ldx elements (ldx >= cols), row i of
/// y at y + i * ldy (ldy >= rows); dtype f32 or bf16.
struct MatmulIO {
  const void* x = nullptr;
  DType x_dtype = DType::f32;
  int64_t n = 0, ldx = 0;
  void* y = nullptr;
  DType y_dtype = DType::f32;
  int64_t ldy = 0;
  const float* bias = nullptr;  // [rows] or null
};

/// y = x · dequant(W)ᵀ + bias, threads splitting the rows of W.
void matmul(const Lut4Matrix& w, const MatmulIO& io, MatmulPath path = MatmulPath::automatic,
            const KernelTable& k = active_kernels());
void matmul(const Int8Matrix& w, const MatmulIO& io, MatmulPath path = MatmulPath::automatic,
            const KernelTable& k = active_kernels());

/// LLM.int8(): x rows quantized per row to int8 after taking out every input column holding an
/// |x| >= threshold (threshold <= 0: none; NaN throws). A NaN is no outlier (as in
/// bitsandbytes): it stays in its row's absmax, so that row's outputs are NaN. Integer products
/// scaled by row_absmax * SCB / 127² (w.scale = SCB / 127, symmetric); the outlier columns
/// multiplied in fp32 with the dequantized weight columns and added. `outlier_cols` (optional)
/// receives those columns.
void matmul_llm_int8(const Int8Matrix& w, const MatmulIO& io, float threshold,
                     std::vector<int64_t>* outlier_cols = nullptr, const KernelTable& k = active_kernels());

/// The transposed product for backward: gx = gy · dequant(W) (+= if accumulate), exact fp32 path;
/// gy is [n, rows] (io.x, io.ldx >= rows), gx [n, cols] (io.y, io.ldy >= cols); io.bias unused.
/// n <= 16: threads take fixed parts of the rows of W (summed in order: the same bits for every
/// thread count); larger n: threads split the columns of W.
void matmul_transposed(const Lut4Matrix& w, const MatmulIO& io, const KernelTable& k = active_kernels());
void matmul_transposed(const Int8Matrix& w, const MatmulIO& io, const KernelTable& k = active_kernels());

/// Per-row int8 quantization of activations as bitsandbytes' int8_vectorwise_quant does it:
/// absmax[i] = max |x[i][j]| over the elements not >= `threshold` (all when threshold <= 0; a
/// NaN is kept, so a row with a NaN has absmax NaN and codes 0),
/// q = rne(x * s), s = fl(fl(1 / absmax) * 127) (bitsandbytes' `127.0 / row_stats` is
/// row_stats.reciprocal() * 127); the columns in `zero_cols`, elements at or above the threshold
/// and an all-zero row give 0. q rows are `ldq` bytes (tail zero-filled).
void quantize_rows_int8(const void* x, DType dt, int64_t n, int64_t cols, int64_t ldx, float threshold,
                        const std::vector<int64_t>& zero_cols, int8_t* q, int64_t ldq, float* absmax);

/// The single-threaded kernel entries (KernelTable::matmul), for a range of output rows [r0, r1)
/// (or columns [c0, c1) of W for the transposed product, multiples of kLut4Chunk / kInt8Chunk
/// except at cols). Activations are already padded to kpad with zeros.
struct MatmulKernels {
  // One field per MSBNB_MATMUL_KERNEL row of kernels.def (contracts documented there).
#define MSBNB_KERNEL(name, params)
#define MSBNB_MATMUL_KERNEL(name, params) void(*name) params;
#include "msbnb/kernels/kernels.def"
#undef MSBNB_KERNEL
#undef MSBNB_MATMUL_KERNEL
};

}  // namespace msbnb::kernels
