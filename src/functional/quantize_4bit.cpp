// 4-bit formats (int4 per group, NF4, FP4) and blockwise 8-bit with a codebook, with optional
// double quantization of the statistics (DESIGN.md "NF4 / FP4", "Dynamic 8-bit map").
#include <numeric>

#include "checks.h"
#include "msbnb/functional/quantize.h"
#include "msbnb/kernels/formats.h"
#include "msbnb/kernels/ops.h"

namespace msbnb {

namespace {

constexpr int64_t kNestedBlocksize = 256;  // bitsandbytes' blocksize for double quantization

const auto kF32 = torch::TensorOptions().dtype(torch::kFloat32);
const auto kU8 = torch::TensorOptions().dtype(torch::kUInt8);

torch::Tensor float_tensor(const float* v, int64_t count) {
  return torch::from_blob(const_cast<float*>(v), {count}, kF32).clone();
}

void check_block_pow2(int64_t bs, const char* arg) {
  TORCH_CHECK(detail::is_pow2(bs) && bs >= 32 && bs <= 4096, arg,
              ": expected a power of two in [32, 4096], got ", bs);
}

kernels::Format format_of(const std::string& quant_type, const char* arg) {
  return detail::format_4bit(quant_type, arg);
}

// Replaces float32 statistics by their blockwise 8-bit codes (bitsandbytes' compress_statistics:
// offset = mean, then quantize_blockwise(absmax - offset, blocksize=256)).
void nest_statistics(QuantState& s) {
  const torch::Tensor stats = s.absmax.reshape({-1});
  // torch's float32 mean, as bitsandbytes' absmax.mean(): the same rounding, so checkpoints
  // match transformers + bitsandbytes byte for byte (a double mean differs in the last bit).
  const float offset = stats.mean().item<float>();
  QuantizedBlockwise nested = quantize_blockwise(stats - offset, kNestedBlocksize);
  s.absmax = nested.data;
  s.offset = torch::full({}, offset, kF32);
  s.state2 = std::make_shared<QuantState>(std::move(nested.state));
}

// Float32 per-block statistics of a state, undoing double quantization.
torch::Tensor resolved_absmax_impl(const QuantState& s, int64_t expected) {
  torch::Tensor a;
  if (s.nested()) {
    detail::check_dtype(s.absmax, torch::kUInt8, "state.absmax");
    detail::check_dtype(s.offset, torch::kFloat32, "state.offset");
    detail::check_numel(s.offset, 1, "state.offset");
    TORCH_CHECK(s.state2->quant_type == "dynamic8", "state.state2.quant_type: expected \"dynamic8\", got \"",
                s.state2->quant_type, "\"");
    detail::check_numel(s.absmax, s.state2->numel(), "state.absmax");
    TORCH_CHECK(!s.state2->nested(), "state.state2: expected a state without a state2 of its own");
    TORCH_CHECK(s.state2->dtype == torch::kFloat32, "state.state2.dtype: expected Float, got ",
                s.state2->dtype);
    detail::check_all_finite(s.offset, "state.offset");
    a = dequantize_blockwise(s.absmax, *s.state2).reshape({-1}) + s.offset.item<float>();
  } else {
    detail::check_dtype(s.absmax, torch::kFloat32, "state.absmax");
    TORCH_CHECK(!s.offset.defined(), "state.offset: expected an undefined tensor without state2, got shape ",
                detail::shape_str(s.offset.sizes()));
    a = detail::dense(s.absmax).reshape({-1});
    detail::check_all_finite(a, "state.absmax");
  }
  detail::check_numel(a, expected, "state.absmax");
  return a;
}

int64_t shape_numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    TORCH_CHECK(d >= 0, "state.shape: expected non-negative sizes, got ", d);
    TORCH_CHECK(!__builtin_mul_overflow(n, d, &n), "state.shape: expected at most 2^63 elements, got ",
                detail::shape_str(shape));
  }
  return n;
}

struct RowsCols {
  int64_t rows, cols;
};
RowsCols rows_cols(const std::vector<int64_t>& shape) {
  const int64_t cols = shape.empty() ? 1 : shape.back();
  return {cols == 0 ? 0 : shape_numel(shape) / cols, cols};
}

