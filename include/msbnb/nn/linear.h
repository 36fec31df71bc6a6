// Quantized linear layers for the PyTorch C++ frontend: Linear8bit (LLM.int8(), bitsandbytes'
// Linear8bitLt) and Linear4bit (nf4 / fp4 as bitsandbytes' Linear4bit, int4 per group as
// MindSpore's qint4x2), with LinearNF4 / LinearFP4 conveniences.
//
// What a layer holds: ONLY the packed weight and its statistics, as registered buffers (the
// tensors of a msbnb::PackedWeight, see msbnb/functional/matmul.h, under the names
// "weight_<tensor name>"), plus the bias as a float32 parameter. No float copy of the weight,
// no second packed copy. The buffers never require grad: the quantized weight is not trainable;
// the bias is (as torch::nn::Linear's). Buffers are zeros (the layer multiplies to bias) until
// quantize_weights(), from_linear() or load_quantized_state_dict() fills them.
//
// libtorch behaviour:
//  - clone() gives an independent layer (own storage) with identical outputs.
//  - to(dtype) converts the bias (and Linear8bit's float `weight` while it has one) and nothing
//    else: the packed bytes stay bit-identical. dtype must be float32, float16 or bfloat16.
//  - to(device) with a device other than the CPU throws ("CUDA kernels do not exist yet").
//  - train() / eval() only set is_training(): the forward is the same in both.
//  - torch::save / torch::load of the module save and load the buffers (the kernels' layout);
//    for interchange checkpoints use msbnb/nn/state_dict.h.
//  - forward() of one module from several threads at once is safe and gives identical results.
//
// Forward: x float32, float16 or bfloat16 on the CPU, shape [..., in_features] ->
// [..., out_features] in x's dtype, through the fused kernels (msbnb::quantized_matmul, or
// msbnb::int8_matmul for LLM.int8() with a threshold). Backward gives grad_x (fused transposed
// product) and grad_bias.
//
// Errors: c10::Error naming the argument, what was expected and what came (wrong in_features,
// dtype or device of x; quantize_weights of a wrong shape, NaN / Inf; unknown quant_type; bad
// blocksize; bad sizes).
#pragma once
#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "msbnb/functional/matmul.h"
#include "msbnb/nn/quantized_module.h"

namespace msbnb::nn {

namespace detail {
/// The PackedWeight over a module's current buffers, rebuilt (PackedWeight::from_tensors) when
/// the buffers' storage changed (clone(), torch::load, set_data). Copying a cache gives an empty
/// one: a copied module (Cloneable::clone copies the module, then reset() re-registers its
/// buffers) rebuilds over its own tensors. Thread-safe.
class PackedWeightCache {
 public:
  PackedWeightCache() = default;
  PackedWeightCache(const PackedWeightCache&) {}
  PackedWeightCache& operator=(const PackedWeightCache&) {
    invalidate();
    return *this;
  }
  /// The weight over `buffers` (name -> tensor as PackedWeight::tensors() names them).
  PackedWeight get(const PackedLayout& layout, const NamedTensors& buffers) const;
  void invalidate();

