// merge / unmerge: exact on a float base; on a quantized base requantized in the base's own
// format with the rounding measured, and unmerge restoring the original bytes.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "lora_test_util.h"

namespace {

using namespace msbnb::lora;
using msbnb::lora::test::expect_error;
using msbnb::lora::test::f64;
using msbnb::lora::test::kU;

TEST(LoraMerge, FloatBaseIsExactAndUnmergeUndoesIt) {
  torch::manual_seed(20);
  LoRALinear l(48, 20, LoraConfig().r(4).lora_alpha(8));
  msbnb::lora::test::randomize_lora(*l);
  const torch::Tensor x = torch::randn({6, 48});
  const torch::Tensor y0 = l->forward(x);
  const torch::Tensor W0 = l->base_layer()->weight.detach().clone();
  const torch::Tensor delta = l->delta_weight();
  // ΔW = scaling · B·A, float32 [out, in].
  EXPECT_TRUE(torch::equal(delta, torch::matmul(l->lora_B(), l->lora_A()).detach() * 2.0));
  const MergeResult r = l->merge();
  EXPECT_TRUE(l->merged());
  EXPECT_FALSE(r.requantized);
  EXPECT_EQ(r.base, "Linear");
  EXPECT_EQ(r.relative_error, 0.0);
  EXPECT_EQ(r.max_abs_error, 0.0);
  // W1 - W0 differs from ΔW only by the float32 add's rounding: |.| <= u |W0 + ΔW| per element.
  EXPECT_LE(r.delta_relative_error,
            kU * f64(W0 + delta).norm().item<double>() / f64(delta).norm().item<double>());
  EXPECT_NEAR(r.delta_norm, f64(delta).norm().item<double>(), 1e-12 * r.delta_norm);
  // W += ΔW in float32: exactly W0 + ΔW.
  EXPECT_TRUE(torch::equal(l->base_layer()->weight, W0 + delta));
  // Merged forward is the base alone (the LoRA term is not added again).
  const torch::Tensor ym = l->forward(x);
  EXPECT_TRUE(torch::equal(ym, l->base_layer()->forward(x)));
  // ... and equals the unmerged forward up to summation order: both within
  // gamma(K + r + 2) (|x| M + |b|) of the exact value (lora_test_util.h), so within twice that.
  const torch::Tensor tol =
      2 * msbnb::lora::test::local_forward_bound(f64(x), f64(W0), f64(l->base_layer()->bias),
                                                 f64(l->lora_A()), f64(l->lora_B()), l->scaling());
  EXPECT_TRUE(((f64(ym) - f64(y0)).abs() <= tol).all().item<bool>());
  expect_error([&] { l->merge(); }, {"LoRALinear::merge", "already merged", "unmerge() first"});
  l->unmerge();
  EXPECT_FALSE(l->merged());
  // fl(fl(W0 + d) - d): W0 + d rounds once (|e1| <= u |W0 + d|), the subtraction once more
  // (<= u |W0 + e1|): |W - W0| <= u (|W0 + d| + |W0|) (+ u^2 terms, covered by the 1.01).
  const torch::Tensor bound = 1.01 * kU * ((f64(W0) + f64(delta)).abs() + f64(W0).abs());
  EXPECT_TRUE(((f64(l->base_layer()->weight) - f64(W0)).abs() <= bound).all().item<bool>());
  expect_error([&] { l->unmerge(); }, {"LoRALinear::unmerge", "not merged", "merge() first"});
}

TEST(LoraMerge, HalfFloatBaseRoundsOnce) {
  torch::manual_seed(21);
  LoRALinear l(32, 16, LoraConfig().r(2));
  msbnb::lora::test::randomize_lora(*l);
  l->base_layer()->to(torch::kBFloat16);
  const torch::Tensor W0 = l->base_layer()->weight.detach().to(torch::kFloat32);
  const MergeResult r = l->merge();
  EXPECT_TRUE(torch::equal(l->base_layer()->weight, (W0 + l->delta_weight()).to(torch::kBFloat16)));
  EXPECT_EQ(l->base_layer()->weight.scalar_type(), torch::kBFloat16);
  EXPECT_GT(r.relative_error, 0.0);
  EXPECT_LE(r.relative_error, std::ldexp(1.0, -8));  // bf16 rounds to 8 significant bits
}

struct QuantCase {
  std::string name;
  std::function<torch::nn::AnyModule(const torch::nn::Linear&, const LoraConfig&)> make;
};

std::vector<QuantCase> quant_cases() {
  using msbnb::nn::Linear4bitOptions;
  auto q4 = [](std::string qt, bool dq, bool sym) {
    return [=](const torch::nn::Linear& l, const LoraConfig& c) {
      const auto& o = l->options;
      return torch::nn::AnyModule(
          Linear4bitWithLoRA::from_linear(l, c,
                                          Linear4bitOptions(o.in_features(), o.out_features())
                                              .quant_type(qt)
                                              .compress_statistics(dq)
                                              .symmetric(sym)));
    };
  };
  return {{"nf4_dq", q4("nf4", true, true)},
          {"nf4", q4("nf4", false, true)},
          {"fp4_dq", q4("fp4", true, true)},
          {"int4_asym_dq", q4("int4", true, false)},
          {"int8", [](const torch::nn::Linear& l, const LoraConfig& c) {
             return torch::nn::AnyModule(Linear8bitWithLoRA::from_linear(l, c));
           }}};
}

torch::Tensor base_forward(LoraLayer& l, const torch::Tensor& x) {
  if (auto* b4 = dynamic_cast<msbnb::nn::Linear4bitImpl*>(l.base_module().get())) return b4->forward(x);
  return dynamic_cast<msbnb::nn::Linear8bitImpl*>(l.base_module().get())->forward(x);
}

TEST(LoraMerge, QuantizedBaseRequantizesAndUnmergeRestoresTheBytes) {
  for (const auto& qc : quant_cases()) {
    SCOPED_TRACE(qc.name);
    torch::manual_seed(22);
    torch::nn::Linear lin(200, 36);  // 200 = 3 blocks of 64 + a short one
    auto m = qc.make(lin, LoraConfig().r(4).lora_alpha(16));
    LoraLayer& l = *as_lora_layer(*m.ptr());
    msbnb::lora::test::randomize_lora(l);
    const torch::nn::Module& base = *l.base_module();
    const auto before = msbnb::lora::test::snapshot_buffers(base);
    const auto* qm = dynamic_cast<const msbnb::nn::QuantizedModule*>(&base);
    ASSERT_NE(qm, nullptr);
    const auto state_before = qm->quantized_state();
    const torch::Tensor x = torch::randn({5, 200});
    const torch::Tensor y0 = m.forward(x);
    const torch::Tensor W0 = l.base_weight(), delta = l.delta_weight();

    const MergeResult r = l.merge();
    EXPECT_TRUE(r.requantized);
    // The merged base is exactly what quantizing W0 + ΔW with the base's options gives.
    auto fresh = m.ptr()->clone();  // a layer of the same options...
    auto* fl = as_lora_layer(*fresh);
    if (auto* b4 = dynamic_cast<msbnb::nn::Linear4bitImpl*>(fl->base_module().get())) {
      b4->quantize_weights(W0 + delta);
    } else {
      dynamic_cast<msbnb::nn::Linear8bitImpl*>(fl->base_module().get())->quantize_weights(W0 + delta);
    }
    msbnb::lora::test::expect_buffers_identical(base, *fl->base_module());
    // The reported rounding, recomputed here in double.
    const torch::Tensor W1 = l.base_weight();
    const torch::Tensor wm = f64(W0 + delta);
    EXPECT_NEAR(r.relative_error, ((f64(W1) - wm).norm() / wm.norm()).item<double>(), 1e-12);
    EXPECT_NEAR(r.max_abs_error, (f64(W1) - wm).abs().max().item<double>(), 1e-12);
    EXPECT_NEAR(r.delta_relative_error,
                ((f64(W1) - f64(W0) - f64(delta)).norm() / f64(delta).norm()).item<double>(), 1e-12);
    EXPECT_GT(r.relative_error, 0.0);  // 4 / 8 bits cannot hold W0 + ΔW exactly
    std::cout << qc.name << ": " << r << "\n";
    // Merged forward: the (requantized) base only.
    EXPECT_TRUE(torch::equal(m.forward(x), base_forward(l, x)));
    expect_error([&] { l.merge(); }, {"merge", "already merged"});

    l.unmerge();
    // Bit-identical buffers, checkpoint tensors and outputs.
    msbnb::lora::test::expect_same_buffers(base, before);
    const auto state_after = qm->quantized_state();
    ASSERT_EQ(state_after.size(), state_before.size());
    for (size_t i = 0; i < state_after.size(); ++i) {
      EXPECT_EQ(state_after[i].first, state_before[i].first);
      EXPECT_TRUE(torch::equal(state_after[i].second, state_before[i].second)) << state_after[i].first;
    }
    EXPECT_TRUE(torch::equal(m.forward(x), y0));
    expect_error([&] { l.unmerge(); }, {"unmerge", "not merged"});
    // Merge -> unmerge -> merge gives the same merged bytes again (nothing accumulates).
    l.merge();
    msbnb::lora::test::expect_buffers_identical(base, *fl->base_module());
  }
}

TEST(LoraMerge, MergedForwardIsTheBaseForward) {
  torch::manual_seed(23);
  auto q = Linear4bitWithLoRA::from_linear(torch::nn::Linear(64, 16), LoraConfig().r(2),
                                           msbnb::nn::Linear4bitOptions(64, 16).quant_type("nf4"));
  msbnb::lora::test::randomize_lora(*q);
  const torch::Tensor x = torch::randn({3, 64});
  q->merge();
  EXPECT_TRUE(torch::equal(q->forward(x), q->base_layer()->forward(x)));
}

TEST(LoraMerge, Bf16QuantizedBaseKeepsItsDtype) {
  torch::manual_seed(24);
  torch::nn::Linear lin(64, 16);
  lin->to(torch::kBFloat16);
  auto q = Linear4bitWithLoRA::from_linear(lin, LoraConfig().r(2),
                                           msbnb::nn::Linear4bitOptions(64, 16).quant_type("nf4"));
  msbnb::lora::test::randomize_lora(*q);
  const auto before = msbnb::lora::test::snapshot_buffers(*q->base_layer());
  ASSERT_EQ(q->base_layer()->packed_weight().layout().dtype, torch::kBFloat16);
  q->merge();
  EXPECT_EQ(q->base_layer()->packed_weight().layout().dtype, torch::kBFloat16);
  q->unmerge();
  msbnb::lora::test::expect_same_buffers(*q->base_layer(), before);
}

TEST(LoraMerge, NonFiniteUpdateLeavesTheLayerUnmerged) {
  torch::manual_seed(25);
  auto q = Linear4bitWithLoRA::from_linear(torch::nn::Linear(64, 16), LoraConfig().r(2),
                                           msbnb::nn::Linear4bitOptions(64, 16).quant_type("nf4"));
  const auto before = msbnb::lora::test::snapshot_buffers(*q->base_layer());
  {
    torch::NoGradGuard g;
    q->lora_B().fill_(std::numeric_limits<float>::infinity());
  }
  EXPECT_THROW(q->merge(), c10::Error);
  EXPECT_FALSE(q->merged());
  msbnb::lora::test::expect_same_buffers(*q->base_layer(), before);
}

TEST(LoraMerge, Linear8bitWithFloatWeightsMergesInFloat) {
  torch::manual_seed(26);
  Linear8bitWithLoRA l(msbnb::nn::Linear8bitOptions(32, 8).has_fp16_weights(true), LoraConfig().r(2));
  msbnb::lora::test::randomize_lora(*l);
  const torch::Tensor W0 = l->base_layer()->weight.detach().clone();
  const MergeResult r = l->merge();
  EXPECT_FALSE(r.requantized);
  EXPECT_TRUE(torch::equal(l->base_layer()->weight, W0 + l->delta_weight()));
  l->unmerge();
  EXPECT_TRUE(torch::allclose(l->base_layer()->weight, W0, 0, 1e-6));
}

}  // namespace

