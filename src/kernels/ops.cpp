// Threaded drivers: split a range into chunks and call one KernelTable entry per chunk.
#include "msbnb/kernels/ops.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/scalar_math.h"
#include "kernels/thread_pool.h"

namespace msbnb::kernels {

namespace {

std::atomic<int> g_threads{0};

// Elements per task: large enough to amortise scheduling, small enough to balance 2+ threads.
constexpr int64_t kChunk = int64_t{1} << 15;
// Blocks longer than this are reduced in pieces so one huge block still uses every thread.
constexpr int64_t kPiece = int64_t{1} << 16;

// The most elements a call takes: byte offsets of any dtype, n + bs and rows * cols fit int64.
constexpr int64_t kMaxElems = std::numeric_limits<int64_t>::max() / 8;

[[noreturn]] void bad_arg(const char* fn, const char* arg, const std::string& expected,
                          const std::string& got) {
  throw std::invalid_argument(std::string(fn) + ": " + arg + ": expected " + expected + ", got " + got);
}
void check_count(const char* fn, const char* arg, int64_t n) {
  if (n < 0 || n > kMaxElems)
    bad_arg(fn, arg, "a count in [0, " + std::to_string(kMaxElems) + "]", std::to_string(n));
}
void check_block(const char* fn, const char* arg, int64_t bs) {
  if (bs <= 0) bad_arg(fn, arg, "a block size > 0", std::to_string(bs));
}
void check_ptr(const char* fn, const char* arg, const void* p, bool needed) {
  if (needed && !p) bad_arg(fn, arg, "a buffer", "null");
}
void check_dtype(const char* fn, DType dt) {
  if (dt != DType::f32 && dt != DType::f16 && dt != DType::bf16)
    bad_arg(fn, "dt", "f32, f16 or bf16", "DType(" + std::to_string(static_cast<int>(dt)) + ")");
}
// Checks a flat [n] buffer cut into blocks of bs; returns the block size the kernels get: a
// block longer than the buffer is the whole buffer (same block indices), so no kernel's
// block-boundary arithmetic can overflow however large bs is.
int64_t checked_flat(const char* fn, int64_t n, int64_t bs) {
  check_count(fn, "n", n);
  check_block(fn, "bs", bs);
  return std::min(bs, std::max<int64_t>(n, 1));
}
// The same for [rows, cols] in groups of gs along a row.
int64_t checked_rows(const char* fn, int64_t rows, int64_t cols, int64_t gs) {
  check_count(fn, "rows", rows);
  check_count(fn, "cols", cols);
  if (cols > 0 && rows > kMaxElems / cols)
    bad_arg(fn, "rows * cols", "<= " + std::to_string(kMaxElems),
            std::to_string(rows) + " * " + std::to_string(cols));
  check_block(fn, "gs", gs);
  return std::min(gs, std::max<int64_t>(cols, 1));
}

int threads_for(int64_t work_items) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads(), work_items)));
}

const char* byte_ptr(const void* x, DType dt, int64_t i) {
  return static_cast<const char*>(x) + i * static_cast<int64_t>(dtype_size(dt));
}

// Runs fn(start, count) over [0, n) in chunks of `chunk` elements, the threads taking chunks as
// they come (kernels/thread_pool.h).
template <typename Fn>
void parallel_chunks(int64_t n, int64_t chunk, Fn fn) {
  const int64_t tasks = ceil_div(n, chunk);
  parallel_for_chunks(tasks, threads_for(tasks), [&](int64_t t) {
    const int64_t start = t * chunk;
    fn(start, std::min(chunk, n - start));
  });
}

