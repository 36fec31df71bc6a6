// Fused quantized matmul on tensors: checks, packing, output allocation (msbnb/functional/matmul.h).
#include "msbnb/functional/matmul.h"

#include <ATen/Parallel.h>
#include <ATen/core/ivalue.h>
#include <torch/autograd.h>

#include <cmath>
#include <limits>

#include "checks.h"
#include "msbnb/kernels/kernel_table.h"
#include "msbnb/kernels/ops.h"

namespace msbnb {

struct PackedWeight::Impl {
  std::string format;
  // The packed weight lives in these tensors (torch owns the memory); lut4 / int8 are views.
  torch::Tensor codes;                               // uint8, the kernels' layout (64-byte aligned)
  torch::Tensor scale, zero_point, offset, row_sum;  // float32 (row_sum int32); undefined if unused
  kernels::Lut4Matrix lut4;
  kernels::Int8Matrix int8;
  bool is_4bit = false;
  QuantState state;   // 4-bit: the interchange statistics, kept as given
  Int8Quantized q8;   // int8: scale / offset / options as given (weight_int8 undefined)
  torch::Tensor scb;  // from_int8_scb: SCB as given (SCB / 127 * 127 is not always SCB)
};

namespace {

const auto kF32 = torch::TensorOptions().dtype(torch::kFloat32);

const PackedWeight::Impl& impl_of(const std::shared_ptr<const PackedWeight::Impl>& p) {
  TORCH_CHECK(p, "w: expected a packed weight, got an empty PackedWeight");
  return *p;
}

int64_t checked_dim(int64_t d, const char* what) {
  TORCH_CHECK(d > 0, what, ": expected > 0, got ", d);
  return d;
}

kernels::DType io_dtype(const torch::Tensor& t, const char* arg) {
  detail::check_cpu(t, arg);
  if (t.scalar_type() == torch::kFloat32) return kernels::DType::f32;
  if (t.scalar_type() == torch::kBFloat16) return kernels::DType::bf16;
  if (t.scalar_type() == torch::kFloat16) return kernels::DType::f16;
  TORCH_CHECK(false, arg, ": expected dtype float32, float16 or bfloat16, got ", t.scalar_type());
}

// x [..., cols] as a contiguous [rows, cols] matrix.
torch::Tensor as_matrix(const torch::Tensor& x, int64_t cols, const char* arg, const char* what) {
  TORCH_CHECK(x.dim() >= 1, arg, ": expected at least 1 dimension, got a scalar");
  TORCH_CHECK(x.size(-1) == cols, arg, ": expected last dimension ", cols, " (", what, "), got shape ",
              detail::shape_str(x.sizes()));
  return detail::dense(x).reshape({-1, cols});
}

std::vector<int64_t> out_shape(const torch::Tensor& x, int64_t last) {
  std::vector<int64_t> s = x.sizes().vec();
  s.back() = last;
  return s;
}

torch::Tensor bias_f32(const torch::Tensor& bias, int64_t out) {
  if (!bias.defined()) return bias;
  detail::check_cpu(bias, "bias");
  TORCH_CHECK(bias.is_floating_point(), "bias: expected a floating-point tensor, got ", bias.scalar_type());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == out, "bias: expected shape [", out, "], got ",
              detail::shape_str(bias.sizes()));
  return detail::dense(bias).to(torch::kFloat32);
}

// Kernel arguments for rows of `in` (a dense [rows, in_cols] matrix) into `out` ([rows, out_cols]).
kernels::MatmulIO make_io(const torch::Tensor& in, kernels::DType dt, int64_t in_cols, torch::Tensor& out,
                          int64_t out_cols, const torch::Tensor& bias) {
  kernels::MatmulIO io;
  io.x = in.data_ptr();
  io.x_dtype = dt;
  io.n = in.size(0);
  io.ldx = in_cols;
  io.y = out.data_ptr();
  io.y_dtype = dt;
  io.ldy = out_cols;
  io.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  return io;
}

// The kernels' thread count follows torch's (at::set_num_threads), read at each call.
void sync_threads() { kernels::set_num_threads(at::get_num_threads()); }

// rows * cols of a weight shape, refused when it overflows int64 (a checkpoint's shape is data);
// the kernels cap a buffer at 2^59 elements, so that is the bound here too.
int64_t checked_numel(int64_t rows, int64_t cols, const char* arg) {
  TORCH_CHECK(rows <= (std::numeric_limits<int64_t>::max() / 16) / cols, arg,
              ": expected out_features * in_features <= 2^59, got ", rows, " x ", cols);
  return rows * cols;
}

template <class W>
torch::Tensor run_forward(const torch::Tensor& x, const W& w, const torch::Tensor& bias, MatmulPath path) {
  const kernels::DType dt = io_dtype(x, "x");
  const torch::Tensor x2 = as_matrix(x, w.cols, "x", "in_features");
  const torch::Tensor b = bias_f32(bias, w.rows);
  torch::Tensor y = torch::empty({x2.size(0), w.rows}, x.options());
  kernels::matmul(w, make_io(x2, dt, w.cols, y, w.rows, b), path);
  return y.reshape(out_shape(x, w.rows));
}

template <class W>
torch::Tensor run_transposed(const torch::Tensor& gy, const W& w) {
  const kernels::DType dt = io_dtype(gy, "grad_y");
  const torch::Tensor g2 = as_matrix(gy, w.rows, "grad_y", "out_features");
  torch::Tensor gx = torch::empty({g2.size(0), w.cols}, gy.options());
  kernels::matmul_transposed(w, make_io(g2, dt, w.rows, gx, w.cols, {}));
  return gx.reshape(out_shape(gy, w.cols));
}

}  // namespace

