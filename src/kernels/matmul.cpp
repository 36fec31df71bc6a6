// Repacking and the threaded drivers of the fused dequantize-matmul (kernels/matmul.h).
#include "msbnb/kernels/matmul.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "kernels/scalar_math.h"
#include "kernels/thread_pool.h"
#include "msbnb/kernels/kernel_table.h"
#include "msbnb/kernels/ops.h"

namespace msbnb::kernels {

namespace {

int64_t round_up(int64_t n, int64_t m) { return ceil_div(n, m) * m; }

template <class T>
std::shared_ptr<T> aligned_buffer(int64_t count) {
  const size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(count, 1) * int64_t(sizeof(T)), 64));
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, bytes);
  return std::shared_ptr<T>(static_cast<T*>(p), [](T* q) { std::free(q); });
}

// A packer's sizes: every product it forms (rows * padded cols, the statistics count) stays
// under 2^59 elements, so no byte offset or element count can wrap.
constexpr int64_t kMaxPackElems = std::numeric_limits<int64_t>::max() / 16;
void check_dims(const char* what, int64_t rows, int64_t cols) {
  if (rows < 0 || cols <= 0)
    throw std::invalid_argument(std::string(what) + ": expected rows >= 0 and cols > 0, got " +
                                std::to_string(rows) + " x " + std::to_string(cols));
  if (cols > kMaxPackElems - kLut4Chunk || rows > kMaxPackElems / round_up(cols, kLut4Chunk))
    throw std::invalid_argument(
        std::string(what) + ": rows * cols: expected <= " + std::to_string(kMaxPackElems) +
        " elements (padded), got " + std::to_string(rows) + " x " + std::to_string(cols));
}

// Sets the nibble of element j in a packed Lut4Matrix row.
void put_lut4(uint8_t* row, int64_t j, int idx) {
  const int64_t e = j % kLut4Chunk, q = e / 16, t = e % 16;
  uint8_t& byte = row[(j - e) / 2 + 4 * t + q / 2];
  byte = static_cast<uint8_t>(q % 2 ? (byte & 0x0f) | (idx << 4) : (byte & 0xf0) | idx);
}

// [begin, end) of part t of `parts` over [0, n) in multiples of `unit` (the last part takes the rest).
std::pair<int64_t, int64_t> split(int64_t n, int64_t unit, int64_t t, int64_t parts) {
  const int64_t units = ceil_div(n, unit);
  const int64_t b = units * t / parts * unit, e = units * (t + 1) / parts * unit;
  return {std::min(b, n), std::min(e, n)};
}

// Chunks per thread of a parallel call: the threads take chunks as they come (kernels/
// thread_pool.h), so one the OS deschedules delays the call by one chunk, not by its share.
constexpr int64_t kChunksPerThread = 8;

// Runs fn(begin, end) on chunks of [0, n) in multiples of `unit`, up to kChunksPerThread per
// thread. Each output comes from one chunk, computed as by any other split.
template <class Fn>
void parallel_split(int64_t n, int64_t unit, Fn fn) {
  const int64_t units = ceil_div(n, unit);
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads(), units)));
  if (threads == 1) return fn(int64_t{0}, n);
  const int64_t chunks = std::min(units, threads * kChunksPerThread);
  parallel_for_chunks(chunks, threads, [&](int64_t c) {
    const auto [b, e] = split(n, unit, c, chunks);
    if (b < e) fn(b, e);
  });
}

// Runs fn(i) for the n activation rows, in parallel when there are several.
template <class Fn>
void parallel_rows(int64_t n, Fn fn) {
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads(), n)));
  if (threads == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  const int64_t chunks = std::min(n, threads * kChunksPerThread);
  parallel_for_chunks(chunks, threads, [&](int64_t c) {
    for (int64_t i = n * c / chunks, e = n * (c + 1) / chunks; i < e; ++i) fn(i);
  });
}

// Activations (or output gradients) as float32 rows of kpad (zero tail).
std::vector<float> padded_f32(const MatmulIO& io, int64_t cols, int64_t kpad) {
  std::vector<float> x(static_cast<size_t>(io.n * kpad), 0.0f);
  if (cols == 0) return x;  // an empty weight: nothing to copy (and no buffer to copy into)
  parallel_rows(io.n, [&](int64_t i) {
    float* dst = x.data() + i * kpad;
    if (io.x_dtype == DType::f32) {
      std::memcpy(dst, static_cast<const float*>(io.x) + i * io.ldx, static_cast<size_t>(cols) * 4);
    } else {
      for (int64_t j = 0; j < cols; ++j) dst[j] = load_elem(io.x, io.x_dtype, i * io.ldx + j);
    }
  });
  return x;
}

// The most elements of one buffer: byte offsets (and their sums) stay far from int64 overflow.
constexpr int64_t kMaxElems = std::numeric_limits<int64_t>::max() / 16;

void check_io(const char* what, const MatmulIO& io, int64_t in_cols, int64_t out_cols) {
  auto fail = [&](const std::string& m) { throw std::invalid_argument(std::string(what) + ": " + m); };
  if (io.n < 0) fail("n: expected >= 0, got " + std::to_string(io.n));
  if (io.x_dtype != DType::f32 && io.x_dtype != DType::f16 && io.x_dtype != DType::bf16)
    fail("x_dtype: expected f32, f16 or bf16, got DType(" + std::to_string(int(io.x_dtype)) + ")");
  if (io.y_dtype != DType::f32 && io.y_dtype != DType::f16 && io.y_dtype != DType::bf16)
    fail("y_dtype: expected f32, f16 or bf16, got DType(" + std::to_string(int(io.y_dtype)) + ")");
  if (io.n > 0 && (!io.x || !io.y)) fail("x and y: expected buffers, got null");
  if (io.ldx < in_cols)
    fail("ldx: expected >= " + std::to_string(in_cols) + " (input columns), got " + std::to_string(io.ldx));
  if (io.ldy < out_cols)
    fail("ldy: expected >= " + std::to_string(out_cols) + " (output columns), got " + std::to_string(io.ldy));
  const int64_t widest = std::max({io.ldx, io.ldy, in_cols, out_cols, int64_t{1}});
  if (io.n > kMaxElems / widest)
    fail("n * ldx, n * ldy: expected <= " + std::to_string(kMaxElems) +
         " elements, got n = " + std::to_string(io.n) + " rows of up to " + std::to_string(widest));
}

