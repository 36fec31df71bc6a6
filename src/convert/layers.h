// The one place conversion meets msbnb::nn: a float layer in, its quantized counterpart out.
#pragma once
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>

#include "msbnb/convert/config.h"

namespace msbnb::detail {

/// Linear8bit (int8 config) or Linear4bit (int4 / nf4 / fp4) built from `linear`'s weights.
torch::nn::AnyModule quantize_linear(const torch::nn::Linear& linear, const QuantConfig& config);
/// Embedding8bit / Embedding4bit built from `embedding`'s weights.
torch::nn::AnyModule quantize_embedding(const torch::nn::Embedding& embedding, const QuantConfig& config);
/// "int8", "nf4 +double_quant", ... for an msbnb quantized module; "" for anything else.
std::string quantized_format(const torch::nn::Module& module);

}  // namespace msbnb::detail
