// Adam8bit / AdamW8bit / Lion8bit (msbnb/optim/optim8bit.h) against torch's fp32 optimizers:
// trajectories over 1000 steps, exact save / load, the state's memory, the fp32 path of small
// parameters (bit for bit), bad input.
#include "msbnb/optim/optim8bit.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "msbnb/kernels/optim8.h"

namespace {

namespace mo = msbnb::optim;

// ---- the tracking problem ------------------------------------------------------------------------
//
// Least squares: W [64, 128] (8192 elements >= min_8bit_size: 8-bit states), X [512, 128] and
// Y = X W*^T + 0.1 noise, full-batch gradients, so the two runs of a comparison differ only by
// the optimizer. The loss is convex; both runs head for the same minimizer W_ls.
//
// Tolerance (derived, not tuned). The 8-bit step uses the fp32 states m_t, v_t computed from
// the DEQUANTIZED old states, so the only difference to fp32 is the storage error of m_{t-1} and
// v_{t-1}, multiplied by b1 and b2. Nearest-code rounding moves x / absmax by at most half a
// code gap: h1 = 0.9 / 64 / 2 = 0.0070 of the block absmax for m (signed map, top decade) and
// h2 = 0.9 / 128 / 2 = 0.0035 for v (unsigned map); uniformly spread over a gap the RMS error is
// h / sqrt(3). Over a block of 256 roughly Gaussian values the absmax is ~3 RMS (m) and ~10 mean
// (v ~ g^2), so an Adam update u = m^ / (sqrt(v^) + eps) has a relative RMS error of about
//   b1 * 3 * h1 / sqrt(3) + 0.5 * b2 * 10 * h2 / sqrt(3) = 1.1 % + 1.0 % ~= 2.1 %  (eps_step).
// If every step's error pointed the same way the path would be rescaled by at most eps_step; on
// a convex loss both runs are pulled to the same W_ls, so the deviation does not grow beyond
// that. With a factor 2.5 for the approximations: ||W8 - W32||_F <= 5 % of ||W32 - W0||_F.
// The loss then follows: L(W) - L* = ||W - W_ls||_M^2 with ||E||_M = ||X E^T||_F / sqrt(N * 64),
// so |L8 - L32| <= ||D||_M * (2 ||W32 - W_ls||_M + ||D||_M), D = W8 - W32, ||D||_M <=
// sqrt(lambda_max(X^T X / (N * 64))) ||D||_F: asserted with D's measured value.
constexpr double kTrackTol = 0.05;

struct Problem {
  torch::Tensor x, y, w0, w_ls;
  double l_star = 0, lambda_max = 0;
  Problem() {
    torch::manual_seed(1234);
    x = torch::randn({512, 128});
    const torch::Tensor w_true = 0.5 * torch::randn({64, 128});
    y = torch::matmul(x, w_true.t()) + 0.1 * torch::randn({512, 64});
    w0 = 0.1 * torch::randn({64, 128});
    // W_ls from the normal equations in double.
    const torch::Tensor xd = x.to(torch::kFloat64), yd = y.to(torch::kFloat64);
    w_ls = torch::linalg_solve(torch::matmul(xd.t(), xd), torch::matmul(xd.t(), yd)).t().to(torch::kFloat32);
    l_star = loss(w_ls).item<double>();
    lambda_max = torch::linalg_eigvalsh(torch::matmul(xd.t(), xd) / (512.0 * 64.0)).max().item<double>();
  }
  torch::Tensor loss(const torch::Tensor& w) const { return torch::mse_loss(torch::matmul(x, w.t()), y); }
  // One full-batch gradient into w.grad().
  void grad(torch::Tensor& w) const {
    if (w.grad().defined()) w.grad().zero_();
    loss(w).backward();
  }
  double m_norm(const torch::Tensor& e) const {
    return torch::matmul(x, e.t()).norm().item<double>() / std::sqrt(512.0 * 64.0);
  }
};

const Problem& problem() {
  static const Problem p;
  return p;
}

// Runs `steps` steps of make(params) on a fresh copy of w0; returns W after each checkpoint.
template <class Make>
std::vector<torch::Tensor> run(Make make, const std::vector<int>& checkpoints) {
  const Problem& pr = problem();
  torch::Tensor w = pr.w0.clone().requires_grad_(true);
  auto opt = make(std::vector<torch::Tensor>{w});
  std::vector<torch::Tensor> out;
  for (int t = 1; t <= checkpoints.back(); ++t) {
    pr.grad(w);
    opt->step();
    for (int c : checkpoints)
      if (c == t) out.push_back(w.detach().clone());
  }
  return out;
}

// The fp32 Lion of the tests (lucidrains' lion-pytorch, torch ops): decoupled decay, the sign
// of b1 m + (1 - b1) g, then m = b2 m + (1 - b2) g.
class LionRef {
 public:
  LionRef(std::vector<torch::Tensor> params, double lr, double b1, double b2, double wd)
      : params_(std::move(params)), lr_(lr), b1_(b1), b2_(b2), wd_(wd) {
    for (auto& p : params_) m_.push_back(torch::zeros_like(p));
  }
  void step() {
    torch::NoGradGuard ng;
    for (size_t i = 0; i < params_.size(); ++i) {
      torch::Tensor& p = params_[i];
      const torch::Tensor& g = p.grad();
      if (wd_ != 0) p.mul_(1 - lr_ * wd_);
      const torch::Tensor update = (m_[i] * b1_).add_(g, 1 - b1_).sign_();
      p.add_(update, -lr_);
      m_[i].mul_(b2_).add_(g, 1 - b2_);
    }
  }

