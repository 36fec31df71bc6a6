// Numerics of the kernels that must not surprise, on every ISA of isa.def: the automatic path
// keeps one class of error for every batch size; NaN / Inf in activations reach the outputs on
// every path; denormal activations stay within each path's documented bound; the int8 product
// is exact up to k = 2^20; padding columns decode to 0 whatever the neighbouring statistics; a
// blockwise 8-bit block of denormals is no worse than bitsandbytes' arithmetic.
//
// Bounds (docs/matmul.md "Paths"; u = 2^-24, P = sum_j |x_j w_j|):
//   exact      (k + 4) u P + (k + 4) 2^-149 (summation order, gradual underflow).
//   fast 4-bit (2^-7 + 2^-15 + (k + 4) u) P + (k + 4) 2^-126 (bf16 operands; VDPBF16PS flushes
//              denormals).
//   fast int8  s sum |q| (a / 254 + 3 u |x|) (1 + 1e-6) + (k + 8) u (a s sum |q| + |o s| sum |x|)
//              + (k + 8) 2^-149, a = the row absmax (matmul_test.cpp "Tolerances").
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "msbnb/kernels/formats.h"
#include "msbnb/kernels/kernel_table.h"
#include "msbnb/kernels/matmul.h"
#include "msbnb/kernels/ops.h"
#include "test_util.h"

namespace msbnb::test {
namespace {

namespace K = kernels;
using K::MatmulIO;
using K::MatmulPath;

constexpr double kU = 0x1p-24;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

size_t sz(int64_t v) { return static_cast<size_t>(v); }

std::vector<float> gaussian(int64_t n, uint32_t seed, float sigma = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, sigma);
  std::vector<float> v(sz(n));
  for (float& x : v) x = d(rng);
  return v;
}

enum class WKind { nf4, int4_sym, int8_sym, int8_asym };
const char* kind_name(WKind k) {
  static const char* names[] = {"nf4", "int4_sym", "int8_sym", "int8_asym"};
  return names[static_cast<int>(k)];
}

// A packed weight and its exact dequantized values (double).
struct TestWeight {
  WKind kind;
  int64_t rows = 0, cols = 0;
  K::PackedLut4 p4;
  K::PackedInt8 p8;
  std::vector<double> deq;    // [rows, cols]
  std::vector<int> q8;        // int8 codes
  std::vector<float> s8, o8;  // int8 scale / offset
  bool is_int8() const { return kind == WKind::int8_sym || kind == WKind::int8_asym; }
};

TestWeight make_weight(WKind kind, int64_t rows, int64_t cols, int64_t block, uint32_t seed,
                       std::vector<float>* stats = nullptr) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> nib(0, 15), byte(-128, 127);
  std::uniform_real_distribution<float> pos(0.5f, 2.0f);
  TestWeight w;
  w.kind = kind;
  w.rows = rows;
  w.cols = cols;
  w.deq.resize(sz(rows * cols));
  if (kind == WKind::nf4) {
    const int64_t n = rows * cols, blocks = K::ceil_div(n, block);
    std::vector<uint8_t> packed(sz((n + 1) / 2));
    for (uint8_t& b : packed) b = static_cast<uint8_t>(nib(rng) << 4 | nib(rng));
    std::vector<float> absmax(sz(blocks));
    for (float& a : absmax) a = pos(rng);
    if (stats) {  // the caller's statistics (edge values), where given
      for (size_t i = 0; i < stats->size() && i < absmax.size(); ++i) absmax[i] = (*stats)[i];
    }
    w.p4 = K::pack_lut4_bnb(packed.data(), rows, cols, block, absmax.data(), K::kCodeNF4);
    for (int64_t f = 0; f < n; ++f) {
      const int idx = f % 2 == 0 ? packed[sz(f / 2)] >> 4 : packed[sz(f / 2)] & 0xf;
      w.deq[sz(f)] = double(K::kCodeNF4[idx] * absmax[sz(f / block)]);
    }
  } else if (kind == WKind::int4_sym) {
    const int64_t groups = K::ceil_div(cols, block), rb = (cols + 1) / 2;
    std::vector<uint8_t> packed(sz(rows * rb));
    for (uint8_t& b : packed) b = static_cast<uint8_t>(nib(rng) << 4 | nib(rng));
    for (int64_t r = 0; r < rows; ++r)
      if (cols % 2) packed[sz(r * rb + rb - 1)] &= 0x0f;
    std::vector<float> scale(sz(rows * groups));
    for (float& s : scale) s = pos(rng) / 8;
    if (stats)
      for (size_t i = 0; i < stats->size() && i < scale.size(); ++i) scale[i] = (*stats)[i];
    w.p4 = K::pack_int4(packed.data(), rows, cols, block, scale.data(), nullptr);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) {
        const uint8_t b = packed[sz(r * rb + j / 2)];
        const int q = (((j % 2 == 0 ? b : b >> 4) & 0xf) ^ 8) - 8;
        w.deq[sz(r * cols + j)] = double(static_cast<float>(q) * scale[sz(r * groups + j / block)]);
      }
  } else {
    w.q8.resize(sz(rows * cols));
    std::vector<int8_t> q(sz(rows * cols));
    for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<int8_t>(w.q8[i] = byte(rng));
    w.s8.resize(sz(rows));
    for (float& s : w.s8) s = pos(rng) / 127;
    if (kind == WKind::int8_asym) {
      w.o8.resize(sz(rows));
      for (float& o : w.o8) o = static_cast<float>(byte(rng) / 4);
    }
    w.p8 = K::pack_int8(q.data(), rows, cols, w.s8.data(), w.o8.empty() ? nullptr : w.o8.data());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) {
        const float off = w.o8.empty() ? 0.0f : w.o8[sz(r)];
        w.deq[sz(r * cols + j)] = double((static_cast<float>(q[sz(r * cols + j)]) + off) * w.s8[sz(r)]);
      }
  }
  return w;
}