// A weight view a caller may have built by hand: sizes, padding and buffers consistent.
template <class W>
void check_common(const char* what, const W& w, int64_t chunk) {
  auto fail = [&](const std::string& m) { throw std::invalid_argument(std::string(what) + ": w." + m); };
  if (w.rows < 0 || w.cols < 0 || w.rows > kMaxElems || w.cols > kMaxElems)
    fail("rows, cols: expected in [0, " + std::to_string(kMaxElems) + "], got " + std::to_string(w.rows) +
         " x " + std::to_string(w.cols));
  if (w.kpad != round_up(w.cols, chunk))
    fail("kpad: expected cols rounded up to " + std::to_string(chunk) + " = " +
         std::to_string(round_up(w.cols, chunk)) + ", got " + std::to_string(w.kpad));
  if (w.kpad > 0 && w.rows > kMaxElems / w.kpad)
    fail("rows * kpad: expected <= " + std::to_string(kMaxElems) + ", got " + std::to_string(w.rows) + " * " +
         std::to_string(w.kpad));
  if (w.rows > 0 && w.cols > 0 && !w.codes) fail("codes: expected a buffer, got null");
}
// Statistics a weight has: those of its given elements (the last block may be short).
int64_t given_stats(const Lut4Matrix& w) {
  return w.rows == 0 || w.cols == 0 ? 0 : ceil_div((w.rows - 1) * w.row_stride + w.cols, w.group);
}
void check_weight(const char* what, const Lut4Matrix& w) {
  check_common(what, w, kLut4Chunk);
  if (w.group <= 0)
    throw std::invalid_argument(std::string(what) + ": w.group: expected > 0, got " +
                                std::to_string(w.group));
  if (w.row_stride < w.cols || (w.rows > 1 && w.row_stride > kMaxElems / w.rows))
    throw std::invalid_argument(std::string(what) +
                                ": w.row_stride: expected in [cols = " + std::to_string(w.cols) + ", " +
                                std::to_string(kMaxElems) + " / rows], got " + std::to_string(w.row_stride));
  if (w.rows == 0 || w.cols == 0) return;
  if (w.scale) return;
  auto fail = [&](const std::string& m) { throw std::invalid_argument(std::string(what) + ": w." + m); };
  const Lut4NestedScale& n = w.nested;
  if (!n.q) fail("scale: expected a buffer (or nested statistics), got null");
  if (!n.code || !n.nested || !n.offset)
    fail("nested.code, nested.nested, nested.offset: expected buffers, got null");
  if (n.block <= 0) fail("nested.block: expected > 0, got " + std::to_string(n.block));
  if (n.count != given_stats(w))
    fail("nested.count: expected " + std::to_string(given_stats(w)) + " (the weight's statistics), got " +
         std::to_string(n.count));
}
void check_weight(const char* what, const Int8Matrix& w) {
  check_common(what, w, kInt8Chunk);
  if (w.rows > 0 && w.cols > 0 && !w.row_sum)
    throw std::invalid_argument(std::string(what) + ": w.row_sum: expected a buffer, got null");
}

// Writes acc (float32 [n][ld_acc]) plus bias to io.y in its dtype.
void store_rows(const float* acc, int64_t ld_acc, int64_t cols, const MatmulIO& io) {
  parallel_rows(io.n, [&](int64_t i) {
    const float* a = acc + i * ld_acc;
    if (io.y_dtype == DType::f32) {
      float* y = static_cast<float*>(io.y) + i * io.ldy;
      if (io.bias)
        for (int64_t r = 0; r < cols; ++r) y[r] = a[r] + io.bias[r];
      else
        std::memcpy(y, a, static_cast<size_t>(cols) * 4);
    } else {
      uint16_t* y = static_cast<uint16_t*>(io.y) + i * io.ldy;
      const bool f16 = io.y_dtype == DType::f16;
      for (int64_t r = 0; r < cols; ++r) {
        const float v = a[r] + (io.bias ? io.bias[r] : 0.0f);
        y[r] = f16 ? float_to_half(v) : float_to_bf16(v);
      }
    }
  });
}

// Statistics a SIMD kernel may look up: the scale of every padded column of every row.
int64_t padded_stat_count(int64_t rows, int64_t kpad, int64_t row_stride, int64_t group, int64_t given) {
  const int64_t need = rows == 0 ? 0 : ((rows - 1) * row_stride + kpad - 1) / group + 1;
  return std::max(given, need);
}

// A double-quantized weight with all its statistics decoded into `buf` (a per-call buffer).
Lut4Matrix decoded(const Lut4Matrix& w, std::vector<float>& buf, const KernelTable& k) {
  if (w.scale) return w;
  const Lut4NestedScale& n = w.nested;
  buf.resize(static_cast<size_t>(padded_stat_count(w.rows, w.kpad, w.row_stride, w.group, n.count)));
  parallel_split(static_cast<int64_t>(buf.size()), 4096,
                 [&](int64_t s0, int64_t s1) { decode_nested_scale(n, s0, s1, buf.data() + s0, k); });
  Lut4Matrix v = w;
  v.scale = buf.data();
  return v;
}

// Statistics decoded at a time per thread for a double-quantized weight (64 KiB, in L2 next to
// the tile's codes; 4096 measured 10-20 % slower at 2 threads, 4096², n = 1: more kernel calls).
constexpr int64_t kTileStats = 16384;
// Bytes of a tile's codes prefetched while its statistics are decoded.
constexpr int64_t kTilePrefetch = 32768;

