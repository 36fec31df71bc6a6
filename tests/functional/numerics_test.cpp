// Numerics through the tensor API: quantized_matmul's automatic path is exact at every batch size
// (an int8 weight and rows with an LLM outlier feature), and NaN activations reach the outputs of
// int8_matmul and the row statistics of int8_vectorwise_quant with and without a threshold.
#include <gtest/gtest.h>

#include <cmath>

#include "msbnb/msbnb.h"

namespace {

using msbnb::PackedWeight;

TEST(Numerics, AutomaticMatmulIsExactAtEveryBatchSize) {
  torch::manual_seed(3);
  const int64_t out = 24, in = 256;
  const auto q = msbnb::quantize_8bit(torch::randn({out, in}), msbnb::Int8Options().symmetric(true));
  const PackedWeight pw = PackedWeight::from_8bit(q);
  const torch::Tensor wd = msbnb::dequantize_8bit(q).to(torch::kFloat64);
  for (int64_t n : {8, 9, 40}) {
    torch::Tensor x = torch::randn({n, in});
    x.select(1, 7).fill_(60.0f);  // the outlier feature
    const torch::Tensor y = msbnb::quantized_matmul(x, pw).to(torch::kFloat64);
    const torch::Tensor xd = x.to(torch::kFloat64);
    const torch::Tensor ref = xd.matmul(wd.t()), p = xd.abs().matmul(wd.abs().t());
    // The exact path's bound: (k + 4) 2^-24 sum |x w| (docs/matmul.md).
    const torch::Tensor tol = p * ((in + 4) * std::ldexp(1.0, -24)) + 1e-30;
    EXPECT_TRUE(((y - ref).abs() <= tol).all().item<bool>())
        << "n=" << n << " max err " << (y - ref).abs().max().item<double>();
  }
}

TEST(Numerics, NanActivationsStayNan) {
  torch::manual_seed(5);
  const int64_t out = 16, in = 96;
  const auto wq = msbnb::int8_vectorwise_quant(torch::randn({out, in}));
  const PackedWeight pw = PackedWeight::from_int8_scb(wq.CB, wq.SCB);
  torch::Tensor x = torch::randn({5, in});
  x.index_put_({1, 10}, std::nan(""));
  x.index_put_({3, 20}, 30.0f);  // an outlier in another row
  for (double threshold : {0.0, 6.0}) {
    const auto r = msbnb::int8_matmul(x, pw, threshold);
    EXPECT_TRUE(r.out.select(0, 1).isnan().all().item<bool>()) << "threshold " << threshold;
    for (int64_t i : {0, 2, 3, 4}) EXPECT_TRUE(r.out.select(0, i).isfinite().all().item<bool>());
    // bitsandbytes: NaN is no outlier (|x| >= threshold is false), so the row absmax is NaN.
    const auto xq = msbnb::int8_vectorwise_quant(x, threshold);
    EXPECT_TRUE(std::isnan(xq.SCB[1].item<float>())) << "threshold " << threshold;
    EXPECT_TRUE(xq.SCB.index({torch::tensor({0, 2, 3, 4})}).isfinite().all().item<bool>());
    if (threshold > 0) {
      EXPECT_EQ(xq.outlier_cols, (std::vector<int64_t>{20}));
    }
  }
}

}  // namespace
