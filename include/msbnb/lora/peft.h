// PEFT adapter files: a model's LoRA adapters saved and loaded in the layout Hugging Face PEFT
// writes with `save_pretrained` and reads with `PeftModel.from_pretrained` (docs/peft.md).
//
// A folder holds two files:
//   adapter_model.safetensors  `<prefix><module path>.lora_A.weight` [r, in] and `.lora_B.weight`
//                              [out, r] for every LoRA layer (msbnb/lora/lora.h's layout is
//                              PEFT's: no transposes), in the adapters' dtype, metadata
//                              {"format": "pt"}; with bias "all" / "lora_only" also the biases
//                              PEFT saves for that option (`<prefix><path>.base_layer.bias`, ...).
//   adapter_config.json        PEFT's LoraConfig as PEFT writes it (json.dumps(indent=2,
//                              sort_keys=True)): peft_type "LORA", r, lora_alpha, lora_dropout,
//                              target_modules, bias, use_rslora, init_lora_weights,
//                              fan_in_fan_out false, base_model_name_or_path, task_type, and
//                              PEFT's other fields at their defaults, so PEFT loads it silently.
//
// THE PREFIX. PEFT's keys are the PeftModel's parameter names without the adapter name: the
// LoraModel wrapper adds `base_model.model.` in front of the module paths of the model it wraps
// (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` for a LlamaForCausalLM).
// save_adapter writes that prefix (SaveAdapterOptions::key_prefix) in front of the msbnb module
// paths (dotted names from the root of the model passed in); load_adapter strips
// `base_model.model.` from every key that has it and takes keys without it as module paths, so
// files of either form load. Build the C++ model with the same dotted names as the Python one
// (children "model", "layers", "0", ...) and the keys line up.
//
// Both files are written atomically (msbnb/io/atomic_file.h), the weights first, then the
// config: a crash leaves each file old or new, never partial (the pair can be one old, one new;
// load_adapter then finds a mismatch and says so rather than loading garbage).
//
// Errors are c10::Error naming the file, the key or field, what was expected and what came.
#pragma once
#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "msbnb/lora/lora.h"

namespace msbnb::lora {

/// The PEFT key prefix of a PeftModel wrapping a model ("base_model.model.").
inline constexpr const char* kPeftKeyPrefix = "base_model.model.";
inline constexpr const char* kAdapterWeightsFile = "adapter_model.safetensors";
inline constexpr const char* kAdapterConfigFile = "adapter_config.json";

/// adapter_config.json as msbnb reads and writes it (PEFT's LoraConfig fields).
///  r, lora_alpha, lora_dropout, use_rslora, bias   as LoraConfig (lora.h)
///  init_lora_weights      "true" (PEFT's default True: Kaiming A, zero B; LoraConfig init
///                         "kaiming"), "false", or a PEFT string such as "gaussian"
///  target_modules         a list of names (PEFT: a module matches if its path equals an entry
///                         or ends with "." + entry), or, with target_modules_is_regex, one
///                         regular expression that must match the whole path (PEFT's str form;
///                         "all-linear" is PEFT's special string: every linear layer but lm_head)
///  exclude_modules        the same forms (PEFT >= 0.14), empty: none
///  rank_pattern, alpha_pattern  per-module r / lora_alpha, keyed by a name or regular
///                         expression matched against the end of the path ("(.*\.)?(key)" must
///                         match the whole path), the first key in file (sorted) order wins (PEFT 0.21.2
///                         get_pattern_key)
///  base_model_name_or_path, revision, task_type   "" is written and read as null
///  inference_mode         PEFT writes true from save_pretrained
///  peft_type              always "LORA" (anything else is refused on load)
///  unknown                the fields of the file msbnb does not interpret (name -> JSON text),
///                         kept so a config read and written again keeps them
using RankPattern = std::vector<std::pair<std::string, int64_t>>;
using AlphaPattern = std::vector<std::pair<std::string, double>>;
using JsonFields = std::map<std::string, std::string>;

struct AdapterConfig {
  TORCH_ARG(int64_t, r) = 8;
  TORCH_ARG(double, lora_alpha) = 8.0;
  TORCH_ARG(double, lora_dropout) = 0.0;
  TORCH_ARG(bool, use_rslora) = false;
  TORCH_ARG(std::string, bias) = "none";
  TORCH_ARG(std::string, init_lora_weights) = "true";
  TORCH_ARG(std::vector<std::string>, target_modules) = {};
  TORCH_ARG(bool, target_modules_is_regex) = false;
  TORCH_ARG(std::vector<std::string>, exclude_modules) = {};
  TORCH_ARG(bool, exclude_modules_is_regex) = false;
  TORCH_ARG(RankPattern, rank_pattern) = {};
  TORCH_ARG(AlphaPattern, alpha_pattern) = {};
  TORCH_ARG(std::string, base_model_name_or_path) = "";
  TORCH_ARG(std::string, revision) = "";
  TORCH_ARG(std::string, task_type) = "";
  TORCH_ARG(bool, inference_mode) = true;
  TORCH_ARG(std::string, peft_type) = "LORA";
  TORCH_ARG(JsonFields, unknown) = {};

