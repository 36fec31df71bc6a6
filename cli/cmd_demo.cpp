// `msbnb demo`: the README's main job on the built-in model (models/msbnb-kjv-tiny, trained on
// the King James Bible by tools/train_builtin_model.py): load it in float32 and quantized to
// int8, int4, NF4 and NF4 + double quant, and print size, bits per weight, held-out perplexity
// and decode speed against float32; a sample; then QLoRA: the NF4 + double quant model fine-tuned
// with LoRA and 8-bit AdamW on /usr/share/common-licenses for about a minute, held-out
// perplexity before and after, the PEFT adapter and the loss curve saved, and a sample.
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <set>
#include <vector>

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

// Every file of /usr/share/common-licenses once (GPL -> GPL-3 etc. are links), sorted: the first
// 90 % of each trains, the last 10 % is held out.
void license_texts(std::string& train, std::string& held_out) {
  namespace fs = std::filesystem;
  const fs::path dir = "/usr/share/common-licenses";
  TORCH_CHECK(fs::is_directory(dir), "demo: expected ", dir.string(), " (Debian base-files), found none");
  std::set<fs::path> seen;
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir)) {
    const fs::path real = fs::canonical(e.path());
    if (fs::is_regular_file(real) && seen.insert(real).second) files.push_back(real);
  }
  std::sort(files.begin(), files.end());
  for (const auto& f : files) {
    const std::string s = read_text_file(f.string(), "demo");
    const size_t cut = s.size() * 9 / 10;
    train += s.substr(0, cut);
    held_out += s.substr(cut);
  }
}

}  // namespace

void add_demo(CLI::App& app) {
  struct Opts {
    std::string model = std::string(MSBNB_SOURCE_DIR) + "/models/msbnb-kjv-tiny";
    std::string out = "msbnb-demo-adapter";
    int64_t eval_tokens = 8192, decode_tokens = 64;
    double finetune_seconds = 60;
    bool short_mode = false;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* c = app.add_subcommand("demo", "The built-in demo: every format on the built-in KJV model");
  c->add_option("--model", o->model, "checkpoint folder (default: the built-in models/msbnb-kjv-tiny)");
  c->add_option("--eval-tokens", o->eval_tokens, "held-out tokens for the perplexity (default 8192)");
  c->add_option("--decode-tokens", o->decode_tokens, "tokens generated for the speed (default 64)");
  c->add_option("--finetune-seconds", o->finetune_seconds, "time budget of the QLoRA step (default 60)");
  c->add_option("--out", o->out, "folder for the QLoRA adapter and its loss curve")->capture_default_str();
  c->add_flag("--short", o->short_mode, "CI mode: 1024 held-out tokens, 16 decoded, 8 s of QLoRA");
  c->callback([o] {
    if (o->short_mode) {
      o->eval_tokens = 1024;
      o->decode_tokens = 16;
      o->finetune_seconds = std::min(o->finetune_seconds, 8.0);
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
      // A 64-token decode of this model takes ~0.1 s: one run is at the mercy of whatever else
      // wakes up on 2 cores, so the speed is the median of three (greedy: the same tokens each time).
      std::vector<double> tps;
      models::GenerationResult g;
      for (int rep = 0; rep < 3; ++rep) {
        g = models::generate(*m.model, prompt, s);
        tps.push_back(g.decode_tokens_per_second());
      }
      std::sort(tps.begin(), tps.end());
      const double decode_tps = tps[1];
      const double bytes = static_cast<double>(m.model_bytes);
      const double bpw = 8.0 * bytes / static_cast<double>(m.config.parameter_count());
      if (r.spec.empty()) {
        fp_bytes = bytes;
        fp_ppl = ppl.perplexity;
        fp_tps = decode_tps;
      }
      std::printf("%-9s %11s %7.2fx %9.2f %11.4f %+8.2f%% %10.1f %7.2fx\n", r.name.c_str(),
                  human_bytes(bytes).c_str(), fp_bytes / bytes, bpw, ppl.perplexity,
                  100.0 * (ppl.perplexity / fp_ppl - 1), decode_tps, decode_tps / fp_tps);
      if (r.spec == "nf4-dq") sample = tok->decode(g.tokens);
    }
    std::printf(
        "\n(weights: every parameter and buffer in memory; embeddings and lm_head stay float32, as\n"
        " bitsandbytes keeps them; perplexity per byte, sliding windows of 512, stride 256)\n");
    std::printf("\nnf4 + double quant, greedy: In the beginning%s\n", sample.c_str());

    // QLoRA on another text: the licenses every Debian machine has.
    std::string lic_train, lic_held;
    license_texts(lic_train, lic_held);
    std::vector<int64_t> train_ids = tok->encode(lic_train), held_ids = tok->encode(lic_held);
    if (static_cast<int64_t>(held_ids.size()) > o->eval_tokens)
      held_ids.resize(static_cast<size_t>(o->eval_tokens));
    models::LoadOptions lo;
    lo.quantize = parse_quantize_option("nf4-dq");
    models::LoadedModel m = models::load_pretrained(o->model, lo);
    models::FinetuneOptions fo;
    fo.r = 16;
    fo.lora_alpha = 32;
    fo.lr = 1e-3;  // a few hundred steps, not an epoch: higher than QLoRA's 2e-4
    fo.batch = 8;
    fo.context = 128;
    fo.steps = 100000;
    fo.save_every = 100;
    fo.max_seconds = o->finetune_seconds;
    fo.restart = true;
    fo.out_dir = o->out;
    fo.base_model_name_or_path = o->model;
    std::printf(
        "\nQLoRA: nf4 + double quant base, LoRA r %lld alpha %g on every decoder linear, 8-bit AdamW lr %g,\n"
        "       batch %lld x %lld tokens, %.0f s on /usr/share/common-licenses (%zu training bytes, %zu held "
        "out)\n",
        static_cast<long long>(fo.r), fo.lora_alpha, fo.lr, static_cast<long long>(fo.batch),
        static_cast<long long>(fo.context), fo.max_seconds, train_ids.size(), held_ids.size());
    const FinetuneRun run = run_finetune(*m.model, train_ids, held_ids, fo, nullptr, o->out + "/loss.svg");
    const auto& r = run.result;
    std::printf(
        "  %lld steps, %.3f s/step, training loss %.4f -> %.4f, %lld trainable parameters (%.2f %%)\n",
        static_cast<long long>(r.step), r.seconds_per_step, r.losses.front(), r.losses.back(),
        static_cast<long long>(r.trainable_parameters),
        100.0 * static_cast<double>(r.trainable_parameters) / static_cast<double>(r.total_parameters));
    std::printf("  held-out perplexity per byte: %.4f -> %.4f (%+.1f %%)\n", run.ppl_before, run.ppl_after,
                100.0 * (run.ppl_after / run.ppl_before - 1));
    std::printf(
        "  adapter (PEFT): %s/adapter_model.safetensors + adapter_config.json; loss curve: %s/loss.svg\n",
        o->out.c_str(), o->out.c_str());
    models::SamplingOptions s;
    s.max_new_tokens = o->decode_tokens;
    const std::string lic_prompt = "This program is free software";
    const auto g = models::generate(*m.model, tok->encode(lic_prompt), s);
    std::printf("\nfine-tuned nf4 + dq + LoRA, greedy: %s%s\n", lic_prompt.c_str(),
                tok->decode(g.tokens).c_str());
  });
}

}  // namespace msbnb::cli
