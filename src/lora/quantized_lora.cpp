// Linear8bitWithLoRA and Linear4bitWithLoRA: LoRA over the quantized layers (msbnb/lora/lora.h).
#include "common.h"
#include "msbnb/lora/lora.h"

namespace msbnb::lora {

namespace {
template <typename H>
const H& nonempty(const H& l, const char* arg, const char* type) {
  TORCH_CHECK(!l.is_empty(), arg, ": expected a ", type, ", got an empty holder");
  return l;
}

// The quantized merge both layers share: W1 = quantize(dequantize(W0) + delta) in the base's own
// format, the original buffers kept for unmerge(). `requantize(Wm)` quantizes into the base.
template <typename Impl, typename Requantize>
MergeResult merge_quantized(Impl& base, const torch::Tensor& delta, const std::string& name,
                            std::vector<std::pair<std::string, torch::Tensor>>& saved,
                            const Requantize& requantize) {
  torch::NoGradGuard no_grad;
  const torch::Tensor W0 = base.dequantize_weights();
  std::vector<std::pair<std::string, torch::Tensor>> original = detail::save_buffers(base);
  requantize(W0 + delta);  // throws (base unchanged) for a non-finite merged weight
  saved = std::move(original);
  return detail::measure_merge(name, true, W0, delta, base.dequantize_weights());
}
}  // namespace

// ---------------------------------------------------------------------------------------------
// Linear8bitWithLoRA

Linear8bitWithLoRAImpl::Linear8bitWithLoRAImpl(const nn::Linear8bitOptions& base_options,
                                               const LoraConfig& config)
    : LoraLayer(config, base_options.in_features(), base_options.out_features()),
      base_options_(base_options) {
  reset();
}

Linear8bitWithLoRAImpl::Linear8bitWithLoRAImpl(const nn::Linear8bit& base, const LoraConfig& config)
    : LoraLayer(config, nonempty(base, "base", "msbnb::nn::Linear8bit")->options.in_features(),
                nonempty(base, "base", "msbnb::nn::Linear8bit")->options.out_features()),
      base_options_(base->options),
      adopt_(base) {
  reset();
}

void Linear8bitWithLoRAImpl::reset() {
  nn::Linear8bit base = adopt_.is_empty() ? nn::Linear8bit(base_options_) : adopt_;
  adopt_ = nn::Linear8bit(nullptr);
  base_ = register_module("base_layer", base);
  register_lora(*this);
}

void Linear8bitWithLoRAImpl::pretty_print(std::ostream& stream) const {
  pretty_print_lora(stream, "Linear8bitWithLoRA");
}

torch::Tensor Linear8bitWithLoRAImpl::forward(const torch::Tensor& x) {
  return add_lora(x, base_->forward(x), is_training());
}

Linear8bitWithLoRA Linear8bitWithLoRAImpl::from_linear(const torch::nn::Linear& linear,
                                                       const LoraConfig& config,
                                                       std::optional<nn::Linear8bitOptions> base_options) {
  config.validate();  // before quantizing
  return Linear8bitWithLoRA(nn::Linear8bit::from_linear(linear, std::move(base_options)), config);
}

torch::Tensor Linear8bitWithLoRAImpl::base_weight() const { return base_->dequantize_weights(); }

MergeResult Linear8bitWithLoRAImpl::merge() {
  detail::check_merged(*this, false, "Linear8bitWithLoRA::merge");
  const torch::Tensor delta = delta_weight();
  MergeResult r;
  if (!base_->is_quantized()) {
    r = detail::merge_float(base_->weight, delta, detail::describe_base(*base_));
  } else {
    nn::Linear8bitImpl& b = *base_;
    r = merge_quantized(b, delta, "Linear8bit", saved_state_,
                        [&](const torch::Tensor& wm) { b.quantize_weights(wm); });
  }
  merged_ = true;
  return r;
}

void Linear8bitWithLoRAImpl::unmerge() {
  detail::check_merged(*this, true, "Linear8bitWithLoRA::unmerge");
  if (saved_state_.empty()) {
    detail::unmerge_float(base_->weight, delta_weight());
  } else {
    detail::restore_buffers(*base_, saved_state_, "Linear8bitWithLoRA::unmerge");
    saved_state_.clear();
  }
  merged_ = false;
}

// ---------------------------------------------------------------------------------------------
// Linear4bitWithLoRA

Linear4bitWithLoRAImpl::Linear4bitWithLoRAImpl(const nn::Linear4bitOptions& base_options,
                                               const LoraConfig& config)
    : LoraLayer(config, base_options.in_features(), base_options.out_features()),
      base_options_(base_options) {
  reset();
}

Linear4bitWithLoRAImpl::Linear4bitWithLoRAImpl(const nn::Linear4bit& base, const LoraConfig& config)
    : LoraLayer(config, nonempty(base, "base", "msbnb::nn::Linear4bit")->options.in_features(),
                nonempty(base, "base", "msbnb::nn::Linear4bit")->options.out_features()),
      base_options_(base->options),
      adopt_(base) {
  reset();
}

void Linear4bitWithLoRAImpl::reset() {
  nn::Linear4bit base = adopt_.is_empty() ? nn::Linear4bit(base_options_) : adopt_;
  adopt_ = nn::Linear4bit(nullptr);
  base_ = register_module("base_layer", base);
  register_lora(*this);
}

void Linear4bitWithLoRAImpl::pretty_print(std::ostream& stream) const {
  pretty_print_lora(stream, "Linear4bitWithLoRA");
}

torch::Tensor Linear4bitWithLoRAImpl::forward(const torch::Tensor& x) {
  return add_lora(x, base_->forward(x), is_training());
}

Linear4bitWithLoRA Linear4bitWithLoRAImpl::from_linear(const torch::nn::Linear& linear,
                                                       const LoraConfig& config,
                                                       std::optional<nn::Linear4bitOptions> base_options) {
  config.validate();
  return Linear4bitWithLoRA(nn::Linear4bit::from_linear(linear, std::move(base_options)), config);
}

torch::Tensor Linear4bitWithLoRAImpl::base_weight() const { return base_->dequantize_weights(); }

MergeResult Linear4bitWithLoRAImpl::merge() {
  detail::check_merged(*this, false, "Linear4bitWithLoRA::merge");
  nn::Linear4bitImpl& b = *base_;
  // Requantized from the merged weight in the dtype the base was quantized from (the quant
  // state's "dtype", as PEFT's merge does: dequantize_4bit gives that dtype), same options.
  const torch::ScalarType dtype = b.packed_weight().layout().dtype;
  MergeResult r = merge_quantized(b, delta_weight(), detail::describe_base(b), saved_state_,
                                  [&](const torch::Tensor& wm) { b.quantize_weights(wm.to(dtype)); });
  merged_ = true;
  return r;
}

void Linear4bitWithLoRAImpl::unmerge() {
  detail::check_merged(*this, true, "Linear4bitWithLoRA::unmerge");
  detail::restore_buffers(*base_, saved_state_, "Linear4bitWithLoRA::unmerge");
  saved_state_.clear();
  merged_ = false;
}

}  // namespace msbnb::lora
