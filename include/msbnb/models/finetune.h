// QLoRA fine-tuning of a LlamaForCausalLM on a token stream: LoRA adapters on the decoder's
// linears (PEFT's layout), everything else frozen, 8-bit AdamW (msbnb::optim::AdamW8bit),
// gradient clipping, optional data parallelism over a msbnb::train::ProcessGroup, and a
// checkpoint that lets an interrupted run resume where it stopped.
//
// Batches. Step s (0-based) trains on `batch` windows of context + 1 tokens whose starts are
// drawn from a generator seeded with (seed, s): the batches do not depend on how many processes
// train, on where a run was interrupted, or on earlier steps. With a process group, rank k
// trains on its rows of every batch (train::shard_range) and the gradients are averaged
// (train::DataParallel), so N processes take the same steps as one, up to float rounding.
//
// Checkpoint (out_dir/checkpoint/): adapter_model.safetensors + adapter_config.json (PEFT),
// optimizer.pt (the 8-bit states, torch::save), trainer_state.json (step, losses, and the
// options that must not change on resume). It is written in checkpoint.tmp and renamed into
// place, so an interruption at any moment leaves the previous complete checkpoint. A run whose
// out_dir holds a checkpoint resumes from it (the options recorded there must equal this run's,
// else an error names the first that differs); restart = true discards it instead.
//
// Result (out_dir): adapter_model.safetensors + adapter_config.json (load with PEFT's
// PeftModel.from_pretrained or msbnb::lora::load_adapter) and trainer_state.json.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "msbnb/models/llama.h"

namespace msbnb::train {
class ProcessGroup;
}  // namespace msbnb::train

namespace msbnb::models {

/// finetune()'s options (defaults: QLoRA's usual r 16, alpha 32 on every decoder linear).
///  steps          optimizer steps in total (a resumed run continues up to it)
///  max_seconds    stop early once a step ends after this many seconds of this process (0: no
///                 limit); the checkpoint is written, so running again continues
///  save_every     write the checkpoint every this many steps (and at the end)
///  warmup_steps   learning rate rises linearly over these steps, then stays constant
///  max_grad_norm  gradient clipping (0: none)
///  gradient_checkpointing  recompute each decoder layer's activations in backward
///  progress       after every step: (step, steps, loss of the step)
struct FinetuneOptions {
  int64_t r = 16;
  double lora_alpha = 32;
  double lora_dropout = 0;
  std::vector<std::string> target_modules = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                             "gate_proj", "up_proj", "down_proj"};
  double lr = 2e-4, weight_decay = 0, max_grad_norm = 1.0;
  int64_t steps = 100, batch = 8, context = 128, warmup_steps = 0, save_every = 50;
  uint64_t seed = 0;
  double max_seconds = 0;
  bool gradient_checkpointing = false;
  bool restart = false;
  std::string out_dir;
  std::string base_model_name_or_path;
  std::function<void(int64_t, int64_t, double)> progress;
  void validate() const;
};

/// What finetune() did.
///  resumed_from  the step the checkpoint held (0: a fresh run)
///  step          the steps done in all (== options.steps when finished)
///  losses        training loss of every step since step 0 (resumed runs included)
///  finished      step == options.steps (false: stopped by max_seconds)
struct FinetuneResult {
  int64_t resumed_from = 0, step = 0;
  std::vector<double> losses;
  bool finished = false;
  double seconds = 0, seconds_per_step = 0;
  int64_t trainable_parameters = 0, total_parameters = 0, optimizer_bytes = 0;
};

/// Injects LoRA layers on options.target_modules (unless the model has them already; lora_A is
/// drawn after torch::manual_seed(options.seed)) and freezes everything else. Returns the number of trainable
/// parameters.
int64_t prepare_lora(LlamaForCausalLMImpl& model, const FinetuneOptions& options);

/// Trains `model` (prepared by prepare_lora, or it is done here) on windows of `tokens` (rules
/// at the top). With `group`, every rank calls it with the same tokens and options; rank 0
/// writes the files. Throws c10::Error for bad options, too few tokens (< context + 2), token
/// ids outside the vocabulary, or a checkpoint that does not match.
FinetuneResult finetune(LlamaForCausalLMImpl& model, const std::vector<int64_t>& tokens,
                        const FinetuneOptions& options, train::ProcessGroup* group = nullptr);

}  // namespace msbnb::models
