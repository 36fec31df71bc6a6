// Quantized models as safetensors files in the bitsandbytes / Hugging Face key layout: the state
// dict of msbnb/nn/state_dict.h written and read by msbnb/io/safetensors.h. A file bitsandbytes
// (transformers) saved loads into a model of msbnb layers, and ours load there.
#pragma once
#include <torch/nn/module.h>

#include <map>
#include <string>

#include "msbnb/nn/state_dict.h"

namespace msbnb::io {

/// Writes nn::quantized_state_dict(model) to `path` atomically (temporary file, fsync, rename:
/// the previous file stays intact on any failure or crash), with `metadata` plus {"format": "pt"}
/// as transformers writes it.
void save_quantized_model(const std::string& path, const torch::nn::Module& model,
                          std::map<std::string, std::string> metadata = {});

/// Loads a file of that layout into `model` (nn::load_quantized_state_dict: validated, bit-exact;
/// strict: missing or unexpected keys throw). The file's tensors are copied into the model.
nn::LoadReport load_quantized_model(const std::string& path, torch::nn::Module& model, bool strict = true);

}  // namespace msbnb::io