// Group statistics are non-finite iff the group holds NaN or Inf.
void check_finite_groups(const float* stats, int64_t rows, int64_t groups, int64_t gs) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g)
      TORCH_CHECK(std::isfinite(stats[r * groups + g]), "x: expected finite values, got NaN or Inf in row ",
                  r, ", columns [", g * gs, ", ", (g + 1) * gs, ")");
}

Quantized4bit quantize_int4(const torch::Tensor& x, kernels::DType dt, const Quantize4bitOptions& o) {
  const int64_t gs = o.effective_blocksize();
  TORCH_CHECK(gs >= 2 && gs % 2 == 0, "blocksize: expected an even int4 group size >= 2, got ", gs);
  const RowsCols rc = rows_cols(x.sizes().vec());
  const int64_t groups = kernels::ceil_div(rc.cols, gs), count = rc.rows * groups;
  const int64_t row_bytes = (rc.cols + 1) / 2, esize = static_cast<int64_t>(kernels::dtype_size(dt));
  const char* px = static_cast<const char*>(x.data_ptr());
  Quantized4bit out;
  QuantState& s = out.state;
  s.quant_type = "int4";
  s.shape = x.sizes().vec();
  s.dtype = x.scalar_type();
  s.blocksize = gs;
  s.absmax = torch::empty({rc.rows, groups}, kF32);
  float* scale = s.absmax.data_ptr<float>();
  std::vector<int32_t> zp;
  if (o.symmetric()) {
    for (int64_t r = 0; r < rc.rows; ++r)
      kernels::absmax_blocks(px + r * rc.cols * esize, dt, rc.cols, gs, scale + r * groups);
    check_finite_groups(scale, rc.rows, groups, gs);
    kernels::symmetric_scales(scale, count, 7.0f, scale);
  } else {
    std::vector<float> lo(static_cast<size_t>(count)), hi(static_cast<size_t>(count));
    for (int64_t r = 0; r < rc.rows; ++r)
      kernels::minmax_blocks(px + r * rc.cols * esize, dt, rc.cols, gs, lo.data() + r * groups,
                             hi.data() + r * groups);
    check_finite_groups(lo.data(), rc.rows, groups, gs);
    check_finite_groups(hi.data(), rc.rows, groups, gs);
    zp.resize(static_cast<size_t>(count));
    kernels::asymmetric_scales(lo.data(), hi.data(), count, 0, 15, scale, zp.data());
    s.zero_point = torch::empty({rc.rows, groups}, kU8);
    for (int64_t i = 0; i < count; ++i)
      s.zero_point.data_ptr<uint8_t>()[i] = static_cast<uint8_t>(zp[static_cast<size_t>(i)]);
  }
  std::vector<int64_t> packed_shape = s.shape;
  if (packed_shape.empty()) packed_shape.push_back(1);
  packed_shape.back() = row_bytes;
  out.data = torch::empty(packed_shape, kU8);
  kernels::quantize_int4(x.data_ptr(), dt, rc.rows, rc.cols, gs, scale, zp.empty() ? nullptr : zp.data(),
                         out.data.data_ptr<uint8_t>());
  if (o.compress_statistics()) nest_statistics(s);
  return out;
}

torch::Tensor dequantize_int4(const torch::Tensor& data, const QuantState& s) {
  const int64_t gs = s.blocksize;
  TORCH_CHECK(gs >= 2 && gs % 2 == 0, "state.blocksize: expected an even int4 group size >= 2, got ", gs);
  const RowsCols rc = rows_cols(s.shape);
  const int64_t groups = kernels::ceil_div(rc.cols, gs), row_bytes = (rc.cols + 1) / 2;
  detail::check_numel(data, rc.rows * row_bytes, "data");
  const torch::Tensor scale = resolved_absmax_impl(s, rc.rows * groups);
  std::vector<int32_t> zp;
  if (s.zero_point.defined()) {
    detail::check_dtype(s.zero_point, torch::kUInt8, "state.zero_point");
    detail::check_numel(s.zero_point, rc.rows * groups, "state.zero_point");
    const torch::Tensor z = detail::dense(s.zero_point);
    for (int64_t i = 0; i < z.numel(); ++i) {
      TORCH_CHECK(z.data_ptr<uint8_t>()[i] <= 15, "state.zero_point: expected values in [0, 15], got ",
                  int{z.data_ptr<uint8_t>()[i]}, " at index ", i);
      zp.push_back(z.data_ptr<uint8_t>()[i]);
    }
  }
  const torch::Tensor packed = detail::dense(data);
  torch::Tensor out = torch::empty(s.shape, kF32);
  kernels::dequantize_int4(packed.data_ptr<uint8_t>(), rc.rows, rc.cols, gs, scale.data_ptr<float>(),
                           zp.empty() ? nullptr : zp.data(), out.data_ptr<float>());
  return out;
}

}  // namespace