 public:
  /// r and lora_alpha of the module at dotted `path` (rank_pattern / alpha_pattern applied).
  int64_t r_for(const std::string& path) const;
  double lora_alpha_for(const std::string& path) const;
  /// The LoraConfig of the module at `path` (its r, alpha, dropout, rslora, init, bias).
  LoraConfig lora_config_for(const std::string& path) const;
};

/// Parses adapter_config.json text; `source` names it in messages. Refuses malformed JSON,
/// duplicate keys, a peft_type other than "LORA", wrong field types, r <= 0, a non-finite or
/// non-positive lora_alpha, lora_dropout outside [0, 1), bias other than none / all /
/// lora_only, regular expressions std::regex cannot compile, and the PEFT features msbnb does
/// not implement when they are set (use_dora, fan_in_fan_out, modules_to_save,
/// layers_to_transform, layer_replication, trainable_token_indices, target_parameters,
/// lora_bias, use_qalora, alora_invocation_tokens, megatron_config, arrow_config, kasa_config,
/// monteclora_config, velora_config, use_bdlora, lora_ga_config; each named in the message).
AdapterConfig parse_adapter_config(const std::string& json_text,
                                   const std::string& source = "adapter_config.json");
/// Reads `path`, a file or a folder holding adapter_config.json.
AdapterConfig read_adapter_config(const std::string& path);
/// The text save_adapter writes: PEFT's fields (the version docs/peft.md names) at their
/// defaults, overridden by config.unknown() and then by `config`, sorted, indent 2, no final
/// newline: PEFT's json.dumps(indent=2, sort_keys=True), byte for byte.
std::string adapter_config_json(const AdapterConfig& config);

/// What save_adapter writes beyond the model's layers.
///  base_model_name_or_path, revision, task_type  (task_type e.g. "CAUSAL_LM"; "" = null)
///  target_modules       the config's target_modules; empty: derived from the LoRA layers —
///                       their last name components (sorted, unique: "q_proj", "v_proj") when
///                       those match exactly the LoRA layers among the model's linear layers,
///                       else their full paths
///  target_modules_regex one regular expression written instead of the list (PEFT's str form,
///                       e.g. "all-linear" or ".*\\.(q|v)_proj"); it must select exactly the
///                       LoRA layers among the linear layers (checked)
///  key_prefix           written in front of every module path (default "base_model.model.")
///  exclude_modules / exclude_modules_regex   written as PEFT's exclude_modules (also applied in
///                       the "selects exactly the LoRA layers" check)
///  r, lora_alpha        the config's global values; unset: those of the first LoRA layer (walk
///                       order)
///  rank_pattern, alpha_pattern  unset: layers whose r / lora_alpha differ from the global one get
///                       an entry keyed by their full path, regex-escaped; set: written as given,
///                       and every layer must have the r / lora_alpha they give it (checked)
///  init_lora_weights    unset: "true" ("kaiming" layers) or "gaussian", from the first layer
///  extra_fields         more fields (name -> JSON text), written over PEFT's defaults (e.g.
///                       AdapterConfig::unknown() of a config read, such as auto_mapping)
/// from_config(c) takes all of these from a config read (save what was loaded, unchanged).
struct SaveAdapterOptions {
  static SaveAdapterOptions from_config(const AdapterConfig& config);