PackedWeight PackedWeight::from_4bit(const torch::Tensor& data, const QuantState& s) {
  detail::check_dtype(data, torch::kUInt8, "data");
  TORCH_CHECK(s.shape.size() == 2, "state.shape: expected a 2-D weight [out_features, in_features], got ",
              detail::shape_str(s.shape));
  const int64_t rows = checked_dim(s.shape[0], "state.shape[0] (out_features)");
  const int64_t cols = checked_dim(s.shape[1], "state.shape[1] (in_features)");
  const int64_t numel = checked_numel(rows, cols, "state.shape");
  auto impl = std::make_shared<Impl>();
  impl->is_4bit = true;
  impl->format = s.quant_type;
  impl->state = s;
  const torch::Tensor packed = detail::dense(data);
  if (s.quant_type == "int4") {
    const int64_t gs = s.blocksize;
    TORCH_CHECK(gs >= 2 && gs % 2 == 0, "state.blocksize: expected an even int4 group size >= 2, got ", gs);
    const int64_t groups = kernels::ceil_div(cols, gs);
    detail::check_numel(data, rows * (cols / 2 + cols % 2), "data");
    const torch::Tensor scale = detail::resolved_absmax(s, rows * groups);
    std::vector<int32_t> zp;
    if (s.zero_point.defined()) {
      detail::check_dtype(s.zero_point, torch::kUInt8, "state.zero_point");
      detail::check_numel(s.zero_point, rows * groups, "state.zero_point");
      const torch::Tensor z = detail::dense(s.zero_point);
      for (int64_t i = 0; i < z.numel(); ++i) {
        const int v = z.data_ptr<uint8_t>()[i];
        TORCH_CHECK(v <= 15, "state.zero_point: expected values in [0, 15], got ", v, " at index ", i);
        zp.push_back(v);
      }
    }
    const kernels::Lut4Layout l = kernels::int4_layout(rows, cols, gs);
    impl->codes = torch::empty({l.codes_bytes}, torch::kUInt8);
    impl->scale = torch::empty({l.stats}, kF32);
    if (!zp.empty()) impl->zero_point = torch::empty({l.stats}, kF32);
    impl->lut4 = kernels::pack_int4_into(packed.data_ptr<uint8_t>(), rows, cols, gs, scale.data_ptr<float>(),
                                         zp.empty() ? nullptr : zp.data(), impl->codes.data_ptr<uint8_t>(),
                                         impl->scale.data_ptr<float>(),
                                         zp.empty() ? nullptr : impl->zero_point.data_ptr<float>());
  } else {
    detail::format_4bit(s.quant_type, "state.quant_type");  // a codebook row of formats.def
    TORCH_CHECK(detail::is_pow2(s.blocksize) && s.blocksize >= 32 && s.blocksize <= 4096,
                "state.blocksize: expected a power of two in [32, 4096], got ", s.blocksize);
    detail::check_numel(data, numel / 2 + numel % 2, "data");
    detail::check_dtype(s.code, torch::kFloat32, "state.code");
    detail::check_numel(s.code, 16, "state.code");
    detail::check_all_finite(s.code, "state.code");
    const torch::Tensor code = detail::dense(s.code);
    const torch::Tensor absmax = detail::resolved_absmax(s, kernels::ceil_div(numel, s.blocksize));
    const kernels::Lut4Layout l = kernels::lut4_bnb_layout(rows, cols, s.blocksize);
    impl->codes = torch::empty({l.codes_bytes}, torch::kUInt8);
    impl->scale = torch::empty({l.stats}, kF32);
    impl->lut4 = kernels::pack_lut4_bnb_into(packed.data_ptr<uint8_t>(), rows, cols, s.blocksize,
                                             absmax.data_ptr<float>(), code.data_ptr<float>(),
                                             impl->codes.data_ptr<uint8_t>(), impl->scale.data_ptr<float>());
    // float32 absmax: the state shares the packed scale's memory (its first stats_given floats,
    // bit-exact copies) instead of holding the weight's statistics twice.
    if (!s.nested() && s.absmax.scalar_type() == torch::kFloat32)
      impl->state.absmax = impl->scale.narrow(0, 0, l.stats_given).view(s.absmax.sizes());
  }
  PackedWeight w;
  w.impl_ = std::move(impl);
  return w;
}

