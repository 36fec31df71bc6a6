// int8 symmetric / asymmetric, per tensor, channel or block (DESIGN.md "int8").
#include "checks.h"
#include "msbnb/functional/quantize.h"
#include "msbnb/kernels/ops.h"

namespace msbnb {

namespace {

// Elements per scale for a tensor of this shape.
int64_t int8_block(const torch::Tensor& x, const Int8Options& o) {
  switch (o.granularity()) {
    case Granularity::per_tensor:
      return x.numel();
    case Granularity::per_channel:
      return x.dim() == 0 ? 1 : x.numel() / x.size(0);
    case Granularity::per_block:
      TORCH_CHECK(o.blocksize() > 0, "blocksize: expected a positive block size, got ", o.blocksize());
      return o.blocksize();
  }
  return x.numel();
}

}  // namespace

Int8Quantized quantize_8bit(const torch::Tensor& input, const Int8Options& options) {
  torch::Tensor x = input;
  const kernels::DType dt = detail::float_input(x, "x");
  const int64_t n = x.numel(), bs = int8_block(x, options), nb = kernels::ceil_div(n, bs);
  auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  Int8Quantized q;
  q.options = options;
  q.dtype = x.scalar_type();
  q.scale = torch::empty({nb}, f32);
  q.weight_int8 = torch::empty(x.sizes(), torch::TensorOptions().dtype(torch::kInt8));
  float* scale = q.scale.data_ptr<float>();
  if (options.symmetric()) {
    kernels::absmax_blocks(x.data_ptr(), dt, n, bs, scale);
    detail::check_finite_blocks(scale, nb, bs, n, "x");
    kernels::symmetric_scales(scale, nb, 127.0f, scale);
    kernels::quantize_int8(x.data_ptr(), dt, n, bs, scale, nullptr, -127, 127,
                           q.weight_int8.data_ptr<int8_t>());
    return q;
  }
  std::vector<float> lo(static_cast<size_t>(nb)), hi(static_cast<size_t>(nb));
  kernels::minmax_blocks(x.data_ptr(), dt, n, bs, lo.data(), hi.data());
  detail::check_finite_blocks(lo.data(), nb, bs, n, "x");
  detail::check_finite_blocks(hi.data(), nb, bs, n, "x");
  std::vector<int32_t> zp(static_cast<size_t>(nb));
  kernels::asymmetric_scales(lo.data(), hi.data(), nb, -128, 127, scale, zp.data());
  kernels::quantize_int8(x.data_ptr(), dt, n, bs, scale, zp.data(), -128, 127,
                         q.weight_int8.data_ptr<int8_t>());
  q.offset = torch::empty({nb}, f32);
  for (int64_t b = 0; b < nb; ++b)
    q.offset.data_ptr<float>()[b] = static_cast<float>(-zp[static_cast<size_t>(b)]);
  return q;
}

torch::Tensor dequantize_8bit(const torch::Tensor& weight_int8, const torch::Tensor& scale_in,
                              const torch::Tensor& offset_in, const Int8Options& options,
                              torch::ScalarType dtype) {
  detail::check_dtype(weight_int8, torch::kInt8, "weight_int8");
  TORCH_CHECK(weight_int8.numel() > 0, "weight_int8: expected a non-empty tensor, got shape ",
              detail::shape_str(weight_int8.sizes()));
  detail::check_dtype(scale_in, torch::kFloat32, "scale");
  detail::check_float_dtype(dtype, "dtype");
  const torch::Tensor q = detail::dense(weight_int8), scale = detail::dense(scale_in);
  const int64_t n = q.numel(), bs = int8_block(q, options), nb = kernels::ceil_div(n, bs);
  detail::check_numel(scale, nb, "scale");
  detail::check_all_finite(scale, "scale");
  std::vector<int32_t> zp;
  if (!options.symmetric()) {
    detail::check_dtype(offset_in, torch::kFloat32, "offset");
    detail::check_numel(offset_in, nb, "offset");
    const torch::Tensor off = detail::dense(offset_in);
    zp.resize(static_cast<size_t>(nb));
    for (int64_t b = 0; b < nb; ++b) {
      const float o = off.data_ptr<float>()[b];
      TORCH_CHECK(o == std::nearbyint(o) && o >= -127.0f && o <= 128.0f,
                  "offset: expected integral values in [-127, 128], got ", o, " at index ", b);
      zp[static_cast<size_t>(b)] = -static_cast<int32_t>(o);
    }
  } else {
    TORCH_CHECK(!offset_in.defined(), "offset: expected an undefined tensor for symmetric int8, got shape ",
                detail::shape_str(offset_in.sizes()));
  }
  torch::Tensor out = torch::empty(q.sizes(), torch::TensorOptions().dtype(torch::kFloat32));
  kernels::dequantize_int8(q.data_ptr<int8_t>(), n, bs, scale.data_ptr<float>(),
                           zp.empty() ? nullptr : zp.data(), out.data_ptr<float>());
  return dtype == torch::kFloat32 ? out : out.to(dtype);
}

torch::Tensor dequantize_8bit(const Int8Quantized& q, c10::optional<torch::ScalarType> dtype) {
  return dequantize_8bit(q.weight_int8, q.scale, q.offset, q.options, dtype.value_or(q.dtype));
}

}  // namespace msbnb