MatmulIO io_for(const std::vector<float>& x, int64_t n, int64_t cols, std::vector<float>& y, int64_t rows) {
  MatmulIO io;
  io.x = x.data();
  io.n = n;
  io.ldx = cols;
  io.y = y.data();
  io.ldy = rows;
  return io;
}

// Runs a path: exact / fast / automatic, or LLM.int8() with `threshold` (llm = true).
struct PathRun {
  MatmulPath path = MatmulPath::automatic;
  bool llm = false;
  float threshold = 0.0f;
  std::string name() const {
    if (llm) return "llm_int8(t=" + std::to_string(threshold) + ")";
    return path == MatmulPath::exact ? "exact" : path == MatmulPath::fast ? "fast" : "automatic";
  }
};

std::vector<float> run_matmul(const TestWeight& w, const std::vector<float>& x, int64_t n, const PathRun& run,
                              const K::KernelTable& kt) {
  std::vector<float> y(sz(n * w.rows), -12345.0f);
  const MatmulIO io = io_for(x, n, w.cols, y, w.rows);
  if (run.llm)
    K::matmul_llm_int8(w.p8.view, io, run.threshold, nullptr, kt);
  else if (w.is_int8())
    K::matmul(w.p8.view, io, run.path, kt);
  else
    K::matmul(w.p4.view, io, run.path, kt);
  return y;
}

// |y - ref| within the documented bound of the path the run takes, per element.
void expect_within_bound(const std::string& ctx, const TestWeight& w, const std::vector<float>& x, int64_t n,
                         const std::vector<float>& y, MatmulPath path, bool int8_acts) {
  const double k = double(w.cols);
  for (int64_t i = 0; i < n; ++i) {
    double a = 0.0, xabs = 0.0;
    for (int64_t j = 0; j < w.cols; ++j) {
      a = std::max(a, double(std::fabs(x[sz(i * w.cols + j)])));
      xabs += std::fabs(x[sz(i * w.cols + j)]);
    }
    for (int64_t r = 0; r < w.rows; ++r) {
      double ref = 0.0, p = 0.0;
      for (int64_t j = 0; j < w.cols; ++j) {
        const double t = double(x[sz(i * w.cols + j)]) * w.deq[sz(r * w.cols + j)];
        ref += t;
        p += std::fabs(t);
      }
      double tol;
      if (int8_acts) {
        const double s = w.s8[sz(r)], o = w.o8.empty() ? 0.0 : w.o8[sz(r)];
        double q_abs = 0.0, qx = 0.0;
        for (int64_t j = 0; j < w.cols; ++j) {
          const double qs = std::abs(w.q8[sz(r * w.cols + j)]) * s;
          q_abs += qs;
          qx += qs * std::fabs(x[sz(i * w.cols + j)]);
        }
        tol = (q_abs * a / 254 + 3 * kU * qx) * (1 + 1e-6) +
              (k + 8) * kU * (a * q_abs + std::fabs(o * s) * xabs) + (k + 8) * 0x1p-149;
      } else if (path == MatmulPath::fast && n > K::kGemvMaxRows) {
        tol = (0x1p-7 + 0x1p-15 + (k + 4) * kU) * p + (k + 4) * 0x1p-126;
      } else {
        tol = (k + 4) * kU * p + (k + 4) * 0x1p-149;
      }
      const double got = y[sz(i * w.rows + r)];
      ASSERT_TRUE(std::fabs(got - ref) <= tol)
          << ctx << " row " << i << " out " << r << ": got " << got << ", want " << ref << " +- " << tol;
    }
  }
}

