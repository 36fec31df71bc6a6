// Linear8bit and Linear4bit (msbnb/nn/linear.h).
#include "msbnb/nn/linear.h"

#include <torch/nn/functional/linear.h>
#include <torch/nn/init.h>

#include <cmath>

#include "common.h"

namespace msbnb::nn {

namespace detail {

PackedWeight PackedWeightCache::get(const PackedLayout& layout, const NamedTensors& buffers) const {
  std::vector<const void*> ptrs;
  ptrs.reserve(buffers.size());
  for (const auto& [name, t] : buffers) ptrs.push_back(t.data_ptr());
  std::lock_guard<std::mutex> lock(mutex_);
  // The buffers' storage changes under clone() (set_data), torch::load (set_) and set_data: a
  // weight over other memory is rebuilt over the current tensors.
  if (!weight_.defined() || ptrs != data_ptrs_) {
    // Over aliases (own TensorImpls, the buffers' storage): a weight handed out earlier (kept by
    // autograd for backward, say) keeps its memory when a buffer's storage is later replaced.
    NamedTensors views;
    views.reserve(buffers.size());
    for (const auto& [name, t] : buffers) views.emplace_back(name, t.detach());
    weight_ = PackedWeight::from_tensors(layout, views);
    data_ptrs_ = std::move(ptrs);
  }
  return weight_;
}

void PackedWeightCache::invalidate() {
  std::lock_guard<std::mutex> lock(mutex_);
  weight_ = PackedWeight();
  data_ptrs_.clear();
}

}  // namespace detail

namespace {

constexpr const char* kBufferPrefix = "weight_";

// The buffer name of a PackedWeight tensor (module names cannot hold dots).
std::string buffer_name(const std::string& tensor_name) {
  std::string n = kBufferPrefix + tensor_name;
  for (char& c : n)
    if (c == '.') c = '_';
  return n;
}

// torch::nn::Linear's bias init: U(-1/sqrt(in), 1/sqrt(in)).
torch::Tensor init_bias(int64_t out, int64_t in) {
  torch::Tensor b = torch::empty({out}, torch::kFloat32);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  torch::nn::init::uniform_(b, -bound, bound);
  return b;
}

// Installs `w`'s tensors as the module's buffers: the names and dtypes registered by reset()
// (zeros of the same layout), the storage replaced (set_data, no copy).
void install(const PackedWeight& w, NamedTensors& buffers, const char* module) {
  const NamedTensors t = w.tensors();
  TORCH_CHECK(t.size() == buffers.size(), module, ": internal error: the packed weight has ", t.size(),
              " tensors, the layer registered ", buffers.size());
  for (size_t i = 0; i < t.size(); ++i)
    TORCH_CHECK(
        t[i].first == buffers[i].first && t[i].second.scalar_type() == buffers[i].second.scalar_type() &&
            t[i].second.sizes() == buffers[i].second.sizes(),
        module, ": internal error: packed tensor ", t[i].first, " ", t[i].second.scalar_type(),
        detail::shape_str(t[i].second.sizes()), " does not match the layer's buffer ", buffers[i].first, " ",
        buffers[i].second.scalar_type(), detail::shape_str(buffers[i].second.sizes()));
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < t.size(); ++i) buffers[i].second.set_data(t[i].second);
}

void convert_float(torch::Tensor& p, torch::Dtype dtype) {
  if (!p.defined() || p.scalar_type() == dtype) return;
  torch::NoGradGuard no_grad;
  p.set_data(p.to(dtype));
}

int64_t module_bytes(const torch::nn::Module& m) {
  int64_t n = 0;
  for (const auto& p : m.parameters(false)) n += detail::tensor_bytes(p);
  for (const auto& b : m.buffers(false)) n += detail::tensor_bytes(b);
  return n;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Linear8bit

Linear8bitOptions::Linear8bitOptions(int64_t in_features, int64_t out_features)
    : in_features_(in_features), out_features_(out_features) {}

Linear8bitImpl::Linear8bitImpl(const Linear8bitOptions& options_) : options(options_) {
  detail::check_positive(options.in_features(), "in_features");
  detail::check_positive(options.out_features(), "out_features");
  detail::checked_mul(options.out_features(), options.in_features(), "out_features * in_features");
  TORCH_CHECK(std::isfinite(options.threshold()) && options.threshold() >= 0,
              "threshold: expected a finite value >= 0, got ", options.threshold());
  quantized_ = !options.has_fp16_weights();
  reset();
}

namespace {
PackedLayout int8_layout(const Linear8bitOptions& o) {
  PackedLayout l;
  l.format = "int8";
  l.out_features = o.out_features();
  l.in_features = o.in_features();
  l.scb = true;
  l.granularity = Granularity::per_channel;
  return l;
}
}  // namespace

void Linear8bitImpl::reset() {
  const int64_t in = options.in_features(), out = options.out_features();
  buffers_w_.clear();
  weight = torch::Tensor();
  if (quantized_) {
    for (const auto& [name, t] : PackedWeight::zeros(int8_layout(options)).tensors())
      buffers_w_.emplace_back(name, register_buffer(buffer_name(name), t));
  } else {
    // torch::nn::Linear's init.
    weight = register_parameter("weight", torch::empty({out, in}, torch::kFloat32));
    torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
  }
  bias = options.bias() ? register_parameter("bias", init_bias(out, in)) : torch::Tensor();
  cache_.invalidate();
}

void Linear8bitImpl::pretty_print(std::ostream& stream) const {
  stream << "msbnb::nn::Linear8bit(in_features=" << options.in_features()
         << ", out_features=" << options.out_features() << ", bias=" << std::boolalpha << options.bias()
         << ", threshold=" << options.threshold() << ")";
}

PackedWeight Linear8bitImpl::packed_weight() const {
  TORCH_CHECK(quantized_,
              "Linear8bit: expected a quantized layer, got one with a float weight "
              "(has_fp16_weights=true: call quantize_weights() first)");
  return cache_.get(int8_layout(options), buffers_w_);
}

torch::Tensor Linear8bitImpl::forward(const torch::Tensor& x) {
  detail::check_input(x, options.in_features(), "in_features");
  if (!quantized_) {
    // has_fp16_weights before quantize_weights(): a float layer, trainable as torch's Linear.
    const torch::Tensor b = bias.defined() ? bias.to(x.scalar_type()) : torch::Tensor();
    return torch::nn::functional::linear(x, weight.to(x.scalar_type()), b);
  }
  const PackedWeight w = packed_weight();
  if (options.threshold() > 0) return int8_matmul(x, w, options.threshold(), bias).out;
  return quantized_matmul(x, w, bias);
}

void Linear8bitImpl::set_packed(const PackedWeight& w) {
  if (!quantized_) {
    // Drop the float weight (as bitsandbytes' Int8Params after quantization) and register the
    // int8 buffers in its place.
    parameters_.erase("weight");
    weight = torch::Tensor();
    quantized_ = true;
    for (const auto& [name, t] : PackedWeight::zeros(int8_layout(options)).tensors())
      buffers_w_.emplace_back(name, register_buffer(buffer_name(name), t));
  }
  install(w, buffers_w_, "Linear8bit");
  cache_.invalidate();
}

void Linear8bitImpl::quantize_weights(const torch::Tensor& w) {
  detail::check_weight(w, options.out_features(), options.in_features(), "out_features", "in_features");
  // bitsandbytes' Int8Params: int8_vectorwise_quant with threshold 0 (row absmax / 127).
  const Int8VectorwiseQuant q = int8_vectorwise_quant(w.detach(), 0.0);
  set_packed(PackedWeight::from_int8_scb(q.CB, q.SCB));
}

void Linear8bitImpl::quantize_weights() {
  TORCH_CHECK(!quantized_,
              "Linear8bit::quantize_weights(): expected a layer with a float weight "
              "(has_fp16_weights=true, not yet quantized), got a quantized layer");
  quantize_weights(weight.detach().clone());
}

torch::Tensor Linear8bitImpl::dequantize_weights() const {
  if (!quantized_) return weight.detach().to(torch::kFloat32).clone();
  // What the kernels multiply by: CB * (SCB / 127) (to_8bit's scale).
  return dequantize_8bit(packed_weight().to_8bit(), torch::kFloat32);
}

Linear8bit Linear8bitImpl::from_linear(const torch::nn::Linear& linear,
                                       std::optional<Linear8bitOptions> options_) {
  TORCH_CHECK(!linear.is_empty(), "linear: expected a torch::nn::Linear, got an empty holder");
  const auto& lo = linear->options;
  Linear8bitOptions o = options_.value_or(Linear8bitOptions(lo.in_features(), lo.out_features()));
  o.in_features(lo.in_features()).out_features(lo.out_features()).bias(lo.bias()).has_fp16_weights(false);
  Linear8bit m(o);
  m->quantize_weights(linear->weight.detach());
  if (lo.bias()) {
    torch::NoGradGuard no_grad;
    m->bias.set_data(linear->bias.detach().to(torch::kFloat32).clone());
  }
  return m;
}

int64_t Linear8bitImpl::memory_bytes() const { return module_bytes(*this); }

std::vector<std::string> Linear8bitImpl::quantized_state_keys() const {
  std::vector<std::string> k = {"weight"};
  if (options.bias()) k.push_back("bias");
  if (quantized_) {
    k.push_back("SCB");
    k.push_back("weight_format");
  }
  return k;
}

NamedTensors Linear8bitImpl::quantized_state() const {
  NamedTensors v;
  if (!quantized_) {
    // A float layer saves as torch's Linear (bitsandbytes' Linear8bitLt with has_fp16_weights).
    v.emplace_back("weight", weight.detach().clone());
    if (bias.defined()) v.emplace_back("bias", bias.detach().clone());
    return v;
  }
  auto [cb, scb] = packed_weight().to_int8_scb();
  v.emplace_back("weight", cb);
  if (bias.defined()) v.emplace_back("bias", bias.detach().clone());
  v.emplace_back("SCB", scb);
  // bitsandbytes' LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING: "row" is 0.
  v.emplace_back("weight_format", torch::zeros({}, torch::kUInt8));
  return v;
}

void Linear8bitImpl::load_quantized_state(const std::map<std::string, torch::Tensor>& entries,
                                          const std::string& prefix) {
  const int64_t out = options.out_features(), in = options.in_features();
  torch::Tensor b;
  if (options.bias()) b = detail::load_bias(entries, prefix, out);
  if (!quantized_) {
    const torch::Tensor& w = detail::entry(entries, "weight", prefix);
    TORCH_CHECK(w.defined(), prefix, "weight: expected a tensor");
    detail::check_float_dtype(w.scalar_type(), prefix + "weight dtype");
    detail::check_entry(w, prefix + "weight", w.scalar_type(), {out, in});
    torch::NoGradGuard no_grad;
    weight.set_data(w.detach().to(torch::kFloat32).contiguous().clone());
    if (b.defined()) bias.set_data(b);
    return;
  }
  const torch::Tensor& cb = detail::entry(entries, "weight", prefix);
  detail::check_entry(cb, prefix + "weight", torch::kInt8, {out, in});
  const torch::Tensor& scb = detail::entry(entries, "SCB", prefix);
  detail::check_entry(scb, prefix + "SCB", torch::kFloat32, {out});
  detail::check_entry_finite(scb, prefix + "SCB");
  TORCH_CHECK(scb.min().item<float>() >= 0, prefix, "SCB: expected row absmax values >= 0, got ",
              scb.min().item<float>());
  const torch::Tensor& fmt = detail::entry(entries, "weight_format", prefix);
  TORCH_CHECK(fmt.defined() && fmt.numel() == 1 && fmt.dim() <= 1 && !fmt.is_floating_point(), prefix,
              "weight_format: expected an integer scalar (0: \"row\"), got ",
              fmt.defined() ? detail::shape_str(fmt.sizes()) : "undefined");
  TORCH_CHECK(fmt.item<int64_t>() == 0, prefix,
              "weight_format: expected 0 (\"row\", the only layout bitsandbytes "
              "0.45+ and msbnb use), got ",
              fmt.item<int64_t>());
  const PackedWeight w = PackedWeight::from_int8_scb(cb.contiguous(), scb.contiguous());
  set_packed(w);
  if (b.defined()) {
    torch::NoGradGuard no_grad;
    bias.set_data(b);
  }
}

void Linear8bitImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  detail::check_to_device(device, "msbnb::nn::Linear8bit");
  to(dtype, non_blocking);
}

void Linear8bitImpl::to(torch::Dtype dtype, bool non_blocking) {
  detail::check_to_dtype(dtype, "msbnb::nn::Linear8bit");
  convert_float(bias, dtype);
  convert_float(weight, dtype);
}

void Linear8bitImpl::to(torch::Device device, bool non_blocking) {
  detail::check_to_device(device, "msbnb::nn::Linear8bit");
}

// ---------------------------------------------------------------------------------------------
// Linear4bit

Linear4bitOptions::Linear4bitOptions(int64_t in_features, int64_t out_features)
    : in_features_(in_features), out_features_(out_features) {}

int64_t Linear4bitOptions::effective_blocksize() const {
  return Quantize4bitOptions().quant_type(quant_type_).blocksize(blocksize_).effective_blocksize();
}

Linear4bitImpl::Linear4bitImpl(const Linear4bitOptions& options_) : options(options_) {
  detail::check_positive(options.in_features(), "in_features");
  detail::check_positive(options.out_features(), "out_features");
  detail::checked_mul(options.out_features(), options.in_features(), "out_features * in_features");
  detail::check_4bit_options(options.quant_type(), options.effective_blocksize(), options.symmetric());
  if (options.compute_dtype()) detail::check_float_dtype(*options.compute_dtype(), "compute_dtype");
  reset();
}

PackedLayout Linear4bitImpl::layout() const {
  PackedLayout l;
  l.format = options.quant_type();
  l.out_features = options.out_features();
  l.in_features = options.in_features();
  l.blocksize = options.effective_blocksize();
  l.asymmetric = !options.symmetric();
  l.double_quant = options.compress_statistics();
  l.dtype = weight_dtype_;
  return l;
}

void Linear4bitImpl::reset() {
  buffers_w_.clear();
  for (const auto& [name, t] : PackedWeight::zeros(layout()).tensors())
    buffers_w_.emplace_back(name, register_buffer(buffer_name(name), t));
  bias = options.bias() ? register_parameter("bias", init_bias(options.out_features(), options.in_features()))
                        : torch::Tensor();
  cache_.invalidate();
}

void Linear4bitImpl::pretty_print(std::ostream& stream) const {
  stream << "msbnb::nn::Linear4bit(in_features=" << options.in_features()
         << ", out_features=" << options.out_features() << ", bias=" << std::boolalpha << options.bias()
         << ", quant_type=" << options.quant_type() << ", blocksize=" << options.effective_blocksize();
  if (!options.symmetric()) stream << ", symmetric=false";
  stream << ")";
}

PackedWeight Linear4bitImpl::packed_weight() const { return cache_.get(layout(), buffers_w_); }

torch::Tensor Linear4bitImpl::forward(const torch::Tensor& x) {
  detail::check_input(x, options.in_features(), "in_features");
  const PackedWeight w = packed_weight();
  // bitsandbytes' compute_dtype: the product in compute_dtype, the result in x's dtype.
  if (options.compute_dtype() && *options.compute_dtype() != x.scalar_type())
    return quantized_matmul(x.to(*options.compute_dtype()), w, bias, options.matmul_path())
        .to(x.scalar_type());
  return quantized_matmul(x, w, bias, options.matmul_path());
}

void Linear4bitImpl::set_packed(const PackedWeight& w) {
  TORCH_CHECK(w.layout() == layout(), "Linear4bit: internal error: packed layout does not match the layer's");
  install(w, buffers_w_, "Linear4bit");
  cache_.invalidate();
}

void Linear4bitImpl::quantize_weights(const torch::Tensor& w) {
  detail::check_weight(w, options.out_features(), options.in_features(), "out_features", "in_features");
  const Quantized4bit q = quantize_4bit(w.detach(), Quantize4bitOptions()
                                                        .quant_type(options.quant_type())
                                                        .blocksize(options.effective_blocksize())
                                                        .compress_statistics(options.compress_statistics())
                                                        .symmetric(options.symmetric()));
  weight_dtype_ = w.scalar_type();
  set_packed(PackedWeight::from_4bit(q.data, q.state));
}

torch::Tensor Linear4bitImpl::dequantize_weights() const {
  Quantized4bit q = packed_weight().to_4bit();
  q.state.dtype = torch::kFloat32;
  return dequantize_4bit(q.data, q.state);
}

Linear4bit Linear4bitImpl::from_linear(const torch::nn::Linear& linear,
                                       std::optional<Linear4bitOptions> options_) {
  TORCH_CHECK(!linear.is_empty(), "linear: expected a torch::nn::Linear, got an empty holder");
  const auto& lo = linear->options;
  Linear4bitOptions o = options_.value_or(Linear4bitOptions(lo.in_features(), lo.out_features()));
  o.in_features(lo.in_features()).out_features(lo.out_features()).bias(lo.bias());
  Linear4bit m(o);
  m->quantize_weights(linear->weight.detach());
  if (lo.bias()) {
    torch::NoGradGuard no_grad;
    m->bias.set_data(linear->bias.detach().to(torch::kFloat32).clone());
  }
  return m;
}

int64_t Linear4bitImpl::memory_bytes() const { return module_bytes(*this); }

std::vector<std::string> Linear4bitImpl::quantized_state_keys() const {
  std::vector<std::string> k =
      detail::keys_4bit(options.quant_type(), options.compress_statistics(), !options.symmetric());
  if (options.bias()) k.insert(k.begin() + 1, "bias");
  return k;
}

NamedTensors Linear4bitImpl::quantized_state() const {
  NamedTensors v = detail::state_4bit(packed_weight().to_4bit(), weight_dtype_, options.symmetric());
  if (bias.defined()) v.insert(v.begin() + 1, {"bias", bias.detach().clone()});
  return v;
}

void Linear4bitImpl::load_quantized_state(const std::map<std::string, torch::Tensor>& entries,
                                          const std::string& prefix) {
  torch::Dtype wdt = torch::kFloat32;
  const Quantized4bit q = detail::load_4bit(
      entries, prefix, options.quant_type(), options.effective_blocksize(), options.compress_statistics(),
      options.symmetric(), options.out_features(), options.in_features(), &wdt);
  torch::Tensor b;
  if (options.bias()) b = detail::load_bias(entries, prefix, options.out_features());
  const PackedWeight w = PackedWeight::from_4bit(q.data, q.state);  // validates again, repacks
  weight_dtype_ = wdt;
  set_packed(w);
  if (b.defined()) {
    torch::NoGradGuard no_grad;
    bias.set_data(b);
  }
}

void Linear4bitImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  detail::check_to_device(device, "msbnb::nn::Linear4bit");
  to(dtype, non_blocking);
}

