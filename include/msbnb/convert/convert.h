// Model conversion: replace every torch::nn::Linear (and, if the config asks, Embedding) of a
// model with its msbnb quantized counterpart, and report what was converted.
//
// The walk. Every module of the tree is visited from the root, children in registration order;
// a child's dotted name is its parent's name + "." + its key ("layers.0.mlp.down_proj").
// A torch::nn::Linear / Embedding child is replaced in its parent; other modules are walked
// into. Quantized msbnb layers are left as they are (converting twice is a no-op).
//
// Skip list (modules_to_not_convert). An entry matches a module if it equals the module's
// dotted name, or a tail of it that starts after a dot ("lm_head" matches "model.lm_head",
// not "model.my_lm_head"). An entry holding '*' is a glob, matched the same way (whole name or
// a dot-boundary tail); '*' matches any run of characters, dots included ("layers.*.down_proj"
// matches "model.layers.3.mlp.down_proj"). A matched module is skipped with everything below
// it ("encoder" keeps the whole encoder in float). Empty entries are refused. Entries that
// match nothing are listed in the report (a typo should not pass silently).
//
// Replacing a child. Containers keep their own list of modules beside the children map that
// replace_module() updates: Sequential (its AnyModule list, which forward() runs),
// ModuleList and ModuleDict. Conversion updates both, so their forward() runs the quantized
// layers. A custom module that keeps a child in a field (`torch::nn::Linear fc{nullptr};
// fc = register_module("fc", ...)`) has a problem no library can solve from outside: the field
// still points to the float layer after replace_module(), and its forward() would keep
// running it. Conversion detects this (the layer is held by something besides its parent) and
// throws, naming the layer, before changing anything. Write convertible models one of these
// ways: put the layers in a Sequential / ModuleList / ModuleDict, or look children up by name
// in forward() (`named_children()["fc"]`, or a torch::nn::AnyModule field refreshed below), or
// derive the module from msbnb::ChildReplaceHook to update the field when its child is
// replaced. ConvertOptions::allow_shared_modules(true) converts such layers anyway (the field
// keeps the float layer; the in-place form then cannot free it).
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "msbnb/convert/config.h"
#include "msbnb/convert/size.h"

namespace msbnb {

/// Implemented by a custom module that keeps children in fields: conversion calls it after
/// replacing child `name` (already done in the children map), so the module can point its field
/// at `replacement`. Example:
///   struct NetImpl : torch::nn::Cloneable<NetImpl>, msbnb::ChildReplaceHook {
///     torch::nn::AnyModule fc;
///     void reset() override { fc = torch::nn::AnyModule(register_module("fc", torch::nn::Linear(4, 4))); }
///     void child_replaced(const std::string& name, const torch::nn::AnyModule& m) override {
///       if (name == "fc") fc = m;
///     }
///     torch::Tensor forward(torch::Tensor x) { return fc.forward(x); }
///   };
class ChildReplaceHook {
 public:
  virtual ~ChildReplaceHook() = default;
  virtual void child_replaced(const std::string& name, const torch::nn::AnyModule& replacement) = 0;
};

/// Options beyond the skip list.
///  modules_to_not_convert  the skip list (rules at the top of this header).
///  allow_shared_modules    convert a layer that something besides its parent also holds (a
///                          ModuleHolder field, a handle the caller kept) instead of throwing.
struct ConvertOptions {
  TORCH_ARG(std::vector<std::string>, modules_to_not_convert) = {};
  TORCH_ARG(bool, allow_shared_modules) = false;
};

/// One converted layer.
///  name          dotted path; from: "Linear" | "Embedding"; format: the config's quant_type
///  shape         the float weight's shape ([out, in], or [num_embeddings, dim])
///  bytes_before  the float layer's parameters + buffers; bytes_after: the quantized layer's
///                (codes, statistics, bias)
///  shared        held outside its parent too (only with allow_shared_modules)
struct ConvertedLayer {
  std::string name, from, format;
  std::vector<int64_t> shape;
  int64_t bytes_before = 0, bytes_after = 0;
  bool shared = false;
};

/// What a conversion did.
///  converted              the layers replaced, in walk order
///  skipped                modules matched by the skip list (the matched module, not those
///                         below it), in walk order, each with the entry that matched it
///  unmatched_skip_entries skip-list entries that matched no module
struct ConversionReport {
  struct Skipped {
    std::string name, entry;
  };
  std::string config;  // QuantConfig::describe()
  std::vector<ConvertedLayer> converted;
  std::vector<Skipped> skipped;
  std::vector<std::string> unmatched_skip_entries;

