#include "msbnb/convert/convert.h"

#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>

#include <algorithm>
#include <sstream>
#include <utility>

#include "layers.h"
#include "module_tree.h"

namespace msbnb {

using torch::nn::Module;

// ---------------------------------------------------------------------------------------------
// skip-list matching

namespace {

// Whole-string glob: '*' matches any run of characters (dots included), everything else itself.
bool glob_match(const char* s, const char* p) {
  const char* star = nullptr;
  const char* retry = nullptr;
  while (*s != '\0') {
    if (*p == '*') {
      star = p++;
      retry = s;
    } else if (*p == *s) {
      ++p;
      ++s;
    } else if (star != nullptr) {
      p = star + 1;
      s = ++retry;
    } else {
      return false;
    }
  }
  while (*p == '*') ++p;
  return *p == '\0';
}

bool whole_match(const std::string& name, const std::string& entry) {
  if (entry.find('*') == std::string::npos) return name == entry;
  return glob_match(name.c_str(), entry.c_str());
}

}  // namespace

bool module_name_matches(const std::string& name, const std::string& entry) {
  if (entry.empty()) return false;
  if (whole_match(name, entry)) return true;
  // Tails that start after a dot: "a.b.c" -> "b.c", "c".
  for (size_t dot = name.find('.'); dot != std::string::npos; dot = name.find('.', dot + 1)) {
    if (whole_match(name.substr(dot + 1), entry)) return true;
  }
  return false;
}

namespace {

// modules_to_not_convert.
struct SkipList : detail::NameList {
  explicit SkipList(const std::vector<std::string>& e) : detail::NameList(e, "modules_to_not_convert") {}
};

enum class Kind { linear, embedding };

struct Candidate {
  Module* parent = nullptr;
  std::string key, name;
  std::shared_ptr<Module> child;
  Kind kind = Kind::linear;
};

void collect(Module& module, const std::string& prefix, bool embeddings, SkipList& skip,
             std::vector<Candidate>& out, std::vector<ConversionReport::Skipped>& skipped) {
  for (const auto& item : module.named_children()) {
    const std::string name = detail::join_name(prefix, item.key());
    if (const std::string* entry = skip.match(name)) {
      skipped.push_back({name, *entry});
      continue;
    }
    const std::shared_ptr<Module>& child = item.value();
    if (dynamic_cast<torch::nn::LinearImpl*>(child.get()) != nullptr) {
      out.push_back({&module, item.key(), name, child, Kind::linear});
    } else if (embeddings && dynamic_cast<torch::nn::EmbeddingImpl*>(child.get()) != nullptr) {
      out.push_back({&module, item.key(), name, child, Kind::embedding});
    } else {
      collect(*child, name, embeddings, skip, out, skipped);
    }
  }
}

bool held_elsewhere(const Candidate& c) { return detail::held_elsewhere(*c.parent, c.child); }

void check_not_shared(const std::vector<Candidate>& candidates, const ConvertOptions& options,
                      const char* fn) {
  if (options.allow_shared_modules()) return;
  for (const auto& c : candidates) {
    if (dynamic_cast<ChildReplaceHook*>(c.parent) != nullptr) continue;  // it refreshes its field
    TORCH_CHECK(!held_elsewhere(c), fn, ": layer '", c.name, "' (", c.child->name(),
                ") is also held outside its parent's children (use_count ", c.child.use_count(),
                "), e.g. by a ModuleHolder field or a handle the caller kept; after replacement that holder "
                "would still run the float layer. Hold layers in Sequential / ModuleList / ModuleDict, look "
                "them up by name, implement msbnb::ChildReplaceHook, or pass "
                "ConvertOptions().allow_shared_modules(true). Nothing was changed.");
  }
}

using Build = std::function<torch::nn::AnyModule(const Candidate&)>;

// Collects, checks, then replaces one layer at a time, releasing each float layer as it goes.
// Returns the candidates' names with the replaced ones' bytes in `report` (if given).
std::vector<std::string> walk_and_replace(Module& model, bool embeddings, const ConvertOptions& options,
                                          const Build& build, const char* fn, ConversionReport* report) {
  SkipList skip(options.modules_to_not_convert());
  std::vector<Candidate> candidates;
  std::vector<ConversionReport::Skipped> skipped;
  collect(model, "", embeddings, skip, candidates, skipped);
  check_not_shared(candidates, options, fn);

  std::vector<std::string> replaced;
  for (auto& c : candidates) {
    torch::nn::AnyModule replacement = build(c);
    if (replacement.is_empty()) {
      c.child.reset();
      continue;
    }
    if (report != nullptr) {
      ConvertedLayer layer;
      layer.name = c.name;
      layer.from = c.kind == Kind::linear ? "Linear" : "Embedding";
      layer.format = detail::quantized_format(*replacement.ptr());
      const auto weight = c.kind == Kind::linear
                              ? std::dynamic_pointer_cast<torch::nn::LinearImpl>(c.child)->weight
                              : std::dynamic_pointer_cast<torch::nn::EmbeddingImpl>(c.child)->weight;
      layer.shape = weight.sizes().vec();
      layer.bytes_before = get_model_size(*c.child).total_bytes;
      layer.bytes_after = get_model_size(*replacement.ptr()).total_bytes;
      report->converted.push_back(std::move(layer));
    }
    detail::replace_child(*c.parent, c.key, c.child, replacement);
    // Replaced everywhere the parent keeps it: any other reference is a holder we cannot reach.
    if (report != nullptr) report->converted.back().shared = c.child.use_count() > 1;
    c.child.reset();  // the float layer goes now, not at the end of the walk
    replaced.push_back(c.name);
  }
  if (report != nullptr) {
    report->skipped = std::move(skipped);
    report->unmatched_skip_entries = skip.unused();
  }
  return replaced;
}

// SequentialImpl::clone() re-registers the cloned modules under their indices ("0", "1", ...),
// dropping the names given at construction: copy the original's names back, so the skip list,
// the report and the converted model use the names of the model the caller passed.
void restore_child_names(const Module& original, Module& copy) {
  const auto names = original.named_children();
  const auto kids = copy.named_children();
  TORCH_CHECK(names.size() == kids.size(), "convert_to_quantized_model: the clone of ", original.name(),
              " has ", kids.size(), " children, expected ", names.size(),
              " (a reset() that registers other children?)");
  bool same = true;
  for (size_t i = 0; i < names.size(); ++i) same = same && names[i].key() == kids[i].key();
  if (!same) {
    // Unregister all, then register in order under the original names: the order is kept, and a
    // container's own module list (which forward() runs) is untouched.
    for (size_t i = 0; i < kids.size(); ++i) copy.unregister_module(kids[i].key());
    for (size_t i = 0; i < kids.size(); ++i) copy.register_module(names[i].key(), kids[i].value());
  }
  for (size_t i = 0; i < names.size(); ++i) restore_child_names(*names[i].value(), *kids[i].value());
}

torch::nn::AnyModule build_quantized(const Candidate& c, const QuantConfig& config) {
  if (c.kind == Kind::linear) {
    return detail::quantize_linear(
        torch::nn::Linear(std::dynamic_pointer_cast<torch::nn::LinearImpl>(c.child)), config);
  }
  return detail::quantize_embedding(
      torch::nn::Embedding(std::dynamic_pointer_cast<torch::nn::EmbeddingImpl>(c.child)), config);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// report

int64_t ConversionReport::bytes_before() const {
  int64_t s = 0;
  for (const auto& l : converted) s += l.bytes_before;
  return s;
}

int64_t ConversionReport::bytes_after() const {
  int64_t s = 0;
  for (const auto& l : converted) s += l.bytes_after;
  return s;
}

const ConvertedLayer* ConversionReport::find(const std::string& name) const {
  auto it = std::find_if(converted.begin(), converted.end(),
                         [&](const ConvertedLayer& l) { return l.name == name; });
  return it == converted.end() ? nullptr : &*it;
}

std::ostream& operator<<(std::ostream& os, const ConversionReport& r) {
  os << "conversion (" << r.config << "): " << r.converted.size() << " layers, " << r.bytes_before() << " -> "
     << r.bytes_after() << " bytes\n";
  for (const auto& l : r.converted) {
    os << "  converted " << l.name << " (" << l.from << " " << c10::IntArrayRef(l.shape) << ") -> "
       << l.format << ": " << l.bytes_before << " -> " << l.bytes_after << " bytes"
       << (l.shared ? " [shared]" : "") << "\n";
  }
  for (const auto& s : r.skipped) os << "  skipped   " << s.name << " (matched \"" << s.entry << "\")\n";
  for (const auto& e : r.unmatched_skip_entries) os << "  skip entry \"" << e << "\" matched no module\n";
  return os;
}

// ---------------------------------------------------------------------------------------------
// entry points

ConversionReport convert_to_quantized_model_inplace(Module& model, const QuantConfig& config,
                                                    const ConvertOptions& options) {
  config.validate();
  TORCH_CHECK(dynamic_cast<torch::nn::LinearImpl*>(&model) == nullptr &&
                  dynamic_cast<torch::nn::EmbeddingImpl*>(&model) == nullptr,
              "convert_to_quantized_model_inplace: model: expected a module holding layers, got a ",
              model.name(),
              " itself (it has no parent to be replaced in): use convert_to_quantized_model or the layer's "
              "from_linear / from_embedding");
  ConversionReport report;
  report.config = config.describe();
  walk_and_replace(
      model, config.convert_embeddings(), options,
      [&](const Candidate& c) { return build_quantized(c, config); }, "convert_to_quantized_model_inplace",
      &report);
  return report;
}

ConversionReport convert_to_quantized_model_inplace(Module& model, const QuantConfig& config,
                                                    const std::vector<std::string>& modules_to_not_convert) {
  return convert_to_quantized_model_inplace(model, config,
                                            ConvertOptions().modules_to_not_convert(modules_to_not_convert));
}

ConvertedModel convert_to_quantized_model(const std::shared_ptr<Module>& model, const QuantConfig& config,
                                          const ConvertOptions& options) {
  TORCH_CHECK(model != nullptr, "convert_to_quantized_model: model: expected a module, got nullptr");
  config.validate();
  SkipList check_entries(options.modules_to_not_convert());  // throws on bad entries before the copy
  ConvertedModel out;
  out.report.config = config.describe();
  // A bare layer is its own replacement.
  const bool linear = dynamic_cast<torch::nn::LinearImpl*>(model.get()) != nullptr;
  const bool embedding =
      config.convert_embeddings() && dynamic_cast<torch::nn::EmbeddingImpl*>(model.get()) != nullptr;
  if (linear || embedding) {
    SkipList skip(options.modules_to_not_convert());
    out.report.unmatched_skip_entries = skip.unused();
    Candidate c{nullptr, "", "", model, linear ? Kind::linear : Kind::embedding};
    torch::nn::AnyModule q = build_quantized(c, config);
    ConvertedLayer layer;
    layer.from = linear ? "Linear" : "Embedding";
    layer.format = detail::quantized_format(*q.ptr());
    layer.shape = linear ? std::dynamic_pointer_cast<torch::nn::LinearImpl>(model)->weight.sizes().vec()
                         : std::dynamic_pointer_cast<torch::nn::EmbeddingImpl>(model)->weight.sizes().vec();
    layer.bytes_before = get_model_size(*model).total_bytes;
    layer.bytes_after = get_model_size(*q.ptr()).total_bytes;
    out.report.converted.push_back(layer);
    out.model = q.ptr();
    return out;
  }
  try {
    out.model = model->clone();
    restore_child_names(*model, *out.model);
  } catch (const c10::Error& e) {
    TORCH_CHECK(
        false,
        "convert_to_quantized_model: model: expected a Cloneable module tree (the copying form "
        "deep-copies it with torch::nn::Module::clone()), but cloning failed: ",
        e.what_without_backtrace(),
        " Derive custom modules from torch::nn::Cloneable<T> with a reset() that registers every child, "
        "or convert in place with convert_to_quantized_model_inplace.");
  }
  walk_and_replace(
      *out.model, config.convert_embeddings(), options,
      [&](const Candidate& c) { return build_quantized(c, config); }, "convert_to_quantized_model",
      &out.report);
  return out;
}

ConvertedModel convert_to_quantized_model(const std::shared_ptr<Module>& model, const QuantConfig& config,
                                          const std::vector<std::string>& modules_to_not_convert) {
  return convert_to_quantized_model(model, config,
                                    ConvertOptions().modules_to_not_convert(modules_to_not_convert));
}

std::vector<std::string> replace_linear_layers(Module& model, const LinearFactory& factory,
                                               const ConvertOptions& options) {
  TORCH_CHECK(static_cast<bool>(factory),
              "replace_linear_layers: factory: expected a callable, got an empty function");
  return walk_and_replace(
      model, false, options,
      [&](const Candidate& c) {
        return factory(c.name, torch::nn::Linear(std::dynamic_pointer_cast<torch::nn::LinearImpl>(c.child)));
      },
      "replace_linear_layers", nullptr);
}

}  // namespace msbnb
