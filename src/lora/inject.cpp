// wrap_with_lora, inject_lora, merge_lora / unmerge_lora, merge_and_unload / unload_lora
// (msbnb/lora/lora.h). The walk's building blocks are conversion's (src/convert/module_tree.h).
#include <algorithm>
#include <sstream>

#include "../convert/module_tree.h"
#include "common.h"
#include "msbnb/convert/convert.h"
#include "msbnb/lora/lora.h"

namespace msbnb::lora {

using torch::nn::Module;

namespace {

constexpr const char* kAllLinear = "all-linear";

bool is_linear_base(const Module& m) {
  return dynamic_cast<const torch::nn::LinearImpl*>(&m) != nullptr ||
         dynamic_cast<const nn::Linear8bitImpl*>(&m) != nullptr ||
         dynamic_cast<const nn::Linear4bitImpl*>(&m) != nullptr;
}

std::string list_str(const std::vector<std::string>& v) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < v.size(); ++i) o << (i ? ", " : "") << "\"" << v[i] << "\"";
  o << "]";
  return o.str();
}

}  // namespace

torch::nn::AnyModule wrap_with_lora(const std::shared_ptr<Module>& base, const LoraConfig& config) {
  TORCH_CHECK(base != nullptr, "wrap_with_lora: base: expected a linear layer, got nullptr");
  TORCH_CHECK(as_lora_layer(*base) == nullptr, "wrap_with_lora: base: expected a layer without LoRA, got a ",
              base->name(), " (it already has an adapter)");
  if (auto l = std::dynamic_pointer_cast<torch::nn::LinearImpl>(base)) {
    return torch::nn::AnyModule(LoRALinear(torch::nn::Linear(l), config));
  }
  if (auto l = std::dynamic_pointer_cast<nn::Linear8bitImpl>(base)) {
    return torch::nn::AnyModule(Linear8bitWithLoRA(nn::Linear8bit(l), config));
  }
  if (auto l = std::dynamic_pointer_cast<nn::Linear4bitImpl>(base)) {
    return torch::nn::AnyModule(Linear4bitWithLoRA(nn::Linear4bit(l), config));
  }
  TORCH_CHECK(
      false,
      "wrap_with_lora: base: expected torch::nn::Linear, msbnb::nn::Linear8bit or msbnb::nn::Linear4bit, "
      "got ",
      base->name());
}

// ---------------------------------------------------------------------------------------------
// report

int64_t LoraInjectionReport::lora_parameters() const {
  int64_t n = 0;
  for (const auto& w : wrapped) n += w.lora_parameters;
  return n;
}

const LoraInjectionReport::Wrapped* LoraInjectionReport::find(const std::string& name) const {
  auto it = std::find_if(wrapped.begin(), wrapped.end(), [&](const Wrapped& w) { return w.name == name; });
  return it == wrapped.end() ? nullptr : &*it;
}

std::ostream& operator<<(std::ostream& os, const LoraInjectionReport& r) {
  os << "LoRA injection: " << r.wrapped.size() << " layers, " << r.lora_parameters() << " LoRA parameters\n";
  for (const auto& w : r.wrapped) {
    os << "  wrapped  " << w.name << " (" << w.base << " " << w.in_features << " -> " << w.out_features
       << ", r=" << w.r << ", matched \"" << w.entry << "\"): " << w.lora_parameters << " parameters\n";
  }
  for (const auto& e : r.excluded) os << "  excluded " << e.name << " (matched \"" << e.entry << "\")\n";
  for (const auto& e : r.unmatched_target_entries)
    os << "  target entry \"" << e << "\" matched no linear layer\n";
  for (const auto& e : r.unmatched_exclude_entries)
    os << "  exclude entry \"" << e << "\" matched no module\n";
  return os;
}

// ---------------------------------------------------------------------------------------------
// inject

namespace {

struct Candidate {
  Module* parent = nullptr;
  std::string key, name, entry;
  std::shared_ptr<Module> child;
};

struct Walk {
  bool all_linear = false;
  msbnb::detail::NameList targets, exclude;
  std::vector<Candidate> found;
  std::vector<LoraInjectionReport::Excluded> excluded;
  std::vector<std::string> linear_names;  // every linear layer seen (for the "matched nothing" error)

  explicit Walk(const LoraConfig& c)
      : targets(c.target_modules(), "target_modules"), exclude(c.exclude_modules(), "exclude_modules") {}

