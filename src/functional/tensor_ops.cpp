// quantize_tensor front end, qint4x2 packing, scale / offset and code maps.
#include <algorithm>
#include <cmath>

#include "checks.h"
#include "msbnb/functional/quantize.h"
#include "msbnb/kernels/formats.h"
#include "msbnb/kernels/ops.h"

namespace msbnb {

namespace {
const auto kF32 = torch::TensorOptions().dtype(torch::kFloat32);

// Statistics of a tensor seen as [channels, rest] (one row when not per channel).
struct Stats {
  int64_t rows, cols;
  std::vector<float> lo, hi;  // min / max (asymmetric) or absmax in hi (symmetric)
};
Stats row_stats(const torch::Tensor& x, kernels::DType dt, bool per_channel, bool symmetric) {
  Stats s;
  s.rows = per_channel && x.dim() > 0 ? x.size(0) : 1;
  s.cols = x.numel() / s.rows;
  s.lo.resize(static_cast<size_t>(s.rows));
  s.hi.resize(static_cast<size_t>(s.rows));
  if (symmetric)
    kernels::absmax_blocks(x.data_ptr(), dt, x.numel(), s.cols, s.hi.data());
  else
    kernels::minmax_blocks(x.data_ptr(), dt, x.numel(), s.cols, s.lo.data(), s.hi.data());
  if (!symmetric) detail::check_finite_blocks(s.lo.data(), s.rows, s.cols, x.numel(), "x");
  detail::check_finite_blocks(s.hi.data(), s.rows, s.cols, x.numel(), "x");
  return s;
}

torch::Tensor to_tensor(const std::vector<float>& v) {
  return torch::from_blob(const_cast<float*>(v.data()), {static_cast<int64_t>(v.size())}, kF32).clone();
}

// Inverse of the standard normal CDF in double: Acklam's rational approximation, refined by
// two Newton steps on erfc, accurate to about 1e-15 (scipy.stats.norm.ppf's precision).
double normal_ppf(double p) {
  static const double a[] = {-3.969683028665376e+01, 2.209460984245205e+02,  -2.759285104469687e+02,
                             1.383577518672690e+02,  -3.066479806614716e+01, 2.506628277459239e+00};
  static const double b[] = {-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
                             6.680131188771972e+01, -1.328068155288572e+01};
  static const double c[] = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
                             -2.549732539343734e+00, 4.374664141464968e+00,  2.938163982698783e+00};
  static const double d[] = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
                             3.754408661907416e+00};
  const double plow = 0.02425;
  double x;
  if (p < plow) {
    const double q = std::sqrt(-2 * std::log(p));
    x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
        ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  } else if (p <= 1 - plow) {
    const double q = p - 0.5, r = q * q;
    x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
        (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
  } else {
    const double q = std::sqrt(-2 * std::log(1 - p));
    x = -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
        ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  }
  for (int i = 0; i < 2; ++i) {
    const double e = 0.5 * std::erfc(-x / std::sqrt(2.0)) - p;
    const double u = e * std::sqrt(2 * M_PI) * std::exp(x * x / 2);
    x = x - u / (1 + x * u / 2);
  }
  return x;
}

// torch.linspace(start, end, steps) in float32 (scalar path of torch's CPU kernel).
std::vector<float> linspace_f32(float start, float end, int steps) {
  std::vector<float> v(static_cast<size_t>(steps));
  const float step = (end - start) / static_cast<float>(steps - 1);
  for (int i = 0; i < steps; ++i)
    v[static_cast<size_t>(i)] =
        i < steps / 2 ? start + step * static_cast<float>(i) : end - step * static_cast<float>(steps - i - 1);
  return v;
}
}  // namespace

ScaleOffset compute_scale_offset(const torch::Tensor& input, int bits, bool symmetric, bool per_channel) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits: expected 2..8, got ", bits);
  torch::Tensor x = input;
  const kernels::DType dt = detail::float_input(x, "x");
  const Stats st = row_stats(x, dt, per_channel, symmetric);
  const int32_t qmax = (1 << (bits - 1)) - 1, qmin = -(1 << (bits - 1));
  std::vector<float> scale(static_cast<size_t>(st.rows)), offset(static_cast<size_t>(st.rows), 0.0f);
  if (symmetric) {
    kernels::symmetric_scales(st.hi.data(), st.rows, static_cast<float>(qmax), scale.data());
  } else {
    std::vector<int32_t> zp(static_cast<size_t>(st.rows));
    kernels::asymmetric_scales(st.lo.data(), st.hi.data(), st.rows, qmin, qmax, scale.data(), zp.data());
    for (size_t i = 0; i < zp.size(); ++i) offset[i] = static_cast<float>(-zp[i]);
  }
  return {to_tensor(scale), to_tensor(offset)};
}

