// Activation checkpointing (msbnb/train/checkpoint.h) and the memory counter (msbnb/train/memory.h).
//
// Tolerance: none. The recomputation in backward runs the same ops, in the same order, on
// bit-identical inputs (x is saved; the dropout masks come from the restored generator state),
// at the same thread count, and torch's CPU ops and msbnb's kernels are deterministic at a
// fixed thread count; the backward then runs the same graph. So gradients with and without
// checkpointing must be EQUAL, bit for bit; any difference is a bug (a lost mask, a missed
// accumulation), not rounding.
#include "msbnb/train/checkpoint.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "msbnb/lora/lora.h"
#include "msbnb/nn/linear.h"
#include "msbnb/train/memory.h"

namespace {

namespace tnn = torch::nn;
using msbnb::train::checkpoint;

enum class Base { fp32, nf4_lora };

// A pre-norm decoder block: causal self-attention + MLP, RMSNorm, dropout.
struct BlockImpl : tnn::Module {
  BlockImpl(int64_t d, int64_t heads, double dropout, Base base) : d_(d), heads_(heads), p_(dropout) {
    norm1 = register_parameter("norm1", torch::ones({d}));
    norm2 = register_parameter("norm2", torch::ones({d}));
    auto add = [&](const std::string& name, int64_t in, int64_t out) {
      tnn::Linear l(tnn::LinearOptions(in, out).bias(false));
      if (base == Base::fp32) {
        proj[name] = tnn::AnyModule(register_module(name, l));
      } else {
        // QLoRA's layer: frozen nf4 base + adapters (scaling 8 / 4 = 2). B starts at zero in
        // LoRA; random here, so that A's gradient is not trivially zero.
        auto q = msbnb::lora::Linear4bitWithLoRA::from_linear(
            l, msbnb::lora::LoraConfig().r(4).lora_alpha(8),
            msbnb::nn::Linear4bitOptions(in, out).quant_type("nf4").bias(false));
        torch::NoGradGuard g;
        torch::nn::init::normal_(q->lora_B(), 0, 0.02);
        proj[name] = tnn::AnyModule(register_module(name, q));
      }
    };
    for (const char* n : {"q", "k", "v", "o"}) add(n, d, d);
    add("up", d, 4 * d);
    add("down", 4 * d, d);
  }
  static torch::Tensor rms(const torch::Tensor& x, const torch::Tensor& w) {
    return x * torch::rsqrt(x.pow(2).mean(-1, true) + 1e-6) * w;
  }
  torch::Tensor forward(const torch::Tensor& x) {
    const int64_t b = x.size(0), t = x.size(1), hd = d_ / heads_;
    auto h = rms(x, norm1);
    auto split = [&](const torch::Tensor& y) { return y.view({b, t, heads_, hd}).transpose(1, 2); };
    auto q = split(proj["q"].forward(h)), k = split(proj["k"].forward(h)), v = split(proj["v"].forward(h));
    auto scores = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(hd));
    auto mask = torch::ones({t, t}, torch::kBool).triu(1);
    auto att = torch::dropout(torch::softmax(scores.masked_fill(mask, -1e9), -1), p_, is_training());
    auto o = torch::matmul(att, v).transpose(1, 2).reshape({b, t, d_});
    auto x1 = x + torch::dropout(proj["o"].forward(o), p_, is_training());
    auto m = proj["down"].forward(torch::gelu(proj["up"].forward(rms(x1, norm2))));
    return x1 + torch::dropout(m, p_, is_training());
  }
  int64_t d_, heads_;
  double p_;
  torch::Tensor norm1, norm2;
  std::map<std::string, tnn::AnyModule> proj;
};
TORCH_MODULE(Block);

struct Stack {
  std::vector<Block> blocks;
  tnn::Sequential holder;  // owns the blocks as children, for named_parameters()
  Stack(int n, int64_t d, double dropout, Base base) {
    for (int i = 0; i < n; ++i) {
      blocks.emplace_back(d, 4, dropout, base);
      holder->push_back(blocks.back());
    }
  }
  torch::Tensor forward(torch::Tensor h, bool ckpt) {
    for (auto& blk : blocks) {
      if (ckpt) {
        h = checkpoint([&blk](const torch::Tensor& t) { return blk->forward(t); }, h);
      } else {
        h = blk->forward(h);
      }
    }
    return h;
  }
};