 private:
  std::vector<torch::Tensor> params_, m_;
  double lr_, b1_, b2_, wd_;
};

void expect_tracks(const char* what, const std::vector<torch::Tensor>& w8,
                   const std::vector<torch::Tensor>& w32, const std::vector<int>& checkpoints, double tol) {
  const Problem& pr = problem();
  for (size_t c = 0; c < checkpoints.size(); ++c) {
    const torch::Tensor d = w8[c] - w32[c];
    const double rel = d.norm().item<double>() / (w32[c] - pr.w0).norm().item<double>();
    const double l8 = pr.loss(w8[c]).item<double>(), l32 = pr.loss(w32[c]).item<double>();
    const double dm = std::sqrt(pr.lambda_max) * d.norm().item<double>();
    const double loss_bound = dm * (2 * pr.m_norm(w32[c] - pr.w_ls) + dm);
    std::printf(
        "[ measured ] %s t=%d: ||W8-W32||/||W32-W0|| = %.4f (tol %.3f), max|W8-W32| = %.3g, "
        "loss8 = %.6g, loss32 = %.6g, L* = %.6g, |dL| = %.3g (bound %.3g)\n",
        what, checkpoints[c], rel, tol, d.abs().max().item<double>(), l8, l32, pr.l_star, std::fabs(l8 - l32),
        loss_bound);
    if (tol >= 0) {
      EXPECT_LE(rel, tol) << what << " t=" << checkpoints[c];
    }
    EXPECT_LE(std::fabs(l8 - l32), loss_bound * (1 + 1e-6) + 1e-7) << what << " t=" << checkpoints[c];
  }
}

const std::vector<int> kCheckpoints = {10, 100, 1000};

TEST(Optim8bitTracking, AdamW8bitTracksTorchAdamW) {
  const double lr = 1e-2, wd = 1e-2;
  const auto w8 = run(
      [&](std::vector<torch::Tensor> p) {
        return std::make_unique<mo::AdamW8bit>(p, mo::AdamW8bitOptions(lr).weight_decay(wd));
      },
      kCheckpoints);
  const auto w32 = run(
      [&](std::vector<torch::Tensor> p) {
        return std::make_unique<torch::optim::AdamW>(p, torch::optim::AdamWOptions(lr).weight_decay(wd));
      },
      kCheckpoints);
  expect_tracks("AdamW8bit vs torch AdamW", w8, w32, kCheckpoints, kTrackTol);
}

TEST(Optim8bitTracking, Adam8bitTracksTorchAdam) {
  const double lr = 1e-2, wd = 1e-3;  // L2 decay: the gradient gets + wd * p
  const auto w8 = run(
      [&](std::vector<torch::Tensor> p) {
        return std::make_unique<mo::Adam8bit>(p, mo::Adam8bitOptions(lr).weight_decay(wd));
      },
      kCheckpoints);
  const auto w32 = run(
      [&](std::vector<torch::Tensor> p) {
        return std::make_unique<torch::optim::Adam>(p, torch::optim::AdamOptions(lr).weight_decay(wd));
      },
      kCheckpoints);
  expect_tracks("Adam8bit vs torch Adam", w8, w32, kCheckpoints, kTrackTol);
}

// Lion's update is lr * sign(c), a discontinuous function of the state: the 8-bit momentum's
// storage error (b1 * h1 * absmax1, < 0.7 % of the block absmax) flips sign(c) wherever |c| is
// that small, and from then on the two runs follow different paths (on a coupled loss, one
// coordinate's flip changes every other gradient), so no bound of the quantization error carries
// over to the trajectory. What both runs share is the band a Lion coordinate moves in: with a
// wrong sign it keeps stepping lr until the momentum turns, which takes at most ~1 / (1 - b2)
// steps (m averages the gradient over that many), so a coordinate ends up at most
// B = lr / (1 - b2) past where the other run would have turned. Tolerance: max |W8 - W32| <=
// 2 B at every checkpoint, and the loss bound of expect_tracks; the L2 distance is reported.
void expect_lion_tracks(const std::vector<torch::Tensor>& w8, const std::vector<torch::Tensor>& w32,
                        const std::vector<int>& checkpoints, double lr, double b2) {
  expect_tracks("Lion8bit vs fp32 Lion", w8, w32, checkpoints, /*tol=*/-1);
  for (size_t c = 0; c < checkpoints.size(); ++c)
    EXPECT_LE((w8[c] - w32[c]).abs().max().item<double>(), 2 * lr / (1 - b2)) << "t=" << checkpoints[c];
}

TEST(Optim8bitTracking, Lion8bitTracksFp32Lion) {
  const double lr = 3e-3, wd = 0.1, b2 = 0.99;
  const auto w8 = run(
      [&](std::vector<torch::Tensor> p) {
        return std::make_unique<mo::Lion8bit>(p, mo::Lion8bitOptions(lr).weight_decay(wd).betas({0.9, b2}));
      },
      kCheckpoints);
  const auto w32 =
      run([&](std::vector<torch::Tensor> p) { return std::make_unique<LionRef>(p, lr, 0.9, b2, wd); },
          kCheckpoints);
  expect_lion_tracks(w8, w32, kCheckpoints, lr, b2);
}

// ---- save / load ---------------------------------------------------------------------------------

// A model with an 8-bit parameter (8192 elements) and an fp32-state one (64): 5 steps, save, 5
// more; a second run loads the saved state into a fresh optimizer over the saved parameters and
// does the same 5 steps: bit-identical parameters and states.
template <class Opt, class Options>
void expect_save_load_exact(const Options& options) {
  const Problem& pr = problem();
  torch::Tensor w = pr.w0.clone().requires_grad_(true), b = torch::zeros({64}).requires_grad_(true);
  auto grads = [&](torch::Tensor& wt, torch::Tensor& bt) {
    for (auto* t : {&wt, &bt})
      if (t->grad().defined()) t->grad().zero_();
    torch::mse_loss(torch::matmul(pr.x, wt.t()) + bt, pr.y).backward();
  };
  Opt opt(std::vector<torch::Tensor>{w, b}, options);
  for (int t = 0; t < 5; ++t) {
    grads(w, b);
    opt.step();
  }
  std::stringstream saved;
  torch::save(opt, saved);
  const torch::Tensor w_saved = w.detach().clone(), b_saved = b.detach().clone();
  for (int t = 0; t < 5; ++t) {
    grads(w, b);
    opt.step();
  }
  torch::Tensor w2 = w_saved.clone().requires_grad_(true), b2 = b_saved.clone().requires_grad_(true);
  Opt opt2(std::vector<torch::Tensor>{w2, b2}, options);
  torch::load(opt2, saved);
  for (int t = 0; t < 5; ++t) {
    grads(w2, b2);
    opt2.step();
  }
  EXPECT_TRUE(torch::equal(w, w2));
  EXPECT_TRUE(torch::equal(b, b2));
  auto state_of = [](const torch::optim::Optimizer& o,
                     const torch::Tensor& p) -> const mo::Optim8bitParamState& {
    return static_cast<const mo::Optim8bitParamState&>(
        *o.state().at(c10::guts::to_string(p.unsafeGetTensorImpl())));
  };
  const auto &s1 = state_of(opt, w), &s2 = state_of(opt2, w2);
  EXPECT_TRUE(s1.is_8bit());
  EXPECT_FALSE(state_of(opt, b).is_8bit());
  EXPECT_EQ(s1.step(), 10);
  EXPECT_EQ(s2.step(), 10);
  EXPECT_TRUE(torch::equal(s1.state1(), s2.state1()));
  EXPECT_TRUE(torch::equal(s1.absmax1(), s2.absmax1()));
  if (s1.state2().defined()) {
    EXPECT_TRUE(torch::equal(s1.state2(), s2.state2()));
    EXPECT_TRUE(torch::equal(s1.absmax2(), s2.absmax2()));
  }
}

TEST(Optim8bitSaveLoad, AdamW8bitRoundTripsExactly) {
  expect_save_load_exact<mo::AdamW8bit>(mo::AdamW8bitOptions(1e-2));
}
TEST(Optim8bitSaveLoad, Adam8bitRoundTripsExactly) {
  expect_save_load_exact<mo::Adam8bit>(mo::Adam8bitOptions(1e-2).weight_decay(1e-3));
}
TEST(Optim8bitSaveLoad, Lion8bitRoundTripsExactly) {
  expect_save_load_exact<mo::Lion8bit>(mo::Lion8bitOptions(1e-3).weight_decay(0.1));
}

TEST(Optim8bitSaveLoad, LoadedStateOfTheWrongSizeIsRefused) {
  torch::Tensor w = torch::randn({8192}).requires_grad_(true),
                v = torch::randn({4096 * 3}).requires_grad_(true);
  mo::AdamW8bit opt(std::vector<torch::Tensor>{w});
  w.mutable_grad() = torch::ones_like(w);
  opt.step();
  std::stringstream saved;
  torch::save(opt, saved);
  mo::AdamW8bit other(std::vector<torch::Tensor>{v});
  torch::load(other, saved);
  v.mutable_grad() = torch::ones_like(v);
  try {
    other.step();
    ADD_FAILURE() << "no throw";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("AdamW8bit: state state1: expected contiguous uint8 codes of 12288"),
              std::string::npos)
        << e.what();
  }
}

