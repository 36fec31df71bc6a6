// Fused quantized matmul on tensors: checks, packing, output allocation (msbnb/functional/matmul.h).
#include "msbnb/functional/matmul.h"

#include <ATen/Parallel.h>
#include <ATen/core/ivalue.h>
#include <torch/autograd.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "checks.h"
#include "msbnb/kernels/formats.h"
#include "msbnb/kernels/kernel_table.h"
#include "msbnb/kernels/ops.h"

namespace msbnb {

struct PackedWeight::Impl {
  PackedLayout layout;
  // The packed weight lives in these tensors (torch owns the memory), in the order of the
  // layout's specs; lut4 / int8 are views over them.
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  kernels::Lut4Matrix lut4;
  kernels::Int8Matrix int8;
  bool is_4bit = false;

  const torch::Tensor& get(const char* name) const {
    for (const auto& [n, t] : tensors)
      if (n == name) return t;
    static const torch::Tensor none;
    return none;
  }
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

namespace {

// One tensor of a layout: its name, dtype and shape.
struct Spec {
  const char* name;
  torch::ScalarType dtype;
  std::vector<int64_t> shape;
};

bool is_4bit_format(const std::string& f) {
  if (f == "int8") return false;
  try {
    detail::format_4bit(f, "layout.format");
  } catch (const c10::Error&) {
    TORCH_CHECK(false, "layout.format: expected \"nf4\", \"fp4\", \"int4\" or \"int8\", got \"", f, "\"");
  }
  return true;
}

void check_bnb_blocksize(int64_t bs, const char* arg) {
  TORCH_CHECK(detail::is_pow2(bs) && bs >= 32 && bs <= 4096, arg,
              ": expected a power of two in [32, 4096], got ", bs);
}

void check_layout(const PackedLayout& l) {
  const bool four = is_4bit_format(l.format);
  checked_numel(checked_dim(l.out_features, "layout.out_features"),
                checked_dim(l.in_features, "layout.in_features"), "layout");
  detail::check_float_dtype(l.dtype, "layout.dtype");
  if (four) {
    if (l.format == "int4") {
      TORCH_CHECK(l.blocksize >= 2 && l.blocksize % 2 == 0,
                  "layout.blocksize: expected an even int4 group size >= 2, got ", l.blocksize);
    } else {
      check_bnb_blocksize(l.blocksize, "layout.blocksize");
    }
    TORCH_CHECK(l.format == "int4" || !l.asymmetric, "layout.asymmetric: expected false for ", l.format,
                " (a symmetric codebook), got true");
    TORCH_CHECK(!l.scb, "layout.scb: expected false for ", l.format, " (SCB is int8's), got true");
    if (l.double_quant) check_bnb_blocksize(l.nested_blocksize, "layout.nested_blocksize");
  } else {
    TORCH_CHECK(l.blocksize == 0, "layout.blocksize: expected 0 for int8 (a scale per row), got ",
                l.blocksize);
    TORCH_CHECK(!l.double_quant, "layout.double_quant: expected false for int8, got true");
    TORCH_CHECK(l.granularity == Granularity::per_channel || l.granularity == Granularity::per_tensor,
                "layout.granularity: expected per_channel or per_tensor for a matmul weight, got per_block");
    TORCH_CHECK(!l.scb || (!l.asymmetric && l.granularity == Granularity::per_channel),
                "layout.scb: expected a symmetric per_channel int8 layout with scb, got ",
                l.asymmetric ? "asymmetric" : "per_tensor");
  }
}

// The 4-bit kernel layout (sizes) of a checked layout.
kernels::Lut4Layout lut4_layout(const PackedLayout& l) {
  return l.format == "int4" ? kernels::int4_layout(l.out_features, l.in_features, l.blocksize)
                            : kernels::lut4_bnb_layout(l.out_features, l.in_features, l.blocksize);
}

// The tensors of a checked layout, in tensors() order (documented in the header).
std::vector<Spec> specs(const PackedLayout& l) {
  std::vector<Spec> v;
  const int64_t rows = l.out_features;
  if (l.format == "int8") {
    v.push_back({"codes", torch::kUInt8, {kernels::int8_codes_bytes(rows, l.in_features)}});
    v.push_back({"scale", torch::kFloat32, {rows}});
    if (l.asymmetric) v.push_back({"offset", torch::kFloat32, {rows}});
    v.push_back({"row_sum", torch::kInt32, {rows}});
    if (l.scb) v.push_back({"SCB", torch::kFloat32, {rows}});
    return v;
  }
  const kernels::Lut4Layout kl = lut4_layout(l);
  v.push_back({"codes", torch::kUInt8, {kl.codes_bytes}});
  if (!l.double_quant) v.push_back({"scale", torch::kFloat32, {kl.stats}});
  if (l.asymmetric) v.push_back({"zero_point", torch::kFloat32, {kl.stats}});
  if (l.format != "int4") v.push_back({"code", torch::kFloat32, {16}});
  if (l.double_quant) {
    v.push_back({"absmax", torch::kUInt8, {kl.stats_given}});
    v.push_back({"nested_absmax", torch::kFloat32, {kernels::ceil_div(kl.stats_given, l.nested_blocksize)}});
    v.push_back({"nested_code", torch::kFloat32, {256}});
    v.push_back({"offset", torch::kFloat32, {}});
  }
  return v;
}

std::string spec_str(const Spec& s) {
  return std::string(c10::toString(s.dtype)) + " " + detail::shape_str(s.shape);
}

// The kernels' views over impl.tensors (already checked against the layout's specs).
void make_views(PackedWeight::Impl& p) {
  const PackedLayout& l = p.layout;
  const int64_t rows = l.out_features, cols = l.in_features;
  auto ptr = [&](const char* name) -> const void* {
    const torch::Tensor& t = p.get(name);
    return t.defined() ? t.data_ptr() : nullptr;
  };
  const auto* codes = static_cast<const uint8_t*>(ptr("codes"));
  const auto* scale = static_cast<const float*>(ptr("scale"));
  if (l.format == "int8") {
    p.int8 = kernels::int8_view(rows, cols, reinterpret_cast<const int8_t*>(codes), scale,
                                static_cast<const float*>(ptr("offset")),
                                static_cast<const int32_t*>(ptr("row_sum")));
    return;
  }
  p.is_4bit = true;
  p.lut4 = l.format == "int4" ? kernels::int4_view(rows, cols, l.blocksize, l.asymmetric, codes, scale,
                                                   static_cast<const float*>(ptr("zero_point")))
                              : kernels::lut4_bnb_view(rows, cols, l.blocksize,
                                                       static_cast<const float*>(ptr("code")), codes, scale);
  if (l.double_quant) {
    kernels::Lut4NestedScale n;
    n.q = static_cast<const uint8_t*>(ptr("absmax"));
    n.code = static_cast<const float*>(ptr("nested_code"));
    n.nested = static_cast<const float*>(ptr("nested_absmax"));
    n.offset = static_cast<const float*>(ptr("offset"));
    n.block = l.nested_blocksize;
    n.count = p.get("absmax").numel();
    p.lut4 = kernels::with_nested_scale(p.lut4, n);
  }
}

// A weight of a checked layout over tensors in spec order.
PackedWeight::Impl make_impl(const PackedLayout& l,
                             std::vector<std::pair<std::string, torch::Tensor>> tensors) {
  PackedWeight::Impl p;
  p.layout = l;
  p.tensors = std::move(tensors);
  make_views(p);
  return p;
}

// Fresh (uninitialised) tensors of a checked layout.
std::vector<std::pair<std::string, torch::Tensor>> alloc(const PackedLayout& l) {
  std::vector<std::pair<std::string, torch::Tensor>> v;
  for (const Spec& s : specs(l))
    v.emplace_back(s.name, torch::empty(s.shape, torch::TensorOptions().dtype(s.dtype)));
  return v;
}

torch::Tensor& slot(std::vector<std::pair<std::string, torch::Tensor>>& v, const char* name) {
  for (auto& [n, t] : v)
    if (n == name) return t;
  TORCH_INTERNAL_ASSERT(false, "no packed tensor ", name);
}

}  // namespace

PackedWeight PackedWeight::from_4bit(const torch::Tensor& data, const QuantState& s) {
  detail::check_dtype(data, torch::kUInt8, "data");
  TORCH_CHECK(s.shape.size() == 2, "state.shape: expected a 2-D weight [out_features, in_features], got ",
              detail::shape_str(s.shape));
  const int64_t rows = checked_dim(s.shape[0], "state.shape[0] (out_features)");
  const int64_t cols = checked_dim(s.shape[1], "state.shape[1] (in_features)");
  const int64_t numel = checked_numel(rows, cols, "state.shape");
  detail::check_float_dtype(s.dtype, "state.dtype");
  PackedLayout l;
  l.format = s.quant_type;
  l.out_features = rows;
  l.in_features = cols;
  l.blocksize = s.blocksize;
  l.dtype = s.dtype;
  l.double_quant = s.nested();
  if (s.nested()) l.nested_blocksize = s.state2->blocksize;
  const torch::Tensor packed = detail::dense(data);
  std::vector<std::pair<std::string, torch::Tensor>> ts;
  if (s.quant_type == "int4") {
    const int64_t gs = s.blocksize;
    TORCH_CHECK(gs >= 2 && gs % 2 == 0, "state.blocksize: expected an even int4 group size >= 2, got ", gs);
    const int64_t groups = kernels::ceil_div(cols, gs);
    detail::check_numel(data, rows * (cols / 2 + cols % 2), "data");
    // Validates the nested statistics too (and decodes them: the packer takes float scales).
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
    l.asymmetric = !zp.empty();
    if (l.double_quant) check_bnb_blocksize(l.nested_blocksize, "state.state2.blocksize");
    check_layout(l);
    ts = alloc(l);
    const kernels::Lut4Layout kl = lut4_layout(l);
    const torch::Tensor scale_out = l.double_quant ? torch::empty({kl.stats}, kF32) : slot(ts, "scale");
    kernels::pack_int4_into(packed.data_ptr<uint8_t>(), rows, cols, gs, scale.data_ptr<float>(),
                            zp.empty() ? nullptr : zp.data(), slot(ts, "codes").data_ptr<uint8_t>(),
                            scale_out.data_ptr<float>(),
                            zp.empty() ? nullptr : slot(ts, "zero_point").data_ptr<float>());
  } else {
    detail::format_4bit(s.quant_type, "state.quant_type");  // a codebook row of formats.def
    check_bnb_blocksize(s.blocksize, "state.blocksize");
    detail::check_numel(data, numel / 2 + numel % 2, "data");
    detail::check_dtype(s.code, torch::kFloat32, "state.code");
    detail::check_numel(s.code, 16, "state.code");
    detail::check_all_finite(s.code, "state.code");
    const torch::Tensor code = detail::dense(s.code);
    // Validates the nested statistics too (and decodes them: the packer takes float absmax).
    const torch::Tensor absmax = detail::resolved_absmax(s, kernels::ceil_div(numel, s.blocksize));
    if (l.double_quant) check_bnb_blocksize(l.nested_blocksize, "state.state2.blocksize");
    check_layout(l);
    ts = alloc(l);
    const kernels::Lut4Layout kl = lut4_layout(l);
    const torch::Tensor scale_out = l.double_quant ? torch::empty({kl.stats}, kF32) : slot(ts, "scale");
    kernels::pack_lut4_bnb_into(packed.data_ptr<uint8_t>(), rows, cols, s.blocksize, absmax.data_ptr<float>(),
                                code.data_ptr<float>(), slot(ts, "codes").data_ptr<uint8_t>(),
                                scale_out.data_ptr<float>());
    slot(ts, "code").copy_(code.reshape({-1}));
  }
  if (l.double_quant) {
    // bitsandbytes' tensors as given: the kernels decode them (bit-exact to_4bit for free).
    slot(ts, "absmax").copy_(s.absmax.reshape({-1}));
    slot(ts, "nested_absmax").copy_(s.state2->absmax.reshape({-1}));
    slot(ts, "nested_code").copy_(s.state2->code.reshape({-1}));
    slot(ts, "offset").copy_(s.offset.reshape({}));
  }
  PackedWeight w;
  w.impl_ = std::make_shared<Impl>(make_impl(l, std::move(ts)));
  return w;
}

namespace {
PackedWeight pack_8bit(const Int8Quantized& q, const torch::Tensor& SCB) {
  detail::check_dtype(q.weight_int8, torch::kInt8, "q.weight_int8");
  TORCH_CHECK(q.weight_int8.dim() == 2,
              "q.weight_int8: expected a 2-D weight [out_features, in_features], got ",
              detail::shape_str(q.weight_int8.sizes()));
  const int64_t rows = checked_dim(q.weight_int8.size(0), "q.weight_int8.size(0) (out_features)");
  const int64_t cols = checked_dim(q.weight_int8.size(1), "q.weight_int8.size(1) (in_features)");
  checked_numel(rows, cols, "q.weight_int8");
  TORCH_CHECK(q.options.granularity() != Granularity::per_block,
              "q.options.granularity: expected per_channel or per_tensor for a matmul weight, got per_block");
  detail::check_float_dtype(q.dtype, "q.dtype");
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
  PackedLayout l;
  l.format = "int8";
  l.out_features = rows;
  l.in_features = cols;
  l.asymmetric = !q.options.symmetric();
  l.granularity = q.options.granularity();
  l.dtype = q.dtype;
  l.scb = SCB.defined();
  check_layout(l);
  auto ts = alloc(l);
  const torch::Tensor codes = detail::dense(q.weight_int8);
  kernels::pack_int8_into(codes.data_ptr<int8_t>(), rows, cols, scale.data_ptr<float>(),
                          offset.defined() ? offset.data_ptr<float>() : nullptr,
                          reinterpret_cast<int8_t*>(slot(ts, "codes").data_ptr<uint8_t>()),
                          slot(ts, "scale").data_ptr<float>(),
                          offset.defined() ? slot(ts, "offset").data_ptr<float>() : nullptr,
                          slot(ts, "row_sum").data_ptr<int32_t>());
  // SCB kept as given for to_int8_scb (SCB / 127 * 127 is not always SCB).
  if (SCB.defined()) slot(ts, "SCB").copy_(SCB.reshape({-1}));
  PackedWeight w = PackedWeight::from_tensors(l, ts);
  return w;
}
}  // namespace

PackedWeight PackedWeight::from_8bit(const Int8Quantized& q) { return pack_8bit(q, {}); }

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
  return pack_8bit(q, detail::dense(SCB));
}

PackedWeight PackedWeight::zeros(const PackedLayout& layout) {
  check_layout(layout);
  auto ts = alloc(layout);
  for (auto& [name, t] : ts) t.zero_();
  if (layout.format != "int4" && layout.format != "int8") {
    // The format's codebook, as quantize_4bit gives it.
    const kernels::FormatInfo& info =
        kernels::format_info(detail::format_4bit(layout.format, "layout.format"));
    std::copy(info.codebook, info.codebook + 16, slot(ts, "code").data_ptr<float>());
  }
  if (layout.double_quant) slot(ts, "nested_code").copy_(create_dynamic_map());
  PackedWeight w;
  w.impl_ = std::make_shared<Impl>(make_impl(layout, std::move(ts)));
  return w;
}

PackedWeight PackedWeight::from_tensors(const PackedLayout& layout,
                                        const std::vector<std::pair<std::string, torch::Tensor>>& tensors) {
  check_layout(layout);
  const std::vector<Spec> sp = specs(layout);
  std::string names;
  for (const Spec& s : sp) names += std::string(names.empty() ? "" : ", ") + "\"" + s.name + "\"";
  std::vector<std::pair<std::string, torch::Tensor>> ordered;
  for (const Spec& s : sp) {
    const torch::Tensor* found = nullptr;
    for (const auto& [name, t] : tensors)
      if (name == s.name) {
        TORCH_CHECK(!found, "tensors: expected one \"", s.name, "\", got it twice");
        found = &t;
      }
    TORCH_CHECK(found, "tensors: expected \"", s.name, "\" (", spec_str(s), ") for a ", layout.format,
                " weight, got none");
    const torch::Tensor& t = *found;
    const std::string arg = std::string("tensors[\"") + s.name + "\"]";
    TORCH_CHECK(t.defined(), arg, ": expected ", spec_str(s), ", got an undefined tensor");
    TORCH_CHECK(t.device().is_cpu(), arg, ": expected a CPU tensor, got device ", t.device());
    TORCH_CHECK(t.scalar_type() == s.dtype && t.sizes() == c10::IntArrayRef(s.shape), arg, ": expected ",
                spec_str(s), ", got ", t.scalar_type(), " ", detail::shape_str(t.sizes()));
    TORCH_CHECK(t.layout() == torch::kStrided && t.is_contiguous() && !t.is_conj() && !t.is_neg(), arg,
                ": expected a contiguous tensor, got strides ", detail::shape_str(t.strides()));
    if (std::string(s.name) == "codes")
      TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 64 == 0, arg,
                  ": expected 64-byte aligned storage, got address % 64 = ",
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 64);
    ordered.emplace_back(s.name, t);
  }
  for (const auto& [name, t] : tensors) {
    bool known = false;
    for (const Spec& s : sp) known |= name == s.name;
    TORCH_CHECK(known, "tensors: expected only ", names, " for this ", layout.format, " layout, got \"", name,
                "\"");
  }
  PackedWeight w;
  w.impl_ = std::make_shared<Impl>(make_impl(layout, std::move(ordered)));
  return w;
}