namespace {

// What requantizing does to an update of realistic size: for nf4 + double quant on a weight
// with torch Linear's init, ΔW scaled so ||ΔW||_F / ||W||_F is 1e-3 ... 1e-1. Prints the
// measured MergeResult (docs/lora.md quotes it); asserts only what holds for any ΔW: the
// requantized weight's relative error is that of quantizing W0 + ΔW, > 0, and the float merge
// would be exact.
TEST(LoraMerge, RequantizationRoundingVersusUpdateSize) {
  for (double ratio : {1e-3, 1e-2, 1e-1}) {
    torch::manual_seed(27);
    torch::nn::Linear lin(512, 256);
    auto q = Linear4bitWithLoRA::from_linear(lin, LoraConfig().r(8).lora_alpha(16),
                                             msbnb::nn::Linear4bitOptions(512, 256).quant_type("nf4"));
    msbnb::lora::test::randomize_lora(*q, 1.0);
    const double w = q->base_weight().norm().item<double>(), d = q->delta_weight().norm().item<double>();
    {
      torch::NoGradGuard g;
      q->lora_B().mul_(ratio * w / d);
    }
    const MergeResult r = q->merge();
    std::cout << "nf4+dq 512x256, |dW|/|W| = " << ratio << ": relative error " << r.relative_error
              << ", delta relative error " << r.delta_relative_error << "\n";
    EXPECT_GT(r.relative_error, 0.0);
    EXPECT_GT(r.delta_relative_error, 0.0);
  }
}

TEST(LoraLayerDtype, ToBf16ConvertsAdaptersAndLeavesCodes) {
  torch::manual_seed(28);
  auto q = Linear4bitWithLoRA::from_linear(torch::nn::Linear(64, 16), LoraConfig().r(2),
                                           msbnb::nn::Linear4bitOptions(64, 16).quant_type("nf4"));
  msbnb::lora::test::randomize_lora(*q);
  const auto before = msbnb::lora::test::snapshot_buffers(*q);
  q->to(torch::kBFloat16);
  msbnb::lora::test::expect_same_buffers(*q, before);
  EXPECT_EQ(q->lora_A().scalar_type(), torch::kBFloat16);
  EXPECT_EQ(q->base_layer()->bias.scalar_type(), torch::kBFloat16);
  const torch::Tensor x = torch::randn({3, 64}).to(torch::kBFloat16);
  const torch::Tensor y = q->forward(x);
  EXPECT_EQ(y.scalar_type(), torch::kBFloat16);
  // The LoRA branch now runs in bf16 (the adapters' dtype).
  const torch::Tensor l = torch::linear(torch::linear(x, q->lora_A()), q->lora_B()) * q->scaling();
  EXPECT_TRUE(torch::equal(y, q->base_layer()->forward(x) + l));
}

}  // namespace