// ---- memory ----------------------------------------------------------------------------------------

TEST(Optim8bitMemory, StateIsAQuarterOfFp32Adam) {
  // 2^20 + 1000 elements in 8-bit states: 2 codes (1 byte each) per element + 2 absmax (4 bytes)
  // per 256: (2 + 8 / 256) / 8 = 25.39 % of torch AdamW's 2 fp32 states.
  const int64_t n = (int64_t{1} << 20) + 1000, blocks = (n + 255) / 256;
  torch::Tensor w = torch::randn({n}).requires_grad_(true), w2 = w.detach().clone().requires_grad_(true);
  w.mutable_grad() = torch::randn({n});
  w2.mutable_grad() = w.grad().clone();
  mo::AdamW8bit opt8(std::vector<torch::Tensor>{w});
  torch::optim::AdamW opt32(std::vector<torch::Tensor>{w2});
  opt8.step();
  opt32.step();
  const int64_t b8 = mo::optimizer_state_bytes(opt8), b32 = mo::optimizer_state_bytes(opt32);
  EXPECT_EQ(b8, 2 * n + 2 * 4 * blocks);
  EXPECT_EQ(b32, 8 * n);
  const double ratio = static_cast<double>(b8) / static_cast<double>(b32);
  std::printf("[ measured ] state bytes: AdamW8bit %lld, torch AdamW %lld, ratio %.4f\n",
              static_cast<long long>(b8), static_cast<long long>(b32), ratio);
  EXPECT_NEAR(ratio, (2.0 + 8.0 / 256) / 8, 1e-3);
  // Lion: one state, 1 byte + 4 / 256 per element.
  torch::Tensor w3 = torch::randn({n}).requires_grad_(true);
  w3.mutable_grad() = torch::randn({n});
  mo::Lion8bit lion(std::vector<torch::Tensor>{w3});
  lion.step();
  EXPECT_EQ(mo::optimizer_state_bytes(lion), n + 4 * blocks);
}

