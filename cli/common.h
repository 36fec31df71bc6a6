// Shared pieces of the `msbnb` commands: registration, progress bars, number formatting.
#pragma once
#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>

#include "msbnb/models/loader.h"

namespace msbnb::cli {

/// Each command file registers its subcommand (options and callback) on the app.
void add_quantize(CLI::App& app);
void add_generate(CLI::App& app);
void add_eval(CLI::App& app);
void add_demo(CLI::App& app);

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

/// "3.62 GB", "13.1 MB", "512 B" (decimal units).
std::string human_bytes(double bytes);

/// The --quantize option of the loading commands: "" (as stored), int8, int4, nf4, nf4-dq, fp4, fp4-dq.
std::optional<models::QuantizationSpec> parse_quantize_option(const std::string& value);

}  // namespace msbnb::cli
