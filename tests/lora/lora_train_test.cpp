// Training through a frozen quantized base: the LoRA gradients (and the input's) of a 3-layer
// model over Linear4bitWithLoRA (nf4, double quant) / Linear8bitWithLoRA equal those of the same
// model over torch::nn::Linear holding the dequantized weights, within a derived bound; an AdamW
// step changes only the LoRA parameters and leaves the packed buffers bit-identical.
//
// THE TOLERANCE. Both models compute the same real function: the kernels decode exactly the
// weights dequantize_weights() gives (matmul path "automatic" = exact; Linear8bit with
// threshold 0), which the float model holds. They differ only in float32 summation order, so
// each is bounded against exact arithmetic and |g_quantized - g_float| <= 2 E, with E below.
// u = 2^-24, gamma_n = n u / (1 - n u): a float32 dot product of n terms, in any order, with or
// without FMA, is off by at most gamma_n · Σ|terms| (Higham, Accuracy and Stability, 3.1).
// First order throughout (products of two error terms are O(u²), far below the slack of these
// worst-case bounds). Layer i: x [n, K] -> y [n, N], y = x Wᵀ + b + s (x Aᵀ) Bᵀ, A [r, K], B [N, r].
//  Forward, given the computed input x̂ with error bound E_x:
//   base x̂Wᵀ + b: gamma_{K+1}(|x̂||W|ᵀ + |b|); LoRA h = x̂Aᵀ: gamma_K |x̂||A|ᵀ, then hBᵀ:
//   gamma_r |h||B|ᵀ <= gamma_r |x̂||A|ᵀ|B|ᵀ, times s: one rounding; the final add: one rounding.
//   Summed (gamma_a + gamma_b <= gamma_{a+b}): local = gamma_{K+r+2} (|x̂| M + |b|) with
//   M = |W|ᵀ + s|A|ᵀ|B|ᵀ; the exact function is linear in x, so E_y = E_x M + local.
//  ReLU is exact; the two models take the same branch wherever |z| > E_z (asserted), so
//   E_relu(z) = mask · E_z, and backward multiplies by the same mask exactly.
//  Loss Σ y ⊙ G (G fixed): dL/dy = G exactly.
//  Backward, given ĝ = dL/dy with bound E_g:
//   g_x = ĝ (W + s B A): base transposed product gamma_N |ĝ||W|, LoRA (ĝ s) B then · A:
//   gamma_{N+r+1} s|ĝ||B||A|, the two branches' sum one rounding:
//   E_gx = E_g Mᵀ + gamma_{N+r+2} |ĝ| Mᵀ.
//   g_B = s ĝᵀ h (h = x̂Aᵀ, length-n sums): E_gB = s [E_gᵀ |h| + |ĝ|ᵀ (E_x |A|ᵀ) +
//   gamma_{n+K+1} |ĝ|ᵀ |x̂||A|ᵀ].
//   g_A = ((ĝ s) B)ᵀ x̂: E_gA = s [(E_g|B|)ᵀ |x̂| + (|ĝ||B|)ᵀ E_x + gamma_{N+n+1} (|ĝ||B|)ᵀ |x̂|].
// The bounds are evaluated in double on the float model's values (first order: which model's
// values are used changes E by O(u)).
#include <gtest/gtest.h>

#include <vector>

#include "lora_test_util.h"

