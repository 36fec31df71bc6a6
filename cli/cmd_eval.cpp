// `msbnb eval CHECKPOINT --text FILE`: sliding-window perplexity and tokens per second.
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "common.h"
#include "msbnb/models/generate.h"
#include "msbnb/models/tokenizer.h"

namespace msbnb::cli {

void add_eval(CLI::App& app) {
  struct Opts {
    std::string dir, text;
    LoadFlags load;
    int64_t window = 0, stride = 0, max_tokens = 0;
    bool json = false;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* c = app.add_subcommand("eval", "Perplexity of a checkpoint on a text file");
  c->add_option("CHECKPOINT", o->dir, "checkpoint folder")->required();
  c->add_option("--text", o->text, "UTF-8 text file")->required();
  c->add_option("--window", o->window, "tokens per window (default: max_position_embeddings, at most 512)");
  c->add_option("--stride", o->stride, "window step (default: window / 2)");
  c->add_option("--max-tokens", o->max_tokens, "evaluate only the first N tokens (0: all)");
  o->load.add_to(*c);
  c->add_flag("--json", o->json, "machine-readable output");
  c->callback([o] {
    const std::string text = read_text_file(o->text, "--text");
    models::LoadedModel m = o->load.load(o->dir);
    auto tok = models::load_tokenizer(o->dir);
    std::vector<int64_t> ids = tok->encode(text);
    if (o->max_tokens > 0 && static_cast<int64_t>(ids.size()) > o->max_tokens)
      ids.resize(static_cast<size_t>(o->max_tokens));
    TORCH_CHECK(ids.size() >= 2, o->text, ": expected at least 2 tokens of text, got ", ids.size());
    const int64_t window =
        o->window > 0 ? o->window : std::min<int64_t>(512, m.config.max_position_embeddings);
    const int64_t stride = o->stride > 0 ? o->stride : std::max<int64_t>(1, window / 2);
    models::PerplexityResult r;
    {
      ProgressBar bar("eval");
      r = models::perplexity(*m.model, ids, window, stride, [&](int64_t d, int64_t t) { bar.update(d, t); });
    }
    if (o->json) {
      nlohmann::json j = {{"perplexity", r.perplexity},
                          {"nll", r.nll},
                          {"tokens", r.tokens},
                          {"seconds", r.seconds},
                          {"tokens_per_second", r.tokens_per_second()},
                          {"window", window},
                          {"stride", stride},
                          {"model_bytes", m.model_bytes}};
      std::cout << j.dump(2) << "\n";
      return;
    }
    std::printf("%s (%s, %s in memory) on %s\n", o->dir.c_str(),
                m.quantization ? m.quantization->describe().c_str() : "float32",
                human_bytes(static_cast<double>(m.model_bytes)).c_str(), o->text.c_str());
    std::printf(
        "  perplexity %.4f (%.4f nats/token) over %lld tokens, window %lld, stride %lld, %.1f tokens/s\n",
        r.perplexity, r.nll, static_cast<long long>(r.tokens), static_cast<long long>(window),
        static_cast<long long>(stride), r.tokens_per_second());
  });
}

}  // namespace msbnb::cli