// Per-block statistics of x into out_a[b] (and out_b[b] unless null) with reduce(data, dtype,
// count, block_size, a, b), a kernel entry. Whole blocks run in parallel; a block longer than
// kPiece is reduced in pieces in parallel and the pieces' results reduced again by the same
// kernel, which is exact for maxima and minima (and for absmax of magnitudes).
template <typename ReduceFn>
void reduce_blocks(const void* x, DType dt, int64_t n, int64_t bs, float* out_a, float* out_b,
                   ReduceFn reduce) {
  const int64_t nblocks = ceil_div(n, bs);
  if (bs <= kPiece) {
    const int64_t per_task = std::max<int64_t>(1, kChunk / bs);
    parallel_chunks(nblocks, per_task, [&](int64_t b0, int64_t nb) {
      reduce(byte_ptr(x, dt, b0 * bs), dt, std::min(n, (b0 + nb) * bs) - b0 * bs, bs, out_a + b0,
             out_b ? out_b + b0 : nullptr);
    });
    return;
  }
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t first = b * bs, len = std::min(n, first + bs) - first, pieces = ceil_div(len, kPiece);
    std::vector<float> pa(static_cast<size_t>(pieces)), pb(out_b ? static_cast<size_t>(pieces) : 0);
    parallel_chunks(pieces, 1, [&](int64_t p, int64_t) {
      const int64_t l = std::min(kPiece, len - p * kPiece);
      reduce(byte_ptr(x, dt, first + p * kPiece), dt, l, l, pa.data() + p, out_b ? pb.data() + p : nullptr);
    });
    float unused;
    reduce(pa.data(), DType::f32, pieces, pieces, out_a + b, out_b ? &unused : nullptr);
    if (out_b) reduce(pb.data(), DType::f32, pieces, pieces, &unused, out_b + b);
  }
}

}  // namespace

int num_threads() {
  const int n = g_threads.load();
  return n > 0 ? n : omp_get_max_threads();
}
void set_num_threads(int n) {
  if (n < 0) bad_arg("set_num_threads", "n", ">= 0 (0: the OpenMP default)", std::to_string(n));
  g_threads.store(n);
}

void absmax_blocks(const void* x, DType dt, int64_t n, int64_t bs, float* out, const KernelTable& k) {
  check_dtype("absmax_blocks", dt);
  bs = checked_flat("absmax_blocks", n, bs);
  check_ptr("absmax_blocks", "x", x, n > 0);
  check_ptr("absmax_blocks", "out", out, n > 0);
  if (n == 0) return;
  reduce_blocks(x, dt, n, bs, out, nullptr,
                [&](const void* p, DType d, int64_t len, int64_t block, float* a, float*) {
                  k.absmax_blocks(p, d, len, block, a);
                });
}

void minmax_blocks(const void* x, DType dt, int64_t n, int64_t bs, float* mins, float* maxs,
                   const KernelTable& k) {
  check_dtype("minmax_blocks", dt);
  bs = checked_flat("minmax_blocks", n, bs);
  check_ptr("minmax_blocks", "x", x, n > 0);
  check_ptr("minmax_blocks", "mins", mins, n > 0);
  check_ptr("minmax_blocks", "maxs", maxs, n > 0);
  if (n == 0) return;
  reduce_blocks(x, dt, n, bs, mins, maxs, k.minmax_blocks);
}

