// LoraLayer: what the three LoRA layers share (msbnb/lora/lora.h), and the merge helpers.
#include <torch/nn/init.h>

#include <cmath>
#include <limits>

#include "common.h"
#include "msbnb/lora/lora.h"
#include "msbnb/nn/linear.h"

namespace msbnb::lora {

LoraLayer::LoraLayer(const LoraConfig& config, int64_t in_features, int64_t out_features)
    : config_(config), in_features_(in_features), out_features_(out_features) {
  config_.validate();
  TORCH_CHECK(in_features > 0, "in_features: expected a size > 0, got ", in_features);
  TORCH_CHECK(out_features > 0, "out_features: expected a size > 0, got ", out_features);
}

int64_t LoraLayer::lora_parameter_count() const { return r() * in_features_ + out_features_ * r(); }

void LoraLayer::register_lora(torch::nn::Module& self) {
  lora_A_ = self.register_module("lora_A",
                                 torch::nn::Linear(torch::nn::LinearOptions(in_features_, r()).bias(false)));
  lora_B_ = self.register_module("lora_B",
                                 torch::nn::Linear(torch::nn::LinearOptions(r(), out_features_).bias(false)));
  reset_lora_parameters();
}

void LoraLayer::reset_lora_parameters() {
  torch::NoGradGuard no_grad;
  if (config_.init() == "gaussian") {
    // PEFT's init_lora_weights="gaussian": nn.init.normal_(lora_A.weight, std=1 / r).
    torch::nn::init::normal_(lora_A_->weight, 0.0,
                             1.0 / static_cast<double>(r()));  // out of line: GCC 12 -O1 -fsanitize warns
                                                               // (maybe-uninitialized) inside Tensor::normal_
  } else {
    // PEFT's default: nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5)), torch Linear's init.
    torch::nn::init::kaiming_uniform_(lora_A_->weight, std::sqrt(5.0));
  }
  lora_B_->weight.zero_();
}

torch::Tensor LoraLayer::delta_weight() const {
  torch::NoGradGuard no_grad;
  const torch::Tensor A = lora_A_->weight.detach().to(torch::kFloat32);
  const torch::Tensor B = lora_B_->weight.detach().to(torch::kFloat32);
  return torch::matmul(B, A).mul_(scaling());
}

torch::Tensor LoraLayer::add_lora(const torch::Tensor& x, const torch::Tensor& base_out,
                                  bool training) const {
  if (merged_) return base_out;
  // PEFT's order: x in the adapters' dtype, dropout, A, B, scaling; the sum in that dtype, then
  // the base output's dtype.
  const torch::ScalarType dt = lora_A_->weight.scalar_type();
  torch::Tensor h = x.scalar_type() == dt ? x : x.to(dt);
  if (training && lora_dropout() > 0) h = torch::dropout(h, lora_dropout(), /*train=*/true);
  const torch::Tensor l = torch::linear(torch::linear(h, lora_A_->weight), lora_B_->weight) * scaling();
  if (base_out.scalar_type() == dt) return base_out + l;
  return (base_out.to(dt) + l).to(base_out.scalar_type());
}

void LoraLayer::pretty_print_lora(std::ostream& stream, const char* cls) const {
  stream << "msbnb::lora::" << cls << "(in_features=" << in_features_ << ", out_features=" << out_features_
         << ", r=" << r() << ", lora_alpha=" << lora_alpha() << ", scaling=" << scaling()
         << ", lora_dropout=" << lora_dropout() << ", use_rslora=" << std::boolalpha << use_rslora()
         << ", merged=" << merged_ << ")";
}

LoraLayer* as_lora_layer(torch::nn::Module& module) { return dynamic_cast<LoraLayer*>(&module); }
const LoraLayer* as_lora_layer(const torch::nn::Module& module) {
  return dynamic_cast<const LoraLayer*>(&module);
}

namespace detail {

MergeResult measure_merge(const std::string& base, bool requantized, const torch::Tensor& W0,
                          const torch::Tensor& delta, const torch::Tensor& W1) {
  torch::NoGradGuard no_grad;
  MergeResult r;
  r.base = base;
  r.requantized = requantized;
  // The float32 merge is the reference; the statistics in double.
  const torch::Tensor wm = (W0 + delta).to(torch::kDouble);
  const torch::Tensor w1 = W1.to(torch::kDouble);
  const torch::Tensor d = delta.to(torch::kDouble);
  const double wm_norm = wm.norm().item<double>();
  const double err_norm = (w1 - wm).norm().item<double>();
  r.relative_error =
      wm_norm > 0 ? err_norm / wm_norm : (err_norm > 0 ? std::numeric_limits<double>::infinity() : 0.0);
  r.max_abs_error = W1.numel() == 0 ? 0.0 : (w1 - wm).abs().max().item<double>();
  r.delta_norm = d.norm().item<double>();
  const double lost = ((w1 - W0.to(torch::kDouble)) - d).norm().item<double>();
  r.delta_relative_error = r.delta_norm > 0 ? lost / r.delta_norm : std::numeric_limits<double>::quiet_NaN();
  return r;
}

MergeResult merge_float(torch::Tensor& weight, const torch::Tensor& delta, const std::string& base) {
  torch::NoGradGuard no_grad;
  const torch::Tensor W0 = weight.detach().to(torch::kFloat32).clone();
  if (weight.scalar_type() == torch::kFloat32) {
    weight.add_(delta);
  } else {
    weight.copy_(W0 + delta);  // one rounding to the weight's dtype
  }
  return measure_merge(base, false, W0, delta, weight.detach().to(torch::kFloat32));
}

void unmerge_float(torch::Tensor& weight, const torch::Tensor& delta) {
  torch::NoGradGuard no_grad;
  if (weight.scalar_type() == torch::kFloat32) {
    weight.sub_(delta);
  } else {
    weight.copy_(weight.to(torch::kFloat32) - delta);
  }
}

std::vector<std::pair<std::string, torch::Tensor>> save_buffers(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& b : module.named_buffers(/*recurse=*/false))
    out.emplace_back(b.key(), b.value().detach().clone());
  return out;
}

void restore_buffers(torch::nn::Module& module,
                     const std::vector<std::pair<std::string, torch::Tensor>>& saved, const char* what) {
  auto buffers = module.named_buffers(/*recurse=*/false);
  TORCH_CHECK(buffers.size() == saved.size(), what, ": internal error: the base has ", buffers.size(),
              " buffers, ", saved.size(), " were saved at merge()");
  for (const auto& [name, t] : saved) {
    const torch::Tensor* b = buffers.find(name);
    TORCH_CHECK(b != nullptr && b->scalar_type() == t.scalar_type() && b->sizes() == t.sizes(), what,
                ": internal error: buffer ", name, " of the base does not match the one saved at merge()");
  }
  torch::NoGradGuard no_grad;
  for (const auto& [name, t] : saved) buffers[name].set_data(t);
}

std::string describe_base(const torch::nn::Module& module) {
  if (dynamic_cast<const torch::nn::LinearImpl*>(&module) != nullptr) return "Linear";
  if (const auto* l = dynamic_cast<const nn::Linear8bitImpl*>(&module)) {
    return l->is_quantized() ? "Linear8bit" : "Linear8bit(float weights)";
  }
  if (const auto* l = dynamic_cast<const nn::Linear4bitImpl*>(&module)) {
    return "Linear4bit(" + l->options.quant_type() + ")";
  }
  return "";
}

void check_merged(const LoraLayer& layer, bool expected, const char* fn) {
  TORCH_CHECK(
      layer.merged() == expected, fn, ": expected a LoRA layer that is ", expected ? "" : "not ",
      "merged, got one that is ", layer.merged() ? "already merged" : "not merged",
      expected ? " (call merge() first)" : " (merging twice would add the update twice; unmerge() first)");
}

}  // namespace detail
}  // namespace msbnb::lora