// ---- min_8bit_size: small parameters are torch's optimizers exactly --------------------------------

template <class Opt8, class Opt32, class Make8, class Make32>
void expect_small_params_exact(Make8 make8, Make32 make32) {
  torch::manual_seed(7);
  std::vector<torch::Tensor> a, b;
  for (int64_t n : {int64_t{4095}, int64_t{100}, int64_t{1}}) {
    a.push_back(torch::randn({n}).requires_grad_(true));
    b.push_back(a.back().detach().clone().requires_grad_(true));
  }
  auto o8 = make8(a);
  auto o32 = make32(b);
  for (int t = 0; t < 20; ++t) {
    for (size_t i = 0; i < a.size(); ++i) {
      const torch::Tensor g = torch::randn(a[i].sizes());
      a[i].mutable_grad() = g.clone();
      b[i].mutable_grad() = g.clone();
    }
    o8->step();
    o32->step();
  }
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i], b[i])) << "param " << i;
  for (const auto& kv : o8->state())
    EXPECT_FALSE(static_cast<const mo::Optim8bitParamState&>(*kv.second).is_8bit());
}

TEST(Optim8bitSmallParams, AdamW8bitIsTorchAdamW) {
  expect_small_params_exact<mo::AdamW8bit, torch::optim::AdamW>(
      [](std::vector<torch::Tensor> p) {
        return std::make_unique<mo::AdamW8bit>(
            p, mo::AdamW8bitOptions(1e-2).weight_decay(0.05).betas({0.8, 0.99}));
      },
      [](std::vector<torch::Tensor> p) {
        return std::make_unique<torch::optim::AdamW>(
            p, torch::optim::AdamWOptions(1e-2).weight_decay(0.05).betas({0.8, 0.99}));
      });
}
TEST(Optim8bitSmallParams, Adam8bitIsTorchAdam) {
  expect_small_params_exact<mo::Adam8bit, torch::optim::Adam>(
      [](std::vector<torch::Tensor> p) {
        return std::make_unique<mo::Adam8bit>(p, mo::Adam8bitOptions(1e-2).weight_decay(0.05).eps(1e-6));
      },
      [](std::vector<torch::Tensor> p) {
        return std::make_unique<torch::optim::Adam>(
            p, torch::optim::AdamOptions(1e-2).weight_decay(0.05).eps(1e-6));
      });
}
TEST(Optim8bitSmallParams, Lion8bitIsFp32Lion) {
  expect_small_params_exact<mo::Lion8bit, LionRef>(
      [](std::vector<torch::Tensor> p) {
        return std::make_unique<mo::Lion8bit>(p, mo::Lion8bitOptions(1e-3).weight_decay(0.1));
      },
      [](std::vector<torch::Tensor> p) { return std::make_unique<LionRef>(p, 1e-3, 0.9, 0.99, 0.1); });
}

