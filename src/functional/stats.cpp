// Error statistics and size / range reports of quantized tensors.
#include <cmath>
#include <limits>

#include "checks.h"
#include "msbnb/functional/quantize.h"

namespace msbnb {

QuantizationError estimate_quantization_error(const torch::Tensor& original,
                                              const torch::Tensor& dequantized) {
  detail::check_cpu(original, "original");
  detail::check_cpu(dequantized, "dequantized");
  TORCH_CHECK(original.sizes() == dequantized.sizes(), "dequantized: expected shape ",
              detail::shape_str(original.sizes()), " (that of original), got ",
              detail::shape_str(dequantized.sizes()));
  TORCH_CHECK(original.numel() > 0, "original: expected a non-empty tensor, got shape ",
              detail::shape_str(original.sizes()));
  TORCH_CHECK(original.is_floating_point() && dequantized.is_floating_point(),
              "original, dequantized: expected floating-point tensors, got ", original.scalar_type(), " and ",
              dequantized.scalar_type());
  const torch::Tensor x = original.to(torch::kFloat64).reshape({-1});
  const torch::Tensor y = dequantized.to(torch::kFloat64).reshape({-1});
  TORCH_CHECK(torch::isfinite(x).all().item<bool>(), "original: expected finite values, got NaN or Inf");
  TORCH_CHECK(torch::isfinite(y).all().item<bool>(), "dequantized: expected finite values, got NaN or Inf");
  const torch::Tensor e = x - y;
  QuantizationError r;
  const double n = static_cast<double>(x.numel());
  const double sx = x.pow(2).sum().item<double>(), sy = y.pow(2).sum().item<double>();
  const double se = e.pow(2).sum().item<double>();
  r.mean_error = e.abs().sum().item<double>() / n;
  r.max_error = e.abs().max().item<double>();
  r.mse = se / n;
  r.relative_error =
      sx > 0 ? 100.0 * std::sqrt(se / sx) : (se > 0 ? std::numeric_limits<double>::infinity() : 0.0);
  r.snr_db = se > 0 ? 10.0 * std::log10(sx / se) : std::numeric_limits<double>::infinity();
  r.cosine = (sx > 0 && sy > 0) ? (x * y).sum().item<double>() / std::sqrt(sx * sy) : (sx == sy ? 1.0 : 0.0);
  return r;
}

namespace {
int64_t bytes_of(const torch::Tensor& t) {
  return t.defined() ? t.numel() * static_cast<int64_t>(t.element_size()) : 0;
}

int64_t state_bytes(const QuantState& s) {
  int64_t b = bytes_of(s.absmax) + bytes_of(s.code) + bytes_of(s.offset) + bytes_of(s.zero_point);
  if (s.state2) b += state_bytes(*s.state2);
  return b;
}

void fill_ranges(QuantizationInfo& info, const torch::Tensor& scales, const torch::Tensor& values) {
  const torch::Tensor s = scales.to(torch::kFloat64);
  info.scale_min = s.min().item<double>();
  info.scale_max = s.max().item<double>();
  info.scale_mean = s.mean().item<double>();
  info.weight_min = values.min().item<double>();
  info.weight_max = values.max().item<double>();
}

void fill_sizes(QuantizationInfo& info, int64_t bytes, torch::ScalarType dtype) {
  info.storage_bytes = bytes;
  info.bits_per_weight = 8.0 * static_cast<double>(bytes) / static_cast<double>(info.numel);
  info.compression_ratio = 8.0 * static_cast<double>(c10::elementSize(dtype)) / info.bits_per_weight;
}
}  // namespace

QuantizationInfo get_quantization_info(const torch::Tensor& data, const QuantState& state) {
  const torch::Tensor w =
      state.quant_type == "dynamic8" ? dequantize_blockwise(data, state) : dequantize_4bit(data, state);
  QuantizationInfo info;
  info.format = state.quant_type;
  info.shape = state.shape;
  info.numel = state.numel();
  fill_sizes(info, bytes_of(data) + state_bytes(state), state.dtype);
  torch::Tensor scales = state.absmax;
  if (state.nested()) scales = dequantize_blockwise(state.absmax, *state.state2) + state.offset;
  fill_ranges(info, scales, w);
  return info;
}

QuantizationInfo get_quantization_info(const Int8Quantized& q) {
  const torch::Tensor w = dequantize_8bit(q);
  QuantizationInfo info;
  info.format = q.options.symmetric() ? "int8" : "int8_asymmetric";
  info.shape = q.weight_int8.sizes().vec();
  info.numel = q.weight_int8.numel();
  fill_sizes(info, bytes_of(q.weight_int8) + bytes_of(q.scale) + bytes_of(q.offset), q.dtype);
  fill_ranges(info, q.scale, w);
  return info;
}

}  // namespace msbnb