  // A target entry without '*' that names `name` (not marked used), or nullptr.
  const std::string* plain_target(const std::string& name) const {
    if (all_linear) return nullptr;
    for (const auto& e : targets.entries()) {
      if (e.find('*') == std::string::npos && module_name_matches(name, e)) return &e;
    }
    return nullptr;
  }
  bool any_target(const std::string& name) const {
    if (all_linear) return true;
    return std::any_of(targets.entries().begin(), targets.entries().end(),
                       [&](const std::string& e) { return module_name_matches(name, e); });
  }

  void collect(Module& module, const std::string& prefix) {
    for (const auto& item : module.named_children()) {
      const std::string name = msbnb::detail::join_name(prefix, item.key());
      if (const std::string* e = exclude.match(name)) {
        excluded.push_back({name, *e});
        continue;
      }
      const std::shared_ptr<Module>& child = item.value();
      if (const LoraLayer* l = as_lora_layer(*child)) {
        TORCH_CHECK(
            !any_target(name), "inject_lora: module '", name, "' already has a LoRA adapter (", child->name(),
            ", r=", l->r(),
            "): injecting twice is not supported; call merge_and_unload or unload_lora first, or exclude "
            "it. Nothing was changed.");
        continue;  // its base is not a target
      }
      if (is_linear_base(*child)) {
        linear_names.push_back(name);
        if (all_linear) {
          // PEFT's all-linear leaves out the output layer.
          if (module_name_matches(name, "lm_head")) {
            excluded.push_back({name, "all-linear (output layer lm_head)"});
          } else {
            found.push_back({&module, item.key(), name, kAllLinear, child});
          }
        } else if (const std::string* e = targets.match(name)) {
          found.push_back({&module, item.key(), name, *e, child});
        }
        continue;
      }
      if (const std::string* e = plain_target(name)) {
        TORCH_CHECK(
            false, "inject_lora: target_modules entry \"", *e, "\" matched module '", name, "', a ",
            child->name(),
            ", expected a linear layer (torch::nn::Linear, msbnb::nn::Linear8bit, msbnb::nn::Linear4bit); "
            "name the linear layers inside it (a glob such as \"",
            *e, ".*\" selects only linear layers). Nothing was changed.");
      }
      collect(*child, name);
    }
  }
};

}  // namespace

LoraInjectionReport inject_lora(Module& model, const LoraConfig& config, const InjectOptions& options) {
  config.validate();
  const auto& t = config.target_modules();
  TORCH_CHECK(
      !t.empty(),
      "inject_lora: target_modules: expected module names, globs or {\"all-linear\"}, got an empty list");
  const bool all_linear = std::find(t.begin(), t.end(), kAllLinear) != t.end();
  TORCH_CHECK(!all_linear || t.size() == 1,
              "inject_lora: target_modules: expected \"all-linear\" alone, got ", list_str(t));
  TORCH_CHECK(!is_linear_base(model) && as_lora_layer(model) == nullptr,
              "inject_lora: model: expected a module holding layers, got a ", model.name(),
              " itself (it has no parent to be replaced in): use wrap_with_lora or the layer's from_linear");
  Walk walk(config);
  walk.all_linear = all_linear;
  walk.collect(model, "");

  LoraInjectionReport report;
  report.excluded = walk.excluded;
  report.unmatched_exclude_entries = walk.exclude.unused();
  if (!all_linear) report.unmatched_target_entries = walk.targets.unused();
  if (walk.found.empty()) {
    std::ostringstream names;
    for (size_t i = 0; i < walk.linear_names.size() && i < 8; ++i)
      names << (i ? ", " : "") << walk.linear_names[i];
    if (walk.linear_names.size() > 8) names << ", ... (" << walk.linear_names.size() << " in all)";
    TORCH_CHECK(false, "inject_lora: target_modules ", list_str(t), " matched no linear layer",
                walk.excluded.empty() ? "" : " (after exclude_modules)", "; the model's linear layers: ",
                walk.linear_names.empty() ? std::string("none") : names.str(), ". Nothing was changed.");
  }
  if (!options.allow_shared_modules()) {
    for (const auto& c : walk.found) {
      if (dynamic_cast<ChildReplaceHook*>(c.parent) != nullptr) continue;  // it refreshes its field
      TORCH_CHECK(
          !msbnb::detail::held_elsewhere(*c.parent, c.child), "inject_lora: layer '", c.name, "' (",
          c.child->name(), ") is also held outside its parent's children (use_count ", c.child.use_count(),
          "), e.g. by a ModuleHolder field or a handle the caller kept; that holder would keep running it "
          "without LoRA. Hold layers in Sequential / ModuleList / ModuleDict, look them up by name, "
          "implement msbnb::ChildReplaceHook, or pass InjectOptions().allow_shared_modules(true). Nothing "
          "was changed.");
    }
  }
  // Everything checked: wrap.
  for (auto& c : walk.found) {
    const std::string base = detail::describe_base(*c.child);
    torch::nn::AnyModule wrapped = wrap_with_lora(c.child, config);
    const LoraLayer* l = as_lora_layer(*wrapped.ptr());
    report.wrapped.push_back(
        {c.name, base, c.entry, l->in_features(), l->out_features(), l->r(), l->lora_parameter_count()});
    msbnb::detail::replace_child(*c.parent, c.key, c.child, wrapped);
    c.child.reset();
  }
  return report;
}

