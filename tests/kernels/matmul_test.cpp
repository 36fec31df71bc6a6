// The fused dequantize-matmul (kernels/matmul.h) on every ISA of isa.def: the threaded drivers and
// the raw KernelTable::matmul entries against double-precision references built from the
// existing dequantize kernels (the exact float weights), with error bounds derived from the
// documented numerics (see "Tolerances"); integer results and the fast int8 path bit for bit;
// thread counts; the transposed product; LLM.int8(); packing round trips and the chunk layout;
// edge values and argument errors. ISAs this CPU lacks are reported as SKIPPED.
//
// ---- Tolerances -------------------------------------------------------------------------------
//
// u = 2^-24 is float32's unit roundoff (|fl(a op b) - a op b| <= u |a op b|); bfloat16 has 8
// significand bits, so its round-to-nearest-even moves a value by at most 2^-8 of it (the value
// 1 + 2^-8 is a tie: 2^-9 is the typical, not the worst, relative error). References are sums
// in double of products of the exact float inputs; their own error (about k 2^-53 relative to
// P) is negligible next to these bounds. P = sum_j |x_j w_j| is the magnitude of a dot product.
//
// exact path  y = fl(sum_j fl(x_j w_j)) in any order, FMA or not: each term takes part in at
//             most k roundings, so |y - sum_j x_j w_j| <= gamma_k P <= (k + 1) u P (for k^2 u <= 1,
//             k <= 4096). The bias add is one more rounding, u |y + b|. Bound: (k + 4) u (P + |b|)
//             (two roundings of slack), plus (k + 4) 2^-149 for gradual underflow (each operation
//             on denormals errs by at most 2^-150).
// fast 4-bit  x~ = bf16(x) = x (1 + a), w~ = bf16(w) = w (1 + b), |a|, |b| <= 2^-8 (a = 0 for
//             bf16 activations); x~ w~ has 16 significand bits, so it is exact in float32, and
//             |x~ w~ - x w| <= (2 * 2^-8 + 2^-16) |x w|. The float32 sum adds (k + 1) u sum
//             |x~ w~| <= (k + 1) u (1 + 2^-7 + 2^-16) P. Bound against the exact reference:
//             (2^-7 + 2^-15 + (k + 4) u) P + (k + 4) u |b|. VDPBF16PS flushes denormal inputs and
//             outputs to zero: (k + 4) 2^-126 absolute. Against the documented semantics (sum of
//             x~ w~ in float32) the exact path's bound holds with P~ = sum |x~ w~|; both are
//             checked (the second one catches truncation instead of rounding to bf16).
// fast int8   weights w_j = (q_j + o) s (o = 0 symmetric), activations of a row quantized with
//             a = max_j |x_j|: t_j = fl(x_j fl(fl(1 / a) 127)) = x_j (127 / a) (1 + e),
//             |e| <= 3u + 3u^2 + u^3, xq_j = rne(t_j), |xq_j - t_j| <= 1/2, so x^_j = xq_j a / 127 has
//             |x^_j - x_j| <= a / 254 + 3.0001 u |x_j| (half a quantization step). The driver
//             computes y = fl(fl(acc) fl(fl(a fl(1/127)) s)) + fl(fl(o s) fl(sum_j x_j)) with
//             acc = sum_j xq_j q_j exact (int32), so against sum_j x_j w_j:
//               quantization  s sum_j |q_j| (a / 254 + 3.0001 u |x_j|)
//               scaling       5 u |acc| a s / 127 <= 5 u a s sum_j |q_j|   (|xq_j| <= 127)
//               offset term   (k + 1) u |o s| sum_j |x_j|   (float sum of k values, 2 products)
//               adds          u |y| + u (|y| + |b|)   (offset add, bias add)
//             Bound: s sum_j |q_j| (a / 254 + 3 u |x_j|) (1 + 1e-6) + (k + 8) u (a s sum_j |q_j| +
//             |o s| sum_j |x_j|) + 2 u |b|. Symmetric weights have |q_j| s = |w_j|: half a step
//             per element of |w|. For asymmetric weights the quantization error multiplies q_j
//             and not q_j + o: the offset part uses the unquantized activations.
// bf16 output one more rounding: |bf16(v) - v| <= 2^-8 |v| <= 2^-8 (|y_ref| + tol), plus 2^-134
//             (half the smallest bf16 denormal).
// transposed  gx_j = sum_r gy_r w_rj: the exact path's bound with m = rows terms.
// LLM.int8()  see LlmInt8MatchesIndependentReference.
#include "msbnb/kernels/matmul.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "msbnb/kernels/formats.h"
#include "msbnb/kernels/kernel_table.h"
#include "msbnb/kernels/ops.h"
#include "test_util.h"

namespace msbnb::test {
namespace {

namespace K = kernels;
using K::Int8Matrix;
using K::KernelTable;
using K::Lut4Matrix;
using K::MatmulIO;
using K::MatmulPath;

constexpr double kU = 0x1p-24;           // float32 unit roundoff
constexpr double kUb = 0x1p-8;           // bfloat16 unit roundoff
constexpr double kMinNormal = 0x1p-126;  // float32: flushed denormals err by less than this
constexpr double kDenorm = 0x1p-149;     // float32: smallest denormal
constexpr uint32_t kSentinel32 = 0x7fa5a5a5u;
constexpr uint16_t kSentinel16 = 0x7fa5u;
constexpr uint16_t kBf16NaN = 0x7fc1u;

const KernelTable& scalar_table() { return K::kernels_for(Isa::scalar); }

// ---- small helpers ------------------------------------------------------------------------------

uint16_t bf16_rne(float f) {  // finite f
  const uint32_t u = bits_of(f);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
float bf16_value(uint16_t h) { return from_bits(static_cast<uint32_t>(h) << 16); }
float round_bf16(float f) { return bf16_value(bf16_rne(f)); }

std::vector<float> gaussian(int64_t n, uint32_t seed, float amp = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& f : v) f = normal(rng) * amp;
  return v;
}

size_t sz(int64_t n) { return static_cast<size_t>(n); }

// set_num_threads for one scope (restored with set_num_threads(0) even when an assertion fails).
struct ThreadScope {
  explicit ThreadScope(int threads) { K::set_num_threads(threads); }
  ~ThreadScope() { K::set_num_threads(0); }
  ThreadScope(const ThreadScope&) = delete;
  ThreadScope& operator=(const ThreadScope&) = delete;
};

// Checks that fn throws std::invalid_argument whose message names `word` (as a whole word).
template <class Fn>
void expect_invalid(const char* what, const std::string& word, Fn fn) {
  try {
    fn();
    ADD_FAILURE() << what << ": no exception";
  } catch (const std::invalid_argument& e) {
    const std::string msg = e.what();
    bool named = false;
    for (size_t p = msg.find(word); p != std::string::npos && !named; p = msg.find(word, p + 1)) {
      auto is_name = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
      const bool left = p == 0 || !is_name(msg[p - 1]);
      const bool right = p + word.size() >= msg.size() || !is_name(msg[p + word.size()]);
      named = left && right;
    }
    EXPECT_TRUE(named) << what << ": message does not name '" << word << "': " << msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": expected std::invalid_argument, got " << e.what();
  }
}

// ---- weights ------------------------------------------------------------------------------------

enum class WFormat { nf4, fp4, int4_sym, int4_asym, int8_sym, int8_asym };
const char* wformat_name(WFormat f) {
  static const char* names[] = {"nf4", "fp4", "int4_sym", "int4_asym", "int8_sym", "int8_asym"};
  return names[static_cast<int>(f)];
}

// A quantized weight in its interchange layout, its exact float values (from the dequantize
// kernels) and its repacked form. Not copyable: a copied PackedLut4 / PackedInt8 would keep views
// into the original's statistics.
struct Weight {
  WFormat fmt = WFormat::nf4;
  int64_t rows = 0, cols = 0, block = 0;
  std::vector<float> deq;      // [rows * cols]: dequantize() of the interchange data
  std::vector<uint8_t> bytes;  // 4-bit interchange bytes (bitsandbytes or qint4x2)
  std::vector<int8_t> q8;      // int8 codes [rows * cols]
  std::vector<float> scale;    // absmax per block / scale per group / scale per row
  std::vector<int32_t> zp;     // asymmetric zero points
  std::vector<float> offset;   // int8 asymmetric: -zp
  K::PackedLut4 p4;
  K::PackedInt8 p8;

  Weight() = default;
  Weight(Weight&&) = default;
  Weight(const Weight&) = delete;
  Weight& operator=(const Weight&) = delete;

  bool is_int8() const { return fmt == WFormat::int8_sym || fmt == WFormat::int8_asym; }
  bool asym() const { return fmt == WFormat::int4_asym || fmt == WFormat::int8_asym; }
  std::string name() const {
    std::ostringstream s;
    s << wformat_name(fmt) << " " << rows << "x" << cols;
    if (!is_int8()) s << " block=" << block << (p4.view.simd_friendly() ? "" : " (not simd_friendly)");
    return s.str();
  }
};

const float* code_of(WFormat f) { return f == WFormat::nf4 ? K::kCodeNF4 : K::kCodeFP4; }

// Quantizes src [rows, cols] with the scalar table's kernels and repacks it.
Weight quantize_weight(WFormat fmt, int64_t rows, int64_t cols, int64_t block,
                       const std::vector<float>& src) {
  const KernelTable& s = scalar_table();
  Weight w;
  w.fmt = fmt;
  w.rows = rows;
  w.cols = cols;
  w.block = block;
  const int64_t n = rows * cols;
  w.deq.assign(sz(n), 0.0f);
  switch (fmt) {
    case WFormat::nf4:
    case WFormat::fp4: {
      const float* code = code_of(fmt);
      w.scale.assign(sz(K::ceil_div(n, block)), 0.0f);
      K::absmax_blocks(src.data(), DType::f32, n, block, w.scale.data(), s);
      w.bytes.assign(sz((n + 1) / 2), 0);
      K::quantize_lut4(src.data(), DType::f32, n, block, w.scale.data(), K::make_lut4(code), w.bytes.data(),
                       s);
      K::dequantize_lut4(w.bytes.data(), n, block, w.scale.data(), code, w.deq.data(), s);
      w.p4 = K::pack_lut4_bnb(w.bytes.data(), rows, cols, block, w.scale.data(), code);
      break;
    }
    case WFormat::int4_sym:
    case WFormat::int4_asym: {
      const int64_t groups = K::ceil_div(cols, block);
      w.scale.assign(sz(rows * groups), 0.0f);
      std::vector<float> lo(w.scale.size()), hi(w.scale.size());
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = src.data() + r * cols;
        K::absmax_blocks(xr, DType::f32, cols, block, w.scale.data() + r * groups, s);
        K::minmax_blocks(xr, DType::f32, cols, block, lo.data() + r * groups, hi.data() + r * groups, s);
      }
      const bool asym = fmt == WFormat::int4_asym;
      if (asym) {
        w.zp.assign(w.scale.size(), 0);
        K::asymmetric_scales(lo.data(), hi.data(), rows * groups, 0, 15, w.scale.data(), w.zp.data());
      } else {
        K::symmetric_scales(w.scale.data(), rows * groups, 7.0f, w.scale.data());
      }
      const int32_t* zp = asym ? w.zp.data() : nullptr;
      w.bytes.assign(sz(rows * ((cols + 1) / 2)), 0);
      K::quantize_int4(src.data(), DType::f32, rows, cols, block, w.scale.data(), zp, w.bytes.data(), s);
      K::dequantize_int4(w.bytes.data(), rows, cols, block, w.scale.data(), zp, w.deq.data(), s);
      w.p4 = K::pack_int4(w.bytes.data(), rows, cols, block, w.scale.data(), zp);
      break;
    }
    case WFormat::int8_sym:
    case WFormat::int8_asym: {
      w.block = cols;
      w.scale.assign(sz(rows), 0.0f);
      w.q8.assign(sz(n), 0);
      const bool asym = fmt == WFormat::int8_asym;
      if (asym) {
        std::vector<float> lo(sz(rows)), hi(sz(rows));
        w.zp.assign(sz(rows), 0);
        K::minmax_blocks(src.data(), DType::f32, n, cols, lo.data(), hi.data(), s);
        K::asymmetric_scales(lo.data(), hi.data(), rows, -128, 127, w.scale.data(), w.zp.data());
        K::quantize_int8(src.data(), DType::f32, n, cols, w.scale.data(), w.zp.data(), -128, 127, w.q8.data(),
                         s);
        for (int32_t z : w.zp) w.offset.push_back(static_cast<float>(-z));
      } else {
        K::absmax_blocks(src.data(), DType::f32, n, cols, w.scale.data(), s);
        K::symmetric_scales(w.scale.data(), rows, 127.0f, w.scale.data());
        K::quantize_int8(src.data(), DType::f32, n, cols, w.scale.data(), nullptr, -127, 127, w.q8.data(), s);
      }
      K::dequantize_int8(w.q8.data(), n, cols, w.scale.data(), asym ? w.zp.data() : nullptr, w.deq.data(), s);
      w.p8 = K::pack_int8(w.q8.data(), rows, cols, w.scale.data(), asym ? w.offset.data() : nullptr);
      break;
    }
  }
  return w;
}

Weight make_weight(WFormat fmt, int64_t rows, int64_t cols, int64_t block, uint32_t seed, float amp = 1.0f) {
  return quantize_weight(fmt, rows, cols, block, gaussian(rows * cols, seed, amp));
}

// An int8 weight from given codes, one scale for every row and optional offsets -zp.
Weight int8_from_codes(const std::vector<int8_t>& q, int64_t rows, int64_t cols, float scale,
                       const std::vector<int32_t>& zp = {}) {
  Weight w;
  w.fmt = zp.empty() ? WFormat::int8_sym : WFormat::int8_asym;
  w.rows = rows;
  w.cols = cols;
  w.block = cols;
  w.q8 = q;
  w.scale.assign(sz(rows), scale);
  w.zp = zp;
  for (int32_t z : zp) w.offset.push_back(static_cast<float>(-z));
  w.deq.assign(sz(rows * cols), 0.0f);
  K::dequantize_int8(q.data(), rows * cols, cols, w.scale.data(), zp.empty() ? nullptr : w.zp.data(),
                     w.deq.data(), scalar_table());
  w.p8 = K::pack_int8(q.data(), rows, cols, w.scale.data(), zp.empty() ? nullptr : w.offset.data());
  return w;
}

// ---- activations and outputs --------------------------------------------------------------------

// Activations [n][ld] of dtype dt (bf16: the RNE bits of the given floats); `val` holds the exact
// float value of each element (0 in the padding, which holds NaN in the buffer).
struct Acts {
  DType dt = DType::f32;
  int64_t n = 0, cols = 0, ld = 0;
  std::vector<float> f32;
  std::vector<uint16_t> b16;
  std::vector<float> val;
  const void* data() const {
    return dt == DType::f32 ? static_cast<const void*>(f32.data()) : static_cast<const void*>(b16.data());
  }
  float at(int64_t i, int64_t j) const { return val[sz(i * ld + j)]; }
};

Acts make_acts(const std::vector<float>& v, int64_t n, int64_t cols, int64_t ld, DType dt) {
  Acts a;
  a.dt = dt;
  a.n = n;
  a.cols = cols;
  a.ld = ld;
  a.val.assign(sz(n * ld), 0.0f);
  if (dt == DType::f32)
    a.f32.assign(sz(n * ld), std::numeric_limits<float>::quiet_NaN());
  else
    a.b16.assign(sz(n * ld), kBf16NaN);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const float f = v[sz(i * cols + j)];
      const size_t at = sz(i * ld + j);
      if (dt == DType::f32) {
        a.f32[at] = f;
        a.val[at] = f;
      } else {
        a.b16[at] = bf16_rne(f);
        a.val[at] = bf16_value(a.b16[at]);
      }
    }
  return a;
}

// An output buffer [n][ld] of dtype dt, every element a sentinel NaN until written.
struct Out {
  DType dt = DType::f32;
  int64_t n = 0, ld = 0;
  std::vector<float> f32;
  std::vector<uint16_t> b16;
  void* data() { return dt == DType::f32 ? static_cast<void*>(f32.data()) : static_cast<void*>(b16.data()); }
  double at(int64_t i, int64_t j) const {
    return dt == DType::f32 ? f32[sz(i * ld + j)] : bf16_value(b16[sz(i * ld + j)]);
  }
  uint32_t raw(int64_t i, int64_t j) const {
    return dt == DType::f32 ? bits_of(f32[sz(i * ld + j)]) : b16[sz(i * ld + j)];
  }
  bool untouched(int64_t i, int64_t j) const {
    return dt == DType::f32 ? raw(i, j) == kSentinel32 : raw(i, j) == kSentinel16;
  }
};

