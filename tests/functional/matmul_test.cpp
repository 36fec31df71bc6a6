// Fused quantized matmul through the functional API, on the ISA this process runs (the suite runs
// once per ISA, MSBNB_ISA): against "dequantize, then matmul" in double, round trips of the
// packed layout, LLM.int8() against bitsandbytes' fixtures, and bad input.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>

#include "msbnb/kernels/ops.h"
#include "msbnb/msbnb.h"

namespace {

using msbnb::MatmulPath;
using msbnb::PackedWeight;

constexpr double kEps32 = 1.0 / (1 << 24);   // unit roundoff of float32
constexpr double kEpsBf16 = 1.0 / (1 << 8);  // unit roundoff of bfloat16 (8 significant bits)

struct Case {
  std::string name;
  PackedWeight w;
  torch::Tensor dequant;  // float32 [out, in]
};

Case make_case(const std::string& fmt, int64_t out, int64_t in, int64_t block, bool nested, bool sym) {
  torch::manual_seed(out * 131 + in);
  const torch::Tensor w = torch::randn({out, in});
  Case c;
  c.name = fmt + " " + std::to_string(out) + "x" + std::to_string(in) + " b" + std::to_string(block) +
           (nested ? " dq" : "") + (sym ? "" : " asym");
  if (fmt == "int8") {
    const auto q = msbnb::quantize_8bit(w, msbnb::Int8Options().symmetric(sym));
    c.w = PackedWeight::from_8bit(q);
    c.dequant = msbnb::dequantize_8bit(q);
  } else {
    const auto q = msbnb::quantize_4bit(
        w,
        msbnb::Quantize4bitOptions().quant_type(fmt).blocksize(block).compress_statistics(nested).symmetric(
            sym));
    c.w = PackedWeight::from_4bit(q.data, q.state);
    c.dequant = msbnb::dequantize_4bit(q.data, q.state);
  }
  return c;
}

std::vector<Case> cases() {
  std::vector<Case> v;
  for (const char* f : {"nf4", "fp4"}) {
    v.push_back(make_case(f, 67, 257, 64, false, true));   // blocks straddle rows: scalar layout
    v.push_back(make_case(f, 33, 640, 64, true, true));    // double quantization
    v.push_back(make_case(f, 17, 384, 128, false, true));  // SIMD layout
  }
  v.push_back(make_case("int4", 67, 300, 128, false, true));  // short last group
  v.push_back(make_case("int4", 33, 257, 32, true, false));   // asymmetric, odd columns
  v.push_back(make_case("int4", 17, 200, 50, false, true));   // group not a multiple of 16
  v.push_back(make_case("int8", 67, 257, 0, false, true));
  v.push_back(make_case("int8", 33, 640, 0, false, false));
  return v;
}

// |y - ref| <= bound elementwise, bound = rel * sum_j |x_j w_j| + abs (all in double).
void expect_close(const torch::Tensor& y, const torch::Tensor& ref, const torch::Tensor& absprod, double rel,
                  double abs, const std::string& what) {
  const torch::Tensor err = (y.to(torch::kFloat64) - ref).abs();
  const torch::Tensor bound = absprod * rel + abs;
  const auto worst = (err - bound).max().item<double>();
  EXPECT_LE(worst, 0.0) << what << ": error exceeds the bound by " << worst;
}

TEST(Matmul, MatchesDequantizeThenMatmul) {
  for (const Case& c : cases()) {
    const int64_t in = c.dequant.size(1);
    const torch::Tensor wd = c.dequant.to(torch::kFloat64);
    for (int64_t n : {1, 3, 8, 9, 33}) {
      for (bool with_bias : {false, true}) {
        for (auto dt : {torch::kFloat32, torch::kBFloat16}) {
          torch::manual_seed(n);
          const torch::Tensor x = torch::randn({n, in}).to(dt);
          const torch::Tensor bias = with_bias ? torch::randn({c.dequant.size(0)}) : torch::Tensor();
          const torch::Tensor xd = x.to(torch::kFloat64);
          torch::Tensor ref = xd.matmul(wd.t());
          if (with_bias) ref += bias.to(torch::kFloat64);
          const torch::Tensor absprod = xd.abs().matmul(wd.abs().t());
          // Output rounding: float32 (or bf16) of |ref|, plus the bias ulp.
          const double out_eps = dt == torch::kBFloat16 ? kEpsBf16 : kEps32;
          const torch::Tensor out_round = ref.abs() * out_eps + (with_bias ? 1e-6 : 0.0);
          for (MatmulPath path : {MatmulPath::exact, MatmulPath::fast}) {
            const std::string what = c.name + " n=" + std::to_string(n) + (with_bias ? " bias" : "") +
                                     (dt == torch::kBFloat16 ? " bf16" : " f32") +
                                     (path == MatmulPath::exact ? " exact" : " fast");
            const torch::Tensor y = msbnb::quantized_matmul(x, c.w, bias, path);
            ASSERT_EQ(y.scalar_type(), dt) << what;
            ASSERT_EQ(y.sizes(), ref.sizes()) << what;
            if (path == MatmulPath::exact) {
              // Summation order only: (in + 4) roundings of at most eps of the running |sum|.
              expect_close(y, ref, absprod * ((in + 4) * kEps32) + out_round, 1.0, 0.0, what);
            } else if (c.w.lut4()) {
              // bf16 weights and activations: each rounding is within 2^-8 relative (bf16's unit
              // roundoff), so each product within 2^-7 + 2^-16; then float32 sums.
              expect_close(y, ref, absprod * (2 * kEpsBf16 + 1.0 / (1 << 16) + (in + 4) * kEps32) + out_round,
                           1.0, 0.0, what);
            } else {
              // int8 activations, per row: each x_j moves by at most half a step absmax / 127, and
              // multiplies the code q (the offset of asymmetric weights meets the exact sum of x).
              const auto q8 = c.w.to_8bit();
              const torch::Tensor qabs = q8.weight_int8.to(torch::kFloat64).abs().sum(1, true) *
                                         q8.scale.to(torch::kFloat64).reshape({-1, 1});
              const torch::Tensor step = xd.abs().amax(1, true) / 127.0;
              const torch::Tensor qerr = step.mul(0.5).matmul(qabs.t());
              expect_close(y, ref, qerr * (1 + 1e-6) + absprod * ((in + 8) * kEps32) + out_round, 1.0, 0.0,
                           what);
            }
          }
        }
      }
    }
  }
}

TEST(Matmul, BatchDimensionsAndTransposedProduct) {
  for (const Case& c : cases()) {
    const int64_t out = c.dequant.size(0), in = c.dequant.size(1);
    const torch::Tensor wd = c.dequant.to(torch::kFloat64);
    torch::manual_seed(7);
    const torch::Tensor x = torch::randn({2, 5, in});
    const torch::Tensor y = msbnb::quantized_matmul(x, c.w, {}, MatmulPath::exact);
    ASSERT_EQ(y.sizes(), (std::vector<int64_t>{2, 5, out})) << c.name;
    const torch::Tensor absprod = x.to(torch::kFloat64).abs().matmul(wd.abs().t());
    expect_close(y, x.to(torch::kFloat64).matmul(wd.t()), absprod, (in + 4) * kEps32 + kEps32, 0.0, c.name);
    for (auto dt : {torch::kFloat32, torch::kBFloat16}) {
      const torch::Tensor gy = torch::randn({2, 3, out}).to(dt);
      const torch::Tensor gx = msbnb::quantized_matmul_transposed(gy, c.w);
      ASSERT_EQ(gx.sizes(), (std::vector<int64_t>{2, 3, in})) << c.name;
      ASSERT_EQ(gx.scalar_type(), dt) << c.name;
      const torch::Tensor gyd = gy.to(torch::kFloat64);
      const torch::Tensor ref = gyd.matmul(wd), absp = gyd.abs().matmul(wd.abs());
      const double out_eps = dt == torch::kBFloat16 ? kEpsBf16 : kEps32;
      expect_close(gx, ref, absp * ((out + 4) * kEps32) + ref.abs() * out_eps, 1.0, 0.0,
                   c.name + " transposed");
    }
  }
}

TEST(Matmul, FastPathErrorOnGaussianData) {
  torch::manual_seed(3);
  const torch::Tensor w = torch::randn({256, 1024}), x = torch::randn({64, 1024});
  for (const char* fmt : {"nf4", "int8"}) {
    const Case c = make_case(fmt, 256, 1024, 64, false, true);
    const torch::Tensor ref = x.to(torch::kFloat64).matmul(c.dequant.to(torch::kFloat64).t());
    const torch::Tensor y = msbnb::quantized_matmul(x, c.w, {}, MatmulPath::fast).to(torch::kFloat64);
    const double rel = ((y - ref).norm() / ref.norm()).item<double>();
    // bf16: about 2^-9 / sqrt(3) per factor, ~0.2 %; int8 per row: absmax / (127 sqrt(12)) / rms ~ 0.8 %.
    EXPECT_LT(rel, 0.01) << fmt;
    EXPECT_GT(rel, 0.0) << fmt << ": the fast path should not be exact";
    std::cout << "[ INFO     ] fast path relative error " << fmt << ": " << 100 * rel << " %\n";
  }
}

TEST(Matmul, RoundTripToInterchangeIsExact) {
  torch::manual_seed(5);
  for (auto [fmt, out, in, block, sym] :
       {std::tuple{"nf4", 7, 33, 64, true}, std::tuple{"fp4", 33, 640, 128, true},
        std::tuple{"int4", 9, 257, 32, false}, std::tuple{"int4", 9, 130, 64, true}}) {
    const auto q =
        msbnb::quantize_4bit(torch::randn({out, in}),
                             msbnb::Quantize4bitOptions().quant_type(fmt).blocksize(block).symmetric(sym));
    const PackedWeight w = PackedWeight::from_4bit(q.data, q.state);
    const auto back = w.to_4bit();
    EXPECT_TRUE(torch::equal(back.data, q.data)) << fmt;
    EXPECT_TRUE(torch::equal(back.state.absmax, q.state.absmax)) << fmt;
    EXPECT_TRUE(
        torch::equal(msbnb::dequantize_4bit(back.data, back.state), msbnb::dequantize_4bit(q.data, q.state)));
    EXPECT_EQ(w.out_features(), out);
    EXPECT_EQ(w.in_features(), in);
    EXPECT_EQ(w.format(), fmt);
  }
  for (bool sym : {true, false}) {
    const auto q = msbnb::quantize_8bit(torch::randn({13, 77}), msbnb::Int8Options().symmetric(sym));
    const auto back = PackedWeight::from_8bit(q).to_8bit();
    EXPECT_TRUE(torch::equal(back.weight_int8, q.weight_int8));
    EXPECT_TRUE(torch::equal(msbnb::dequantize_8bit(back), msbnb::dequantize_8bit(q)));
  }
}

TEST(Matmul, Int8VectorwiseQuantMatchesBitsandbytes) {
  std::ifstream f(std::string(MSBNB_FIXTURES_DIR) + "/bnb/int8_vectorwise.json");
  ASSERT_TRUE(f) << "missing fixture int8_vectorwise.json";
  const nlohmann::json file = nlohmann::json::parse(f);
  for (const auto& c : file["cases"]) {
    const auto& in = file["inputs"][c["input"].get<std::string>()];
    std::vector<float> vals = in["values"].get<std::vector<float>>();
    torch::Tensor x = torch::tensor(vals).reshape(in["shape"].get<std::vector<int64_t>>());
    if (in["dtype"] == "float16") x = x.to(torch::kFloat16);
    const auto r = msbnb::int8_vectorwise_quant(x, c["params"]["threshold"].get<double>());
    const auto& o = c["outputs"];
    const std::string name = c["name"];
    EXPECT_TRUE(torch::equal(
        r.CB, torch::tensor(o["CB"].get<std::vector<int64_t>>()).to(torch::kInt8).reshape(x.sizes())))
        << name;
    EXPECT_TRUE(torch::equal(r.SCB, torch::tensor(o["SCB"].get<std::vector<float>>()))) << name;
    const std::vector<int64_t> cols =
        o["outlier_cols"].is_null() ? std::vector<int64_t>{} : o["outlier_cols"].get<std::vector<int64_t>>();
    EXPECT_EQ(r.outlier_cols, cols) << name;
  }
}

TEST(Matmul, LlmInt8WithOutliers) {
  torch::manual_seed(11);
  const int64_t out = 37, in = 200, n = 9;
  const torch::Tensor w = torch::randn({out, in});
  // bitsandbytes' weight side: CB = rne(w * 127 / row absmax), SCB = row absmax.
  const auto wq = msbnb::int8_vectorwise_quant(w);
  const PackedWeight pw = PackedWeight::from_int8_scb(wq.CB, wq.SCB);
  torch::Tensor x = torch::randn({n, in});
  x.index_put_({2, 5}, 9.0f);
  x.index_put_({7, 150}, -12.0f);
  for (double threshold : {0.0, 6.0}) {
    const auto r = msbnb::int8_matmul(x, pw, threshold);
    const auto xq = msbnb::int8_vectorwise_quant(x, threshold);
    EXPECT_EQ(r.outlier_cols, xq.outlier_cols);
    if (threshold > 0) {
      EXPECT_EQ(r.outlier_cols, (std::vector<int64_t>{5, 150}));
    }
    // Reference: exact integer products, the same scaling, outlier columns in double.
    const torch::Tensor acc = xq.CB.to(torch::kFloat64).matmul(wq.CB.to(torch::kFloat64).t());
    const torch::Tensor scale =
        (xq.SCB.to(torch::kFloat64) / 127.0).unsqueeze(1) * (wq.SCB.to(torch::kFloat64) / 127.0).unsqueeze(0);
    torch::Tensor ref = acc * scale;
    const torch::Tensor wd = wq.CB.to(torch::kFloat64) * (wq.SCB.to(torch::kFloat64) / 127.0).unsqueeze(1);
    torch::Tensor outlier_abs = torch::zeros_like(ref);
    for (int64_t col : xq.outlier_cols) {
      const torch::Tensor p =
          x.select(1, col).to(torch::kFloat64).unsqueeze(1) * wd.select(1, col).unsqueeze(0);
      ref += p;
      outlier_abs += p.abs();
    }
    // float32 scaling of an exact int32 (a few roundings) and the fp32 outlier sums.
    const torch::Tensor bound =
        (acc.abs() * scale) * (8 * kEps32) + outlier_abs * (in * kEps32) + ref.abs() * kEps32;
    const torch::Tensor err = (r.out.to(torch::kFloat64) - ref).abs();
    EXPECT_LE((err - bound).max().item<double>(), 0.0) << "threshold " << threshold;
  }
}

void expect_error(const std::function<void()>& fn, std::initializer_list<const char*> parts) {
  try {
    fn();
    ADD_FAILURE() << "expected an exception";
  } catch (const std::exception& e) {
    const std::string msg = e.what();
    for (const char* p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
  }
}

// quantized_matmul and int8_matmul are differentiable in x and bias: grad_x through the fused
// transposed product, grad_bias the row sum of grad_y, against torch autograd in double through
// the dequantized weight. The packed weight is not an input, so it gets no gradient.
TEST(Matmul, AutogradMatchesDequantizedWeight) {
  std::vector<Case> cs = cases();
  for (const Case& c : cs) {
    const int64_t out = c.dequant.size(0), in = c.dequant.size(1);
    torch::manual_seed(21);
    const torch::Tensor x = torch::randn({2, 5, in}).requires_grad_(true);
    const torch::Tensor bias = torch::randn({out}).requires_grad_(true);
    const torch::Tensor g = torch::randn({2, 5, out});
    const torch::Tensor y = msbnb::quantized_matmul(x, c.w, bias, MatmulPath::exact);
    ASSERT_TRUE(y.grad_fn() != nullptr) << c.name << ": the output has no grad_fn";
    (y * g).sum().backward();
    ASSERT_TRUE(x.grad().defined() && bias.grad().defined()) << c.name;
    // Reference: autograd in double through the dequantized weight.
    const torch::Tensor xr = x.detach().to(torch::kFloat64).requires_grad_(true);
    const torch::Tensor br = bias.detach().to(torch::kFloat64).requires_grad_(true);
    const torch::Tensor wd = c.dequant.to(torch::kFloat64);
    (torch::matmul(xr, wd.t()).add(br) * g.to(torch::kFloat64)).sum().backward();
    const torch::Tensor gd = g.to(torch::kFloat64);
    // grad_x = g · W in fp32: (out + 4) roundings of the running |sum| plus the output rounding.
    const torch::Tensor gx_bound =
        gd.abs().matmul(wd.abs()) * ((out + 4) * kEps32) + xr.grad().abs() * kEps32;
    expect_close(x.grad(), xr.grad(), gx_bound, 1.0, 0.0, c.name + " grad_x");
    // grad_bias = sum of the 10 rows of g in fp32: 10 roundings of at most eps of the running sum.
    const torch::Tensor gb_bound = gd.abs().reshape({-1, out}).sum(0) * (11 * kEps32);
    expect_close(bias.grad(), br.grad(), gb_bound, 1.0, 0.0, c.name + " grad_bias");
    // Only x: no bias gradient asked, none computed.
    const torch::Tensor x2 = x.detach().clone().requires_grad_(true);
    msbnb::quantized_matmul(x2, c.w).sum().backward();
    EXPECT_TRUE(x2.grad().defined()) << c.name;
  }
  // LLM.int8(): grad_x through CB * SCB / 127, as the weight's dequantized value.
  torch::manual_seed(22);
  const auto wq = msbnb::int8_vectorwise_quant(torch::randn({37, 200}));
  const PackedWeight pw = PackedWeight::from_int8_scb(wq.CB, wq.SCB);
  const torch::Tensor x = torch::randn({9, 200}).requires_grad_(true), g = torch::randn({9, 37});
  const auto r = msbnb::int8_matmul(x, pw, 6.0);
  ASSERT_TRUE(r.out.grad_fn() != nullptr) << "int8_matmul: the output has no grad_fn";
  (r.out * g).sum().backward();
  const torch::Tensor wd = wq.CB.to(torch::kFloat64) * (wq.SCB.to(torch::kFloat64) / 127.0).unsqueeze(1);
  const torch::Tensor ref = g.to(torch::kFloat64).matmul(wd);
  expect_close(x.grad(), ref,
               g.to(torch::kFloat64).abs().matmul(wd.abs()) * (41 * kEps32) + ref.abs() * kEps32, 1.0, 0.0,
               "int8_matmul grad_x");
}

// float16 activations give float16 outputs: the kernels widen x exactly (every half is a float)
// and round the fp32 result once to half, so the result is the fp32 one rounded to nearest even.
TEST(Matmul, Float16ActivationsAndOutputs) {
  for (const Case& c : cases()) {
    const int64_t out = c.dequant.size(0), in = c.dequant.size(1);
    torch::manual_seed(23);
    const torch::Tensor x = torch::randn({33, in}).to(torch::kFloat16), bias = torch::randn({out});
    for (MatmulPath path : {MatmulPath::exact, MatmulPath::fast}) {
      const torch::Tensor y = msbnb::quantized_matmul(x, c.w, bias, path);
      ASSERT_EQ(y.scalar_type(), torch::kFloat16) << c.name;
      const torch::Tensor y32 = msbnb::quantized_matmul(x.to(torch::kFloat32), c.w, bias, path);
      EXPECT_TRUE(torch::equal(y, y32.to(torch::kFloat16))) << c.name << " path " << int(path);
      // And against the double product: the fp32 bound plus half's rounding (2^-11 relative,
      // 2^-25 absolute below the normal range).
      if (path == MatmulPath::exact) {
        const torch::Tensor xd = x.to(torch::kFloat64), wd = c.dequant.to(torch::kFloat64);
        const torch::Tensor ref = xd.matmul(wd.t()) + bias.to(torch::kFloat64);
        const torch::Tensor b = xd.abs().matmul(wd.abs().t()) * ((in + 4) * kEps32) * (1 + 1.0 / 2048) +
                                ref.abs() * (1.0 / 2048 + kEps32) + std::ldexp(1.0, -25) + 1e-6;
        expect_close(y, ref, b, 1.0, 0.0, c.name + " f16 vs double");
      }
    }
    const torch::Tensor gy = torch::randn({2, 3, out}).to(torch::kFloat16);
    const torch::Tensor gx = msbnb::quantized_matmul_transposed(gy, c.w);
    ASSERT_EQ(gx.scalar_type(), torch::kFloat16) << c.name;
    EXPECT_TRUE(
        torch::equal(gx, msbnb::quantized_matmul_transposed(gy.to(torch::kFloat32), c.w).to(torch::kFloat16)))
        << c.name << " transposed";
  }
  const auto wq = msbnb::int8_vectorwise_quant(torch::randn({37, 200}));
  const PackedWeight pw = PackedWeight::from_int8_scb(wq.CB, wq.SCB);
  torch::Tensor x = torch::randn({9, 200});
  x.index_put_({2, 5}, 9.0f);
  const torch::Tensor xh = x.to(torch::kFloat16);
  const auto r = msbnb::int8_matmul(xh, pw, 6.0);
  ASSERT_EQ(r.out.scalar_type(), torch::kFloat16);
  EXPECT_TRUE(
      torch::equal(r.out, msbnb::int8_matmul(xh.to(torch::kFloat32), pw, 6.0).out.to(torch::kFloat16)));
  EXPECT_EQ(r.outlier_cols, (std::vector<int64_t>{5}));
  // Beyond half's range the output saturates to Inf as torch's conversion does.
  const torch::Tensor big = torch::full({1, 64}, 60000.0).to(torch::kFloat16);
  const Case c = make_case("int8", 8, 64, 0, false, true);
  const torch::Tensor yb = msbnb::quantized_matmul(big, c.w, {}, MatmulPath::exact);
  EXPECT_TRUE(torch::equal(
      yb, msbnb::quantized_matmul(big.to(torch::kFloat32), c.w, {}, MatmulPath::exact).to(torch::kFloat16)));
}

// The kernels' thread count follows at::set_num_threads at each call, and results do not depend on it.
TEST(Matmul, ThreadCountFollowsTorch) {
  const int saved = at::get_num_threads();
  const Case c = make_case("nf4", 67, 257, 64, false, true);
  const torch::Tensor x = torch::randn({33, 257}), gy = torch::randn({33, 67});
  std::vector<torch::Tensor> ys, gxs;
  for (int t : {1, 2, 3}) {
    at::set_num_threads(t);
    msbnb::kernels::set_num_threads(7);  // a stale count the call must replace
    for (MatmulPath path : {MatmulPath::exact, MatmulPath::fast})
      ys.push_back(msbnb::quantized_matmul(x, c.w, {}, path));
    EXPECT_EQ(msbnb::kernels::num_threads(), t);
    msbnb::kernels::set_num_threads(7);
    gxs.push_back(msbnb::quantized_matmul_transposed(gy, c.w));
    EXPECT_EQ(msbnb::kernels::num_threads(), t);
  }
  at::set_num_threads(saved);
  msbnb::kernels::set_num_threads(0);
  for (size_t i = 2; i < ys.size(); ++i) EXPECT_TRUE(torch::equal(ys[i], ys[i % 2])) << i;
  for (size_t i = 1; i < gxs.size(); ++i) EXPECT_TRUE(torch::equal(gxs[i], gxs[0])) << i;
}

// A checkpoint's shape is data: {2^32, 2^32} wraps rows * cols to 0 and would let empty data
// through to the packer. Every size comes from an overflow-checked count.
TEST(Matmul, HostileShapesAreRefused) {
  for (const char* fmt : {"nf4", "int4"}) {
    auto q = msbnb::quantize_4bit(
        torch::randn({4, 64}),
        msbnb::Quantize4bitOptions().quant_type(fmt).blocksize(64).compress_statistics(false));
    q.state.shape = {int64_t{1} << 32, int64_t{1} << 32};
    q.state.absmax = torch::empty({0});
    expect_error(
        [&] {
          PackedWeight::from_4bit(torch::empty({0, 1}, torch::kUInt8), q.state);
        },
        {"state.shape", "4294967296 x 4294967296"});
    q.state.shape = {int64_t{1} << 62, 2};
    expect_error(
        [&] {
          PackedWeight::from_4bit(torch::empty({0, 1}, torch::kUInt8), q.state);
        },
        {"state.shape"});
  }
}

// from_int8_scb keeps SCB: to_int8_scb gives it back bit for bit, where SCB / 127 * 127 does
// not always (the kernels' scale stays SCB / 127, so LLM.int8 numerics are unchanged).
TEST(Matmul, Int8ScbRoundTripsBitExact) {
  torch::manual_seed(24);
  const auto wq = msbnb::int8_vectorwise_quant(torch::randn({4096, 16}));
  const PackedWeight pw = PackedWeight::from_int8_scb(wq.CB, wq.SCB);
  const auto [cb, scb] = pw.to_int8_scb();
  EXPECT_TRUE(torch::equal(cb, wq.CB));
  EXPECT_TRUE(torch::equal(scb, wq.SCB));
  // The old way loses some: this data must contain such values or the test above proves nothing.
  const int64_t lost = (pw.to_8bit().scale * 127.0f != wq.SCB).sum().item<int64_t>();
  EXPECT_GT(lost, 0);
  std::cout << "[ INFO     ] SCB values SCB / 127 * 127 does not round-trip: " << lost << " of 4096\n";
  expect_error([&] { make_case("int8", 8, 64, 0, false, true).w.to_int8_scb(); },
               {"to_int8_scb", "from_int8_scb"});
}

// The memory of a packed 4096 x 4096 nf4 weight against bitsandbytes' interchange bytes.
TEST(Matmul, PackedMemoryVsInterchange) {
  const torch::Tensor w = torch::randn({4096, 4096});
  for (bool nested : {false, true}) {
    const auto q = msbnb::quantize_4bit(
        w, msbnb::Quantize4bitOptions().quant_type("nf4").blocksize(64).compress_statistics(nested));
    auto nbytes = [](const torch::Tensor& t) {
      return t.defined() ? t.numel() * int64_t(t.element_size()) : 0;
    };
    const int64_t interchange = nbytes(q.data) + nbytes(q.state.absmax) + nbytes(q.state.code) +
                                (nested ? nbytes(q.state.state2->absmax) + nbytes(q.state.state2->code) : 0);
    const PackedWeight pw = PackedWeight::from_4bit(q.data, q.state);
    // torch owns the packed weight: the kernels read the tensors() in place. Double quantization
    // keeps bitsandbytes' uint8 absmax and nested statistics (the kernels decode them per tile).
    const auto ts = pw.tensors();
    ASSERT_EQ(ts.size(), nested ? 6u : 3u);
    EXPECT_EQ(ts[0].first, "codes");
    EXPECT_EQ(ts[0].second.scalar_type(), torch::kUInt8);
    EXPECT_EQ(ts[0].second.data_ptr(), static_cast<const void*>(pw.lut4()->codes));
    int64_t sum = 0;
    for (const auto& [name, t] : ts) sum += nbytes(t);
    EXPECT_EQ(pw.bytes(), sum);
    if (nested) {
      EXPECT_EQ(ts[2].first, "absmax");
      EXPECT_EQ(ts[2].second.data_ptr(), static_cast<const void*>(pw.lut4()->nested.q));
      EXPECT_EQ(pw.lut4()->scale, nullptr);
    } else {
      EXPECT_EQ(ts[1].first, "scale");
      EXPECT_EQ(ts[1].second.data_ptr(), static_cast<const void*>(pw.lut4()->scale));
    }
    const auto back = pw.to_4bit();
    EXPECT_TRUE(torch::equal(back.data, q.data));
    EXPECT_TRUE(torch::equal(back.state.absmax, q.state.absmax));
    const double ratio = double(pw.bytes()) / double(interchange);
    std::cout << "[ INFO     ] nf4 4096x4096 b64" << (nested ? " double quant" : "") << ": packed "
              << pw.bytes() << " B, interchange " << interchange << " B, ratio " << ratio << "\n";
    EXPECT_LE(ratio, 1.05);
  }
}

TEST(Matmul, BadInput) {
  const Case c = make_case("nf4", 8, 64, 64, false, true);
  const Case c8 = make_case("int8", 8, 64, 0, false, true);
  const Case c8a = make_case("int8", 8, 64, 0, false, false);
  expect_error(
      [&] {
        msbnb::quantized_matmul(torch::randn({2, 64}).to(torch::kFloat64), c.w);
      },
      {"x:", "float32, float16 or bfloat16", "Double"});
  expect_error([&] { msbnb::quantized_matmul(torch::ones({2, 64}, torch::kInt32), c.w); }, {"x:", "Int"});
  expect_error([&] { msbnb::quantized_matmul(torch::randn({2, 63}), c.w); }, {"x:", "64", "[2, 63]"});
  expect_error(
      [&] {
        msbnb::quantized_matmul(torch::randn({2, 64}), c.w, torch::randn({7}));
      },
      {"bias:", "[8]", "[7]"});
  expect_error([&] { msbnb::quantized_matmul(torch::randn({2, 64}), PackedWeight()); }, {"w:", "empty"});
  expect_error([&] { msbnb::quantized_matmul_transposed(torch::randn({2, 9}), c.w); }, {"grad_y:", "8"});
  expect_error([&] { msbnb::int8_matmul(torch::randn({2, 64}), c.w); }, {"w:", "int8", "nf4"});
  expect_error([&] { msbnb::int8_matmul(torch::randn({2, 64}), c8a.w); }, {"w:", "symmetric"});
  expect_error([&] { msbnb::int8_matmul(torch::randn({2, 64}), c8.w, -1.0); }, {"threshold:", "-1"});
  expect_error([&] { c.w.to_8bit(); }, {"to_8bit", "nf4"});
  const auto q = msbnb::quantize_4bit(torch::randn({64}), msbnb::Quantize4bitOptions().quant_type("nf4"));
  expect_error([&] { PackedWeight::from_4bit(q.data, q.state); }, {"state.shape:", "2-D", "[64]"});
  const auto q8 = msbnb::quantize_8bit(torch::randn({4, 64}),
                                       msbnb::Int8Options().granularity(msbnb::Granularity::per_block));
  expect_error([&] { PackedWeight::from_8bit(q8); }, {"granularity", "per_block"});
  expect_error(
      [&] {
        PackedWeight::from_int8_scb(torch::zeros({4, 8}, torch::kInt8), torch::ones({3}));
      },
      {"SCB:", "4", "3"});
  expect_error(
      [&] {
        PackedWeight::from_int8_scb(torch::zeros({4, 8}, torch::kInt8), torch::full({4}, NAN));
      },
      {"SCB:", "finite"});
  // Empty batches are fine: no rows in, no rows out.
  EXPECT_EQ(msbnb::quantized_matmul(torch::randn({0, 64}), c.w).sizes(), (std::vector<int64_t>{0, 8}));
}

// ---------------------------------------------------------------------------------------------
// PackedLayout, zeros, from_tensors: what a torch::nn module rebuilds its weight from.

using Named = std::vector<std::pair<std::string, torch::Tensor>>;

// A weight made by from_4bit / from_8bit / from_int8_scb with what it was made from.
struct LayoutCase {
  std::string name;
  PackedWeight w;
  msbnb::Quantized4bit q4;     // 4-bit
  msbnb::Int8Quantized q8;     // int8
  torch::Tensor cb, scb;       // from_int8_scb
  msbnb::PackedLayout layout;  // the expected layout()
  std::vector<std::string> names;
};

std::vector<LayoutCase> layout_cases() {
  std::vector<LayoutCase> v;
  torch::manual_seed(31);
  for (const char* f : {"nf4", "fp4"})
    for (bool dq : {false, true})
      for (int64_t bs : {64, 128}) {
        LayoutCase c;
        c.name = std::string(f) + " b" + std::to_string(bs) + (dq ? " dq" : "");
        // in = 200: blocks straddle rows (not a multiple of the blocksize); 19 x 200 odd count
        // of nibbles is even, so also an odd count: 19 x 201 for b128.
        const int64_t in = bs == 64 ? 200 : 201;
        c.q4 = msbnb::quantize_4bit(
            torch::randn({19, in}) * 3,
            msbnb::Quantize4bitOptions().quant_type(f).blocksize(bs).compress_statistics(dq));
        c.w = PackedWeight::from_4bit(c.q4.data, c.q4.state);
        c.layout.format = f;
        c.layout.out_features = 19;
        c.layout.in_features = in;
        c.layout.blocksize = bs;
        c.layout.double_quant = dq;
        c.names =
            dq ? std::vector<std::string>{"codes", "code", "absmax", "nested_absmax", "nested_code", "offset"}
               : std::vector<std::string>{"codes", "scale", "code"};
        v.push_back(c);
      }
  // nf4 double quant over more than one nested block (4096 x 80 / 64 = 5120 blocks of 256).
  {
    LayoutCase c;
    c.name = "nf4 b64 dq 5120 blocks";
    c.q4 = msbnb::quantize_4bit(torch::randn({4096, 80}),
                                msbnb::Quantize4bitOptions().quant_type("nf4").compress_statistics(true));
    c.w = PackedWeight::from_4bit(c.q4.data, c.q4.state);
    c.layout.format = "nf4";
    c.layout.out_features = 4096;
    c.layout.in_features = 80;
    c.layout.blocksize = 64;
    c.layout.double_quant = true;
    c.names = {"codes", "code", "absmax", "nested_absmax", "nested_code", "offset"};
    v.push_back(c);
  }
  for (bool sym : {true, false})
    for (bool dq : {false, true}) {
      LayoutCase c;
      c.name = std::string("int4 g128") + (sym ? "" : " asym") + (dq ? " dq" : "");
      c.q4 = msbnb::quantize_4bit(
          torch::randn({13, 301}).to(torch::kBFloat16),
          msbnb::Quantize4bitOptions().quant_type("int4").symmetric(sym).compress_statistics(dq));
      c.w = PackedWeight::from_4bit(c.q4.data, c.q4.state);
      c.layout.format = "int4";
      c.layout.out_features = 13;
      c.layout.in_features = 301;
      c.layout.blocksize = 128;
      c.layout.asymmetric = !sym;
      c.layout.double_quant = dq;
      c.layout.dtype = torch::kBFloat16;
      c.names = {"codes"};
      if (!dq) c.names.push_back("scale");
      if (!sym) c.names.push_back("zero_point");
      if (dq) c.names.insert(c.names.end(), {"absmax", "nested_absmax", "nested_code", "offset"});
      v.push_back(c);
    }
  for (auto g : {msbnb::Granularity::per_channel, msbnb::Granularity::per_tensor})
    for (bool sym : {true, false}) {
      LayoutCase c;
      c.name = std::string("int8 ") + (g == msbnb::Granularity::per_tensor ? "per_tensor" : "per_channel") +
               (sym ? "" : " asym");
      c.q8 = msbnb::quantize_8bit(torch::randn({21, 77}).to(torch::kFloat16),
                                  msbnb::Int8Options().symmetric(sym).granularity(g));
      c.w = PackedWeight::from_8bit(c.q8);
      c.layout.format = "int8";
      c.layout.out_features = 21;
      c.layout.in_features = 77;
      c.layout.asymmetric = !sym;
      c.layout.granularity = g;
      c.layout.dtype = torch::kFloat16;
      c.names = sym ? std::vector<std::string>{"codes", "scale", "row_sum"}
                    : std::vector<std::string>{"codes", "scale", "offset", "row_sum"};
      v.push_back(c);
    }
  {
    LayoutCase c;
    c.name = "int8 scb";
    const auto vq = msbnb::int8_vectorwise_quant(torch::randn({21, 77}));
    c.cb = vq.CB;
    c.scb = vq.SCB;
    c.w = PackedWeight::from_int8_scb(c.cb, c.scb);
    c.layout.format = "int8";
    c.layout.out_features = 21;
    c.layout.in_features = 77;
    c.layout.scb = true;
    c.names = {"codes", "scale", "row_sum", "SCB"};
    v.push_back(c);
  }
  return v;
}

Named cloned(const Named& ts) {
  Named out;
  for (const auto& [n, t] : ts) out.emplace_back(n, t.clone());
  return out;
}

// Every output of a weight: forward on both paths (n = 1 and 33), and the transposed product.
std::vector<torch::Tensor> outputs(const PackedWeight& w) {
  torch::manual_seed(77);
  const torch::Tensor x1 = torch::randn({1, w.in_features()}), x33 = torch::randn({33, w.in_features()});
  const torch::Tensor gy = torch::randn({5, w.out_features()});
  return {msbnb::quantized_matmul(x1, w, {}, MatmulPath::exact),
          msbnb::quantized_matmul(x33, w, {}, MatmulPath::exact),
          msbnb::quantized_matmul(x33, w, {}, MatmulPath::fast), msbnb::quantized_matmul_transposed(gy, w)};
}

void expect_same_outputs(const PackedWeight& a, const PackedWeight& b, const std::string& what) {
  const auto ya = outputs(a), yb = outputs(b);
  for (size_t i = 0; i < ya.size(); ++i) EXPECT_TRUE(torch::equal(ya[i], yb[i])) << what << " output " << i;
}

bool same_tensor(const torch::Tensor& a, const torch::Tensor& b) {
  return a.defined() == b.defined() &&
         (!a.defined() ||
          (a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && torch::equal(a, b)));
}

void expect_same_state(const msbnb::QuantState& a, const msbnb::QuantState& b, const std::string& what) {
  EXPECT_EQ(a.quant_type, b.quant_type) << what;
  EXPECT_EQ(a.shape, b.shape) << what;
  EXPECT_EQ(a.dtype, b.dtype) << what;
  EXPECT_EQ(a.blocksize, b.blocksize) << what;
  EXPECT_TRUE(same_tensor(a.absmax, b.absmax)) << what << " absmax";
  EXPECT_TRUE(same_tensor(a.code, b.code)) << what << " code";
  EXPECT_TRUE(same_tensor(a.offset, b.offset)) << what << " offset";
  EXPECT_TRUE(same_tensor(a.zero_point, b.zero_point)) << what << " zero_point";
  ASSERT_EQ(a.nested(), b.nested()) << what;
  if (a.nested()) expect_same_state(*a.state2, *b.state2, what + " state2");
}

// The interchange tensors back from w equal what c was made from, bit for bit.
void expect_interchange(const LayoutCase& c, const PackedWeight& w, const std::string& what) {
  if (c.layout.format == "int8") {
    const auto q = w.to_8bit();
    EXPECT_TRUE(same_tensor(q.weight_int8, c.scb.defined() ? c.cb : c.q8.weight_int8)) << what;
    if (c.scb.defined()) {
      const auto [cb, scb] = w.to_int8_scb();
      EXPECT_TRUE(same_tensor(cb, c.cb)) << what;
      EXPECT_TRUE(same_tensor(scb, c.scb)) << what;
      return;
    }
    EXPECT_TRUE(same_tensor(q.scale, c.q8.scale)) << what;
    EXPECT_TRUE(same_tensor(q.offset, c.q8.offset)) << what;
    EXPECT_EQ(q.options.symmetric(), c.q8.options.symmetric()) << what;
    EXPECT_EQ(q.options.granularity(), c.q8.options.granularity()) << what;
    EXPECT_EQ(q.dtype, c.q8.dtype) << what;
    return;
  }
  const auto q = w.to_4bit();
  EXPECT_TRUE(same_tensor(q.data, c.q4.data)) << what;
  expect_same_state(q.state, c.q4.state, what);
}

TEST(PackedLayout, RoundTripThroughTensors) {
  for (const LayoutCase& c : layout_cases()) {
    const msbnb::PackedLayout l = c.w.layout();
    EXPECT_TRUE(l == c.layout) << c.name;
    const Named ts = c.w.tensors();
    std::vector<std::string> names;
    int64_t bytes = 0;
    for (const auto& [n, t] : ts) {
      names.push_back(n);
      bytes += t.numel() * int64_t(t.element_size());
      for (const auto& [n2, t2] : ts)
        if (n2 != n) {
          EXPECT_NE(t.data_ptr(), t2.data_ptr()) << c.name << ": " << n << " and " << n2;
        }
    }
    EXPECT_EQ(names, c.names) << c.name;
    EXPECT_EQ(c.w.bytes(), bytes) << c.name;
    expect_interchange(c, c.w, c.name);
    // Over the same tensors (views: no copy) and over clones (what Module::clone does).
    const PackedWeight same = PackedWeight::from_tensors(l, ts);
    for (size_t i = 0; i < ts.size(); ++i)
      EXPECT_EQ(same.tensors()[i].second.data_ptr(), ts[i].second.data_ptr());
    const PackedWeight copy = PackedWeight::from_tensors(l, cloned(ts));
    EXPECT_TRUE(copy.layout() == l) << c.name;
    expect_same_outputs(c.w, same, c.name + " from_tensors");
    expect_same_outputs(c.w, copy, c.name + " clone");
    expect_interchange(c, copy, c.name + " clone");
    // Order of the given tensors does not matter.
    Named reversed(ts.rbegin(), ts.rend());
    expect_same_outputs(c.w, PackedWeight::from_tensors(l, reversed), c.name + " reversed");
  }
}

// zeros(layout) is what a module registers before a load: it multiplies to 0, has the tensors of
// its layout, and a load copying a weight's tensors into them (in place) rebuilds that weight.
TEST(PackedLayout, ZerosAndLoadIntoThem) {
  for (const LayoutCase& c : layout_cases()) {
    const PackedWeight z = PackedWeight::zeros(c.layout);
    EXPECT_TRUE(z.layout() == c.layout) << c.name;
    const Named zt = z.tensors(), wt = c.w.tensors();
    ASSERT_EQ(zt.size(), wt.size()) << c.name;
    for (size_t i = 0; i < zt.size(); ++i) {
      EXPECT_EQ(zt[i].first, wt[i].first) << c.name;
      EXPECT_EQ(zt[i].second.sizes(), wt[i].second.sizes()) << c.name << " " << zt[i].first;
      EXPECT_EQ(zt[i].second.scalar_type(), wt[i].second.scalar_type()) << c.name << " " << zt[i].first;
    }
    for (const torch::Tensor& y : outputs(z)) EXPECT_EQ(y.abs().max().item<float>(), 0.0f) << c.name;
    if (c.layout.format == "nf4" || c.layout.format == "fp4") {
      EXPECT_TRUE(torch::equal(
          z.to_4bit().state.code,
          msbnb::quantize_4bit(torch::ones({64}), msbnb::Quantize4bitOptions().quant_type(c.layout.format))
              .state.code))
          << c.name;
    }
    // load_state_dict: copy_ into the registered buffers, then rebuild over them.
    for (size_t i = 0; i < zt.size(); ++i) zt[i].second.copy_(wt[i].second);
    const PackedWeight loaded = PackedWeight::from_tensors(c.layout, zt);
    expect_same_outputs(c.w, loaded, c.name + " loaded");
    expect_interchange(c, loaded, c.name + " loaded");
  }
}

TEST(PackedLayout, BadTensorsAreRefused) {
  const auto q = msbnb::quantize_4bit(
      torch::randn({8, 256}), msbnb::Quantize4bitOptions().quant_type("nf4").compress_statistics(true));
  const PackedWeight w = PackedWeight::from_4bit(q.data, q.state);
  const msbnb::PackedLayout l = w.layout();
  const Named ts = w.tensors();
  auto with = [&](const std::string& name, const torch::Tensor& t) {
    Named v = ts;
    for (auto& [n, x] : v)
      if (n == name) x = t;
    return v;
  };
  auto without = [&](const std::string& name) {
    Named v;
    for (const auto& p : ts)
      if (p.first != name) v.push_back(p);
    return v;
  };
  expect_error([&] { PackedWeight::from_tensors(l, without("nested_absmax")); },
               {"\"nested_absmax\"", "Float [1]", "got none"});
  {
    Named v = ts;
    v.emplace_back("scale", torch::zeros({128}));
    expect_error([&] { PackedWeight::from_tensors(l, v); }, {"\"scale\"", "expected only", "\"codes\""});
    v = ts;
    v.push_back(ts[1]);
    expect_error([&] { PackedWeight::from_tensors(l, v); }, {"\"code\"", "twice"});
  }
  expect_error([&] { PackedWeight::from_tensors(l, with("absmax", torch::zeros({32}, torch::kInt8))); },
               {"tensors[\"absmax\"]", "Byte [32]", "Char [32]"});
  expect_error([&] { PackedWeight::from_tensors(l, with("absmax", torch::zeros({31}, torch::kUInt8))); },
               {"tensors[\"absmax\"]", "Byte [32]", "Byte [31]"});
  expect_error([&] { PackedWeight::from_tensors(l, with("offset", torch::zeros({1}))); },
               {"tensors[\"offset\"]", "Float []", "Float [1]"});
  expect_error([&] { PackedWeight::from_tensors(l, with("code", torch::Tensor())); },
               {"tensors[\"code\"]", "undefined"});
  const int64_t nb = ts[0].second.numel();
  expect_error(
      [&] {
        PackedWeight::from_tensors(l, with("codes", torch::zeros({nb + 1}, torch::kUInt8).narrow(0, 1, nb)));
      },
      {"tensors[\"codes\"]", "64-byte aligned", "% 64 = 1"});
  expect_error(
      [&] { PackedWeight::from_tensors(l, with("nested_code", torch::zeros({512}).slice(0, 0, 512, 2))); },
      {"tensors[\"nested_code\"]", "contiguous", "[2]"});
  expect_error(
      [&] { PackedWeight::from_tensors(l, with("code", torch::zeros({16}, torch::Device("meta")))); },
      {"tensors[\"code\"]", "CPU", "meta"});
  // Layouts themselves.
  auto bad = [&](auto edit, std::initializer_list<const char*> parts) {
    msbnb::PackedLayout b = l;
    edit(b);
    expect_error([&] { PackedWeight::zeros(b); }, parts);
    expect_error([&] { PackedWeight::from_tensors(b, ts); }, parts);
  };
  bad([](msbnb::PackedLayout& b) { b.format = "nf5"; }, {"layout.format", "\"int8\"", "\"nf5\""});
  bad([](msbnb::PackedLayout& b) { b.blocksize = 48; }, {"layout.blocksize", "power of two", "48"});
  bad([](msbnb::PackedLayout& b) { b.asymmetric = true; }, {"layout.asymmetric", "nf4"});
  bad([](msbnb::PackedLayout& b) { b.out_features = 0; }, {"layout.out_features", "> 0", "0"});
  bad(
      [](msbnb::PackedLayout& b) {
        b.in_features = int64_t{1} << 40;
        b.out_features = int64_t{1} << 40;
      },
      {"layout", "2^59"});
  bad([](msbnb::PackedLayout& b) { b.nested_blocksize = 100; }, {"layout.nested_blocksize", "100"});
  bad([](msbnb::PackedLayout& b) { b.dtype = torch::kInt32; }, {"layout.dtype"});
  bad([](msbnb::PackedLayout& b) { b.scb = true; }, {"layout.scb", "nf4"});
  bad([](msbnb::PackedLayout& b) { b.format = "int8"; }, {"layout.blocksize", "int8", "64"});
  bad(
      [](msbnb::PackedLayout& b) {
        b.format = "int8";
        b.blocksize = 0;
        b.double_quant = false;
        b.scb = true;
        b.asymmetric = true;
      },
      {"layout.scb", "asymmetric"});
  // A layout that does not match the tensors: the first mismatching tensor is named.
  msbnb::PackedLayout plain = l;
  plain.double_quant = false;
  expect_error([&] { PackedWeight::from_tensors(plain, ts); }, {"\"scale\"", "got none"});
}

// Double-quantized statistics are decoded by the kernels to exactly the float bitsandbytes'
// dequantize gives: the same outputs as the weight with the absmax decoded beforehand.
TEST(PackedLayout, DoubleQuantEqualsDecodedAbsmax) {
  torch::manual_seed(8);
  for (auto [fmt, out, in, bs, sym] :
       {std::tuple{"nf4", 70, 4096, 64, true}, std::tuple{"fp4", 33, 640, 128, true},
        std::tuple{"nf4", 67, 257, 64, true},  // blocks straddle rows
        std::tuple{"int4", 37, 300, 128, false}, std::tuple{"int4", 17, 200, 50, true}}) {
    const auto q = msbnb::quantize_4bit(
        torch::randn({out, in}) * 2,
        msbnb::Quantize4bitOptions().quant_type(fmt).blocksize(bs).symmetric(sym).compress_statistics(true));
    ASSERT_TRUE(q.state.nested());
    msbnb::QuantState plain = q.state;
    plain.absmax = msbnb::dequantize_blockwise(q.state.absmax, *q.state.state2).reshape({-1}) +
                   q.state.offset.item<float>();
    if (std::string(fmt) == "int4") plain.absmax = plain.absmax.reshape({out, -1});
    plain.offset = torch::Tensor();
    plain.state2 = nullptr;
    const PackedWeight dq = PackedWeight::from_4bit(q.data, q.state);
    const PackedWeight ref = PackedWeight::from_4bit(q.data, plain);
    ASSERT_EQ(dq.lut4()->scale, nullptr);
    ASSERT_NE(ref.lut4()->scale, nullptr);
    expect_same_outputs(dq, ref, std::string(fmt) + " " + std::to_string(out) + "x" + std::to_string(in));
    // And the dequantized weight is what both multiply by.
    EXPECT_TRUE(torch::equal(msbnb::dequantize_4bit(q.data, q.state), msbnb::dequantize_4bit(q.data, plain)));
  }
}

}  // namespace