TEST(Optim8bitSmallParams, Threshold) {
  // numel >= min_8bit_size: 8-bit; below: fp32; min_8bit_size 0: everything 8-bit.
  torch::Tensor a = torch::randn({4096}).requires_grad_(true), b = torch::randn({4095}).requires_grad_(true);
  torch::Tensor c = torch::randn({3}).requires_grad_(true);
  mo::AdamW8bit opt(std::vector<torch::Tensor>{a, b});
  mo::Lion8bit lion(std::vector<torch::Tensor>{c}, mo::Lion8bitOptions().min_8bit_size(0));
  for (auto* t : {&a, &b, &c}) t->mutable_grad() = torch::ones_like(*t);
  opt.step();
  lion.step();
  auto st = [](const torch::optim::Optimizer& o, const torch::Tensor& p) -> const mo::Optim8bitParamState& {
    return static_cast<const mo::Optim8bitParamState&>(
        *o.state().at(c10::guts::to_string(p.unsafeGetTensorImpl())));
  };
  EXPECT_TRUE(st(opt, a).is_8bit());
  EXPECT_EQ(st(opt, a).absmax1().numel(), 16);
  EXPECT_FALSE(st(opt, b).is_8bit());
  EXPECT_EQ(st(opt, b).state1().sizes(), b.sizes());
  EXPECT_TRUE(st(lion, c).is_8bit());
  EXPECT_FALSE(st(lion, c).state2().defined());
}

TEST(Optim8bitEdges, NonFiniteGradientSkipsTheElementInEightBit) {
  torch::Tensor w = torch::randn({5000}).requires_grad_(true);
  const torch::Tensor w0 = w.detach().clone();
  torch::Tensor g = torch::randn({5000});
  g[7] = std::nan("");
  g[9] = INFINITY;
  w.mutable_grad() = g;
  mo::AdamW8bit opt(std::vector<torch::Tensor>{w}, mo::AdamW8bitOptions(1e-2));
  opt.step();
  EXPECT_EQ(w[7].item<float>(), w0[7].item<float>());
  EXPECT_EQ(w[9].item<float>(), w0[9].item<float>());
  EXPECT_NE(w[8].item<float>(), w0[8].item<float>());
  EXPECT_TRUE(torch::isfinite(w).all().item<bool>());
}