Out make_out(DType dt, int64_t n, int64_t ld) {
  Out o;
  o.dt = dt;
  o.n = n;
  o.ld = ld;
  if (dt == DType::f32)
    o.f32.assign(sz(n * ld), from_bits(kSentinel32));
  else
    o.b16.assign(sz(n * ld), kSentinel16);
  return o;
}

MatmulIO make_io(const Acts& x, Out& y, const float* bias) {
  MatmulIO io;
  io.x = x.data();
  io.x_dtype = x.dt;
  io.n = x.n;
  io.ldx = x.ld;
  io.y = y.data();
  io.y_dtype = y.dt;
  io.ldy = y.ld;
  io.bias = bias;
  return io;
}

// Checks an output: columns [lo, hi) of every row within tol of ref (both indexed i * out.ld + j;
// a bf16 output widens tol by its own rounding), columns [hi, any) anything, every other column
// untouched (its sentinel). Reports the first few offenders.
void expect_within(const std::string& ctx, const Out& out, const std::vector<double>& ref,
                   const std::vector<double>& tol, int64_t lo, int64_t hi, int64_t any = -1) {
  any = std::max(any, hi);
  int64_t bad = 0;
  for (int64_t i = 0; i < out.n; ++i)
    for (int64_t j = 0; j < out.ld; ++j) {
      if (j >= lo && j < hi) {
        const size_t at = sz(i * out.ld + j);
        double t = tol[at];
        if (out.dt == DType::bf16) t += kUb * (std::fabs(ref[at]) + t) + 0x1p-134;
        const double got = out.at(i, j), err = std::fabs(got - ref[at]);
        if (!(err <= t) && ++bad <= 5)
          ADD_FAILURE() << ctx << ": element (" << i << ", " << j << ") = " << got << ", reference "
                        << ref[at] << ", error " << err << " > bound " << t << " (" << err / t << "x)";
      } else if (!(j >= hi && j < any) && !out.untouched(i, j) && ++bad <= 5) {
        ADD_FAILURE() << ctx << ": element (" << i << ", " << j
                      << ") outside the output was written: " << out.at(i, j);
      }
    }
  if (bad > 5) ADD_FAILURE() << ctx << ": " << bad << " bad elements in all";
}

// Output bits of two runs, all of them (sentinels included).
void expect_same_bits(const std::string& ctx, const Out& a, const Out& b) {
  int64_t bad = 0;
  for (int64_t i = 0; i < a.n; ++i)
    for (int64_t j = 0; j < a.ld; ++j)
      if (a.raw(i, j) != b.raw(i, j) && ++bad <= 5)
        ADD_FAILURE() << ctx << ": element (" << i << ", " << j << ") differs: " << a.at(i, j) << " vs "
                      << b.at(i, j);
  if (bad > 5) ADD_FAILURE() << ctx << ": " << bad << " differing elements in all";
}

// ---- references ---------------------------------------------------------------------------------

// y[i * ld + r] = sum_j x[i][j] w[r][j] and p = sum_j |x[i][j] w[r][j]| in double; with
// `bf16_operands` both factors are first rounded to bf16 (the fast 4-bit path's operands).
struct DotRef {
  std::vector<double> y, p;
};
DotRef forward_ref(const Acts& x, const std::vector<float>& w, int64_t rows, int64_t cols, int64_t ld,
                   bool bf16_operands = false) {
  DotRef out;
  out.y.assign(sz(x.n * ld), 0.0);
  out.p.assign(sz(x.n * ld), 0.0);
  std::vector<double> wd(w.size()), xd(sz(cols));
  for (size_t t = 0; t < w.size(); ++t) wd[t] = bf16_operands ? round_bf16(w[t]) : w[t];
  for (int64_t i = 0; i < x.n; ++i) {
    for (int64_t j = 0; j < cols; ++j) xd[sz(j)] = bf16_operands ? round_bf16(x.at(i, j)) : x.at(i, j);
    for (int64_t r = 0; r < rows; ++r) {
      double s = 0.0, p = 0.0;
      const double* wr = wd.data() + r * cols;
      for (int64_t j = 0; j < cols; ++j) {
        const double t = xd[sz(j)] * wr[j];
        s += t;
        p += std::fabs(t);
      }
      out.y[sz(i * ld + r)] = s;
      out.p[sz(i * ld + r)] = p;
    }
  }
  return out;
}

// gx[i * ld + j] = sum_r gy[i][r] w[r][j] and the sum of magnitudes.
DotRef transposed_ref(const Acts& gy, const std::vector<float>& w, int64_t rows, int64_t cols, int64_t ld) {
  DotRef out;
  out.y.assign(sz(gy.n * ld), 0.0);
  out.p.assign(sz(gy.n * ld), 0.0);
  for (int64_t i = 0; i < gy.n; ++i)
    for (int64_t r = 0; r < rows; ++r) {
      const double g = gy.at(i, r);
      for (int64_t j = 0; j < cols; ++j) {
        const double t = g * w[sz(r * cols + j)];
        out.y[sz(i * ld + j)] += t;
        out.p[sz(i * ld + j)] += std::fabs(t);
      }
    }
  return out;
}

// The exact path's bound for k terms of magnitude p, plus an added value b.
double exact_bound(int64_t k, double p, double b = 0.0) {
  return (double(k) + 4) * kU * (p + std::fabs(b)) + (double(k) + 4) * kDenorm;
}

// ---- the forward check --------------------------------------------------------------------------

struct RunSpec {
  DType xdt = DType::f32, ydt = DType::f32;
  bool bias = false;
  MatmulPath path = MatmulPath::exact;
  int64_t ldx_pad = 0, ldy_pad = 0;
};

const char* path_name(MatmulPath p) {
  return p == MatmulPath::exact  ? "exact"
         : p == MatmulPath::fast ? "fast"
         : p == MatmulPath::int8 ? "int8"
                                 : "automatic";
}

std::string describe(const Weight& w, int64_t n, const RunSpec& run) {
  std::ostringstream s;
  s << w.name() << " n=" << n << " path=" << path_name(run.path) << " x=" << K::dtype_name(run.xdt)
    << " y=" << K::dtype_name(run.ydt) << (run.bias ? " bias" : "") << " ldx=+" << run.ldx_pad << " ldy=+"
    << run.ldy_pad;
  return s.str();
}

void call_matmul(const Weight& w, const MatmulIO& io, MatmulPath path, const KernelTable& kt) {
  if (w.is_int8())
    K::matmul(w.p8.view, io, path, kt);
  else
    K::matmul(w.p4.view, io, path, kt);
}

// Runs the driver on activations xv [n, cols] and checks every output element against the
// bound of the path it resolves to (see "Tolerances").
void check_forward(const KernelTable& kt, const Weight& w, const std::vector<float>& xv, int64_t n,
                   const RunSpec& run, uint32_t seed) {
  const int64_t rows = w.rows, cols = w.cols, ldx = cols + run.ldx_pad, ldy = rows + run.ldy_pad;
  const std::string ctx = describe(w, n, run);
  const Acts x = make_acts(xv, n, cols, ldx, run.xdt);
  const std::vector<float> bias = gaussian(rows, seed ^ 0x9e3779b9u);
  Out y = make_out(run.ydt, n, ldy);
  call_matmul(w, make_io(x, y, run.bias ? bias.data() : nullptr), run.path, kt);
  const MatmulPath path = K::resolve_path(run.path, n);
  const double k = double(cols);

  const DotRef ref = forward_ref(x, w.deq, rows, cols, ldy);
  std::vector<double> want(ref.y.size(), 0.0), tol(ref.y.size(), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    double a = 0.0, xabs = 0.0;  // row absmax and sum |x| (fast int8)
    for (int64_t j = 0; j < cols; ++j) {
      a = std::max(a, double(std::fabs(x.at(i, j))));
      xabs += std::fabs(x.at(i, j));
    }
    for (int64_t r = 0; r < rows; ++r) {
      const size_t at = sz(i * ldy + r);
      const double b = run.bias ? bias[sz(r)] : 0.0;
      want[at] = ref.y[at] + b;
      if (path == MatmulPath::exact || (!w.is_int8() && n <= K::kGemvMaxRows)) {
        // 4-bit batches up to kGemvMaxRows run the exact GEMV on the fast path too.
        tol[at] = exact_bound(cols, ref.p[at], b);
      } else if (!w.is_int8()) {
        tol[at] = (0x1p-7 + 0x1p-15 + (k + 4) * kU) * ref.p[at] + (k + 4) * kU * std::fabs(b) +
                  (k + 4) * kMinNormal;
      } else {
        const double s = w.scale[sz(r)], o = w.offset.empty() ? 0.0 : w.offset[sz(r)];
        double q_abs = 0.0, qx = 0.0;  // s sum |q_j|, s sum |q_j x_j|
        for (int64_t j = 0; j < cols; ++j) {
          const double qs = std::abs(int(w.q8[sz(r * cols + j)])) * s;
          q_abs += qs;
          qx += qs * std::fabs(x.at(i, j));
        }
        tol[at] = (q_abs * a / 254 + 3 * kU * qx) * (1 + 1e-6) +
                  (k + 8) * kU * (a * q_abs + std::fabs(o * s) * xabs) + 2 * kU * std::fabs(b) +
                  (k + 8) * kDenorm;
      }
    }
  }
  expect_within(ctx + " [vs exact weights]", y, want, tol, 0, rows);

  if (path == MatmulPath::fast && !w.is_int8() && n > K::kGemvMaxRows) {  // documented bf16 operands
    const DotRef rb = forward_ref(x, w.deq, rows, cols, ldy, true);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t r = 0; r < rows; ++r) {
        const size_t at = sz(i * ldy + r);
        const double b = run.bias ? bias[sz(r)] : 0.0;
        want[at] = rb.y[at] + b;
        tol[at] = (k + 4) * kU * (rb.p[at] + std::fabs(b)) + (k + 4) * kMinNormal;
      }
    expect_within(ctx + " [vs bf16 operands]", y, want, tol, 0, rows);
  }
  if (path == MatmulPath::fast && w.is_int8() && kt.isa != Isa::scalar) {  // exact across ISAs
    Out y_ref = make_out(run.ydt, n, ldy);
    call_matmul(w, make_io(x, y_ref, run.bias ? bias.data() : nullptr), run.path, scalar_table());
    expect_same_bits(ctx + " [fast int8 vs the scalar table]", y_ref, y);
  }
}

struct WCase {
  WFormat fmt;
  int64_t rows, cols, block;
  bool big = false;  // also n = 128
};

// Every case of `cases` for batches 1, 3, 8 (GEMV), 9, 33 (GEMM; 128 for big cases), both paths,
// cycling through x / y dtypes, bias and padded leading dimensions.
void run_forward_cases(const KernelTable& kt, const std::vector<WCase>& cases) {
  uint32_t seed = 11;
  for (size_t c = 0; c < cases.size(); ++c) {
    const WCase& wc = cases[c];
    const Weight w = make_weight(wc.fmt, wc.rows, wc.cols, wc.block, seed++);
    std::vector<int64_t> ns = {1, 3, 8, 9, 33};
    if (wc.big) ns.push_back(128);
    int combo = static_cast<int>(c) * 3;
    for (int64_t n : ns)
      for (MatmulPath path : {MatmulPath::exact, MatmulPath::fast}) {
        RunSpec run;
        run.path = path;
        run.xdt = combo & 1 ? DType::bf16 : DType::f32;
        run.ydt = combo & 2 ? DType::bf16 : DType::f32;
        run.bias = combo & 4;
        run.ldx_pad = combo % 3 == 0 ? 3 : 0;
        run.ldy_pad = combo % 5 == 0 ? 2 : 0;
        ++combo;
        const uint32_t xseed = seed++;
        check_forward(kt, w, gaussian(n * wc.cols, xseed), n, run, seed);
        if (testing::Test::HasFailure()) return;
      }
  }
}

// ---- the fixture --------------------------------------------------------------------------------

class Matmul : public testing::TestWithParam<Isa> {
 protected:
  void SetUp() override {
    MSBNB_SKIP_IF_UNSUPPORTED(GetParam());
    kt_ = &K::kernels_for(GetParam());
  }
  const KernelTable& kt() const { return *kt_; }
  const KernelTable* kt_ = nullptr;
};

// ---- 1. forward, every format and path ----------------------------------------------------------

TEST_P(Matmul, ForwardNf4Fp4) {
  run_forward_cases(kt(), {
                              {WFormat::nf4, 67, 640, 64, true},  // SIMD layout
                              {WFormat::nf4, 17, 64, 32},         // one chunk, half padding
                              {WFormat::fp4, 129, 384, 128},      //
                              {WFormat::fp4, 67, 320, 32},        // kpad 384
                              {WFormat::nf4, 17, 100, 64},        // blocks straddle rows
                              {WFormat::fp4, 17, 257, 64},        // odd cols, odd rows * cols
                              {WFormat::nf4, 1, 130, 128},        // straddle, one row
                          });
}

TEST_P(Matmul, ForwardInt4) {
  run_forward_cases(kt(), {
                              {WFormat::int4_sym, 67, 640, 128, true},
                              {WFormat::int4_asym, 17, 257, 32},  // odd cols, short last group
                              {WFormat::int4_asym, 67, 64, 32},
                              {WFormat::int4_sym, 129, 130, 24},  // group % 16 != 0: scalar
                              {WFormat::int4_asym, 17, 100, 100},
                          });
}

TEST_P(Matmul, ForwardInt8) {
  run_forward_cases(kt(), {
                              {WFormat::int8_sym, 67, 257, 0},
                              {WFormat::int8_asym, 129, 640, 0, true},
                              {WFormat::int8_sym, 1, 64, 0},
                              {WFormat::int8_asym, 17, 100, 0},
                          });
}

// automatic resolves to exact for every batch size (numerics_test.cpp checks its error), bit for bit.
TEST_P(Matmul, AutomaticPathFollowsBatchSize) {
  EXPECT_EQ(K::resolve_path(MatmulPath::automatic, K::kGemvMaxRows), MatmulPath::exact);
  EXPECT_EQ(K::resolve_path(MatmulPath::automatic, K::kGemvMaxRows + 1), MatmulPath::exact);
  EXPECT_EQ(K::resolve_path(MatmulPath::exact, 1000), MatmulPath::exact);
  EXPECT_EQ(K::resolve_path(MatmulPath::fast, 1), MatmulPath::fast);
  for (WFormat fmt : {WFormat::nf4, WFormat::int8_asym}) {
    const Weight w = make_weight(fmt, 33, 192, 64, 3);
    for (int64_t n : {K::kGemvMaxRows, K::kGemvMaxRows + 1}) {
      const Acts x = make_acts(gaussian(n * w.cols, 4), n, w.cols, w.cols, DType::f32);
      Out ya = make_out(DType::f32, n, w.rows), yr = make_out(DType::f32, n, w.rows);
      call_matmul(w, make_io(x, ya, nullptr), MatmulPath::automatic, kt());
      call_matmul(w, make_io(x, yr, nullptr), K::resolve_path(MatmulPath::automatic, n), kt());
      expect_same_bits(w.name() + " automatic n=" + std::to_string(n), yr, ya);
    }
  }
}