// Runs forward + backward from the same generator seed and returns every parameter's grad (by
// name; undefined grads as undefined) and the input's grad.
struct Grads {
  std::map<std::string, torch::Tensor> params;
  torch::Tensor x;
  torch::Tensor loss;
};
Grads run(Stack& s, const torch::Tensor& x0, bool ckpt, bool x_requires_grad) {
  for (auto& p : s.holder->parameters()) p.mutable_grad() = torch::Tensor();
  torch::Tensor x = x0.clone().requires_grad_(x_requires_grad);
  torch::manual_seed(7);
  auto y = s.forward(x, ckpt);
  auto loss = (y * y).mean();
  loss.backward();
  Grads g;
  for (const auto& p : s.holder->named_parameters()) {
    const torch::Tensor& pg = p.value().grad();
    g.params[p.key()] = pg.defined() ? pg.clone() : torch::Tensor();
  }
  if (x_requires_grad) g.x = x.grad().clone();
  g.loss = loss.detach();
  return g;
}

void expect_identical(const Grads& a, const Grads& b) {
  ASSERT_TRUE(torch::equal(a.loss, b.loss));
  ASSERT_EQ(a.params.size(), b.params.size());
  for (const auto& [name, ga] : a.params) {
    const torch::Tensor& gb = b.params.at(name);
    ASSERT_EQ(ga.defined(), gb.defined()) << name;
    if (ga.defined()) {
      EXPECT_TRUE(torch::equal(ga, gb)) << name << " max diff " << (ga - gb).abs().max().item<float>();
    }
  }
  ASSERT_EQ(a.x.defined(), b.x.defined());
  if (a.x.defined()) {
    EXPECT_TRUE(torch::equal(a.x, b.x)) << "grad x";
  }
}

TEST(Checkpoint, Fp32BlocksGradientsBitIdentical) {
  torch::manual_seed(0);
  Stack s(3, 32, 0.0, Base::fp32);
  auto x = torch::randn({2, 16, 32});
  const Grads plain = run(s, x, false, true), ckpt = run(s, x, true, true);
  expect_identical(plain, ckpt);
  for (const auto& [name, g] : plain.params) EXPECT_TRUE(g.defined()) << name;
}

TEST(Checkpoint, DropoutMasksReplayed) {
  torch::manual_seed(0);
  Stack s(3, 32, 0.2, Base::fp32);
  s.holder->train();
  auto x = torch::randn({2, 16, 32});
  const Grads plain = run(s, x, false, true), ckpt = run(s, x, true, true);
  expect_identical(plain, ckpt);
  // The generator is where it would be without checkpointing: the next draws agree.
  torch::manual_seed(7);
  s.forward(x, false);
  const auto after_plain = torch::rand({4});
  torch::manual_seed(7);
  auto y = s.forward(x.clone().requires_grad_(true), true);
  y.sum().backward();
  EXPECT_TRUE(torch::equal(after_plain, torch::rand({4})));
}

TEST(Checkpoint, WithoutRngStateDropoutDiffers) {
  // The reason for preserve_rng_state: without it, the recomputed masks are new ones.
  torch::manual_seed(0);
  Block blk(32, 4, 0.5, Base::fp32);
  blk->train();
  auto x = torch::randn({2, 16, 32});
  auto grad_with = [&](bool preserve) {
    for (auto& p : blk->parameters()) p.mutable_grad() = torch::Tensor();
    torch::manual_seed(3);
    auto y =
        checkpoint([&](const torch::Tensor& t) { return blk->forward(t); }, x.clone().requires_grad_(true),
                   msbnb::train::CheckpointOptions().preserve_rng_state(preserve));
    y.pow(2).mean().backward();
    return blk->proj["up"].ptr()->parameters()[0].grad().clone();
  };
  torch::manual_seed(3);
  for (auto& p : blk->parameters()) p.mutable_grad() = torch::Tensor();
  blk->forward(x.clone().requires_grad_(true)).pow(2).mean().backward();
  const auto plain = blk->proj["up"].ptr()->parameters()[0].grad().clone();
  EXPECT_TRUE(torch::equal(plain, grad_with(true)));
  EXPECT_FALSE(torch::equal(plain, grad_with(false)));
}