TEST(Optim8bitEdges, NonContiguousParameterIsUpdatedThroughACopy) {
  torch::Tensor base = torch::randn({128, 64});
  torch::Tensor w = base.t().requires_grad_(true);  // [64, 128], not contiguous
  torch::Tensor wc = w.detach().contiguous().requires_grad_(true);
  const torch::Tensor g = torch::randn({64, 128});
  w.mutable_grad() = g.clone();
  wc.mutable_grad() = g.clone();
  mo::Adam8bit a(std::vector<torch::Tensor>{w}), b(std::vector<torch::Tensor>{wc});
  a.step();
  b.step();
  EXPECT_FALSE(w.is_contiguous());
  EXPECT_TRUE(torch::equal(w, wc));
}

// ---- bad input ---------------------------------------------------------------------------------------

void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one with: " << needle;
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Optim8bitBadInput, Options) {
  auto p = [] { return std::vector<torch::Tensor>{torch::randn({10}).requires_grad_(true)}; };
  expect_error([&] { mo::AdamW8bit(p(), mo::AdamW8bitOptions(-1.0)); },
               "AdamW8bit: lr: expected >= 0, got -1");
  expect_error(
      [&] {
        mo::Adam8bit(p(), mo::Adam8bitOptions().betas({1.0, 0.999}));
      },
      "Adam8bit: betas[0]: expected a value in [0, 1), got 1");
  expect_error(
      [&] {
        mo::Adam8bit(p(), mo::Adam8bitOptions().betas({0.9, -0.1}));
      },
      "Adam8bit: betas[1]: expected a value in [0, 1), got -0.1");
  expect_error([&] { mo::Lion8bit(p(), mo::Lion8bitOptions().betas({0.9, 1.5})); }, "Lion8bit: betas[1]");
  expect_error([&] { mo::AdamW8bit(p(), mo::AdamW8bitOptions().eps(-1e-8)); },
               "AdamW8bit: eps: expected >= 0");
  expect_error([&] { mo::AdamW8bit(p(), mo::AdamW8bitOptions().weight_decay(-0.1)); },
               "AdamW8bit: weight_decay: expected >= 0");
  expect_error([&] { mo::Adam8bit(p(), mo::Adam8bitOptions().amsgrad(true)); },
               "Adam8bit: amsgrad: expected false");
  expect_error([&] { mo::Lion8bit(p(), mo::Lion8bitOptions().min_8bit_size(-1)); },
               "Lion8bit: min_8bit_size: expected >= 0");
  // Options changed after construction are checked at the step.
  torch::Tensor w = torch::randn({10}).requires_grad_(true);
  mo::AdamW8bit opt(std::vector<torch::Tensor>{w});
  static_cast<mo::AdamW8bitOptions&>(opt.param_groups()[0].options()).lr(-0.5);
  w.mutable_grad() = torch::ones_like(w);
  expect_error([&] { opt.step(); }, "AdamW8bit: lr: expected >= 0, got -0.5");
}

TEST(Optim8bitBadInput, Parameters) {
  expect_error([] { mo::AdamW8bit(std::vector<torch::Tensor>{torch::randn({10}, torch::kFloat64)}); },
               "AdamW8bit: params: expected float32 tensors, got Double");
  expect_error([] { mo::Adam8bit(std::vector<torch::Tensor>{torch::randn({10}, torch::kHalf)}); },
               "Adam8bit: params: expected float32 tensors, got Half");
  expect_error(
      [] { mo::Lion8bit(std::vector<torch::Tensor>{torch::empty({10}, torch::device(torch::kMeta))}); },
      "Lion8bit: params: expected CPU tensors");
  expect_error(
      [] {
        mo::AdamW8bit(std::vector<torch::Tensor>{
            torch::sparse_coo_tensor(torch::zeros({1, 1}, torch::kLong), torch::ones({1}), {10})});
      },
      "AdamW8bit: params: expected dense (strided) tensors");
  // Gradients: sparse, of another dtype, of another shape.
  torch::Tensor w = torch::randn({10}).requires_grad_(true);
  mo::AdamW8bit opt(std::vector<torch::Tensor>{w});
  w.mutable_grad() = torch::sparse_coo_tensor(torch::zeros({1, 1}, torch::kLong), torch::ones({1}), {10});
  expect_error([&] { opt.step(); }, "AdamW8bit: grad: expected a dense gradient");
  w.mutable_grad() = torch::ones({10}, torch::kFloat64);
  expect_error([&] { opt.step(); }, "AdamW8bit: grad: expected float32, got Double");
  w.mutable_grad() = torch::ones({5});
  expect_error([&] { opt.step(); }, "AdamW8bit: grad: expected the parameter's shape [10], got [5]");
}

}  // namespace
