// LoRA (low-rank adapters) on float and quantized linear layers, as PEFT's LoraModel: the layers
// LoRALinear (torch::nn::Linear base), Linear8bitWithLoRA (msbnb::nn::Linear8bit base) and
// Linear4bitWithLoRA (msbnb::nn::Linear4bit base, i.e. QLoRA), injection into a whole model by
// target module names, freezing, parameter counts, merge / unmerge and unload.
//
// THE LAYOUT (a contract: PEFT adapter files, msbnb's PEFT I/O and the examples rely on it).
// A LoRA layer registers exactly three children, in this order:
//   "base_layer"  the base: torch::nn::Linear, msbnb::nn::Linear8bit or msbnb::nn::Linear4bit
//   "lora_A"      torch::nn::Linear(in_features -> r, bias=false), weight [r, in_features]
//   "lora_B"      torch::nn::Linear(r -> out_features, bias=false), weight [out_features, r]
// and no parameters or buffers of its own. So a layer at dotted path p has the parameters
// `p.lora_A.weight`, `p.lora_B.weight` (PEFT's adapter keys, PEFT's layout: A [r, in],
// B [out, r]) and `p.base_layer.weight` / `p.base_layer.bias` (PEFT >= 0.7's names of the base)
// or, for a quantized base, its buffers `p.base_layer.weight_codes`, ...
//
// forward(x) = base_layer(x) + scaling · lora_B(lora_A(dropout(x)))
//   scaling = lora_alpha / r (use_rslora: lora_alpha / sqrt(r)); dropout is active in train()
//   mode only (torch::dropout with p = lora_dropout, skipped for 0).
//   dtypes: the LoRA branch runs in the adapters' dtype (float32 unless to(dtype) converted
//   them): x is converted to it, base_layer(x) is added in that dtype and the sum converted to
//   the base output's dtype (PEFT's order). The base runs in x's dtype (Linear8bit / Linear4bit
//   take float32, float16 and bfloat16; a torch::nn::Linear base needs x in its weight's dtype).
//   While merged(), forward is base_layer(x) alone (the update is in the base weight).
//
// Training (QLoRA): gradients reach lora_A, lora_B and x; through a quantized base they flow by
// its fused transposed product (msbnb::quantized_matmul's backward); its packed buffers never
// require grad. freeze_model_except_lora() freezes everything else.
//
// Merging adds ΔW = scaling · B·A (float32 [out, in]) to the base weight:
//  - float base (torch::nn::Linear, or Linear8bit still holding float weights): W += ΔW in
//    float32 (a float16 / bfloat16 weight: (float32(W) + ΔW) rounded to its dtype); unmerge()
//    subtracts ΔW computed again from the current A and B (exact up to float rounding: one
//    rounding in each direction).
//  - quantized base: W' = quantize(dequantize(W) + ΔW) in the base's own format and options
//    (Linear4bit: quant_type, blocksize, double quantization, the original weight dtype;
//    Linear8bit: row absmax int8). The rounding is measured and returned (MergeResult). The
//    original quantized tensors are kept while merged, and unmerge() puts them back: the base's
//    buffers are then bit-identical to before merge() (nothing is requantized twice).
//
// Errors are c10::Error naming the argument, what was expected and what came.
#pragma once
#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cstdint>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "msbnb/nn/linear.h"

