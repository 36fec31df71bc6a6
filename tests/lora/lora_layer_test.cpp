// LoRA layers: config checks, the PEFT layout (children, parameter names and shapes), init,
// forward semantics and dtypes, dropout, clone, pretty_print, wrap_with_lora.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <sstream>

#include "lora_test_util.h"

namespace {

using namespace msbnb::lora;
using msbnb::lora::test::expect_error;
using msbnb::lora::test::f64;

TEST(LoraConfig, DefaultsArePefts) {
  const LoraConfig c;
  EXPECT_EQ(c.r(), 8);
  EXPECT_EQ(c.lora_alpha(), 8.0);
  EXPECT_EQ(c.lora_dropout(), 0.0);
  EXPECT_FALSE(c.use_rslora());
  EXPECT_EQ(c.init(), "kaiming");
  EXPECT_EQ(c.bias(), "none");
  EXPECT_EQ(c.scaling(), 1.0);
  EXPECT_EQ(LoraConfig().r(16).lora_alpha(32).scaling(), 2.0);
  EXPECT_EQ(LoraConfig().r(16).lora_alpha(32).use_rslora(true).scaling(), 8.0);  // 32 / sqrt(16)
  EXPECT_NO_THROW(c.validate());
}

TEST(LoraConfig, BadValuesNameFieldExpectedActual) {
  expect_error([] { LoraConfig().r(0).validate(); }, {"LoraConfig.r", "> 0", "got 0"});
  expect_error([] { LoraConfig().r(-3).validate(); }, {"LoraConfig.r", "got -3"});
  expect_error([] { LoraConfig().lora_alpha(0).validate(); }, {"LoraConfig.lora_alpha", "> 0", "got 0"});
  expect_error([] { LoraConfig().lora_alpha(-1).validate(); }, {"LoraConfig.lora_alpha", "got -1"});
  expect_error([] { LoraConfig().lora_alpha(std::nan("")).validate(); },
               {"LoraConfig.lora_alpha", "finite", "nan"});
  expect_error([] { LoraConfig().lora_alpha(std::numeric_limits<double>::infinity()).validate(); },
               {"LoraConfig.lora_alpha", "inf"});
  expect_error([] { LoraConfig().lora_dropout(1.0).validate(); },
               {"LoraConfig.lora_dropout", "[0, 1)", "got 1"});
  expect_error([] { LoraConfig().lora_dropout(-0.1).validate(); }, {"LoraConfig.lora_dropout", "got -0.1"});
  expect_error([] { LoraConfig().lora_dropout(std::nan("")).validate(); },
               {"LoraConfig.lora_dropout", "nan"});
  expect_error([] { LoraConfig().init("xavier").validate(); },
               {"LoraConfig.init", "kaiming", "gaussian", "xavier"});
  expect_error([] { LoraConfig().bias("some").validate(); }, {"LoraConfig.bias", "lora_only", "some"});
  // The layers check the config on construction.
  expect_error([] { LoRALinear(4, 4, LoraConfig().r(0)); }, {"LoraConfig.r", "got 0"});
  expect_error(
      [] { Linear4bitWithLoRA(msbnb::nn::Linear4bitOptions(64, 8), LoraConfig().lora_dropout(1.5)); },
      {"LoraConfig.lora_dropout", "1.5"});
  expect_error([] { Linear8bitWithLoRA::from_linear(torch::nn::Linear(8, 8), LoraConfig().lora_alpha(-2)); },
               {"LoraConfig.lora_alpha", "-2"});
  expect_error([] { LoRALinear(torch::nn::Linear(nullptr)); }, {"base", "empty holder"});
  expect_error([] { LoRALinear::from_linear(torch::nn::Linear(nullptr)); }, {"linear", "empty holder"});
}

std::vector<std::string> keys(const torch::OrderedDict<std::string, torch::Tensor>& d) { return d.keys(); }

TEST(LoraLayer, PeftLayoutFloatBase) {
  torch::manual_seed(1);
  LoRALinear l(16, 8, LoraConfig().r(4));
  std::vector<std::string> kids;
  for (const auto& c : l->named_children()) kids.push_back(c.key());
  EXPECT_EQ(kids, (std::vector<std::string>{"base_layer", "lora_A", "lora_B"}));
  const auto p = l->named_parameters();
  EXPECT_EQ(keys(p), (std::vector<std::string>{"base_layer.weight", "base_layer.bias", "lora_A.weight",
                                               "lora_B.weight"}));
  EXPECT_EQ(p["lora_A.weight"].sizes(), (std::vector<int64_t>{4, 16}));  // A [r, in]
  EXPECT_EQ(p["lora_B.weight"].sizes(), (std::vector<int64_t>{8, 4}));   // B [out, r]
  EXPECT_TRUE(p["lora_A.weight"].is_same(l->lora_A()));
  EXPECT_TRUE(p["lora_B.weight"].is_same(l->lora_B()));
  EXPECT_EQ(l->in_features(), 16);
  EXPECT_EQ(l->out_features(), 8);
  EXPECT_EQ(l->lora_parameter_count(), 4 * 16 + 8 * 4);
  EXPECT_EQ(l->base_type(), "Linear");
  EXPECT_EQ(l->base_module().get(), l->base_layer().ptr().get());
  EXPECT_FALSE(l->merged());
}

TEST(LoraLayer, PeftLayoutQuantizedBases) {
  torch::manual_seed(2);
  auto q4 = Linear4bitWithLoRA::from_linear(torch::nn::Linear(64, 24), LoraConfig().r(2),
                                            msbnb::nn::Linear4bitOptions(64, 24).quant_type("nf4"));
  EXPECT_EQ(keys(q4->named_parameters()),
            (std::vector<std::string>{"base_layer.bias", "lora_A.weight", "lora_B.weight"}));
  for (const auto& b : q4->named_buffers()) {
    EXPECT_EQ(b.key().rfind("base_layer.weight_", 0), 0u) << b.key();
    EXPECT_FALSE(b.value().requires_grad());
  }
  EXPECT_EQ(q4->lora_A().sizes(), (std::vector<int64_t>{2, 64}));
  EXPECT_EQ(q4->lora_B().sizes(), (std::vector<int64_t>{24, 2}));
  EXPECT_EQ(q4->base_type(), "Linear4bit");
  auto q8 = Linear8bitWithLoRA::from_linear(torch::nn::Linear(torch::nn::LinearOptions(32, 16).bias(false)));
  EXPECT_EQ(keys(q8->named_parameters()), (std::vector<std::string>{"lora_A.weight", "lora_B.weight"}));
  EXPECT_EQ(q8->base_type(), "Linear8bit");
}

TEST(LoraLayer, FromLinearQuantizesAsTheBaseLayerDoes) {
  torch::manual_seed(3);
  torch::nn::Linear lin(96, 40);
  const auto opts = msbnb::nn::Linear4bitOptions(96, 40).quant_type("nf4").compress_statistics(true);
  auto q = Linear4bitWithLoRA::from_linear(lin, LoraConfig(), opts);
  auto ref = msbnb::nn::Linear4bit::from_linear(lin, opts);
  msbnb::lora::test::expect_buffers_identical(*q->base_layer(), *ref);
  EXPECT_TRUE(torch::equal(q->base_layer()->bias, ref->bias));
  auto q8 = Linear8bitWithLoRA::from_linear(lin);
  msbnb::lora::test::expect_buffers_identical(*q8->base_layer(), *msbnb::nn::Linear8bit::from_linear(lin));
}

TEST(LoraLayer, KaimingInitIsTorchLinearsAndBIsZero) {
  torch::manual_seed(4);
  const int64_t in = 1024;
  LoRALinear l(in, 16, LoraConfig().r(8));
  EXPECT_EQ(l->lora_B().abs().max().item<float>(), 0.0f);
  // kaiming_uniform_(a = sqrt(5)): U(-bound, bound), bound = sqrt(6 / ((1 + a^2) fan_in)) = 1 / sqrt(fan_in).
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  const double amax = l->lora_A().abs().max().item<double>();
  EXPECT_LE(amax, bound);
  // 8192 draws: the largest |U| is within bound * (1 - 1e-3) with probability 1 - (1 - 1e-3)^8192 > 0.9997.
  EXPECT_GT(amax, bound * (1 - 1e-3));
}

TEST(LoraLayer, GaussianInitHasStdOneOverR) {
  torch::manual_seed(5);
  const int64_t r = 4, in = 2048;
  LoRALinear l(in, 8, LoraConfig().r(r).init("gaussian"));
  EXPECT_EQ(l->lora_B().abs().max().item<float>(), 0.0f);
  const double sigma = 1.0 / r, n = static_cast<double>(r * in);
  // The sample std of n normal draws has std ~ sigma / sqrt(2 n): allow 5 of those.
  EXPECT_NEAR(l->lora_A().std().item<double>(), sigma, 5 * sigma / std::sqrt(2 * n));
  EXPECT_NEAR(l->lora_A().mean().item<double>(), 0.0, 5 * sigma / std::sqrt(n));
}

TEST(LoraLayer, ForwardAtInitIsTheBaseBitForBit) {
  torch::manual_seed(6);
  const torch::Tensor x = torch::randn({5, 64});
  LoRALinear f(64, 24);
  EXPECT_TRUE(torch::equal(f->forward(x), f->base_layer()->forward(x)));
  auto q = Linear4bitWithLoRA::from_linear(torch::nn::Linear(64, 24), LoraConfig(),
                                           msbnb::nn::Linear4bitOptions(64, 24).quant_type("nf4"));
  EXPECT_TRUE(torch::equal(q->forward(x), q->base_layer()->forward(x)));
}

// y = base(x) + s (x Aᵀ) Bᵀ against a double reference, tolerance gamma(K + r + 2) (|x| M + |b|)
// (lora_test_util.h; derivation in lora_train_test.cpp).
void check_forward(LoraLayer& l, const torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& W,
                   const torch::Tensor& b) {
  const torch::Tensor A = f64(l.lora_A()), B = f64(l.lora_B());
  torch::Tensor ref = f64(x).matmul(f64(W).t()) + l.scaling() * f64(x).matmul(A.t()).matmul(B.t());
  if (b.defined()) ref = ref + f64(b);
  const torch::Tensor tol =
      msbnb::lora::test::local_forward_bound(f64(x), f64(W), b.defined() ? f64(b) : b, A, B, l.scaling());
  EXPECT_TRUE(((f64(y) - ref).abs() <= tol).all().item<bool>())
      << "max err " << (f64(y) - ref).abs().max().item<double>() << " max tol " << tol.max().item<double>();
}

TEST(LoraLayer, ForwardIsBasePlusScaledLowRankUpdate) {
  torch::manual_seed(7);
  const torch::Tensor x = torch::randn({3, 5, 64});
  for (bool rslora : {false, true}) {
    const auto cfg = LoraConfig().r(4).lora_alpha(12).use_rslora(rslora);
    LoRALinear f(64, 24, cfg);
    msbnb::lora::test::randomize_lora(*f);
    EXPECT_DOUBLE_EQ(f->scaling(), rslora ? 6.0 : 3.0);
    check_forward(*f, f->forward(x), x, f->base_layer()->weight, f->base_layer()->bias);
    auto q4 = Linear4bitWithLoRA::from_linear(torch::nn::Linear(64, 24), cfg,
                                              msbnb::nn::Linear4bitOptions(64, 24).quant_type("nf4"));
    msbnb::lora::test::randomize_lora(*q4);
    check_forward(*q4, q4->forward(x), x, q4->base_weight(), q4->base_layer()->bias);
    auto q8 = Linear8bitWithLoRA::from_linear(torch::nn::Linear(64, 24), cfg,
                                              msbnb::nn::Linear8bitOptions(64, 24).threshold(0.0));
    msbnb::lora::test::randomize_lora(*q8);
    check_forward(*q8, q8->forward(x), x, q8->base_weight(), q8->base_layer()->bias);
  }
}

TEST(LoraLayer, HalfInputsLoraInFloat32ResultInInputDtype) {
  torch::manual_seed(8);
  auto q = Linear4bitWithLoRA::from_linear(torch::nn::Linear(64, 24), LoraConfig().r(4).lora_alpha(8),
                                           msbnb::nn::Linear4bitOptions(64, 24).quant_type("nf4"));
  msbnb::lora::test::randomize_lora(*q);
  for (auto dt : {torch::kBFloat16, torch::kFloat16}) {
    const torch::Tensor x = torch::randn({4, 64}).to(dt);
    const torch::Tensor y = q->forward(x);
    EXPECT_EQ(y.scalar_type(), dt);
    // The documented order: the base in x's dtype, the LoRA branch in float32, the sum in float32,
    // rounded once to x's dtype.
    const torch::Tensor xf = x.to(torch::kFloat32);
    const torch::Tensor lora = torch::linear(torch::linear(xf, q->lora_A()), q->lora_B()) * q->scaling();
    const torch::Tensor expected = (q->base_layer()->forward(x).to(torch::kFloat32) + lora).to(dt);
    EXPECT_TRUE(torch::equal(y, expected));
  }
}

TEST(LoraLayer, DropoutOnlyInTraining) {
  torch::manual_seed(9);
  LoRALinear l(64, 16, LoraConfig().r(4).lora_dropout(0.5));
  msbnb::lora::test::randomize_lora(*l);
  const torch::Tensor x = torch::randn({8, 64});
  l->eval();
  const torch::Tensor e1 = l->forward(x), e2 = l->forward(x);
  EXPECT_TRUE(torch::equal(e1, e2));
  l->train();
  const torch::Tensor t1 = l->forward(x);
  EXPECT_FALSE(torch::allclose(t1, e1));
  // Dropout acts on the LoRA input only: with B = 0 training output is the base.
  {
    torch::NoGradGuard g;
    l->lora_B().zero_();
  }
  EXPECT_TRUE(torch::equal(l->forward(x), l->base_layer()->forward(x)));
  // p = 0 in train mode: no dropout.
  LoRALinear z(64, 16, LoraConfig().r(4));
  msbnb::lora::test::randomize_lora(*z);
  z->train();
  const torch::Tensor a = z->forward(x);
  z->eval();
  EXPECT_TRUE(torch::equal(a, z->forward(x)));
}

TEST(LoraLayer, CloneIsIndependentWithSameOutputs) {
  torch::manual_seed(10);
  const torch::Tensor x = torch::randn({3, 64});
  auto q = Linear4bitWithLoRA::from_linear(torch::nn::Linear(64, 24), LoraConfig().r(4),
                                           msbnb::nn::Linear4bitOptions(64, 24).quant_type("nf4"));
  msbnb::lora::test::randomize_lora(*q);
  auto c = std::dynamic_pointer_cast<Linear4bitWithLoRAImpl>(q->clone());
  ASSERT_NE(c, nullptr);
  EXPECT_TRUE(torch::equal(c->forward(x), q->forward(x)));
  EXPECT_NE(c->lora_A().data_ptr(), q->lora_A().data_ptr());
  EXPECT_NE(c->base_layer().ptr().get(), q->base_layer().ptr().get());
  {
    torch::NoGradGuard g;
    c->lora_B().add_(1.0);
  }
  EXPECT_FALSE(torch::equal(c->forward(x), q->forward(x)));
  LoRALinear f(8, 4);
  auto fc = std::dynamic_pointer_cast<LoRALinearImpl>(f->clone());
  EXPECT_TRUE(torch::equal(fc->base_layer()->weight, f->base_layer()->weight));
  EXPECT_NE(fc->base_layer()->weight.data_ptr(), f->base_layer()->weight.data_ptr());
}

TEST(LoraLayer, PrettyPrint) {
  std::ostringstream s;
  LoRALinear(512, 256, LoraConfig().r(8).lora_alpha(16))->pretty_print(s);
  EXPECT_EQ(s.str(),
            "msbnb::lora::LoRALinear(in_features=512, out_features=256, r=8, lora_alpha=16, scaling=2, "
            "lora_dropout=0, use_rslora=false, merged=false)");
  std::ostringstream t;
  Linear4bitWithLoRA(msbnb::nn::Linear4bitOptions(64, 8))->pretty_print(t);
  EXPECT_EQ(t.str(),
            "msbnb::lora::Linear4bitWithLoRA(in_features=64, out_features=8, r=8, lora_alpha=8, scaling=1, "
            "lora_dropout=0, use_rslora=false, merged=false)");
}

TEST(LoraLayer, WrapWithLoraPicksTheLayerAndSharesTheBase) {
  const LoraConfig cfg = LoraConfig().r(2);
  torch::nn::Linear lin(16, 8);
  auto a = wrap_with_lora(lin.ptr(), cfg);
  auto* la = dynamic_cast<LoRALinearImpl*>(a.ptr().get());
  ASSERT_NE(la, nullptr);
  EXPECT_EQ(la->base_layer().ptr().get(), lin.ptr().get());
  msbnb::nn::Linear8bit l8(16, 8);
  EXPECT_NE(dynamic_cast<Linear8bitWithLoRAImpl*>(wrap_with_lora(l8.ptr(), cfg).ptr().get()), nullptr);
  auto nf4 = msbnb::nn::LinearNF4(64, 8);
  auto w4 = wrap_with_lora(nf4.ptr(), cfg);
  EXPECT_NE(dynamic_cast<Linear4bitWithLoRAImpl*>(w4.ptr().get()), nullptr);
  EXPECT_EQ(w4.forward(torch::randn({2, 64})).sizes(), (std::vector<int64_t>{2, 8}));
  EXPECT_NE(as_lora_layer(*w4.ptr()), nullptr);
  EXPECT_EQ(as_lora_layer(*lin), nullptr);
  // Not a linear layer; already a LoRA layer; nothing.
  expect_error([&] { wrap_with_lora(torch::nn::Conv1d(4, 4, 3).ptr(), cfg); },
               {"wrap_with_lora", "base", "torch::nn::Linear", "Conv1d"});
  expect_error([&] { wrap_with_lora(torch::nn::Embedding(10, 4).ptr(), cfg); }, {"base", "Embedding"});
  expect_error([&] { wrap_with_lora(a.ptr(), cfg); }, {"base", "already has an adapter"});
  expect_error([&] { wrap_with_lora(nullptr, cfg); }, {"base", "nullptr"});
  expect_error([&] { wrap_with_lora(lin.ptr(), LoraConfig().r(-1)); }, {"LoraConfig.r", "-1"});
}

}  // namespace