// kernel(view, x, n, ldx, r0, r1, y, ldy) over the rows of w, threads splitting them. Double-
// quantized statistics are decoded tile by tile (rows of whole groups: a tile's statistics are
// contiguous) into a chunk's buffer, the kernel running on a tile-local view; other layouts
// (groups straddling rows) decode them all per call. Each output is the same as with the decoded
// float statistics: a row's sum does not depend on the rows around it.
template <class X, class Kernel>
void lut4_forward(const Lut4Matrix& w, const X* x, int64_t n, Kernel kernel, float* y, const KernelTable& k) {
  std::vector<float> all;
  const bool tiled = !w.scale && w.row_stride % w.group == 0;
  const Lut4Matrix wd = w.scale || tiled ? w : decoded(w, all, k);
  parallel_split(w.rows, 16, [&](int64_t r0, int64_t r1) {
    if (!tiled) return kernel(wd, x, n, w.kpad, r0, r1, y, w.rows);
    const int64_t per_row = w.row_stride / w.group;
    // GEMV tiles keep the statistics in L1 / L2 next to the codes; larger batches are compute-
    // bound (decoding is ~1/64 of the weights' work per activation row), so one tile per chunk
    // keeps the GEMM kernels' own blocking over the activations.
    const int64_t tile = n > kGemvMaxRows ? r1 - r0 : std::max<int64_t>(16, kTileStats / per_row / 16 * 16);
    std::vector<float> buf;
    for (int64_t b = r0; b < r1; b += tile) {
      const int64_t m = std::min(tile, r1 - b), first = b * per_row;
      const int64_t count = padded_stat_count(m, w.kpad, w.row_stride, w.group, m * per_row);
      buf.resize(static_cast<size_t>(count));
      // The tile's first codes stream in from DRAM while its statistics are decoded: a slice of
      // prefetches after each 256 statistics.
      const uint8_t* c0 = w.codes + b * (w.kpad / 2);
      const int64_t lines = std::min(m * (w.kpad / 2), kTilePrefetch) / 64;
      const int64_t chunks = ceil_div(count, 256);
      for (int64_t c = 0, line = 0; c < chunks; ++c) {
        decode_nested_scale(w.nested, first + 256 * c, first + std::min(count, 256 * (c + 1)),
                            buf.data() + 256 * c, k);
        for (const int64_t stop = lines * (c + 1) / chunks; line < stop; ++line)
          __builtin_prefetch(c0 + 64 * line);
      }
      Lut4Matrix v = w;
      v.rows = m;
      v.codes = w.codes + b * (w.kpad / 2);
      v.scale = buf.data();
      v.zero_point = w.zero_point ? w.zero_point + first : nullptr;
      v.nested = Lut4NestedScale{};
      kernel(v, x, n, w.kpad, 0, m, y + b, w.rows);
    }
  });
}

template <class W, class Kernel>
void forward_exact(const W& w, const MatmulIO& io, Kernel kernel) {
  const std::vector<float> x = padded_f32(io, w.cols, w.kpad);
  std::vector<float> y(static_cast<size_t>(io.n * w.rows));
  parallel_split(w.rows, 16, [&](int64_t r0, int64_t r1) {
    kernel(w, x.data(), io.n, w.kpad, r0, r1, y.data(), w.rows);
  });
  store_rows(y.data(), w.rows, w.rows, io);
}

// Per-row int8 of the activations (quantize_rows_int8's numerics), biased to uint8 (q + 128)
// for the int8 kernels; rows of kpad bytes with a zero (128) tail.
void quantize_rows_biased(const void* x, DType dt, int64_t n, int64_t cols, int64_t ldx, float threshold,
                          const std::vector<int64_t>& zero_cols, uint8_t* xu, int64_t kpad, float* absmax,
                          const KernelTable& k) {
  for (int64_t c : zero_cols)
    if (c < 0 || c >= cols)
      throw std::invalid_argument("quantize_rows_int8: zero_cols: expected columns in [0, " +
                                  std::to_string(cols) + "), got " + std::to_string(c));
  // Elements at or above the threshold are masked out.
  const float limit = threshold > 0.0f ? threshold : std::numeric_limits<float>::infinity();
  parallel_rows(n, [&](int64_t i) {
    std::vector<float> row(static_cast<size_t>(cols));
    if (dt == DType::f32)
      std::memcpy(row.data(), static_cast<const float*>(x) + i * ldx, static_cast<size_t>(cols) * 4);
    else
      for (int64_t j = 0; j < cols; ++j) row[j] = load_elem(x, dt, i * ldx + j);
    // As bitsandbytes (|x| >= threshold is an outlier): NaN is no outlier, so it stays in the row
    // and its absmax, and the row's outputs are NaN.
    if (threshold > 0.0f)
      for (float& v : row) v = std::fabs(v) >= limit ? 0.0f : v;
    // The row absmax (of the elements below the threshold), before zeroing columns.
    float a = 0.0f;
    k.absmax_blocks(row.data(), DType::f32, cols, cols, &a);
    absmax[i] = a;
    for (int64_t c : zero_cols) row[c] = 0.0f;
    uint8_t* out = xu + i * kpad;
    // bitsandbytes' `127.0 / row_stats` is row_stats.reciprocal() * 127: two roundings.
    const float inv = a > 0.0f ? (1.0f / a) * 127.0f : 0.0f;
    if (!std::isfinite(a)) {
      // NaN or Inf in the row: codes 0, and the non-finite absmax carries into the output.
      std::memset(out, 128, static_cast<size_t>(cols));
    } else if (std::isfinite(inv)) {
      k.matmul.quantize_row_u8(row.data(), cols, inv, out);
    } else {
      // absmax below 127 / FLT_MAX: 127 / absmax overflows float, so scale in double.
      const double dinv = 127.0 / a;
      for (int64_t j = 0; j < cols; ++j) out[j] = static_cast<uint8_t>(std::nearbyint(row[j] * dinv) + 128);
    }
    std::memset(out + cols, 128, static_cast<size_t>(kpad - cols));
  });
}

// Columns per int8 product: |sum (xq - 128) q| <= 2^17 * 127 * 128 < 2^31, so a kernel's int32
// result is exact; longer rows are summed chunk by chunk in int64 (exact for any k here).
constexpr int64_t kInt8MaxK = int64_t{1} << 17;

// acc[i * rows + r] = sum_j (xu[i][j] - 128) q[r][j], exactly.
std::vector<int64_t> int8_products(const Int8Matrix& w, const uint8_t* xu, int64_t n, const KernelTable& k) {
  const size_t count = static_cast<size_t>(n * w.rows);
  if (w.kpad <= kInt8MaxK) {
    std::vector<int32_t> acc(count);
    parallel_split(w.rows, 16, [&](int64_t r0, int64_t r1) {
      k.matmul.int8_i8(w, xu, n, w.kpad, r0, r1, acc.data(), w.rows);
    });
    return std::vector<int64_t>(acc.begin(), acc.end());
  }
  // Long rows: each chunk copies runs of 16 of its weight rows into a chunk-wide matrix
  // (with its own row sums) and adds the kernel's exact int32 results in int64.
  std::vector<int64_t> acc(count, 0);
  parallel_split(w.rows, 16, [&](int64_t r0, int64_t r1) {
    constexpr int64_t kRows = 16;
    const std::shared_ptr<int8_t> buf = aligned_buffer<int8_t>(kRows * kInt8MaxK);
    std::vector<int32_t> sums(kRows), part(static_cast<size_t>(n * kRows));
    for (int64_t c0 = 0; c0 < w.kpad; c0 += kInt8MaxK) {
      const int64_t len = std::min(kInt8MaxK, w.kpad - c0);  // a multiple of kInt8Chunk
      for (int64_t b = r0; b < r1; b += kRows) {
        const int64_t m = std::min(kRows, r1 - b);
        for (int64_t t = 0; t < m; ++t) {
          int8_t* dst = buf.get() + t * len;
          std::memcpy(dst, w.codes + (b + t) * w.kpad + c0, static_cast<size_t>(len));
          int32_t s = 0;
          for (int64_t j = 0; j < len; ++j) s += dst[j];
          sums[t] = s;
        }
        Int8Matrix v;
        v.rows = m;
        v.cols = v.kpad = len;
        v.codes = buf.get();
        v.scale = w.scale + b;
        v.row_sum = sums.data();
        k.matmul.int8_i8(v, xu + c0, n, w.kpad, 0, m, part.data(), kRows);
        for (int64_t i = 0; i < n; ++i)
          for (int64_t t = 0; t < m; ++t) acc[i * w.rows + b + t] += part[i * kRows + t];
      }
    }
  });
  return acc;
}