namespace detail {
// The 4-bit rows of formats.def, codebook formats first (as bitsandbytes lists them), then int4.
kernels::Format format_4bit(const std::string& quant_type, const char* arg) {
  int count = 0;
  const kernels::FormatInfo* rows = kernels::all_formats(&count);
  std::vector<const kernels::FormatInfo*> accepted;
  for (int i = 0; i < count; ++i)
    if (kernels::has_codebook16(rows[i])) accepted.push_back(&rows[i]);
  for (int i = 0; i < count; ++i)
    if (rows[i].bits == 4 && !kernels::has_codebook16(rows[i])) accepted.push_back(&rows[i]);
  std::string known;
  for (size_t i = 0; i < accepted.size(); ++i) {
    if (quant_type == accepted[i]->name) return accepted[i]->format;
    known += std::string(i == 0                     ? ""
                         : i + 1 == accepted.size() ? " or "
                                                    : ", ") +
             "\"" + accepted[i]->name + "\"";
  }
  TORCH_CHECK(false, arg, ": expected ", known, ", got \"", quant_type, "\"");
}

torch::Tensor resolved_absmax(const QuantState& s, int64_t expected) {
  return resolved_absmax_impl(s, expected);
}
}  // namespace detail

int64_t QuantState::numel() const { return shape_numel(shape); }

int64_t Quantize4bitOptions::effective_blocksize() const {
  if (blocksize_) return *blocksize_;
  return kernels::format_info(format_of(quant_type_, "quant_type")).default_block;
}

Quantized4bit quantize_4bit(const torch::Tensor& input, const Quantize4bitOptions& o) {
  torch::Tensor x = input;
  const kernels::Format fmt = format_of(o.quant_type(), "quant_type");
  // nf4 / fp4 codebooks are symmetric about 0 with one absmax per block: there is no zero point
  // to honour symmetric(false), so it is refused rather than ignored.
  TORCH_CHECK(fmt == kernels::Format::int4 || o.symmetric(), "symmetric: expected true with quant_type \"",
              o.quant_type(), "\" (symmetric(false) is accepted only with quant_type \"int4\"), got false");
  const kernels::DType dt = detail::float_input(x, "x");
  if (fmt == kernels::Format::int4) return quantize_int4(x, dt, o);
  check_block_pow2(o.effective_blocksize(), "blocksize");
  const kernels::FormatInfo& info = kernels::format_info(fmt);
  const kernels::Lut4& lut = kernels::format_lut4(fmt);  // the codebook of fmt's formats.def row
  const int64_t n = x.numel(), bs = o.effective_blocksize(), nb = kernels::ceil_div(n, bs);
  Quantized4bit out;
  QuantState& s = out.state;
  s.quant_type = info.name;
  s.shape = x.sizes().vec();
  s.dtype = x.scalar_type();
  s.blocksize = bs;
  s.code = float_tensor(info.codebook, 16);
  s.absmax = torch::empty({nb}, kF32);
  kernels::absmax_blocks(x.data_ptr(), dt, n, bs, s.absmax.data_ptr<float>());
  detail::check_finite_blocks(s.absmax.data_ptr<float>(), nb, bs, n, "x");
  out.data = torch::empty({(n + 1) / 2, 1}, kU8);
  kernels::quantize_lut4(x.data_ptr(), dt, n, bs, s.absmax.data_ptr<float>(), lut,
                         out.data.data_ptr<uint8_t>());
  if (o.compress_statistics()) nest_statistics(s);
  return out;
}

