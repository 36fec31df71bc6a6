// QLoRA fine-tuning loop with a resumable checkpoint (rules in the header).
#include "msbnb/models/finetune.h"

#include <c10/util/Exception.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/serialize.h>
#include <torch/utils.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "msbnb/io/atomic_file.h"
#include "msbnb/lora/lora.h"
#include "msbnb/lora/peft.h"
#include "msbnb/optim/optim8bit.h"
#include "msbnb/train/distributed.h"

namespace msbnb::models {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// The options a resumed run must share with the run that wrote the checkpoint.
nlohmann::json run_fingerprint(const FinetuneOptions& o, int64_t vocab, int64_t n_tokens) {
  return {{"r", o.r},
          {"lora_alpha", o.lora_alpha},
          {"lora_dropout", o.lora_dropout},
          {"target_modules", o.target_modules},
          {"lr", o.lr},
          {"weight_decay", o.weight_decay},
          {"max_grad_norm", o.max_grad_norm},
          {"steps", o.steps},
          {"batch", o.batch},
          {"context", o.context},
          {"warmup_steps", o.warmup_steps},
          {"seed", o.seed},
          {"vocab_size", vocab},
          {"train_tokens", n_tokens}};
}

// Window starts of step `step`: independent of the process count and of earlier steps.
std::vector<int64_t> batch_starts(uint64_t seed, int64_t step, int64_t batch, int64_t n_tokens,
                                  int64_t context) {
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                    static_cast<uint32_t>(step), static_cast<uint32_t>(static_cast<uint64_t>(step) >> 32),
                    0x51f7u};
  std::mt19937_64 rng(seq);
  std::uniform_int_distribution<int64_t> pick(0, n_tokens - context - 1);
  std::vector<int64_t> starts(static_cast<size_t>(batch));
  for (auto& s : starts) s = pick(rng);
  return starts;
}

void write_json_atomic(const fs::path& path, const nlohmann::json& j) {
  io::write_file_atomic(path.string(), j.dump(2) + "\n");
}

nlohmann::json read_json(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in.good(), "finetune: could not read ", path.string());
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  try {
    return nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "finetune: ", path.string(), " is not valid JSON (", e.what(), ")");
  }
}

lora::SaveAdapterOptions adapter_options(const FinetuneOptions& o) {
  return lora::SaveAdapterOptions()
      .base_model_name_or_path(o.base_model_name_or_path)
      .task_type("CAUSAL_LM")
      .target_modules(o.target_modules);
}

}  // namespace

void FinetuneOptions::validate() const {
  TORCH_CHECK(r > 0 && r <= 4096, "finetune: r: expected 1..4096, got ", r);
  TORCH_CHECK(std::isfinite(lora_alpha) && lora_alpha > 0, "finetune: lora_alpha: expected > 0, got ",
              lora_alpha);
  TORCH_CHECK(lora_dropout >= 0 && lora_dropout < 1, "finetune: lora_dropout: expected [0, 1), got ",
              lora_dropout);
  TORCH_CHECK(!target_modules.empty(),
              "finetune: target_modules: expected at least one module name, got none");
  TORCH_CHECK(std::isfinite(lr) && lr > 0 && lr < 1, "finetune: lr: expected (0, 1), got ", lr);
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0, "finetune: weight_decay: expected >= 0, got ",
              weight_decay);
  TORCH_CHECK(std::isfinite(max_grad_norm) && max_grad_norm >= 0,
              "finetune: max_grad_norm: expected >= 0, got ", max_grad_norm);
  TORCH_CHECK(steps > 0 && steps <= (int64_t{1} << 40), "finetune: steps: expected > 0, got ", steps);
  TORCH_CHECK(batch > 0 && batch <= 65536, "finetune: batch: expected 1..65536, got ", batch);
  TORCH_CHECK(context > 0 && context <= 1048576, "finetune: context: expected 1..1048576, got ", context);
  TORCH_CHECK(warmup_steps >= 0, "finetune: warmup_steps: expected >= 0, got ", warmup_steps);
  TORCH_CHECK(save_every > 0, "finetune: save_every: expected > 0, got ", save_every);
  TORCH_CHECK(std::isfinite(max_seconds) && max_seconds >= 0, "finetune: max_seconds: expected >= 0, got ",
              max_seconds);
  TORCH_CHECK(!out_dir.empty(), "finetune: out_dir: expected a folder for the adapter, got an empty path");
}

int64_t prepare_lora(LlamaForCausalLMImpl& model, const FinetuneOptions& o) {
  if (lora::lora_info(model).layers.empty()) {
    // lora_A's Kaiming init draws from torch's generator: the seed makes a run reproducible.
    torch::manual_seed(o.seed);
    lora::inject_lora(model, lora::LoraConfig()
                                 .r(o.r)
                                 .lora_alpha(o.lora_alpha)
                                 .lora_dropout(o.lora_dropout)
                                 .target_modules(o.target_modules));
  }
  return lora::freeze_model_except_lora(model).trainable_elements;
}