// y[i][r] = acc * (absmax_i * scale_r / 127) (+ offset_r * scale_r * sum_j x[i][j]).
template <class Acc>
void scale_int8_products(const std::vector<Acc>& acc, const std::vector<float>& absmax, int64_t rows,
                         const float* scale, const float* offset, const MatmulIO& io, int64_t cols,
                         std::vector<float>& y) {
  y.assign(acc.size(), 0.0f);
  for (int64_t i = 0; i < io.n; ++i) {
    const float sx = absmax[i] * (1.0f / 127.0f);
    // A denormal sx would round away up to 2^-149 / sx of itself: scale such rows in double.
    const bool tiny = absmax[i] < 127.0f * std::numeric_limits<float>::min();
    float xsum = 0.0f;
    if (offset)
      for (int64_t j = 0; j < cols; ++j) xsum += load_elem(io.x, io.x_dtype, i * io.ldx + j);
    for (int64_t r = 0; r < rows; ++r) {
      const Acc a = acc[i * rows + r];
      float v = tiny ? static_cast<float>(double(a) * (double(absmax[i]) / 127.0) * scale[r])
                     : static_cast<float>(a) * (sx * scale[r]);
      if (offset) v += offset[r] * scale[r] * xsum;
      y[i * rows + r] = v;
    }
  }
}

void int8_forward_fast(const Int8Matrix& w, const MatmulIO& io, const KernelTable& k, float threshold,
                       const std::vector<int64_t>& skip, std::vector<float>& y) {
  std::vector<uint8_t> xu(static_cast<size_t>(io.n * w.kpad));
  std::vector<float> absmax(static_cast<size_t>(io.n));
  quantize_rows_biased(io.x, io.x_dtype, io.n, w.cols, io.ldx, threshold, skip, xu.data(), w.kpad,
                       absmax.data(), k);
  const std::vector<int64_t> acc = int8_products(w, xu.data(), io.n, k);
  scale_int8_products(acc, absmax, w.rows, w.scale, w.offset, io, w.cols, y);
}

// MatmulPath::int8 for 4-bit weights: the int8-activation GEMV (blocks of q8_block) for up to
// kGemvMaxRows rows, else every weight row requantized to int8 and the int8 GEMM (lut4_i8).
void lut4_forward_int8(const Lut4Matrix& w, const MatmulIO& io, const KernelTable& k, std::vector<float>& y) {
  const std::vector<float> x = padded_f32(io, w.cols, w.kpad);
  y.assign(static_cast<size_t>(io.n * w.rows), 0.0f);
  const int64_t bs = q8_block(w);
  if (io.n <= kGemvMaxRows && bs > 0) {
    Lut4Q8Rows xq;
    xq.n = io.n;
    xq.block = bs;
    xq.kpad = w.kpad;
    const int64_t pitch = xq.pitch(), nb = xq.blocks();
    std::vector<int8_t> q(static_cast<size_t>(io.n * pitch));
    std::vector<float> d(static_cast<size_t>(io.n * nb));
    std::vector<int32_t> sum(static_cast<size_t>(io.n * nb));
    for (int64_t i = 0; i < io.n; ++i)
      k.matmul.quantize_row_q8(x.data() + i * w.kpad, w.kpad, bs, q.data() + i * pitch, d.data() + i * nb,
                               sum.data() + i * nb);
    xq.q = q.data();
    xq.d = d.data();
    xq.sum = sum.data();
    lut4_forward(
        w, &xq, io.n,
        [&](const Lut4Matrix& v, const Lut4Q8Rows* a, int64_t, int64_t, int64_t r0, int64_t r1, float* out,
            int64_t ldy) { k.matmul.lut4_q8(v, *a, r0, r1, out, ldy); },
        y.data(), k);
    return;
  }
  std::vector<uint8_t> xu(static_cast<size_t>(io.n * w.kpad));
  std::vector<float> absmax(static_cast<size_t>(io.n)), wscale(static_cast<size_t>(w.rows));
  quantize_rows_biased(x.data(), DType::f32, io.n, w.cols, w.kpad, 0.0f, {}, xu.data(), w.kpad, absmax.data(),
                       k);
  std::vector<float> stats;  // double-quantized statistics, decoded
  const Lut4Matrix wd = decoded(w, stats, k);
  std::vector<int32_t> acc(static_cast<size_t>(io.n * w.rows));
  parallel_split(w.rows, 16, [&](int64_t r0, int64_t r1) {
    k.matmul.lut4_i8(wd, xu.data(), io.n, w.kpad, r0, r1, acc.data(), w.rows, wscale.data());
  });
  scale_int8_products(acc, absmax, w.rows, wscale.data(), nullptr, io, w.cols, y);
}

}  // namespace

int64_t PackedLut4::bytes() const {
  return view.rows * view.kpad / 2 +
         int64_t(scale.size() + zero_point.size() + nested_code.size() + nested_absmax.size() +
                 nested_offset.size()) *
             4 +
         int64_t(nested_q.size());
}
int64_t PackedInt8::bytes() const {
  return view.rows * view.kpad + int64_t(scale.size() + offset.size()) * 4 + int64_t(row_sum.size()) * 4;
}

namespace {

void check_storage(const char* what, const char* arg, const void* p, bool needed, int64_t align) {
  if (!needed) return;
  if (!p) throw std::invalid_argument(std::string(what) + ": " + arg + ": expected a buffer, got null");
  if (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(align) != 0)
    throw std::invalid_argument(
        std::string(what) + ": " + arg + ": expected " + std::to_string(align) +
        "-byte aligned storage, got address % " + std::to_string(align) + " = " +
        std::to_string(reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(align)));
}

Lut4Matrix lut4_matrix(const Lut4Layout& l, int64_t rows, int64_t cols) {
  Lut4Matrix w;
  w.rows = rows;
  w.cols = cols;
  w.kpad = l.kpad;
  w.group = l.group;
  w.row_stride = l.row_stride;
  return w;
}

void fill_int4_lut(Lut4Matrix& w, bool asym) {
  // Symmetric nibbles are two's complement q in [-8, 7]: index q + 8 = nibble ^ 8.
  for (int i = 0; i < 16; ++i) w.lut[i] = static_cast<float>(asym ? i : i - 8);
}

}  // namespace

