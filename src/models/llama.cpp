// LlamaForCausalLM for libtorch (transformers' modeling_llama numerics, eager attention).
#include "msbnb/models/llama.h"

#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/linear.h>
#include <torch/nn/modules/linear.h>

#include <cmath>

#include "msbnb/train/checkpoint.h"

namespace msbnb::models {
namespace {

// x @ weight^T (+ bias) for float linears. One row (decode) goes through at::mv: libtorch's
// linear of a [1, 1, K] input runs a GEMM with m = 1 that reads the weight 3x slower than mv
// (measured on the 32000 x 4096 lm_head: 70-90 ms against 24-30 ms).
torch::Tensor float_linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias) {
  if (x.numel() == x.size(-1) && x.scalar_type() == weight.scalar_type()) {
    torch::Tensor y = at::mv(weight, x.reshape({x.size(-1)}));
    if (bias.defined()) y = y + bias;
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = weight.size(0);
    return y.view(shape);
  }
  return torch::nn::functional::linear(x, weight, bias);
}

// A decoder linear: torch's Linear through float_linear, every other module (quantized, LoRA) as is.
torch::Tensor run_linear(torch::nn::AnyModule& m, const torch::Tensor& x) {
  if (auto* lin = m.ptr()->as<torch::nn::LinearImpl>()) return float_linear(x, lin->weight, lin->bias);
  return m.forward(x);
}

// lm_head of a model with tie_word_embeddings: the embedding's own weight tensor, registered
// here too so that the module tree has "lm_head.weight" as transformers' has.
class TiedLMHeadImpl : public torch::nn::Module {
 public:
  explicit TiedLMHeadImpl(const torch::Tensor& embedding_weight) {
    weight = register_parameter("weight", embedding_weight, embedding_weight.requires_grad());
  }
  torch::Tensor forward(const torch::Tensor& x) { return float_linear(x, weight, {}); }
  torch::Tensor weight;
};
TORCH_MODULE(TiedLMHead);

torch::Tensor rotate_half(const torch::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

torch::nn::AnyModule make_linear(torch::nn::Module& parent, const std::string& prefix, const std::string& key,
                                 const LinearFactory& factory, int64_t in, int64_t out, bool bias) {
  const std::string name = prefix.empty() ? key : prefix + "." + key;
  torch::nn::AnyModule m = factory(name, in, out, bias);
  TORCH_CHECK(!m.is_empty(), "LinearFactory: returned an empty module for '", name, "'");
  parent.register_module(key, m.ptr());
  return m;
}

}  // namespace

LinearFactory float_linear_factory() {
  return [](const std::string&, int64_t in, int64_t out, bool bias) {
    return torch::nn::AnyModule(torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(bias)));
  };
}

// ---------------------------------------------------------------------------------------------
// KV cache

KVCache::KVCache(const LlamaConfig& config, int64_t batch, int64_t capacity)
    : batch_(batch), capacity_(capacity) {
  TORCH_CHECK(batch > 0 && batch <= (1 << 16), "KVCache: batch: expected in [1, 65536], got ", batch);
  TORCH_CHECK(capacity > 0 && capacity <= (int64_t{1} << 24),
              "KVCache: capacity: expected in [1, 2^24], got ", capacity);
  const auto opts = torch::TensorOptions().dtype(torch::kFloat32);
  for (int64_t i = 0; i < config.num_hidden_layers; ++i) {
    k_.push_back(torch::empty({batch, config.num_key_value_heads, capacity, config.head_dim}, opts));
    v_.push_back(torch::empty({batch, config.num_key_value_heads, capacity, config.head_dim}, opts));
  }
}

int64_t KVCache::memory_bytes() const {
  int64_t n = 0;
  for (const auto& t : k_) n += 2 * t.numel() * 4;
  return n;
}