// Relative Frobenius error ||y - y_ref|| / ||y_ref|| (y_ref: exact weights, in double) on Gaussian
// data with k = 1024, against bounds derived from the standard model of rounding: each rounding
// error is independent, zero-mean and uniform over its half-ulp interval, so its variance is at
// most (2^-p)^2 / 3 of the rounded value (p: significand bits, unit roundoff 2^-p; the half-ulp is
// at most 2^-p of the value). With t_ij = x_j w_ij and T = sum t^2 over every output and term:
//   exact (exact weights, summation order only): a product and at most k additions round, each
//     partial sum's mean square at most the full sum's: E||e||^2 <= (k + 1) u^2 / 3 T.
//   fast 4-bit: bf16(x) bf16(w) = t (1 + a + b + ab), E a^2, E b^2 <= 2^-16 / 3:
//     E||e||^2 <= (2 2^-16 / 3 + 2^-32 / 9) T, plus the fp32 summation as for exact. docs/matmul.md
//     quotes about 0.23 %: the uniform-mantissa average of (ulp / 2)^2 / 3 is about 0.54 of the bound.
//   fast int8: x^ - x uniform on a_i / 254 (a_i: absmax of row i), so for one row
//     ||e_i||^2 = eps^T (W^T W) eps has mean s_i ||W||_F^2 and variance <= 2 s_i^2 ||W W^T||_F^2,
//     s_i = (a_i / 127)^2 / 12 (uniform errors have less kurtosis than Gaussian ones); asserted at
//     mean + 6 standard deviations, plus 6 u ||y|| for the float scaling of the int32 sums.
// The inputs have no denormals, so the DAZ/FTZ terms of the element bounds are 0 here.
TEST_P(Matmul, FastPathRelativeError) {
  const int64_t rows = 256, cols = 1024, n = 32;
  const double k = double(cols);
  const Acts x = make_acts(gaussian(n * cols, 77), n, cols, cols, DType::f32);
  for (WFormat fmt : {WFormat::nf4, WFormat::int8_sym}) {
    const Weight w = make_weight(fmt, rows, cols, 64, 78);
    const DotRef ref = forward_ref(x, w.deq, rows, cols, rows);
    double ref2 = 0.0, t2 = 0.0;  // ||y_ref||^2, T
    for (int64_t i = 0; i < n; ++i)
      for (int64_t r = 0; r < rows; ++r) {
        ref2 += ref.y[sz(i * rows + r)] * ref.y[sz(i * rows + r)];
        for (int64_t j = 0; j < cols; ++j) {
          const double t = double(x.at(i, j)) * w.deq[sz(r * cols + j)];
          t2 += t * t;
        }
      }
    auto rel_error = [&](const std::vector<double>& want, auto&& got) {
      double num = 0.0;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t r = 0; r < rows; ++r) {
          const double d = got(i, r) - want[sz(i * rows + r)];
          num += d * d;
        }
      return std::sqrt(num / ref2);
    };
    double rel[2];
    for (MatmulPath path : {MatmulPath::exact, MatmulPath::fast}) {
      Out y = make_out(DType::f32, n, rows);
      call_matmul(w, make_io(x, y, nullptr), path, kt());
      rel[path == MatmulPath::fast] = rel_error(ref.y, [&](int64_t i, int64_t r) { return y.at(i, r); });
    }
    const double sum_bound = std::sqrt((k + 1) / 3 * t2 / ref2) * kU;
    double fast_bound = 0.0;
    if (fmt == WFormat::nf4) {
      // The bf16 rounding alone: the bf16-operand sums in double against the exact ones.
      const DotRef rb = forward_ref(x, w.deq, rows, cols, rows, true);
      const double bf16_bound = std::sqrt((2 * kUb * kUb / 3 + kUb * kUb * kUb * kUb / 9) * t2 / ref2);
      const double rel_bf16 = rel_error(ref.y, [&](int64_t i, int64_t r) { return rb.y[sz(i * rows + r)]; });
      EXPECT_LE(rel_bf16, bf16_bound) << "nf4 fast: bf16 rounding of the operands";
      fast_bound = bf16_bound + sum_bound;
    } else {
      double w2 = 0.0, g2 = 0.0;  // ||W||_F^2, ||W W^T||_F^2
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t q = 0; q < rows; ++q) {
          double g = 0.0;
          for (int64_t j = 0; j < cols; ++j) g += double(w.deq[sz(r * cols + j)]) * w.deq[sz(q * cols + j)];
          g2 += g * g;
          if (q == r) w2 += g;
        }
      double mean = 0.0, var = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        double a = 0.0;
        for (int64_t j = 0; j < cols; ++j) a = std::max(a, double(std::fabs(x.at(i, j))));
        const double s2 = (a / 127) * (a / 127) / 12;
        mean += s2 * w2;
        var += 2 * s2 * s2 * g2;
      }
      fast_bound = std::sqrt((mean + 6 * std::sqrt(var)) / ref2) + 6 * kU;
    }
    std::printf(
        "[          ] %s %s 256x1024, n=32: relative Frobenius error: exact weights (summation order only) "
        "%.3g (bound %.3g), fast %.3g %% (bound %.3g %%; docs/matmul.md: about %s)\n",
        K::isa_name(GetParam()), wformat_name(fmt), rel[0], sum_bound, rel[1] * 100, fast_bound * 100,
        fmt == WFormat::nf4 ? "0.23 %" : "0.8 %");
    EXPECT_LE(rel[0], sum_bound) << wformat_name(fmt) << " exact";
    EXPECT_LE(rel[1], fast_bound) << wformat_name(fmt) << " fast";
  }
}

// Adversarial data for the fast paths' element bounds (check_forward asserts the full ones), with
// the largest observed error printed and asserted against the bounds docs/matmul.md states:
//  4-bit: x = w = 1 + 2^-8 both round (a tie, to even) to 1: the error is 2^-7 of sum |x w|,
//  the product rounding's (2^-7 + 2^-16) sum |x w|, plus the fp32 summation (k + 4) u sum |x~ w~|.
//  int8 asymmetric: rows of zeros and one -1 have offset -115 and codes 115 where w = 0; the
//  quantization error of x multiplies q, not w = (q + o) s, so the bound is absmax / 254 s sum |q|
//  (here about 22 times absmax / 254 sum |w|), plus the float roundings (k + 8) u absmax s sum |q|
//  (the scaling, generously) and (k + 1) u |o s| sum |x| (the offset term).
TEST_P(Matmul, FastPathWorstCases) {
  const int64_t rows = 17, cols = 1024, n = 9;
  RunSpec run;
  run.path = MatmulPath::fast;
  {
    const Weight w =
        quantize_weight(WFormat::nf4, rows, cols, 64, std::vector<float>(sz(rows * cols), 1.0f + 0x1p-8f));
    ASSERT_EQ(w.deq[0], 1.0f + 0x1p-8f);
    const std::vector<float> xv(sz(n * cols), 1.0f + 0x1p-8f);
    check_forward(kt(), w, xv, n, run, 1);
    const Acts x = make_acts(xv, n, cols, cols, DType::f32);
    Out y = make_out(DType::f32, n, rows);
    call_matmul(w, make_io(x, y, nullptr), MatmulPath::fast, kt());
    const DotRef ref = forward_ref(x, w.deq, rows, cols, rows);
    const DotRef rb = forward_ref(x, w.deq, rows, cols, rows, true);
    const double k = double(cols);
    double worst = 0.0, bound = 0.0;  // both relative to sum |x w|
    for (int64_t i = 0; i < n; ++i)
      for (int64_t r = 0; r < rows; ++r) {
        const size_t at = sz(i * rows + r);
        worst = std::max(worst, std::fabs(y.at(i, r) - ref.y[at]) / ref.p[at]);
        bound = std::max(bound, ((0x1p-7 + 0x1p-16) * ref.p[at] + (k + 4) * kU * rb.p[at]) / ref.p[at]);
      }
    std::printf(
        "[          ] %s fast 4-bit, ties: error / sum|x w| = 2^%.3f (docs/matmul.md: <= 2^-7 + 2^-16, plus "
        "the fp32 summation (k + 4) 2^-24 sum|x~ w~|: 2^%.3f)\n",
        K::isa_name(GetParam()), std::log2(worst), std::log2(bound));
    EXPECT_LE(worst, bound) << "fast 4-bit ties";
  }
  {
    std::vector<float> src(sz(rows * cols), 0.0f);
    for (int64_t r = 0; r < rows; ++r)
      src[sz(r * cols + (37 * r) % cols)] = -1.0f, src[sz(r * cols + 5)] = 0.05f;
    const Weight w = quantize_weight(WFormat::int8_asym, rows, cols, 0, src);
    ASSERT_EQ(w.offset[0], -115.0f);
    const std::vector<float> xv = gaussian(n * cols, 2);
    check_forward(kt(), w, xv, n, run, 2);
    const Acts x = make_acts(xv, n, cols, cols, DType::f32);
    Out y = make_out(DType::f32, n, rows);
    call_matmul(w, make_io(x, y, nullptr), MatmulPath::fast, kt());
    const DotRef ref = forward_ref(x, w.deq, rows, cols, rows);
    const double k = double(cols);
    double worst = 0.0, worst_w = 0.0, bound = 0.0;  // relative to absmax / 254 s sum |q|
    for (int64_t i = 0; i < n; ++i) {
      double a = 0.0, xabs = 0.0;
      for (int64_t j = 0; j < cols; ++j) {
        a = std::max(a, double(std::fabs(x.at(i, j))));
        xabs += std::fabs(x.at(i, j));
      }
      for (int64_t r = 0; r < rows; ++r) {
        const double s = w.scale[sz(r)], o = w.offset[sz(r)];
        double q_abs = 0.0, w_abs = 0.0;  // s sum |q|, sum |w|
        for (int64_t j = 0; j < cols; ++j) {
          q_abs += std::abs(int(w.q8[sz(r * cols + j)])) * s;
          w_abs += std::fabs(w.deq[sz(r * cols + j)]);
        }
        const double err = std::fabs(y.at(i, r) - ref.y[sz(i * rows + r)]), docs = a / 254 * q_abs;
        worst = std::max(worst, err / docs);
        worst_w = std::max(worst_w, err / (a / 254 * w_abs));
        bound = std::max(bound,
                         (docs + (k + 8) * kU * a * q_abs + (k + 1) * kU * std::fabs(o * s) * xabs) / docs);
      }
    }
    std::printf(
        "[          ] %s fast int8 asymmetric: error / (absmax / 254 scale sum|q|) = %.3f (docs/matmul.md: "
        "<= 1, "
        "plus the float roundings: %.3f); error / (absmax / 254 sum|w|) = %.2f\n",
        K::isa_name(GetParam()), worst, bound, worst_w);
    EXPECT_LE(worst, bound) << "fast int8 asymmetric";
    EXPECT_GT(worst_w, 1.0) << "the adversarial case no longer shows q, not w, multiplying the error";
  }
}

// ---- 2. the integer kernel bit for bit ----------------------------------------------------------

TEST_P(Matmul, Int8KernelBitExact) {
  const KernelTable& ref = scalar_table();
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> code(-128, 127), byte(0, 255);
  const int64_t rows = 37;
  for (int64_t cols : {1, 63, 64, 65, 200, 700}) {
    std::vector<int8_t> q(sz(rows * cols));
    for (int8_t& v : q) v = static_cast<int8_t>(code(rng));
    q[0] = -128;
    q[sz(std::min<int64_t>(1, cols * rows - 1))] = 127;
    for (int64_t j = 0; j < cols; ++j) {
      q[sz(2 * cols + j)] = -128;  // extreme rows
      q[sz(3 * cols + j)] = 127;
    }
    const std::vector<float> scale(sz(rows), 1.0f);
    const K::PackedInt8 p = K::pack_int8(q.data(), rows, cols, scale.data(), nullptr);
    const Int8Matrix& w = p.view;
    for (int64_t n : {1, 2, 3, 4, 5, 6, 7, 8, 9, 33}) {
      const int64_t ldx = w.kpad + 3, ldy = rows + 3;
      std::vector<uint8_t> xu(sz(n * ldx), 0xab);  // beyond kpad: not to be read
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < w.kpad; ++j)
          xu[sz(i * ldx + j)] = j >= cols ? 128 : i == 0 ? 0 : i == 1 ? 255 : static_cast<uint8_t>(byte(rng));
      if (n > 2) xu[sz(2 * ldx)] = 0, xu[sz(2 * ldx + std::min<int64_t>(1, cols - 1))] = 255;
      for (auto [r0, r1] :
           {std::pair<int64_t, int64_t>{0, rows}, {1, 2}, {3, 8}, {5, 16}, {17, 37}, {36, 37}}) {
        std::vector<int32_t> want(sz(n * ldy), 0x5eadbeef), got(want);
        ref.matmul.int8_i8(w, xu.data(), n, ldx, r0, r1, want.data(), ldy);
        kt().matmul.int8_i8(w, xu.data(), n, ldx, r0, r1, got.data(), ldy);
        int64_t bad = 0;
        for (int64_t i = 0; i < n; ++i)
          for (int64_t r = 0; r < ldy; ++r) {
            int64_t exact = 0x5eadbeef;  // the definition, in int64
            if (r >= r0 && r < r1) {
              exact = 0;
              for (int64_t j = 0; j < cols; ++j)
                exact += (int64_t(xu[sz(i * ldx + j)]) - 128) * q[sz(r * cols + j)];
            }
            const size_t at = sz(i * ldy + r);
            if ((want[at] != exact || got[at] != exact) && ++bad <= 5)
              ADD_FAILURE() << "cols=" << cols << " n=" << n << " rows [" << r0 << ", " << r1 << ") element ("
                            << i << ", " << r << "): exact " << exact << ", scalar " << want[at] << ", "
                            << K::isa_name(GetParam()) << " " << got[at];
          }
        if (HasFailure()) return;
      }
    }
  }
}

// ---- raw kernel entries: row ranges, every GEMV width and tile remainder -------------------------

TEST_P(Matmul, RawForwardEntriesRowRanges) {
  const WCase cases[] = {
      {WFormat::nf4, 67, 640, 64}, {WFormat::int4_asym, 17, 257, 32}, {WFormat::int4_sym, 29, 130, 24},
      {WFormat::fp4, 17, 100, 64}, {WFormat::int8_sym, 67, 257, 0},   {WFormat::int8_asym, 17, 100, 0},
  };
  uint32_t seed = 101;
  for (const WCase& wc : cases) {
    const Weight w = make_weight(wc.fmt, wc.rows, wc.cols, wc.block, seed++);
    const int64_t rows = w.rows, cols = w.cols, kpad = w.is_int8() ? w.p8.view.kpad : w.p4.view.kpad;
    const int64_t ldx = kpad + 3, ldy = rows + 5;
    for (int64_t n : {1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 33}) {
      // x [n][ldx]: cols values, zeros to kpad (the contract), NaN beyond (never read).
      const std::vector<float> xv = gaussian(n * cols, seed++);
      std::vector<float> xf(sz(n * ldx), std::numeric_limits<float>::quiet_NaN());
      std::vector<uint16_t> xb(sz(n * ldx), kBf16NaN);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < kpad; ++j) {
          xf[sz(i * ldx + j)] = j < cols ? xv[sz(i * cols + j)] : 0.0f;
          xb[sz(i * ldx + j)] = bf16_rne(xf[sz(i * ldx + j)]);
        }
      const Acts xa = make_acts(xv, n, cols, cols, DType::f32);
      const DotRef ref = forward_ref(xa, w.deq, rows, cols, ldy);
      const DotRef refb = forward_ref(xa, w.deq, rows, cols, ldy, true);
      std::vector<double> tol(ref.y.size()), tolb(ref.y.size());
      for (size_t t = 0; t < tol.size(); ++t) {
        tol[t] = exact_bound(cols, ref.p[t]);
        tolb[t] = (double(cols) + 4) * (kU * refb.p[t] + kMinNormal);
      }
      for (auto [r0, r1] : {std::pair<int64_t, int64_t>{0, rows}, {1, 2}, {3, 8}, {rows - 5, rows}}) {
        std::ostringstream ctx;
        ctx << w.name() << " n=" << n << " rows [" << r0 << ", " << r1 << ")";
        Out y = make_out(DType::f32, n, ldy);
        if (w.is_int8()) {
          kt().matmul.int8_f32(w.p8.view, xf.data(), n, ldx, r0, r1, y.f32.data(), ldy);
          expect_within(ctx.str() + " int8_f32", y, ref.y, tol, r0, r1);
        } else {
          kt().matmul.lut4_f32(w.p4.view, xf.data(), n, ldx, r0, r1, y.f32.data(), ldy);
          expect_within(ctx.str() + " lut4_f32", y, ref.y, tol, r0, r1);
          Out yb = make_out(DType::f32, n, ldy);
          kt().matmul.lut4_bf16(w.p4.view, xb.data(), n, ldx, r0, r1, yb.f32.data(), ldy);
          expect_within(ctx.str() + " lut4_bf16", yb, refb.y, tolb, r0, r1);
        }
        if (HasFailure()) return;
      }
    }
  }
}