QuantizedTensor quantize_tensor(const torch::Tensor& input, int bits, bool symmetric, bool per_channel) {
  TORCH_CHECK(bits == 8 || bits == 4, "bits: expected 8 or 4, got ", bits);
  QuantizedTensor q;
  q.bits = bits;
  q.symmetric = symmetric;
  q.per_channel = per_channel;
  if (bits == 8) {
    Int8Quantized r =
        quantize_8bit(input, Int8Options().symmetric(symmetric).granularity(
                                 per_channel ? Granularity::per_channel : Granularity::per_tensor));
    q.data = r.weight_int8;
    q.scale = r.scale;
    q.offset = r.offset;
    q.shape = input.sizes().vec();
    q.dtype = r.dtype;
    return q;
  }
  torch::Tensor x = input;
  const kernels::DType dt = detail::float_input(x, "x");
  q.shape = x.sizes().vec();
  q.dtype = x.scalar_type();
  const Stats st = row_stats(x, dt, per_channel, symmetric);
  // One int4 group per row; a per-tensor scale is repeated on every row of [size(0), rest].
  const int64_t rows = x.dim() > 0 ? x.size(0) : 1, cols = x.numel() / rows, gs = cols + cols % 2;
  std::vector<float> scale(static_cast<size_t>(st.rows));
  std::vector<int32_t> zp;
  if (symmetric) {
    kernels::symmetric_scales(st.hi.data(), st.rows, 7.0f, scale.data());
  } else {
    zp.resize(static_cast<size_t>(st.rows));
    kernels::asymmetric_scales(st.lo.data(), st.hi.data(), st.rows, 0, 15, scale.data(), zp.data());
  }
  if (st.rows != rows) {
    scale.assign(static_cast<size_t>(rows), scale[0]);
    if (!zp.empty()) zp.assign(static_cast<size_t>(rows), zp[0]);
  }
  q.data = torch::empty({rows, (cols + 1) / 2}, torch::TensorOptions().dtype(torch::kUInt8));
  kernels::quantize_int4(x.data_ptr(), dt, rows, cols, gs, scale.data(), zp.empty() ? nullptr : zp.data(),
                         q.data.data_ptr<uint8_t>());
  q.scale = to_tensor(scale).reshape({rows, 1});
  if (!symmetric) {
    std::vector<float> off(zp.size());
    for (size_t i = 0; i < zp.size(); ++i) off[i] = static_cast<float>(-zp[i]);
    q.offset = to_tensor(off).reshape({rows, 1});
  }
  return q;
}

torch::Tensor dequantize_tensor(const QuantizedTensor& q) {
  TORCH_CHECK(q.bits == 8 || q.bits == 4, "q.bits: expected 8 or 4, got ", q.bits);
  if (q.bits == 8) {
    const Int8Options o =
        Int8Options()
            .symmetric(q.symmetric)
            .granularity(q.per_channel ? Granularity::per_channel : Granularity::per_tensor);
    TORCH_CHECK(q.data.sizes().vec() == q.shape, "q.data: expected shape ", detail::shape_str(q.shape),
                ", got ", detail::shape_str(q.data.sizes()));
    return dequantize_8bit(q.data, q.scale, q.offset, o, q.dtype).reshape(q.shape);
  }
  QuantState s;
  s.quant_type = "int4";
  const int64_t numel =
      std::accumulate(q.shape.begin(), q.shape.end(), int64_t{1}, std::multiplies<int64_t>());
  const int64_t rows = q.shape.empty() ? 1 : q.shape[0], cols = rows == 0 ? 0 : numel / rows;
  s.shape = {rows, cols};
  s.dtype = q.dtype;
  s.blocksize = cols + cols % 2;
  detail::check_dtype(q.scale, torch::kFloat32, "q.scale");
  s.absmax = q.scale;
  if (!q.symmetric) {
    detail::check_dtype(q.offset, torch::kFloat32, "q.offset");
    const torch::Tensor z = -q.offset;
    TORCH_CHECK(
        (z == z.round()).all().item<bool>() && (z >= 0).all().item<bool>() && (z <= 15).all().item<bool>(),
        "q.offset: expected integral values in [-15, 0], got range [", q.offset.min().item<float>(), ", ",
        q.offset.max().item<float>(), "]");
    s.zero_point = z.to(torch::kUInt8);
  }
  return dequantize_4bit(q.data, s).reshape(q.shape);
}

