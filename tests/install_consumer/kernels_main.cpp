// Links msbnb::kernels only: symmetric int8 round trip of -127..127 in one block. The absmax is
// 127, so the scale is exactly 1 and every value must come back unchanged.
#include <msbnb/kernels/ops.h>

#include <cstdio>
#include <vector>

int main() {
  namespace k = msbnb::kernels;
  constexpr int64_t n = 255;
  std::vector<float> x(n), out(n);
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(i - 127);
  float absmax = 0, scale = 0;
  std::vector<int8_t> q(n);
  k::absmax_blocks(x.data(), k::DType::f32, n, n, &absmax);
  k::symmetric_scales(&absmax, 1, 127.0f, &scale);
  k::quantize_int8(x.data(), k::DType::f32, n, n, &scale, nullptr, -127, 127, q.data());
  k::dequantize_int8(q.data(), n, n, &scale, nullptr, out.data());
  for (int64_t i = 0; i < n; ++i) {
    if (out[i] != x[i] || q[i] != i - 127) {
      std::printf("consumer_kernels: element %lld: q %d, dequantized %g, expected %g\n",
                  static_cast<long long>(i), q[i], out[i], x[i]);
      return 1;
    }
  }
  std::printf("consumer_kernels: int8 round trip exact (%s kernels, scale %g)\n",
              k::isa_name(k::active_isa()), scale);
  return scale == 1.0f ? 0 : 1;
}