std::pair<torch::Tensor, torch::Tensor> KVCache::append(int64_t layer, const torch::Tensor& k,
                                                        const torch::Tensor& v) {
  TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(k_.size()), "KVCache: layer ", layer,
              " out of range");
  const int64_t t = k.size(2);
  TORCH_CHECK(k.size(0) == batch_, "KVCache: batch: expected ", batch_, ", got ", k.size(0));
  TORCH_CHECK(length_ + t <= capacity_, "KVCache: capacity: expected at most ", capacity_, " positions, got ",
              length_ + t, " (make a larger cache)");
  k_[layer].narrow(2, length_, t).copy_(k);
  v_[layer].narrow(2, length_, t).copy_(v);
  return {k_[layer].narrow(2, 0, length_ + t), v_[layer].narrow(2, 0, length_ + t)};
}

void KVCache::advance(int64_t t) { length_ += t; }

// ---------------------------------------------------------------------------------------------
// RMSNorm, RoPE

RMSNormImpl::RMSNormImpl(int64_t dim_, double eps_) : dim(dim_), eps(eps_) {
  weight = register_parameter("weight", torch::ones({dim}));
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  const torch::Tensor xf = x.to(torch::kFloat32);
  const torch::Tensor var = xf.pow(2).mean(-1, /*keepdim=*/true);
  return weight * (xf * torch::rsqrt(var + eps));
}

RotaryEmbedding::RotaryEmbedding(const LlamaConfig& c) {
  const int64_t half = c.head_dim / 2;
  // transformers: inv_freq = 1 / theta^(arange(0, dim, 2) / dim), computed in float32 from an
  // int64 arange (the same float32 rounding as Python's).
  torch::Tensor idx = torch::arange(0, c.head_dim, 2, torch::kInt64).to(torch::kFloat32);
  inv_freq_ = 1.0 / torch::pow(c.rope_theta, idx / static_cast<double>(c.head_dim));
  if (c.rope_type == "llama3") {
    // transformers' _compute_llama3_parameters.
    const double low_wavelen = c.rope_original_max_position_embeddings / c.rope_low_freq_factor;
    const double high_wavelen = c.rope_original_max_position_embeddings / c.rope_high_freq_factor;
    torch::Tensor wavelen = 2 * M_PI / inv_freq_;
    torch::Tensor scaled = torch::where(wavelen > low_wavelen, inv_freq_ / c.rope_factor, inv_freq_);
    torch::Tensor smooth = (c.rope_original_max_position_embeddings / wavelen - c.rope_low_freq_factor) /
                           (c.rope_high_freq_factor - c.rope_low_freq_factor);
    torch::Tensor smoothed = (1 - smooth) * scaled / c.rope_factor + smooth * scaled;
    torch::Tensor medium = (wavelen >= high_wavelen).logical_and(wavelen <= low_wavelen);
    inv_freq_ = torch::where(medium, smoothed, scaled);
  }
  TORCH_CHECK(inv_freq_.size(0) == half, "RotaryEmbedding: internal size mismatch");
}

std::pair<torch::Tensor, torch::Tensor> RotaryEmbedding::get(int64_t start, int64_t n) {
  const int64_t need = start + n;
  if (!cos_.defined() || cos_.size(0) < need) {
    int64_t cap = cos_.defined() ? cos_.size(0) : 0;
    cap = std::max<int64_t>({need, 2 * cap, 256});
    torch::Tensor pos = torch::arange(cap, torch::kInt64).to(torch::kFloat32);
    torch::Tensor freqs = torch::outer(pos, inv_freq_);  // float32 as transformers' matmul
    torch::Tensor emb = torch::cat({freqs, freqs}, -1);
    cos_ = emb.cos();
    sin_ = emb.sin();
  }
  return {cos_.narrow(0, start, n), sin_.narrow(0, start, n)};
}

// ---------------------------------------------------------------------------------------------
// Attention, MLP, decoder layer

LlamaAttentionImpl::LlamaAttentionImpl(const LlamaConfig& c, const std::string& prefix,
                                       const LinearFactory& f)
    : heads_(c.num_attention_heads), kv_heads_(c.num_key_value_heads), head_dim_(c.head_dim) {
  const int64_t h = c.hidden_size, qd = heads_ * head_dim_, kvd = kv_heads_ * head_dim_;
  q_proj = make_linear(*this, prefix, "q_proj", f, h, qd, c.attention_bias);
  k_proj = make_linear(*this, prefix, "k_proj", f, h, kvd, c.attention_bias);
  v_proj = make_linear(*this, prefix, "v_proj", f, h, kvd, c.attention_bias);
  o_proj = make_linear(*this, prefix, "o_proj", f, qd, h, c.attention_bias);
}