PackedWeight PackedWeight::from_8bit(const Int8Quantized& q) {
  detail::check_dtype(q.weight_int8, torch::kInt8, "q.weight_int8");
  TORCH_CHECK(q.weight_int8.dim() == 2,
              "q.weight_int8: expected a 2-D weight [out_features, in_features], got ",
              detail::shape_str(q.weight_int8.sizes()));
  const int64_t rows = checked_dim(q.weight_int8.size(0), "q.weight_int8.size(0) (out_features)");
  const int64_t cols = checked_dim(q.weight_int8.size(1), "q.weight_int8.size(1) (in_features)");
  checked_numel(rows, cols, "q.weight_int8");
  TORCH_CHECK(q.options.granularity() != Granularity::per_block,
              "q.options.granularity: expected per_channel or per_tensor for a matmul weight, got per_block");
  const int64_t nscale = q.options.granularity() == Granularity::per_channel ? rows : 1;
  detail::check_dtype(q.scale, torch::kFloat32, "q.scale");
  detail::check_numel(q.scale, nscale, "q.scale");
  detail::check_all_finite(q.scale, "q.scale");
  torch::Tensor scale = detail::dense(q.scale).reshape({-1}).expand({rows}).contiguous(), offset;
  if (!q.options.symmetric()) {
    detail::check_dtype(q.offset, torch::kFloat32, "q.offset");
    detail::check_numel(q.offset, nscale, "q.offset");
    detail::check_all_finite(q.offset, "q.offset");
    offset = detail::dense(q.offset).reshape({-1}).expand({rows}).contiguous();
  }
  const torch::Tensor codes = detail::dense(q.weight_int8);
  auto impl = std::make_shared<Impl>();
  impl->format = "int8";
  impl->q8 = q;
  impl->q8.weight_int8 = torch::Tensor();
  impl->codes = torch::empty({kernels::int8_codes_bytes(rows, cols)}, torch::kUInt8);
  impl->scale = torch::empty({rows}, kF32);
  impl->row_sum = torch::empty({rows}, torch::kInt32);
  if (offset.defined()) impl->offset = torch::empty({rows}, kF32);
  impl->int8 = kernels::pack_int8_into(
      codes.data_ptr<int8_t>(), rows, cols, scale.data_ptr<float>(),
      offset.defined() ? offset.data_ptr<float>() : nullptr,
      reinterpret_cast<int8_t*>(impl->codes.data_ptr<uint8_t>()), impl->scale.data_ptr<float>(),
      offset.defined() ? impl->offset.data_ptr<float>() : nullptr, impl->row_sum.data_ptr<int32_t>());
  PackedWeight w;
  w.impl_ = std::move(impl);
  return w;
}

