// Linear8bit / Linear4bit: forward and backward against torch through the dequantized weight,
// libtorch module behaviour (clone, to, train/eval, threads, save/load), bad input, memory.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <sstream>
#include <thread>

#include "nn/nn_test_util.h"

namespace msbnb::nn::test {
namespace {

constexpr uint64_t kSeed = 1234;

// ---------------------------------------------------------------------------------------------
// pretty_print and options

TEST(NnLinear, PrettyPrintIsTorchStyle) {
  std::ostringstream a;
  a << *Linear4bit(Linear4bitOptions(4096, 4096).bias(false).quant_type("nf4"));
  EXPECT_EQ(
      a.str(),
      "msbnb::nn::Linear4bit(in_features=4096, out_features=4096, bias=false, quant_type=nf4, blocksize=64)");
  std::ostringstream b;
  b << *Linear4bit(Linear4bitOptions(100, 172).quant_type("int4").symmetric(false));
  EXPECT_EQ(
      b.str(),
      "msbnb::nn::Linear4bit(in_features=100, out_features=172, bias=true, quant_type=int4, blocksize=128, "
      "symmetric=false)");
  std::ostringstream c;
  c << *Linear8bit(Linear8bitOptions(4096, 1024).bias(false));
  EXPECT_EQ(c.str(), "msbnb::nn::Linear8bit(in_features=4096, out_features=1024, bias=false, threshold=6)");
  std::ostringstream d;
  d << *Linear8bit(Linear8bitOptions(3, 5).threshold(0.0));
  EXPECT_EQ(d.str(), "msbnb::nn::Linear8bit(in_features=3, out_features=5, bias=true, threshold=0)");
}

TEST(NnLinear, DefaultsAreBitsandbytes) {
  Linear4bitOptions o(64, 32);
  EXPECT_EQ(o.quant_type(), "fp4");
  EXPECT_TRUE(o.compress_statistics());
  EXPECT_TRUE(o.bias());
  EXPECT_EQ(o.effective_blocksize(), 64);
  EXPECT_EQ(Linear4bitOptions(64, 32).quant_type("int4").effective_blocksize(), 128);
  Linear8bitOptions e(64, 32);
  EXPECT_EQ(e.threshold(), 6.0);
  EXPECT_FALSE(e.has_fp16_weights());
  EXPECT_EQ(LinearNF4(64, 32)->options.quant_type(), "nf4");
  EXPECT_EQ(LinearFP4(64, 32, false)->options.quant_type(), "fp4");
  EXPECT_FALSE(LinearFP4(64, 32, false)->options.bias());
  EXPECT_EQ(LinearNF4(64, 32, true, false, torch::kBFloat16, 128)->options.effective_blocksize(), 128);
}

// ---------------------------------------------------------------------------------------------
// What the module holds

TEST(NnLinear, HoldsOnlyPackedBuffersAndBias) {
  for (const Fmt& f : all_formats()) {
    SCOPED_TRACE(f.name());
    torch::manual_seed(kSeed);
    auto m = make_layer(f, 100, 172, true, torch::randn({172, 100}));
    ASSERT_EQ(m->parameters().size(), 1u);  // the bias only
    EXPECT_TRUE(m->parameters()[0].requires_grad());
    EXPECT_EQ(m->parameters()[0].scalar_type(), torch::kFloat32);
    for (const auto& b : m->named_buffers()) {
      EXPECT_FALSE(b.value().requires_grad()) << b.key();
      EXPECT_FALSE(b.key().find("weight_") == std::string::npos) << b.key();
    }
    // No float copy of the weight: the buffers are under half the float32 weight (int8: 1 byte a weight + row
    // padding).
    int64_t bytes = 0;
    for (const auto& b : m->buffers()) bytes += b.numel() * static_cast<int64_t>(b.element_size());
    EXPECT_LT(bytes, 172 * 100 * 4 / 2);
  }
}

TEST(NnLinear, MemoryAgainstBitsandbytes) {
  // bitsandbytes 0.50.2 Linear4bit(4096, 4096, bias=False, quant_type="nf4") state dict bytes,
  // quantized on the CPU (tensors only, JSON excluded; command in the report):
  //   compress_statistics=True:  weight 8,388,608 + absmax 262,144 + quant_map 64
  //                              + nested_absmax 4,096 + nested_quant_map 1,024 = 8,655,936
  //   compress_statistics=False: weight 8,388,608 + absmax 1,048,576 + quant_map 64 = 9,437,248
  const int64_t bnb_dq = 8655936, bnb_plain = 9437248;
  for (bool dq : {true, false}) {
    Linear4bit m(Linear4bitOptions(4096, 4096).bias(false).quant_type("nf4").compress_statistics(dq));
    const int64_t bytes = m->memory_bytes();
    const int64_t bnb = dq ? bnb_dq : bnb_plain;
    std::cout << "[ msbnb    ] Linear4bit nf4 4096x4096 compress_statistics=" << dq << ": " << bytes
              << " bytes, bitsandbytes " << bnb << " (ratio " << static_cast<double>(bytes) / bnb << ")\n";
    // The kernels' layout pads codes to 64-byte rows of tiles and the stats of the last block:
    // at most 1 % over the interchange bytes at this shape.
    EXPECT_LE(bytes, bnb + bnb / 100);
    int64_t sum = 0;
    for (const auto& b : m->buffers()) sum += b.numel() * static_cast<int64_t>(b.element_size());
    EXPECT_EQ(bytes, sum);
  }
  Linear8bit e(Linear8bitOptions(4096, 4096).bias(false));
  std::cout << "[ msbnb    ] Linear8bit 4096x4096: " << e->memory_bytes()
            << " bytes, bitsandbytes CB + SCB 16793600\n";
  EXPECT_LE(e->memory_bytes(), 16793600 + 16793600 / 100);
}

// ---------------------------------------------------------------------------------------------
// Forward

// Every format, odd shapes, three input dtypes, leading dims: the module's output equals the
// functional call it wraps bit for bit, and x · dequant(W)ᵀ + b within the fp32 summation bound
// (LLM.int8 with outliers is only compared with int8_matmul: it quantizes x).
TEST(NnLinear, ForwardMatchesDequantizedWeight) {
  for (const Fmt& f : all_formats()) {
    for (int64_t in : {100, 33, 4097}) {
      for (bool bias : {true, false}) {
        SCOPED_TRACE(f.name() + " in=" + std::to_string(in) + " bias=" + std::to_string(bias));
        torch::manual_seed(kSeed);
        const int64_t out = 172;
        auto m = make_layer(f, in, out, bias, torch::randn({out, in}));
        const torch::Tensor w = dequantized(m);
        ASSERT_EQ(w.sizes(), (std::vector<int64_t>{out, in}));
        ASSERT_EQ(w.scalar_type(), torch::kFloat32);
        torch::Tensor b = bias ? m->named_parameters()["bias"] : torch::Tensor();
        for (torch::Dtype dt : {torch::kFloat32, torch::kFloat16, torch::kBFloat16}) {
          torch::NoGradGuard no_grad;
          const torch::Tensor x = torch::randn({2, 3, in}).to(dt);
          const torch::Tensor y = forward(m, x);
          ASSERT_EQ(y.sizes(), (std::vector<int64_t>{2, 3, out}));
          ASSERT_EQ(y.scalar_type(), dt);
          auto l8 = std::dynamic_pointer_cast<Linear8bitImpl>(m);
          if (l8 && f.threshold > 0) {
            EXPECT_TRUE(torch::equal(y, int8_matmul(x, l8->packed_weight(), f.threshold, b).out));
            continue;
          }
          const PackedWeight pw =
              l8 ? l8->packed_weight() : std::dynamic_pointer_cast<Linear4bitImpl>(m)->packed_weight();
          EXPECT_TRUE(torch::equal(y, quantized_matmul(x, pw, b)));
          const torch::Tensor xf = x.to(torch::kFloat32);
          torch::Tensor ref = torch::matmul(xf.to(torch::kDouble), w.to(torch::kDouble).t());
          if (bias) ref = ref + b.to(torch::kDouble);
          const torch::Tensor tol =
              sum_tolerance(xf.abs().reshape({-1, in}), w.abs(), in, ref.abs().reshape({-1, out}), dt)
                  .reshape({2, 3, out});
          expect_within(y, ref, tol, f.name() + " " + c10::toString(dt));
        }
      }
    }
  }
}

TEST(NnLinear, ComputeDtypeRunsTheProductInIt) {
  torch::manual_seed(kSeed);
  Linear4bit m(Linear4bitOptions(64, 40).quant_type("nf4").compute_dtype(torch::kBFloat16));
  m->quantize_weights(torch::randn({40, 64}));
  torch::NoGradGuard no_grad;
  const torch::Tensor x = torch::randn({5, 64});
  const torch::Tensor y = m->forward(x);
  EXPECT_EQ(y.scalar_type(), torch::kFloat32);  // bitsandbytes: back to the input dtype
  EXPECT_TRUE(torch::equal(
      y, quantized_matmul(x.to(torch::kBFloat16), m->packed_weight(), m->bias).to(torch::kFloat32)));
}

TEST(NnLinear, FromLinearKeepsBiasAndQuantizesWeight) {
  torch::manual_seed(kSeed);
  torch::nn::Linear lin(torch::nn::LinearOptions(100, 172));
  for (const std::string qt : {"nf4", "fp4", "int4"}) {
    SCOPED_TRACE(qt);
    auto m = Linear4bit::from_linear(lin, Linear4bitOptions(1, 1).quant_type(qt).bias(false));
    EXPECT_EQ(m->options.in_features(), 100);
    EXPECT_EQ(m->options.out_features(), 172);
    ASSERT_TRUE(m->bias.defined());
    EXPECT_TRUE(torch::equal(m->bias, lin->bias.detach()));
    EXPECT_NE(m->bias.data_ptr(), lin->bias.data_ptr());  // its own parameter
    const Quantized4bit q =
        quantize_4bit(lin->weight.detach(), Quantize4bitOptions().quant_type(qt).compress_statistics(true));
    EXPECT_TRUE(torch::equal(m->dequantize_weights(), dequantize_4bit(q.data, q.state)));
  }
  auto e = Linear8bit::from_linear(lin);
  EXPECT_EQ(e->options.threshold(), 6.0);
  EXPECT_TRUE(torch::equal(e->bias, lin->bias.detach()));
  const Int8VectorwiseQuant q = int8_vectorwise_quant(lin->weight.detach());
  auto [cb, scb] = e->packed_weight().to_int8_scb();
  EXPECT_TRUE(torch::equal(cb, q.CB));
  EXPECT_TRUE(torch::equal(scb, q.SCB));
  torch::nn::Linear nobias(torch::nn::LinearOptions(8, 4).bias(false));
  EXPECT_FALSE(Linear4bit::from_linear(nobias)->bias.defined());
  EXPECT_FALSE(Linear8bit::from_linear(nobias)->bias.defined());
}

TEST(NnLinear, ZerosUntilQuantized) {
  Linear4bit m(Linear4bitOptions(33, 7).quant_type("nf4").bias(false));
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::equal(m->forward(torch::randn({3, 33})), torch::zeros({3, 7})));
  Linear8bit e(Linear8bitOptions(33, 7).bias(false));
  EXPECT_TRUE(torch::equal(e->forward(torch::randn({3, 33})), torch::zeros({3, 7})));
}

// ---------------------------------------------------------------------------------------------
// Backward

TEST(NnLinear, BackwardMatchesAutogradThroughDequantizedWeight) {
  for (const Fmt& f : all_formats()) {
    for (torch::Dtype dt : {torch::kFloat32, torch::kFloat16, torch::kBFloat16}) {
      SCOPED_TRACE(f.name() + " " + c10::toString(dt));
      torch::manual_seed(kSeed);
      const int64_t in = 100, out = 172, rows = 6;
      auto m = make_layer(f, in, out, true, torch::randn({out, in}));
      const torch::Tensor w = dequantized(m);
      torch::Tensor bias = m->named_parameters()["bias"];
      const torch::Tensor x0 = torch::randn({2, 3, in}).to(dt);
      const torch::Tensor gy = torch::randn({2, 3, out}).to(dt);
      torch::Tensor x = x0.clone().requires_grad_(true);
      forward(m, x).backward(gy);
      ASSERT_TRUE(x.grad().defined());
      ASSERT_EQ(x.grad().scalar_type(), dt);
      ASSERT_TRUE(bias.grad().defined());
      ASSERT_EQ(bias.grad().scalar_type(), torch::kFloat32);
      // Reference: torch autograd through the dequantized weight, in double.
      torch::Tensor xr = x0.to(torch::kDouble).requires_grad_(true);
      torch::Tensor br = bias.detach().to(torch::kDouble).requires_grad_(true);
      torch::nn::functional::linear(xr, w.to(torch::kDouble), br).backward(gy.to(torch::kDouble));
      // grad_x = gy · W, `out` terms summed in fp32, rounded to x's dtype; grad_bias = the sum of
      // `rows` rows of gy in fp32.
      expect_within(x.grad(), xr.grad(),
                    sum_tolerance(gy.to(torch::kFloat32).abs().reshape({-1, out}), w.abs().t(), out,
                                  xr.grad().abs().reshape({-1, in}), dt)
                        .reshape({2, 3, in}),
                    "grad_x");
      const torch::Tensor gb_tol =
          2.0 * (rows + 2) * std::ldexp(1.0, -24) *
              gy.to(torch::kFloat32).abs().reshape({-1, out}).sum(0).to(torch::kDouble) +
          1e-30;
      expect_within(bias.grad(), br.grad(), gb_tol, "grad_bias");
      bias.mutable_grad().reset();
    }
  }
}

// Backward uses the weight the forward used, even if the layer is re-quantized (its buffers'
// storage replaced) in between.
TEST(NnLinear, BackwardAfterRequantizeUsesTheForwardsWeight) {
  for (const Fmt& f : {Fmt{"nf4", true}, Fmt{"int4", false, false}, Fmt{"int8", false, true, 6.0}}) {
    SCOPED_TRACE(f.name());
    torch::manual_seed(kSeed);
    auto m = make_layer(f, 100, 40, false, torch::randn({40, 100}));
    auto ref = m->clone();
    const torch::Tensor x0 = torch::randn({3, 100}), gy = torch::randn({3, 40});
    torch::Tensor x = x0.clone().requires_grad_(true), xr = x0.clone().requires_grad_(true);
    const torch::Tensor y = forward(m, x);
    if (auto p = std::dynamic_pointer_cast<Linear4bitImpl>(m)) p->quantize_weights(torch::randn({40, 100}));
    if (auto p = std::dynamic_pointer_cast<Linear8bitImpl>(m)) p->quantize_weights(torch::randn({40, 100}));
    std::vector<torch::Tensor> churn;  // reuse what the old buffers freed, if anything did
    for (int i = 0; i < 8; ++i) churn.push_back(torch::full({40 * 128}, 1e30f));
    y.backward(gy);
    forward(ref, xr).backward(gy);
    EXPECT_TRUE(torch::equal(x.grad(), xr.grad()));
  }
}

TEST(NnLinear, QuantizedWeightIsNeverTrainable) {
  auto m = make_layer({"nf4", true}, 64, 32, false, torch::randn({32, 64}));
  EXPECT_TRUE(m->parameters().empty());
  torch::Tensor x = torch::randn({4, 64}).requires_grad_(true);
  forward(m, x).sum().backward();
  for (const auto& b : m->buffers()) EXPECT_FALSE(b.grad().defined());
  EXPECT_TRUE(x.grad().defined());
}

// ---------------------------------------------------------------------------------------------
// libtorch behaviour

TEST(NnLinear, CloneGivesIdenticalOutputsAndIndependentStorage) {
  for (const Fmt& f : all_formats()) {
    SCOPED_TRACE(f.name());
    torch::manual_seed(kSeed);
    auto m = make_layer(f, 100, 172, true, torch::randn({172, 100}));
    const torch::Tensor x = torch::randn({5, 100});
    torch::NoGradGuard no_grad;
    const torch::Tensor y = forward(m, x);
    auto c = m->clone();
    EXPECT_TRUE(torch::equal(forward(c, x), y));
    const auto mb = m->named_buffers(), cb = c->named_buffers();
    ASSERT_EQ(mb.size(), cb.size());
    for (const auto& b : mb) {
      ASSERT_TRUE(cb.contains(b.key()));
      EXPECT_NE(b.value().data_ptr(), cb[b.key()].data_ptr()) << b.key();
      EXPECT_TRUE(same_bytes(b.value(), cb[b.key()])) << b.key();
    }
    // Independent: zeroing the clone's buffers and bias changes only the clone.
    for (auto& b : c->buffers()) b.zero_();
    for (auto& p : c->parameters()) p.zero_();
    EXPECT_TRUE(torch::equal(forward(m, x), y));
    EXPECT_TRUE(torch::equal(forward(c, x), torch::zeros_like(y)));
  }
}

TEST(NnLinear, ToDtypeConvertsOnlyTheBias) {
  for (const Fmt& f : all_formats()) {
    SCOPED_TRACE(f.name());
    torch::manual_seed(kSeed);
    auto m = make_layer(f, 100, 40, true, torch::randn({40, 100}));
    std::vector<std::pair<std::string, torch::Tensor>> before;
    for (const auto& b : m->named_buffers()) before.emplace_back(b.key(), b.value().clone());
    const torch::Tensor bias = m->named_parameters()["bias"].detach().clone();
    // Through a parent, as a model's to() reaches it.
    torch::nn::Module parent;
    parent.register_module("child", m);
    parent.to(torch::kBFloat16);
    for (const auto& [k, t] : before) EXPECT_TRUE(same_bytes(m->named_buffers()[k], t)) << k;
    EXPECT_EQ(m->named_parameters()["bias"].scalar_type(), torch::kBFloat16);
    EXPECT_TRUE(torch::equal(m->named_parameters()["bias"], bias.to(torch::kBFloat16)));
    torch::NoGradGuard no_grad;
    const torch::Tensor x = torch::randn({3, 100}, torch::kBFloat16);
    EXPECT_EQ(forward(m, x).scalar_type(), torch::kBFloat16);
    m->to(torch::kFloat32);
    m->to(torch::Device(torch::kCPU));
    m->to(torch::Device(torch::kCPU), torch::kFloat16);
    for (const auto& [k, t] : before) EXPECT_TRUE(same_bytes(m->named_buffers()[k], t)) << k;
    EXPECT_EQ(m->named_parameters()["bias"].scalar_type(), torch::kFloat16);
  }
}

TEST(NnLinear, ToCudaAndIntegerDtypesThrow) {
  Linear4bit m(Linear4bitOptions(64, 32).quant_type("nf4"));
  expect_error([&] { m->to(torch::kCUDA); },
               {"Linear4bit", "expected device cpu", "cuda", "CUDA kernels do not exist yet"});
  expect_error([&] { m->to(torch::Device(torch::kCUDA, 0), torch::kFloat16); },
               {"cuda:0", "CUDA kernels do not exist yet"});
  expect_error([&] { m->to(torch::kInt32); },
               {"Linear4bit", "expected dtype float32, float16 or bfloat16", "Int"});
  Linear8bit e(Linear8bitOptions(64, 32));
  expect_error([&] { e->to(torch::kCUDA); }, {"Linear8bit", "CUDA kernels do not exist yet"});
  expect_error([&] { e->to(torch::kInt8); }, {"Linear8bit", "Char"});
  // A parent's to(device) reaches the layer and throws too.
  torch::nn::Sequential seq(m);
  expect_error([&] { seq->to(torch::kCUDA); }, {"CUDA kernels do not exist yet"});
}

TEST(NnLinear, TrainEvalAsTorch) {
  torch::manual_seed(kSeed);
  auto m = make_layer({"fp4", true}, 64, 32, true, torch::randn({32, 64}));
  torch::NoGradGuard no_grad;
  const torch::Tensor x = torch::randn({4, 64});
  EXPECT_TRUE(m->is_training());
  const torch::Tensor y = forward(m, x);
  m->eval();
  EXPECT_FALSE(m->is_training());
  EXPECT_TRUE(torch::equal(forward(m, x), y));
  m->train();
  EXPECT_TRUE(m->is_training());
}

TEST(NnLinear, ForwardFromTwoThreadsIsIdentical) {
  for (const Fmt& f : {Fmt{"nf4", true}, Fmt{"int4", false, false}, Fmt{"int8", false, true, 6.0}}) {
    SCOPED_TRACE(f.name());
    torch::manual_seed(kSeed);
    auto m = make_layer(f, 256, 96, true, torch::randn({96, 256}));
    const torch::Tensor x = torch::randn({8, 256});
    const torch::Tensor ref = [&] {
      torch::NoGradGuard g;
      return forward(m, x);
    }();
    // A fresh clone: both threads race for the first rebuild of the packed weight.
    auto c = m->clone();
    torch::Tensor y1, y2;
    auto run = [&](torch::Tensor& y) {
      torch::NoGradGuard g;
      for (int i = 0; i < 20; ++i) y = forward(c, x);
    };
    std::thread t1(run, std::ref(y1)), t2(run, std::ref(y2));
    t1.join();
    t2.join();
    EXPECT_TRUE(torch::equal(y1, ref));
    EXPECT_TRUE(torch::equal(y2, ref));
  }
}

TEST(NnLinear, TorchSaveLoadRebuildsOverLoadedBuffers) {
  for (const Fmt& f : {Fmt{"nf4", true}, Fmt{"int4", true, false}, Fmt{"int8", false, true, 0.0}}) {
    SCOPED_TRACE(f.name());
    torch::manual_seed(kSeed);
    auto m = make_layer(f, 100, 40, true, torch::randn({40, 100}));
    std::stringstream ss;
    {
      torch::serialize::OutputArchive ar;
      m->save(ar);
      ar.save_to(ss);
    }
    auto fresh = make_layer(f, 100, 40, true, torch::randn({40, 100}));
    const torch::Tensor x = torch::randn({3, 100});
    torch::NoGradGuard no_grad;
    (void)forward(fresh, x);  // builds the packed weight over the old buffers first
    torch::serialize::InputArchive ar;
    ar.load_from(ss);
    fresh->load(ar);
    EXPECT_TRUE(torch::equal(forward(fresh, x), forward(m, x)));
  }
}

TEST(NnLinear, Linear8bitWithFloatWeightsTrainsThenQuantizes) {
  torch::manual_seed(kSeed);
  Linear8bit m(Linear8bitOptions(64, 32).has_fp16_weights(true));
  EXPECT_FALSE(m->is_quantized());
  ASSERT_TRUE(m->weight.defined());
  EXPECT_EQ(m->parameters().size(), 2u);
  EXPECT_TRUE(m->buffers().empty());
  const torch::Tensor x = torch::randn({4, 64});
  m->forward(x).sum().backward();
  EXPECT_TRUE(m->weight.grad().defined());  // trainable while float
  const torch::Tensor w = m->weight.detach().clone();
  {
    torch::NoGradGuard g;
    EXPECT_TRUE(torch::allclose(m->forward(x), torch::nn::functional::linear(x, w, m->bias), 0, 0));
  }
  // The float layer clones as a float layer.
  auto c = std::dynamic_pointer_cast<Linear8bitImpl>(m->clone());
  EXPECT_FALSE(c->is_quantized());
  m->quantize_weights();
  EXPECT_TRUE(m->is_quantized());
  EXPECT_FALSE(m->weight.defined());
  EXPECT_EQ(m->parameters().size(), 1u);  // the float weight is gone
  EXPECT_FALSE(m->buffers().empty());
  const Int8VectorwiseQuant q = int8_vectorwise_quant(w);
  auto [cb, scb] = m->packed_weight().to_int8_scb();
  EXPECT_TRUE(torch::equal(cb, q.CB));
  EXPECT_TRUE(torch::equal(scb, q.SCB));
  torch::NoGradGuard g;
  EXPECT_TRUE(torch::equal(m->forward(x), int8_matmul(x, m->packed_weight(), 6.0, m->bias).out));
  auto c2 = m->clone();
  EXPECT_TRUE(torch::equal(std::dynamic_pointer_cast<Linear8bitImpl>(c2)->forward(x), m->forward(x)));
  expect_error([&] { m->quantize_weights(); },
               {"quantize_weights", "has_fp16_weights=true", "got a quantized layer"});
}

// ---------------------------------------------------------------------------------------------
// Bad input

TEST(NnLinear, BadInputNamesArgumentExpectedAndGot) {
  Linear4bit m(Linear4bitOptions(100, 172).quant_type("nf4"));
  Linear8bit e(Linear8bitOptions(100, 172));
  for (auto fwd : std::vector<std::function<torch::Tensor(const torch::Tensor&)>>{
           [&](const torch::Tensor& x) { return m->forward(x); },
           [&](const torch::Tensor& x) { return e->forward(x); }}) {
    expect_error(
        [&] {
          fwd(torch::randn({3, 99}));
        },
        {"x", "expected last dimension 100", "in_features", "[3, 99]"});
    expect_error(
        [&] {
          fwd(torch::ones({3, 100}, torch::kInt32));
        },
        {"x", "float32, float16 or bfloat16", "Int"});
    expect_error([&] { fwd(torch::ones({3, 100}, torch::kDouble)); }, {"x", "Double"});
    expect_error([&] { fwd(torch::empty({3, 100}, torch::Device(torch::kMeta))); }, {"x", "CPU", "meta"});
    expect_error([&] { fwd(torch::Tensor()); }, {"x", "undefined"});
  }
  for (auto q : std::vector<std::function<void(const torch::Tensor&)>>{
           [&](const torch::Tensor& w) { m->quantize_weights(w); },
           [&](const torch::Tensor& w) { e->quantize_weights(w); }}) {
    expect_error(
        [&] {
          q(torch::randn({100, 172}));
        },
        {"weight", "[172, 100]", "out_features", "[100, 172]"});
    expect_error([&] { q(torch::randn({172})); }, {"weight", "[172, 100]", "[172]"});
    torch::Tensor nan = torch::randn({172, 100});
    nan[3][7] = std::nan("");
    expect_error([&] { q(nan); }, {"weight", "finite", "NaN"});
    torch::Tensor inf = torch::randn({172, 100});
    inf[0][0] = INFINITY;
    expect_error([&] { q(inf); }, {"weight", "finite", "Inf"});
    expect_error([&] { q(torch::ones({172, 100}, torch::kInt64)); }, {"weight", "float32", "Long"});
  }
  expect_error([] { Linear4bit(Linear4bitOptions(8, 8).quant_type("nf5")); }, {"quant_type", "nf4", "nf5"});
  expect_error([] { Linear4bit(Linear4bitOptions(8, 8).quant_type("nf4").blocksize(48)); },
               {"blocksize", "power of two", "48"});
  expect_error([] { Linear4bit(Linear4bitOptions(8, 8).quant_type("fp4").blocksize(8192)); },
               {"blocksize", "8192"});
  expect_error([] { Linear4bit(Linear4bitOptions(8, 8).quant_type("int4").blocksize(7)); },
               {"blocksize", "even", "7"});
  expect_error([] { Linear4bit(Linear4bitOptions(8, 8).quant_type("nf4").symmetric(false)); },
               {"symmetric", "nf4", "false"});
  expect_error([] { Linear4bit(Linear4bitOptions(0, 8)); }, {"in_features", "> 0", "0"});
  expect_error([] { Linear4bit(Linear4bitOptions(8, -1)); }, {"out_features", "> 0", "-1"});
  expect_error([] { Linear4bit(Linear4bitOptions(8, 8).compute_dtype(torch::kInt32)); },
               {"compute_dtype", "Int"});
  expect_error([] { Linear4bit(Linear4bitOptions(int64_t{1} << 31, int64_t{1} << 31)); },
               {"out_features * in_features", "2^59"});
  expect_error([] { Linear8bit(Linear8bitOptions(8, 8).threshold(-1)); }, {"threshold", ">= 0", "-1"});
  expect_error([] { Linear8bit(Linear8bitOptions(8, 8).threshold(NAN)); }, {"threshold", "finite"});
}

// matmul_path reaches the forward (int8: the same bits as the functional call on the layer's packed
// weight, not those of the exact path); the backward stays exact on every path.
TEST(NnLinear, Linear4bitMatmulPathInt8) {
  torch::manual_seed(kSeed);
  for (const std::string qt : {"nf4", "int4"}) {
    Linear4bit exact(Linear4bitOptions(256, 40).quant_type(qt));
    Linear4bit int8(Linear4bitOptions(256, 40).quant_type(qt).matmul_path(MatmulPath::int8));
    exact->quantize_weights(torch::randn({40, 256}));
    load_quantized_state_dict(*int8, quantized_state_dict(*exact));
    const torch::Tensor x8 = torch::randn({3, 256}).requires_grad_(true);
    const torch::Tensor xe = x8.detach().clone().requires_grad_(true);
    const torch::Tensor y8 = int8->forward(x8), ye = exact->forward(xe);
    {
      torch::NoGradGuard no_grad;
      EXPECT_TRUE(
          torch::equal(y8, msbnb::quantized_matmul(x8, int8->packed_weight(), int8->bias, MatmulPath::int8)))
          << qt;
      EXPECT_FALSE(torch::equal(y8, ye)) << qt << ": the int8 path gave the exact path's bits";
    }
    y8.sum().backward();
    ye.sum().backward();
    EXPECT_TRUE(torch::equal(x8.grad(), xe.grad())) << qt << ": backward";
  }
}

}  // namespace
}  // namespace msbnb::nn::test