namespace msbnb::lora {

// ---------------------------------------------------------------------------------------------
// Configuration

/// LoRA hyper-parameters (PEFT's LoraConfig names and defaults) and, for inject_lora, the
/// modules to adapt.
///  r                rank, > 0 (PEFT default 8)
///  lora_alpha       > 0 and finite (PEFT default 8)
///  lora_dropout     in [0, 1) (default 0)
///  use_rslora       scaling alpha / sqrt(r) instead of alpha / r (rank-stabilized LoRA)
///  init             "kaiming" (PEFT's default init_lora_weights=True: A as torch::nn::Linear's
///                   default init, Kaiming-uniform with a = sqrt(5); B zeros) | "gaussian"
///                   (PEFT's init_lora_weights="gaussian": A normal with std 1 / r; B zeros)
///  target_modules   inject_lora only: module names, dot-boundary tails ("q_proj" matches
///                   "layers.0.attn.q_proj") or globs ('*' matches any run, dots included:
///                   "layers.*.mlp.*_proj"); or {"all-linear"}: every Linear / Linear8bit /
///                   Linear4bit except a module named lm_head (PEFT's rule). Matching rules as
///                   convert.h's skip list (msbnb::module_name_matches).
///  exclude_modules  inject_lora only: same matching; an excluded module is skipped with
///                   everything below it.
///  bias             "none" (default) | "lora_only" (freeze_model_except_lora keeps the bias of
///                   each LoRA layer's base trainable) | "all" (every parameter named "bias"
///                   trainable). As PEFT's bias option.
/// Example:
///   auto cfg = msbnb::lora::LoraConfig().r(16).lora_alpha(32).lora_dropout(0.05)
///                  .target_modules({"q_proj", "v_proj"});
struct LoraConfig {
  /// lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.
  double scaling() const;
  /// Checks the layer fields (r, lora_alpha, lora_dropout, init, bias); throws c10::Error
  /// naming the field, what was expected and what came. Target / exclude entries are checked by
  /// inject_lora.
  void validate() const;

  TORCH_ARG(int64_t, r) = 8;
  TORCH_ARG(double, lora_alpha) = 8.0;
  TORCH_ARG(double, lora_dropout) = 0.0;
  TORCH_ARG(bool, use_rslora) = false;
  TORCH_ARG(std::string, init) = "kaiming";
  TORCH_ARG(std::vector<std::string>, target_modules) = {};
  TORCH_ARG(std::vector<std::string>, exclude_modules) = {};
  TORCH_ARG(std::string, bias) = "none";
};
/// libtorch-style name of the same options.
using LoRAOptions = LoraConfig;

// ---------------------------------------------------------------------------------------------
// The interface every LoRA layer implements

/// What merge() did to the base weight. W0: the base weight before merging (dequantized, float32),
/// ΔW = scaling · B·A (float32), Wm = W0 + ΔW (the exact float merge), W1: the base weight after
/// merging (dequantized, float32).
///  base                  "Linear", "Linear8bit" or "Linear4bit(nf4)" (the base's format)
///  requantized           true for a quantized base (W1 = dequant(quant(Wm))), false for a float one
///  relative_error        ||W1 - Wm||_F / ||Wm||_F (0 for a float32 base)
///  max_abs_error         max |W1 - Wm|
///  delta_relative_error  ||(W1 - W0) - ΔW||_F / ||ΔW||_F: how much of the update the rounding
///                        lost or distorted (float32 base: only the add's rounding, at most
///                        u·||Wm||_F / ||ΔW||_F with u = 2^-24; NaN when ΔW is 0)
///  delta_norm            ||ΔW||_F
struct MergeResult {
  std::string base;
  bool requantized = false;
  double relative_error = 0, max_abs_error = 0, delta_relative_error = 0, delta_norm = 0;
};
std::ostream& operator<<(std::ostream& os, const MergeResult& r);

/// Implemented by LoRALinear, Linear8bitWithLoRA and Linear4bitWithLoRA (not a torch module:
/// find one with dynamic_cast<msbnb::lora::LoraLayer*>(module.get()) or as_lora_layer()).
class LoraLayer {
 public:
  virtual ~LoraLayer() = default;

  /// The layer's config (its target / exclude lists are whatever it was built with).
  const LoraConfig& lora_config() const { return config_; }
  int64_t r() const { return config_.r(); }
  double lora_alpha() const { return config_.lora_alpha(); }
  double lora_dropout() const { return config_.lora_dropout(); }
  bool use_rslora() const { return config_.use_rslora(); }
  /// lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.
  double scaling() const { return config_.scaling(); }
  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }
  /// r · in_features + out_features · r: the elements of lora_A and lora_B.
  int64_t lora_parameter_count() const;

  /// The parameter `lora_A.weight` [r, in_features] (the tensor itself, not a copy).
  torch::Tensor lora_A() const { return lora_A_->weight; }
  /// The parameter `lora_B.weight` [out_features, r].
  torch::Tensor lora_B() const { return lora_B_->weight; }
  torch::nn::Linear lora_A_module() const { return lora_A_; }
  torch::nn::Linear lora_B_module() const { return lora_B_; }

