// What every quantized msbnb::nn module has in common: its format, its bytes, and its part of a
// checkpoint in the bitsandbytes / Hugging Face key layout (DESIGN.md "Checkpoint keys").
// quantized_state_dict / load_quantized_state_dict (msbnb/nn/state_dict.h) walk a model and
// call these on each module that implements them (dynamic_cast<const QuantizedModule*>).
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace msbnb::nn {

/// Named tensors in a fixed order (a checkpoint, or what a module contributes to one).
using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

/// Interface of Linear8bit, Linear4bit, Embedding8bit and Embedding4bit (not a torch module).
/// Keys are relative to the module ("weight", "weight.absmax", "bias", "SCB", ...); the walker
/// in state_dict.h prefixes the module's dotted path.
class QuantizedModule {
 public:
  virtual ~QuantizedModule() = default;

  /// "int8", "nf4", "fp4" or "int4".
  virtual std::string quant_type() const = 0;

  /// Bytes of every parameter and buffer of the module (packed codes, statistics, bias).
  virtual int64_t memory_bytes() const = 0;

  /// The module's tensors in the checkpoint key layout, in interchange form (not the kernels'
  /// private layout), bit-exact: loading them back gives identical tensors. Fresh tensors (the
  /// caller may keep or modify them).
  virtual NamedTensors quantized_state() const = 0;

  /// The relative keys quantized_state() emits for the module's current configuration (what a
  /// checkpoint must hold for load_quantized_state).
  virtual std::vector<std::string> quantized_state_keys() const = 0;

  /// Loads the module's tensors from `entries` (relative keys, exactly quantized_state_keys()),
  /// bit-exact. Validates everything and trusts nothing: dtypes, shapes, element counts derived
  /// from the module's configuration and from the JSON quant state (checked against each other,
  /// overflow-checked), quant_type / blocksize / double quantization of the checkpoint against
  /// the module's, finite statistics. Throws c10::Error naming `prefix` + the key, what was
  /// expected and what came; on a throw the module is unchanged.
  virtual void load_quantized_state(const std::map<std::string, torch::Tensor>& entries,
                                    const std::string& prefix) = 0;
};

}  // namespace msbnb::nn