PackedWeight PackedWeight::from_int8_scb(const torch::Tensor& CB, const torch::Tensor& SCB) {
  detail::check_dtype(SCB, torch::kFloat32, "SCB");
  TORCH_CHECK(CB.dim() == 2, "CB: expected a 2-D weight [out_features, in_features], got ",
              detail::shape_str(CB.sizes()));
  detail::check_numel(SCB, CB.size(0), "SCB");
  detail::check_all_finite(SCB, "SCB");
  Int8Quantized q;
  q.weight_int8 = CB;
  q.scale = detail::dense(SCB).reshape({-1}) / 127.0f;
  q.options = Int8Options().symmetric(true).granularity(Granularity::per_channel);
  PackedWeight w = from_8bit(q);
  // Sole owner of the fresh Impl: keep SCB itself for to_int8_scb.
  std::const_pointer_cast<Impl>(w.impl_)->scb = detail::dense(SCB).reshape({-1}).clone();
  return w;
}

namespace {
std::vector<std::pair<std::string, torch::Tensor>> p_tensors(const PackedWeight::Impl& p) {
  std::vector<std::pair<std::string, torch::Tensor>> v;
  for (const auto& [name, t] : {std::pair<const char*, const torch::Tensor&>{"codes", p.codes},
                                {"scale", p.scale},
                                {"zero_point", p.zero_point},
                                {"offset", p.offset},
                                {"row_sum", p.row_sum}})
    if (t.defined()) v.emplace_back(name, t);
  return v;
}
}  // namespace

std::vector<std::pair<std::string, torch::Tensor>> PackedWeight::tensors() const {
  return p_tensors(impl_of(impl_));
}

int64_t PackedWeight::out_features() const {
  const Impl& p = impl_of(impl_);
  return p.is_4bit ? p.lut4.rows : p.int8.rows;
}
int64_t PackedWeight::in_features() const {
  const Impl& p = impl_of(impl_);
  return p.is_4bit ? p.lut4.cols : p.int8.cols;
}
const std::string& PackedWeight::format() const { return impl_of(impl_).format; }
int64_t PackedWeight::bytes() const {
  const Impl& p = impl_of(impl_);
  int64_t n = 0;
  for (const auto& [name, t] : p_tensors(p)) n += t.numel() * static_cast<int64_t>(t.element_size());
  return n;
}
const kernels::Lut4Matrix* PackedWeight::lut4() const {
  return impl_of(impl_).is_4bit ? &impl_->lut4 : nullptr;
}
const kernels::Int8Matrix* PackedWeight::int8() const {
  return impl_of(impl_).is_4bit ? nullptr : &impl_->int8;
}

Quantized4bit PackedWeight::to_4bit() const {
  const Impl& p = impl_of(impl_);
  TORCH_CHECK(p.is_4bit, "to_4bit: expected a 4-bit packed weight, got format ", p.format);
  const kernels::Lut4Matrix& w = p.lut4;
  Quantized4bit out;
  out.state = p.state;
  // A float32 absmax shares the packed scale's memory: hand out a copy.
  if (!out.state.nested() && out.state.absmax.defined()) out.state.absmax = out.state.absmax.clone();
  const bool bnb = p.format != "int4";
  out.data = bnb ? torch::empty({(w.rows * w.cols + 1) / 2, 1}, torch::kUInt8)
                 : torch::empty({w.rows, (w.cols + 1) / 2}, torch::kUInt8);
  kernels::unpack_lut4_codes(w, bnb, out.data.data_ptr<uint8_t>());
  return out;
}