FinetuneResult finetune(LlamaForCausalLMImpl& model, const std::vector<int64_t>& tokens,
                        const FinetuneOptions& o, train::ProcessGroup* group) {
  o.validate();
  const auto t0 = Clock::now();
  const LlamaConfig& cfg = model.config();
  TORCH_CHECK(o.context <= cfg.max_position_embeddings,
              "finetune: context: expected <= max_position_embeddings (", cfg.max_position_embeddings,
              "), got ", o.context);
  const int64_t n = static_cast<int64_t>(tokens.size());
  TORCH_CHECK(n >= o.context + 2, "finetune: expected at least context + 2 = ", o.context + 2,
              " training tokens, got ", n);
  for (int64_t t : tokens)
    TORCH_CHECK(t >= 0 && t < cfg.vocab_size, "finetune: token ids: expected [0, ", cfg.vocab_size, "), got ",
                t);
  const int64_t rank = group != nullptr ? group->rank() : 0;
  const int64_t world = group != nullptr ? group->world_size() : 1;
  const bool main_process = rank == 0;

  FinetuneResult res;
  res.trainable_parameters = prepare_lora(model, o);
  // Quantized weights are buffers: count the model's own parameters from its config.
  res.total_parameters = cfg.parameter_count() + res.trainable_parameters;
  model.model->gradient_checkpointing = o.gradient_checkpointing;

  const fs::path out(o.out_dir), ckpt = out / "checkpoint", tmp = out / "checkpoint.tmp",
                                 old = out / "checkpoint.old";
  const nlohmann::json fingerprint = run_fingerprint(o, cfg.vocab_size, n);

  std::unique_ptr<train::DataParallel> dp;
  std::vector<torch::Tensor> params;
  if (group != nullptr && world > 1) {
    dp = std::make_unique<train::DataParallel>(*group, model);
    params = dp->parameters();
  } else {
    for (const auto& p : model.parameters())
      if (p.requires_grad()) params.push_back(p);
  }
  optim::AdamW8bit opt(params, optim::AdamW8bitOptions(o.lr).weight_decay(o.weight_decay));

  // Resume (every rank reads the same files; a crash between the renames leaves checkpoint.old).
  if (main_process) fs::create_directories(out);
  if (group != nullptr && world > 1) group->barrier();
  fs::path from = fs::exists(ckpt / "trainer_state.json")  ? ckpt
                  : fs::exists(old / "trainer_state.json") ? old
                                                           : "";
  if (o.restart && !from.empty()) {
    if (group != nullptr && world > 1) group->barrier();
    if (main_process) {
      fs::remove_all(ckpt);
      fs::remove_all(old);
    }
    from.clear();
  }
  if (!from.empty()) {
    const nlohmann::json state = read_json(from / "trainer_state.json");
    TORCH_CHECK(state.contains("run") && state["run"].is_object() && state.contains("step") &&
                    state["step"].is_number_integer() && state.contains("losses") &&
                    state["losses"].is_array(),
                "finetune: ", (from / "trainer_state.json").string(),
                ": expected the fields run, step, losses (written by msbnb finetune)");
    for (const auto& [key, value] : fingerprint.items()) {
      TORCH_CHECK(state["run"].contains(key) && state["run"][key] == value, "finetune: the checkpoint in ",
                  from.string(), " was written with ", key, " = ",
                  state["run"].contains(key) ? state["run"][key].dump() : std::string("(absent)"),
                  ", this run has ", value.dump(),
                  " (pass the same options, or restart (--restart) to discard it)");
    }
    const int64_t step = state["step"].get<int64_t>();
    TORCH_CHECK(step >= 0 && step <= o.steps && static_cast<int64_t>(state["losses"].size()) == step,
                "finetune: ", (from / "trainer_state.json").string(), ": expected step in [0, ", o.steps,
                "] with one loss per step, got step ", step, " and ", state["losses"].size(), " losses");
    lora::load_adapter(model, from.string(), lora::LoadAdapterOptions().inject(false));
    torch::load(opt, (from / "optimizer.pt").string());
    for (const auto& l : state["losses"]) {
      TORCH_CHECK(l.is_number(), "finetune: ", (from / "trainer_state.json").string(),
                  ": expected numbers in losses, got ", l.dump());
      res.losses.push_back(l.get<double>());
    }
    res.resumed_from = res.step = step;
  }
  if (dp) {
    // Every rank must resume from the same step: out_dir has to be on storage they all see.
    auto s = torch::tensor({static_cast<double>(res.step), static_cast<double>(res.step) * res.step},
                           torch::kDouble);
    group->all_reduce_sum(s, "resumed step");
    const double sum = s[0].item<double>(), sum_sq = s[1].item<double>();
    TORCH_CHECK(sum_sq * static_cast<double>(world) == sum * sum, "finetune: rank ", rank,
                " resumes from step ", res.step, " but the ranks disagree (mean step ",
                sum / static_cast<double>(world), "): out_dir ", out.string(),
                " must be the same folder for every rank");
  }

  auto save = [&](bool final_files) {
    if (group != nullptr && world > 1) group->barrier();
    if (main_process) {
      nlohmann::json state = {{"run", fingerprint}, {"step", res.step}, {"losses", res.losses}};
      fs::remove_all(tmp);
      fs::create_directories(tmp);
      lora::save_adapter(model, tmp.string(), adapter_options(o));
      std::ostringstream os;
      torch::save(opt, os);
      io::write_file_atomic((tmp / "optimizer.pt").string(), os.str());
      write_json_atomic(tmp / "trainer_state.json", state);
      // The previous checkpoint stays complete until the new one is in place.
      fs::remove_all(old);
      if (fs::exists(ckpt)) fs::rename(ckpt, old);
      fs::rename(tmp, ckpt);
      fs::remove_all(old);
      if (final_files) {
        lora::save_adapter(model, out.string(), adapter_options(o));
        write_json_atomic(out / "trainer_state.json", state);
      }
    }
    if (group != nullptr && world > 1) group->barrier();
  };

  model.train();
  const train::ShardRange mine = train::shard_range(o.batch, rank, world);
  const double weight = train::shard_loss_weight(o.batch, rank, world);
  const auto train_start = Clock::now();
  int64_t steps_here = 0;
  while (res.step < o.steps) {
    const auto starts = batch_starts(o.seed, res.step, o.batch, n, o.context);
    const double lr = o.warmup_steps > 0 && res.step < o.warmup_steps
                          ? o.lr * static_cast<double>(res.step + 1) / static_cast<double>(o.warmup_steps + 1)
                          : o.lr;
    for (auto& g : opt.param_groups()) g.options().set_lr(lr);
    opt.zero_grad();
    // A rank with an empty shard computes nothing; DataParallel counts its gradients as zeros.
    torch::Tensor loss_value = torch::zeros({1});
    if (mine.size() > 0) {
      auto x = torch::empty({mine.size(), o.context}, torch::kLong);
      auto y = torch::empty_like(x);
      for (int64_t b = mine.begin; b < mine.end; ++b) {
        const int64_t* src = tokens.data() + starts[static_cast<size_t>(b)];
        std::copy(src, src + o.context, x[b - mine.begin].data_ptr<int64_t>());
        std::copy(src + 1, src + 1 + o.context, y[b - mine.begin].data_ptr<int64_t>());
      }
      auto logits = model.forward(x);
      auto loss = torch::nn::functional::cross_entropy(logits.reshape({-1, cfg.vocab_size}), y.reshape({-1}));
      (loss * weight).backward();
      loss_value.fill_(loss.item<double>() * static_cast<double>(mine.size()) / static_cast<double>(o.batch));
    }
    if (dp) {
      dp->synchronize_gradients();
      group->all_reduce_sum(loss_value, "loss");
    }
    if (o.max_grad_norm > 0) torch::nn::utils::clip_grad_norm_(params, o.max_grad_norm);
    opt.step();
    const double l = loss_value.item<double>();
    TORCH_CHECK(std::isfinite(l), "finetune: the training loss became ", l, " at step ", res.step,
                " (lower lr, or check the data)");
    res.losses.push_back(l);
    ++res.step;
    ++steps_here;
    if (o.progress && main_process) o.progress(res.step, o.steps, l);
    const bool out_of_time =
        o.max_seconds > 0 && std::chrono::duration<double>(Clock::now() - t0).count() > o.max_seconds;
    // Every rank must agree to stop at the same step.
    bool stop = out_of_time;
    if (dp) {
      auto flag = torch::full({1}, stop ? 1.0f : 0.0f);
      group->all_reduce_sum(flag, "stop flag");
      stop = flag.item<float>() > 0;
    }
    if (res.step % o.save_every == 0 && res.step < o.steps && !stop) save(false);
    if (stop) break;
  }
  const double train_seconds = std::chrono::duration<double>(Clock::now() - train_start).count();
  res.seconds_per_step = steps_here > 0 ? train_seconds / static_cast<double>(steps_here) : 0;
  res.finished = res.step == o.steps;
  save(true);
  model.eval();
  model.model->gradient_checkpointing = false;
  for (const auto& p : params) {
    auto it = opt.state().find(c10::guts::to_string(p.unsafeGetTensorImpl()));
    if (it == opt.state().end()) continue;
    const auto& st = static_cast<const optim::Optim8bitParamState&>(*it->second);
    for (const auto* t : {&st.state1(), &st.state2(), &st.absmax1(), &st.absmax2()})
      if (t->defined()) res.optimizer_bytes += static_cast<int64_t>(t->nbytes());
  }
  res.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return res;
}

}  // namespace msbnb::models
