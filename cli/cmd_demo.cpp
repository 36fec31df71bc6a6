// `msbnb demo`: the README's main job on the built-in model (models/msbnb-kjv-tiny, trained on
// the King James Bible by tools/train_builtin_model.py): load it in float32 and quantized to
// int8, int4, NF4 and NF4 + double quant, and print size, bits per weight, held-out perplexity
// and decode speed against float32; then a sample.
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <iostream>

#include "common.h"
#include "msbnb/models/generate.h"
#include "msbnb/models/tokenizer.h"

namespace msbnb::cli {
namespace {

// The held-out part of the training text: bytes [floor(0.95 · n), n) of `bible -f
// Gen1:1-Rev22:21` (Debian bible-kjv), as tools/train_builtin_model.py split it.
std::string bible_heldout() {
  FILE* p = popen("bible -f Gen1:1-Rev22:21 2>/dev/null", "r");
  TORCH_CHECK(p != nullptr,
              "demo: expected the `bible` program (Debian bible-kjv; bash scripts/setup.sh installs it)");
  std::string text;
  char buf[1 << 16];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) text.append(buf, n);
  pclose(p);
  TORCH_CHECK(text.size() > 1000000,
              "demo: expected the King James text from `bible -f Gen1:1-Rev22:21`, got ", text.size(),
              " bytes (is bible-kjv installed? bash scripts/setup.sh)");
  return text.substr(static_cast<size_t>(std::floor(0.95 * static_cast<double>(text.size()))));
}

}  // namespace

void add_demo(CLI::App& app) {
  struct Opts {
    std::string model = std::string(MSBNB_SOURCE_DIR) + "/models/msbnb-kjv-tiny";
    int64_t eval_tokens = 8192, decode_tokens = 64;
    bool short_mode = false;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* c = app.add_subcommand("demo", "The built-in demo: every format on the built-in KJV model");
  c->add_option("--model", o->model, "checkpoint folder (default: the built-in models/msbnb-kjv-tiny)");
  c->add_option("--eval-tokens", o->eval_tokens, "held-out tokens for the perplexity (default 8192)");
  c->add_option("--decode-tokens", o->decode_tokens, "tokens generated for the speed (default 64)");
  c->add_flag("--short", o->short_mode, "CI mode: 1024 held-out tokens, 16 decoded");
  c->callback([o] {
    if (o->short_mode) {
      o->eval_tokens = 1024;
      o->decode_tokens = 16;
    }
    auto tok = models::load_tokenizer(o->model);
    std::vector<int64_t> held = tok->encode(bible_heldout());
    if (static_cast<int64_t>(held.size()) > o->eval_tokens) held.resize(static_cast<size_t>(o->eval_tokens));
    const std::vector<int64_t> prompt = tok->encode("In the beginning");
    struct Row {
      std::string name, spec;
    };
    const std::vector<Row> rows = {
        {"float32", ""}, {"int8", "int8"}, {"int4", "int4"}, {"nf4", "nf4"}, {"nf4 + dq", "nf4-dq"}};
    std::printf("msbnb demo: %s, %zu held-out KJV bytes, decode %lld tokens, %d threads\n\n",
                o->model.c_str(), held.size(), static_cast<long long>(o->decode_tokens),
                at::get_num_threads());
    std::printf("%-9s %11s %8s %9s %11s %9s %10s %8s\n", "format", "weights", "vs fp32", "bits/w",
                "perplexity", "vs fp32", "decode t/s", "vs fp32");
    double fp_bytes = 0, fp_ppl = 0, fp_tps = 0;
    std::string sample;
    for (const auto& r : rows) {
      models::LoadOptions lo;
      lo.quantize = parse_quantize_option(r.spec);
      models::LoadedModel m = models::load_pretrained(o->model, lo);
      const auto ppl =
          models::perplexity(*m.model, held, std::min<int64_t>(512, m.config.max_position_embeddings), 256);
      models::SamplingOptions s;
      s.max_new_tokens = o->decode_tokens;
      const auto g = models::generate(*m.model, prompt, s);
      const double bytes = static_cast<double>(m.model_bytes);
      const double bpw = 8.0 * bytes / static_cast<double>(m.config.parameter_count());
      if (r.spec.empty()) {
        fp_bytes = bytes;
        fp_ppl = ppl.perplexity;
        fp_tps = g.decode_tokens_per_second();
      }
      std::printf("%-9s %11s %7.2fx %9.2f %11.4f %+8.2f%% %10.1f %7.2fx\n", r.name.c_str(),
                  human_bytes(bytes).c_str(), fp_bytes / bytes, bpw, ppl.perplexity,
                  100.0 * (ppl.perplexity / fp_ppl - 1), g.decode_tokens_per_second(),
                  g.decode_tokens_per_second() / fp_tps);
      if (r.spec == "nf4-dq") sample = tok->decode(g.tokens);
    }
    std::printf(
        "\n(weights: every parameter and buffer in memory; embeddings and lm_head stay float32, as\n"
        " bitsandbytes keeps them; perplexity per byte, sliding windows of 512, stride 256)\n");
    std::printf("\nnf4 + double quant, greedy: In the beginning%s\n", sample.c_str());
  });
}

}  // namespace msbnb::cli