// n = 0 activation rows: every forward entry writes nothing (the avx512 f32 entries once ran
// their batch-size switch's default, 8 rows, into y).
TEST_P(Matmul, RawForwardEntriesNoRows) {
  for (WFormat fmt : {WFormat::nf4, WFormat::int8_asym}) {
    const Weight w = make_weight(fmt, 17, 256, fmt == WFormat::nf4 ? 64 : 0, 7);
    const int64_t kpad = w.is_int8() ? w.p8.view.kpad : w.p4.view.kpad, ldy = w.rows;
    // Room for the 8 rows a wrong switch would read and write; y holds a sentinel.
    const std::vector<float> xf(sz(8 * kpad), 1.0f);
    const std::vector<uint16_t> xb(sz(8 * kpad), bf16_rne(1.0f));
    const std::vector<uint8_t> xu(sz(8 * kpad), 129);
    std::vector<float> y(sz(8 * ldy), -3.0f);
    std::vector<int32_t> acc(sz(8 * ldy), -3);
    if (w.is_int8()) {
      kt().matmul.int8_f32(w.p8.view, xf.data(), 0, kpad, 0, w.rows, y.data(), ldy);
      if (kt().matmul.int8_i8) kt().matmul.int8_i8(w.p8.view, xu.data(), 0, kpad, 0, w.rows, acc.data(), ldy);
    } else {
      kt().matmul.lut4_f32(w.p4.view, xf.data(), 0, kpad, 0, w.rows, y.data(), ldy);
      if (kt().matmul.lut4_bf16)
        kt().matmul.lut4_bf16(w.p4.view, xb.data(), 0, kpad, 0, w.rows, y.data(), ldy);
    }
    EXPECT_EQ(std::count(y.begin(), y.end(), -3.0f), static_cast<long>(y.size()))
        << w.name() << ": y written";
    EXPECT_EQ(std::count(acc.begin(), acc.end(), -3), static_cast<long>(acc.size()))
        << w.name() << ": acc written";
  }
}

// ---- 3. thread counts ---------------------------------------------------------------------------

// 1 vs 2 threads: within twice the bound (each run is within it of the reference) and the fast
// int8 path bit for bit (matmul.h); docs/matmul.md promises bit-identical results on every path.

TEST_P(Matmul, ThreadCountInvariance) {
  const WCase cases[] = {{WFormat::nf4, 67, 640, 64},
                         {WFormat::int4_sym, 129, 130, 24},
                         {WFormat::int8_asym, 129, 640, 0},
                         {WFormat::nf4, 600, 256, 64},
                         {WFormat::int8_sym, 777, 130, 0}};  // several row parts (transposed)
  uint32_t seed = 201;
  for (const WCase& wc : cases) {
    const Weight w = make_weight(wc.fmt, wc.rows, wc.cols, wc.block, seed++);
    const int64_t rows = w.rows, cols = w.cols;
    for (int64_t n : {3, 33}) {
      const Acts x = make_acts(gaussian(n * cols, seed++), n, cols, cols, DType::f32);
      const DotRef ref = forward_ref(x, w.deq, rows, cols, rows);
      const DotRef refb = forward_ref(x, w.deq, rows, cols, rows, true);
      for (MatmulPath path : {MatmulPath::exact, MatmulPath::fast, MatmulPath::int8}) {
        Out y[2] = {make_out(DType::f32, n, rows), make_out(DType::f32, n, rows)};
        for (int t = 0; t < 2; ++t) {
          ThreadScope threads(t + 1);
          call_matmul(w, make_io(x, y[t], nullptr), path, kt());
        }
        const std::string ctx =
            w.name() + " n=" + std::to_string(n) + " " + path_name(path) + " 1 vs 2 threads";
        if ((path == MatmulPath::fast && w.is_int8()) || path == MatmulPath::int8) {
          expect_same_bits(ctx, y[0], y[1]);
          continue;
        }
        // Both runs lie within the bound of the reference: they differ by at most twice it.
        std::vector<double> tol(ref.y.size());
        for (size_t t = 0; t < tol.size(); ++t)
          tol[t] = 2 * (path == MatmulPath::exact ? exact_bound(cols, ref.p[t])
                                                  : (double(cols) + 4) * (kU * refb.p[t] + kMinNormal));
        std::vector<double> other(sz(n * rows));
        for (int64_t i = 0; i < n; ++i)
          for (int64_t r = 0; r < rows; ++r) other[sz(i * rows + r)] = y[0].at(i, r);
        expect_within(ctx, y[1], other, tol, 0, rows);
        // docs/matmul.md promises more: each element is computed by one thread in a fixed order.
        expect_same_bits(ctx + " [bit for bit, docs/matmul.md]", y[0], y[1]);
      }
      // The transposed product (threads split the columns; cols 640 and 130 give 5 and 2 chunks).
      const Acts gy = make_acts(gaussian(n * rows, seed++), n, rows, rows, DType::f32);
      const DotRef tref = transposed_ref(gy, w.deq, rows, cols, cols);
      Out gx[2] = {make_out(DType::f32, n, cols), make_out(DType::f32, n, cols)};
      for (int t = 0; t < 2; ++t) {
        ThreadScope threads(t + 1);
        if (w.is_int8())
          K::matmul_transposed(w.p8.view, make_io(gy, gx[t], nullptr), kt());
        else
          K::matmul_transposed(w.p4.view, make_io(gy, gx[t], nullptr), kt());
      }
      std::vector<double> other(sz(n * cols)), tol(sz(n * cols));
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < cols; ++j) {
          other[sz(i * cols + j)] = gx[0].at(i, j);
          tol[sz(i * cols + j)] = 2 * exact_bound(rows, tref.p[sz(i * cols + j)]);
        }
      const std::string tctx = w.name() + " n=" + std::to_string(n) + " transposed 1 vs 2 threads";
      expect_within(tctx, gx[1], other, tol, 0, cols);
      expect_same_bits(tctx + " [bit for bit, docs/matmul.md]", gx[0], gx[1]);
      if (HasFailure()) return;
    }
  }
}

// ---- 4. the transposed product ------------------------------------------------------------------

TEST_P(Matmul, TransposedMatchesReference) {
  const WCase cases[] = {
      {WFormat::nf4, 67, 640, 64},       {WFormat::fp4, 17, 257, 64},      {WFormat::int4_asym, 17, 257, 32},
      {WFormat::int4_sym, 129, 130, 24}, {WFormat::nf4, 1, 130, 128},      {WFormat::int8_sym, 67, 257, 0},
      {WFormat::int8_asym, 129, 640, 0}, {WFormat::int8_asym, 17, 100, 0},
  };
  uint32_t seed = 301;
  int combo = 0;
  for (const WCase& wc : cases) {
    const Weight w = make_weight(wc.fmt, wc.rows, wc.cols, wc.block, seed++);
    const int64_t rows = w.rows, cols = w.cols;
    for (int64_t n : {1, 3, 9, 33}) {
      const DType gdt = combo & 1 ? DType::bf16 : DType::f32, odt = combo & 2 ? DType::bf16 : DType::f32;
      const int64_t ldg = rows + (combo % 3 == 0 ? 3 : 0), ldo = cols + (combo % 5 < 2 ? 5 : 0);
      ++combo;
      std::ostringstream ctx;
      ctx << w.name() << " transposed n=" << n << " gy=" << K::dtype_name(gdt) << " gx=" << K::dtype_name(odt)
          << " ldx=" << ldg << " ldy=" << ldo;
      const Acts gy = make_acts(gaussian(n * rows, seed++), n, rows, ldg, gdt);
      Out gx = make_out(odt, n, ldo);
      if (w.is_int8())
        K::matmul_transposed(w.p8.view, make_io(gy, gx, nullptr), kt());
      else
        K::matmul_transposed(w.p4.view, make_io(gy, gx, nullptr), kt());
      const DotRef ref = transposed_ref(gy, w.deq, rows, cols, ldo);
      std::vector<double> tol(ref.y.size());
      for (size_t t = 0; t < tol.size(); ++t) tol[t] = exact_bound(rows, ref.p[t]);
      expect_within(ctx.str(), gx, ref.y, tol, 0, cols);
      if (HasFailure()) return;
    }
  }
}

// The raw entries over column ranges [c0, c1) (multiples of the chunk, except c1 = cols as
// matmul.h allows, or kpad as the driver passes), with and without accumulate: columns outside
// [c0, c1) stay untouched; [cols, kpad) is padding (anything).
TEST_P(Matmul, TransposedRawColumnRanges) {
  const WCase cases[] = {
      {WFormat::nf4, 67, 640, 64},      {WFormat::fp4, 17, 257, 64},     {WFormat::int4_asym, 17, 257, 32},
      {WFormat::int4_sym, 29, 130, 24}, {WFormat::int8_sym, 67, 257, 0}, {WFormat::int8_asym, 17, 100, 0},
  };
  uint32_t seed = 401;
  for (const WCase& wc : cases) {
    const Weight w = make_weight(wc.fmt, wc.rows, wc.cols, wc.block, seed++);
    const int64_t rows = w.rows, cols = w.cols, kpad = w.is_int8() ? w.p8.view.kpad : w.p4.view.kpad;
    const int64_t unit = w.is_int8() ? K::kInt8Chunk : K::kLut4Chunk;
    std::vector<std::pair<int64_t, int64_t>> ranges = {{0, kpad}, {0, cols}, {0, std::min(unit, cols)}};
    if (unit < cols) ranges.push_back({unit, cols});
    for (int64_t n : {1, 4, 9}) {
      const int64_t ldg = rows + 3, ldo = kpad + 5;
      const Acts gy = make_acts(gaussian(n * rows, seed++), n, rows, ldg, DType::f32);  // NaN padding
      const DotRef ref = transposed_ref(gy, w.deq, rows, cols, ldo);
      for (auto [c0, c1] : ranges)
        for (bool accumulate : {false, true}) {
          std::ostringstream ctx;
          ctx << w.name() << " raw transposed n=" << n << " cols [" << c0 << ", " << c1 << ")"
              << (accumulate ? " accumulate" : "");
          Out gx = make_out(DType::f32, n, ldo);
          const std::vector<float> init = gaussian(n * ldo, seed++);
          std::vector<double> want(ref.y), tol(ref.y.size());
          for (int64_t i = 0; i < n; ++i)
            for (int64_t j = c0; j < c1; ++j) {
              const size_t at = sz(i * ldo + j);
              // accumulate adds to gx; otherwise gx holds garbage that must not be read.
              gx.f32[at] = accumulate ? init[at] : std::numeric_limits<float>::quiet_NaN();
              if (accumulate) want[at] += init[at];
              tol[at] = exact_bound(rows + 1, ref.p[at], accumulate ? init[at] : 0.0);
            }
          if (w.is_int8())
            kt().matmul.int8_t_f32(w.p8.view, gy.f32.data(), n, ldg, c0, c1, gx.f32.data(), ldo, accumulate);
          else
            kt().matmul.lut4_t_f32(w.p4.view, gy.f32.data(), n, ldg, c0, c1, gx.f32.data(), ldo, accumulate);
          expect_within(ctx.str(), gx, want, tol, c0, std::min(c1, cols), c1);
          if (HasFailure()) return;
        }
    }
  }
}

// The row entries over weight rows [r0, r1) (empty, one row, odd starts and tails of the 4-row
// blocks), with and without accumulate: gy outside [r0, r1) is NaN (never read), columns
// [cols, kpad) are padding (anything), [kpad, ldx) untouched.
TEST_P(Matmul, TransposedRawRowRanges) {
  const WCase cases[] = {
      {WFormat::nf4, 67, 640, 64},      {WFormat::fp4, 17, 257, 64},       {WFormat::int4_asym, 23, 257, 32},
      {WFormat::int4_sym, 29, 130, 24}, {WFormat::int4_sym, 13, 384, 128}, {WFormat::nf4, 9, 100, 64},
      {WFormat::int8_sym, 67, 257, 0},  {WFormat::int8_asym, 17, 100, 0},
  };
  uint32_t seed = 451;
  for (const WCase& wc : cases) {
    const Weight w = make_weight(wc.fmt, wc.rows, wc.cols, wc.block, seed++);
    const int64_t rows = w.rows, cols = w.cols, kpad = w.is_int8() ? w.p8.view.kpad : w.p4.view.kpad;
    const std::vector<std::pair<int64_t, int64_t>> ranges = {{0, rows},        {0, 0}, {1, rows},    {3, 10},
                                                             {rows - 1, rows}, {0, 5}, {2, rows - 3}};
    for (int64_t n : {1, 2, 3, 4, 5, 9}) {
      const int64_t ldg = rows + 3, ldo = kpad + 5;
      const std::vector<float> gv = gaussian(n * rows, seed++);
      for (auto [b, e] : ranges)
        for (bool accumulate : {false, true}) {
          const int64_t r1 = std::min(e, rows), r0 = std::min(b, r1);
          std::ostringstream ctx;
          ctx << w.name() << " raw transposed rows n=" << n << " rows [" << r0 << ", " << r1 << ")"
              << (accumulate ? " accumulate" : "");
          std::vector<float> in_range(gv);
          for (int64_t i = 0; i < n; ++i)
            for (int64_t r = 0; r < rows; ++r)
              if (r < r0 || r >= r1) in_range[sz(i * rows + r)] = 0.0f;
          const Acts ref_gy = make_acts(in_range, n, rows, ldg, DType::f32);
          Acts gy = make_acts(gv, n, rows, ldg, DType::f32);
          for (int64_t i = 0; i < n; ++i)
            for (int64_t r = 0; r < rows; ++r)
              if (r < r0 || r >= r1) gy.f32[sz(i * ldg + r)] = std::numeric_limits<float>::quiet_NaN();
          const DotRef ref = transposed_ref(ref_gy, w.deq, rows, cols, ldo);
          Out gx = make_out(DType::f32, n, ldo);
          const std::vector<float> init = gaussian(n * ldo, seed++);
          std::vector<double> want(ref.y), tol(ref.y.size());
          for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < kpad; ++j) {
              const size_t at = sz(i * ldo + j);
              gx.f32[at] = accumulate ? init[at] : std::numeric_limits<float>::quiet_NaN();
              if (accumulate) want[at] += init[at];
              tol[at] = exact_bound(r1 - r0 + 1, ref.p[at], accumulate ? init[at] : 0.0);
            }
          if (w.is_int8())
            kt().matmul.int8_t_rows_f32(w.p8.view, gy.f32.data(), n, ldg, r0, r1, gx.f32.data(), ldo,
                                        accumulate);
          else
            kt().matmul.lut4_t_rows_f32(w.p4.view, gy.f32.data(), n, ldg, r0, r1, gx.f32.data(), ldo,
                                        accumulate);
          expect_within(ctx.str(), gx, want, tol, 0, cols, kpad);
          if (HasFailure()) return;
        }
    }
  }
}

// ---- 5. LLM.int8() ------------------------------------------------------------------------------

// quantize_rows_int8 as matmul.h documents it, written out independently: absmax over the
// elements below the threshold (all when threshold <= 0), q = rne(x * fl(fl(1 / absmax) * 127)) in float,
// 0 for zeroed columns, elements at or above the threshold and all-zero rows. q is [n][cols].
void ref_quantize_rows(const Acts& x, float threshold, const std::vector<int64_t>& zero_cols,
                       std::vector<int8_t>& q, std::vector<float>& absmax) {
  q.assign(sz(x.n * x.cols), 0);
  absmax.assign(sz(x.n), 0.0f);
  for (int64_t i = 0; i < x.n; ++i) {
    float a = 0.0f;
    for (int64_t j = 0; j < x.cols; ++j)
      if (threshold <= 0.0f || std::fabs(x.at(i, j)) < threshold) a = std::max(a, std::fabs(x.at(i, j)));
    absmax[sz(i)] = a;
    if (a == 0.0f) continue;
    const float inv = (1.0f / a) * 127.0f;  // bitsandbytes: row_stats.reciprocal() * 127
    for (int64_t j = 0; j < x.cols; ++j) {
      const bool zeroed = std::find(zero_cols.begin(), zero_cols.end(), j) != zero_cols.end();
      const bool outlier = threshold > 0.0f && std::fabs(x.at(i, j)) >= threshold;
      if (zeroed || outlier) continue;
      const float t = x.at(i, j) * inv;
      q[sz(i * x.cols + j)] = static_cast<int8_t>(std::nearbyint(t));
    }
  }
}