 private:
  mutable std::mutex mutex_;
  mutable PackedWeight weight_;
  mutable std::vector<const void*> data_ptrs_;
};
}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Linear8bit

/// Options of Linear8bit (bitsandbytes' Linear8bitLt arguments).
/// Example:
///   msbnb::nn::Linear8bit fc(msbnb::nn::Linear8bitOptions(4096, 4096).bias(false).threshold(0.0));
struct Linear8bitOptions {
  Linear8bitOptions(int64_t in_features, int64_t out_features);
  /// size of each input sample (> 0)
  TORCH_ARG(int64_t, in_features);
  /// size of each output sample (> 0)
  TORCH_ARG(int64_t, out_features);
  /// learn an additive bias (float32 parameter [out_features])
  TORCH_ARG(bool, bias) = true;
  /// LLM.int8() outlier threshold: input columns holding any |x| >= threshold are multiplied in
  /// floating point (msbnb::int8_matmul). 0: no outliers, every column in int8
  /// (msbnb::quantized_matmul). Finite, >= 0. Default 6.0 as bitsandbytes.
  TORCH_ARG(double, threshold) = 6.0;
  /// true: the layer starts with a float32 parameter `weight` [out, in] (trainable, forward is
  /// torch::nn::functional::linear) until quantize_weights() quantizes it and drops it (as
  /// bitsandbytes' Int8Params do on .cuda()). false (default): int8 buffers from construction.
  TORCH_ARG(bool, has_fp16_weights) = false;
};

class Linear8bit;

/// LLM.int8() linear layer: int8 weight rows CB [out, in] with row absmax SCB [out] (bitsandbytes'
/// Int8Params, quantized by int8_vectorwise_quant with threshold 0), held as the buffers of a
/// PackedWeight::from_int8_scb weight. Checkpoint keys: `weight` int8 [out, in], `SCB` float32
/// [out], `weight_format` uint8 scalar 0 ("row"), `bias`.
/// Example:
///   auto q = msbnb::nn::Linear8bit::from_linear(torch::nn::Linear(1024, 512));
///   torch::Tensor y = q->forward(torch::randn({8, 1024}));  // [8, 512]
class Linear8bitImpl : public torch::nn::Cloneable<Linear8bitImpl>, public QuantizedModule {
 public:
  Linear8bitImpl(int64_t in_features, int64_t out_features)
      : Linear8bitImpl(Linear8bitOptions(in_features, out_features)) {}
  /// Throws for in_features / out_features <= 0 or a bad threshold.
  explicit Linear8bitImpl(const Linear8bitOptions& options);

  /// Registers the bias (torch::nn::Linear's init), and either the int8 buffers (zeros until
  /// quantized) or, with has_fp16_weights and not yet quantized, the float `weight` parameter.
  void reset() override;
  /// `msbnb::nn::Linear8bit(in_features=4096, out_features=4096, bias=false, threshold=6)`.
  void pretty_print(std::ostream& stream) const override;

  /// [..., in_features] -> [..., out_features] in x's dtype.
  torch::Tensor forward(const torch::Tensor& x);

  /// Quantizes a float weight [out_features, in_features] (float32 / float16 / bfloat16, finite)
  /// into the layer (row absmax / 127, as bitsandbytes' int8_vectorwise_quant). Drops the float
  /// `weight` parameter if the layer had one.
  void quantize_weights(const torch::Tensor& weight);
  /// has_fp16_weights: quantizes the layer's own float `weight` and drops it. Throws if the layer
  /// is already quantized.
  void quantize_weights();
  /// The weight as float32 [out_features, in_features]: CB * SCB / 127 (or the float weight while
  /// the layer has one).
  torch::Tensor dequantize_weights() const;
  /// true once the layer holds int8 buffers (always, unless has_fp16_weights and not quantized).
  bool is_quantized() const { return quantized_; }
  /// The packed weight over the current buffers (shares their memory). Throws if not quantized.
  PackedWeight packed_weight() const;

  /// A layer of `linear`'s in / out features and bias (kept as a float32 parameter), its weight
  /// quantized; the other fields from `options` (their in_features / out_features / bias are
  /// replaced by `linear`'s). has_fp16_weights in options is ignored (the result is quantized).
  static Linear8bit from_linear(const torch::nn::Linear& linear,
                                std::optional<Linear8bitOptions> options = std::nullopt);

  std::string quant_type() const override { return "int8"; }
  int64_t memory_bytes() const override;
  NamedTensors quantized_state() const override;
  std::vector<std::string> quantized_state_keys() const override;
  void load_quantized_state(const std::map<std::string, torch::Tensor>& entries,
                            const std::string& prefix) override;

  /// Converts the bias (and the float weight while there is one); leaves the int8 buffers as
  /// they are. Throws for a non-CPU device or a non-float dtype.
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, bool non_blocking = false) override;

  /// The options the layer was built with.
  Linear8bitOptions options;
  /// float32 [out_features] bias parameter, or undefined.
  torch::Tensor bias;
  /// The float weight while has_fp16_weights and not quantized, else undefined.
  torch::Tensor weight;

 private:
  void set_packed(const PackedWeight& w);
  bool quantized_ = true;
  // (PackedWeight tensor name, registered buffer) in tensors() order.
  NamedTensors buffers_w_;
  detail::PackedWeightCache cache_;
};

