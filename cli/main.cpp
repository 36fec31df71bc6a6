// `msbnb`: quantize, run and evaluate LLaMA-family Hugging Face checkpoints from the command line.
// Errors: one line on stderr ("msbnb: error: ...") and exit code 1; bad usage exits 2 (CLI11's
// message and --help hint).
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <thread>

#include "common.h"

namespace msbnb::cli {

ProgressBar::ProgressBar(std::string label) : label_(std::move(label)), tty_(::isatty(2) != 0) {}
ProgressBar::~ProgressBar() {
  if (drawn_) std::fprintf(stderr, "\n");
}
void ProgressBar::update(int64_t done, int64_t total, const std::string& what) {
  if (!tty_ || total <= 0) return;
  const int width = 30, filled = static_cast<int>(width * done / total);
  std::string bar(static_cast<size_t>(filled), '#');
  bar.resize(width, ' ');
  std::string w = what.size() > 40 ? "..." + what.substr(what.size() - 37) : what;
  std::fprintf(stderr, "\r%s [%s] %lld/%lld %-40s", label_.c_str(), bar.c_str(), static_cast<long long>(done),
               static_cast<long long>(total), w.c_str());
  std::fflush(stderr);
  drawn_ = true;
}
models::Progress ProgressBar::callback() {
  return [this](int64_t d, int64_t t, const std::string& w) { update(d, t, w); };
}

models::LoadedModel load_with_progress(const std::string& dir, models::LoadOptions options) {
  ProgressBar bar("load");
  options.progress = bar.callback();
  return models::load_pretrained(dir, options);
}

void LoadFlags::add_to(CLI::App& c) {
  c.add_option("--quantize", quantize,
               "quantize a float checkpoint while loading: int8 | int4 | nf4 | nf4-dq | fp4 | fp4-dq");
  c.add_option("--adapter", adapter, "PEFT LoRA adapter folder to attach");
  c.add_option("--matmul-path", matmul_path,
               "4-bit layers: auto (exact) | fast (bf16) | int8 (int8 activations: fastest decode)")
      ->capture_default_str();
}

models::LoadedModel LoadFlags::load(const std::string& dir) const {
  models::LoadOptions lo;
  lo.quantize = parse_quantize_option(quantize);
  lo.adapter = adapter;
  lo.matmul_path = models::parse_matmul_path(matmul_path, "--matmul-path");
  return load_with_progress(dir, lo);
}

std::string human_bytes(double b) {
  char buf[32];
  if (b >= 1e9) {
    std::snprintf(buf, sizeof buf, "%.2f GB", b / 1e9);
  } else if (b >= 1e6) {
    std::snprintf(buf, sizeof buf, "%.1f MB", b / 1e6);
  } else if (b >= 1e3) {
    std::snprintf(buf, sizeof buf, "%.1f kB", b / 1e3);
  } else {
    std::snprintf(buf, sizeof buf, "%.0f B", b);
  }
  return buf;
}

namespace {
std::vector<std::string> g_args;
}  // namespace
const std::vector<std::string>& program_args() { return g_args; }

std::optional<models::QuantizationSpec> parse_quantize_option(const std::string& v) {
  if (v.empty() || v == "none") return std::nullopt;
  const bool dq = v.size() > 3 && v.compare(v.size() - 3, 3, "-dq") == 0;
  return models::QuantizationSpec::for_format(dq ? v.substr(0, v.size() - 3) : v, dq);
}

}  // namespace msbnb::cli

int main(int argc, char** argv) {
  // libgomp (torch's OpenMP) lets idle workers spin after every parallel region; on a machine
  // with few cores they take the CPUs from OpenBLAS's threads and from the kernels' own pool:
  // prefill of the built-in model ran 3.7x slower, decode ~15 %. The policy is read when libgomp
  // loads, so it is set here and the program runs again (once; OMP_WAIT_POLICY set by the user
  // is kept).
  if (std::getenv("OMP_WAIT_POLICY") == nullptr) {
    ::setenv("OMP_WAIT_POLICY", "passive", 1);
    ::execv("/proc/self/exe", argv);  // returns only on failure: then go on as we are
  }
  CLI::App app{"msbnb: k-bit quantization for LLaMA-family Hugging Face checkpoints (libtorch, CPU)"};
  app.require_subcommand(1);
  // Debian's libtorch starts with one intra-op thread: use every core unless told otherwise.
  if (std::getenv("OMP_NUM_THREADS") == nullptr)
    at::set_num_threads(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  app.add_option("--threads", "torch threads (default: every core, or OMP_NUM_THREADS)")
      ->each([](const std::string& v) {
        int n = 0;
        try {
          n = std::stoi(v);
        } catch (const std::exception&) {
        }
        if (n < 1 || n > 1024) throw CLI::ValidationError("--threads", "expected 1..1024, got " + v);
        at::set_num_threads(n);
      });
  msbnb::cli::add_quantize(app);
  msbnb::cli::add_generate(app);
  msbnb::cli::add_eval(app);
  msbnb::cli::add_demo(app);
  msbnb::cli::add_finetune(app);
  msbnb::cli::add_inspect(app);
  msbnb::cli::add_bench(app);
  msbnb::cli::g_args.assign(argv, argv + argc);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const c10::Error& e) {
    std::string msg = e.what_without_backtrace();
    msg = msg.substr(0, msg.find('\n'));
    std::fprintf(stderr, "msbnb: error: %s\n", msg.c_str());
    return 1;
  } catch (const std::exception& e) {
    std::string msg = e.what();
    msg = msg.substr(0, msg.find('\n'));
    std::fprintf(stderr, "msbnb: error: %s\n", msg.c_str());
    return 1;
  }
  return 0;
}