void Linear4bitImpl::to(torch::Dtype dtype, bool non_blocking) {
  detail::check_to_dtype(dtype, "msbnb::nn::Linear4bit");
  convert_float(bias, dtype);
}

void Linear4bitImpl::to(torch::Device device, bool non_blocking) {
  detail::check_to_device(device, "msbnb::nn::Linear4bit");
}

namespace {
Linear4bit make_4bit(const char* qt, int64_t in, int64_t out, bool bias, bool cs,
                     std::optional<torch::Dtype> cd, std::optional<int64_t> bs) {
  return Linear4bit(Linear4bitOptions(in, out)
                        .bias(bias)
                        .quant_type(qt)
                        .compress_statistics(cs)
                        .compute_dtype(cd)
                        .blocksize(bs));
}
}  // namespace

Linear4bit LinearNF4(int64_t in_features, int64_t out_features, bool bias, bool compress_statistics,
                     std::optional<torch::Dtype> compute_dtype, std::optional<int64_t> blocksize) {
  return make_4bit("nf4", in_features, out_features, bias, compress_statistics, compute_dtype, blocksize);
}

Linear4bit LinearFP4(int64_t in_features, int64_t out_features, bool bias, bool compress_statistics,
                     std::optional<torch::Dtype> compute_dtype, std::optional<int64_t> blocksize) {
  return make_4bit("fp4", in_features, out_features, bias, compress_statistics, compute_dtype, blocksize);
}

}  // namespace msbnb::nn