Lut4Layout lut4_bnb_layout(int64_t rows, int64_t cols, int64_t blocksize) {
  check_dims("pack_lut4_bnb", rows, cols);
  if (blocksize <= 0)
    throw std::invalid_argument("pack_lut4_bnb: blocksize: expected > 0, got " + std::to_string(blocksize));
  Lut4Layout l;
  l.kpad = round_up(cols, kLut4Chunk);
  l.group = blocksize;
  l.row_stride = cols;
  l.codes_bytes = rows * (l.kpad / 2);
  l.stats_given = ceil_div(rows * cols, blocksize);
  l.stats = padded_stat_count(rows, l.kpad, l.row_stride, l.group, l.stats_given);
  return l;
}

Lut4Layout int4_layout(int64_t rows, int64_t cols, int64_t group) {
  check_dims("pack_int4", rows, cols);
  if (group <= 0) throw std::invalid_argument("pack_int4: group: expected > 0, got " + std::to_string(group));
  // row_stride = groups * group: the scale index r * row_stride + j must not wrap.
  if (group > kMaxPackElems / std::max<int64_t>(rows, 1) / 2)
    throw std::invalid_argument(
        "pack_int4: group: expected <= " + std::to_string(kMaxPackElems / std::max<int64_t>(rows, 1) / 2) +
        " for " + std::to_string(rows) + " rows, got " + std::to_string(group));
  Lut4Layout l;
  const int64_t groups = ceil_div(cols, group);
  l.kpad = round_up(cols, kLut4Chunk);
  l.group = group;
  l.row_stride = groups * group;
  l.codes_bytes = rows * (l.kpad / 2);
  l.stats_given = rows * groups;
  l.stats = padded_stat_count(rows, l.kpad, l.row_stride, l.group, l.stats_given);
  return l;
}

Lut4Matrix lut4_bnb_view(int64_t rows, int64_t cols, int64_t blocksize, const float* code16,
                         const uint8_t* codes, const float* scale) {
  const Lut4Layout l = lut4_bnb_layout(rows, cols, blocksize);
  check_storage("lut4_bnb_view", "codes", codes, l.codes_bytes > 0, 64);
  // A null scale: double-quantized statistics follow (with_nested_scale).
  check_storage("lut4_bnb_view", "scale", scale, l.stats > 0 && scale, 4);
  Lut4Matrix w = lut4_matrix(l, rows, cols);
  std::copy(code16, code16 + 16, w.lut);
  w.codes = codes;
  w.scale = scale;
  return w;
}

Lut4Matrix int4_view(int64_t rows, int64_t cols, int64_t group, bool asym, const uint8_t* codes,
                     const float* scale, const float* zero_point) {
  const Lut4Layout l = int4_layout(rows, cols, group);
  check_storage("int4_view", "codes", codes, l.codes_bytes > 0, 64);
  check_storage("int4_view", "scale", scale, l.stats > 0 && scale, 4);
  check_storage("int4_view", "zero_point", zero_point, asym && l.stats > 0, 4);
  Lut4Matrix w = lut4_matrix(l, rows, cols);
  fill_int4_lut(w, asym);
  w.codes = codes;
  w.scale = scale;
  w.zero_point = asym ? zero_point : nullptr;
  return w;
}

Lut4Matrix pack_lut4_bnb_into(const uint8_t* packed, int64_t rows, int64_t cols, int64_t blocksize,
                              const float* absmax, const float* code16, uint8_t* codes, float* scale) {
  const Lut4Layout l = lut4_bnb_layout(rows, cols, blocksize);
  const Lut4Matrix w = lut4_bnb_view(rows, cols, blocksize, code16, codes, scale);
  std::memset(codes, 0, static_cast<size_t>(l.codes_bytes));
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* dst = codes + r * (l.kpad / 2);
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t f = r * cols + j;
      const uint8_t byte = packed[f / 2];
      put_lut4(dst, j, f % 2 == 0 ? byte >> 4 : byte & 0xf);
    }
  }
  std::fill(std::copy(absmax, absmax + l.stats_given, scale), scale + l.stats, 0.0f);
  return w;
}

Lut4Matrix pack_int4_into(const uint8_t* packed, int64_t rows, int64_t cols, int64_t group,
                          const float* scale, const int32_t* zero_point, uint8_t* codes, float* scale_out,
                          float* zero_point_out) {
  const Lut4Layout l = int4_layout(rows, cols, group);
  const Lut4Matrix w = int4_view(rows, cols, group, zero_point != nullptr, codes, scale_out, zero_point_out);
  const int64_t row_bytes = (cols + 1) / 2;
  const int flip = zero_point ? 0 : 8;
  std::memset(codes, 0, static_cast<size_t>(l.codes_bytes));
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* dst = codes + r * (l.kpad / 2);
    for (int64_t j = 0; j < cols; ++j) {
      const uint8_t byte = packed[r * row_bytes + j / 2];
      put_lut4(dst, j, ((j % 2 == 0 ? byte : byte >> 4) & 0xf) ^ flip);
    }
  }
  std::fill(std::copy(scale, scale + l.stats_given, scale_out), scale_out + l.stats, 0.0f);
  if (zero_point) {
    for (int64_t i = 0; i < l.stats_given; ++i) zero_point_out[i] = static_cast<float>(zero_point[i]);
    std::fill(zero_point_out + l.stats_given, zero_point_out + l.stats, 0.0f);
  }
  return w;
}

PackedLut4 pack_lut4_bnb(const uint8_t* packed, int64_t rows, int64_t cols, int64_t blocksize,
                         const float* absmax, const float* code16) {
  const Lut4Layout l = lut4_bnb_layout(rows, cols, blocksize);
  PackedLut4 p;
  p.codes = aligned_buffer<uint8_t>(l.codes_bytes);
  p.scale.resize(static_cast<size_t>(l.stats));
  p.view = pack_lut4_bnb_into(packed, rows, cols, blocksize, absmax, code16, p.codes.get(), p.scale.data());
  return p;
}