PackedLayout PackedWeight::layout() const { return impl_of(impl_).layout; }

std::vector<std::pair<std::string, torch::Tensor>> PackedWeight::tensors() const {
  return impl_of(impl_).tensors;
}

int64_t PackedWeight::out_features() const { return impl_of(impl_).layout.out_features; }
int64_t PackedWeight::in_features() const { return impl_of(impl_).layout.in_features; }
const std::string& PackedWeight::format() const { return impl_of(impl_).layout.format; }
int64_t PackedWeight::bytes() const {
  int64_t n = 0;
  for (const auto& [name, t] : impl_of(impl_).tensors)
    n += t.numel() * static_cast<int64_t>(t.element_size());
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
  TORCH_CHECK(p.is_4bit, "to_4bit: expected a 4-bit packed weight, got format ", p.layout.format);
  const PackedLayout& l = p.layout;
  const kernels::Lut4Matrix& w = p.lut4;
  const bool int4 = l.format == "int4";
  const int64_t given = lut4_layout(l).stats_given, groups = kernels::ceil_div(l.in_features, l.blocksize);
  Quantized4bit out;
  QuantState& s = out.state;
  s.quant_type = l.format;
  s.shape = {l.out_features, l.in_features};
  s.dtype = l.dtype;
  s.blocksize = l.blocksize;
  if (!int4) s.code = p.get("code").clone();
  if (l.double_quant) {
    s.absmax = p.get("absmax").clone();
    s.offset = p.get("offset").clone();
    auto s2 = std::make_shared<QuantState>();
    s2->quant_type = "dynamic8";
    s2->shape = {given};
    s2->dtype = torch::kFloat32;
    s2->blocksize = l.nested_blocksize;
    s2->code = p.get("nested_code").clone();
    s2->absmax = p.get("nested_absmax").clone();
    s.state2 = std::move(s2);
  } else {
    s.absmax = p.get("scale").narrow(0, 0, given).clone();
    if (int4) s.absmax = s.absmax.view({l.out_features, groups});
  }
  if (l.asymmetric)
    s.zero_point = p.get("zero_point").narrow(0, 0, given).to(torch::kUInt8).view({l.out_features, groups});
  out.data = int4 ? torch::empty({w.rows, (w.cols + 1) / 2}, torch::kUInt8)
                  : torch::empty({(w.rows * w.cols + 1) / 2, 1}, torch::kUInt8);
  kernels::unpack_lut4_codes(w, !int4, out.data.data_ptr<uint8_t>());
  return out;
}

std::pair<torch::Tensor, torch::Tensor> PackedWeight::to_int8_scb() const {
  const Impl& p = impl_of(impl_);
  TORCH_CHECK(p.layout.scb, "to_int8_scb: expected a weight made by from_int8_scb, got format ",
              p.layout.format);
  return {to_8bit().weight_int8, p.get("SCB").clone()};
}

Int8Quantized PackedWeight::to_8bit() const {
  const Impl& p = impl_of(impl_);
  TORCH_CHECK(!p.is_4bit, "to_8bit: expected an int8 packed weight, got format ", p.layout.format);
  const PackedLayout& l = p.layout;
  const int64_t nscale = l.granularity == Granularity::per_channel ? l.out_features : 1;
  Int8Quantized out;
  out.options = Int8Options().symmetric(!l.asymmetric).granularity(l.granularity);
  out.dtype = l.dtype;
  out.scale = p.get("scale").narrow(0, 0, nscale).clone();
  if (l.asymmetric) out.offset = p.get("offset").narrow(0, 0, nscale).clone();
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