  /// The child "base_layer".
  virtual std::shared_ptr<torch::nn::Module> base_module() const = 0;
  /// "Linear", "Linear8bit" or "Linear4bit".
  virtual std::string base_type() const = 0;
  /// The base weight as float32 [out_features, in_features] (dequantized for a quantized base).
  virtual torch::Tensor base_weight() const = 0;
  /// ΔW = scaling · B·A as float32 [out_features, in_features] (no grad).
  torch::Tensor delta_weight() const;

  /// Re-initializes lora_A and lora_B by the config's init (B zeros: the layer computes its base).
  void reset_lora_parameters();

  bool merged() const { return merged_; }
  /// Adds ΔW into the base weight (rules at the top of this header). Throws if already merged.
  virtual MergeResult merge() = 0;
  /// Takes ΔW out again (a quantized base gets its original tensors back, bit-identical).
  /// Throws if not merged.
  virtual void unmerge() = 0;

 protected:
  LoraLayer(const LoraConfig& config, int64_t in_features, int64_t out_features);
  /// Registers lora_A and lora_B on `self` (after base_layer) and initializes them.
  void register_lora(torch::nn::Module& self);
  /// base_out + scaling · B(A(dropout(x))) with the dtype rules above; base_out alone if merged.
  torch::Tensor add_lora(const torch::Tensor& x, const torch::Tensor& base_out, bool training) const;
  void pretty_print_lora(std::ostream& stream, const char* cls) const;

  LoraConfig config_;
  int64_t in_features_ = 0, out_features_ = 0;
  torch::nn::Linear lora_A_{nullptr}, lora_B_{nullptr};
  bool merged_ = false;
  /// Quantized base while merged: its original tensors (quantized_state()), put back by unmerge().
  std::vector<std::pair<std::string, torch::Tensor>> saved_state_;
};

// ---------------------------------------------------------------------------------------------
// Layers

class LoRALinear;

/// LoRA over a torch::nn::Linear. The base is trainable like any torch Linear until
/// freeze_model_except_lora() (or requires_grad_(false)) freezes it.
/// Example:
///   msbnb::lora::LoRALinear fc(512, 256, msbnb::lora::LoraConfig().r(8).lora_alpha(16));
///   torch::Tensor y = fc->forward(torch::randn({4, 512}));  // [4, 256], equals fc->base_layer()(x) at init
class LoRALinearImpl : public torch::nn::Cloneable<LoRALinearImpl>, public LoraLayer {
 public:
  /// A fresh torch::nn::Linear(in_features, out_features) (with bias) as base.
  LoRALinearImpl(int64_t in_features, int64_t out_features, const LoraConfig& config = {});
  /// A fresh torch::nn::Linear(base_options) as base.
  explicit LoRALinearImpl(const torch::nn::LinearOptions& base_options, const LoraConfig& config = {});
  /// Wraps `base` itself (shared, not copied). Throws for an empty holder or a bad config.
  explicit LoRALinearImpl(const torch::nn::Linear& base, const LoraConfig& config = {});

  /// Registers base_layer (a new torch::nn::Linear of the base's options), lora_A, lora_B.
  void reset() override;
  /// `msbnb::lora::LoRALinear(in_features=512, out_features=256, r=8, lora_alpha=16, scaling=2,
  /// lora_dropout=0, use_rslora=false, merged=false)` (children follow, as torch prints them).
  void pretty_print(std::ostream& stream) const override;
  torch::Tensor forward(const torch::Tensor& x);

  /// Wraps `linear` itself (as PEFT wraps the module it finds).
  static LoRALinear from_linear(const torch::nn::Linear& linear, const LoraConfig& config = {});

  torch::nn::Linear base_layer() const { return base_; }
  std::shared_ptr<torch::nn::Module> base_module() const override { return base_.ptr(); }
  std::string base_type() const override { return "Linear"; }
  torch::Tensor base_weight() const override;
  MergeResult merge() override;
  void unmerge() override;

 private:
  torch::nn::LinearOptions base_options_;
  torch::nn::Linear base_{nullptr};
  torch::nn::Linear adopt_{nullptr};  // consumed by the first reset(): the base to wrap
};

