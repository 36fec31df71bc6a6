// The error of every matmul path against the exact product with the dequantized weight (float64),
// for the numbers in docs/matmul.md: relative Frobenius error ||y - y_ref|| / ||y_ref|| per
// format, path and batch size, on Gaussian activations and on activations with an LLM-style
// outlier feature (a few columns 30x the others), next to what ggml's q8_0 activations (blocks of
// 32, fp16 scale absmax / 127, then the exact product) give on the same data. No torch.
//
//   msbnb_matmul_errors [--rows=1024] [--cols=4096] > errors.jsonl     (a table on stderr)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "msbnb/kernels/formats.h"
#include "msbnb/kernels/matmul.h"
#include "msbnb/kernels/ops.h"

namespace mk = msbnb::kernels;

namespace {

struct W4 {
  std::string name;
  mk::PackedLut4 packed;
  std::vector<float> deq;  // [rows * cols]
};

W4 make_weight(const std::string& fmt, int64_t rows, int64_t cols, const std::vector<float>& src) {
  W4 w;
  w.name = fmt;
  const int64_t n = rows * cols;
  w.deq.resize(static_cast<size_t>(n));
  if (fmt == "nf4" || fmt == "fp4") {
    const float* code = fmt == "nf4" ? mk::kCodeNF4 : mk::kCodeFP4;
    const int64_t bs = 64;
    std::vector<float> absmax(static_cast<size_t>(mk::ceil_div(n, bs)));
    std::vector<uint8_t> bytes(static_cast<size_t>((n + 1) / 2));
    mk::absmax_blocks(src.data(), mk::DType::f32, n, bs, absmax.data());
    mk::quantize_lut4(src.data(), mk::DType::f32, n, bs, absmax.data(), mk::make_lut4(code), bytes.data());
    mk::dequantize_lut4(bytes.data(), n, bs, absmax.data(), code, w.deq.data());
    w.packed = mk::pack_lut4_bnb(bytes.data(), rows, cols, bs, absmax.data(), code);
  } else {  // int4 symmetric, groups of 128
    const int64_t g = 128, groups = mk::ceil_div(cols, g);
    std::vector<float> scale(static_cast<size_t>(rows * groups));
    for (int64_t r = 0; r < rows; ++r)
      mk::absmax_blocks(src.data() + r * cols, mk::DType::f32, cols, g, scale.data() + r * groups);
    mk::symmetric_scales(scale.data(), rows * groups, 7.0f, scale.data());
    std::vector<uint8_t> bytes(static_cast<size_t>(rows * ((cols + 1) / 2)));
    mk::quantize_int4(src.data(), mk::DType::f32, rows, cols, g, scale.data(), nullptr, bytes.data());
    mk::dequantize_int4(bytes.data(), rows, cols, g, scale.data(), nullptr, w.deq.data());
    w.packed = mk::pack_int4(bytes.data(), rows, cols, g, scale.data(), nullptr);
  }
  return w;
}

// v rounded to fp16 (11 significant bits, round to nearest even; fp16's normal range).
float round_half(float v) {
  if (v == 0.0f) return 0.0f;
  int e = 0;
  const float m = std::frexp(v, &e);  // v = m 2^e, 0.5 <= |m| < 1
  return std::ldexp(std::nearbyint(std::ldexp(m, 11)), e - 11);
}

// ggml's q8_0 round trip of one activation row (blocks of 32, scale fp16(absmax / 127)).
std::vector<float> q8_0(const float* x, int64_t cols) {
  std::vector<float> out(static_cast<size_t>(cols));
  for (int64_t b = 0; b < cols; b += 32) {
    float m = 0;
    for (int64_t j = b; j < std::min(cols, b + 32); ++j) m = std::max(m, std::fabs(x[j]));
    const float d = round_half(m / 127.0f);
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int64_t j = b; j < std::min(cols, b + 32); ++j)
      out[static_cast<size_t>(j)] = std::nearbyint(x[j] * id) * d;
  }
  return out;
}

