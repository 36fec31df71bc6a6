// Helpers of the LoRA tests: error-message checks, small models, and the float32 error bound of a
// linear + LoRA layer that the tolerances are derived from.
#pragma once
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "expect_error.h"
#include "msbnb/msbnb.h"

namespace msbnb::lora::test {

using ::msbnb::test::expect_error;

/// Unit roundoff of float32 and Higham's gamma_n = n u / (1 - n u): a float32 sum of n terms
/// (any order, FMA or not) is off by at most gamma_n * sum |terms|.
constexpr double kU = 5.9604644775390625e-08;  // 2^-24
inline double gamma(int64_t n) { return static_cast<double>(n) * kU / (1.0 - static_cast<double>(n) * kU); }

inline torch::Tensor f64(const torch::Tensor& t) { return t.detach().to(torch::kDouble); }

/// Gives B random nonzero values (B starts at zero) so the LoRA branch contributes.
inline void randomize_lora(LoraLayer& l, double scale = 0.2) {
  torch::NoGradGuard g;
  l.lora_A().copy_(torch::randn_like(l.lora_A()) * scale);
  l.lora_B().copy_(torch::randn_like(l.lora_B()) * scale);
}

/// Bitwise equality of every named buffer of two modules (names, dtypes, shapes, bytes).
inline void expect_buffers_identical(const torch::nn::Module& a, const torch::nn::Module& b) {
  const auto ba = a.named_buffers(true), bb = b.named_buffers(true);
  ASSERT_EQ(ba.size(), bb.size());
  for (const auto& item : ba) {
    const torch::Tensor* other = bb.find(item.key());
    ASSERT_NE(other, nullptr) << item.key();
    EXPECT_EQ(item.value().scalar_type(), other->scalar_type()) << item.key();
    EXPECT_TRUE(torch::equal(item.value(), *other)) << "buffer " << item.key() << " differs";
  }
}

/// Deep copies of every buffer, by name.
inline std::vector<std::pair<std::string, torch::Tensor>> snapshot_buffers(const torch::nn::Module& m) {
  std::vector<std::pair<std::string, torch::Tensor>> v;
  for (const auto& b : m.named_buffers(true)) v.emplace_back(b.key(), b.value().detach().clone());
  return v;
}
inline void expect_same_buffers(const torch::nn::Module& m,
                                const std::vector<std::pair<std::string, torch::Tensor>>& before) {
  const auto now = m.named_buffers(true);
  ASSERT_EQ(now.size(), before.size());
  for (const auto& [name, t] : before) {
    const torch::Tensor* b = now.find(name);
    ASSERT_NE(b, nullptr) << name;
    EXPECT_EQ(b->scalar_type(), t.scalar_type()) << name;
    EXPECT_TRUE(torch::equal(*b, t)) << "buffer " << name << " changed";
  }
}

/// The element-wise bound on |computed - exact| of y = x Wᵀ + b + s (x Aᵀ) Bᵀ for float32
/// evaluation of one layer from its (already computed) input x (derivation in lora_train_test.cpp):
///   gamma(K + r + 2) * (|x| M + |b|),  M = |W|ᵀ + s |A|ᵀ |B|ᵀ   (K = in_features)
/// W, b, A, B, x as double; returns double.
inline torch::Tensor local_forward_bound(const torch::Tensor& x, const torch::Tensor& W,
                                         const torch::Tensor& b, const torch::Tensor& A,
                                         const torch::Tensor& B, double s) {
  const int64_t K = W.size(1), r = A.size(0);
  const torch::Tensor M = W.abs().t() + s * A.abs().t().matmul(B.abs().t());
  torch::Tensor t = x.abs().matmul(M);
  if (b.defined()) t = t + b.abs();
  return gamma(K + r + 2) * t;
}

}  // namespace msbnb::lora::test
