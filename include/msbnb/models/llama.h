// A LLaMA-family decoder (LlamaForCausalLM) for the PyTorch C++ frontend, numerically as Hugging
// Face transformers computes it: RMSNorm (in float32), rotary position embeddings in the
// rotate-half layout transformers uses (default or llama3 frequencies), grouped-query attention,
// SwiGLU MLP, an optional KV cache.
//
// THE MODULE TREE has transformers' names, so state dicts, PEFT adapters and quantized
// checkpoints line up key for key:
//   model.embed_tokens                      torch::nn::Embedding [vocab, hidden]
//   model.layers.<i>.self_attn.{q,k,v,o}_proj
//   model.layers.<i>.mlp.{gate,up,down}_proj
//   model.layers.<i>.{input,post_attention}_layernorm   RMSNorm (parameter "weight")
//   model.norm                              RMSNorm
//   lm_head                                 linear [vocab, hidden] (with tie_word_embeddings its
//                                           weight IS model.embed_tokens.weight)
// The linear layers are built by a LinearFactory (torch::nn::Linear, msbnb::nn::Linear8bit or
// Linear4bit directly, so a quantized model never holds float weights) and held through
// torch::nn::AnyModule with msbnb::ChildReplaceHook: convert_to_quantized_model_inplace and
// msbnb::lora::inject_lora replace them in place and the forward runs the replacements.
//
// Compute: activations in float32 (the embedding and norm weights are float32 parameters);
// quantized linears take float32 input through msbnb's fused kernels. Everything is
// differentiable (QLoRA training runs through forward()); generation wraps it in NoGradGuard.
// The modules are not Cloneable (their children are built by a factory): convert with the
// in-place msbnb::convert_to_quantized_model_inplace.
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "msbnb/convert/convert.h"
#include "msbnb/models/llama_config.h"

namespace msbnb::models {

/// Builds the linear layer at dotted `name` ("model.layers.0.self_attn.q_proj", "lm_head").
using LinearFactory = std::function<torch::nn::AnyModule(const std::string& name, int64_t in_features,
                                                         int64_t out_features, bool bias)>;
/// torch::nn::Linear layers (float32, torch's default init).
LinearFactory float_linear_factory();

/// Keys and values of every layer for incremental decoding. Storage is allocated once for
/// `capacity` positions: [batch, kv_heads, capacity, head_dim] float32 per layer.
class KVCache {
 public:
  KVCache(const LlamaConfig& config, int64_t batch, int64_t capacity);
  /// Positions already in the cache.
  int64_t length() const { return length_; }
  int64_t capacity() const { return capacity_; }
  int64_t batch() const { return batch_; }
  void clear() { length_ = 0; }
  /// Bytes of the cache storage.
  int64_t memory_bytes() const;

  // Used by the attention layers: append [batch, kv_heads, t, head_dim] of layer `layer` at
  // positions length() .. length()+t-1 and return the keys / values of all positions so far.
  std::pair<torch::Tensor, torch::Tensor> append(int64_t layer, const torch::Tensor& k,
                                                 const torch::Tensor& v);
  /// Advances length() by t (the model calls it after the last layer).
  void advance(int64_t t);

 private:
  std::vector<torch::Tensor> k_, v_;
  int64_t batch_ = 0, capacity_ = 0, length_ = 0;
};

/// LLaMA's RMSNorm: weight · x / sqrt(mean(x²) + eps), computed in float32.
class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;
  int64_t dim;
  double eps;
};
TORCH_MODULE(RMSNorm);

/// cos / sin tables of the rotary embedding ([positions, head_dim], transformers' layout:
/// the frequencies repeated twice along head_dim).
class RotaryEmbedding {
 public:
  explicit RotaryEmbedding(const LlamaConfig& config);
  /// cos, sin for positions [start, start + n) (tables grow on demand).
  std::pair<torch::Tensor, torch::Tensor> get(int64_t start, int64_t n);
  /// The inverse frequencies [head_dim / 2] (llama3 scaling applied).
  const torch::Tensor& inv_freq() const { return inv_freq_; }