torch::Tensor pack_int4_to_qint4x2(const torch::Tensor& values) {
  detail::check_dtype(values, torch::kInt8, "values");
  TORCH_CHECK(values.dim() >= 1 && values.numel() > 0,
              "values: expected a non-empty tensor of at least 1 dim, got shape ",
              detail::shape_str(values.sizes()));
  TORCH_CHECK(values.min().item<int8_t>() >= -8 && values.max().item<int8_t>() <= 7,
              "values: expected int4 values in [-8, 7], got range [", int{values.min().item<int8_t>()}, ", ",
              int{values.max().item<int8_t>()}, "]");
  const torch::Tensor v = detail::dense(values);
  const int64_t cols = v.size(-1), rows = v.numel() / cols;
  std::vector<int64_t> shape = v.sizes().vec();
  shape.back() = (cols + 1) / 2;
  torch::Tensor out = torch::empty(shape, torch::TensorOptions().dtype(torch::kUInt8));
  kernels::pack_qint4x2(v.data_ptr<int8_t>(), rows, cols, out.data_ptr<uint8_t>());
  return out;
}

torch::Tensor unpack_qint4x2_to_int8(const torch::Tensor& packed, int64_t cols) {
  detail::check_dtype(packed, torch::kUInt8, "packed");
  TORCH_CHECK(packed.dim() >= 1 && packed.numel() > 0,
              "packed: expected a non-empty tensor of at least 1 dim, got shape ",
              detail::shape_str(packed.sizes()));
  const int64_t row_bytes = packed.size(-1);
  if (cols < 0) cols = 2 * row_bytes;
  TORCH_CHECK((cols + 1) / 2 == row_bytes, "cols: expected ", 2 * row_bytes - 1, " or ", 2 * row_bytes,
              " for a last dimension of ", row_bytes, " bytes, got ", cols);
  const torch::Tensor p = detail::dense(packed);
  std::vector<int64_t> shape = p.sizes().vec();
  shape.back() = cols;
  torch::Tensor out = torch::empty(shape, torch::TensorOptions().dtype(torch::kInt8));
  kernels::unpack_qint4x2(p.data_ptr<uint8_t>(), p.numel() / row_bytes, cols, out.data_ptr<int8_t>());
  return out;
}

torch::Tensor create_dynamic_map(bool is_signed, int max_exponent_bits, int total_bits) {
  try {
    const auto m = kernels::create_dynamic_map(is_signed, max_exponent_bits, total_bits);
    return torch::from_blob(const_cast<float*>(m.data()), {256}, kF32).clone();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
}

torch::Tensor create_normal_map(double offset, bool use_extra_value) {
  TORCH_CHECK(offset > 0.5 && offset < 1.0, "offset: expected a probability in (0.5, 1), got ", offset);
  // bitsandbytes.functional.create_normal_map: quantiles of N(0, 1) at float32 linspace points.
  std::vector<double> v;
  const int positives = use_extra_value ? 9 : 8;
  std::vector<float> p = linspace_f32(static_cast<float>(offset), 0.5f, positives);
  for (int i = 0; i + 1 < positives; ++i) v.push_back(normal_ppf(p[static_cast<size_t>(i)]));
  v.insert(v.end(), static_cast<size_t>(use_extra_value ? 256 - 15 : 256 - 14), 0.0);
  p = linspace_f32(static_cast<float>(offset), 0.5f, 8);
  for (int i = 0; i + 1 < 8; ++i) v.push_back(-normal_ppf(p[static_cast<size_t>(i)]));
  std::vector<float> f(v.begin(), v.end());
  std::sort(f.begin(), f.end());
  const float mx = f.back();
  for (float& e : f) e /= mx;
  return to_tensor(f);
}

}  // namespace msbnb