void LlamaAttentionImpl::child_replaced(const std::string& name, const torch::nn::AnyModule& m) {
  if (name == "q_proj") q_proj = m;
  if (name == "k_proj") k_proj = m;
  if (name == "v_proj") v_proj = m;
  if (name == "o_proj") o_proj = m;
}

torch::Tensor LlamaAttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& cos,
                                          const torch::Tensor& sin, KVCache* cache, int64_t layer_index) {
  const int64_t B = x.size(0), T = x.size(1), g = heads_ / kv_heads_;
  torch::Tensor q = run_linear(q_proj, x).view({B, T, heads_, head_dim_}).transpose(1, 2);
  torch::Tensor k = run_linear(k_proj, x).view({B, T, kv_heads_, head_dim_}).transpose(1, 2);
  torch::Tensor v = run_linear(v_proj, x).view({B, T, kv_heads_, head_dim_}).transpose(1, 2);
  q = q * cos + rotate_half(q) * sin;
  k = k * cos + rotate_half(k) * sin;
  const int64_t past = cache != nullptr ? cache->length() : 0;
  if (cache != nullptr) std::tie(k, v) = cache->append(layer_index, k, v);
  const int64_t S = k.size(2);
  // Grouped-query attention without copying keys: the g query heads that share a key/value
  // head become g·T rows of one product (transformers' repeat_kv gives the same pairing).
  torch::Tensor qg = q.reshape({B, kv_heads_, g * T, head_dim_});
  torch::Tensor scores =
      torch::matmul(qg, k.transpose(2, 3)) * (1.0 / std::sqrt(static_cast<double>(head_dim_)));
  if (T > 1) {
    // Query t (absolute position past + t) sees keys 0 .. past + t.
    torch::Tensor qpos = torch::arange(T, torch::kInt64).unsqueeze(1) + past;
    torch::Tensor kpos = torch::arange(S, torch::kInt64).unsqueeze(0);
    torch::Tensor masked = (kpos > qpos);  // [T, S]
    scores = scores.view({B, kv_heads_, g, T, S})
                 .masked_fill(masked, -std::numeric_limits<float>::infinity())
                 .view({B, kv_heads_, g * T, S});
  }
  torch::Tensor probs = torch::softmax(scores, -1, torch::kFloat32);
  torch::Tensor out = torch::matmul(probs, v)
                          .view({B, heads_, T, head_dim_})
                          .transpose(1, 2)
                          .reshape({B, T, heads_ * head_dim_});
  return run_linear(o_proj, out);
}

LlamaMLPImpl::LlamaMLPImpl(const LlamaConfig& c, const std::string& prefix, const LinearFactory& f) {
  gate_proj = make_linear(*this, prefix, "gate_proj", f, c.hidden_size, c.intermediate_size, c.mlp_bias);
  up_proj = make_linear(*this, prefix, "up_proj", f, c.hidden_size, c.intermediate_size, c.mlp_bias);
  down_proj = make_linear(*this, prefix, "down_proj", f, c.intermediate_size, c.hidden_size, c.mlp_bias);
}

void LlamaMLPImpl::child_replaced(const std::string& name, const torch::nn::AnyModule& m) {
  if (name == "gate_proj") gate_proj = m;
  if (name == "up_proj") up_proj = m;
  if (name == "down_proj") down_proj = m;
}

torch::Tensor LlamaMLPImpl::forward(const torch::Tensor& x) {
  return run_linear(down_proj, torch::silu(run_linear(gate_proj, x)) * run_linear(up_proj, x));
}