class LoRALinear : public torch::nn::ModuleHolder<LoRALinearImpl> {
 public:
  using torch::nn::ModuleHolder<LoRALinearImpl>::ModuleHolder;
  using Impl = LoRALinearImpl;
  static LoRALinear from_linear(const torch::nn::Linear& linear, const LoraConfig& config = {}) {
    return LoRALinearImpl::from_linear(linear, config);
  }
};

class Linear8bitWithLoRA;

/// LoRA over an msbnb::nn::Linear8bit (LLM.int8() base, frozen int8 weights).
/// Example:
///   auto q = msbnb::lora::Linear8bitWithLoRA::from_linear(torch::nn::Linear(512, 256),
///                                                       msbnb::lora::LoraConfig().r(8));
class Linear8bitWithLoRAImpl : public torch::nn::Cloneable<Linear8bitWithLoRAImpl>, public LoraLayer {
 public:
  /// A fresh Linear8bit(base_options) as base (zeros until its weights are quantized or loaded).
  explicit Linear8bitWithLoRAImpl(const nn::Linear8bitOptions& base_options, const LoraConfig& config = {});
  /// Wraps `base` itself (shared, not copied).
  explicit Linear8bitWithLoRAImpl(const nn::Linear8bit& base, const LoraConfig& config = {});

  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  torch::Tensor forward(const torch::Tensor& x);

  /// Quantizes `linear` (nn::Linear8bit::from_linear with `base_options`) and wraps the result.
  static Linear8bitWithLoRA from_linear(const torch::nn::Linear& linear, const LoraConfig& config = {},
                                        std::optional<nn::Linear8bitOptions> base_options = std::nullopt);

  nn::Linear8bit base_layer() const { return base_; }
  std::shared_ptr<torch::nn::Module> base_module() const override { return base_.ptr(); }
  std::string base_type() const override { return "Linear8bit"; }
  torch::Tensor base_weight() const override;
  MergeResult merge() override;
  void unmerge() override;

 private:
  nn::Linear8bitOptions base_options_;
  nn::Linear8bit base_{nullptr};
  nn::Linear8bit adopt_{nullptr};
};

class Linear8bitWithLoRA : public torch::nn::ModuleHolder<Linear8bitWithLoRAImpl> {
 public:
  using torch::nn::ModuleHolder<Linear8bitWithLoRAImpl>::ModuleHolder;
  using Impl = Linear8bitWithLoRAImpl;
  static Linear8bitWithLoRA from_linear(const torch::nn::Linear& linear, const LoraConfig& config = {},
                                        std::optional<nn::Linear8bitOptions> base_options = std::nullopt) {
    return Linear8bitWithLoRAImpl::from_linear(linear, config, std::move(base_options));
  }
};

class Linear4bitWithLoRA;

/// LoRA over an msbnb::nn::Linear4bit (QLoRA: nf4 / fp4 / int4 frozen weights).
/// Example:
///   auto q = msbnb::lora::Linear4bitWithLoRA::from_linear(
///       torch::nn::Linear(512, 256), msbnb::lora::LoraConfig().r(8).lora_alpha(16),
///       msbnb::nn::Linear4bitOptions(512, 256).quant_type("nf4"));  // double quant by default
///   torch::Tensor y = q->forward(torch::randn({4, 512}, torch::kBFloat16));  // bf16 [4, 256]
class Linear4bitWithLoRAImpl : public torch::nn::Cloneable<Linear4bitWithLoRAImpl>, public LoraLayer {
 public:
  explicit Linear4bitWithLoRAImpl(const nn::Linear4bitOptions& base_options, const LoraConfig& config = {});
  explicit Linear4bitWithLoRAImpl(const nn::Linear4bit& base, const LoraConfig& config = {});

  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  torch::Tensor forward(const torch::Tensor& x);

  /// Quantizes `linear` (nn::Linear4bit::from_linear with `base_options`: default Linear4bit's
  /// defaults, i.e. fp4 as bitsandbytes; pass quant_type("nf4") for QLoRA) and wraps the result.
  static Linear4bitWithLoRA from_linear(const torch::nn::Linear& linear, const LoraConfig& config = {},
                                        std::optional<nn::Linear4bitOptions> base_options = std::nullopt);