class Numerics : public testing::TestWithParam<Isa> {
 protected:
  void SetUp() override { MSBNB_SKIP_IF_UNSUPPORTED(GetParam()); }
  const K::KernelTable& kt() const { return K::kernels_for(GetParam()); }
};

// ---- automatic: one class of error for every batch size ------------------------------------------

// Rows with an LLM outlier feature (one column 60x the others) are where int8 activations without
// outlier handling lose 10-15 %: automatic must stay within the exact path's bound at every n,
// for every format (also across n = kGemvMaxRows -> kGemvMaxRows + 1, where it used to switch).
TEST_P(Numerics, AutomaticIsExactForEveryBatchSize) {
  for (WKind kind : {WKind::nf4, WKind::int4_sym, WKind::int8_sym, WKind::int8_asym}) {
    const TestWeight w = make_weight(kind, 20, 256, 64, 7);
    for (int64_t n : {int64_t{1}, K::kGemvMaxRows, K::kGemvMaxRows + 1, int64_t{33}}) {
      std::vector<float> x = gaussian(n * w.cols, 11);
      for (int64_t i = 0; i < n; ++i) x[sz(i * w.cols + 7)] = 60.0f;  // the outlier feature
      EXPECT_EQ(K::resolve_path(MatmulPath::automatic, n), MatmulPath::exact);
      const std::vector<float> y = run_matmul(w, x, n, PathRun{}, kt());
      expect_within_bound(std::string(kind_name(kind)) + " automatic n=" + std::to_string(n), w, x, n, y,
                          MatmulPath::exact, false);
      // LLM.int8() with a threshold takes the outlier feature out: within the int8 bound of the
      // remaining columns (the outlier column is exact fp32), far below the plain int8 error.
      if (kind == WKind::int8_sym) {
        const std::vector<float> yl = run_matmul(w, x, n, PathRun{MatmulPath::automatic, true, 6.0f}, kt());
        std::vector<float> xin = x;
        for (int64_t i = 0; i < n; ++i) xin[sz(i * w.cols + 7)] = 0.0f;
        for (int64_t i = 0; i < n; ++i)
          for (int64_t r = 0; r < w.rows; ++r) {
            double ref = 0.0, q_abs = 0.0, a = 0.0;
            for (int64_t j = 0; j < w.cols; ++j) {
              ref += double(x[sz(i * w.cols + j)]) * w.deq[sz(r * w.cols + j)];
              q_abs += std::abs(w.q8[sz(r * w.cols + j)]) * double(w.s8[sz(r)]);
              a = std::max(a, double(std::fabs(xin[sz(i * w.cols + j)])));
            }
            const double tol = q_abs * a / 254 * (1 + 1e-6) + (w.cols + 8) * kU * (a * q_abs + 60 * q_abs);
            ASSERT_NEAR(yl[sz(i * w.rows + r)], ref, tol)
                << "llm_int8 n=" << n << " row " << i << " out " << r;
          }
      }
    }
  }
}

// ---- NaN / Inf / denormal activations ------------------------------------------------------------

