// `msbnb generate CHECKPOINT --prompt TEXT`: load (optionally quantizing while loading, with an
// adapter), generate with the KV cache, print the text as it comes and the speed.
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "common.h"
#include "msbnb/models/generate.h"
#include "msbnb/models/tokenizer.h"

namespace msbnb::cli {

void add_generate(CLI::App& app) {
  struct Opts {
    std::string dir, prompt = "In the beginning";
    LoadFlags load;
    models::SamplingOptions s;
    bool json = false;
  };
  auto o = std::make_shared<Opts>();
  o->s.max_new_tokens = 128;
  CLI::App* c = app.add_subcommand("generate", "Generate text from a checkpoint folder");
  c->add_option("CHECKPOINT", o->dir, "checkpoint folder")->required();
  c->add_option("--prompt", o->prompt, "prompt text");
  c->add_option("--max-new-tokens", o->s.max_new_tokens, "tokens to generate (default 128)");
  c->add_option("--temperature", o->s.temperature, "0: greedy (default); > 0: sampling");
  c->add_option("--top-k", o->s.top_k, "keep the k most likely tokens (0: all)");
  c->add_option("--top-p", o->s.top_p, "nucleus sampling mass (1: all)");
  c->add_option("--seed", o->s.seed, "sampling seed");
  o->load.add_to(*c);
  c->add_flag("--json", o->json, "machine-readable output");
  c->callback([o] {
    models::LoadedModel m = o->load.load(o->dir);
    auto tok = models::load_tokenizer(o->dir);
    std::vector<int64_t> prompt = tok->encode(o->prompt);
    if (tok->bos_id()) prompt.insert(prompt.begin(), *tok->bos_id());
    o->s.eos_token_id = tok->eos_id();
    if (!o->json) std::cout << o->prompt << std::flush;
    // Stream the text: decode everything generated so far and print what is new (a
    // multi-byte character or a space-prefixed piece comes out whole).
    std::vector<int64_t> out;
    size_t printed = 0;
    auto on_token = [&](int64_t t) {
      if (o->json) return;
      out.push_back(t);
      const std::string text = tok->decode(out);
      if (text.size() > printed) {
        std::cout << text.substr(printed) << std::flush;
        printed = text.size();
      }
    };
    models::GenerationResult r = models::generate(*m.model, prompt, o->s, on_token);
    if (o->json) {
      nlohmann::json j = {{"prompt", o->prompt},
                          {"text", tok->decode(r.tokens)},
                          {"tokens", r.tokens},
                          {"prompt_tokens", r.prompt_tokens},
                          {"prefill_tokens_per_second", r.prefill_tokens_per_second()},
                          {"decode_tokens_per_second", r.decode_tokens_per_second()},
                          {"model_bytes", m.model_bytes}};
      std::cout << j.dump(2) << "\n";
      return;
    }
    std::cout << "\n";
    std::fprintf(stderr,
                 "[%s, %s in memory: prefill %.1f tok/s (%lld tokens), decode %.1f tok/s (%zu tokens)]\n",
                 m.quantization ? m.quantization->describe().c_str() : "float32",
                 human_bytes(static_cast<double>(m.model_bytes)).c_str(), r.prefill_tokens_per_second(),
                 static_cast<long long>(r.prompt_tokens), r.decode_tokens_per_second(), r.tokens.size());
  });
}

}  // namespace msbnb::cli