/// Holder of Linear8bitImpl (TORCH_MODULE's expansion plus the static from_linear).
class Linear8bit : public torch::nn::ModuleHolder<Linear8bitImpl> {
 public:
  using torch::nn::ModuleHolder<Linear8bitImpl>::ModuleHolder;
  using Impl = Linear8bitImpl;
  /// See Linear8bitImpl::from_linear.
  static Linear8bit from_linear(const torch::nn::Linear& linear,
                                std::optional<Linear8bitOptions> options = std::nullopt) {
    return Linear8bitImpl::from_linear(linear, std::move(options));
  }
};

// ---------------------------------------------------------------------------------------------
// Linear4bit

/// Options of Linear4bit (bitsandbytes' Linear4bit arguments, plus int4).
///  quant_type           "fp4" (default, as bitsandbytes) | "nf4" (bitsandbytes layout) |
///                       "int4" (MindSpore qint4x2 per group along in_features).
///  blocksize            nf4 / fp4: elements per block of the flattened weight, a power of two in
///                       [32, 4096]; int4: group size along in_features, even, >= 2. Unset: the
///                       format's default (nf4 / fp4 64, int4 128). A last short block / group and
///                       in_features not divisible by it are fine.
///  compress_statistics  double quantization of the absmax / scales (blockwise 8-bit, blocks of
///                       256); default true as bitsandbytes' Linear4bit.
///  compute_dtype        unset: the product runs in x's dtype. Set (float32 / float16 /
///                       bfloat16): x is converted to it for the product and the result converted
///                       back to x's dtype (bitsandbytes' semantics). to(dtype) leaves it as is.
///  symmetric            int4 only: false gives uint4 with a zero point. nf4 / fp4 with false
///                       throws.
/// Example:
///   msbnb::nn::Linear4bit fc(msbnb::nn::Linear4bitOptions(4096, 4096).quant_type("nf4").bias(false));
struct Linear4bitOptions {
  Linear4bitOptions(int64_t in_features, int64_t out_features);
  /// The block / group size the layer uses: blocksize() if set, else the format's default.
  /// Throws for an unknown quant_type.
  int64_t effective_blocksize() const;

  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
  TORCH_ARG(bool, bias) = true;
  TORCH_ARG(std::string, quant_type) = "fp4";
  TORCH_ARG(std::optional<int64_t>, blocksize) = std::nullopt;
  TORCH_ARG(bool, compress_statistics) = true;
  TORCH_ARG(std::optional<torch::Dtype>, compute_dtype) = std::nullopt;
  TORCH_ARG(bool, symmetric) = true;
  /// The forward's MatmulPath (docs/matmul.md): automatic (exact), or int8 (int8 activations, the
  /// fastest decode) / fast. The backward is exact either way.
  TORCH_ARG(MatmulPath, matmul_path) = MatmulPath::automatic;
};

class Linear4bit;

/// 4-bit linear layer (QLoRA's nf4 / fp4 as bitsandbytes, or int4 per group).
/// Checkpoint keys (prefix p): nf4 / fp4 as bitsandbytes: `p.weight` uint8 [(N·K+1)/2, 1],
/// `p.weight.absmax` (float32, or uint8 with double quant), `p.weight.quant_map` float32 [16],
/// double quant: `p.weight.nested_absmax` float32, `p.weight.nested_quant_map` float32 [256];
/// `p.weight.quant_state.bitsandbytes__nf4` (or `__fp4`) uint8 JSON as bitsandbytes writes it;
/// `p.bias`. int4 (msbnb's own): `p.weight` uint8 [out, ceil(in / 2)] qint4x2 (element 2j in the
/// low nibble), `p.weight.scale` float32 [out, groups] (with double quant uint8 [out · groups]
/// codes, then `p.weight.nested_absmax`, `p.weight.nested_quant_map`), `p.weight.zero_point` uint8
/// [out, groups] in [0, 15] (asymmetric: w = (q - zp) * scale), `p.weight.quant_state.msbnb__int4`
/// uint8 JSON {"quant_type", "blocksize", "dtype", "shape", "symmetric"[, "nested_blocksize",
/// "nested_dtype", "nested_offset"]}; `p.bias`.
/// Example:
///   msbnb::nn::Linear4bit fc(msbnb::nn::Linear4bitOptions(1024, 512).quant_type("nf4"));
///   fc->quantize_weights(torch::randn({512, 1024}));
///   torch::Tensor y = fc->forward(torch::randn({2, 3, 1024}, torch::kBFloat16));  // bf16 [2, 3, 512]
class Linear4bitImpl : public torch::nn::Cloneable<Linear4bitImpl>, public QuantizedModule {
 public:
  Linear4bitImpl(int64_t in_features, int64_t out_features)
      : Linear4bitImpl(Linear4bitOptions(in_features, out_features)) {}
  /// Throws for sizes <= 0, an unknown quant_type, a bad blocksize, symmetric(false) with nf4 /
  /// fp4, or a compute_dtype that is not float32 / float16 / bfloat16.
  explicit Linear4bitImpl(const Linear4bitOptions& options);

