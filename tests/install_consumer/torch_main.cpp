// Links msbnb::msbnb: NF4 of a weight made of -1, 0 and 1 (all three are NF4 codes, and every
// block's absmax is 1), so dequantize_4bit gives the weight back exactly, and the exact fused
// matmul with x = 1 gives each row's sum exactly.
#include <msbnb/msbnb.h>

#include <algorithm>
#include <cstdio>

int main() {
  const int64_t out_features = 8, in_features = 128;
  // Row r: 1 at columns c with c % 8 <= r % 8, -1 at c % 8 == 7, 0 elsewhere; each 64-block has
  // both 1 and -1, so its absmax is 1.
  torch::Tensor w = torch::zeros({out_features, in_features});
  for (int64_t r = 0; r < out_features; ++r) {
    for (int64_t c = 0; c < in_features; ++c) {
      if (c % 8 == 7) {
        w[r][c] = -1.0f;
      } else if (c % 8 <= r % 8) {
        w[r][c] = 1.0f;
      }
    }
  }
  auto q = msbnb::quantize_4bit(w, msbnb::Quantize4bitOptions().set_quant_type("nf4"));
  const torch::Tensor w2 = msbnb::dequantize_4bit(q.data, q.state);
  if (!torch::equal(w2, w)) {
    std::printf("consumer_torch: dequantize_4bit differs from the weight (max |diff| %g)\n",
                (w2 - w).abs().max().item<float>());
    return 1;
  }
  const auto packed = msbnb::PackedWeight::from_4bit(q.data, q.state);
  const torch::Tensor y =
      msbnb::quantized_matmul(torch::ones({1, in_features}), packed, {}, msbnb::MatmulPath::exact);
  for (int64_t r = 0; r < out_features; ++r) {
    // Per group of 8 columns: min(r, 6) + 1 ones and one -1.
    const float expected = static_cast<float>(in_features / 8 * std::min<int64_t>(r % 8, 6));
    const float got = y[0][r].item<float>();
    if (got != expected) {
      std::printf("consumer_torch: y[0][%lld] = %g, expected %g\n", static_cast<long long>(r), got, expected);
      return 1;
    }
  }
  std::printf("consumer_torch: nf4 round trip and exact quantized_matmul match (%s kernels)\n",
              msbnb::kernels::isa_name(msbnb::kernels::active_isa()));
  return 0;
}
