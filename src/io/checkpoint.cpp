// Quantized model files: nn state dict <-> safetensors (msbnb/io/checkpoint.h).
#include "msbnb/io/checkpoint.h"

#include "msbnb/io/safetensors.h"

namespace msbnb::io {

void save_quantized_model(const std::string& path, const torch::nn::Module& model,
                          std::map<std::string, std::string> metadata) {
  metadata.emplace("format", "pt");
  save_safetensors(path, nn::quantized_state_dict(model), metadata);
}

nn::LoadReport load_quantized_model(const std::string& path, torch::nn::Module& model, bool strict) {
  return nn::load_quantized_state_dict(model, load_safetensors(path), strict);
}

}  // namespace msbnb::io