namespace {

using namespace msbnb::lora;
using msbnb::lora::test::f64;
using msbnb::lora::test::gamma;

struct LayerVals {
  torch::Tensor W, b, A, B;  // double
  double s = 1;
  int64_t K = 0, N = 0, r = 0;
};

// E bound on |computed - exact| of every gradient: per layer g_A, g_B, and g_x of the input.
struct Bounds {
  std::vector<torch::Tensor> gA, gB;
  torch::Tensor gx;
};

Bounds derive_bounds(const std::vector<LayerVals>& L, const torch::Tensor& x0, const torch::Tensor& G,
                     bool* same_branches) {
  *same_branches = true;
  const size_t n_layers = L.size();
  const int64_t n = x0.size(0);
  // Forward: values and bounds.
  std::vector<torch::Tensor> xs{f64(x0)}, Ex{torch::zeros_like(xs[0])}, masks;
  for (size_t i = 0; i < n_layers; ++i) {
    const LayerVals& l = L[i];
    const torch::Tensor M = l.W.abs().t() + l.s * l.A.abs().t().matmul(l.B.abs().t());
    const torch::Tensor z = xs[i].matmul(l.W.t()) + l.b + l.s * xs[i].matmul(l.A.t()).matmul(l.B.t());
    const torch::Tensor Ez = Ex[i].matmul(M) + gamma(l.K + l.r + 2) * (xs[i].abs().matmul(M) + l.b.abs());
    if (i + 1 < n_layers) {
      // The two models take the same ReLU branch wherever |z| > E_z (each is within E_z of z).
      if (!(z.abs() > Ez).all().item<bool>()) *same_branches = false;
      const torch::Tensor mask = (z > 0).to(torch::kDouble);
      masks.push_back(mask);
      xs.push_back(z * mask);
      Ex.push_back(Ez * mask);
    } else {
      masks.push_back(torch::ones_like(z));
    }
  }
  // Backward.
  Bounds out;
  out.gA.resize(n_layers);
  out.gB.resize(n_layers);
  torch::Tensor g = f64(G), Eg = torch::zeros_like(g);
  for (size_t j = n_layers; j-- > 0;) {
    const LayerVals& l = L[j];
    g = g * masks[j];
    Eg = Eg * masks[j];
    const torch::Tensor& x = xs[j];
    const torch::Tensor h = x.matmul(l.A.t());
    const torch::Tensor xa = x.abs().matmul(l.A.abs().t());
    out.gB[j] = l.s * (Eg.t().matmul(h.abs()) + g.abs().t().matmul(Ex[j].matmul(l.A.abs().t())) +
                       gamma(n + l.K + 1) * g.abs().t().matmul(xa));
    const torch::Tensor gb = g.abs().matmul(l.B.abs());
    out.gA[j] = l.s * ((Eg.matmul(l.B.abs())).t().matmul(x.abs()) + gb.t().matmul(Ex[j]) +
                       gamma(l.N + n + 1) * gb.t().matmul(x.abs()));
    const torch::Tensor Mt = l.W.abs() + l.s * l.B.abs().matmul(l.A.abs());
    const torch::Tensor gx = g.matmul(l.W) + l.s * g.matmul(l.B).matmul(l.A);
    Eg = Eg.matmul(Mt) + gamma(l.N + l.r + 2) * g.abs().matmul(Mt);
    g = gx;
  }
  out.gx = Eg;
  return out;
}

using MakeQuantized = std::function<torch::nn::AnyModule(const torch::nn::Linear&, const LoraConfig&)>;

// One attempt; false (nothing checked) when a ReLU input of this draw lies within its error bound
// of 0, where the derivation does not hold.
bool try_seed(const MakeQuantized& make, uint64_t seed) {
  torch::manual_seed(static_cast<int64_t>(seed));
  const std::vector<int64_t> dims = {72, 48, 40, 24};  // 72 and 40: short last blocks of 64
  const LoraConfig cfg = LoraConfig().r(4).lora_alpha(8);
  torch::nn::Sequential q, f;
  std::vector<LayerVals> vals;
  for (size_t i = 0; i + 1 < dims.size(); ++i) {
    torch::nn::Linear lin(dims[i], dims[i + 1]);
    torch::nn::AnyModule qm = make(lin, cfg);
    LoraLayer& ql = *as_lora_layer(*qm.ptr());
    msbnb::lora::test::randomize_lora(ql, 0.3);  // B nonzero: the LoRA branch carries gradient to A
    // The float twin: a torch Linear holding the dequantized weight, the same bias, A and B.
    torch::nn::Linear base(dims[i], dims[i + 1]);
    {
      torch::NoGradGuard g;
      base->weight.copy_(ql.base_weight());
      base->bias.copy_(ql.base_module()->named_parameters(false)["bias"]);
    }
    LoRALinear fl(base, cfg);
    {
      torch::NoGradGuard g;
      fl->lora_A().copy_(ql.lora_A());
      fl->lora_B().copy_(ql.lora_B());
    }
    q->push_back("layer" + std::to_string(i), qm);
    f->push_back("layer" + std::to_string(i), fl);
    if (i + 2 < dims.size()) {
      q->push_back("relu" + std::to_string(i), torch::nn::ReLU());
      f->push_back("relu" + std::to_string(i), torch::nn::ReLU());
    }
    vals.push_back({f64(base->weight), f64(base->bias), f64(fl->lora_A()), f64(fl->lora_B()), fl->scaling(),
                    dims[i], dims[i + 1], cfg.r()});
  }
  const FreezeReport fq = freeze_model_except_lora(*q), ff = freeze_model_except_lora(*f);
  EXPECT_EQ(fq.trainable_tensors, 6);
  EXPECT_EQ(ff.trainable_tensors, 6);
  EXPECT_EQ(fq.trainable_elements, ff.trainable_elements);

  const torch::Tensor x0 = torch::randn({6, dims[0]});
  const torch::Tensor G = torch::randn({6, dims.back()});
  bool same_branches = false;
  const Bounds E = derive_bounds(vals, x0, G, &same_branches);
  if (!same_branches) return false;
  std::cout << "seed " << seed << "\n";
  torch::Tensor xq = x0.clone().requires_grad_(true), xf = x0.clone().requires_grad_(true);
  (q->forward(xq) * G).sum().backward();
  (f->forward(xf) * G).sum().backward();

  auto expect_close = [](const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& e,
                         const std::string& what) {
    ASSERT_TRUE(a.defined()) << what << ": no gradient";
    ASSERT_TRUE(b.defined()) << what;
    const torch::Tensor d = (f64(a) - f64(b)).abs();
    EXPECT_TRUE((d <= 2 * e).all().item<bool>()) << what << ": max |diff| " << d.max().item<double>()
                                                 << ", max bound " << (2 * e).max().item<double>();
    // Worst-case bounds compound (each layer's |x|·|W| exceeds |x·W| by about sqrt(K) for random
    // signs), so over 3 layers forward and back they reach ~1e-3 of the gradient: still far below
    // any modelling error (a missing or wrong term is O(1)). The measured difference is printed.
    const double gmax = f64(b).abs().max().item<double>();
    EXPECT_LT((2 * e).max().item<double>(), 2e-2 * gmax) << what;
    std::cout << what << ": max |diff| / max |grad| " << d.max().item<double>() / gmax << ", bound "
              << (2 * e).max().item<double>() / gmax << "\n";
  };
  expect_close(xq.grad(), xf.grad(), E.gx, "grad x");
  std::vector<LoraLayer*> ql, fl;
  for (const auto& c : q->named_children())
    if (auto* l = as_lora_layer(*c.value())) ql.push_back(l);
  for (const auto& c : f->named_children())
    if (auto* l = as_lora_layer(*c.value())) fl.push_back(l);
  EXPECT_EQ(ql.size(), 3u);
  if (ql.size() != 3u || fl.size() != 3u) return true;
  for (size_t i = 0; i < ql.size(); ++i) {
    expect_close(ql[i]->lora_A().grad(), fl[i]->lora_A().grad(), E.gA[i],
                 "layer" + std::to_string(i) + " grad A");
    expect_close(ql[i]->lora_B().grad(), fl[i]->lora_B().grad(), E.gB[i],
                 "layer" + std::to_string(i) + " grad B");
  }
  // The frozen quantized base: no gradient on its buffers (they never require one) nor its bias.
  for (const auto& b : q->named_buffers()) {
    EXPECT_FALSE(b.value().requires_grad()) << b.key();
    EXPECT_FALSE(b.value().grad().defined()) << b.key();
  }
  for (const auto& p : q->named_parameters()) {
    if (p.key().find("lora_") == std::string::npos) {
      EXPECT_FALSE(p.value().grad().defined()) << p.key();
    }
  }

  // One AdamW step over the trainable parameters: only the LoRA parameters move.
  std::vector<torch::Tensor> trainable;
  for (const auto& p : q->parameters())
    if (p.requires_grad()) trainable.push_back(p);
  EXPECT_EQ(trainable.size(), 6u);
  const auto buffers_before = msbnb::lora::test::snapshot_buffers(*q);
  std::vector<std::pair<std::string, torch::Tensor>> params_before;
  for (const auto& p : q->named_parameters()) params_before.emplace_back(p.key(), p.value().detach().clone());
  torch::optim::AdamW opt(trainable, torch::optim::AdamWOptions(1e-2).weight_decay(0.01));
  opt.step();
  msbnb::lora::test::expect_same_buffers(*q, buffers_before);
  const auto now = q->named_parameters();
  for (const auto& [name, before] : params_before) {
    const bool lora = name.find("lora_") != std::string::npos;
    EXPECT_EQ(torch::equal(now[name], before), !lora) << name << (lora ? " did not move" : " moved");
  }
  // The next forward uses the new adapters over the unchanged base.
  const torch::Tensor y = q->forward(x0);
  EXPECT_TRUE(y.isfinite().all().item<bool>());
  return true;
}

// Draws from `seed` on (deterministic) until one satisfies the ReLU precondition.
void check_training(const MakeQuantized& make, uint64_t seed) {
  for (uint64_t s = seed; s < seed + 50; ++s) {
    if (try_seed(make, s)) return;
  }
  ADD_FAILURE() << "no draw in 50 kept every ReLU input outside its error bound";
}

TEST(LoraTraining, Nf4DoubleQuantGradientsMatchTheDequantizedFloatModel) {
  check_training(
      [](const torch::nn::Linear& l, const LoraConfig& c) {
        const auto& o = l->options;
        return torch::nn::AnyModule(
            Linear4bitWithLoRA::from_linear(l, c,
                                            msbnb::nn::Linear4bitOptions(o.in_features(), o.out_features())
                                                .quant_type("nf4")
                                                .compress_statistics(true)));
      },
      31);
}

TEST(LoraTraining, Int4GroupGradientsMatchTheDequantizedFloatModel) {
  check_training(
      [](const torch::nn::Linear& l, const LoraConfig& c) {
        const auto& o = l->options;
        return torch::nn::AnyModule(
            Linear4bitWithLoRA::from_linear(l, c,
                                            msbnb::nn::Linear4bitOptions(o.in_features(), o.out_features())
                                                .quant_type("int4")
                                                .blocksize(32)));
      },
      32);
}

TEST(LoraTraining, Int8GradientsMatchTheDequantizedFloatModel) {
  check_training(
      [](const torch::nn::Linear& l, const LoraConfig& c) {
        const auto& o = l->options;
        return torch::nn::AnyModule(Linear8bitWithLoRA::from_linear(
            l, c, msbnb::nn::Linear8bitOptions(o.in_features(), o.out_features()).threshold(0.0)));
      },
      33);
}

}  // namespace