void quantize_int8(const void* x, DType dt, int64_t n, int64_t bs, const float* scale,
                   const int32_t* zero_point, int32_t lo, int32_t hi, int8_t* q, const KernelTable& k) {
  const char* fn = "quantize_int8";
  check_dtype(fn, dt);
  bs = checked_flat(fn, n, bs);
  check_ptr(fn, "x", x, n > 0);
  check_ptr(fn, "scale", scale, n > 0);
  check_ptr(fn, "q", q, n > 0);
  if (lo < -128 || hi > 127 || lo > hi)
    bad_arg(fn, "[lo, hi]", "a range inside [-128, 127]",
            "[" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  parallel_chunks(n, kChunk, [&](int64_t s, int64_t len) {
    k.quantize_int8(byte_ptr(x, dt, s), dt, s, len, bs, scale, zero_point, lo, hi, q + s);
  });
}

void dequantize_int8(const int8_t* q, int64_t n, int64_t bs, const float* scale, const int32_t* zero_point,
                     float* out, const KernelTable& k) {
  bs = checked_flat("dequantize_int8", n, bs);
  check_ptr("dequantize_int8", "q", q, n > 0);
  check_ptr("dequantize_int8", "scale", scale, n > 0);
  check_ptr("dequantize_int8", "out", out, n > 0);
  parallel_chunks(n, kChunk, [&](int64_t s, int64_t len) {
    k.dequantize_int8(q + s, s, len, bs, scale, zero_point, out + s);
  });
}

void quantize_int4(const void* x, DType dt, int64_t rows, int64_t cols, int64_t gs, const float* scale,
                   const int32_t* zero_point, uint8_t* packed, const KernelTable& k) {
  check_dtype("quantize_int4", dt);
  gs = checked_rows("quantize_int4", rows, cols, gs);
  check_ptr("quantize_int4", "x", x, rows * cols > 0);
  check_ptr("quantize_int4", "scale", scale, rows * cols > 0);
  check_ptr("quantize_int4", "packed", packed, rows * cols > 0);
  const int64_t groups = ceil_div(cols, gs), row_bytes = (cols + 1) / 2;
  const int64_t rows_per_task = std::max<int64_t>(1, kChunk / std::max<int64_t>(1, cols));
  parallel_chunks(rows, rows_per_task, [&](int64_t r, int64_t nr) {
    k.quantize_int4(byte_ptr(x, dt, r * cols), dt, nr, cols, gs, scale + r * groups,
                    zero_point ? zero_point + r * groups : nullptr, packed + r * row_bytes);
  });
}

void dequantize_int4(const uint8_t* packed, int64_t rows, int64_t cols, int64_t gs, const float* scale,
                     const int32_t* zero_point, float* out, const KernelTable& k) {
  gs = checked_rows("dequantize_int4", rows, cols, gs);
  check_ptr("dequantize_int4", "packed", packed, rows * cols > 0);
  check_ptr("dequantize_int4", "scale", scale, rows * cols > 0);
  check_ptr("dequantize_int4", "out", out, rows * cols > 0);
  const int64_t groups = ceil_div(cols, gs), row_bytes = (cols + 1) / 2;
  const int64_t rows_per_task = std::max<int64_t>(1, kChunk / std::max<int64_t>(1, cols));
  parallel_chunks(rows, rows_per_task, [&](int64_t r, int64_t nr) {
    k.dequantize_int4(packed + r * row_bytes, nr, cols, gs, scale + r * groups,
                      zero_point ? zero_point + r * groups : nullptr, out + r * cols);
  });
}

void quantize_lut4(const void* x, DType dt, int64_t n, int64_t bs, const float* absmax, const Lut4& lut,
                   uint8_t* packed, const KernelTable& k) {
  // bitsandbytes scales full blocks by the float32 reciprocal of absmax but divides the short
  // last block by its absmax (backends/default/ops.py quantize_4bit); the kernels multiply, and
  // the short block (< bs elements) is coded here, from its first whole byte.
  const char* fn = "quantize_lut4";
  check_dtype(fn, dt);
  check_ptr(fn, "x", x, n > 0);
  check_ptr(fn, "absmax", absmax, n > 0);
  check_ptr(fn, "packed", packed, n > 0);
  // The short block is the one of the caller's bs (taken before the kernels' clamp).
  check_count(fn, "n", n);
  check_block(fn, "bs", bs);
  const int64_t full = n / bs * bs, head = full - full % 2;
  bs = checked_flat(fn, n, bs);
  parallel_chunks(head, kChunk, [&](int64_t s, int64_t len) {
    k.quantize_lut4(byte_ptr(x, dt, s), dt, s, len, bs, absmax, &lut, packed + s / 2);
  });
  for (int64_t i = head; i < n; i += 2) {
    uint8_t byte = 0;
    for (int64_t j = i; j < i + 2; ++j) {
      uint8_t q = lut.zero_code;
      if (j < n) {
        const float v = load_elem(x, dt, j), a = absmax[j / bs];
        const float xn = j < full ? v * inverse_absmax(a) : v / std::fmax(a, kAbsmaxFloor);
        q = lut.sorted_to_code[sorted_position16(xn, lut.mid)];
      }
      byte = static_cast<uint8_t>(byte << 4 | q);
    }
    packed[i / 2] = byte;
  }
}

void dequantize_lut4(const uint8_t* packed, int64_t n, int64_t bs, const float* absmax, const float* code16,
                     float* out, const KernelTable& k) {
  bs = checked_flat("dequantize_lut4", n, bs);
  check_ptr("dequantize_lut4", "packed", packed, n > 0);
  check_ptr("dequantize_lut4", "absmax", absmax, n > 0);
  check_ptr("dequantize_lut4", "code16", code16, n > 0);
  check_ptr("dequantize_lut4", "out", out, n > 0);
  parallel_chunks(n, kChunk, [&](int64_t s, int64_t len) {
    k.dequantize_lut4(packed + s / 2, s, len, bs, absmax, code16, out + s);
  });
}

void quantize_lut8(const void* x, DType dt, int64_t n, int64_t bs, const float* absmax, const Lut8& lut,
                   uint8_t* q, const KernelTable& k) {
  check_dtype("quantize_lut8", dt);
  bs = checked_flat("quantize_lut8", n, bs);
  check_ptr("quantize_lut8", "x", x, n > 0);
  check_ptr("quantize_lut8", "absmax", absmax, n > 0);
  check_ptr("quantize_lut8", "q", q, n > 0);
  parallel_chunks(n, kChunk, [&](int64_t s, int64_t len) {
    k.quantize_lut8(byte_ptr(x, dt, s), dt, s, len, bs, absmax, &lut, q + s);
  });
}

void dequantize_lut8(const uint8_t* q, int64_t n, int64_t bs, const float* absmax, const float* code256,
                     float* out, const KernelTable& k) {
  bs = checked_flat("dequantize_lut8", n, bs);
  check_ptr("dequantize_lut8", "q", q, n > 0);
  check_ptr("dequantize_lut8", "absmax", absmax, n > 0);
  check_ptr("dequantize_lut8", "code256", code256, n > 0);
  check_ptr("dequantize_lut8", "out", out, n > 0);
  parallel_chunks(n, kChunk, [&](int64_t s, int64_t len) {
    k.dequantize_lut8(q + s, s, len, bs, absmax, code256, out + s);
  });
}

void symmetric_scales(const float* absmax, int64_t count, float qmax, float* scale) {
  check_count("symmetric_scales", "count", count);
  if (!(qmax > 0.0f) || !std::isfinite(qmax))
    bad_arg("symmetric_scales", "qmax", "finite > 0", std::to_string(qmax));
  check_ptr("symmetric_scales", "absmax", absmax, count > 0);
  check_ptr("symmetric_scales", "scale", scale, count > 0);
  for (int64_t i = 0; i < count; ++i) scale[i] = absmax[i] / qmax;
}

void asymmetric_scales(const float* mins, const float* maxs, int64_t count, int32_t qmin, int32_t qmax,
                       float* scale, int32_t* zero_point) {
  const char* fn = "asymmetric_scales";
  check_count(fn, "count", count);
  if (qmin >= qmax)
    bad_arg(fn, "[qmin, qmax]", "qmin < qmax",
            "[" + std::to_string(qmin) + ", " + std::to_string(qmax) + "]");
  check_ptr(fn, "mins", mins, count > 0);
  check_ptr(fn, "maxs", maxs, count > 0);
  check_ptr(fn, "scale", scale, count > 0);
  check_ptr(fn, "zero_point", zero_point, count > 0);
  for (int64_t i = 0; i < count; ++i) {
    const float lo = std::fmin(mins[i], 0.0f), hi = std::fmax(maxs[i], 0.0f);
    // In double: hi - lo overflows float for +-huge inputs (and qmax - qmin int32 for wide ranges).
    const float s = static_cast<float>((static_cast<double>(hi) - lo) / (static_cast<double>(qmax) - qmin));
    scale[i] = s;
    if (s == 0.0f) {
      zero_point[i] = 0;
      continue;
    }
    const float z = std::nearbyint(static_cast<float>(qmin) - lo / s);
    zero_point[i] =
        static_cast<int32_t>(std::fmin(std::fmax(z, static_cast<float>(qmin)), static_cast<float>(qmax)));
  }
}

}  // namespace msbnb::kernels
