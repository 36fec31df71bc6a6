// Helpers of the nn tests: error-message checks, derived tolerances, the formats under test.
#pragma once
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "expect_error.h"
#include "msbnb/msbnb.h"

namespace msbnb::nn::test {

using ::msbnb::test::expect_error;

/// One layer configuration under test.
struct Fmt {
  std::string quant_type;  // nf4 / fp4 / int4 / int8
  bool double_quant = false;
  bool symmetric = true;
  double threshold = 0.0;  // int8
  std::string name() const {
    std::string n = quant_type;
    if (double_quant) n += "_dq";
    if (!symmetric) n += "_asym";
    if (quant_type == "int8") n += threshold > 0 ? "_t6" : "_t0";
    return n;
  }
};

inline std::vector<Fmt> all_formats() {
  return {{"nf4", false},
          {"nf4", true},
          {"fp4", false},
          {"fp4", true},
          {"int4", false},
          {"int4", true},
          {"int4", false, false},
          {"int4", true, false},
          {"int8", false, true, 0.0},
          {"int8", false, true, 6.0}};
}

/// A quantized layer of `f` with its weight quantized from `w` [out, in].
inline std::shared_ptr<torch::nn::Module> make_layer(const Fmt& f, int64_t in, int64_t out, bool bias,
                                                     const torch::Tensor& w) {
  if (f.quant_type == "int8") {
    Linear8bit m(Linear8bitOptions(in, out).bias(bias).threshold(f.threshold));
    m->quantize_weights(w);
    return m.ptr();
  }
  Linear4bit m(Linear4bitOptions(in, out)
                   .bias(bias)
                   .quant_type(f.quant_type)
                   .compress_statistics(f.double_quant)
                   .symmetric(f.symmetric));
  m->quantize_weights(w);
  return m.ptr();
}

inline torch::Tensor forward(const std::shared_ptr<torch::nn::Module>& m, const torch::Tensor& x) {
  if (auto p = std::dynamic_pointer_cast<Linear4bitImpl>(m)) return p->forward(x);
  return std::dynamic_pointer_cast<Linear8bitImpl>(m)->forward(x);
}

inline torch::Tensor dequantized(const std::shared_ptr<torch::nn::Module>& m) {
  if (auto p = std::dynamic_pointer_cast<Linear4bitImpl>(m)) return p->dequantize_weights();
  return std::dynamic_pointer_cast<Linear8bitImpl>(m)->dequantize_weights();
}

/// Unit roundoff of a float dtype.
inline double unit_roundoff(torch::Dtype dt) {
  if (dt == torch::kFloat16) return std::ldexp(1.0, -11);
  if (dt == torch::kBFloat16) return std::ldexp(1.0, -8);
  return std::ldexp(1.0, -24);
}

/// Bound on |y - y_ref| for y = a · bᵀ (+ bias) summed in float32 over k terms (any order) and
/// rounded to `out_dtype`: k · u32 · (|a| · |b|ᵀ) (the classic gamma_k bound, k u / (1 - k u) ~ k u
/// for k u << 1, doubled for the 2-term fma-free product) + u_out · |y_ref|.
inline torch::Tensor sum_tolerance(const torch::Tensor& a_abs, const torch::Tensor& b_abs, int64_t k,
                                   const torch::Tensor& y_ref_abs, torch::Dtype out_dtype) {
  const double u32 = std::ldexp(1.0, -24);
  const torch::Tensor mag = torch::matmul(a_abs.to(torch::kDouble), b_abs.to(torch::kDouble).t());
  return 2.0 * static_cast<double>(k + 2) * u32 * mag +
         unit_roundoff(out_dtype) * y_ref_abs.to(torch::kDouble) + 1e-30;
}

/// Every element of |got - ref| <= tol; prints the first offender.
inline void expect_within(const torch::Tensor& got, const torch::Tensor& ref, const torch::Tensor& tol,
                          const std::string& what) {
  const torch::Tensor err = (got.to(torch::kDouble) - ref.to(torch::kDouble)).abs();
  const torch::Tensor bad = err > tol;
  if (bad.any().item<bool>()) {
    const int64_t i = bad.reshape({-1}).nonzero()[0].item<int64_t>();
    ADD_FAILURE() << what << ": element " << i << " got " << got.reshape({-1})[i].item<double>() << " ref "
                  << ref.reshape({-1})[i].item<double>() << " tol " << tol.reshape({-1})[i].item<double>()
                  << " (" << bad.sum().item<int64_t>() << " of " << bad.numel() << " outside)";
  }
}

/// Bytes of a tensor's storage view, for bit-identity checks across dtypes.
inline bool same_bytes(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  return torch::equal(a.contiguous().reshape({-1}).view(torch::kUInt8),
                      b.contiguous().reshape({-1}).view(torch::kUInt8));
}

}  // namespace msbnb::nn::test
