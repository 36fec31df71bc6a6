// Quantization configs for model conversion (the seed package's QuantConfig / Int8Config /
// Int4Config, in libtorch's dialect: TORCH_ARG chained setters, `c.threshold(0.0)` sets,
// `c.threshold()` reads).
//
// How they relate: Int8Config and Int4Config are plain option structs; QuantConfig holds exactly
// one of them (a std::variant, not a base class), so a function that takes a QuantConfig accepts
// either one directly:
//   msbnb::convert_to_quantized_model(model, msbnb::Int4Config().quant_type("nf4"));
// and code that needs the details asks `config.is_int8()` and reads `config.int8()` /
// `config.int4()`. validate() checks every field and throws c10::Error naming the field, the
// expected and the actual value; conversion validates before it touches the model.
#pragma once
#include <torch/arg.h>

#include <cstdint>
#include <string>
#include <variant>

namespace msbnb {

/// 8-bit weights (LLM.int8(): int8 codes, one absmax scale per output row or per tensor).
///  symmetric         q in [-127, 127], w' = q * scale. LLM.int8() is symmetric only:
///                    symmetric(false) is refused by validate() (the seed package's asymmetric
///                    path clipped [0, 255] into [-128, 127]; see DESIGN.md).
///  per_channel       one scale per output row. Linear8bit (LLM.int8()) has row scales only:
///                    per_channel(false) (one scale per tensor) is refused by validate().
///  threshold         LLM.int8() outlier threshold: input columns holding any |x| >= threshold
///                    run in floating point; 0 disables the decomposition. Finite, >= 0.
///  has_fp16_weights  keep the float weights beside the codes (training); false (default)
///                    drops them, which is what saves the memory.
///  convert_embeddings  also convert torch::nn::Embedding to Embedding8bit (default false:
///                    embeddings are usually kept in float).
/// Example: msbnb::Int8Config().threshold(0.0)
struct Int8Config {
  /// Throws c10::Error naming the first bad field, the expected and the actual value.
  void validate() const;

  TORCH_ARG(bool, symmetric) = true;
  TORCH_ARG(bool, per_channel) = true;
  TORCH_ARG(double, threshold) = 6.0;
  TORCH_ARG(bool, has_fp16_weights) = false;
  TORCH_ARG(bool, convert_embeddings) = false;
};

/// 4-bit weights.
///  quant_type           "int4" (MindSpore qint4x2, per-group absmax / 7 along in_features),
///                       "nf4" or "fp4" (bitsandbytes codebooks, blocks of the flattened weight).
///  group_size           int4 only: elements per group along in_features; even, >= 2
///                       (default 128; a short last group is allowed).
///  blocksize            nf4 / fp4 only: elements per block, a power of two in [32, 4096]
///                       (default 64, bitsandbytes').
///  compress_statistics  double-quantize the scales / absmax (blockwise 8-bit, blocks of 256):
///                       4.127 instead of 4.5 bits per weight at blocksize 64.
///  convert_embeddings   also convert torch::nn::Embedding to Embedding4bit (default false).
/// Example: msbnb::Int4Config().quant_type("nf4").compress_statistics(false)
struct Int4Config {
  /// The block (nf4 / fp4) or group (int4) size the layers use.
  int64_t effective_blocksize() const { return quant_type_ == "int4" ? group_size_ : blocksize_; }
  /// Throws c10::Error naming the first bad field, the expected and the actual value.
  void validate() const;

  TORCH_ARG(std::string, quant_type) = "int4";
  TORCH_ARG(int64_t, group_size) = 128;
  TORCH_ARG(int64_t, blocksize) = 64;
  TORCH_ARG(bool, compress_statistics) = true;
  TORCH_ARG(bool, convert_embeddings) = false;
};

/// Either an Int8Config or an Int4Config (implicitly converted from both).
class QuantConfig {
 public:
  QuantConfig(Int8Config c) : config_(std::move(c)) {}  // NOLINT(google-explicit-constructor)
  QuantConfig(Int4Config c) : config_(std::move(c)) {}  // NOLINT(google-explicit-constructor)

  bool is_int8() const { return std::holds_alternative<Int8Config>(config_); }
  bool is_int4() const { return std::holds_alternative<Int4Config>(config_); }
  /// The held config; throws c10::Error if it holds the other one.
  const Int8Config& int8() const;
  const Int4Config& int4() const;

  /// "int8", "int4", "nf4" or "fp4".
  std::string quant_type() const;
  /// Whether torch::nn::Embedding layers are converted too.
  bool convert_embeddings() const;
  /// A short description: "int8 per_channel threshold=6", "nf4 blocksize=64 +double_quant", ...
  std::string describe() const;
  void validate() const;

 private:
  std::variant<Int8Config, Int4Config> config_;
};

}  // namespace msbnb