// Row 0 holds a NaN, row 1 a +Inf, row 2 a -Inf, the other rows are finite: as in fp32, row 0's
// outputs are all NaN and rows 1-2 are all non-finite, on every path, with and without a
// threshold (the NaN is no outlier: it stays in its row, as in bitsandbytes), GEMV and GEMM.
TEST_P(Numerics, NonFiniteActivationsPropagate) {
  for (WKind kind : {WKind::nf4, WKind::int4_sym, WKind::int8_sym, WKind::int8_asym}) {
    const TestWeight w = make_weight(kind, 19, 200, 40, 3);
    std::vector<PathRun> runs = {{MatmulPath::exact}, {MatmulPath::fast}, {MatmulPath::automatic}};
    if (kind == WKind::int8_sym)
      for (float t : {0.0f, 3.0f, 1e30f}) runs.push_back({MatmulPath::automatic, true, t});
    for (int64_t n : {int64_t{3}, int64_t{4}, int64_t{12}})
      for (const PathRun& run : runs) {
        std::vector<float> x = gaussian(n * w.cols, 5);
        x[sz(0 * w.cols + 17)] = kNaN;
        x[sz(1 * w.cols + 33)] = kInf;
        x[sz(2 * w.cols + 150)] = -kInf;
        const std::vector<float> y = run_matmul(w, x, n, run, kt());
        const std::string ctx = std::string(kind_name(kind)) + " " + run.name() + " n=" + std::to_string(n);
        for (int64_t r = 0; r < w.rows; ++r) {
          EXPECT_TRUE(std::isnan(y[sz(r)])) << ctx << " NaN row, out " << r << ": " << y[sz(r)];
          for (int64_t i = 1; i < 3; ++i)
            EXPECT_FALSE(std::isfinite(y[sz(i * w.rows + r)])) << ctx << " Inf row " << i << ", out " << r;
          for (int64_t i = 3; i < n; ++i)
            EXPECT_TRUE(std::isfinite(y[sz(i * w.rows + r)])) << ctx << " finite row " << i << ", out " << r;
        }
      }
  }
}

// Activations of float denormals (and one row mixing denormals with normal values): every path
// stays within its bound, with the flush-to-zero term of the bf16 path.
TEST_P(Numerics, DenormalActivationsStayWithinBounds) {
  for (WKind kind : {WKind::nf4, WKind::int4_sym, WKind::int8_sym, WKind::int8_asym}) {
    const TestWeight w = make_weight(kind, 17, 192, 64, 9);
    for (int64_t n : {int64_t{2}, int64_t{12}}) {
      std::vector<float> x = gaussian(n * w.cols, 21, 1e-40f);
      for (int64_t j = 0; j < w.cols; j += 3) x[sz(w.cols + j)] = 1e-3f;  // row 1: mixed
      for (MatmulPath path : {MatmulPath::exact, MatmulPath::fast, MatmulPath::automatic}) {
        const std::vector<float> y = run_matmul(w, x, n, PathRun{path}, kt());
        expect_within_bound(std::string(kind_name(kind)) + " denormal n=" + std::to_string(n), w, x, n, y,
                            K::resolve_path(path, n), w.is_int8() && path == MatmulPath::fast);
      }
      if (kind == WKind::int8_sym)
        for (float t : {0.0f, 1e-2f}) {
          const std::vector<float> y = run_matmul(w, x, n, PathRun{MatmulPath::automatic, true, t}, kt());
          if (t == 0.0f) expect_within_bound("llm_int8 denormal", w, x, n, y, MatmulPath::fast, true);
          for (float v : y) EXPECT_TRUE(std::isfinite(v));
        }
    }
  }
}

// ---- int8 product: exact up to k = 2^20 ---------------------------------------------------------

// x = 127 everywhere (row absmax 127, so every activation code is 127) against rows of 127, of
// -127 and of alternating +-127 codes: the integer sums 127 * 127 * k pass 2^31 at k = 133,145;
// the driver's result is float(sum) * (127 * (1/127) * scale) exactly.
TEST_P(Numerics, Int8ProductExactToTwoPow20) {
  for (int64_t k : {int64_t{133143}, int64_t{133144}, int64_t{133145}, int64_t{140000}, int64_t{1} << 20}) {
    const int64_t rows = 3;
    std::vector<int8_t> q(sz(rows * k));
    for (int64_t j = 0; j < k; ++j) {
      q[sz(j)] = 127;
      q[sz(k + j)] = -127;
      q[sz(2 * k + j)] = j % 2 ? -127 : 127;
    }
    const std::vector<float> scale(sz(rows), 1.0f);
    const K::PackedInt8 w = K::pack_int8(q.data(), rows, k, scale.data(), nullptr);
    const float sx = 127.0f * (1.0f / 127.0f);
    const int64_t full = 16129 * k;
    const float want[3] = {static_cast<float>(full) * (sx * 1.0f), static_cast<float>(-full) * (sx * 1.0f),
                           static_cast<float>(k % 2 ? 16129 : 0) * (sx * 1.0f)};
    for (int64_t n : {int64_t{1}, int64_t{5}}) {
      const std::vector<float> x(sz(n * k), 127.0f);
      std::vector<float> y(sz(n * rows)), yl(sz(n * rows));
      K::matmul(w.view, io_for(x, n, k, y, rows), MatmulPath::fast, kt());
      K::matmul_llm_int8(w.view, io_for(x, n, k, yl, rows), 0.0f, nullptr, kt());
      for (int64_t i = 0; i < n; ++i)
        for (int64_t r = 0; r < rows; ++r) {
          EXPECT_EQ(y[sz(i * rows + r)], want[r])
              << "fast k=" << k << " n=" << n << " row " << i << " out " << r;
          EXPECT_EQ(yl[sz(i * rows + r)], want[r])
              << "llm k=" << k << " n=" << n << " row " << i << " out " << r;
        }
    }
  }
}