std::pair<torch::Tensor, torch::Tensor> PackedWeight::to_int8_scb() const {
  const Impl& p = impl_of(impl_);
  TORCH_CHECK(p.scb.defined(), "to_int8_scb: expected a weight made by from_int8_scb, got format ", p.format);
  return {to_8bit().weight_int8, p.scb.clone()};
}

Int8Quantized PackedWeight::to_8bit() const {
  const Impl& p = impl_of(impl_);
  TORCH_CHECK(!p.is_4bit, "to_8bit: expected an int8 packed weight, got format ", p.format);
  Int8Quantized out = p.q8;
  out.weight_int8 = torch::empty({p.int8.rows, p.int8.cols}, torch::kInt8);
  kernels::unpack_int8_codes(p.int8, out.weight_int8.data_ptr<int8_t>());
  return out;
}

namespace {

torch::Tensor forward_impl(const torch::Tensor& x, const PackedWeight& w, const torch::Tensor& bias,
                           MatmulPath path) {
  sync_threads();
  if (const auto* m = w.lut4()) return run_forward(x, *m, bias, path);
  return run_forward(x, *w.int8(), bias, path);
}

torch::Tensor transposed_impl(const torch::Tensor& grad_y, const PackedWeight& w) {
  sync_threads();
  if (const auto* m = w.lut4()) return run_transposed(grad_y, *m);
  return run_transposed(grad_y, *w.int8());
}

torch::Tensor llm_int8_impl(const torch::Tensor& x, const PackedWeight& w, double threshold,
                            const torch::Tensor& bias, std::vector<int64_t>* outlier_cols) {
  sync_threads();
  const kernels::Int8Matrix* m = w.int8();
  const kernels::DType dt = io_dtype(x, "x");
  const torch::Tensor x2 = as_matrix(x, m->cols, "x", "in_features");
  const torch::Tensor b = bias_f32(bias, m->rows);
  torch::Tensor y = torch::empty({x2.size(0), m->rows}, x.options());
  const kernels::MatmulIO io = make_io(x2, dt, m->cols, y, m->rows, b);
  kernels::matmul_llm_int8(*m, io, static_cast<float>(threshold), outlier_cols);
  return y.reshape(out_shape(x, m->rows));
}

// The packed weight rides in the autograd context (saved_data holds IValues; a capsule is the
// IValue for an opaque C++ object). It never gets a gradient: it is not a tensor input.
struct WeightHolder : torch::CustomClassHolder {
  explicit WeightHolder(PackedWeight weight) : w(std::move(weight)) {}
  PackedWeight w;
};

// y = x · dequant(W)ᵀ + bias with the fused kernels (quantized_matmul's path, or LLM.int8 when
// llm_int8); backward: grad_x = grad_y · dequant(W) (fused transposed product, exact path),
// grad_bias = sum of grad_y over the rows.
class QuantizedMatmulFunction : public torch::autograd::Function<QuantizedMatmulFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& bias, bool has_bias, const PackedWeight& w,
                               MatmulPath path, bool llm_int8, double threshold,
                               std::vector<int64_t>* outlier_cols) {
    ctx->saved_data["w"] = c10::IValue::make_capsule(c10::make_intrusive<WeightHolder>(w));
    ctx->saved_data["bias_dtype"] = bias.scalar_type();
    // An empty bias stands for none (libtorch 1.13's Function::apply refuses undefined inputs).
    const torch::Tensor b = has_bias ? bias : torch::Tensor();
    return llm_int8 ? llm_int8_impl(x, w, threshold, b, outlier_cols) : forward_impl(x, w, b, path);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto holder = c10::static_intrusive_pointer_cast<WeightHolder>(ctx->saved_data["w"].toCapsule());
    const PackedWeight& w = holder->w;
    const torch::Tensor& gy = grads[0];
    torch::Tensor gx, gb;
    if (ctx->needs_input_grad(0)) gx = transposed_impl(gy, w);
    if (ctx->needs_input_grad(1))
      gb = gy.reshape({-1, w.out_features()})
               .to(torch::kFloat32)
               .sum(0)
               .to(ctx->saved_data["bias_dtype"].toScalarType());
    return {gx,
            gb,
            torch::Tensor(),
            torch::Tensor(),
            torch::Tensor(),
            torch::Tensor(),
            torch::Tensor(),
            torch::Tensor()};
  }
};

