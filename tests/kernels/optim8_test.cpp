// The 8-bit optimizer kernels (kernels.def: optim8_adam_blocks, optim8_lion_blocks): every ISA
// against the scalar reference bit for bit (parameters, codes, absmax) over odd lengths, short
// last blocks, block sizes and edge gradients, several steps in a row; the reference's own
// numerics (first step, NaN / Inf gradients, overflowing squares, the sign rule); the threaded
// driver independent of the thread count; bad arguments.
#include "msbnb/kernels/optim8.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "msbnb/kernels/kernel_table.h"
#include "msbnb/kernels/ops.h"
#include "test_util.h"

namespace msbnb::test {
namespace {

namespace K = msbnb::kernels;
using K::KernelTable;
using K::Optim8Params;

const int64_t kLengths[] = {1, 2, 7, 8, 15, 16, 17, 31, 33, 255, 256, 257, 511, 1000, 4097, 9000};
const int64_t kBlocks[] = {256, 1, 7, 64, 100, 4096};
enum class GradFill { randn, zeros, huge, tiny, denormal, specials, mixed };
const GradFill kGradFills[] = {GradFill::randn,    GradFill::zeros,    GradFill::huge, GradFill::tiny,
                               GradFill::denormal, GradFill::specials, GradFill::mixed};
const char* grad_fill_name(GradFill f) {
  static const char* names[] = {"randn", "zeros", "huge", "tiny", "denormal", "specials", "mixed"};
  return names[static_cast<int>(f)];
}

std::vector<float> make_grad(int64_t n, GradFill f, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> g(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const float r = normal(rng);
    float& x = g[static_cast<size_t>(i)];
    switch (f) {
      case GradFill::randn:
        x = r;
        break;
      case GradFill::zeros:
        x = i % 3 == 0 ? -0.0f : 0.0f;
        break;
      case GradFill::huge:  // g * g overflows float: the states clamp to FLT_MAX
        x = r * 1e30f;
        break;
      case GradFill::tiny:  // states far below 1e-38: absmax in the pre-scaled (denormal) range
        x = r * 1e-36f;
        break;
      case GradFill::denormal:
        x = r * 1e-41f;
        break;
      case GradFill::specials:
        x = i % 5 == 1   ? std::numeric_limits<float>::quiet_NaN()
            : i % 5 == 3 ? (i % 2 ? -1.0f : 1.0f) * std::numeric_limits<float>::infinity()
                         : r;
        break;
      case GradFill::mixed:  // wide magnitudes and zeros in one block
        x = i % 4 == 0 ? 0.0f : i % 4 == 1 ? r * 1e4f : i % 4 == 2 ? r * 1e-4f : r;
        break;
    }
  }
  return g;
}

// One optimizer's buffers.
struct State {
  std::vector<float> p, a1, a2;
  std::vector<uint8_t> s1, s2;
  State(int64_t n, int64_t bs, uint32_t seed, bool random_states) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::uniform_int_distribution<int> byte(0, 255);
    const size_t nb = static_cast<size_t>((n + bs - 1) / bs);
    p.resize(static_cast<size_t>(n));
    s1.assign(static_cast<size_t>(n), 0);
    s2.assign(static_cast<size_t>(n), 0);
    a1.assign(nb, 0.0f);
    a2.assign(nb, 0.0f);
    for (float& x : p) x = normal(rng);
    if (!random_states) return;
    for (auto& c : s1) c = static_cast<uint8_t>(byte(rng));
    for (auto& c : s2) c = static_cast<uint8_t>(byte(rng));
    for (size_t b = 0; b < nb; ++b) {
      a1[b] = b % 5 == 4 ? 0.0f : std::fabs(normal(rng));  // some blocks start at absmax 0
      a2[b] = b % 7 == 6 ? 0.0f : std::fabs(normal(rng));
    }
  }
};

template <typename T>
int64_t first_mismatch(const std::vector<T>& a, const std::vector<T>& b) {
  for (size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) return static_cast<int64_t>(i);
  return -1;
}
#define EXPECT_SAME(ref, got, what)                                   \
  do {                                                                \
    const int64_t bad = first_mismatch(ref, got);                     \
    EXPECT_EQ(bad, -1) << what << " " << ctx << " index=" << bad      \
                       << " ref=" << +ref[size_t(bad < 0 ? 0 : bad)]  \
                       << " got=" << +got[size_t(bad < 0 ? 0 : bad)]; \
  } while (0)

Optim8Params adam_params(int variant, int64_t t) {
  // 0: Adam, 1: Adam with L2 weight decay, 2: AdamW
  return K::optim8_adam_params(1e-3, 0.9, 0.999, 1e-8, variant == 0 ? 0.0 : 0.01, variant == 2, t);
}

class Optim8VsReference : public testing::TestWithParam<Isa> {
 protected:
  void SetUp() override {
    MSBNB_SKIP_IF_UNSUPPORTED(GetParam());
    k_ = &K::kernels_for(GetParam());
    ref_ = &K::kernels_for(Isa::scalar);
  }
  const KernelTable* k_ = nullptr;
  const KernelTable* ref_ = nullptr;
};

TEST_P(Optim8VsReference, Adam) {
  const K::Lut8 &m1 = K::optim8_signed_map(), &m2 = K::optim8_unsigned_map();
  for (int variant : {0, 1, 2})
    for (GradFill fill : kGradFills)
      for (int64_t n : kLengths)
        for (int64_t bs : kBlocks)
          for (bool random_states : {false, true}) {
            if (bs == 1 && n > 1000) continue;  // one block per element: slow, adds nothing
            std::ostringstream ss;
            ss << "adam variant=" << variant << " fill=" << grad_fill_name(fill) << " n=" << n << " bs=" << bs
               << " random_states=" << random_states;
            const std::string ctx = ss.str();
            State ref(n, bs, static_cast<uint32_t>(n + bs), random_states), got = ref;
            for (int64_t t = 1; t <= 3; ++t) {  // the states written by one step are read by the next
              const auto g = make_grad(n, fill, static_cast<uint32_t>(n * 7 + t));
              const Optim8Params prm = adam_params(variant, t);
              ref_->optim8_adam_blocks(ref.p.data(), g.data(), ref.s1.data(), ref.s2.data(), ref.a1.data(),
                                       ref.a2.data(), n, bs, &prm, &m1, &m2);
              k_->optim8_adam_blocks(got.p.data(), g.data(), got.s1.data(), got.s2.data(), got.a1.data(),
                                     got.a2.data(), n, bs, &prm, &m1, &m2);
              EXPECT_SAME(ref.p, got.p, "p t=" << t);
              EXPECT_SAME(ref.s1, got.s1, "s1 t=" << t);
              EXPECT_SAME(ref.s2, got.s2, "s2 t=" << t);
              EXPECT_SAME(ref.a1, got.a1, "absmax1 t=" << t);
              EXPECT_SAME(ref.a2, got.a2, "absmax2 t=" << t);
              if (HasFailure()) return;
            }
          }
}

TEST_P(Optim8VsReference, Lion) {
  const K::Lut8& m1 = K::optim8_signed_map();
  for (double wd : {0.0, 0.1})
    for (GradFill fill : kGradFills)
      for (int64_t n : kLengths)
        for (int64_t bs : kBlocks)
          for (bool random_states : {false, true}) {
            if (bs == 1 && n > 1000) continue;
            std::ostringstream ss;
            ss << "lion wd=" << wd << " fill=" << grad_fill_name(fill) << " n=" << n << " bs=" << bs
               << " random_states=" << random_states;
            const std::string ctx = ss.str();
            State ref(n, bs, static_cast<uint32_t>(n + 3 * bs), random_states), got = ref;
            const Optim8Params prm = K::optim8_lion_params(1e-4, 0.9, 0.99, wd);
            for (int64_t t = 1; t <= 3; ++t) {
              const auto g = make_grad(n, fill, static_cast<uint32_t>(n * 5 + t));
              ref_->optim8_lion_blocks(ref.p.data(), g.data(), ref.s1.data(), ref.a1.data(), n, bs, &prm,
                                       &m1);
              k_->optim8_lion_blocks(got.p.data(), g.data(), got.s1.data(), got.a1.data(), n, bs, &prm, &m1);
              EXPECT_SAME(ref.p, got.p, "p t=" << t);
              EXPECT_SAME(ref.s1, got.s1, "s1 t=" << t);
              EXPECT_SAME(ref.a1, got.a1, "absmax1 t=" << t);
              if (HasFailure()) return;
            }
          }
}

INSTANTIATE_TEST_SUITE_P(Isa, Optim8VsReference, testing::ValuesIn(simd_isas()), isa_param_name);

// ---- the reference's numerics ------------------------------------------------------------------

// Half of the widest gap between neighbouring codes of a map: the most a nearest-code rounding
// of x / absmax in [min code, 1] can move it.
float max_half_gap(const K::Lut8& map) {
  float w = 0.0f;
  for (int i = 0; i + 1 < 256; ++i) w = std::fmax(w, map.mid[i] - map.code[map.sorted_to_code[i]]);
  for (int i = 0; i + 1 < 256; ++i) w = std::fmax(w, map.code[map.sorted_to_code[i + 1]] - map.mid[i]);
  return w;
}

TEST(Optim8Reference, FirstAdamStepFromZeroStates) {
  // Step 1 from fresh states: m = (1 - b1) g, v = ((1 - b2) g) g exactly in fp32 (the update uses
  // them before requantization), so p moves by step_size * m / (sqrt(v) + eps) = lr * sign(g)
  // (to float rounding: |g| >> eps); the stored states are within half a code gap (relative to
  // the block absmax) of the fp32 states, and the absmax is the fp32 states' exact max.
  const K::Lut8 &m1 = K::optim8_signed_map(), &m2 = K::optim8_unsigned_map();
  const int64_t n = 1000, bs = 256;
  State s(n, bs, 1, false);
  const std::vector<float> p0 = s.p;
  const auto g = make_grad(n, GradFill::randn, 2);
  const Optim8Params prm = adam_params(0, 1);
  K::kernels_for(Isa::scalar)
      .optim8_adam_blocks(s.p.data(), g.data(), s.s1.data(), s.s2.data(), s.a1.data(), s.a2.data(), n, bs,
                          &prm, &m1, &m2);
  const float h1 = max_half_gap(m1), h2 = max_half_gap(m2);
  EXPECT_NEAR(h1, 0.9f / 64 / 2, 1e-4f);   // the signed map's top decade: 64 steps on [0.1, 1]
  EXPECT_NEAR(h2, 0.9f / 128 / 2, 1e-4f);  // the unsigned map's: 128 steps
  for (int64_t b = 0; b * bs < n; ++b) {
    float am = 0, av = 0;
    for (int64_t i = b * bs; i < std::min(n, (b + 1) * bs); ++i) {
      am = std::fmax(am, std::fabs(prm.one_minus_beta1 * g[size_t(i)]));
      av = std::fmax(av, (prm.one_minus_beta2 * g[size_t(i)]) * g[size_t(i)]);
    }
    EXPECT_EQ(s.a1[size_t(b)], am) << "block " << b;
    EXPECT_EQ(s.a2[size_t(b)], av) << "block " << b;
    for (int64_t i = b * bs; i < std::min(n, (b + 1) * bs); ++i) {
      const float gi = g[size_t(i)];
      // lr * m / (sqrt(v) + eps') = lr * sign(g) * (1 - eps' / (sqrt(1 - b2) |g| + eps')), then
      // one rounding of p - update (half an ulp of p) and the update's own few roundings.
      const double rel_eps = prm.eps / (std::sqrt(double(prm.one_minus_beta2)) * std::fabs(gi) + prm.eps);
      const double tol = 1e-3 * rel_eps + std::ldexp(1.0, std::ilogb(std::fabs(p0[size_t(i)]) + 1e-3f) - 23) +
                         1e-3 * 8 * 6e-8;
      EXPECT_NEAR(s.p[size_t(i)], p0[size_t(i)] - 1e-3 * (gi > 0 ? 1.0 : -1.0), tol) << i;
      EXPECT_LE(std::fabs(m1.code[s.s1[size_t(i)]] * am - prm.one_minus_beta1 * gi), h1 * am * 1.0001f) << i;
      EXPECT_LE(std::fabs(m2.code[s.s2[size_t(i)]] * av - (prm.one_minus_beta2 * gi) * gi), h2 * av * 1.0001f)
          << i;
    }
  }
}

TEST(Optim8Reference, NonFiniteGradientsSkipTheElement) {
  // NaN / +-Inf gradient: p unchanged (no weight decay either), that element's states reset to
  // 0; the other elements of the block update normally and the block's absmax stays finite.
  const K::Lut8 &m1 = K::optim8_signed_map(), &m2 = K::optim8_unsigned_map();
  const int64_t n = 300, bs = 256;
  for (const KernelTable* k : {&K::kernels_for(Isa::scalar), &K::active_kernels()}) {
    State s(n, bs, 3, true);
    const std::vector<float> p0 = s.p;
    auto g = make_grad(n, GradFill::specials, 4);
    const Optim8Params prm = adam_params(2, 5);
    k->optim8_adam_blocks(s.p.data(), g.data(), s.s1.data(), s.s2.data(), s.a1.data(), s.a2.data(), n, bs,
                          &prm, &m1, &m2);
    for (int64_t i = 0; i < n; ++i) {
      if (std::isfinite(g[size_t(i)])) {
        EXPECT_NE(s.p[size_t(i)], p0[size_t(i)]) << i;
        continue;
      }
      EXPECT_EQ(bits_of(s.p[size_t(i)]), bits_of(p0[size_t(i)])) << i;
      EXPECT_EQ(m1.code[s.s1[size_t(i)]], 0.0f) << i;
      EXPECT_EQ(m2.code[s.s2[size_t(i)]], 0.0f) << i;
    }
    for (float a : s.a1) EXPECT_TRUE(std::isfinite(a));
    for (float a : s.a2) EXPECT_TRUE(std::isfinite(a));
    State l(n, bs, 3, true);
    const Optim8Params lp = K::optim8_lion_params(1e-4, 0.9, 0.99, 0.1);
    k->optim8_lion_blocks(l.p.data(), g.data(), l.s1.data(), l.a1.data(), n, bs, &lp, &m1);
    for (int64_t i = 0; i < n; ++i)
      if (!std::isfinite(g[size_t(i)])) {
        EXPECT_EQ(l.p[size_t(i)], p0[size_t(i)]) << i;
        EXPECT_EQ(m1.code[l.s1[size_t(i)]], 0.0f) << i;
      }
  }
}

TEST(Optim8Reference, OverflowingSquaresClampAndTheBlockStaysUsable) {
  // |g| = 1e30: (1 - b2) g * g overflows; v clamps to FLT_MAX, the absmax stays finite, and the
  // next step with ordinary gradients dequantizes finite states (no 0 * Inf = NaN).
  const K::Lut8 &m1 = K::optim8_signed_map(), &m2 = K::optim8_unsigned_map();
  const int64_t n = 256, bs = 256;
  State s(n, bs, 5, false);
  auto g = make_grad(n, GradFill::randn, 6);
  g[10] = 1e30f;
  for (int64_t t = 1; t <= 2; ++t) {
    const Optim8Params prm = adam_params(0, t);
    K::active_kernels().optim8_adam_blocks(s.p.data(), g.data(), s.s1.data(), s.s2.data(), s.a1.data(),
                                           s.a2.data(), n, bs, &prm, &m1, &m2);
    // t = 1: the clamped square itself; t = 2: b2 * FLT_MAX + (1 - b2) * 0.25, still finite.
    EXPECT_EQ(s.a2[0],
              t == 1 ? std::numeric_limits<float>::max() : std::numeric_limits<float>::max() * prm.beta2);
    EXPECT_TRUE(std::isfinite(s.a1[0])) << "t=" << t;
    for (float x : s.p) EXPECT_TRUE(std::isfinite(x)) << "t=" << t;
    g[10] = 0.5f;
  }
}

TEST(Optim8Reference, SignRuleKeepsSmallNegativeMomentsNegative) {
  // A block whose absmax is 1 and one element of m = -1e-9 (nearest code: 0): bitsandbytes' rule
  // stores the smallest negative code instead; +1e-9 stays at code 0.
  const K::Lut8 &m1 = K::optim8_signed_map(), &m2 = K::optim8_unsigned_map();
  std::vector<float> p = {0.0f, 0.0f, 0.0f}, g = {10.0f, -1e-8f, 1e-8f};
  std::vector<uint8_t> s1(3, 0), s2(3, 0);
  std::vector<float> a1(1, 0.0f), a2(1, 0.0f);
  const Optim8Params prm = adam_params(0, 1);
  for (const KernelTable* k : {&K::kernels_for(Isa::scalar), &K::active_kernels()}) {
    k->optim8_adam_blocks(p.data(), g.data(), s1.data(), s2.data(), a1.data(), a2.data(), 3, 256, &prm, &m1,
                          &m2);
    EXPECT_LT(m1.code[s1[1]], 0.0f);
    EXPECT_GT(m1.code[s1[1]], -1e-5f);
    EXPECT_EQ(m1.code[s1[2]], 0.0f);
    std::fill(s1.begin(), s1.end(), 0);
    std::fill(s2.begin(), s2.end(), 0);
    a1[0] = a2[0] = 0.0f;
  }
}

// ---- the threaded driver ---------------------------------------------------------------------

TEST(Optim8Driver, ThreadCountDoesNotChangeTheBits) {
  const int64_t n = 3 * (int64_t{1} << 15) + 1001, bs = 256;
  const auto g = make_grad(n, GradFill::mixed, 9);
  State one(n, bs, 8, true), two = one;
  const Optim8Params prm = adam_params(2, 3);
  K::set_num_threads(1);
  K::optim8_adam(one.p.data(), g.data(), one.s1.data(), one.s2.data(), one.a1.data(), one.a2.data(), n, bs,
                 prm, K::optim8_signed_map(), K::optim8_unsigned_map());
  K::optim8_lion(one.p.data(), g.data(), one.s1.data(), one.a1.data(), n, bs,
                 K::optim8_lion_params(1e-4, .9, .99, 0), K::optim8_signed_map());
  K::set_num_threads(2);
  K::optim8_adam(two.p.data(), g.data(), two.s1.data(), two.s2.data(), two.a1.data(), two.a2.data(), n, bs,
                 prm, K::optim8_signed_map(), K::optim8_unsigned_map());
  K::optim8_lion(two.p.data(), g.data(), two.s1.data(), two.a1.data(), n, bs,
                 K::optim8_lion_params(1e-4, .9, .99, 0), K::optim8_signed_map());
  K::set_num_threads(0);
  const char* ctx = "threads 1 vs 2";
  EXPECT_SAME(one.p, two.p, "p");
  EXPECT_SAME(one.s1, two.s1, "s1");
  EXPECT_SAME(one.s2, two.s2, "s2");
  EXPECT_SAME(one.a1, two.a1, "absmax1");
  EXPECT_SAME(one.a2, two.a2, "absmax2");
}

TEST(Optim8Driver, BadArguments) {
  float f = 0;
  uint8_t c = 0;
  const Optim8Params prm;
  const K::Lut8& m = K::optim8_signed_map();
  auto expect_throw = [](auto&& fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "no throw, expected " << needle;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_throw([&] { K::optim8_adam(&f, &f, &c, &c, &f, &f, -1, 256, prm, m, m); },
               "optim8_adam: n: expected >= 0");
  expect_throw([&] { K::optim8_adam(&f, &f, &c, &c, &f, &f, 1, 0, prm, m, m); }, "bs: expected a block size");
  expect_throw([&] { K::optim8_adam(&f, &f, &c, &c, &f, &f, 1, 8192, prm, m, m); }, "got 8192");
  expect_throw([&] { K::optim8_adam(&f, nullptr, &c, &c, &f, &f, 1, 256, prm, m, m); },
               "g: expected a buffer");
  expect_throw([&] { K::optim8_lion(&f, &f, nullptr, &f, 1, 256, prm, m); },
               "optim8_lion: s1: expected a buffer");
  K::optim8_adam(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 256, prm, m, m);  // n = 0: nothing
}

}  // namespace
}  // namespace msbnb::test
