// Quantized embeddings: Embedding8bit (int8 rows with row absmax, bitsandbytes' Embedding8bit)
// and Embedding4bit (nf4 / fp4 blocks of the flattened table as bitsandbytes' Embedding4bit, or
// int4 groups along embedding_dim). forward(indices) dequantizes only the rows it looks up.
//
// The table is held in its interchange layout (what a checkpoint stores), as registered buffers:
// no float copy. Same libtorch behaviour as the linear layers (msbnb/nn/linear.h): clone(),
// to(dtype) leaves the quantized bytes bit-identical (the embeddings have no float parameter),
// to(non-CPU device) throws, quantize_weights / dequantize_weights / memory_bytes, checkpoint
// keys through msbnb/nn/state_dict.h:
//   Embedding8bit: `p.weight` int8 [num_embeddings, embedding_dim], `p.SCB` float32
//                  [num_embeddings], `p.weight_format` uint8 scalar 0.
//   Embedding4bit: as Linear4bit's weight (`p.weight`, `p.weight.absmax`, `p.weight.quant_map`,
//                  nested, `p.weight.quant_state.bitsandbytes__nf4` / `__fp4` / `msbnb__int4`),
//                  shape [num_embeddings, embedding_dim].
#pragma once
#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "msbnb/functional/quantize.h"
#include "msbnb/nn/quantized_module.h"

namespace msbnb::nn {

// ---------------------------------------------------------------------------------------------
// Embedding8bit

/// Options of Embedding8bit.
///  dtype  of forward's output (float32 / float16 / bfloat16); from_embedding takes the
///         embedding weight's dtype.
struct Embedding8bitOptions {
  Embedding8bitOptions(int64_t num_embeddings, int64_t embedding_dim);
  TORCH_ARG(int64_t, num_embeddings);
  TORCH_ARG(int64_t, embedding_dim);
  TORCH_ARG(torch::Dtype, dtype) = torch::kFloat32;
};

class Embedding8bit;

/// int8 embedding table: row r is CB[r] * (SCB[r] / 127) (bitsandbytes' Embedding8bit).
/// Example:
///   auto e = msbnb::nn::Embedding8bit::from_embedding(torch::nn::Embedding(32000, 4096));
///   torch::Tensor h = e->forward(torch::tensor({{1, 5, 7}}));  // float32 [1, 3, 4096]
class Embedding8bitImpl : public torch::nn::Cloneable<Embedding8bitImpl>, public QuantizedModule {
 public:
  Embedding8bitImpl(int64_t num_embeddings, int64_t embedding_dim)
      : Embedding8bitImpl(Embedding8bitOptions(num_embeddings, embedding_dim)) {}
  explicit Embedding8bitImpl(const Embedding8bitOptions& options);

  void reset() override;
  /// `msbnb::nn::Embedding8bit(num_embeddings=32000, embedding_dim=4096)`.
  void pretty_print(std::ostream& stream) const override;

  /// indices: an integer tensor (int64 / int32) of any shape, values in [0, num_embeddings)
  /// (else throws naming the index) -> [*indices.shape, embedding_dim] in options.dtype.
  torch::Tensor forward(const torch::Tensor& indices);

  /// Quantizes a float table [num_embeddings, embedding_dim] (finite) into the module.
  void quantize_weights(const torch::Tensor& weight);
  /// The table as float32 [num_embeddings, embedding_dim].
  torch::Tensor dequantize_weights() const;

  /// A module of `embedding`'s sizes, its table quantized, dtype the table's.
  static Embedding8bit from_embedding(const torch::nn::Embedding& embedding);

  std::string quant_type() const override { return "int8"; }
  int64_t memory_bytes() const override;
  NamedTensors quantized_state() const override;
  std::vector<std::string> quantized_state_keys() const override;
  void load_quantized_state(const std::map<std::string, torch::Tensor>& entries,
                            const std::string& prefix) override;

  /// Nothing to convert (no float parameter): checks dtype is a float dtype and the device is
  /// the CPU, else throws.
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, bool non_blocking = false) override;

  Embedding8bitOptions options;
  /// int8 [num_embeddings, embedding_dim] (buffer "weight").
  torch::Tensor weight;
  /// float32 [num_embeddings] row absmax (buffer "SCB").
  torch::Tensor SCB;
};

class Embedding8bit : public torch::nn::ModuleHolder<Embedding8bitImpl> {
 public:
  using torch::nn::ModuleHolder<Embedding8bitImpl>::ModuleHolder;
  using Impl = Embedding8bitImpl;
  static Embedding8bit from_embedding(const torch::nn::Embedding& embedding) {
    return Embedding8bitImpl::from_embedding(embedding);
  }
};