torch::Tensor dequantize_4bit(const torch::Tensor& data, const QuantState& s) {
  detail::check_dtype(data, torch::kUInt8, "data");
  const kernels::Format fmt = format_of(s.quant_type, "state.quant_type");
  detail::check_float_dtype(s.dtype, "state.dtype");
  const int64_t n = s.numel();
  TORCH_CHECK(n > 0, "state.shape: expected a non-empty shape, got ", detail::shape_str(s.shape));
  torch::Tensor out;
  if (fmt == kernels::Format::int4) {
    out = dequantize_int4(data, s);
  } else {
    check_block_pow2(s.blocksize, "state.blocksize");
    detail::check_numel(data, (n + 1) / 2, "data");
    detail::check_dtype(s.code, torch::kFloat32, "state.code");
    detail::check_numel(s.code, 16, "state.code");
    detail::check_all_finite(s.code, "state.code");
    const int64_t nb = kernels::ceil_div(n, s.blocksize);
    const torch::Tensor absmax = resolved_absmax_impl(s, nb), packed = detail::dense(data),
                        code = detail::dense(s.code);
    out = torch::empty(s.shape, kF32);
    kernels::dequantize_lut4(packed.data_ptr<uint8_t>(), n, s.blocksize, absmax.data_ptr<float>(),
                             code.data_ptr<float>(), out.data_ptr<float>());
  }
  return s.dtype == torch::kFloat32 ? out : out.to(s.dtype);
}

QuantizedBlockwise quantize_blockwise(const torch::Tensor& input, int64_t blocksize,
                                      const torch::Tensor& code_in, bool nested) {
  torch::Tensor x = input;
  const kernels::DType dt = detail::float_input(x, "x");
  check_block_pow2(blocksize, "blocksize");
  torch::Tensor code = code_in.defined() ? code_in : create_dynamic_map();
  detail::check_dtype(code, torch::kFloat32, "code");
  detail::check_numel(code, 256, "code");
  code = detail::dense(code);
  TORCH_CHECK(torch::isfinite(code).all().item<bool>(), "code: expected finite values, got NaN or Inf");
  const kernels::Lut8 lut = kernels::make_lut8(code.data_ptr<float>());
  const int64_t n = x.numel(), nb = kernels::ceil_div(n, blocksize);
  QuantizedBlockwise out;
  QuantState& s = out.state;
  s.quant_type = "dynamic8";
  s.shape = x.sizes().vec();
  s.dtype = x.scalar_type();
  s.blocksize = blocksize;
  s.code = code.clone();
  s.absmax = torch::empty({nb}, kF32);
  kernels::absmax_blocks(x.data_ptr(), dt, n, blocksize, s.absmax.data_ptr<float>());
  detail::check_finite_blocks(s.absmax.data_ptr<float>(), nb, blocksize, n, "x");
  out.data = torch::empty(x.sizes(), kU8);
  kernels::quantize_lut8(x.data_ptr(), dt, n, blocksize, s.absmax.data_ptr<float>(), lut,
                         out.data.data_ptr<uint8_t>());
  if (nested) nest_statistics(s);
  return out;
}

torch::Tensor dequantize_blockwise(const torch::Tensor& data, const QuantState& s) {
  detail::check_dtype(data, torch::kUInt8, "data");
  TORCH_CHECK(s.quant_type == "dynamic8", "state.quant_type: expected \"dynamic8\", got \"", s.quant_type,
              "\"");
  check_block_pow2(s.blocksize, "state.blocksize");
  detail::check_float_dtype(s.dtype, "state.dtype");
  const int64_t n = s.numel();
  TORCH_CHECK(n > 0, "state.shape: expected a non-empty shape, got ", detail::shape_str(s.shape));
  detail::check_numel(data, n, "data");
  detail::check_dtype(s.code, torch::kFloat32, "state.code");
  detail::check_numel(s.code, 256, "state.code");
  detail::check_all_finite(s.code, "state.code");
  const int64_t nb = kernels::ceil_div(n, s.blocksize);
  const torch::Tensor absmax = resolved_absmax_impl(s, nb), q = detail::dense(data),
                      code = detail::dense(s.code);
  torch::Tensor out = torch::empty(s.shape, kF32);
  kernels::dequantize_lut8(q.data_ptr<uint8_t>(), n, s.blocksize, absmax.data_ptr<float>(),
                           code.data_ptr<float>(), out.data_ptr<float>());
  return s.dtype == torch::kFloat32 ? out : out.to(s.dtype);
}

}  // namespace msbnb