double rel_error(const std::vector<float>& y, const std::vector<double>& ref) {
  double e = 0, r = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    e += (y[i] - ref[i]) * (y[i] - ref[i]);
    r += ref[i] * ref[i];
  }
  return std::sqrt(e / r);
}

}  // namespace

int main(int argc, char** argv) {
  int64_t rows = 1024, cols = 4096;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--rows=", 0) == 0)
      rows = std::stoll(a.substr(7));
    else if (a.rfind("--cols=", 0) == 0)
      cols = std::stoll(a.substr(7));
    else {
      std::fprintf(stderr, "usage: msbnb_matmul_errors [--rows=1024] [--cols=4096]\n");
      return 2;
    }
  }
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> src(static_cast<size_t>(rows * cols));
  for (float& v : src) v = normal(rng) * 0.02f;
  std::fprintf(stderr, "%-5s %-9s %4s %10s %10s\n", "fmt", "path", "n", "gaussian", "outliers");
  for (const std::string fmt : {"nf4", "fp4", "int4"}) {
    const W4 w = make_weight(fmt, rows, cols, src);
    for (int64_t n : {1, 8, 128}) {
      double err[2][4] = {};
      for (int kind = 0; kind < 2; ++kind) {
        std::vector<float> x(static_cast<size_t>(n * cols));
        for (float& v : x) v = normal(rng);
        if (kind == 1)  // an outlier feature: 6 columns 30x larger, in every row
          for (int64_t i = 0; i < n; ++i)
            for (int64_t c : {17, 611, 1030, 2047, 3001, 4000})
              if (c < cols) x[static_cast<size_t>(i * cols + c)] *= 30.0f;
        std::vector<double> ref(static_cast<size_t>(n * rows));
        std::vector<float> xg(x.size());
        for (int64_t i = 0; i < n; ++i) {
          const std::vector<float> g = q8_0(x.data() + i * cols, cols);
          std::copy(g.begin(), g.end(), xg.begin() + i * cols);
        }
        std::vector<float> yg(ref.size());
        for (int64_t i = 0; i < n; ++i)
          for (int64_t r = 0; r < rows; ++r) {
            double s = 0, sg = 0;
            for (int64_t j = 0; j < cols; ++j) {
              const double wv = w.deq[static_cast<size_t>(r * cols + j)];
              s += double(x[static_cast<size_t>(i * cols + j)]) * wv;
              sg += double(xg[static_cast<size_t>(i * cols + j)]) * wv;
            }
            ref[static_cast<size_t>(i * rows + r)] = s;
            yg[static_cast<size_t>(i * rows + r)] = static_cast<float>(sg);
          }
        const mk::MatmulPath paths[3] = {mk::MatmulPath::exact, mk::MatmulPath::fast, mk::MatmulPath::int8};
        for (int p = 0; p < 3; ++p) {
          std::vector<float> y(ref.size());
          mk::MatmulIO io;
          io.x = x.data();
          io.n = n;
          io.ldx = cols;
          io.y = y.data();
          io.ldy = rows;
          mk::matmul(w.packed.view, io, paths[p]);
          err[kind][p] = rel_error(y, ref);
        }
        err[kind][3] = rel_error(yg, ref);
      }
      const char* names[4] = {"exact", "fast", "int8", "ggml_q8_0"};
      for (int p = 0; p < 4; ++p) {
        std::printf(
            "{\"op\":\"matmul_error\",\"format\":\"%s\",\"path\":\"%s\",\"m\":%lld,\"k\":%lld,\"n\":%lld,"
            "\"rel_error\":%.4g,\"rel_error_outliers\":%.4g}\n",
            fmt.c_str(), names[p], static_cast<long long>(rows), static_cast<long long>(cols),
            static_cast<long long>(n), err[0][p], err[1][p]);
        std::fprintf(stderr, "%-5s %-9s %4lld %9.4f%% %9.4f%%\n", fmt.c_str(), names[p],
                     static_cast<long long>(n), 100 * err[0][p], 100 * err[1][p]);
      }
    }
  }
  return 0;
}