TEST(Checkpoint, InputWithoutGradStillReachesParameters) {
  // QLoRA's first block: its input (frozen embeddings) does not require grad.
  torch::manual_seed(0);
  Stack s(2, 32, 0.0, Base::fp32);
  auto x = torch::randn({2, 8, 32});
  const Grads plain = run(s, x, false, false), ckpt = run(s, x, true, false);
  expect_identical(plain, ckpt);
  for (const auto& [name, g] : ckpt.params) EXPECT_TRUE(g.defined()) << name;
}

TEST(Checkpoint, FrozenNf4BaseWithLoraGradientsBitIdentical) {
  torch::manual_seed(0);
  Stack s(3, 64, 0.1, Base::nf4_lora);
  s.holder->train();
  // Freeze everything but the adapters, as QLoRA does.
  std::map<std::string, torch::Tensor> buffers_before;
  for (auto& p : s.holder->named_parameters()) {
    if (p.key().find("lora_") == std::string::npos) p.value().requires_grad_(false);
  }
  for (const auto& b : s.holder->named_buffers()) buffers_before[b.key()] = b.value().clone();
  ASSERT_FALSE(buffers_before.empty());
  auto x = torch::randn({2, 16, 64});
  const Grads plain = run(s, x, false, true), ckpt = run(s, x, true, true);
  expect_identical(plain, ckpt);
  for (const auto& [name, g] : ckpt.params) {
    EXPECT_EQ(g.defined(), name.find("lora_") != std::string::npos) << name;
  }
  for (const auto& b : s.holder->named_buffers()) {
    EXPECT_FALSE(b.value().requires_grad()) << b.key();
    EXPECT_FALSE(b.value().grad().defined()) << b.key();
    EXPECT_TRUE(torch::equal(b.value(), buffers_before.at(b.key()))) << b.key();
  }
  // Also without a grad on the input (frozen embeddings below).
  expect_identical(run(s, x, false, false), run(s, x, true, false));
}

TEST(Checkpoint, NoGradModeIsPlainCall) {
  torch::manual_seed(0);
  Block blk(32, 4, 0.0, Base::fp32);
  auto x = torch::randn({1, 4, 32});
  torch::NoGradGuard g;
  int calls = 0;
  auto y = checkpoint(
      [&](const torch::Tensor& t) {
        ++calls;
        return blk->forward(t);
      },
      x);
  EXPECT_EQ(calls, 1);
  EXPECT_FALSE(y.requires_grad());
  EXPECT_TRUE(torch::equal(y, blk->forward(x)));
}

TEST(Checkpoint, BadInput) {
  auto x = torch::randn({2, 3}, torch::requires_grad());
  auto msg = [](const std::function<void()>& f) -> std::string {
    try {
      f();
    } catch (const c10::Error& e) {
      return e.what_without_backtrace();
    }
    return "(no error)";
  };
  EXPECT_NE(msg([&] { checkpoint(msbnb::train::CheckpointFn(), x); }).find("fn is empty"), std::string::npos);
  EXPECT_NE(msg([&] {
              checkpoint([](const torch::Tensor& t) { return t * 2; }, torch::Tensor());
            }).find("x is undefined"),
            std::string::npos);
  EXPECT_NE(msg([&] { checkpoint([](const torch::Tensor& t) { return t; }, x); }).find("returned its input"),
            std::string::npos);
  EXPECT_NE(msg([&] {
              checkpoint([](const torch::Tensor&) { return torch::Tensor(); }, x);
            }).find("undefined tensor"),
            std::string::npos);
  // Double backward refuses loudly.
  auto y = checkpoint([](const torch::Tensor& t) { return (t * t).sum(); }, x);
  std::string what = "(no error)";
  try {
    torch::autograd::grad({y}, {x}, {}, /*retain_graph=*/true, /*create_graph=*/true);
  } catch (const std::exception& e) {
    what = e.what();
  }
  EXPECT_NE(what.find("double backward"), std::string::npos) << what;
}

TEST(MemoryCounter, CountsLiveAndPeak) {
  msbnb::train::CpuMemoryCounter c;
  EXPECT_EQ(c.live_bytes(), 0);
  {
    auto a = torch::empty({1 << 20}, torch::kFloat32);  // 4 MiB
    EXPECT_EQ(c.live_bytes(), 4 << 20);
    auto b = torch::empty({1 << 18}, torch::kUInt8);
    EXPECT_EQ(c.live_bytes(), (4 << 20) + (1 << 18));
  }
  EXPECT_EQ(c.live_bytes(), 0);
  EXPECT_EQ(c.peak_bytes(), (4 << 20) + (1 << 18));
  c.reset_peak();
  EXPECT_EQ(c.peak_bytes(), 0);
  EXPECT_GE(c.allocations(), 2);
  EXPECT_THROW(msbnb::train::CpuMemoryCounter second, c10::Error);
}

