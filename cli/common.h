// Shared pieces of the `msbnb` commands: registration, progress bars, number formatting.
#pragma once
#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>
#include <vector>

#include "msbnb/models/finetune.h"
#include "msbnb/models/loader.h"

namespace msbnb::train {
class ProcessGroup;
}  // namespace msbnb::train

namespace msbnb::cli {

/// Each command file registers its subcommand (options and callback) on the app.
void add_quantize(CLI::App& app);
void add_generate(CLI::App& app);
void add_eval(CLI::App& app);
void add_demo(CLI::App& app);
void add_finetune(CLI::App& app);
void add_inspect(CLI::App& app);
void add_bench(CLI::App& app);

/// The command line as main() received it (finetune --nproc re-runs it per rank).
const std::vector<std::string>& program_args();

/// The bytes of a file; `what` (the option) names it in errors.
std::string read_text_file(const std::string& path, const std::string& what);

/// A fine-tuning run as the finetune and demo commands report it: held-out perplexity before
/// and after (rank 0 only), the loop's result; the loss curve goes to svg_path (if not empty).
struct FinetuneRun {
  double ppl_before = 0, ppl_after = 0;
  models::FinetuneResult result;
};
FinetuneRun run_finetune(models::LlamaForCausalLMImpl& model, const std::vector<int64_t>& train_ids,
                         const std::vector<int64_t>& held_ids, const models::FinetuneOptions& options,
                         train::ProcessGroup* group, const std::string& svg_path);

/// A progress bar on stderr while it is a terminal (nothing in logs and pipes).
class ProgressBar {
 public:
  explicit ProgressBar(std::string label);
  ~ProgressBar();
  void update(int64_t done, int64_t total, const std::string& what = "");
  models::Progress callback();

 private:
  std::string label_;
  bool tty_;
  bool drawn_ = false;
};

/// load_pretrained with a progress bar ("load") on a terminal.
models::LoadedModel load_with_progress(const std::string& dir, models::LoadOptions options);

/// The loading options of the commands that run a checkpoint (generate, eval): --quantize,
/// --adapter, --matmul-path.
struct LoadFlags {
  std::string quantize, adapter, matmul_path = "auto";
  void add_to(CLI::App& command);
  models::LoadedModel load(const std::string& dir) const;
};

/// "3.62 GB", "13.1 MB", "512 B" (decimal units).
std::string human_bytes(double bytes);

/// The --quantize option of the loading commands: "" (as stored), int8, int4, nf4, nf4-dq, fp4, fp4-dq.
std::optional<models::QuantizationSpec> parse_quantize_option(const std::string& value);

}  // namespace msbnb::cli