LlamaDecoderLayerImpl::LlamaDecoderLayerImpl(const LlamaConfig& c, const std::string& prefix,
                                             const LinearFactory& f) {
  self_attn = register_module("self_attn", LlamaAttention(c, prefix + ".self_attn", f));
  mlp = register_module("mlp", LlamaMLP(c, prefix + ".mlp", f));
  input_layernorm = register_module("input_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
  post_attention_layernorm =
      register_module("post_attention_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
}

torch::Tensor LlamaDecoderLayerImpl::forward(const torch::Tensor& x, const torch::Tensor& cos,
                                             const torch::Tensor& sin, KVCache* cache, int64_t layer_index) {
  torch::Tensor h = x + self_attn->forward(input_layernorm->forward(x), cos, sin, cache, layer_index);
  return h + mlp->forward(post_attention_layernorm->forward(h));
}

// ---------------------------------------------------------------------------------------------
// Model

LlamaModelImpl::LlamaModelImpl(const LlamaConfig& c, const LinearFactory& f) : config_(c), rope_(c) {
  c.validate("LlamaConfig");
  embed_tokens = register_module("embed_tokens", torch::nn::Embedding(c.vocab_size, c.hidden_size));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    LlamaDecoderLayer layer(c, "model.layers." + std::to_string(i), f);
    layers->push_back(layer);
    layer_list.push_back(layer);
  }
  norm = register_module("norm", RMSNorm(c.hidden_size, c.rms_norm_eps));
}

torch::Tensor LlamaModelImpl::forward(const torch::Tensor& input_ids, KVCache* cache) {
  TORCH_CHECK(input_ids.defined() && input_ids.dim() == 2, "input_ids: expected int64 [batch, tokens], got ",
              input_ids.defined() ? input_ids.sizes() : c10::IntArrayRef{});
  TORCH_CHECK(input_ids.scalar_type() == torch::kInt64, "input_ids: expected int64, got ",
              input_ids.scalar_type());
  TORCH_CHECK(input_ids.device().is_cpu(), "input_ids: expected a CPU tensor, got ", input_ids.device());
  TORCH_CHECK(input_ids.size(0) > 0 && input_ids.size(1) > 0,
              "input_ids: expected at least one token, got shape ", input_ids.sizes());
  const int64_t lo = input_ids.min().item<int64_t>(), hi = input_ids.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < config_.vocab_size, "input_ids: expected ids in [0, ", config_.vocab_size,
              "), got ", lo < 0 ? lo : hi);
  const int64_t past = cache != nullptr ? cache->length() : 0;
  const int64_t T = input_ids.size(1);
  auto [cos, sin] = rope_.get(past, T);
  torch::Tensor h = embed_tokens->forward(input_ids);
  const bool recompute = gradient_checkpointing && cache == nullptr && torch::GradMode::is_enabled();
  for (size_t i = 0; i < layer_list.size(); ++i) {
    if (recompute) {
      // Captured by value: backward recomputes the layer after this function has returned.
      h = train::checkpoint(
          [layer = layer_list[i].ptr(), cos_t = cos, sin_t = sin](const torch::Tensor& x) {
            return layer->forward(x, cos_t, sin_t, nullptr, 0);
          },
          h);
    } else {
      h = layer_list[i]->forward(h, cos, sin, cache, static_cast<int64_t>(i));
    }
  }
  if (cache != nullptr) cache->advance(T);
  return norm->forward(h);
}

LlamaForCausalLMImpl::LlamaForCausalLMImpl(const LlamaConfig& c, const LinearFactory& f) : config_(c) {
  model = register_module("model", LlamaModel(c, f));
  if (c.tie_word_embeddings) {
    lm_head = torch::nn::AnyModule(TiedLMHead(model->embed_tokens->weight));
    register_module("lm_head", lm_head.ptr());
  } else {
    lm_head = make_linear(*this, "", "lm_head", f, c.hidden_size, c.vocab_size, false);
  }
}

void LlamaForCausalLMImpl::child_replaced(const std::string& name, const torch::nn::AnyModule& m) {
  if (name == "lm_head") lm_head = m;
}

torch::Tensor LlamaForCausalLMImpl::forward(const torch::Tensor& input_ids, KVCache* cache, bool last_only) {
  torch::Tensor h = model->forward(input_ids, cache);
  if (last_only) h = h.narrow(1, h.size(1) - 1, 1);
  return run_linear(lm_head, h);
}

}  // namespace msbnb::models