TEST(MemoryCounter, ModuleAndOptimizerBytes) {
  tnn::Linear l(tnn::LinearOptions(16, 8));  // 128 + 8 floats
  l->bias.requires_grad_(false);
  const auto mb = msbnb::train::module_bytes(*l);
  EXPECT_EQ(mb.trainable, 128 * 4);
  EXPECT_EQ(mb.frozen, 8 * 4);
  EXPECT_EQ(mb.buffers, 0);
  torch::optim::AdamW opt({l->weight}, torch::optim::AdamWOptions(1e-3));
  EXPECT_EQ(msbnb::train::optimizer_state_bytes(opt), 0);
  l(torch::randn({2, 16})).sum().backward();
  opt.step();
  // exp_avg + exp_avg_sq, float32 (no amsgrad: max_exp_avg_sq stays undefined).
  EXPECT_EQ(msbnb::train::optimizer_state_bytes(opt), 2 * 128 * 4);
}

// Peak bytes of forward + backward of n blocks, counted from after the model and the input were
// made; and the bytes of one block's trainable parameters (their gradients are part of the peak).
struct Peak {
  int64_t peak = 0, grad_bytes_per_block = 0;
};
Peak peak_of(int n, bool ckpt, Base base) {
  torch::manual_seed(0);
  Stack s(n, 128, 0.0, base);
  if (base == Base::nf4_lora) {
    for (auto& p : s.holder->named_parameters()) {
      if (p.key().find("lora_") == std::string::npos) p.value().requires_grad_(false);
    }
  }
  auto x = torch::randn({4, 64, 128});
  msbnb::train::CpuMemoryCounter counter;
  {
    auto y = s.forward(x, ckpt);
    y.pow(2).mean().backward();
  }
  return {counter.peak_bytes(), msbnb::train::module_bytes(*s.blocks[0]).trainable};
}

TEST(MemoryCounter, CheckpointingKeepsOneBlockOfActivations) {
  // x: [4, 64, 128] float32 = 128 KiB per block input. Each block adds its parameters'
  // gradients G to the peak either way (fp32: 768 KiB; nf4 + LoRA r=4: the adapters', 22 KiB).
  // Without checkpointing every block also keeps its activations (about twenty
  // [4, 64, 128]-sized tensors plus the [4, 4, 64, 64] scores, softmax and mask: about 2 MiB),
  // so the peak grows by G + that per block. With checkpointing a block keeps only its input
  // (128 KiB) until backward, and one block's activations exist at a time (during its
  // recomputation), so the peak grows by G + about one input per block. Bounds: with
  // checkpointing, growth per extra block <= G + 4 inputs (the input, its gradient, and slack
  // for the order of frees); without, the activation part (growth - G) is >= 4x that.
  const int64_t input = 4 * 64 * 128 * 4;
  for (Base base : {Base::fp32, Base::nf4_lora}) {
    const Peak plain2 = peak_of(2, false, base), plain6 = peak_of(6, false, base);
    const Peak ckpt2 = peak_of(2, true, base), ckpt6 = peak_of(6, true, base);
    const double g = static_cast<double>(plain2.grad_bytes_per_block);
    const double plain_per_block = (plain6.peak - plain2.peak) / 4.0 - g;
    const double ckpt_per_block = (ckpt6.peak - ckpt2.peak) / 4.0 - g;
    std::printf(
        "%s: peak without checkpointing 2 blocks %.2f MiB, 6 blocks %.2f MiB; with: %.2f MiB, %.2f MiB; "
        "per block beyond its %.0f KiB of gradients: %.0f KiB without, %.0f KiB with\n",
        base == Base::fp32 ? "fp32" : "nf4+lora", plain2.peak / 1048576.0, plain6.peak / 1048576.0,
        ckpt2.peak / 1048576.0, ckpt6.peak / 1048576.0, g / 1024, plain_per_block / 1024,
        ckpt_per_block / 1024);
    EXPECT_LE(ckpt_per_block, 4.0 * input);
    EXPECT_GE(plain_per_block, 4.0 * std::max(ckpt_per_block, static_cast<double>(input)));
    EXPECT_LT(ckpt6.peak, plain6.peak);
  }
}

}  // namespace