  TORCH_ARG(std::string, base_model_name_or_path) = "";
  TORCH_ARG(std::string, revision) = "";
  TORCH_ARG(std::string, task_type) = "";
  TORCH_ARG(std::vector<std::string>, target_modules) = {};
  TORCH_ARG(std::string, target_modules_regex) = "";
  TORCH_ARG(std::string, key_prefix) = kPeftKeyPrefix;
  TORCH_ARG(std::optional<int64_t>, r) = std::nullopt;
  TORCH_ARG(std::optional<double>, lora_alpha) = std::nullopt;
  TORCH_ARG(std::vector<std::string>, exclude_modules) = {};
  TORCH_ARG(std::string, exclude_modules_regex) = "";
  TORCH_ARG(std::optional<RankPattern>, rank_pattern) = std::nullopt;
  TORCH_ARG(std::optional<AlphaPattern>, alpha_pattern) = std::nullopt;
  TORCH_ARG(JsonFields, extra_fields) = {};
  TORCH_ARG(std::optional<std::string>, init_lora_weights) = std::nullopt;
};

/// The adapter tensors of `model` as save_adapter writes them (key -> tensor, sorted; the
/// tensors themselves, not copies) and the config it writes. Throws if the model has no LoRA
/// layer, if a layer is merged (its A / B are in the base weight: unmerge first), if layers
/// disagree on use_rslora, lora_dropout or bias, or the target options do not select exactly
/// the LoRA layers.
std::pair<std::vector<std::pair<std::string, torch::Tensor>>, AdapterConfig> adapter_state(
    const torch::nn::Module& model, const SaveAdapterOptions& options = {});

/// Writes `dir`/adapter_model.safetensors and `dir`/adapter_config.json (creates `dir` and its
/// parents). Throws as adapter_state, or for an I/O error (the previous files stay intact).
/// Example:
///   msbnb::lora::inject_lora(*model, msbnb::lora::LoraConfig().r(8).target_modules({"q_proj", "v_proj"}));
///   // ... train ...
///   msbnb::lora::save_adapter(*model, "out/adapter",
///       msbnb::lora::SaveAdapterOptions().base_model_name_or_path("meta-llama/Llama-3.2-1B").task_type("CAUSAL_LM"));
void save_adapter(const torch::nn::Module& model, const std::string& dir,
                  const SaveAdapterOptions& options = {});
template <typename M>
void save_adapter(const torch::nn::ModuleHolder<M>& model, const std::string& dir,
                  const SaveAdapterOptions& options = {}) {
  save_adapter(*model.ptr(), dir, options);
}

/// load_adapter's options.
///  inject                a model without LoRA layers gets them first, by the config's
///                        target_modules / exclude_modules / rank_pattern / alpha_pattern (as
///                        PEFT's from_pretrained), in the model's train / eval mode;
///                        false: such a model is an error
///  allow_shared_modules  passed to inject_lora (InjectOptions)
struct LoadAdapterOptions {
  TORCH_ARG(bool, inject) = true;
  TORCH_ARG(bool, allow_shared_modules) = false;
};

/// What load_adapter did.
///  config     the adapter_config.json read
///  injected   LoRA layers were injected (the model had none); injection: inject_lora's reports
///  loaded     the file's keys (as written in the file) that were copied, sorted
struct AdapterLoadReport {
  AdapterConfig config;
  bool injected = false;
  std::vector<LoraInjectionReport> injection;
  std::vector<std::string> loaded;
};

/// Loads `dir` (adapter_model.safetensors + adapter_config.json) into `model`.
/// Checks, before changing the model: the config (parse_adapter_config); that every tensor of
/// the file is floating point (F16, BF16, F32, F64) and finite; that the model's LoRA layers (or
/// those the config would inject) have the config's r, lora_alpha and use_rslora; and that the
/// file's keys are exactly those layers' lora_A / lora_B (plus bias keys that name a bias of the
/// model, for bias "all" / "lora_only") with equal shapes. Any mismatch throws ONE c10::Error
/// listing every missing key, every extra key and every shape that differs (expected vs found);
/// the model is then unchanged (an injection done for this call is undone). The values are
/// copied into the existing parameters, converted to their dtype and device.
/// Example:
///   auto report = msbnb::lora::load_adapter(*model, "out/adapter");  // injects if needed
AdapterLoadReport load_adapter(torch::nn::Module& model, const std::string& dir,
                               const LoadAdapterOptions& options = {});
template <typename M>
AdapterLoadReport load_adapter(const torch::nn::ModuleHolder<M>& model, const std::string& dir,
                               const LoadAdapterOptions& options = {}) {
  return load_adapter(*model.ptr(), dir, options);
}

/// The linear layers (torch::nn::Linear, nn::Linear8bit, nn::Linear4bit, and LoRA layers, by
/// their own path) of `model` that `config`'s target_modules / exclude_modules select, by PEFT's
/// rules (AdapterConfig), in walk order.
std::vector<std::string> select_target_modules(const torch::nn::Module& model, const AdapterConfig& config);

}  // namespace msbnb::lora