PackedLut4 pack_lut4_bnb_nested(const uint8_t* packed, int64_t rows, int64_t cols, int64_t blocksize,
                                const uint8_t* absmax_q, const float* code256, const float* nested_absmax,
                                int64_t nested_block, float offset, const float* code16) {
  const Lut4Layout l = lut4_bnb_layout(rows, cols, blocksize);
  if (nested_block <= 0)
    throw std::invalid_argument("pack_lut4_bnb_nested: nested_block: expected > 0, got " +
                                std::to_string(nested_block));
  PackedLut4 p;
  p.nested_q.assign(absmax_q, absmax_q + l.stats_given);
  p.nested_code.assign(code256, code256 + 256);
  p.nested_absmax.assign(nested_absmax, nested_absmax + ceil_div(l.stats_given, nested_block));
  p.nested_offset = {offset};
  Lut4NestedScale n;
  n.q = p.nested_q.data();
  n.code = p.nested_code.data();
  n.nested = p.nested_absmax.data();
  n.offset = p.nested_offset.data();
  n.block = nested_block;
  n.count = l.stats_given;
  // The codes are packed as for float absmax; the decoded statistics are dropped after.
  std::vector<float> absmax(static_cast<size_t>(l.stats)), tmp(static_cast<size_t>(l.stats));
  decode_nested_scale(n, 0, l.stats, absmax.data());
  p.codes = aligned_buffer<uint8_t>(l.codes_bytes);
  p.view = with_nested_scale(
      pack_lut4_bnb_into(packed, rows, cols, blocksize, absmax.data(), code16, p.codes.get(), tmp.data()), n);
  return p;
}

PackedLut4 pack_int4(const uint8_t* packed, int64_t rows, int64_t cols, int64_t group, const float* scale,
                     const int32_t* zero_point) {
  const Lut4Layout l = int4_layout(rows, cols, group);
  PackedLut4 p;
  p.codes = aligned_buffer<uint8_t>(l.codes_bytes);
  p.scale.resize(static_cast<size_t>(l.stats));
  if (zero_point) p.zero_point.resize(static_cast<size_t>(l.stats));
  p.view = pack_int4_into(packed, rows, cols, group, scale, zero_point, p.codes.get(), p.scale.data(),
                          zero_point ? p.zero_point.data() : nullptr);
  return p;
}

void unpack_lut4_codes(const Lut4Matrix& w, bool high_first, uint8_t* packed) {
  const bool int4_sym = !high_first && !w.zero_point;
  if (high_first) {
    std::memset(packed, 0, static_cast<size_t>((w.rows * w.cols + 1) / 2));
    for (int64_t r = 0; r < w.rows; ++r)
      for (int64_t j = 0; j < w.cols; ++j) {
        const int64_t f = r * w.cols + j;
        const int idx = lut4_index(w.codes + r * (w.kpad / 2), j);
        packed[f / 2] = static_cast<uint8_t>(f % 2 == 0 ? (packed[f / 2] & 0x0f) | (idx << 4)
                                                        : (packed[f / 2] & 0xf0) | idx);
      }
    // bitsandbytes pads an odd count with the code of 0 (the first +0: FP4 has two zeros, and
    // 0 quantizes to index 0); it is not in the repacked codes.
    if ((w.rows * w.cols) % 2) {
      int zero = 0;
      for (int i = 15; i >= 0; --i)
        if (w.lut[i] == 0.0f && !std::signbit(w.lut[i])) zero = i;
      uint8_t& last = packed[(w.rows * w.cols) / 2];
      last = static_cast<uint8_t>((last & 0xf0) | zero);
    }
    return;
  }
  const int64_t row_bytes = (w.cols + 1) / 2;
  std::memset(packed, 0, static_cast<size_t>(w.rows * row_bytes));
  for (int64_t r = 0; r < w.rows; ++r)
    for (int64_t j = 0; j < w.cols; ++j) {
      const int idx = lut4_index(w.codes + r * (w.kpad / 2), j) ^ (int4_sym ? 8 : 0);
      packed[r * row_bytes + j / 2] |= static_cast<uint8_t>(j % 2 == 0 ? idx : idx << 4);
    }
}

// bitsandbytes' dequantize: dequantize_blockwise (code[q] * absmax2, as the dequantize_lut8
// kernels compute it), then + offset, each rounded to float.
void decode_nested_scale(const Lut4NestedScale& n, int64_t s0, int64_t s1, float* out, const KernelTable& k) {
  const int64_t end = std::min(s1, std::max(n.count, s0));
  if (end > s0) {
    const float offset = *n.offset;
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA) || defined(__aarch64__)
    // The compiler may fuse a * b + c here: the kernel's products, then the add in a second pass.
    k.dequantize_lut8(n.q + s0, s0, end - s0, n.block, n.nested, n.code, out);
    for (int64_t i = 0; i < end - s0; ++i) out[i] += offset;
#else
    // No FMA in this target: a table of both roundings per nested block, one lookup a statistic
    // (about 1.4x faster than the two passes).
    (void)k;
    alignas(64) float t[256];
    for (int64_t s = s0; s < end;) {
      const int64_t b = s / n.block, e = std::min(end, (b + 1) * n.block);
      const float a = n.nested[b];
      for (int i = 0; i < 256; ++i) t[i] = n.code[i] * a + offset;
      for (; s + 8 <= e; s += 8) {
        uint64_t w;
        std::memcpy(&w, n.q + s, 8);
        for (int j = 0; j < 8; ++j) out[s - s0 + j] = t[(w >> (8 * j)) & 0xff];
      }
      for (; s < e; ++s) out[s - s0] = t[n.q[s]];
    }
#endif
  }
  std::fill(out + (end - s0), out + (s1 - s0), 0.0f);
}

Lut4Matrix with_nested_scale(Lut4Matrix w, const Lut4NestedScale& nested) {
  w.scale = nullptr;
  w.nested = nested;
  check_weight("with_nested_scale", w);
  return w;
}

int64_t int8_codes_bytes(int64_t rows, int64_t cols) {
  check_dims("pack_int8", rows, cols);
  return rows * round_up(cols, kInt8Chunk);
}

Int8Matrix int8_view(int64_t rows, int64_t cols, const int8_t* codes, const float* scale, const float* offset,
                     const int32_t* row_sum) {
  const int64_t bytes = int8_codes_bytes(rows, cols);
  check_storage("int8_view", "codes", codes, bytes > 0, 64);
  check_storage("int8_view", "scale", scale, rows > 0, 4);
  check_storage("int8_view", "row_sum", row_sum, rows > 0, 4);
  Int8Matrix w;
  w.rows = rows;
  w.cols = cols;
  w.kpad = round_up(cols, kInt8Chunk);
  w.codes = codes;
  w.scale = scale;
  w.offset = offset;
  w.row_sum = row_sum;
  return w;
}

