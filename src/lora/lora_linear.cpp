// LoRALinear: LoRA over a torch::nn::Linear (msbnb/lora/lora.h).
#include "common.h"
#include "msbnb/lora/lora.h"

namespace msbnb::lora {

namespace {
const torch::nn::Linear& nonempty(const torch::nn::Linear& l, const char* arg) {
  TORCH_CHECK(!l.is_empty(), arg, ": expected a torch::nn::Linear, got an empty holder");
  return l;
}
}  // namespace

LoRALinearImpl::LoRALinearImpl(int64_t in_features, int64_t out_features, const LoraConfig& config)
    : LoRALinearImpl(torch::nn::LinearOptions(in_features, out_features), config) {}

LoRALinearImpl::LoRALinearImpl(const torch::nn::LinearOptions& base_options, const LoraConfig& config)
    : LoraLayer(config, base_options.in_features(), base_options.out_features()),
      base_options_(base_options) {
  reset();
}

LoRALinearImpl::LoRALinearImpl(const torch::nn::Linear& base, const LoraConfig& config)
    : LoraLayer(config, nonempty(base, "base")->options.in_features(),
                nonempty(base, "base")->options.out_features()),
      base_options_(base->options),
      adopt_(base) {
  reset();
}

void LoRALinearImpl::reset() {
  // The first reset() registers the base it was given; later ones (clone()) a new one.
  torch::nn::Linear base = adopt_.is_empty() ? torch::nn::Linear(base_options_) : adopt_;
  adopt_ = torch::nn::Linear(nullptr);
  base_ = register_module("base_layer", base);
  register_lora(*this);
}

void LoRALinearImpl::pretty_print(std::ostream& stream) const { pretty_print_lora(stream, "LoRALinear"); }

torch::Tensor LoRALinearImpl::forward(const torch::Tensor& x) {
  return add_lora(x, base_->forward(x), is_training());
}

LoRALinear LoRALinearImpl::from_linear(const torch::nn::Linear& linear, const LoraConfig& config) {
  return LoRALinear(nonempty(linear, "linear"), config);
}

torch::Tensor LoRALinearImpl::base_weight() const {
  return base_->weight.detach().to(torch::kFloat32).clone();
}

MergeResult LoRALinearImpl::merge() {
  detail::check_merged(*this, false, "LoRALinear::merge");
  MergeResult r = detail::merge_float(base_->weight, delta_weight(), "Linear");
  merged_ = true;
  return r;
}

void LoRALinearImpl::unmerge() {
  detail::check_merged(*this, true, "LoRALinear::unmerge");
  detail::unmerge_float(base_->weight, delta_weight());
  merged_ = false;
}

}  // namespace msbnb::lora