  /// Registers the packed weight's buffers (zeros) and the bias (torch::nn::Linear's init).
  void reset() override;
  /// `msbnb::nn::Linear4bit(in_features=4096, out_features=4096, bias=false, quant_type=nf4,
  /// blocksize=64)`.
  void pretty_print(std::ostream& stream) const override;

  /// [..., in_features] -> [..., out_features] in x's dtype (see compute_dtype).
  torch::Tensor forward(const torch::Tensor& x);

  /// Quantizes a float weight [out_features, in_features] (float32 / float16 / bfloat16, finite)
  /// into the layer's format.
  void quantize_weights(const torch::Tensor& weight);
  /// The weight as float32 [out_features, in_features], exactly as msbnb::dequantize_4bit gives it.
  torch::Tensor dequantize_weights() const;
  /// The packed weight over the current buffers (shares their memory).
  PackedWeight packed_weight() const;

  /// A layer of `linear`'s in / out features and bias (float32 parameter), its weight quantized;
  /// the other fields from `options` (default: Linear4bitOptions' defaults, i.e. fp4).
  static Linear4bit from_linear(const torch::nn::Linear& linear,
                                std::optional<Linear4bitOptions> options = std::nullopt);

  std::string quant_type() const override { return options.quant_type(); }
  int64_t memory_bytes() const override;
  NamedTensors quantized_state() const override;
  std::vector<std::string> quantized_state_keys() const override;
  void load_quantized_state(const std::map<std::string, torch::Tensor>& entries,
                            const std::string& prefix) override;

  /// Converts the bias only; the packed buffers stay bit-identical. Throws for a non-CPU
  /// device or a non-float dtype.
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, bool non_blocking = false) override;

  Linear4bitOptions options;
  /// float32 [out_features] bias parameter, or undefined.
  torch::Tensor bias;

 private:
  PackedLayout layout() const;
  void set_packed(const PackedWeight& w);
  // (PackedWeight tensor name, registered buffer) in tensors() order.
  NamedTensors buffers_w_;
  // dtype of the weight that was quantized or loaded (the JSON "dtype"); float32 until then.
  torch::Dtype weight_dtype_ = torch::kFloat32;
  detail::PackedWeightCache cache_;
};

/// Holder of Linear4bitImpl (TORCH_MODULE's expansion plus the static from_linear).
class Linear4bit : public torch::nn::ModuleHolder<Linear4bitImpl> {
 public:
  using torch::nn::ModuleHolder<Linear4bitImpl>::ModuleHolder;
  using Impl = Linear4bitImpl;
  /// See Linear4bitImpl::from_linear.
  static Linear4bit from_linear(const torch::nn::Linear& linear,
                                std::optional<Linear4bitOptions> options = std::nullopt) {
    return Linear4bitImpl::from_linear(linear, std::move(options));
  }
};

/// bitsandbytes' LinearNF4: a Linear4bit with quant_type "nf4".
Linear4bit LinearNF4(int64_t in_features, int64_t out_features, bool bias = true,
                     bool compress_statistics = true,
                     std::optional<torch::Dtype> compute_dtype = std::nullopt,
                     std::optional<int64_t> blocksize = std::nullopt);
/// bitsandbytes' LinearFP4: a Linear4bit with quant_type "fp4".
Linear4bit LinearFP4(int64_t in_features, int64_t out_features, bool bias = true,
                     bool compress_statistics = true,
                     std::optional<torch::Dtype> compute_dtype = std::nullopt,
                     std::optional<int64_t> blocksize = std::nullopt);

}  // namespace msbnb::nn