// ---------------------------------------------------------------------------------------------
// Embedding4bit

/// Options of Embedding4bit. quant_type, blocksize, symmetric as Linear4bitOptions;
/// compress_statistics defaults to false, as bitsandbytes' Embedding4bit. dtype: of forward's
/// output (float32 / float16 / bfloat16).
struct Embedding4bitOptions {
  Embedding4bitOptions(int64_t num_embeddings, int64_t embedding_dim);
  int64_t effective_blocksize() const;
  TORCH_ARG(int64_t, num_embeddings);
  TORCH_ARG(int64_t, embedding_dim);
  TORCH_ARG(std::string, quant_type) = "fp4";
  TORCH_ARG(std::optional<int64_t>, blocksize) = std::nullopt;
  TORCH_ARG(bool, compress_statistics) = false;
  TORCH_ARG(bool, symmetric) = true;
  TORCH_ARG(torch::Dtype, dtype) = torch::kFloat32;
};

class Embedding4bit;

/// 4-bit embedding table (nf4 / fp4 as bitsandbytes, int4 per group along embedding_dim).
/// Buffers: "weight" (uint8 packed as the checkpoint), "weight_absmax" (int4: the scales),
/// "weight_quant_map" (nf4 / fp4), "weight_zero_point" (int4 asymmetric),
/// "weight_nested_absmax", "weight_nested_quant_map", "weight_nested_offset" (double quant).
/// Example:
///   auto e = msbnb::nn::Embedding4bit::from_embedding(torch::nn::Embedding(1000, 64),
///                                                     msbnb::nn::Embedding4bitOptions(1000,
///                                                     64).quant_type("nf4"));
class Embedding4bitImpl : public torch::nn::Cloneable<Embedding4bitImpl>, public QuantizedModule {
 public:
  Embedding4bitImpl(int64_t num_embeddings, int64_t embedding_dim)
      : Embedding4bitImpl(Embedding4bitOptions(num_embeddings, embedding_dim)) {}
  explicit Embedding4bitImpl(const Embedding4bitOptions& options);

  void reset() override;
  /// `msbnb::nn::Embedding4bit(num_embeddings=1000, embedding_dim=64, quant_type=nf4, blocksize=64)`.
  void pretty_print(std::ostream& stream) const override;

  /// As Embedding8bit::forward; each looked-up row decodes bit-exactly as msbnb::dequantize_4bit
  /// of the whole table would give it.
  torch::Tensor forward(const torch::Tensor& indices);

  void quantize_weights(const torch::Tensor& weight);
  /// The table as float32 [num_embeddings, embedding_dim] (msbnb::dequantize_4bit).
  torch::Tensor dequantize_weights() const;

  /// A module of `embedding`'s sizes; the other fields from `options` (its num_embeddings /
  /// embedding_dim replaced by the embedding's; dtype the table's).
  static Embedding4bit from_embedding(const torch::nn::Embedding& embedding,
                                      std::optional<Embedding4bitOptions> options = std::nullopt);

  std::string quant_type() const override { return options.quant_type(); }
  int64_t memory_bytes() const override;
  NamedTensors quantized_state() const override;
  std::vector<std::string> quantized_state_keys() const override;
  void load_quantized_state(const std::map<std::string, torch::Tensor>& entries,
                            const std::string& prefix) override;

  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, bool non_blocking = false) override;

  Embedding4bitOptions options;

 private:
  QuantState state() const;
  void set_quantized(const Quantized4bit& q);
  // dtype of the table that was quantized or loaded (the JSON "dtype").
  torch::Dtype weight_dtype_ = torch::kFloat32;
  // The registered buffers (undefined when the configuration has none of that kind).
  torch::Tensor data_, absmax_, quant_map_, zero_point_, nested_absmax_, nested_quant_map_, nested_offset_;
};

class Embedding4bit : public torch::nn::ModuleHolder<Embedding4bitImpl> {
 public:
  using torch::nn::ModuleHolder<Embedding4bitImpl>::ModuleHolder;
  using Impl = Embedding4bitImpl;
  static Embedding4bit from_embedding(const torch::nn::Embedding& embedding,
                                      std::optional<Embedding4bitOptions> options = std::nullopt) {
    return Embedding4bitImpl::from_embedding(embedding, std::move(options));
  }
};

}  // namespace msbnb::nn