// ---- padding columns -------------------------------------------------------------------------------

// The statistics after a row's end (the next row's first nf4 block, or int4 groups) hold Inf,
// NaN or FLT_MAX: the padding columns of the rows before decode to 0 all the same, so those rows
// come out within the exact bound; only the row owning the non-finite statistic may be non-finite.
TEST_P(Numerics, PaddingColumnsDecodeToZero) {
  struct Case {
    WKind kind;
    int64_t cols, block;
  };
  const float bad[] = {kInf, -kInf, kNaN, std::numeric_limits<float>::max()};
  for (const Case c : {Case{WKind::nf4, 64, 64}, Case{WKind::nf4, 96, 32}, Case{WKind::nf4, 48, 32},
                       Case{WKind::int4_sym, 130, 16}, Case{WKind::int4_sym, 100, 32}})
    for (float v : bad) {
      const int64_t rows = 6;
      // Row 2's first statistic (block 2 * cols / block, or group 0 of row 2) is the bad one.
      const int64_t groups =
          c.kind == WKind::nf4 ? K::ceil_div(rows * c.cols, c.block) : rows * K::ceil_div(c.cols, c.block);
      std::mt19937 rng(1);
      std::uniform_real_distribution<float> pos(0.5f, 2.0f);
      std::vector<float> stats(sz(groups));
      for (float& s : stats) s = c.kind == WKind::nf4 ? pos(rng) : pos(rng) / 8;
      const int64_t bad_at = c.kind == WKind::nf4 ? 2 * c.cols / c.block : 2 * K::ceil_div(c.cols, c.block);
      stats[sz(bad_at)] = v;
      const TestWeight w = make_weight(c.kind, rows, c.cols, c.block, 2, &stats);
      // Rows whose elements use the bad statistic (nf4 blocks may straddle rows).
      std::vector<bool> owns(sz(rows), false);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < c.cols; ++j) {
          const int64_t s = c.kind == WKind::nf4 ? (r * c.cols + j) / c.block
                                                 : r * K::ceil_div(c.cols, c.block) + j / c.block;
          if (s == bad_at) owns[sz(r)] = true;
        }
      for (int64_t n : {int64_t{1}, int64_t{12}})
        for (MatmulPath path : {MatmulPath::exact, MatmulPath::fast}) {
          const std::vector<float> x = gaussian(n * c.cols, 4);
          const std::vector<float> y = run_matmul(w, x, n, PathRun{path}, kt());
          const MatmulPath p = K::resolve_path(path, n);
          const double k = double(c.cols);
          for (int64_t i = 0; i < n; ++i)
            for (int64_t r = 0; r < rows; ++r) {
              if (owns[sz(r)]) continue;
              double ref = 0.0, pabs = 0.0;
              for (int64_t j = 0; j < c.cols; ++j) {
                const double t = double(x[sz(i * c.cols + j)]) * w.deq[sz(r * c.cols + j)];
                ref += t;
                pabs += std::fabs(t);
              }
              const double tol = p == MatmulPath::fast && n > K::kGemvMaxRows
                                     ? (0x1p-7 + 0x1p-15 + (k + 4) * kU) * pabs + (k + 4) * 0x1p-126
                                     : (k + 4) * kU * pabs + (k + 4) * 0x1p-149;
              const float got = y[sz(i * rows + r)];
              EXPECT_TRUE(std::fabs(double(got) - ref) <= tol)
                  << kind_name(c.kind) << " cols=" << c.cols << " block=" << c.block << " stat=" << v
                  << " n=" << n << " path=" << (path == MatmulPath::fast ? "fast" : "exact") << " row " << i
                  << " out " << r << ": got " << got << ", want " << ref;
            }
        }
    }
}

