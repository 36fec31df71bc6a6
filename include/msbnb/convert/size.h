// Model size reports: bytes per module (parameters + buffers, which for msbnb layers hold the
// packed codes and every quantization statistic), totals, fp-vs-quantized comparison and a tree
// summary.
//
// Bytes are counted per storage: tensors that share memory (a view, a buffer sharing a
// parameter's storage, a tied weight) count once, at their storage's size. MB here means MiB
// (2^20 bytes), the seed package's convention; docs/conversion.md gives GB (10^9) beside GiB.
#pragma once
#include <torch/nn/module.h>

#include <cstdint>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

namespace msbnb {

/// One module's own tensors (not its children's).
///  name    dotted path from the root ("" for the root itself)
///  type    module type: "torch::nn::Linear", "msbnb::nn::Linear4bit", ...
///  format  "float32" / "float16" / "bfloat16" for float modules (the dtype of their first
///          parameter), "int8" / "int4" / "nf4" / "fp4" for msbnb quantized layers (with
///          " +double_quant" where the statistics are compressed), "" when it holds no tensors.
struct LayerSize {
  std::string name, type, format;
  int64_t parameter_bytes = 0, buffer_bytes = 0;
  int64_t parameter_count = 0;  // elements of the float parameters (0 for quantized layers' codes)
  int64_t bytes() const { return parameter_bytes + buffer_bytes; }
};

/// Every module that holds tensors, in named_modules() order, and the totals (each storage once).
struct ModelSize {
  std::vector<LayerSize> layers;
  int64_t parameter_bytes = 0, buffer_bytes = 0, total_bytes = 0;
  double total_mb() const { return static_cast<double>(total_bytes) / (1024.0 * 1024.0); }
  /// The entry of `name`; throws c10::Error naming it if there is none.
  const LayerSize& layer(const std::string& name) const;
};

/// Sizes of `model` and every module below it. Example:
///   auto s = msbnb::get_model_size(*model);  std::cout << s.total_mb() << " MiB\n";
ModelSize get_model_size(const torch::nn::Module& model);

/// fp_size_mb / quant_size_mb: total MiB of the two models; memory_saved_mb = fp - quant;
/// memory_saved_percent = 100 * saved / fp; compression_ratio = fp / quant.
struct SizeComparison {
  double fp_size_mb = 0, quant_size_mb = 0, memory_saved_mb = 0, memory_saved_percent = 0,
         compression_ratio = 0;
  int64_t fp_bytes = 0, quant_bytes = 0;
};

/// Compares two models' sizes. Throws c10::Error if the quantized model holds no bytes.
/// Example: auto c = msbnb::compare_model_sizes(*fp_model, *converted.model);
SizeComparison compare_model_sizes(const torch::nn::Module& fp_model, const torch::nn::Module& quant_model);

/// Writes the whole module tree, one line per module (indented by depth): name, type, format,
/// its own bytes; then the totals and per-format totals. Example:
///   msbnb::print_quantization_summary(*model, std::cout);
void print_quantization_summary(const torch::nn::Module& model, std::ostream& os);

}  // namespace msbnb