  nn::Linear4bit base_layer() const { return base_; }
  std::shared_ptr<torch::nn::Module> base_module() const override { return base_.ptr(); }
  std::string base_type() const override { return "Linear4bit"; }
  torch::Tensor base_weight() const override;
  MergeResult merge() override;
  void unmerge() override;

 private:
  nn::Linear4bitOptions base_options_;
  nn::Linear4bit base_{nullptr};
  nn::Linear4bit adopt_{nullptr};
};

class Linear4bitWithLoRA : public torch::nn::ModuleHolder<Linear4bitWithLoRAImpl> {
 public:
  using torch::nn::ModuleHolder<Linear4bitWithLoRAImpl>::ModuleHolder;
  using Impl = Linear4bitWithLoRAImpl;
  static Linear4bitWithLoRA from_linear(const torch::nn::Linear& linear, const LoraConfig& config = {},
                                        std::optional<nn::Linear4bitOptions> base_options = std::nullopt) {
    return Linear4bitWithLoRAImpl::from_linear(linear, config, std::move(base_options));
  }
};

/// LoRA on any supported base, wrapping it (shared, not copied): a torch::nn::Linear gives a
/// LoRALinear, an nn::Linear8bit a Linear8bitWithLoRA, an nn::Linear4bit a Linear4bitWithLoRA.
/// Anything else (a LoRA layer included) throws, naming its type.
/// Example:
///   torch::nn::AnyModule m = msbnb::lora::wrap_with_lora(msbnb::nn::LinearNF4(64, 64).ptr(), cfg);
///   torch::Tensor y = m.forward(x);
torch::nn::AnyModule wrap_with_lora(const std::shared_ptr<torch::nn::Module>& base, const LoraConfig& config);

/// The module as a LoraLayer, or nullptr.
LoraLayer* as_lora_layer(torch::nn::Module& module);
const LoraLayer* as_lora_layer(const torch::nn::Module& module);

// ---------------------------------------------------------------------------------------------
// Whole models

/// Walk options of inject_lora beyond the config.
///  allow_shared_modules  wrap a layer that something besides its parent also holds (a
///                        ModuleHolder field, a kept handle): that holder keeps running the layer
///                        without LoRA. Default: throw, naming it (convert.h explains why).
struct InjectOptions {
  TORCH_ARG(bool, allow_shared_modules) = false;
};

/// What inject_lora did.
///  wrapped                     the layers wrapped, in walk order (dotted name, base type such as
///                              "Linear4bit(nf4)", the target entry that matched, sizes)
///  excluded                    modules matched by exclude_modules (with the entry)
///  unmatched_target_entries    target entries that matched no linear layer
///  unmatched_exclude_entries   exclude entries that matched no module
struct LoraInjectionReport {
  struct Wrapped {
    std::string name, base, entry;
    int64_t in_features = 0, out_features = 0, r = 0;
    int64_t lora_parameters = 0;  // r · in + out · r
  };
  struct Excluded {
    std::string name, entry;
  };
  std::vector<Wrapped> wrapped;
  std::vector<Excluded> excluded;
  std::vector<std::string> unmatched_target_entries, unmatched_exclude_entries;

  int64_t lora_parameters() const;
  /// The entry of `name`, or nullptr.
  const Wrapped* find(const std::string& name) const;
};
std::ostream& operator<<(std::ostream& os, const LoraInjectionReport& report);

/// Wraps, in place, every linear layer (torch::nn::Linear, nn::Linear8bit, nn::Linear4bit) of
/// `model` matched by config.target_modules and not by config.exclude_modules (rules: LoraConfig)
/// with its LoRA layer (wrap_with_lora). The walk, the container handling (Sequential /
/// ModuleList / ModuleDict keep running the new layers), the shared-layer check and
/// msbnb::ChildReplaceHook are convert.h's. A LoRA layer is not walked into.
/// Throws c10::Error, before changing anything, for: a bad config; empty target_modules or an
/// empty entry; a plain-name target entry (no '*') matching a module that is not a linear layer
/// (a glob only selects linear layers); a target matching a layer that already has LoRA
/// (injecting twice: merge_and_unload / unload_lora first); a shared layer (see InjectOptions);
/// no layer matched at all (the message lists the entries). The root itself must not be a
/// linear layer (use wrap_with_lora). Entries that match nothing while others match are reported.
/// Example:
///   auto report = msbnb::lora::inject_lora(*model, LoraConfig().r(8).target_modules({"all-linear"}));
///   std::cout << report;
LoraInjectionReport inject_lora(torch::nn::Module& model, const LoraConfig& config,
                                const InjectOptions& options = {});
