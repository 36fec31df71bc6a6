// Text generation and perplexity for LlamaForCausalLM: greedy, temperature, top-k and top-p
// (nucleus) sampling with a KV cache, and perplexity over a token sequence in sliding windows
// (Hugging Face's recipe: windows of `window` tokens advancing by `stride`, each scoring only
// the tokens the previous windows did not).
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <random>
#include <vector>

#include "msbnb/models/llama.h"

namespace msbnb::models {

/// Sampling options (transformers' generate() names).
///  temperature  0: greedy (argmax; ties: the lowest id). > 0: softmax(logits / temperature)
///  top_k        keep the k most likely tokens (0: all)
///  top_p        keep the smallest set of most likely tokens whose probability reaches top_p (1: all)
///  eos_token_id stop after generating it (unset: never stop early)
struct SamplingOptions {
  int64_t max_new_tokens = 64;
  double temperature = 0.0;
  int64_t top_k = 0;
  double top_p = 1.0;
  uint64_t seed = 0;
  std::optional<int64_t> eos_token_id;
  void validate() const;
};

/// The next token from logits [vocab] (float) under `options`; greedy uses no randomness.
int64_t sample_token(const torch::Tensor& logits, const SamplingOptions& options, std::mt19937_64& rng);

/// What generate() produced, with timings: prefill (the prompt in one forward) and decode (one
/// forward per new token after the first).
struct GenerationResult {
  std::vector<int64_t> tokens;  // the new tokens
  double prefill_seconds = 0, decode_seconds = 0;
  int64_t prompt_tokens = 0;
  double prefill_tokens_per_second() const {
    return prefill_seconds > 0 ? prompt_tokens / prefill_seconds : 0;
  }
  double decode_tokens_per_second() const {
    return decode_seconds > 0 && tokens.size() > 1 ? (static_cast<double>(tokens.size()) - 1) / decode_seconds
                                                   : 0;
  }
};

/// Generates up to max_new_tokens after `prompt` (non-empty); the KV cache holds prompt +
/// max_new_tokens positions. on_token is called with each new token as it is produced.
GenerationResult generate(LlamaForCausalLMImpl& model, const std::vector<int64_t>& prompt,
                          const SamplingOptions& options, const std::function<void(int64_t)>& on_token = {});

/// Perplexity of a token sequence.
///  nll    mean negative log-likelihood per scored token (nats)
///  tokens scored tokens (all but the first)
struct PerplexityResult {
  double nll = 0, perplexity = 0, seconds = 0;
  int64_t tokens = 0;
  double tokens_per_second() const { return seconds > 0 ? tokens / seconds : 0; }
};

/// Sliding-window perplexity (see the top of this header); window <= max_position_embeddings,
/// 0 < stride <= window. progress(done, total) after each window.
PerplexityResult perplexity(LlamaForCausalLMImpl& model, const std::vector<int64_t>& tokens, int64_t window,
                            int64_t stride, const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace msbnb::models