Int8Matrix pack_int8_into(const int8_t* q, int64_t rows, int64_t cols, const float* scale,
                          const float* offset, int8_t* codes, float* scale_out, float* offset_out,
                          int32_t* row_sum) {
  if (offset && rows > 0 && !offset_out)
    throw std::invalid_argument("pack_int8_into: offset_out: expected a buffer (offset given), got null");
  const Int8Matrix w = int8_view(rows, cols, codes, scale_out, offset ? offset_out : nullptr, row_sum);
  std::memset(codes, 0, static_cast<size_t>(rows * w.kpad));
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(codes + r * w.kpad, q + r * cols, static_cast<size_t>(cols));
    int32_t s = 0;
    for (int64_t j = 0; j < cols; ++j) s += q[r * cols + j];
    row_sum[r] = s;
  }
  std::copy(scale, scale + rows, scale_out);
  if (offset) std::copy(offset, offset + rows, offset_out);
  return w;
}

PackedInt8 pack_int8(const int8_t* q, int64_t rows, int64_t cols, const float* scale, const float* offset) {
  PackedInt8 p;
  p.codes = aligned_buffer<int8_t>(int8_codes_bytes(rows, cols));
  p.scale.resize(static_cast<size_t>(rows));
  p.row_sum.resize(static_cast<size_t>(rows));
  if (offset) p.offset.resize(static_cast<size_t>(rows));
  p.view = pack_int8_into(q, rows, cols, scale, offset, p.codes.get(), p.scale.data(),
                          offset ? p.offset.data() : nullptr, p.row_sum.data());
  return p;
}

void unpack_int8_codes(const Int8Matrix& w, int8_t* q) {
  for (int64_t r = 0; r < w.rows; ++r)
    std::memcpy(q + r * w.cols, w.codes + r * w.kpad, static_cast<size_t>(w.cols));
}

bool int8_gemm_pays(const KernelTable& k) {
  // AVX2's int16 vpmaddwd does 16 products per 2 instructions, as its f32 FMA does: measured
  // 1.2x slower than the exact GEMM at n = 128. The scalar table is the reference.
  return k.isa != Isa::avx2 && k.isa != Isa::avx512;
}

int64_t q8_block(const Lut4Matrix& w) {
  if (w.group <= 0 || w.row_stride % w.group != 0) return 0;
  return w.group % 128 == 0 ? 128 : w.group % 64 == 0 ? 64 : 0;
}

MatmulPath resolve_path(MatmulPath path, int64_t n) {
  // automatic is exact for every batch size: the fast paths change the class of error (bf16
  // operands, int8 activations without outlier handling), so they are only taken when asked.
  if (path != MatmulPath::automatic) return path;
  return MatmulPath::exact;
}

void quantize_rows_int8(const void* x, DType dt, int64_t n, int64_t cols, int64_t ldx, float threshold,
                        const std::vector<int64_t>& zero_cols, int8_t* q, int64_t ldq, float* absmax) {
  const std::string fn = "quantize_rows_int8: ";
  if (dt != DType::f32 && dt != DType::f16 && dt != DType::bf16)
    throw std::invalid_argument(fn + "dt: expected f32, f16 or bf16, got DType(" + std::to_string(int(dt)) +
                                ")");
  if (n < 0 || cols < 0)
    throw std::invalid_argument(fn + "n, cols: expected >= 0, got " + std::to_string(n) + ", " +
                                std::to_string(cols));
  if (ldx < cols)
    throw std::invalid_argument(fn + "ldx: expected >= " + std::to_string(cols) + ", got " +
                                std::to_string(ldx));
  if (n > 0 && std::max(ldx, ldq) > 0 && n > kMaxElems / std::max(ldx, ldq))
    throw std::invalid_argument(fn + "n * ldx, n * ldq: expected <= " + std::to_string(kMaxElems) +
                                ", got n = " + std::to_string(n) + " rows of " +
                                std::to_string(std::max(ldx, ldq)));
  if (n > 0 && cols > 0 && (!x || !q || !absmax))
    throw std::invalid_argument(fn + "x, q, absmax: expected buffers, got null");
  if (std::isnan(threshold)) throw std::invalid_argument(fn + "threshold: expected a number, got NaN");
  if (ldq < cols)
    throw std::invalid_argument("quantize_rows_int8: ldq: expected >= " + std::to_string(cols) + ", got " +
                                std::to_string(ldq));
  uint8_t* u = reinterpret_cast<uint8_t*>(q);
  quantize_rows_biased(x, dt, n, cols, ldx, threshold, zero_cols, u, ldq, absmax, active_kernels());
  for (int64_t i = 0; i < n * ldq; ++i) u[i] ^= 0x80;  // back to q
}

void matmul(const Lut4Matrix& w, const MatmulIO& io, MatmulPath path, const KernelTable& k) {
  check_weight("matmul", w);
  check_io("matmul", io, w.cols, w.rows);
  if (io.n == 0 || w.rows == 0) return;
  const MatmulPath resolved = resolve_path(path, io.n);
  // The int8 path: the GEMV (layouts with q8_block), and the int8 GEMM where it pays (else the
  // exact GEMM, as fast and exact) and its int32 products are exact (up to 2^17 columns).
  const bool int8_gemv = io.n <= kGemvMaxRows && q8_block(w) > 0;
  if (resolved == MatmulPath::int8 && w.kpad <= kInt8MaxK && (int8_gemv || int8_gemm_pays(k))) {
    std::vector<float> y;
    lut4_forward_int8(w, io, k, y);
    return store_rows(y.data(), w.rows, w.rows, io);
  }
  // Up to kGemvMaxRows rows the exact GEMV is also the fastest 4-bit path (decode-bound either
  // way), so fast only changes larger batches.
  if (resolved != MatmulPath::fast || io.n <= kGemvMaxRows) {
    const std::vector<float> x = padded_f32(io, w.cols, w.kpad);
    std::vector<float> y(static_cast<size_t>(io.n * w.rows));
    lut4_forward(w, x.data(), io.n, k.matmul.lut4_f32, y.data(), k);
    return store_rows(y.data(), w.rows, w.rows, io);
  }
  std::vector<uint16_t> xb(static_cast<size_t>(io.n * w.kpad), 0);
  parallel_rows(io.n, [&](int64_t i) {
    uint16_t* dst = xb.data() + i * w.kpad;
    if (io.x_dtype == DType::bf16) {
      std::memcpy(dst, static_cast<const uint16_t*>(io.x) + i * io.ldx, static_cast<size_t>(w.cols) * 2);
    } else {
      for (int64_t j = 0; j < w.cols; ++j)
        dst[j] = float_to_bf16(load_elem(io.x, io.x_dtype, i * io.ldx + j));
    }
  });
  std::vector<float> y(static_cast<size_t>(io.n * w.rows));
  lut4_forward(w, xb.data(), io.n, k.matmul.lut4_bf16, y.data(), k);
  store_rows(y.data(), w.rows, w.rows, io);
}

