// Quantized matmul: pack a Linear layer's weight once in each format, then run the fused
// y = x · dequant(W)ᵀ + b kernels for a single token (GEMV) and a batch (GEMM), and the
// transposed product a backward pass needs. Prints each path's error against the fp32 product
// with the dequantized weight, and exits non-zero if an error exceeds what docs/matmul.md states.
#include <torch/nn/modules/linear.h>

#include <chrono>
#include <cstdio>
#include <functional>

#include "msbnb/msbnb.h"

namespace {

double rel_err(const torch::Tensor& y, const torch::Tensor& ref) {
  return ((y.to(torch::kFloat64) - ref).norm() / ref.norm()).item<double>();
}

double millis(const std::function<void()>& fn) {
  fn();  // warm-up
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 5; ++i) fn();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / 5;
}

}  // namespace

int main() {
  torch::manual_seed(0);
  torch::nn::Linear layer(torch::nn::LinearOptions(2048, 1024));
  const torch::Tensor w = layer->weight.detach(), b = layer->bias.detach();
  const torch::Tensor x1 = torch::randn({1, 2048}), x64 = torch::randn({64, 2048});
  std::printf("msbnb quantized matmul: Linear(2048, 1024), kernels: %s\n\n",
              msbnb::kernels::isa_name(msbnb::kernels::active_isa()));

  struct Row {
    const char* name;
    msbnb::PackedWeight packed;
    torch::Tensor dequant;
  };
  const auto nf4 =
      msbnb::quantize_4bit(w, msbnb::Quantize4bitOptions().quant_type("nf4").compress_statistics(true));
  const auto int4 = msbnb::quantize_4bit(w, msbnb::Quantize4bitOptions().quant_type("int4").blocksize(128));
  const auto int8 = msbnb::quantize_8bit(w);
  const Row rows[] = {
      {"nf4 (double quant)", msbnb::PackedWeight::from_4bit(nf4.data, nf4.state),
       msbnb::dequantize_4bit(nf4.data, nf4.state)},
      {"int4 group 128", msbnb::PackedWeight::from_4bit(int4.data, int4.state),
       msbnb::dequantize_4bit(int4.data, int4.state)},
      {"int8 per channel", msbnb::PackedWeight::from_8bit(int8), msbnb::dequantize_8bit(int8)},
  };

  bool ok = true;
  std::printf("%-20s %8s %11s %11s %11s %9s %9s %9s\n", "weight", "KiB", "exact n=1", "exact n=64",
              "fast n=64", "ms n=1", "ms n=64", "bwd n=64");
  for (const Row& r : rows) {
    const torch::Tensor wd = r.dequant.to(torch::kFloat64), bd = b.to(torch::kFloat64);
    const torch::Tensor ref1 = x1.to(torch::kFloat64).matmul(wd.t()) + bd;
    const torch::Tensor ref64 = x64.to(torch::kFloat64).matmul(wd.t()) + bd;
    const double e1 = rel_err(msbnb::quantized_matmul(x1, r.packed, b, msbnb::MatmulPath::exact), ref1);
    const double e64 = rel_err(msbnb::quantized_matmul(x64, r.packed, b, msbnb::MatmulPath::exact), ref64);
    const double f64 = rel_err(msbnb::quantized_matmul(x64, r.packed, b, msbnb::MatmulPath::fast), ref64);
    const double t1 = millis([&] { msbnb::quantized_matmul(x1, r.packed, b); });
    const double t64 = millis([&] { msbnb::quantized_matmul(x64, r.packed, b); });
    const torch::Tensor gy = torch::randn({64, 1024});
    const double tb = millis([&] { msbnb::quantized_matmul_transposed(gy, r.packed); });
    const double eb =
        rel_err(msbnb::quantized_matmul_transposed(gy, r.packed), gy.to(torch::kFloat64).matmul(wd));
    std::printf("%-20s %8lld %10.5f%% %10.5f%% %10.3f%% %9.3f %9.3f %9.3f\n", r.name,
                static_cast<long long>(r.packed.bytes() / 1024), 100 * e1, 100 * e64, 100 * f64, t1, t64, tb);
    // docs/matmul.md: exact differs by summation order only; fast stays under 1 %.
    ok &= e1 < 1e-5 && e64 < 1e-5 && eb < 1e-5 && f64 < 0.01;
  }

  // LLM.int8(): a few activation columns far above the rest go through fp32.
  const auto scb = msbnb::int8_vectorwise_quant(w);
  const msbnb::PackedWeight w8 = msbnb::PackedWeight::from_int8_scb(scb.CB, scb.SCB);
  torch::Tensor x = torch::randn({16, 2048});
  x.index_put_({torch::indexing::Slice(), 100}, 40.0f);  // one outlier feature, as in LLMs
  const torch::Tensor wd8 = scb.CB.to(torch::kFloat64) * (scb.SCB.to(torch::kFloat64) / 127).unsqueeze(1);
  const torch::Tensor ref = x.to(torch::kFloat64).matmul(wd8.t());
  const auto plain = msbnb::int8_matmul(x, w8, 0.0), split = msbnb::int8_matmul(x, w8, 6.0);
  std::printf(
      "\nLLM.int8() with an outlier column: threshold 0: %.3f%% error; threshold 6: %.3f%% error, %zu "
      "outlier column(s)\n",
      100 * rel_err(plain.out, ref), 100 * rel_err(split.out, ref), split.outlier_cols.size());
  ok &= split.outlier_cols.size() == 1 && rel_err(split.out, ref) < rel_err(plain.out, ref);
  std::printf("\n%s\n", ok ? "all errors within the documented bounds" : "ERROR: an error exceeds its bound");
  return ok ? 0 : 1;
}
