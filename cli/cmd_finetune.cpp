// `msbnb finetune CHECKPOINT --text FILE --out DIR`: QLoRA (models::finetune) with held-out
// perplexity before and after, a PEFT adapter folder and an SVG loss curve. Resumes from
// OUT/checkpoint when it is there. Data parallel: --nproc N starts N processes on this machine
// (train::launch_local); --master ADDR:PORT --rank R --world-size W joins a group across
// machines (torchrun's RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT work as well).
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common.h"
#include "msbnb/io/atomic_file.h"
#include "msbnb/models/finetune.h"
#include "msbnb/models/generate.h"
#include "msbnb/models/tokenizer.h"
#include "msbnb/train/distributed.h"
#include "svg.h"

namespace msbnb::cli {

std::string read_text_file(const std::string& path, const std::string& what) {
  std::ifstream f(path, std::ios::binary);
  TORCH_CHECK(f.good(), what, ": expected a readable file, got ", path);
  std::ostringstream ss;
  ss << f.rdbuf();
  TORCH_CHECK(!f.bad(), what, ": could not read ", path);
  return ss.str();
}

FinetuneRun run_finetune(models::LlamaForCausalLMImpl& model, const std::vector<int64_t>& train_ids,
                         const std::vector<int64_t>& held_ids, const models::FinetuneOptions& fo,
                         train::ProcessGroup* group, const std::string& svg_path) {
  const bool main_process = group == nullptr || group->is_main_process();
  const int64_t window =
      std::min<int64_t>(std::min<int64_t>(256, fo.context * 2), model.config().max_position_embeddings);
  const int64_t stride = std::max<int64_t>(1, window / 2);
  FinetuneRun run;
  auto eval = [&](const char* label) {
    if (!main_process || held_ids.size() < 2) return 0.0;
    ProgressBar bar(label);
    return models::perplexity(model, held_ids, window, stride,
                              [&](int64_t d, int64_t t) { bar.update(d, t); })
        .perplexity;
  };
  run.ppl_before = eval("eval before");
  models::FinetuneOptions o = fo;
  {
    ProgressBar bar("finetune");
    if (main_process) {
      o.progress = [&](int64_t step, int64_t steps, double loss) {
        char b[48];
        std::snprintf(b, sizeof b, "loss %.4f", loss);
        bar.update(step, steps, b);
      };
    }
    run.result = models::finetune(model, train_ids, o, group);
  }
  run.ppl_after = eval("eval after");
  if (main_process && !svg_path.empty()) {
    SvgPlot p;
    p.title = "QLoRA fine-tuning: training loss per step";
    p.x_label = "step";
    p.y_label = "cross-entropy (nats/token)";
    SvgPlot::Line l{"training loss", "#1f77b4", {}, {}};
    for (size_t i = 0; i < run.result.losses.size(); ++i) {
      l.x.push_back(static_cast<double>(i + 1));
      l.y.push_back(run.result.losses[i]);
    }
    p.lines.push_back(l);
    io::write_file_atomic(svg_path, render_svg({p}));
  }
  return run;
}

namespace {

// "host:port" -> (host, port); IPv6 as [addr]:port.
std::pair<std::string, int64_t> parse_master(const std::string& v) {
  const auto colon = v.rfind(':');
  TORCH_CHECK(colon != std::string::npos && colon > 0 && colon + 1 < v.size(),
              "--master: expected ADDR:PORT, got \"", v, "\"");
  std::string host = v.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  int64_t port = 0;
  for (char c : v.substr(colon + 1)) {
    TORCH_CHECK(c >= '0' && c <= '9' && port < 65536, "--master: expected a port 1..65535, got \"",
                v.substr(colon + 1), "\"");
    port = port * 10 + (c - '0');
  }
  TORCH_CHECK(port >= 1 && port <= 65535, "--master: expected a port 1..65535, got ", port);
  return {host, port};
}

}  // namespace

void add_finetune(CLI::App& app) {
  struct Opts {
    std::string dir, text, out, format = "nf4-dq", svg, targets, master;
    models::FinetuneOptions f;
    double eval_fraction = 0.1;
    int64_t nproc = 1, rank = -1, world_size = -1;
    bool json = false;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* c = app.add_subcommand("finetune", "QLoRA fine-tuning with 8-bit AdamW; writes a PEFT adapter");
  c->add_option("CHECKPOINT", o->dir, "checkpoint folder")->required();
  c->add_option("--text", o->text, "training text (its last --eval-fraction is held out)")->required();
  c->add_option("--out", o->out, "adapter folder (PEFT layout; a checkpoint there is resumed)")->required();
  c->add_option("--format", o->format, "base quantization: nf4 | nf4-dq | fp4 | fp4-dq | int8 | int4 | none")
      ->capture_default_str();
  c->add_option("--r", o->f.r, "LoRA rank")->capture_default_str();
  c->add_option("--alpha", o->f.lora_alpha, "LoRA alpha")->capture_default_str();
  c->add_option("--dropout", o->f.lora_dropout, "LoRA dropout")->capture_default_str();
  c->add_option("--target", o->targets, "comma-separated module names (default: every decoder linear)");
  c->add_option("--lr", o->f.lr, "learning rate")->capture_default_str();
  c->add_option("--weight-decay", o->f.weight_decay, "AdamW weight decay")->capture_default_str();
  c->add_option("--steps", o->f.steps, "optimizer steps in total")->capture_default_str();
  c->add_option("--batch", o->f.batch, "windows per step (split over the processes)")->capture_default_str();
  c->add_option("--context", o->f.context, "tokens per window")->capture_default_str();
  c->add_option("--warmup", o->f.warmup_steps, "linear warm-up steps")->capture_default_str();
  c->add_option("--save-every", o->f.save_every, "checkpoint every N steps")->capture_default_str();
  c->add_option("--max-seconds", o->f.max_seconds, "stop (resumably) after this many seconds; 0: no limit");
  c->add_option("--seed", o->f.seed, "batch sampling seed")->capture_default_str();
  c->add_flag("--gradient-checkpointing", o->f.gradient_checkpointing, "recompute activations in backward");
  c->add_flag("--restart", o->f.restart, "discard a checkpoint in --out instead of resuming it");
  c->add_option("--eval-fraction", o->eval_fraction, "held-out tail of the text")->capture_default_str();
  c->add_option("--svg", o->svg, "loss curve SVG (default: OUT/loss.svg)");
  c->add_option("--nproc", o->nproc, "data-parallel processes on this machine")->capture_default_str();
  c->add_option("--master", o->master, "ADDR:PORT of rank 0, to train across machines");
  c->add_option("--rank", o->rank, "this process's rank (with --master)");
  c->add_option("--world-size", o->world_size, "number of processes (with --master)");
  c->add_flag("--json", o->json, "machine-readable output");
  c->callback([o] {
    TORCH_CHECK(o->nproc >= 1 && o->nproc <= 256, "--nproc: expected 1..256, got ", o->nproc);
    TORCH_CHECK(o->eval_fraction >= 0 && o->eval_fraction < 1, "--eval-fraction: expected [0, 1), got ",
                o->eval_fraction);
    const char* env_rank = std::getenv("RANK");
    const bool launched_child = std::getenv("MSBNB_FINETUNE_CHILD") != nullptr;
    if (o->nproc > 1 && !launched_child) {
      // The parent only launches: N copies of this command line, each a rank.
      std::vector<std::string> args(program_args().begin() + 1, program_args().end());
      const auto res = train::launch_local("/proc/self/exe", args,
                                           train::LaunchOptions()
                                               .world_size(o->nproc)
                                               .env({{"MSBNB_FINETUNE_CHILD", "1"}})
                                               .deadline(std::chrono::hours(24 * 7)));
      for (size_t r = 0; r < res.exit_codes.size(); ++r)
        TORCH_CHECK(res.exit_codes[r] == 0, "finetune: rank ", r, " failed (exit status ", res.exit_codes[r],
                    ")");
      return;
    }
    std::optional<train::ProcessGroup> pg;
    if (!o->master.empty()) {
      const auto [host, port] = parse_master(o->master);
      TORCH_CHECK(o->world_size >= 1, "--world-size: expected >= 1 with --master, got ", o->world_size);
      TORCH_CHECK(o->rank >= 0 && o->rank < o->world_size, "--rank: expected 0..", o->world_size - 1,
                  " with --master, got ", o->rank);
      pg.emplace(train::ProcessGroupOptions()
                     .rank(o->rank)
                     .world_size(o->world_size)
                     .master_addr(host)
                     .master_port(port));
    } else if (env_rank != nullptr && std::getenv("WORLD_SIZE") != nullptr) {
      pg.emplace(train::ProcessGroup::from_env());
    }
    // Processes on one machine share its cores.
    if (pg && o->nproc > 1)
      at::set_num_threads(static_cast<int>(std::max<int64_t>(1, at::get_num_threads() / o->nproc)));
    const bool main_process = !pg || pg->is_main_process();

    if (!o->targets.empty()) {
      o->f.target_modules.clear();
      std::stringstream ss(o->targets);
      for (std::string t; std::getline(ss, t, ',');)
        if (!t.empty()) o->f.target_modules.push_back(t);
    }
    o->f.out_dir = o->out;
    o->f.base_model_name_or_path = o->dir;
    models::LoadOptions lo;
    lo.quantize = parse_quantize_option(o->format);
    models::LoadedModel m =
        main_process ? load_with_progress(o->dir, lo) : models::load_pretrained(o->dir, lo);
    auto tok = models::load_tokenizer(o->dir);
    const std::vector<int64_t> ids = tok->encode(read_text_file(o->text, "--text"));
    const size_t cut =
        static_cast<size_t>(std::floor((1.0 - o->eval_fraction) * static_cast<double>(ids.size())));
    const std::vector<int64_t> train_ids(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(cut));
    const std::vector<int64_t> held(ids.begin() + static_cast<std::ptrdiff_t>(cut), ids.end());
    const std::string svg = o->svg.empty() ? o->out + "/loss.svg" : o->svg;
    const FinetuneRun run = run_finetune(*m.model, train_ids, held, o->f, pg ? &*pg : nullptr, svg);
    if (!main_process) return;
    const auto& r = run.result;
    if (o->json) {
      nlohmann::json j = {{"perplexity_before", run.ppl_before},
                          {"perplexity_after", run.ppl_after},
                          {"resumed_from", r.resumed_from},
                          {"step", r.step},
                          {"finished", r.finished},
                          {"losses", r.losses},
                          {"seconds", r.seconds},
                          {"seconds_per_step", r.seconds_per_step},
                          {"trainable_parameters", r.trainable_parameters},
                          {"total_parameters", r.total_parameters},
                          {"optimizer_bytes", r.optimizer_bytes},
                          {"processes", pg ? pg->world_size() : 1},
                          {"adapter", o->out},
                          {"svg", svg}};
      std::cout << j.dump(2) << "\n";
      return;
    }
    std::printf("%s (%s) on %s: %zu training tokens, %zu held out, %lld process(es)\n", o->dir.c_str(),
                m.quantization ? m.quantization->describe().c_str() : "float32", o->text.c_str(),
                train_ids.size(), held.size(), static_cast<long long>(pg ? pg->world_size() : 1));
    std::printf(
        "  LoRA r %lld, alpha %g on %zu module names: %lld trainable of %lld parameters (%.2f %%)\n",
        static_cast<long long>(o->f.r), o->f.lora_alpha, o->f.target_modules.size(),
        static_cast<long long>(r.trainable_parameters), static_cast<long long>(r.total_parameters),
        100.0 * static_cast<double>(r.trainable_parameters) / static_cast<double>(r.total_parameters));
    if (r.resumed_from > 0) std::printf("  resumed from step %lld\n", static_cast<long long>(r.resumed_from));
    std::printf("  steps %lld/%lld%s, %.3f s/step, loss %.4f -> %.4f, 8-bit AdamW state %s\n",
                static_cast<long long>(r.step), static_cast<long long>(o->f.steps),
                r.finished ? "" : " (stopped by --max-seconds: run again to resume)", r.seconds_per_step,
                r.losses.empty() ? 0.0 : r.losses.front(), r.losses.empty() ? 0.0 : r.losses.back(),
                human_bytes(static_cast<double>(r.optimizer_bytes)).c_str());
    std::printf("  held-out perplexity %.4f -> %.4f\n", run.ppl_before, run.ppl_after);
    std::printf("  adapter: %s (adapter_model.safetensors, adapter_config.json), loss curve: %s\n",
                o->out.c_str(), svg.c_str());
  });
}

}  // namespace msbnb::cli
