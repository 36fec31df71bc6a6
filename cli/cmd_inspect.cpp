// `msbnb inspect CHECKPOINT`: per-layer table of the quantized linears (format, bits per
// weight, error against the float weights) and, with --svg, one layer's weight histogram with
// its quantization levels and its error distribution.
//
// The float weights: a float checkpoint is quantized while loading (--format, default nf4) and
// compared with its own tensors; a quantized checkpoint is compared with --reference FLOAT_DIR
// (the checkpoint it was made from) when given, else only its format and size are shown.
#include <c10/util/Exception.h>
#include <torch/nn/modules/linear.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <set>

#include "common.h"
#include "msbnb/io/atomic_file.h"
#include "msbnb/nn/linear.h"
#include "svg.h"

namespace msbnb::cli {
namespace {

struct LayerRow {
  std::string name, format;
  std::vector<int64_t> shape;
  int64_t bytes = 0;
  double bits = 0;
  bool has_error = false;
  double rel_rms = 0, max_abs = 0, sqnr_db = 0;
};

// The weight's quantization blocks as rows [blocks, size] (whole blocks only): nf4 / fp4 blocks
// of the flattened weight, int4 groups along in_features, int8 rows.
torch::Tensor as_blocks(const torch::Tensor& w, const std::string& format, int64_t blocksize) {
  if (format == "int8") return w;
  if (format == "int4") {
    const int64_t groups = w.size(1) / blocksize;
    if (groups == 0) return w;
    return w.narrow(1, 0, groups * blocksize).reshape({-1, blocksize});
  }
  const int64_t n = w.numel() / blocksize * blocksize;
  if (n == 0) return w.reshape({1, -1});
  return w.reshape({-1}).narrow(0, 0, n).reshape({-1, blocksize});
}

void write_layer_svg(const std::string& path, const LayerRow& row, const torch::Tensor& w,
                     const torch::Tensor& wq, int64_t blocksize) {
  // Normalize both by the quantized block's absmax: the levels are then the format's code.
  const torch::Tensor bq = as_blocks(wq, row.format, blocksize);
  const torch::Tensor scale = bq.abs().amax(1, true).clamp_min(1e-30);
  const torch::Tensor wn = (as_blocks(w, row.format, blocksize) / scale).contiguous();
  const torch::Tensor qn = (bq / scale).contiguous();
  std::set<double> levels;
  const float* qp = qn.data_ptr<float>();
  for (int64_t i = 0; i < qn.numel() && levels.size() <= 64; ++i)
    levels.insert(std::round(qp[i] * 1e4) / 1e4);
  SvgPlot a;
  a.title = row.name + " (" + row.format + "): weights / block absmax";
  a.x_label = "weight / absmax of its block (" +
              std::string(row.format == "int8"   ? "row"
                          : row.format == "int4" ? "group"
                                                 : "block") +
              ")";
  a.y_label = "weights";
  a.bars.push_back(
      {"float weights", "#1f77b4", -1.0, 1.0, histogram(wn.data_ptr<float>(), wn.numel(), -1, 1, 200)});
  if (levels.size() <= 64) {
    a.markers.assign(levels.begin(), levels.end());
    a.marker_label = std::to_string(levels.size()) + " levels";
  }
  const torch::Tensor err = (wq - w).contiguous();
  const double m = std::max(err.abs().max().item<double>(), 1e-30);
  SvgPlot b;
  b.title = "error: dequantized - float (relative RMS " + std::to_string(row.rel_rms) + ")";
  b.x_label = "error";
  b.y_label = "weights";
  b.bars.push_back({"error", "#2ca02c", -m, m, histogram(err.data_ptr<float>(), err.numel(), -m, m, 200)});
  io::write_file_atomic(path, render_svg({a, b}));
}

}  // namespace

void add_inspect(CLI::App& app) {
  struct Opts {
    std::string dir, format = "nf4", reference, svg, layer;
    bool json = false;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* c = app.add_subcommand("inspect", "Per-layer formats, bits per weight and quantization errors");
  c->add_option("CHECKPOINT", o->dir, "checkpoint folder (float or quantized)")->required();
  c->add_option("--format", o->format, "for a float checkpoint: int8 | int4 | nf4 | nf4-dq | fp4 | fp4-dq")
      ->capture_default_str();
  c->add_option("--reference", o->reference, "for a quantized checkpoint: the float checkpoint it came from");
  c->add_option("--svg", o->svg, "write the weight histogram with levels and the error distribution");
  c->add_option("--layer", o->layer, "the layer of the SVG (default: the first quantized one)");
  c->add_flag("--json", o->json, "machine-readable output");
  c->callback([o] {
    models::LoadOptions lo;
    lo.quantize = parse_quantize_option(o->format);
    TORCH_CHECK(lo.quantize.has_value(), "--format: expected a quantized format, got \"", o->format, "\"");
    models::LoadedModel m = load_with_progress(o->dir, lo);
    const bool from_float = models::read_config(o->dir).quantization == std::nullopt;
    const std::string ref_dir = from_float ? o->dir : o->reference;
    std::optional<models::CheckpointFiles> ref;
    if (!ref_dir.empty()) ref.emplace(models::CheckpointFiles::open(ref_dir));
    const int64_t blocksize = m.quantization ? m.quantization->blocksize : 64;

    std::vector<LayerRow> rows;
    bool svg_done = false;
    const auto modules = m.model->named_modules();
    for (const auto& item : modules) {
      const std::string& name = item.key();
      torch::Tensor wq;
      std::string format;
      int64_t bytes = 0;
      if (auto* l4 = item.value()->as<nn::Linear4bitImpl>()) {
        wq = l4->dequantize_weights();
        format = l4->quant_type();
        bytes = l4->memory_bytes();
      } else if (auto* l8 = item.value()->as<nn::Linear8bitImpl>()) {
        wq = l8->dequantize_weights();
        format = "int8";
        bytes = l8->memory_bytes();
      } else {
        continue;
      }
      LayerRow r;
      r.name = name;
      r.format = format;
      r.shape = wq.sizes().vec();
      r.bytes = bytes;
      r.bits = 8.0 * static_cast<double>(bytes) / static_cast<double>(wq.numel());
      torch::Tensor w;
      if (ref) {
        const std::string key = name + ".weight";
        TORCH_CHECK(ref->has(key), "--reference: ", ref_dir, " has no tensor ", key);
        w = ref->get(key).to(torch::kFloat32);
        TORCH_CHECK(w.sizes() == wq.sizes(), "--reference: ", key, ": expected shape ", wq.sizes(), ", got ",
                    w.sizes());
        const torch::Tensor err = wq - w;
        const double en = err.norm().item<double>(), wn = w.norm().item<double>();
        r.has_error = true;
        r.rel_rms = wn > 0 ? en / wn : 0;
        r.max_abs = err.abs().max().item<double>();
        r.sqnr_db = en > 0 ? 20 * std::log10(wn / en) : INFINITY;
      }
      if (!o->svg.empty() && !svg_done && (o->layer.empty() || o->layer == name)) {
        TORCH_CHECK(w.defined(),
                    "--svg: the error distribution needs the float weights (--reference FLOAT_DIR)");
        write_layer_svg(o->svg, r, w, wq, blocksize);
        svg_done = true;
      }
      if (ref) ref->release(name + ".weight");
      rows.push_back(std::move(r));
    }
    TORCH_CHECK(!rows.empty(), o->dir, ": expected quantized linear layers, found none");
    TORCH_CHECK(o->svg.empty() || svg_done, "--layer: expected a quantized layer's name (e.g. ",
                rows.front().name, "), got \"", o->layer, "\"");
    int64_t total_bytes = 0, total_weights = 0;
    double sqnr_sum = 0;
    for (const auto& r : rows) {
      total_bytes += r.bytes;
      total_weights += r.shape[0] * r.shape[1];
      sqnr_sum += r.sqnr_db;
    }
    if (o->json) {
      nlohmann::json layers = nlohmann::json::array();
      for (const auto& r : rows) {
        nlohmann::json j = {{"name", r.name},
                            {"format", r.format},
                            {"shape", r.shape},
                            {"bytes", r.bytes},
                            {"bits_per_weight", r.bits}};
        if (r.has_error) {
          j["relative_rms_error"] = r.rel_rms;
          j["max_abs_error"] = r.max_abs;
          j["sqnr_db"] = r.sqnr_db;
        }
        layers.push_back(j);
      }
      std::cout << nlohmann::json({{"checkpoint", o->dir},
                                   {"quantization", m.quantization ? m.quantization->describe() : "none"},
                                   {"layers", layers},
                                   {"linear_bytes", total_bytes},
                                   {"linear_weights", total_weights}})
                       .dump(2)
                << "\n";
      return;
    }
    std::printf(
        "%s: %s%s\n\n", o->dir.c_str(), m.quantization ? m.quantization->describe().c_str() : "",
        from_float ? " (quantized while loading; errors against the checkpoint's float weights)" : "");
    std::printf("%-44s %-6s %13s %10s %7s", "layer", "format", "shape", "bytes", "bits/w");
    if (ref) std::printf(" %10s %10s %8s", "rel. RMS", "max |err|", "SQNR dB");
    std::printf("\n");
    for (const auto& r : rows) {
      const std::string shape = std::to_string(r.shape[0]) + "x" + std::to_string(r.shape[1]);
      std::printf("%-44s %-6s %13s %10s %7.3f", r.name.c_str(), r.format.c_str(), shape.c_str(),
                  human_bytes(static_cast<double>(r.bytes)).c_str(), r.bits);
      if (r.has_error) std::printf(" %10.5f %10.3g %8.2f", r.rel_rms, r.max_abs, r.sqnr_db);
      std::printf("\n");
    }
    std::printf("\n%zu quantized layers, %lld weights in %s: %.3f bits per weight", rows.size(),
                static_cast<long long>(total_weights), human_bytes(static_cast<double>(total_bytes)).c_str(),
                8.0 * static_cast<double>(total_bytes) / static_cast<double>(total_weights));
    if (ref) std::printf(", mean SQNR %.2f dB", sqnr_sum / static_cast<double>(rows.size()));
    std::printf("\n");
    if (!o->svg.empty()) std::printf("histograms: %s\n", o->svg.c_str());
  });
}

}  // namespace msbnb::cli
