// Sampling, generation with a KV cache, sliding-window perplexity.
#include "msbnb/models/generate.h"

#include <c10/util/Exception.h>
#include <torch/nn/functional/loss.h>

#include <chrono>
#include <cmath>

namespace msbnb::models {
namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

void SamplingOptions::validate() const {
  TORCH_CHECK(max_new_tokens >= 0 && max_new_tokens <= (1 << 20),
              "max_new_tokens: expected in [0, 2^20], got ", max_new_tokens);
  TORCH_CHECK(std::isfinite(temperature) && temperature >= 0,
              "temperature: expected a finite number >= 0, got ", temperature);
  TORCH_CHECK(top_k >= 0, "top_k: expected >= 0, got ", top_k);
  TORCH_CHECK(std::isfinite(top_p) && top_p > 0 && top_p <= 1, "top_p: expected a number in (0, 1], got ",
              top_p);
}

int64_t sample_token(const torch::Tensor& logits_in, const SamplingOptions& o, std::mt19937_64& rng) {
  torch::Tensor logits = logits_in.to(torch::kFloat32).reshape({-1});
  if (o.temperature == 0) return logits.argmax().item<int64_t>();  // first maximum
  torch::Tensor probs = torch::softmax(logits / o.temperature, 0);
  torch::Tensor sorted, idx;
  std::tie(sorted, idx) = probs.sort(/*dim=*/0, /*descending=*/true);
  int64_t keep = sorted.size(0);
  if (o.top_k > 0) keep = std::min(keep, o.top_k);
  if (o.top_p < 1) {
    // The smallest prefix whose mass reaches top_p (at least one token).
    torch::Tensor cum = sorted.cumsum(0);
    const int64_t below = (cum < o.top_p).sum().item<int64_t>();
    keep = std::min(keep, below + 1);
  }
  const auto* p = sorted.data_ptr<float>();
  double mass = 0;
  for (int64_t i = 0; i < keep; ++i) mass += p[i];
  std::uniform_real_distribution<double> u(0.0, mass);
  double r = u(rng), acc = 0;
  for (int64_t i = 0; i < keep; ++i) {
    acc += p[i];
    if (r < acc) return idx[i].item<int64_t>();
  }
  return idx[keep - 1].item<int64_t>();
}

GenerationResult generate(LlamaForCausalLMImpl& model, const std::vector<int64_t>& prompt,
                          const SamplingOptions& options, const std::function<void(int64_t)>& on_token) {
  options.validate();
  TORCH_CHECK(!prompt.empty(), "prompt: expected at least one token, got none");
  torch::NoGradGuard no_grad;
  GenerationResult res;
  res.prompt_tokens = static_cast<int64_t>(prompt.size());
  if (options.max_new_tokens == 0) return res;
  std::mt19937_64 rng(options.seed);
  KVCache cache = model.make_cache(1, res.prompt_tokens + options.max_new_tokens);
  auto t0 = std::chrono::steady_clock::now();
  torch::Tensor ids = torch::tensor(prompt, torch::kInt64).unsqueeze(0);
  torch::Tensor logits = model.forward(ids, &cache, /*last_only=*/true);
  int64_t next = sample_token(logits[0][0], options, rng);
  res.prefill_seconds = seconds_since(t0);
  res.tokens.push_back(next);
  if (on_token) on_token(next);
  t0 = std::chrono::steady_clock::now();
  while (static_cast<int64_t>(res.tokens.size()) < options.max_new_tokens &&
         !(options.eos_token_id && next == *options.eos_token_id)) {
    logits = model.forward(torch::tensor({{next}}, torch::kInt64), &cache, true);
    next = sample_token(logits[0][0], options, rng);
    res.tokens.push_back(next);
    if (on_token) on_token(next);
  }
  res.decode_seconds = seconds_since(t0);
  return res;
}

PerplexityResult perplexity(LlamaForCausalLMImpl& model, const std::vector<int64_t>& tokens, int64_t window,
                            int64_t stride, const std::function<void(int64_t, int64_t)>& progress) {
  TORCH_CHECK(tokens.size() >= 2, "perplexity: expected at least 2 tokens, got ", tokens.size());
  TORCH_CHECK(window >= 2 && window <= model.config().max_position_embeddings,
              "perplexity: window: expected in [2, max_position_embeddings = ",
              model.config().max_position_embeddings, "], got ", window);
  TORCH_CHECK(stride > 0 && stride <= window, "perplexity: stride: expected in [1, window = ", window,
              "], got ", stride);
  torch::NoGradGuard no_grad;
  const auto t0 = std::chrono::steady_clock::now();
  const auto n = static_cast<int64_t>(tokens.size());
  torch::Tensor all = torch::tensor(tokens, torch::kInt64);
  double nll_sum = 0;
  int64_t scored = 0, prev_end = 0;
  const int64_t total = std::max<int64_t>(1, (n - 1 + stride - 1) / stride);
  int64_t done = 0;
  for (int64_t begin = 0; prev_end < n; begin += stride) {
    const int64_t end = std::min(begin + window, n);
    const int64_t fresh = end - std::max(prev_end, begin + 1);  // targets not scored before
    if (fresh > 0) {
      torch::Tensor ids = all.slice(0, begin, end).unsqueeze(0);
      torch::Tensor logits = model.forward(ids);  // [1, L, V]
      const int64_t L = end - begin;
      torch::Tensor pred = logits[0].slice(0, L - 1 - fresh, L - 1);
      torch::Tensor target = all.slice(0, end - fresh, end);
      nll_sum += torch::nn::functional::cross_entropy(
                     pred, target, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                     .item<double>();
      scored += fresh;
    }
    prev_end = end;
    if (progress) progress(++done, total);
    if (end == n) break;
  }
  PerplexityResult r;
  r.tokens = scored;
  r.nll = nll_sum / static_cast<double>(scored);
  r.perplexity = std::exp(r.nll);
  r.seconds = seconds_since(t0);
  return r;
}

}  // namespace msbnb::models