void matmul(const Int8Matrix& w, const MatmulIO& io, MatmulPath path, const KernelTable& k) {
  check_weight("matmul", w);
  check_io("matmul", io, w.cols, w.rows);
  if (io.n == 0 || w.rows == 0) return;
  // int8 weights: the int8 path is the fast one.
  if (resolve_path(path, io.n) == MatmulPath::exact) return forward_exact(w, io, k.matmul.int8_f32);
  std::vector<float> y;
  int8_forward_fast(w, io, k, 0.0f, {}, y);
  store_rows(y.data(), w.rows, w.rows, io);
}

void matmul_llm_int8(const Int8Matrix& w, const MatmulIO& io, float threshold,
                     std::vector<int64_t>* outlier_cols, const KernelTable& k) {
  check_weight("matmul_llm_int8", w);
  check_io("matmul_llm_int8", io, w.cols, w.rows);
  if (std::isnan(threshold))
    throw std::invalid_argument("matmul_llm_int8: threshold: expected a number, got NaN");
  if (w.offset) throw std::invalid_argument("matmul_llm_int8: weight: expected symmetric int8 (no offset)");
  std::vector<int64_t> cols;
  if (threshold > 0.0f) {
    std::vector<char> hit(static_cast<size_t>(w.cols), 0);
    for (int64_t i = 0; i < io.n; ++i)
      for (int64_t j = 0; j < w.cols; ++j)
        hit[j] |= std::fabs(load_elem(io.x, io.x_dtype, i * io.ldx + j)) >= threshold;
    for (int64_t j = 0; j < w.cols; ++j)
      if (hit[j]) cols.push_back(j);
  }
  if (outlier_cols) *outlier_cols = cols;
  if (io.n == 0 || w.rows == 0) return;
  std::vector<float> y;
  int8_forward_fast(w, io, k, threshold, cols, y);
  // Outlier columns in fp32 against the dequantized weight columns, gathered once.
  if (!cols.empty()) {
    const int64_t nc = static_cast<int64_t>(cols.size());
    std::vector<float> wcols(static_cast<size_t>(nc * w.rows));
    for (int64_t r = 0; r < w.rows; ++r)
      for (int64_t c = 0; c < nc; ++c)
        wcols[c * w.rows + r] = static_cast<float>(w.codes[r * w.kpad + cols[c]]) * w.scale[r];
    parallel_rows(io.n, [&](int64_t i) {
      std::vector<float> extra(static_cast<size_t>(w.rows), 0.0f);
      for (int64_t c = 0; c < nc; ++c) {
        const float xv = load_elem(io.x, io.x_dtype, i * io.ldx + cols[c]);
        const float* wc = wcols.data() + c * w.rows;
        for (int64_t r = 0; r < w.rows; ++r) extra[r] += xv * wc[r];
      }
      for (int64_t r = 0; r < w.rows; ++r) y[i * w.rows + r] += extra[r];
    });
  }
  store_rows(y.data(), w.rows, w.rows, io);
}

namespace {
// Batches up to this size stream the weight rows in order (the row kernels; 1.2-2x faster than
// the column split at n = 16, slower from n = 32); larger ones split the columns, each weight
// piece decoded once per few rows of gy and kept in registers.
constexpr int64_t kTransposedRowsMaxN = 16;
// The row-streaming product sums fixed parts of the weight rows, each into its own buffer, and
// adds the buffers in order: the parts depend on the weight and n alone, so every thread count
// gives the same bits. Parts of at least kTPartRows rows, at most kTMaxParts of them, and their
// buffers together at most kTPartBytes (they stay in L2 / L3).
constexpr int64_t kTPartRows = 256, kTMaxParts = 8, kTPartBytes = int64_t{4} << 20;

template <class W, class Kernel, class RowsKernel>
void transposed(const W& w, const MatmulIO& io, int64_t unit, Kernel kernel, RowsKernel rows_kernel) {
  check_weight("matmul_transposed", w);
  check_io("matmul_transposed", io, w.rows, w.cols);
  if (io.bias) throw std::invalid_argument("matmul_transposed: bias: expected null (no bias in grad_x)");
  if (io.n == 0) return;
  const std::vector<float> gy = padded_f32(io, w.rows, w.rows);
  if (io.n > kTransposedRowsMaxN || w.rows == 0) {
    std::vector<float> gx(static_cast<size_t>(io.n * w.kpad));
    parallel_split(w.kpad, unit, [&](int64_t c0, int64_t c1) {
      kernel(w, gy.data(), io.n, w.rows, c0, c1, gx.data(), w.kpad, false);
    });
    return store_rows(gx.data(), w.kpad, w.cols, io);
  }
  const int64_t size = io.n * w.kpad;
  const int64_t parts =
      std::max<int64_t>(1, std::min({ceil_div(w.rows, kTPartRows), kTMaxParts, kTPartBytes / (4 * size)}));
  std::unique_ptr<float[]> gx(new float[static_cast<size_t>(parts * size)]);
  parallel_split(parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const auto [r0, r1] = split(w.rows, 4, static_cast<int>(p), static_cast<int>(parts));
      rows_kernel(w, gy.data(), io.n, w.rows, r0, r1, gx.get() + p * size, w.kpad, false);
    }
  });
  // The parts added in order (elements in units of 16384: a few parts of one row of gy are
  // added faster than a parallel region starts).
  if (parts > 1)
    parallel_split(size, 16384, [&](int64_t e0, int64_t e1) {
      float* out = gx.get();
      for (int64_t p = 1; p < parts; ++p) {
        const float* part = gx.get() + p * size;
        for (int64_t e = e0; e < e1; ++e) out[e] += part[e];
      }
    });
  store_rows(gx.get(), w.kpad, w.cols, io);
}
}  // namespace

void matmul_transposed(const Lut4Matrix& w, const MatmulIO& io, const KernelTable& k) {
  check_weight("matmul_transposed", w);
  std::vector<float> scale;  // double-quantized statistics, decoded
  transposed(io.n == 0 ? w : decoded(w, scale, k), io, kLut4Chunk, k.matmul.lut4_t_f32,
             k.matmul.lut4_t_rows_f32);
}
void matmul_transposed(const Int8Matrix& w, const MatmulIO& io, const KernelTable& k) {
  transposed(w, io, kInt8Chunk, k.matmul.int8_t_f32, k.matmul.int8_t_rows_f32);
}

}  // namespace msbnb::kernels
