// `msbnb quantize IN_DIR OUT_DIR --format ...`: a float checkpoint folder into a quantized one,
// streamed tensor by tensor (msbnb::models::quantize_checkpoint), and the memory table.
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "common.h"

namespace msbnb::cli {

void add_quantize(CLI::App& app) {
  struct Opts {
    std::string in, out, format;
    int64_t group_size = 0;
    bool double_quant = false, json = false;
    std::vector<std::string> skip;
    double threshold = 6.0;
    double max_shard_mb = 1000;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* c = app.add_subcommand("quantize", "Quantize a float checkpoint folder into a new, loadable one");
  c->add_option("IN_DIR", o->in, "Hugging Face checkpoint folder (config.json + safetensors)")->required();
  c->add_option("OUT_DIR", o->out, "new folder to write (must not exist or be empty)")->required();
  c->add_option("--format", o->format, "int8 | int4 | nf4 | fp4")
      ->required()
      ->check(CLI::IsMember({"int8", "int4", "nf4", "fp4"}));
  c->add_option("--group-size", o->group_size,
                "nf4 / fp4 block size (default 64) or int4 group size (default 128)");
  c->add_flag("--double-quant", o->double_quant, "double-quantize the block statistics (nf4 / fp4 / int4)");
  c->add_option("--skip", o->skip, "modules kept in float (default: lm_head)");
  c->add_option("--threshold", o->threshold, "int8: LLM.int8() outlier threshold (default 6)");
  c->add_option("--max-shard-size", o->max_shard_mb, "output shard size in MB (default 1000)");
  c->add_flag("--json", o->json, "machine-readable output");
  c->callback([o] {
    models::QuantizeOptions q;
    q.spec = models::QuantizationSpec::for_format(o->format, o->double_quant);
    if (o->group_size > 0) q.spec.blocksize = o->group_size;
    if (!o->skip.empty()) q.spec.skip_modules = o->skip;
    q.spec.threshold = o->threshold;
    q.spec.validate();
    q.max_shard_bytes = static_cast<int64_t>(o->max_shard_mb * 1e6);
    ProgressBar bar("quantize");
    q.progress = bar.callback();
    models::QuantizeReport r = models::quantize_checkpoint(o->in, o->out, q);
    bar.update(1, 1);
    const double bpw = r.quantized_parameters > 0 ? [&] {
      int64_t qb = 0;
      for (const auto& t : r.tensors)
        if (t.format == r.spec.format) qb += t.bytes_after;
      return 8.0 * static_cast<double>(qb) / static_cast<double>(r.quantized_parameters);
    }()
                                                  : 0.0;
    if (o->json) {
      nlohmann::json j = {{"format", r.spec.describe()},
                          {"bytes_before", r.bytes_before},
                          {"bytes_after", r.bytes_after},
                          {"quantized_parameters", r.quantized_parameters},
                          {"kept_parameters", r.kept_parameters},
                          {"bits_per_quantized_weight", bpw},
                          {"seconds", r.seconds},
                          {"files", r.files}};
      std::cout << j.dump(2) << "\n";
      return;
    }
    std::printf("%s -> %s: %s\n", o->in.c_str(), o->out.c_str(), r.spec.describe().c_str());
    std::printf("  %-28s %14s\n", "before (tensors on disk)",
                human_bytes(static_cast<double>(r.bytes_before)).c_str());
    std::printf("  %-28s %14s\n", "after", human_bytes(static_cast<double>(r.bytes_after)).c_str());
    std::printf(
        "  %-28s %14s (%.1f %%)\n", "saved",
        human_bytes(static_cast<double>(r.bytes_before - r.bytes_after)).c_str(),
        100.0 * static_cast<double>(r.bytes_before - r.bytes_after) / static_cast<double>(r.bytes_before));
    std::printf("  %-28s %14.3f\n", "bits per quantized weight", bpw);
    std::printf("  %-28s %14lld (%lld kept in float)\n", "parameters quantized",
                static_cast<long long>(r.quantized_parameters), static_cast<long long>(r.kept_parameters));
    std::printf("  %-28s %14.1f s, %zu files\n", "time", r.seconds, r.files.size());
  });
}

}  // namespace msbnb::cli
