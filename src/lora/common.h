// Helpers shared by the LoRA sources (private to src/lora).
#pragma once
#include <torch/nn/module.h>
#include <torch/types.h>

#include <string>
#include <utility>
#include <vector>

#include "msbnb/lora/lora.h"

namespace msbnb::lora::detail {

/// What merge() measured: W0 before, delta, W1 after (all float32 [out, in]); Wm = W0 + delta.
MergeResult measure_merge(const std::string& base, bool requantized, const torch::Tensor& W0,
                          const torch::Tensor& delta, const torch::Tensor& W1);

/// Float merge into a weight parameter in place: float32 W += delta; other dtypes W =
/// round(float32(W) + delta). Returns the measured result.
MergeResult merge_float(torch::Tensor& weight, const torch::Tensor& delta, const std::string& base);
/// The inverse: float32 W -= delta; other dtypes W = round(float32(W) - delta).
void unmerge_float(torch::Tensor& weight, const torch::Tensor& delta);

/// Clones of `module`'s own buffers (name, tensor), for putting them back bit-identical.
std::vector<std::pair<std::string, torch::Tensor>> save_buffers(const torch::nn::Module& module);
/// Points each of `module`'s own buffers at the saved tensor of its name (set_data): the module
/// then holds exactly the saved bytes. Throws if the buffers' names, dtypes or shapes differ.
void restore_buffers(torch::nn::Module& module,
                     const std::vector<std::pair<std::string, torch::Tensor>>& saved, const char* what);

/// "Linear", "Linear8bit", "Linear8bit(float weights)", "Linear4bit(nf4)", ... of a base module;
/// "" if it is not one.
std::string describe_base(const torch::nn::Module& module);

/// Throws (naming `fn`) if the layer's merged() differs from `expected`.
void check_merged(const LoraLayer& layer, bool expected, const char* fn);

}  // namespace msbnb::lora::detail