// ---- blockwise 8-bit: denormal blocks ---------------------------------------------------------------

// bitsandbytes' arithmetic (backends/default quantize_blockwise), in a double model:
// scaled = clamp(x * fl32(1 / absmax), -1, 1), the nearest code (argmin; NaN picks code 0), and
// dequantized as fl32(code * absmax).
std::vector<float> bnb_blockwise_roundtrip(const std::vector<float>& x, int64_t bs, const float* code) {
  std::vector<float> out(x.size());
  for (size_t b0 = 0; b0 < x.size(); b0 += sz(bs)) {
    const size_t b1 = std::min(x.size(), b0 + sz(bs));
    float a = 0.0f;
    for (size_t i = b0; i < b1; ++i) a = std::max(a, std::fabs(x[i]));
    const float inv = 1.0f / a;
    for (size_t i = b0; i < b1; ++i) {
      const float s = std::fmin(std::fmax(x[i] * inv, -1.0f), 1.0f);
      int best = 0;
      if (!std::isnan(x[i] * inv)) {
        double d = std::numeric_limits<double>::infinity();
        for (int c = 0; c < 256; ++c)
          if (std::fabs(double(s) - code[c]) < d) d = std::fabs(double(s) - code[c]), best = c;
      }
      out[i] = code[best] * a;
    }
  }
  return out;
}

TEST_P(Numerics, Lut8DenormalBlockNoWorseThanBnb) {
  const std::array<float, 256> code = K::create_dynamic_map();
  const K::Lut8 lut = K::make_lut8(code.data());
  const int64_t bs = 256;
  // Blocks scaled to absmax ~1e-40 (1/absmax = Inf in float), ~5e-39 (finite reciprocal, below
  // the old floor), 1e-38 (at it), ~1e-45 (a few denormal steps) and 1 (normal).
  const float scales[] = {1e-40f, 5e-39f, 1e-38f, 3e-45f, 1.0f};
  std::vector<float> x;
  for (size_t b = 0; b < std::size(scales); ++b) {
    const std::vector<float> g = gaussian(bs, 100 + uint32_t(b));
    for (float v : g) x.push_back(v * scales[b] / 3.0f);
  }
  const int64_t n = static_cast<int64_t>(x.size()), blocks = n / bs;
  std::vector<float> absmax(sz(blocks)), deq(sz(n));
  std::vector<uint8_t> q(sz(n));
  K::absmax_blocks(x.data(), DType::f32, n, bs, absmax.data(), kt());
  K::quantize_lut8(x.data(), DType::f32, n, bs, absmax.data(), lut, q.data(), kt());
  K::dequantize_lut8(q.data(), n, bs, absmax.data(), code.data(), deq.data(), kt());
  const std::vector<float> bnb = bnb_blockwise_roundtrip(x, bs, code.data());
  for (int64_t b = 0; b < blocks; ++b) {
    double ours = 0.0, theirs = 0.0, norm = 0.0;
    for (int64_t i = b * bs; i < (b + 1) * bs; ++i) {
      ours += std::fabs(double(deq[sz(i)]) - x[sz(i)]);
      theirs += std::fabs(double(bnb[sz(i)]) - x[sz(i)]);
      norm += std::fabs(x[sz(i)]);
    }
    // No worse than bitsandbytes, up to one denormal step per element (fl32(code * absmax)).
    EXPECT_LE(ours, theirs + double(bs) * 0x1p-149) << "block " << b << " absmax " << absmax[sz(b)];
    // And as good as a normal block wherever the dequantized values are not denormal-limited:
    // the dynamic map's error is a few percent at most (1 % relative L1 on Gaussian blocks).
    if (absmax[sz(b)] > 1e-41f) {
      EXPECT_LE(ours, 0.02 * norm + double(bs) * 0x1p-149) << "block " << b << " absmax " << absmax[sz(b)];
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllIsas, Numerics, testing::ValuesIn(all_isas()), isa_param_name);

}  // namespace
}  // namespace msbnb::test