  int64_t bytes_before() const;
  int64_t bytes_after() const;
  /// The entry of `name`, or nullptr.
  const ConvertedLayer* find(const std::string& name) const;
};
std::ostream& operator<<(std::ostream& os, const ConversionReport& report);

/// A new model and what was converted.
struct ConvertedModel {
  std::shared_ptr<torch::nn::Module> model;
  ConversionReport report;
  /// The model as its concrete type, e.g. `as<torch::nn::SequentialImpl>()`; throws c10::Error
  /// if it is not one.
  template <typename T>
  std::shared_ptr<T> as() const {
    auto p = std::dynamic_pointer_cast<T>(model);
    TORCH_CHECK(p != nullptr, "ConvertedModel::as: the model is not a ", c10::demangle(typeid(T).name()));
    return p;
  }
};

/// Skip-list matching on its own (the rules at the top of this header): whether `entry`
/// matches the module named `name`.
bool module_name_matches(const std::string& name, const std::string& entry);

/// Copying form: clones `model` (torch::nn::Module::clone(), deep: the input keeps its float
/// weights and stays usable) and converts the clone. Every module of the tree must be Cloneable
/// (torch::nn::Cloneable<T>, as torch's own modules are); otherwise throws c10::Error naming the
/// first module that is not, and pointing at the in-place form. A root that is itself a Linear
/// (Embedding) is returned converted. The copy keeps the input's child names (libtorch's
/// Sequential::clone() renames children "0", "1", ...; conversion puts the names back). Peak
/// memory: the float model twice plus the quantized one.
/// Throws c10::Error for an invalid config or skip entry, before doing anything.
/// Example:
///   auto out = msbnb::convert_to_quantized_model(model, msbnb::Int4Config().quant_type("nf4"), {"lm_head"});
///   auto cmp = msbnb::compare_model_sizes(*model, *out.model);
ConvertedModel convert_to_quantized_model(const std::shared_ptr<torch::nn::Module>& model,
                                          const QuantConfig& config,
                                          const std::vector<std::string>& modules_to_not_convert = {});
ConvertedModel convert_to_quantized_model(const std::shared_ptr<torch::nn::Module>& model,
                                          const QuantConfig& config, const ConvertOptions& options);
template <typename M>
ConvertedModel convert_to_quantized_model(const torch::nn::ModuleHolder<M>& model, const QuantConfig& config,
                                          const std::vector<std::string>& modules_to_not_convert = {}) {
  return convert_to_quantized_model(model.ptr(), config, modules_to_not_convert);
}

/// In-place form: converts `model` itself, one layer at a time; each float layer is released as
/// soon as its quantized replacement is in place, so memory falls as it goes and the peak is
/// the float model plus one quantized layer. Works for modules that are not Cloneable. The root
/// must not itself be a Linear / Embedding (it has no parent to be replaced in). Throws
/// c10::Error (config, skip entries, shared layers) before changing anything.
ConversionReport convert_to_quantized_model_inplace(
    torch::nn::Module& model, const QuantConfig& config,
    const std::vector<std::string>& modules_to_not_convert = {});
ConversionReport convert_to_quantized_model_inplace(torch::nn::Module& model, const QuantConfig& config,
                                                    const ConvertOptions& options);

/// The general walk (the seed package's replace_linear_layers): in place, replaces every
/// torch::nn::Linear not matched by the skip list with what `factory(name, linear)` returns
/// (any module with a forward(Tensor), wrapped in an AnyModule). Returning an empty AnyModule
/// keeps the layer. Returns the dotted names replaced, in walk order. Same container handling,
/// shared-layer check and skip rules as convert_to_quantized_model_inplace.
/// Example:
///   msbnb::replace_linear_layers(*model, [](const std::string&, const torch::nn::Linear& l) {
///     return torch::nn::AnyModule(msbnb::nn::Linear8bit::from_linear(l));
///   });
using LinearFactory =
    std::function<torch::nn::AnyModule(const std::string& name, const torch::nn::Linear& linear)>;
std::vector<std::string> replace_linear_layers(torch::nn::Module& model, const LinearFactory& factory,
                                               const ConvertOptions& options = {});

}  // namespace msbnb
