// Quantized checkpoints as flat state dicts in the bitsandbytes / Hugging Face key layout
// (DESIGN.md "Checkpoint keys"): what msbnb::io::save_safetensors writes and load_safetensors
// reads. Keys are dotted module paths, as torch's named_parameters() gives them.
//
// Per module (prefix p):
//  - Linear4bit nf4 / fp4: p.weight uint8 [(N·K+1)/2, 1], p.weight.absmax, p.weight.quant_map,
//    [p.weight.nested_absmax, p.weight.nested_quant_map], p.weight.quant_state.bitsandbytes__nf4
//    (or __fp4: uint8 UTF-8 JSON byte for byte as bitsandbytes' QuantState.as_dict(packed=True)
//    writes it), [p.bias].
//  - Linear4bit int4: msbnb's own layout, see msbnb/nn/linear.h (p.weight.quant_state.msbnb__int4).
//  - Linear8bit: p.weight int8 [out, in], p.SCB float32 [out], p.weight_format uint8 scalar 0,
//    [p.bias].
//  - Embedding8bit / Embedding4bit: as Linear8bit / Linear4bit (no bias), see msbnb/nn/embedding.h.
//  - Every other module: its own parameters and buffers under their names.
#pragma once
#include <torch/nn/module.h>
#include <torch/types.h>

#include <string>
#include <utility>
#include <vector>

#include "msbnb/nn/quantized_module.h"

namespace msbnb::nn {

/// The state dict of `model` and all its descendants, in Python torch's state_dict() order (per
/// module: its parameters, its buffers, then its children). Quantized modules contribute their checkpoint
/// keys in interchange form (fresh tensors); other tensors are the module's own (shared, detached). Example:
///   msbnb::io::save_safetensors("model.safetensors", msbnb::nn::quantized_state_dict(*model));
NamedTensors quantized_state_dict(const torch::nn::Module& model);

/// What load_quantized_state_dict did.
///  missing_keys     keys the model expects and `sd` lacks (full dotted names)
///  unexpected_keys  keys of `sd` that no module takes
///  loaded_keys      keys that were loaded
/// Non-strict: a quantized module whose keys are incomplete is left as it was (its missing keys
/// are reported).
struct LoadReport {
  std::vector<std::string> missing_keys, unexpected_keys, loaded_keys;
};

/// Loads `sd` into `model` bit-exactly (quantized modules through
/// QuantizedModule::load_quantized_state, other tensors copied with their shapes and dtypes
/// checked). strict: any missing or unexpected key throws, the message listing them all.
/// Always throws (c10::Error naming the key, what was expected and what came): a duplicate key,
/// a tensor of the wrong dtype / shape / element count, a checkpoint of another quant_type,
/// blocksize or double quantization than the module (e.g. bitsandbytes__fp4 into an nf4 layer),
/// malformed or inconsistent JSON quant state, sizes that overflow. Nothing in `sd` is trusted.
/// Each module is validated before it is changed (keys are checked for the whole model first; a
/// module whose tensors fail validation throws, and the modules loaded before it stay loaded).
LoadReport load_quantized_state_dict(torch::nn::Module& model, const NamedTensors& sd, bool strict = true);

}  // namespace msbnb::nn