TEST(MatmulQuantizeRows, MatchesDefinitionElementByElement) {
  const int64_t n = 7, cols = 300, ldx = cols + 5, ldq = cols + 11;
  std::vector<float> v = gaussian(n * cols, 9);
  auto row = [&](int64_t i) { return v.data() + i * cols; };
  std::fill(row(1), row(2), 0.0f);  // all zero
  // Row 2: absmax 127, so 127 / absmax = 1 and these are exact ties: RNE gives 2, 4, -2, -0, 126.
  for (int64_t j = 0; j < cols; ++j) row(2)[j] = 0.25f;
  row(2)[0] = 127.0f, row(2)[1] = 2.5f, row(2)[2] = 3.5f, row(2)[3] = -2.5f, row(2)[4] = -0.5f;
  row(2)[5] = 126.5f, row(2)[6] = -127.0f;
  for (int64_t j = 0; j < cols; ++j) row(3)[j] *= 10.0f;                                 // many |x| >= 6
  for (int64_t j = 0; j < cols; ++j) row(4)[j] = j % 2 ? 10.0f : -8.0f;                  // all >= 6
  for (int64_t j = 0; j < cols; ++j) row(5)[j] = j % 3 ? -0.0f : 1e-30f * float(j % 7);  // signed zeros, tiny
  for (int64_t j = 0; j < cols; ++j) row(6)[j] *= 1e-3f;
  for (DType dt : {DType::f32, DType::bf16})
    for (float threshold : {0.0f, 6.0f, 200.0f})
      for (const std::vector<int64_t>& zero_cols :
           {std::vector<int64_t>{}, std::vector<int64_t>{0, 7, 299}}) {
        std::ostringstream ctx;
        ctx << K::dtype_name(dt) << " threshold=" << threshold << " zero_cols=" << zero_cols.size();
        const Acts x = make_acts(v, n, cols, ldx, dt);
        std::vector<int8_t> q(sz(n * ldq), 0x5a), want;
        std::vector<float> absmax(sz(n), -1.0f), want_absmax;
        K::quantize_rows_int8(x.data(), dt, n, cols, ldx, threshold, zero_cols, q.data(), ldq, absmax.data());
        ref_quantize_rows(x, threshold, zero_cols, want, want_absmax);
        for (int64_t i = 0; i < n; ++i) {
          EXPECT_EQ(bits_of(absmax[sz(i)]), bits_of(want_absmax[sz(i)])) << ctx.str() << " absmax row " << i;
          for (int64_t j = 0; j < ldq; ++j) {
            const int expect = j < cols ? want[sz(i * cols + j)] : 0;  // the tail is zero-filled
            EXPECT_EQ(int(q[sz(i * ldq + j)]), expect) << ctx.str() << " element (" << i << ", " << j << ")";
            EXPECT_LE(std::abs(int(q[sz(i * ldq + j)])), 127) << ctx.str();
          }
        }
        if (threshold != 6.0f) {  // the hand-computed ties (row 2 is below 200)
          const int tie[] = {zero_cols.empty() ? 127 : 0, 2, 4, -2, 0, 126, -127};
          for (int j = 0; j < 7; ++j) EXPECT_EQ(int(q[sz(2 * ldq + j)]), tie[j]) << ctx.str() << " tie " << j;
        } else {
          EXPECT_EQ(absmax[4], 0.0f) << ctx.str() << ": a row of outliers has no absmax";
        }
        if (HasFailure()) return;
      }
}

// A row whose absmax is tiny (below 127 / FLT_MAX = 3.7e-37, normal or not): 127 / absmax
// overflows float32, yet matmul.h's q = rne(x * (127 / absmax)) is defined: +-127 for the
// largest element, and the codes stay within one of rne(127 x / absmax) computed in double.
TEST(MatmulQuantizeRows, TinyAbsmaxStillCodesTheRange) {
  const int64_t cols = 64;
  for (float a : {1e-30f, 1e-36f, 1e-37f, 1e-40f})
    for (DType dt : {DType::f32, DType::bf16}) {
      std::vector<float> v(sz(cols));
      for (int64_t j = 0; j < cols; ++j) v[sz(j)] = a * float(j % 2 ? j + 1 : -(j + 1)) / float(cols);
      const Acts x = make_acts(v, 1, cols, cols, dt);
      float amax = 0.0f;
      for (int64_t j = 0; j < cols; ++j) amax = std::max(amax, std::fabs(x.at(0, j)));
      std::vector<int8_t> q(sz(cols), 0x5a);
      float absmax = -1.0f;
      K::quantize_rows_int8(x.data(), dt, 1, cols, cols, 0.0f, {}, q.data(), cols, &absmax);
      EXPECT_EQ(absmax, amax) << "absmax " << a << " " << K::dtype_name(dt);
      int64_t bad = 0;
      for (int64_t j = 0; j < cols; ++j) {
        const double want = std::nearbyint(double(x.at(0, j)) * 127.0 / double(amax));
        if (std::fabs(double(q[sz(j)]) - want) > 1 && ++bad <= 3)
          ADD_FAILURE() << "absmax " << amax << " (" << K::dtype_name(dt) << "): q[" << j
                        << "] = " << int(q[sz(j)]) << " for x = " << x.at(0, j) << ", expected about "
                        << want;
      }
    }
}

// y = sum_j xq_j q_j * absmax_i * s_r / 127 over the non-outlier columns (int64, then double) plus
// the outlier columns in fp32 against the dequantized weights fl(q s). The driver computes
// fl(fl(acc) fl(fl(a fl(1/127)) s)): five roundings, 5 u |main|; the outlier sum of |C| float
// products is within (|C| + 1) u E (E = sum over C of |x w|); adding it and the bias: two more
// roundings. Bound: 8 u |main| + (|C| + 4) u E + 2 u |b| (+ underflow).
TEST_P(Matmul, LlmInt8MatchesIndependentReference) {
  const std::pair<int64_t, int64_t> shapes[] = {{67, 257}, {17, 640}, {129, 100}};
  uint32_t seed = 501;
  int combo = 0;
  for (auto [rows, cols] : shapes) {
    const Weight w = make_weight(WFormat::int8_sym, rows, cols, 0, seed++);
    for (int64_t n : {1, 5, 9, 33})
      for (float threshold : {0.0f, 6.0f}) {
        const DType xdt = combo & 1 ? DType::bf16 : DType::f32, ydt = combo & 2 ? DType::bf16 : DType::f32;
        const bool with_bias = combo & 4;
        ++combo;
        std::vector<float> xv = gaussian(n * cols, seed++);
        // Planted outliers (6.0 exactly is one), and two just below 6 that are not.
        const int64_t planted[] = {3, cols / 2, cols / 2 + 1, cols - 1};
        const float big[] = {6.0f, -7.5f, 20.0f, 6.5f};
        for (int t = 0; t < 4; ++t) xv[sz((planted[t] % n) * cols + planted[t])] = big[t];
        xv[sz((n - 1) * cols + 10)] = 5.96875f;  // the largest bf16 below 6
        xv[sz(11)] = -5.96875f;
        std::ostringstream ctx;
        ctx << "llm_int8 " << w.name() << " n=" << n << " threshold=" << threshold
            << " x=" << K::dtype_name(xdt) << " y=" << K::dtype_name(ydt) << (with_bias ? " bias" : "");
        const Acts x = make_acts(xv, n, cols, cols, xdt);
        const std::vector<float> bias = gaussian(rows, seed++);
        Out y = make_out(ydt, n, rows);
        std::vector<int64_t> outliers = {-1};
        K::matmul_llm_int8(w.p8.view, make_io(x, y, with_bias ? bias.data() : nullptr), threshold, &outliers,
                           kt());

        std::vector<int64_t> want_cols;
        if (threshold > 0.0f) {
          for (int64_t j = 0; j < cols; ++j)
            for (int64_t i = 0; i < n; ++i)
              if (std::fabs(x.at(i, j)) >= threshold) {
                want_cols.push_back(j);
                break;
              }
          EXPECT_EQ(want_cols.size(), 4u) << ctx.str();
        }
        EXPECT_EQ(outliers, want_cols) << ctx.str();

        std::vector<int8_t> xq;
        std::vector<float> absmax;
        ref_quantize_rows(x, threshold, want_cols, xq, absmax);
        std::vector<double> want(sz(n * rows)), tol(sz(n * rows));
        for (int64_t i = 0; i < n; ++i)
          for (int64_t r = 0; r < rows; ++r) {
            int64_t acc = 0;
            for (int64_t j = 0; j < cols; ++j) acc += int64_t(xq[sz(i * cols + j)]) * w.q8[sz(r * cols + j)];
            const double main = double(acc) * absmax[sz(i)] * w.scale[sz(r)] / 127.0;
            double extra = 0.0, e = 0.0;
            for (int64_t c : want_cols) {
              const double t = double(x.at(i, c)) * w.deq[sz(r * cols + c)];
              extra += t;
              e += std::fabs(t);
            }
            const double b = with_bias ? bias[sz(r)] : 0.0;
            const double nc = double(want_cols.size());
            want[sz(i * rows + r)] = main + extra + b;
            tol[sz(i * rows + r)] =
                8 * kU * std::fabs(main) + (nc + 4) * kU * e + 2 * kU * std::fabs(b) + (nc + 8) * kDenorm;
          }
        expect_within(ctx.str(), y, want, tol, 0, rows);

        // Exact across ISAs (int32 products, the same float epilogue).
        if (kt().isa != Isa::scalar) {
          Out y_ref = make_out(ydt, n, rows);
          K::matmul_llm_int8(w.p8.view, make_io(x, y_ref, with_bias ? bias.data() : nullptr), threshold,
                             nullptr, scalar_table());
          expect_same_bits(ctx.str() + " [vs the scalar table]", y_ref, y);
        }
        // Without outliers it is the fast int8 path, bit for bit.
        if (threshold == 0.0f) {
          Out y_fast = make_out(ydt, n, rows);
          K::matmul(w.p8.view, make_io(x, y_fast, with_bias ? bias.data() : nullptr), MatmulPath::fast, kt());
          expect_same_bits(ctx.str() + " [vs matmul fast]", y_fast, y);
        }
        if (HasFailure()) return;
      }
  }
}

// ---- 6. packing -------------------------------------------------------------------------------

// Views of a packed Lut4Matrix: shape fields, 64-byte aligned rows, index 0 in the padding.
void expect_lut4_view(const std::string& ctx, const Lut4Matrix& v, int64_t rows, int64_t cols) {
  EXPECT_EQ(v.rows, rows) << ctx;
  EXPECT_EQ(v.cols, cols) << ctx;
  EXPECT_EQ(v.kpad, K::ceil_div(cols, K::kLut4Chunk) * K::kLut4Chunk) << ctx;
  EXPECT_EQ(reinterpret_cast<uintptr_t>(v.codes) % 64, 0u) << ctx;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = cols; j < v.kpad; ++j)
      if (K::lut4_index(v.codes + r * (v.kpad / 2), j) != 0) {
        ADD_FAILURE() << ctx << ": padding index at (" << r << ", " << j << ") is not 0";
        return;
      }
}

TEST(MatmulPacking, Lut4BnbRoundTrip) {
  const WCase cases[] = {{WFormat::nf4, 17, 257, 64},  {WFormat::fp4, 17, 257, 64},
                         {WFormat::nf4, 67, 640, 128}, {WFormat::fp4, 3, 5, 32},
                         {WFormat::nf4, 1, 1, 64},     {WFormat::fp4, 5, 100, 32}};
  uint32_t seed = 601;
  for (const WCase& wc : cases) {
    const Weight w = make_weight(wc.fmt, wc.rows, wc.cols, wc.block, seed++);
    const Lut4Matrix& v = w.p4.view;
    const std::string ctx = w.name();
    expect_lut4_view(ctx, v, wc.rows, wc.cols);
    EXPECT_EQ(v.group, wc.block) << ctx;
    EXPECT_EQ(v.row_stride, wc.cols) << ctx;
    EXPECT_EQ(v.zero_point, nullptr) << ctx;
    for (int i = 0; i < 16; ++i)
      EXPECT_EQ(bits_of(v.lut[i]), bits_of(code_of(wc.fmt)[i])) << ctx << " lut " << i;
    for (size_t b = 0; b < w.scale.size(); ++b) EXPECT_EQ(v.scale[b], w.scale[b]) << ctx << " absmax " << b;
    std::vector<uint8_t> back(w.bytes.size(), 0xee);
    K::unpack_lut4_codes(v, true, back.data());
    EXPECT_EQ(back, w.bytes) << ctx;
    // Every nibble pattern, not only the quantizer's (the pad nibble of an odd count is the code of 0).
    std::mt19937 rng(seed);
    std::vector<uint8_t> any(w.bytes.size());
    for (uint8_t& b : any) b = static_cast<uint8_t>(rng());
    if ((wc.rows * wc.cols) % 2)
      any.back() = static_cast<uint8_t>((any.back() & 0xf0) | (wc.fmt == WFormat::nf4 ? 7 : 0));
    const K::PackedLut4 p =
        K::pack_lut4_bnb(any.data(), wc.rows, wc.cols, wc.block, w.scale.data(), code_of(wc.fmt));
    std::vector<uint8_t> back2(any.size(), 0xee);
    K::unpack_lut4_codes(p.view, true, back2.data());
    EXPECT_EQ(back2, any) << ctx << " random bytes";
    for (int64_t f = 0; f < wc.rows * wc.cols; ++f) {  // element f of the flat tensor, HIGH nibble first
      const int want = f % 2 ? any[sz(f / 2)] & 0xf : any[sz(f / 2)] >> 4;
      const int64_t r = f / wc.cols, j = f % wc.cols;
      if (K::lut4_index(p.view.codes + r * (p.view.kpad / 2), j) != want) {
        ADD_FAILURE() << ctx << ": index of flat element " << f;
        break;
      }
    }
  }
}

TEST(MatmulPacking, Int4RoundTrip) {
  const WCase cases[] = {{WFormat::int4_sym, 17, 257, 32},  {WFormat::int4_asym, 17, 257, 32},
                         {WFormat::int4_sym, 129, 130, 24}, {WFormat::int4_asym, 4, 7, 100},
                         {WFormat::int4_asym, 3, 1, 2},     {WFormat::int4_sym, 2, 640, 128}};
  uint32_t seed = 701;
  for (const WCase& wc : cases) {
    const Weight w = make_weight(wc.fmt, wc.rows, wc.cols, wc.block, seed++);
    const Lut4Matrix& v = w.p4.view;
    const std::string ctx = w.name();
    const bool asym = wc.fmt == WFormat::int4_asym;
    const int64_t groups = K::ceil_div(wc.cols, wc.block), row_bytes = (wc.cols + 1) / 2;
    expect_lut4_view(ctx, v, wc.rows, wc.cols);
    EXPECT_EQ(v.group, wc.block) << ctx;
    EXPECT_EQ(v.row_stride, groups * wc.block) << ctx;
    for (int i = 0; i < 16; ++i) EXPECT_EQ(v.lut[i], asym ? float(i) : float(i - 8)) << ctx << " lut " << i;
    EXPECT_EQ(v.zero_point != nullptr, asym) << ctx;
    for (int64_t s = 0; s < wc.rows * groups; ++s) {
      EXPECT_EQ(v.scale[s], w.scale[sz(s)]) << ctx << " scale " << s;
      if (asym) {
        EXPECT_EQ(v.zero_point[s], float(w.zp[sz(s)])) << ctx << " zero point " << s;
      }
    }
    std::vector<uint8_t> back(w.bytes.size(), 0xee);
    K::unpack_lut4_codes(v, false, back.data());
    EXPECT_EQ(back, w.bytes) << ctx;
    // Every nibble pattern (symmetric -8 included; odd cols pad with a zero nibble).
    std::mt19937 rng(seed);
    std::vector<uint8_t> any(w.bytes.size());
    for (uint8_t& b : any) b = static_cast<uint8_t>(rng());
    if (wc.cols % 2)
      for (int64_t r = 0; r < wc.rows; ++r) any[sz(r * row_bytes + row_bytes - 1)] &= 0x0f;
    const K::PackedLut4 p =
        K::pack_int4(any.data(), wc.rows, wc.cols, wc.block, w.scale.data(), asym ? w.zp.data() : nullptr);
    std::vector<uint8_t> back2(any.size(), 0xee);
    K::unpack_lut4_codes(p.view, false, back2.data());
    EXPECT_EQ(back2, any) << ctx << " random bytes";
    // The index decodes to the stored value: q (asymmetric) or the two's-complement q + 8.
    for (int64_t r = 0; r < wc.rows; ++r)
      for (int64_t j = 0; j < wc.cols; ++j) {
        const int nib = (j % 2 ? any[sz(r * row_bytes + j / 2)] >> 4 : any[sz(r * row_bytes + j / 2)]) & 0xf;
        const int q = asym ? nib : (nib ^ 8) - 8;
        const float value = p.view.lut[K::lut4_index(p.view.codes + r * (p.view.kpad / 2), j)];
        if (value != float(q)) {
          ADD_FAILURE() << ctx << ": (" << r << ", " << j << ") decodes to " << value << ", stored " << q;
          r = wc.rows;
          break;
        }
      }
  }
}