template <typename M>
LoraInjectionReport inject_lora(const torch::nn::ModuleHolder<M>& model, const LoraConfig& config,
                                const InjectOptions& options = {}) {
  return inject_lora(*model.ptr(), config, options);
}

/// Counts after freeze_model_except_lora (parameters only; the quantized layers' buffers are
/// never trainable and are not counted).
struct FreezeReport {
  int64_t trainable_tensors = 0, frozen_tensors = 0;
  int64_t trainable_elements = 0, frozen_elements = 0;
  int64_t lora_layers = 0;
};
std::ostream& operator<<(std::ostream& os, const FreezeReport& report);

/// Sets requires_grad = false on every parameter of `model` except lora_A / lora_B of its LoRA
/// layers (and biases per `bias`: "none", "lora_only" — the biases of the LoRA layers' bases —,
/// "all" — every parameter named "bias"). Unset `bias`: the LoRA layers' config().bias() (they
/// must agree; "none" without LoRA layers). Clears nothing else (grads stay as they are).
/// Throws for an unknown bias value or disagreeing layers.
FreezeReport freeze_model_except_lora(torch::nn::Module& model,
                                      const std::optional<std::string>& bias = std::nullopt);
template <typename M>
FreezeReport freeze_model_except_lora(const torch::nn::ModuleHolder<M>& model,
                                      const std::optional<std::string>& bias = std::nullopt) {
  return freeze_model_except_lora(*model.ptr(), bias);
}

/// Parameter counts of a model with LoRA layers.
///  layers                one entry per LoRA layer, walk order
///  lora_parameters       Σ r · in + out · r over the layers
///  trainable_parameters  elements of parameters with requires_grad
///  total_parameters      elements of all parameters, plus out · in for each quantized linear
///                        layer's weight and num_embeddings · dim for each quantized embedding
///                        (their codes are buffers: counted as the weights they stand for, as
///                        PEFT's print_trainable_parameters counts 4-bit weights)
struct LoraInfo {
  struct Layer {
    std::string name, base;
    int64_t in_features = 0, out_features = 0, r = 0;
    double lora_alpha = 0, scaling = 0;
    bool merged = false;
    int64_t lora_parameters = 0;
  };
  std::vector<Layer> layers;
  int64_t lora_parameters = 0, trainable_parameters = 0, total_parameters = 0;
  /// 100 · trainable_parameters / total_parameters (0 for an empty model).
  double trainable_percent() const;
};
LoraInfo lora_info(const torch::nn::Module& model);
/// Prints lora_info(model): a line per LoRA layer, then
/// "trainable params: 1,234 || all params: 56,789 || trainable%: 2.1730" (PEFT's line).
void print_lora_info(const torch::nn::Module& model, std::ostream& os = std::cout);

/// merge() of every LoRA layer, walk order: (dotted name, result). Throws, before merging
/// anything, if a layer is already merged.
using ModelMergeReport = std::vector<std::pair<std::string, MergeResult>>;
ModelMergeReport merge_lora(torch::nn::Module& model);
/// unmerge() of every LoRA layer. Throws, before changing anything, if one is not merged.
void unmerge_lora(torch::nn::Module& model);

/// PEFT's merge_and_unload(): merges every LoRA layer not yet merged, then replaces each LoRA
/// layer by its base_layer in its parent (containers and ChildReplaceHook handled as by
/// inject_lora). A quantized base stays quantized (merged, requantized). Returns the merges done.
ModelMergeReport merge_and_unload(torch::nn::Module& model);
/// PEFT's unload(): unmerges merged layers, then replaces each LoRA layer by its base_layer
/// (the adapters are dropped).
void unload_lora(torch::nn::Module& model);

}  // namespace msbnb::lora

namespace msbnb::nn {
// The layers under the names DESIGN.md lists for msbnb::nn.
using lora::Linear4bitWithLoRA;
using lora::Linear8bitWithLoRA;
using lora::LoRALinear;
}  // namespace msbnb::nn