torch::Tensor bias_or_empty(const torch::Tensor& bias) {
  return bias.defined() ? bias : torch::empty({0}, torch::kFloat32);
}

bool wants_grad(const torch::Tensor& x, const torch::Tensor& bias) {
  return torch::GradMode::is_enabled() && (x.requires_grad() || (bias.defined() && bias.requires_grad()));
}

}  // namespace

torch::Tensor quantized_matmul(const torch::Tensor& x, const PackedWeight& w, const torch::Tensor& bias,
                               MatmulPath path) {
  TORCH_CHECK(w.defined(), "w: expected a packed weight, got an empty PackedWeight");
  if (wants_grad(x, bias))
    return QuantizedMatmulFunction::apply(x, bias_or_empty(bias), bias.defined(), w, path, false, 0.0,
                                          nullptr);
  return forward_impl(x, w, bias, path);
}

torch::Tensor quantized_matmul_transposed(const torch::Tensor& grad_y, const PackedWeight& w) {
  TORCH_CHECK(w.defined(), "w: expected a packed weight, got an empty PackedWeight");
  return transposed_impl(grad_y, w);
}

torch::Tensor matmul_4bit(const torch::Tensor& x, const torch::Tensor& data, const QuantState& state,
                          const torch::Tensor& bias) {
  return quantized_matmul(x, PackedWeight::from_4bit(data, state), bias);
}

Int8MatmulResult int8_matmul(const torch::Tensor& x, const PackedWeight& w, double threshold,
                             const torch::Tensor& bias) {
  TORCH_CHECK(w.defined(), "w: expected a packed weight, got an empty PackedWeight");
  const kernels::Int8Matrix* m = w.int8();
  TORCH_CHECK(m, "w: expected an int8 weight for LLM.int8(), got format ", w.format());
  TORCH_CHECK(!m->offset, "w: expected a symmetric int8 weight for LLM.int8(), got an asymmetric one");
  TORCH_CHECK(std::isfinite(threshold) && threshold >= 0, "threshold: expected a finite value >= 0, got ",
              threshold);
  Int8MatmulResult r;
  r.out = wants_grad(x, bias)
              ? QuantizedMatmulFunction::apply(x, bias_or_empty(bias), bias.defined(), w, MatmulPath::exact,
                                               true, threshold, &r.outlier_cols)
              : llm_int8_impl(x, w, threshold, bias, &r.outlier_cols);
  return r;
}

Int8VectorwiseQuant int8_vectorwise_quant(const torch::Tensor& input, double threshold) {
  torch::Tensor x = input;
  const kernels::DType dt = detail::float_input(x, "x");
  TORCH_CHECK(std::isfinite(threshold) && threshold >= 0, "threshold: expected a finite value >= 0, got ",
              threshold);
  const int64_t cols = x.dim() == 0 ? 1 : x.size(-1), rows = x.numel() / cols;
  Int8VectorwiseQuant r;
  const float t = static_cast<float>(threshold);
  if (t > 0.0f) {
    const torch::Tensor idx =
        (x.reshape({rows, cols}).abs() >= t).any(0).nonzero().reshape({-1}).contiguous();
    r.outlier_cols.assign(idx.data_ptr<int64_t>(), idx.data_ptr<int64_t>() + idx.numel());
  }
  r.CB = torch::empty(x.sizes(), torch::kInt8);
  r.SCB = torch::empty({rows}, kF32);
  // bitsandbytes zeroes the outlier columns only for more than one row (one row: the masked
  // elements are those columns anyway).
  kernels::quantize_rows_int8(x.data_ptr(), dt, rows, cols, cols, t,
                              rows > 1 ? r.outlier_cols : std::vector<int64_t>{}, r.CB.data_ptr<int8_t>(),
                              cols, r.SCB.data_ptr<float>());
  return r;
}

}  // namespace msbnb