TEST(MatmulPacking, Int8RoundTrip) {
  std::mt19937 rng(8);
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{17, 257}, {1, 1}, {3, 64}, {5, 65}}) {
    std::vector<int8_t> q(sz(rows * cols));
    for (int8_t& v : q) v = static_cast<int8_t>(rng());
    q[0] = -128;
    q.back() = 127;
    std::vector<float> scale = gaussian(rows, 9), offset = gaussian(rows, 10);
    for (bool asym : {false, true}) {
      const std::string ctx = std::to_string(rows) + "x" + std::to_string(cols) + (asym ? " asym" : " sym");
      const K::PackedInt8 p =
          K::pack_int8(q.data(), rows, cols, scale.data(), asym ? offset.data() : nullptr);
      const Int8Matrix& v = p.view;
      EXPECT_EQ(v.rows, rows) << ctx;
      EXPECT_EQ(v.cols, cols) << ctx;
      EXPECT_EQ(v.kpad, K::ceil_div(cols, K::kInt8Chunk) * K::kInt8Chunk) << ctx;
      EXPECT_EQ(reinterpret_cast<uintptr_t>(v.codes) % 64, 0u) << ctx;
      EXPECT_EQ(v.offset != nullptr, asym) << ctx;
      for (int64_t r = 0; r < rows; ++r) {
        int32_t sum = 0;
        for (int64_t j = 0; j < cols; ++j) sum += q[sz(r * cols + j)];
        EXPECT_EQ(v.row_sum[r], sum) << ctx << " row " << r;
        EXPECT_EQ(v.scale[r], scale[sz(r)]) << ctx;
        if (asym) {
          EXPECT_EQ(v.offset[r], offset[sz(r)]) << ctx;
        }
        for (int64_t j = cols; j < v.kpad; ++j) EXPECT_EQ(v.codes[r * v.kpad + j], 0) << ctx << " padding";
      }
      std::vector<int8_t> back(q.size(), 0x5a);
      K::unpack_int8_codes(v, back.data());
      EXPECT_EQ(back, q) << ctx;
    }
  }
}

// matmul.h: byte 4t + s of a 64-byte chunk holds element 32s + t (low nibble) and 32s + 16 + t
// (high nibble). Hand-computed positions, checked through pack_int4 and lut4_index.
TEST(MatmulPacking, Lut4IndexFollowsChunkLayout) {
  struct Pos {
    int64_t j, byte;
    bool high;
  };
  const Pos positions[] = {{0, 0, false},
                           {1, 4, false},
                           {15, 60, false},
                           {16, 0, true},
                           {17, 4, true},
                           {31, 60, true},
                           {32, 1, false},
                           {33, 5, false},
                           {48, 1, true},
                           {64, 2, false},
                           {96, 3, false},
                           {112, 3, true},
                           {127, 63, true},
                           {128, 64, false},
                           {129, 68, false},
                           {144, 64, true},
                           {255, 127, true},
                           {256, 128, false},
                           {299, 128 + 4 * 11 + 1, false}};
  const int64_t rows = 2, cols = 300, row_bytes = (cols + 1) / 2;
  const std::vector<float> scale(sz(rows * 3), 1.0f);
  const std::vector<int32_t> zp(sz(rows * 3), 0);
  for (const Pos& pos : positions) {
    // Only element (1, j) is non-zero: asymmetric int4 stores the index as is.
    std::vector<uint8_t> packed(sz(rows * row_bytes), 0);
    packed[sz(row_bytes + pos.j / 2)] = static_cast<uint8_t>(pos.j % 2 ? 0xb0 : 0x0b);
    const K::PackedLut4 p = K::pack_int4(packed.data(), rows, cols, 128, scale.data(), zp.data());
    const Lut4Matrix& v = p.view;
    ASSERT_EQ(v.kpad, 384);
    const uint8_t* row0 = v.codes;
    const uint8_t* row1 = v.codes + v.kpad / 2;
    for (int64_t b = 0; b < v.kpad / 2; ++b) {
      EXPECT_EQ(row0[b], 0) << "j=" << pos.j << " row 0 byte " << b;
      const int want = b == pos.byte ? (pos.high ? 0xb0 : 0x0b) : 0;
      EXPECT_EQ(int(row1[b]), want) << "j=" << pos.j << " byte " << b;
    }
    for (int64_t j = 0; j < v.kpad; ++j)
      EXPECT_EQ(K::lut4_index(row1, j), j == pos.j ? 11 : 0) << "j=" << pos.j;
    // lut4_index on a hand-made chunk.
    std::vector<uint8_t> chunk(192, 0);
    chunk[sz(pos.byte)] = static_cast<uint8_t>(pos.high ? 0x5a : 0xa5);
    EXPECT_EQ(K::lut4_index(chunk.data(), pos.j), 5) << "j=" << pos.j;
  }
}

// ---- 7. edge values -----------------------------------------------------------------------------

const WFormat kAllFormats[] = {WFormat::nf4,       WFormat::fp4,      WFormat::int4_sym,
                               WFormat::int4_asym, WFormat::int8_sym, WFormat::int8_asym};

int64_t block_for(WFormat f) { return f == WFormat::nf4 || f == WFormat::fp4 ? 64 : 32; }

// y is exactly the bias (or 0) when every product is 0.
void expect_exactly_bias(const std::string& ctx, const Out& y, const std::vector<float>& bias,
                         bool with_bias) {
  int64_t bad = 0;
  for (int64_t i = 0; i < y.n; ++i)
    for (int64_t r = 0; r < y.ld; ++r) {
      const double want = with_bias ? bias[sz(r)] : 0.0;
      if (y.at(i, r) != want && ++bad <= 3)
        ADD_FAILURE() << ctx << ": element (" << i << ", " << r << ") = " << y.at(i, r) << ", expected "
                      << want;
    }
}

TEST_P(Matmul, ZeroWeightsOrActivationsGiveTheBias) {
  uint32_t seed = 801;
  for (WFormat fmt : kAllFormats)
    for (bool zero_weights : {true, false}) {
      const Weight w = make_weight(fmt, 17, 128, block_for(fmt), seed++, zero_weights ? 0.0f : 1.0f);
      if (zero_weights) {
        for (float v : w.deq) ASSERT_EQ(v, 0.0f) << w.name();
        for (float s : w.scale) ASSERT_EQ(s, 0.0f) << w.name() << ": zero absmax / scale";
      }
      for (int64_t n : {3, 9})
        for (MatmulPath path : {MatmulPath::exact, MatmulPath::fast})
          for (bool with_bias : {false, true}) {
            std::ostringstream ctx;
            ctx << w.name() << (zero_weights ? " zero weights" : " zero x") << " n=" << n << " "
                << path_name(path) << (with_bias ? " bias" : "");
            std::vector<float> xv =
                zero_weights ? gaussian(n * w.cols, seed++) : std::vector<float>(sz(n * w.cols), 0.0f);
            if (!zero_weights)
              for (size_t t = 0; t < xv.size(); t += 3) xv[t] = -0.0f;
            const Acts x = make_acts(xv, n, w.cols, w.cols, DType::f32);
            const std::vector<float> bias = gaussian(w.rows, seed++);
            Out y = make_out(DType::f32, n, w.rows);
            call_matmul(w, make_io(x, y, with_bias ? bias.data() : nullptr), path, kt());
            expect_exactly_bias(ctx.str(), y, bias, with_bias);
            // The transposed product of zeros is zero.
            const Acts gy = make_acts(
                zero_weights ? gaussian(n * w.rows, seed++) : std::vector<float>(sz(n * w.rows), 0.0f), n,
                w.rows, w.rows, DType::f32);
            Out gx = make_out(DType::f32, n, w.cols);
            if (w.is_int8())
              K::matmul_transposed(w.p8.view, make_io(gy, gx, nullptr), kt());
            else
              K::matmul_transposed(w.p4.view, make_io(gy, gx, nullptr), kt());
            expect_exactly_bias(ctx.str() + " transposed", gx, {}, false);
          }
      if (HasFailure()) return;
    }
}

// The row entries against the scalar table's on special values: NaN, +-Inf and zeros in gy,
// huge and tiny weights. Non-finite outputs match in class (NaN, or the same infinity), finite
// ones lie within the bound of the double reference.
TEST_P(Matmul, TransposedRowsSpecialValues) {
  uint32_t seed = 481;
  for (WFormat fmt : kAllFormats)
    for (float amp : {1.0f, 1e30f, 1e-30f}) {
      const Weight w = make_weight(fmt, 21, 257, block_for(fmt), seed++, amp);
      const int64_t rows = w.rows, cols = w.cols, kpad = w.is_int8() ? w.p8.view.kpad : w.p4.view.kpad;
      for (int64_t n : {1, 3, 6}) {
        std::vector<float> gv = gaussian(n * rows, seed++);
        for (int64_t r = 0; r < rows; r += 4) gv[sz(r)] = 0.0f;  // zeros in row 0
        if (n > 1) {
          gv[sz(rows + 2)] = std::numeric_limits<float>::quiet_NaN();
          gv[sz(rows + 7)] = std::numeric_limits<float>::infinity();
        }
        gv[sz((n - 1) * rows + 5)] = -std::numeric_limits<float>::infinity();
        const Acts gy = make_acts(gv, n, rows, rows, DType::f32);
        const DotRef ref = transposed_ref(gy, w.deq, rows, cols, kpad);
        std::vector<float> got(sz(n * kpad)), want(sz(n * kpad));
        if (w.is_int8()) {
          kt().matmul.int8_t_rows_f32(w.p8.view, gy.f32.data(), n, rows, 0, rows, got.data(), kpad, false);
          scalar_table().matmul.int8_t_rows_f32(w.p8.view, gy.f32.data(), n, rows, 0, rows, want.data(), kpad,
                                                false);
        } else {
          kt().matmul.lut4_t_rows_f32(w.p4.view, gy.f32.data(), n, rows, 0, rows, got.data(), kpad, false);
          scalar_table().matmul.lut4_t_rows_f32(w.p4.view, gy.f32.data(), n, rows, 0, rows, want.data(), kpad,
                                                false);
        }
        int bad = 0;
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < cols; ++j) {
            const size_t at = sz(i * kpad + j);
            const float g = got[at], s = want[at];
            const bool ok = std::isfinite(s) ? std::isfinite(g) && std::fabs(double(g) - ref.y[at]) <=
                                                                       exact_bound(rows, ref.p[at])
                                             : (std::isnan(s) ? std::isnan(g) : g == s);
            if (!ok && ++bad <= 5)
              ADD_FAILURE() << w.name() << " amp=" << amp << " n=" << n << " element (" << i << ", " << j
                            << ") = " << g << ", scalar " << s << ", reference " << ref.y[at];
          }
        if (HasFailure()) return;
      }
    }
}

TEST_P(Matmul, HugeAndTinyScales) {
  uint32_t seed = 901;
  for (WFormat fmt : kAllFormats)
    for (float amp : {1e30f, 1e-30f}) {
      const Weight w = make_weight(fmt, 17, 130, block_for(fmt), seed++, amp);
      int combo = 0;
      for (int64_t n : {3, 9})
        for (MatmulPath path : {MatmulPath::exact, MatmulPath::fast}) {
          RunSpec run;
          run.path = path;
          run.xdt = combo & 1 ? DType::bf16 : DType::f32;
          run.bias = combo & 2;
          ++combo;
          const uint32_t xseed = seed++;
          check_forward(kt(), w, gaussian(n * w.cols, xseed), n, run, seed);
        }
      if (HasFailure()) return;
    }
  // Scales of exactly 1e30 and 1e-30 on int8 codes (extreme codes included).
  std::mt19937 rng(17);
  const int64_t rows = 17, cols = 257;
  std::vector<int8_t> q(sz(rows * cols));
  for (int8_t& v : q) v = static_cast<int8_t>(rng());
  q[0] = -128, q[1] = 127;
  std::vector<int32_t> zp(sz(rows));
  for (int32_t& z : zp) z = static_cast<int32_t>(rng() % 256) - 128;
  for (float scale : {1e30f, 1e-30f})
    for (bool asym : {false, true}) {
      const Weight w = int8_from_codes(q, rows, cols, scale, asym ? zp : std::vector<int32_t>{});
      for (int64_t n : {3, 9})
        for (MatmulPath path : {MatmulPath::exact, MatmulPath::fast}) {
          RunSpec run;
          run.path = path;
          const uint32_t xseed = seed++;
          check_forward(kt(), w, gaussian(n * cols, xseed), n, run, seed);
        }
      if (HasFailure()) return;
    }
}

// One activation per row of 1e30 (the others Gaussian): the fast int8 path quantizes the rest to
// 0 (within half a step of 1e30 / 127), the others keep their bounds.
TEST_P(Matmul, OneHugeActivation) {
  uint32_t seed = 1001;
  for (WFormat fmt : kAllFormats) {
    const Weight w = make_weight(fmt, 17, 130, block_for(fmt), seed++);
    for (int64_t n : {3, 9})
      for (MatmulPath path : {MatmulPath::exact, MatmulPath::fast}) {
        std::vector<float> xv = gaussian(n * w.cols, seed++);
        for (int64_t i = 0; i < n; ++i) xv[sz(i * w.cols + (7 * i + 5) % w.cols)] = i % 2 ? -1e30f : 1e30f;
        RunSpec run;
        run.path = path;
        run.bias = true;
        check_forward(kt(), w, xv, n, run, seed);
      }
    if (HasFailure()) return;
  }
}

// The exact path multiplies x by the dequantized weight (matmul.h): with a tiny scale, x q may
// overflow float32 while x (q s) does not. Activations of 1e37 against scale 1e-30 and codes of
// magnitude >= 64 give products near 1e9; a kernel that sums x q first and scales last gets inf.
TEST_P(Matmul, ExactPathScalesEachWeightBeforeMultiplying) {
  const int64_t rows = 17, cols = 130, hot = 77;
  std::mt19937 rng(21);
  std::vector<int8_t> q(sz(rows * cols));
  for (int8_t& v : q) v = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
  for (int64_t r = 0; r < rows; ++r) q[sz(r * cols + hot)] = static_cast<int8_t>(r % 2 ? -100 : 64 + r);
  uint32_t seed = 1101;
  for (bool asym : {false, true}) {
    std::vector<int32_t> zp;
    if (asym) zp.assign(sz(rows), 3);
    const Weight w = int8_from_codes(q, rows, cols, 1e-30f, zp);
    for (int64_t n : {1, 3, 9}) {
      std::vector<float> xv = gaussian(n * cols, seed++);
      for (int64_t i = 0; i < n; ++i) xv[sz(i * cols + hot)] = i % 2 ? -1e37f : 1e37f;
      RunSpec run;
      run.path = MatmulPath::exact;
      check_forward(kt(), w, xv, n, run, seed);
    }
  }
  // The 4-bit formats decode (lut - zp) * scale first by construction; the same data as a check.
  for (WFormat fmt : {WFormat::nf4, WFormat::int4_asym}) {
    std::vector<float> src = gaussian(rows * cols, seed++, 1e-30f);
    const Weight w = quantize_weight(fmt, rows, cols, block_for(fmt), src);
    for (int64_t n : {1, 9}) {
      std::vector<float> xv = gaussian(n * cols, seed++);
      for (int64_t i = 0; i < n; ++i) xv[sz(i * cols + hot)] = 1e37f;
      RunSpec run;
      run.path = MatmulPath::exact;
      check_forward(kt(), w, xv, n, run, seed);
    }
  }
}

