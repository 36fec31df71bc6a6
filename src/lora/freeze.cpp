// freeze_model_except_lora, lora_info, print_lora_info (msbnb/lora/lora.h).
#include <iomanip>
#include <set>
#include <sstream>

#include "../convert/module_tree.h"
#include "common.h"
#include "msbnb/lora/lora.h"
#include "msbnb/nn/embedding.h"

namespace msbnb::lora {

using torch::nn::Module;

namespace {

const void* key(const torch::Tensor& t) { return t.unsafeGetTensorImpl(); }

// Every LoRA layer under `module` (walk order) with its dotted name; not walked into.
void lora_layers(const Module& module, const std::string& prefix,
                 std::vector<std::pair<std::string, const LoraLayer*>>& out) {
  if (const LoraLayer* l = as_lora_layer(module)) {
    out.emplace_back(prefix, l);
    return;
  }
  for (const auto& item : module.named_children())
    lora_layers(*item.value(), msbnb::detail::join_name(prefix, item.key()), out);
}

// Elements a quantized module's buffers stand for (the weights they encode), else 0.
int64_t quantized_weight_elements(const Module& m) {
  if (const auto* l = dynamic_cast<const nn::Linear8bitImpl*>(&m)) {
    return l->is_quantized() ? l->options.in_features() * l->options.out_features() : 0;
  }
  if (const auto* l = dynamic_cast<const nn::Linear4bitImpl*>(&m))
    return l->options.in_features() * l->options.out_features();
  if (const auto* e = dynamic_cast<const nn::Embedding8bitImpl*>(&m)) {
    return e->options.num_embeddings() * e->options.embedding_dim();
  }
  if (const auto* e = dynamic_cast<const nn::Embedding4bitImpl*>(&m)) {
    return e->options.num_embeddings() * e->options.embedding_dim();
  }
  return 0;
}

int64_t quantized_elements(const Module& m) {
  int64_t n = quantized_weight_elements(m);
  for (const auto& item : m.named_children()) n += quantized_elements(*item.value());
  return n;
}

std::string last_component(const std::string& name) {
  const size_t dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(dot + 1);
}

std::string thousands(int64_t v) {
  std::string s = std::to_string(v < 0 ? -v : v);
  for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3) s.insert(static_cast<size_t>(i), ",");
  return v < 0 ? "-" + s : s;
}

}  // namespace

std::ostream& operator<<(std::ostream& os, const FreezeReport& r) {
  return os << "frozen " << r.frozen_tensors << " tensors (" << r.frozen_elements << " elements), trainable "
            << r.trainable_tensors << " tensors (" << r.trainable_elements << " elements) in "
            << r.lora_layers << " LoRA layers";
}

FreezeReport freeze_model_except_lora(Module& model, const std::optional<std::string>& bias) {
  std::vector<std::pair<std::string, const LoraLayer*>> layers;
  lora_layers(model, "", layers);
  std::string mode = "none";
  if (bias) {
    mode = *bias;
  } else if (!layers.empty()) {
    mode = layers.front().second->lora_config().bias();
    for (const auto& [name, l] : layers) {
      TORCH_CHECK(l->lora_config().bias() == mode,
                  "freeze_model_except_lora: bias: the LoRA layers disagree ('", layers.front().first,
                  "' has \"", mode, "\", '", name, "' has \"", l->lora_config().bias(),
                  "\"); pass bias explicitly");
    }
  }
  TORCH_CHECK(mode == "none" || mode == "lora_only" || mode == "all",
              "freeze_model_except_lora: bias: expected \"none\", \"lora_only\" or \"all\", got \"", mode,
              "\"");

  std::set<const void*> trainable;
  for (const auto& [name, l] : layers) {
    trainable.insert(key(l->lora_A()));
    trainable.insert(key(l->lora_B()));
    if (mode == "lora_only") {
      for (const auto& p : l->base_module()->named_parameters(/*recurse=*/false)) {
        if (p.key() == "bias") trainable.insert(key(p.value()));
      }
    }
  }
  FreezeReport r;
  r.lora_layers = static_cast<int64_t>(layers.size());
  std::set<const void*> seen;  // a tied parameter counts once
  for (auto& p : model.named_parameters(/*recurse=*/true)) {
    if (!seen.insert(key(p.value())).second) continue;
    const bool train =
        trainable.count(key(p.value())) != 0 || (mode == "all" && last_component(p.key()) == "bias");
    p.value().requires_grad_(train);
    (train ? r.trainable_tensors : r.frozen_tensors) += 1;
    (train ? r.trainable_elements : r.frozen_elements) += p.value().numel();
  }
  return r;
}

double LoraInfo::trainable_percent() const {
  return total_parameters > 0
             ? 100.0 * static_cast<double>(trainable_parameters) / static_cast<double>(total_parameters)
             : 0.0;
}

LoraInfo lora_info(const Module& model) {
  LoraInfo info;
  std::vector<std::pair<std::string, const LoraLayer*>> layers;
  lora_layers(model, "", layers);
  for (const auto& [name, l] : layers) {
    LoraInfo::Layer e;
    e.name = name;
    e.base = detail::describe_base(*l->base_module());
    e.in_features = l->in_features();
    e.out_features = l->out_features();
    e.r = l->r();
    e.lora_alpha = l->lora_alpha();
    e.scaling = l->scaling();
    e.merged = l->merged();
    e.lora_parameters = l->lora_parameter_count();  // r · in + out · r
    info.lora_parameters += e.lora_parameters;
    info.layers.push_back(std::move(e));
  }
  std::set<const void*> seen;
  for (const auto& p : model.named_parameters(/*recurse=*/true)) {
    if (!seen.insert(key(p.value())).second) continue;
    info.total_parameters += p.value().numel();
    if (p.value().requires_grad()) info.trainable_parameters += p.value().numel();
  }
  info.total_parameters += quantized_elements(model);
  return info;
}

void print_lora_info(const Module& model, std::ostream& os) {
  const LoraInfo info = lora_info(model);
  os << "LoRA layers: " << info.layers.size() << "\n";
  for (const auto& l : info.layers) {
    os << "  " << (l.name.empty() ? "(root)" : l.name) << ": " << l.base << " " << l.in_features << " -> "
       << l.out_features << ", r=" << l.r << ", lora_alpha=" << l.lora_alpha << ", scaling=" << l.scaling
       << (l.merged ? ", merged" : "") << ", " << thousands(l.lora_parameters) << " LoRA parameters (" << l.r
       << "·" << l.in_features << " + " << l.out_features << "·" << l.r << ")\n";
  }
  std::ostringstream pct;
  pct << std::fixed << std::setprecision(4) << info.trainable_percent();
  os << "LoRA params: " << thousands(info.lora_parameters) << "\n";
  os << "trainable params: " << thousands(info.trainable_parameters)
     << " || all params: " << thousands(info.total_parameters) << " || trainable%: " << pct.str() << "\n";
}

}  // namespace msbnb::lora