// ---------------------------------------------------------------------------------------------
// merge / unmerge / unload

namespace {

struct Found {
  Module* parent = nullptr;  // nullptr for the root
  std::string key, name;
  std::shared_ptr<Module> module;
  LoraLayer* layer = nullptr;
};

void find_lora(Module& module, const std::string& prefix, std::vector<Found>& out) {
  for (const auto& item : module.named_children()) {
    const std::string name = msbnb::detail::join_name(prefix, item.key());
    if (LoraLayer* l = as_lora_layer(*item.value())) {
      out.push_back({&module, item.key(), name, item.value(), l});
    } else {
      find_lora(*item.value(), name, out);
    }
  }
}

std::vector<Found> all_lora(Module& model) {
  std::vector<Found> out;
  if (LoraLayer* l = as_lora_layer(model)) {
    out.push_back({nullptr, "", "", nullptr, l});
    return out;
  }
  find_lora(model, "", out);
  return out;
}

torch::nn::AnyModule base_any(const Found& f) {
  if (auto* l = dynamic_cast<LoRALinearImpl*>(f.layer)) return torch::nn::AnyModule(l->base_layer());
  if (auto* l = dynamic_cast<Linear8bitWithLoRAImpl*>(f.layer)) return torch::nn::AnyModule(l->base_layer());
  if (auto* l = dynamic_cast<Linear4bitWithLoRAImpl*>(f.layer)) return torch::nn::AnyModule(l->base_layer());
  TORCH_CHECK(false, "unload: internal error: unknown LoRA layer ", f.module->name());
}

std::string display(const Found& f) { return f.name.empty() ? std::string("(root)") : f.name; }

void unload(Module& model, bool merge, const char* fn, ModelMergeReport* report) {
  TORCH_CHECK(as_lora_layer(model) == nullptr, fn, ": model: expected a module holding LoRA layers, got a ",
              model.name(), " itself (it has no parent to be replaced in): use its base_layer()");
  std::vector<Found> found = all_lora(model);
  for (auto& f : found) {
    if (merge && !f.layer->merged()) report->emplace_back(f.name, f.layer->merge());
    if (!merge && f.layer->merged()) f.layer->unmerge();
    msbnb::detail::replace_child(*f.parent, f.key, f.module, base_any(f));
  }
}

}  // namespace

ModelMergeReport merge_lora(Module& model) {
  std::vector<Found> found = all_lora(model);
  for (const auto& f : found) {
    TORCH_CHECK(
        !f.layer->merged(), "merge_lora: LoRA layer '", display(f),
        "' is already merged (merging twice would add its update twice); unmerge_lora first. Nothing was "
        "changed.");
  }
  ModelMergeReport report;
  for (auto& f : found) report.emplace_back(f.name, f.layer->merge());
  return report;
}

void unmerge_lora(Module& model) {
  std::vector<Found> found = all_lora(model);
  for (const auto& f : found) {
    TORCH_CHECK(f.layer->merged(), "unmerge_lora: LoRA layer '", display(f),
                "' is not merged; merge_lora first. Nothing was changed.");
  }
  for (auto& f : found) f.layer->unmerge();
}

ModelMergeReport merge_and_unload(Module& model) {
  ModelMergeReport report;
  unload(model, true, "merge_and_unload", &report);
  return report;
}

void unload_lora(Module& model) { unload(model, false, "unload_lora", nullptr); }

}  // namespace msbnb::lora