TEST_P(Matmul, EmptyBatchAndEmptyWeight) {
  const Weight w4 = make_weight(WFormat::nf4, 17, 100, 64, 1);
  const Weight w8 = make_weight(WFormat::int8_asym, 17, 100, 0, 2);
  const Weight w8s = make_weight(WFormat::int8_sym, 17, 100, 0, 3);
  for (const Weight* w : {&w4, &w8}) {
    // n = 0 with null buffers: nothing happens.
    MatmulIO io;
    io.n = 0;
    io.ldx = w->cols;
    io.ldy = w->rows;
    for (MatmulPath path : {MatmulPath::exact, MatmulPath::fast, MatmulPath::automatic})
      EXPECT_NO_THROW(call_matmul(*w, io, path, kt())) << w->name();
    MatmulIO tio;
    tio.n = 0;
    tio.ldx = w->rows;
    tio.ldy = w->cols;
    if (w->is_int8()) {
      EXPECT_NO_THROW(K::matmul_transposed(w->p8.view, tio, kt()));
      std::vector<int64_t> cols = {5};
      EXPECT_NO_THROW(K::matmul_llm_int8(w8s.p8.view, io, 6.0f, &cols, kt()));
      EXPECT_TRUE(cols.empty());
    } else {
      EXPECT_NO_THROW(K::matmul_transposed(w->p4.view, tio, kt()));
    }
    // n = 0 with real buffers: y untouched.
    const Acts x = make_acts({}, 0, w->cols, w->cols, DType::f32);
    Out y = make_out(DType::f32, 2, w->rows);
    MatmulIO io2 = make_io(x, y, nullptr);
    io2.n = 0;
    call_matmul(*w, io2, MatmulPath::fast, kt());
    expect_within(w->name() + " n=0", y, {}, {}, 0, 0);
  }
  // A weight with no rows: the forward writes nothing, the transposed product is zeros.
  const float dummy_f[1] = {1.0f};
  const int8_t dummy_q[1] = {0};
  const uint8_t dummy_b[1] = {0};
  const K::PackedInt8 e8 = K::pack_int8(dummy_q, 0, 70, dummy_f, nullptr);
  const K::PackedLut4 e4 = K::pack_lut4_bnb(dummy_b, 0, 70, 64, dummy_f, K::kCodeNF4);
  const Acts x = make_acts(gaussian(3 * 70, 3), 3, 70, 70, DType::f32);
  float y_dummy[1] = {from_bits(kSentinel32)};
  for (int t = 0; t < 2; ++t) {
    MatmulIO io;
    io.x = x.data();
    io.n = 3;
    io.ldx = 70;
    io.y = y_dummy;
    io.ldy = 0;
    EXPECT_NO_THROW(t ? K::matmul(e8.view, io, MatmulPath::fast, kt())
                      : K::matmul(e4.view, io, MatmulPath::exact, kt()));
    EXPECT_EQ(bits_of(y_dummy[0]), kSentinel32) << "rows=0 forward wrote";
    Out gx = make_out(DType::f32, 3, 70);
    MatmulIO tio;
    tio.x = dummy_f;
    tio.n = 3;
    tio.ldx = 0;
    tio.y = gx.data();
    tio.ldy = 70;
    if (t)
      K::matmul_transposed(e8.view, tio, kt());
    else
      K::matmul_transposed(e4.view, tio, kt());
    expect_exactly_bias(std::string(t ? "int8" : "nf4") + " rows=0 transposed", gx, {}, false);
  }
}

TEST(MatmulArgs, BadArgumentsNameTheArgument) {
  const Weight w4 = make_weight(WFormat::nf4, 17, 100, 64, 1);
  const Weight w8 = make_weight(WFormat::int8_sym, 17, 100, 0, 2);
  const Weight w8a = make_weight(WFormat::int8_asym, 17, 100, 0, 3);
  const Acts x = make_acts(gaussian(3 * 100, 4), 3, 100, 100, DType::f32);
  const std::vector<float> bias(17, 1.0f);
  for (const Weight* w : {&w4, &w8}) {
    auto fwd = [&](MatmulIO io) { call_matmul(*w, io, MatmulPath::automatic, K::active_kernels()); };
    auto base = [&](Out& out) { return make_io(x, out, nullptr); };
    Out y = make_out(DType::f32, 3, 17);
    {
      MatmulIO io = base(y);
      io.ldx = 99;
      expect_invalid("ldx < cols", "ldx", [&] { fwd(io); });
    }
    {
      MatmulIO io = base(y);
      io.ldy = 16;
      expect_invalid("ldy < rows", "ldy", [&] { fwd(io); });
    }
    {
      MatmulIO io = base(y);
      // f16 is accepted (converted at activation prep / output store); a value outside the enum is not.
      io.x_dtype = static_cast<DType>(7);
      expect_invalid("bad x dtype", "x_dtype", [&] { fwd(io); });
      io.x_dtype = DType::f32;
      io.y_dtype = static_cast<DType>(7);
      expect_invalid("bad y dtype", "y_dtype", [&] { fwd(io); });
    }
    {
      MatmulIO io = base(y);
      io.x = nullptr;
      expect_invalid("null x", "x", [&] { fwd(io); });
      io = base(y);
      io.y = nullptr;
      expect_invalid("null y", "y", [&] { fwd(io); });
    }
    {
      MatmulIO io = base(y);
      io.n = -1;
      expect_invalid("n < 0", "n", [&] { fwd(io); });
    }
    // The transposed product: gy [n, rows], gx [n, cols], no bias.
    const Acts gy = make_acts(gaussian(3 * 17, 5), 3, 17, 17, DType::f32);
    Out gx = make_out(DType::f32, 3, 100);
    auto bwd = [&](MatmulIO io) {
      if (w->is_int8())
        K::matmul_transposed(w->p8.view, io, K::active_kernels());
      else
        K::matmul_transposed(w->p4.view, io, K::active_kernels());
    };
    {
      MatmulIO io = make_io(gy, gx, nullptr);
      io.ldx = 16;
      expect_invalid("transposed ldx < rows", "ldx", [&] { bwd(io); });
      io = make_io(gy, gx, nullptr);
      io.ldy = 99;
      expect_invalid("transposed ldy < cols", "ldy", [&] { bwd(io); });
      io = make_io(gy, gx, bias.data());
      expect_invalid("transposed bias", "bias", [&] { bwd(io); });
      io = make_io(gy, gx, nullptr);
      io.x = nullptr;
      expect_invalid("transposed null gy", "x", [&] { bwd(io); });
    }
  }
  {
    Out y = make_out(DType::f32, 3, 17);
    MatmulIO io = make_io(x, y, nullptr);
    expect_invalid("llm_int8 asymmetric", "weight",
                   [&] { K::matmul_llm_int8(w8a.p8.view, io, 6.0f, nullptr, K::active_kernels()); });
    io.ldx = 5;
    expect_invalid("llm_int8 ldx", "ldx",
                   [&] { K::matmul_llm_int8(w8.p8.view, io, 6.0f, nullptr, K::active_kernels()); });
  }
  const uint8_t b[64] = {};
  const int8_t q[64] = {};
  const float s[64] = {1.0f};
  expect_invalid("pack_lut4_bnb cols 0", "cols", [&] { K::pack_lut4_bnb(b, 2, 0, 64, s, K::kCodeNF4); });
  expect_invalid("pack_lut4_bnb rows < 0", "rows", [&] { K::pack_lut4_bnb(b, -1, 4, 64, s, K::kCodeNF4); });
  expect_invalid("pack_lut4_bnb blocksize 0", "blocksize",
                 [&] { K::pack_lut4_bnb(b, 2, 4, 0, s, K::kCodeNF4); });
  expect_invalid("pack_int4 cols -1", "cols", [&] { K::pack_int4(b, 2, -1, 32, s, nullptr); });
  expect_invalid("pack_int4 group 0", "group", [&] { K::pack_int4(b, 2, 4, 0, s, nullptr); });
  expect_invalid("pack_int8 cols 0", "cols", [&] { K::pack_int8(q, 2, 0, s, nullptr); });
  // Hostile sizes: rows * cols wraps int64 (2^32 x 2^32 is 0 mod 2^64); refused before any write.
  const int64_t big = int64_t{1} << 32;
  expect_invalid("pack_lut4_bnb 2^32 x 2^32", "rows * cols",
                 [&] { K::pack_lut4_bnb(b, big, big, 64, s, K::kCodeNF4); });
  expect_invalid("pack_int4 2^32 x 2^32", "rows * cols", [&] { K::pack_int4(b, big, big, 32, s, nullptr); });
  expect_invalid("pack_int8 2^32 x 2^32", "rows * cols", [&] { K::pack_int8(q, big, big, s, nullptr); });
  expect_invalid("pack_int4 group 2^62", "group",
                 [&] { K::pack_int4(b, 4, 4, int64_t{1} << 62, s, nullptr); });
  // Pack into caller storage: codes must be 64-byte aligned (the SIMD kernels load whole chunks).
  {
    const K::Lut4Layout l = K::lut4_bnb_layout(2, 4, 64);
    EXPECT_EQ(l.codes_bytes, 2 * K::kLut4Chunk / 2);
    alignas(64) uint8_t codes[2 * K::kLut4Chunk / 2 + 1];
    std::vector<float> sc(static_cast<size_t>(l.stats));
    expect_invalid("pack_lut4_bnb_into misaligned", "codes",
                   [&] { K::pack_lut4_bnb_into(b, 2, 4, 64, s, K::kCodeNF4, codes + 1, sc.data()); });
    expect_invalid("pack_int8_into null", "codes",
                   [&] { K::pack_int8_into(q, 2, 4, s, nullptr, nullptr, sc.data(), nullptr, nullptr); });
    const Lut4Matrix v = K::pack_lut4_bnb_into(b, 2, 4, 64, s, K::kCodeNF4, codes, sc.data());
    const K::PackedLut4 owned = K::pack_lut4_bnb(b, 2, 4, 64, s, K::kCodeNF4);
    EXPECT_EQ(std::memcmp(v.codes, owned.view.codes, static_cast<size_t>(l.codes_bytes)), 0);
    EXPECT_EQ(v.scale, sc.data());
  }
}

INSTANTIATE_TEST_SUITE_P(AllIsas, Matmul, testing::ValuesIn(all_isas()), isa_param_name);

}  // namespace
}  // namespace msbnb::test