 private:
  torch::Tensor inv_freq_, cos_, sin_;
};

class LlamaAttentionImpl : public torch::nn::Module, public msbnb::ChildReplaceHook {
 public:
  LlamaAttentionImpl(const LlamaConfig& config, const std::string& prefix, const LinearFactory& factory);
  /// x [B, T, hidden], cos / sin [T, head_dim]; cache: keys / values appended at its length.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        KVCache* cache, int64_t layer_index);
  void child_replaced(const std::string& name, const torch::nn::AnyModule& replacement) override;
  torch::nn::AnyModule q_proj, k_proj, v_proj, o_proj;

 private:
  int64_t heads_, kv_heads_, head_dim_;
};
TORCH_MODULE(LlamaAttention);

class LlamaMLPImpl : public torch::nn::Module, public msbnb::ChildReplaceHook {
 public:
  LlamaMLPImpl(const LlamaConfig& config, const std::string& prefix, const LinearFactory& factory);
  /// down(silu(gate(x)) · up(x))
  torch::Tensor forward(const torch::Tensor& x);
  void child_replaced(const std::string& name, const torch::nn::AnyModule& replacement) override;
  torch::nn::AnyModule gate_proj, up_proj, down_proj;
};
TORCH_MODULE(LlamaMLP);

class LlamaDecoderLayerImpl : public torch::nn::Module {
 public:
  LlamaDecoderLayerImpl(const LlamaConfig& config, const std::string& prefix, const LinearFactory& factory);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        KVCache* cache, int64_t layer_index);
  LlamaAttention self_attn{nullptr};
  LlamaMLP mlp{nullptr};
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
};
TORCH_MODULE(LlamaDecoderLayer);

/// transformers' LlamaModel: embeddings, decoder layers, final norm.
class LlamaModelImpl : public torch::nn::Module {
 public:
  LlamaModelImpl(const LlamaConfig& config, const LinearFactory& factory);
  /// input_ids int64 [B, T] -> hidden states [B, T, hidden] (after the final norm).
  torch::Tensor forward(const torch::Tensor& input_ids, KVCache* cache = nullptr);
  /// Recompute each decoder layer's activations in backward (train::checkpoint) when training
  /// without a cache: activation memory of one layer instead of all.
  bool gradient_checkpointing = false;
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};
  std::vector<LlamaDecoderLayer> layer_list;

 private:
  LlamaConfig config_;
  RotaryEmbedding rope_;
};
TORCH_MODULE(LlamaModel);

/// transformers' LlamaForCausalLM.
/// Example:
///   auto cfg = msbnb::models::read_config("dir");
///   msbnb::models::LlamaForCausalLM m(cfg);                    // float32, random init
///   torch::Tensor logits = m->forward(torch::tensor({{1, 2, 3}}));  // [1, 3, vocab]
/// (msbnb::models::load_pretrained builds and fills one from a checkpoint folder.)
class LlamaForCausalLMImpl : public torch::nn::Module, public msbnb::ChildReplaceHook {
 public:
  explicit LlamaForCausalLMImpl(const LlamaConfig& config,
                                const LinearFactory& factory = float_linear_factory());
  /// input_ids int64 [B, T] with ids in [0, vocab) -> logits float32 [B, T, vocab]. With a
  /// cache: positions continue at cache->length() and the cache is extended by T (capacity
  /// checked). last_only: logits of the last position only ([B, 1, vocab]: generation).
  torch::Tensor forward(const torch::Tensor& input_ids, KVCache* cache = nullptr, bool last_only = false);
  void child_replaced(const std::string& name, const torch::nn::AnyModule& replacement) override;
  const LlamaConfig& config() const { return config_; }
  /// A KV cache for this model.
  KVCache make_cache(int64_t batch, int64_t capacity) const { return KVCache(config_, batch, capacity); }

  LlamaModel model{nullptr};
  torch::nn::AnyModule lm_head;

 private:
  LlamaConfig config_;
};
TORCH_MODULE(LlamaForCausalLM);

}  // namespace msbnb::models