namespace msbnb::test {
namespace {

// Double-quantized statistics (Lut4NestedScale) give the same outputs, bit for bit, as the same
// weight with the statistics decoded to float beforehand (what bitsandbytes' dequantize gives:
// code[q] * nested, then + offset), on every path and in the transposed product, for tiles and
// thread splits (600 rows of 256 / 32 statistics: two tiles) and for blocks straddling rows.
TEST_P(Matmul, DoubleQuantMatchesDecodedScale) {
  struct Shape {
    int64_t rows, cols, block;
  };
  uint32_t seed = 91;
  for (const Shape s : {Shape{70, 4096, 64}, Shape{33, 640, 128}, Shape{600, 256, 32}, Shape{17, 100, 64}}) {
    const int64_t elems = s.rows * s.cols, blocks = K::ceil_div(elems, s.block);
    std::vector<uint8_t> packed(static_cast<size_t>((elems + 1) / 2)), q(static_cast<size_t>(blocks));
    std::mt19937 rng(seed++);
    for (auto& b : packed) b = static_cast<uint8_t>(rng());
    for (auto& b : q) b = static_cast<uint8_t>(rng());
    const std::vector<float> code256 = gaussian(256, seed++),
                             nested = gaussian(K::ceil_div(blocks, 256), seed++);
    const float offset = 0.37f;
    const K::PackedLut4 dq = K::pack_lut4_bnb_nested(packed.data(), s.rows, s.cols, s.block, q.data(),
                                                     code256.data(), nested.data(), 256, offset, K::kCodeNF4);
    ASSERT_EQ(dq.view.scale, nullptr);
    std::vector<float> absmax(static_cast<size_t>(blocks));
    for (int64_t b = 0; b < blocks; ++b) {
      // Two roundings, as bitsandbytes: volatile keeps the compiler from fusing them into an FMA
      // (g++ contracts across statements by default in C++, e.g. for aarch64).
      volatile float p = code256[q[b]] * nested[b / 256];
      absmax[b] = p + offset;
    }
    const K::PackedLut4 ref =
        K::pack_lut4_bnb(packed.data(), s.rows, s.cols, s.block, absmax.data(), K::kCodeNF4);
    EXPECT_EQ(dq.bytes(), ref.bytes() - int64_t(ref.scale.size()) * 4 + blocks +
                              4 * (256 + K::ceil_div(blocks, 256) + 1));
    for (int threads : {1, 3}) {
      ThreadScope ts(threads);
      for (int64_t n : {1, 3, 9, 33})
        for (MatmulPath path : {MatmulPath::exact, MatmulPath::fast, MatmulPath::int8}) {
          const std::vector<float> x = gaussian(n * s.cols, seed++);
          std::vector<float> y1(static_cast<size_t>(n * s.rows)), y2(y1.size());
          MatmulIO io;
          io.x = x.data();
          io.n = n;
          io.ldx = s.cols;
          io.y = y1.data();
          io.ldy = s.rows;
          K::matmul(dq.view, io, path, kt());
          io.y = y2.data();
          K::matmul(ref.view, io, path, kt());
          for (size_t i = 0; i < y1.size(); ++i)
            ASSERT_EQ(bits_of(y1[i]), bits_of(y2[i]))
                << s.rows << "x" << s.cols << " n " << n << " threads " << threads << " at " << i;
        }
      const int64_t n = 5;
      const std::vector<float> gy = gaussian(n * s.rows, seed++);
      std::vector<float> g1(static_cast<size_t>(n * s.cols)), g2(g1.size());
      MatmulIO io;
      io.x = gy.data();
      io.n = n;
      io.ldx = s.rows;
      io.y = g1.data();
      io.ldy = s.cols;
      K::matmul_transposed(dq.view, io, kt());
      io.y = g2.data();
      K::matmul_transposed(ref.view, io, kt());
      for (size_t i = 0; i < g1.size(); ++i)
        ASSERT_EQ(bits_of(g1[i]), bits_of(g2[i])) << "transposed at " << i;
    }
  }
}

// Hand-built nested statistics that do not match the weight are refused, naming the field.
TEST(MatmulArgs, BadNestedScale) {
  std::vector<uint8_t> packed(17 * 128 / 2), q(34);
  std::vector<float> code(256), nested(1), absmax(34, 1.0f);
  const float offset = 0.0f;
  const K::PackedLut4 p = K::pack_lut4_bnb(packed.data(), 17, 128, 64, absmax.data(), K::kCodeNF4);
  K::Lut4NestedScale n;
  n.q = q.data();
  n.code = code.data();
  n.nested = nested.data();
  n.offset = &offset;
  n.block = 256;
  n.count = 34;
  EXPECT_NO_THROW(K::with_nested_scale(p.view, n));
  auto bad = [&](const char* word, auto edit) {
    K::Lut4NestedScale b = n;
    edit(b);
    expect_invalid(word, word, [&] { K::with_nested_scale(p.view, b); });
  };
  bad("nested.count", [](K::Lut4NestedScale& b) { b.count = 33; });
  bad("nested.count", [](K::Lut4NestedScale& b) { b.count = int64_t{1} << 62; });
  bad("nested.block", [](K::Lut4NestedScale& b) { b.block = 0; });
  bad("nested.code", [](K::Lut4NestedScale& b) { b.code = nullptr; });
  bad("nested.offset", [](K::Lut4NestedScale& b) { b.offset = nullptr; });
  bad("scale", [](K::Lut4NestedScale& b) { b.q = nullptr; });
  expect_invalid("nested_block", "nested_block", [&] {
    K::pack_lut4_bnb_nested(packed.data(), 17, 128, 64, q.data(), code.data(), nested.data(), 0, 0.0f,
                            K::kCodeNF4);
  });
}

// ---- 5. MatmulPath::int8 for 4-bit weights -------------------------------------------------------
//
// GEMV (n <= kGemvMaxRows; kernels.def lut4_q8). Block a of an activation row has m = max |x|,
// d = fl(m / 127), q = rne(x fl(127 / m)), so |q d - x| <= m / 254 (1 + u) + 3.0001 u |x| (the
// fast int8 path's argument). The weight is taken as w^ = (T - zp) f s, T and f the int8 table
// (integral tables as they are, f = 1; nf4 / fp4, max |lut| = 1: T = rne(127 lut), f = 1 / 127),
// and the test adds the exact |w^ - w| of every weight. Rounding: each block's int32 sum is
// exact; times sc = fl(s fl(f d)) (the same two roundings in the test's ideal value) and summed
// in float, every term sees at most nb + 8 roundings (nb blocks, the lane tree, the zero-point
// term, the last add) of lane values bounded by sum_j (T_j + 128) |q_j| + 128 |sum q| (AVX-512
// adds 128 to T and takes it out per block; AVX2 multiplies signed values, which is less).
// Against sum_j q d w^ the rounding of sc adds 3u sum |q d w^|.
// GEMM (more rows, or layouts without a GEMV; lut4_i8): activations per row as the fast int8
// path, weights requantized per row: |w8 ws - w| <= m_r / 254 (1 + u) + 3.0001 u |w| with
// m_r = max_j |w_rj|; y = fl(acc) fl(fl(a fl(1/127)) ws): 6u of |acc| a ws / 127.

struct Q8Expect {
  std::vector<double> ideal, round_tol, total_tol;
};

// The int8 table a test expects for w (see above).
void q8_table_of(const Weight& w, int8_t (&t)[16], float& f) {
  const bool lut = w.fmt == WFormat::nf4 || w.fmt == WFormat::fp4;
  for (int i = 0; i < 16; ++i)
    t[i] = static_cast<int8_t>(lut ? std::nearbyint(w.p4.view.lut[i] * 127.0f) : w.p4.view.lut[i]);
  f = lut ? 1.0f / 127.0f : 1.0f;
}

// Row i of x quantized in blocks of bs (the definition in matmul.h's Lut4Q8Rows).
struct Q8Row {
  std::vector<int32_t> q;
  std::vector<float> d, m;
  std::vector<int64_t> sum;
};
Q8Row q8_quantize(const Acts& x, int64_t i, int64_t kpad, int64_t bs) {
  Q8Row o;
  o.q.assign(sz(kpad), 0);
  for (int64_t a = 0; a < kpad / bs; ++a) {
    float m = 0.0f;
    for (int64_t j = a * bs; j < (a + 1) * bs && j < x.cols; ++j) {
      const float v = x.at(i, j);
      if (std::isnan(v) || std::isnan(m))
        m = std::numeric_limits<float>::quiet_NaN();
      else
        m = std::max(m, std::fabs(v));
    }
    o.m.push_back(m);
    o.d.push_back(m / 127.0f);
    int64_t s = 0;
    if (m > 0.0f && std::isfinite(m)) {
      const float inv = 127.0f / m;
      for (int64_t j = a * bs; j < (a + 1) * bs && j < x.cols; ++j) {
        const double v = std::isfinite(inv) ? double(x.at(i, j) * inv) : double(x.at(i, j)) * (127.0 / m);
        o.q[sz(j)] = static_cast<int32_t>(std::nearbyint(v));
        s += o.q[sz(j)];
      }
    }
    o.sum.push_back(s);
  }
  return o;
}

Q8Expect q8_expect(const Weight& w, const Acts& x, int64_t ld) {
  const Lut4Matrix& v = w.p4.view;
  const int64_t bs = K::q8_block(v), nb = v.kpad / bs;
  int8_t t[16];
  float f;
  q8_table_of(w, t, f);
  Q8Expect e;
  e.ideal.assign(sz(x.n * ld), 0.0);
  e.round_tol = e.total_tol = e.ideal;
  for (int64_t i = 0; i < x.n; ++i) {
    const Q8Row xq = q8_quantize(x, i, v.kpad, bs);
    for (int64_t r = 0; r < w.rows; ++r) {
      const uint8_t* codes = v.codes + r * (v.kpad / 2);
      double ideal = 0.0, mag = 0.0, quant = 0.0, prod = 0.0;
      for (int64_t a = 0; a < nb && a * bs < v.row_stride; ++a) {
        const int64_t seg = (r * v.row_stride + a * bs) / v.group;
        const float s = v.scale[seg], zp = v.zero_point ? v.zero_point[seg] : 0.0f;
        const float sc = s * (f * xq.d[sz(a)]);
        int64_t dot = 0, lanes = 0;
        double qw = 0.0;
        for (int64_t j = a * bs; j < (a + 1) * bs; ++j) {
          const int idx = K::lut4_index(codes, j);
          const int64_t q = xq.q[sz(j)];
          dot += int64_t{t[idx]} * q;
          lanes += (int64_t{t[idx]} + 128) * std::llabs(q);
          qw += std::fabs(double(t[idx]) - zp) * std::llabs(q);
          if (j >= w.cols) continue;
          const double xv = x.at(i, j), wv = w.deq[sz(r * w.cols + j)];
          const double what = (double(t[idx]) - zp) * f * s;
          quant += (xq.m[sz(a)] / 254.0 * (1 + kU) + 3.0001 * kU * std::fabs(xv)) * std::fabs(what) +
                   std::fabs(xv) * std::fabs(what - wv);
        }
        const double sum = double(xq.sum[sz(a)]);
        ideal += double(sc) * (double(dot) - double(zp) * sum);
        mag += std::fabs(sc) * (double(lanes) + 128 * std::fabs(sum) + std::fabs(zp * sum));
        prod += std::fabs(sc) * qw;
      }
      const size_t at = sz(i * ld + r);
      e.ideal[at] = ideal;
      e.round_tol[at] = (double(nb) + 8) * (kU * mag + kDenorm) + kU * std::fabs(ideal);
      e.total_tol[at] = quant + e.round_tol[at] + 3 * kU * prod;
    }
  }
  return e;
}

// The GEMM's bound against the exact product (see above), no bias.
std::vector<double> i8_gemm_bound(const Weight& w, const Acts& x, int64_t ld) {
  std::vector<double> tol(sz(x.n * ld), 0.0), wm(sz(w.rows), 0.0);
  for (int64_t r = 0; r < w.rows; ++r)
    for (int64_t j = 0; j < w.cols; ++j)
      wm[sz(r)] = std::max<double>(wm[sz(r)], std::fabs(w.deq[sz(r * w.cols + j)]));
  for (int64_t i = 0; i < x.n; ++i) {
    double a = 0.0;
    for (int64_t j = 0; j < w.cols; ++j) a = std::max<double>(a, std::fabs(x.at(i, j)));
    for (int64_t r = 0; r < w.rows; ++r) {
      double b = 0.0, p = 0.0;
      for (int64_t j = 0; j < w.cols; ++j) {
        const double xv = std::fabs(x.at(i, j)), wv = std::fabs(w.deq[sz(r * w.cols + j)]);
        const double ex = a / 254 * (1 + kU) + 3.0001 * kU * xv,
                     ew = wm[sz(r)] / 254 * (1 + kU) + 3.0001 * kU * wv;
        b += ex * (wv + ew) + xv * ew;
        p += (xv + ex) * (wv + ew);
      }
      tol[sz(i * ld + r)] = b + 6 * kU * p + (double(w.cols) + 4) * kDenorm;
    }
  }
  return tol;
}

const WCase kQ8Cases[] = {
    {WFormat::nf4, 67, 640, 64},        {WFormat::nf4, 33, 384, 128},      {WFormat::fp4, 17, 256, 64},
    {WFormat::int4_sym, 29, 300, 128},  {WFormat::int4_asym, 19, 200, 64}, {WFormat::int4_sym, 21, 512, 256},
    {WFormat::int4_asym, 23, 448, 192}, {WFormat::nf4, 17, 100, 64},       {WFormat::int4_sym, 13, 130, 24},
};

// quantize_row_q8 bit for bit against the scalar reference, and against the definition.
TEST_P(Matmul, Int8PathQuantizeRowMatchesReference) {
  uint32_t seed = 501;
  for (int64_t bs : {64, 128})
    for (int64_t kpad : {128, 256, 640}) {
      const int64_t nb = kpad / bs, pitch = kpad;
      for (int fill = 0; fill < 6; ++fill) {
        std::vector<float> x = gaussian(kpad, seed++, fill == 1 ? 1e30f : fill == 2 ? 1e-30f : 1.0f);
        if (fill == 3) std::fill(x.begin(), x.begin() + bs, 0.0f);  // a zero block
        if (fill == 4) x[sz((bs + 3) % kpad)] = std::numeric_limits<float>::quiet_NaN();
        if (fill == 5) x[sz(kpad - 1)] = -std::numeric_limits<float>::infinity();
        if (fill == 2) x[0] = 1e-38f, std::fill(x.begin() + 1, x.begin() + bs, 0.0f);  // 127 / m overflows
        std::vector<int8_t> q1(sz(pitch), 99), q2(sz(pitch), 98);
        std::vector<float> d1(sz(nb)), d2(sz(nb));
        std::vector<int32_t> s1(sz(nb)), s2(sz(nb));
        scalar_table().matmul.quantize_row_q8(x.data(), kpad, bs, q1.data(), d1.data(), s1.data());
        kt().matmul.quantize_row_q8(x.data(), kpad, bs, q2.data(), d2.data(), s2.data());
        const std::string ctx =
            "block " + std::to_string(bs) + " kpad " + std::to_string(kpad) + " fill " + std::to_string(fill);
        EXPECT_EQ(q1, q2) << ctx;
        EXPECT_EQ(s1, s2) << ctx;
        for (int64_t a = 0; a < nb; ++a)
          EXPECT_TRUE(bits_of(d1[sz(a)]) == bits_of(d2[sz(a)]) ||
                      (std::isnan(d1[sz(a)]) && std::isnan(d2[sz(a)])))
              << ctx << " d[" << a << "] " << d1[sz(a)] << " vs " << d2[sz(a)];
        // The definition, column by column (the layout of matmul.h).
        const Acts xa = make_acts(x, 1, kpad, kpad, DType::f32);
        const Q8Row ref = q8_quantize(xa, 0, kpad, bs);
        for (int64_t j = 0; j < kpad; ++j) {
          const int64_t c = j / 128, e = j % 128, sblk = e / 32, h = (e % 32) / 16, tt = e % 16;
          // Blocks of 64: each 16-byte lane reordered so that an int32 lane holds one block's bytes.
          const int64_t pair[16] = {0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15};
          const int64_t at = bs == 128 ? c * 128 + 64 * h + 4 * tt + sblk
                                       : c * 128 + 64 * h + 16 * (tt / 4) + pair[4 * (tt % 4) + sblk];
          ASSERT_EQ(int32_t{q2[sz(at)]}, ref.q[sz(j)]) << ctx << " column " << j;
        }
        for (int64_t a = 0; a < nb; ++a)
          EXPECT_EQ(int64_t{s2[sz(a)]}, ref.sum[sz(a)]) << ctx << " block " << a;
        // Every byte holds one column: as many nonzero bytes as nonzero codes.
        int64_t nonzero = 0;
        for (int8_t b : q2) nonzero += b != 0;
        int64_t expect = 0;
        for (int32_t v : ref.q) expect += v != 0;
        EXPECT_EQ(nonzero, expect) << ctx;
      }
    }
}

// The raw lut4_q8 entry against its definition, over row ranges and every n <= kGemvMaxRows.
TEST_P(Matmul, Int8PathGemvMatchesDefinition) {
  if (!kt().matmul.lut4_q8) GTEST_SKIP() << "no lut4_q8 entry";
  uint32_t seed = 601;
  for (const WCase& wc : kQ8Cases) {
    const Weight w = make_weight(wc.fmt, wc.rows, wc.cols, wc.block, seed++);
    const Lut4Matrix& v = w.p4.view;
    const int64_t bs = K::q8_block(v);
    if (bs == 0) continue;
    const int64_t kpad = v.kpad, ldy = w.rows + 3;
    for (int64_t n : {1, 2, 3, 5, 8}) {
      std::vector<float> xv = gaussian(n * w.cols, seed++);
      if (n > 2) std::fill(xv.begin() + w.cols, xv.begin() + 2 * w.cols, 0.0f);  // a zero row
      const Acts x = make_acts(xv, n, w.cols, w.cols, DType::f32);
      K::Lut4Q8Rows xq;
      xq.n = n;
      xq.block = bs;
      xq.kpad = kpad;
      std::vector<int8_t> q(sz(n * xq.pitch()));
      std::vector<float> d(sz(n * xq.blocks())), xpad(sz(kpad));
      std::vector<int32_t> sum(sz(n * xq.blocks()));
      for (int64_t i = 0; i < n; ++i) {
        std::fill(xpad.begin(), xpad.end(), 0.0f);
        std::copy(xv.begin() + i * w.cols, xv.begin() + (i + 1) * w.cols, xpad.begin());
        kt().matmul.quantize_row_q8(xpad.data(), kpad, bs, q.data() + i * xq.pitch(),
                                    d.data() + i * xq.blocks(), sum.data() + i * xq.blocks());
      }
      xq.q = q.data();
      xq.d = d.data();
      xq.sum = sum.data();
      const Q8Expect e = q8_expect(w, x, ldy);
      for (auto [r0, r1] : {std::pair<int64_t, int64_t>{0, w.rows}, {1, 2}, {w.rows - 5, w.rows}}) {
        Out y = make_out(DType::f32, n, ldy);
        kt().matmul.lut4_q8(v, xq, r0, r1, y.f32.data(), ldy);
        std::ostringstream ctx;
        ctx << w.name() << " n=" << n << " rows [" << r0 << ", " << r1 << ") lut4_q8";
        expect_within(ctx.str(), y, e.ideal, e.round_tol, r0, r1);
        if (HasFailure()) return;
      }
    }
  }
}

// The driver's int8 path against the exact product: GEMV and GEMM, odd shapes, tiny and huge
// activations, layouts without a GEMV; lut4_i8 bit for bit against the scalar reference.
TEST_P(Matmul, Int8PathErrorBound) {
  uint32_t seed = 701;
  for (const WCase& wc : kQ8Cases) {
    const Weight w = make_weight(wc.fmt, wc.rows, wc.cols, wc.block, seed++);
    const bool gemv_layout = K::q8_block(w.p4.view) > 0;
    for (int64_t n : {1, 3, 8, 9, 33})
      for (float amp : {1.0f, 1e-30f, 1e30f}) {
        const Acts x = make_acts(gaussian(n * w.cols, seed++, amp), n, w.cols, w.cols + 1, DType::f32);
        const DotRef ref = forward_ref(x, w.deq, w.rows, w.cols, w.rows);
        Out y = make_out(DType::f32, n, w.rows);
        call_matmul(w, make_io(x, y, nullptr), MatmulPath::int8, kt());
        const bool gemv = gemv_layout && n <= K::kGemvMaxRows;
        const std::vector<double> tol =
            gemv ? q8_expect(w, x, w.rows).total_tol : i8_gemm_bound(w, x, w.rows);
        std::ostringstream ctx;
        ctx << w.name() << " n=" << n << " amp=" << amp << (gemv ? " int8 GEMV" : " int8 GEMM");
        expect_within(ctx.str(), y, ref.y, tol, 0, w.rows);
        if (HasFailure()) return;
      }
    // lut4_i8 against the scalar reference, bit for bit (acc and the row scales).
    if (!kt().matmul.lut4_i8) continue;
    const int64_t kpad = w.p4.view.kpad, n = 6;
    std::vector<uint8_t> xu(sz(n * kpad));
    std::mt19937 rng(seed++);
    for (uint8_t& b : xu) b = static_cast<uint8_t>(1 + rng() % 255);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = w.cols; j < kpad; ++j) xu[sz(i * kpad + j)] = 128;
    std::vector<int32_t> a1(sz(n * w.rows), 7), a2 = a1;
    std::vector<float> s1(sz(w.rows), 7.0f), s2 = s1;
    scalar_table().matmul.lut4_i8(w.p4.view, xu.data(), n, kpad, 0, w.rows, a1.data(), w.rows, s1.data());
    kt().matmul.lut4_i8(w.p4.view, xu.data(), n, kpad, 0, w.rows, a2.data(), w.rows, s2.data());
    EXPECT_EQ(a1, a2) << w.name() << " lut4_i8 acc";
    for (int64_t r = 0; r < w.rows; ++r)
      EXPECT_EQ(bits_of(s1[sz(r)]), bits_of(s2[sz(r)])) << w.name() << " wscale " << r;
  }
}

// NaN or Inf in an activation row: that row's outputs are NaN (Inf: not finite) on the int8 path
// (GEMV and GEMM), the other rows exactly as without it.
TEST_P(Matmul, Int8PathNonFiniteActivations) {
  const Weight w = make_weight(WFormat::nf4, 37, 512, 64, 801);
  for (int64_t n : {4, 12}) {
    std::vector<float> xv = gaussian(n * w.cols, 802);
    std::vector<float> bad = xv;
    bad[sz(1 * w.cols + 77)] = std::numeric_limits<float>::quiet_NaN();
    bad[sz(2 * w.cols + 300)] = std::numeric_limits<float>::infinity();
    Out y0 = make_out(DType::f32, n, w.rows), y1 = make_out(DType::f32, n, w.rows);
    call_matmul(w, make_io(make_acts(xv, n, w.cols, w.cols, DType::f32), y0, nullptr), MatmulPath::int8,
                kt());
    call_matmul(w, make_io(make_acts(bad, n, w.cols, w.cols, DType::f32), y1, nullptr), MatmulPath::int8,
                kt());
    for (int64_t i = 0; i < n; ++i)
      for (int64_t r = 0; r < w.rows; ++r) {
        if (i == 1)
          ASSERT_TRUE(std::isnan(y1.at(i, r)))
              << "n=" << n << " row " << i << " col " << r << ": " << y1.at(i, r);
        else if (i == 2)  // NaN from the int8 kernels, +-Inf or NaN where the exact GEMM runs instead
          ASSERT_FALSE(std::isfinite(y1.at(i, r)))
              << "n=" << n << " row " << i << " col " << r << ": " << y1.at(i, r);
        else
          ASSERT_EQ(y0.raw(i, r), y1.raw(i, r)) << "n=" << n << " row " << i << " col " << r;
      }
  }
}

}  // namespace
}  // namespace msbnb::test
