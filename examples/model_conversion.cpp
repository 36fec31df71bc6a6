// Model conversion at LLaMA scale: the memory table of LLaMA-7B / 13B / 70B in FP16, INT8, INT4
// (group 128), NF4 and NF4 with double quantization, from bytes measured on real-size layers
// (codes and every statistic), against the usual "14 / 7 / 3.5 GB" claims; and the peak memory
// of the in-place conversion against the copying one, read from /proc/self/status.
//
// How the table is measured: a decoder block's layers have few distinct shapes (q/o, k/v,
// gate/up, down), so each distinct shape is built once at its real size, converted in place by
// msbnb::convert_to_quantized_model_inplace, measured with msbnb::get_model_size, and freed;
// the model's bytes are the per-layer bytes times their counts (layers per block x blocks),
// plus the embedding and lm_head (vocab x hidden, measured the same way) and the RMSNorm
// weights (kept in float). The weights are one shared random buffer viewed at each shape: byte
// counts do not depend on the values. FP16 is 2 bytes per parameter by definition.
//
// Exit status: 0, or 1 if the in-place conversion's peak grew by more than one layer's
// conversion needs (2 x the largest float layer + 2 x the largest quantized one), i.e. it must
// stay far below a copy of the model.
#include <malloc.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "msbnb/convert/convert.h"

namespace {

namespace tnn = torch::nn;

struct Shape {
  std::string name;
  int64_t out, in;
  int64_t per_block;  // how many of this shape a decoder block holds
};

struct Llama {
  std::string name;
  int64_t hidden, intermediate, kv_out, layers, vocab;
  double claim_fp16, claim_int8, claim_int4;  // GB, as usually quoted
  std::vector<Shape> block() const {
    return {{"q_proj/o_proj", hidden, hidden, 2},
            {"k_proj/v_proj", kv_out, hidden, 2},
            {"gate_proj/up_proj", intermediate, hidden, 2},
            {"down_proj", hidden, intermediate, 1}};
  }
};

struct Format {
  std::string name;
  msbnb::QuantConfig config;
};

// Reads a field of /proc/self/status in kB ("VmRSS", "VmHWM"); -1 if unavailable.
int64_t status_kb(const std::string& field) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stoll(line.substr(field.size() + 1));
  }
  return -1;
}

// Resets VmHWM to the current RSS (Linux >= 4.0); false if the kernel refuses.
bool reset_peak() {
  std::ofstream f("/proc/self/clear_refs");
  f << "5";
  f.flush();
  return static_cast<bool>(f);
}

double gb(double bytes) { return bytes / 1e9; }
double gib(double bytes) { return bytes / (1024.0 * 1024.0 * 1024.0); }

// A Linear of [out, in], no bias, whose weight is a view of `buffer` (no init, no copy).
tnn::Linear view_linear(const torch::Tensor& buffer, int64_t out, int64_t in) {
  tnn::Linear l(tnn::LinearOptions(1, 1).bias(false));
  l->options.in_features(in).out_features(out);
  l->weight.set_data(buffer.narrow(0, 0, out * in).view({out, in}));  // the parameter, re-pointed
  return l;
}

// Bytes of one [out, in] layer converted with `config`, measured (Embedding if embedding).
// Cached per (kind, shape, format): LLaMA-7B's k/v are q's shape, and so on.
int64_t measured_bytes(const torch::Tensor& buffer, int64_t out, int64_t in, const msbnb::QuantConfig& config,
                       bool embedding) {
  static std::map<std::string, int64_t> cache;
  const std::string key = std::to_string(embedding) + " " + std::to_string(out) + "x" + std::to_string(in) +
                          " " + config.describe();
  auto hit = cache.find(key);
  if (hit != cache.end()) return hit->second;
  tnn::ModuleDict holder;
  if (embedding) {
    tnn::Embedding e(tnn::EmbeddingOptions(1, 1));
    e->options.num_embeddings(out).embedding_dim(in);
    e->weight.set_data(buffer.narrow(0, 0, out * in).view({out, in}));
    holder->update({{"layer", e.ptr()}});
  } else {
    holder->update({{"layer", view_linear(buffer, out, in).ptr()}});
  }
  const auto report = msbnb::convert_to_quantized_model_inplace(*holder, config);
  TORCH_CHECK(report.converted.size() == 1, "expected one converted layer, got ", report.converted.size());
  return cache[key] = msbnb::get_model_size(*holder).total_bytes;
}

}  // namespace

int main() {
  torch::manual_seed(0);
  torch::NoGradGuard no_grad;
  const auto t0 = std::chrono::steady_clock::now();

  // ---- first, with glibc malloc's defaults: in-place vs copying peak memory of one LLaMA-7B
  // decoder block at real size
  auto make_block = [] {
    torch::OrderedDict<std::string, std::shared_ptr<tnn::Module>> layers;
    for (const char* n : {"q_proj", "k_proj", "v_proj", "o_proj"}) {
      layers.insert(n, tnn::Linear(tnn::LinearOptions(4096, 4096).bias(false)).ptr());
    }
    layers.insert("gate_proj", tnn::Linear(tnn::LinearOptions(4096, 11008).bias(false)).ptr());
    layers.insert("up_proj", tnn::Linear(tnn::LinearOptions(4096, 11008).bias(false)).ptr());
    layers.insert("down_proj", tnn::Linear(tnn::LinearOptions(11008, 4096).bias(false)).ptr());
    return tnn::ModuleDict(layers);
  };
  const msbnb::QuantConfig nf4 = msbnb::Int4Config().quant_type("nf4");
  int status = 0;
  {
    auto block = make_block();
    const int64_t float_bytes = msbnb::get_model_size(*block).total_bytes;
    const int64_t rss_float = status_kb("VmRSS");
    const bool peak_ok = reset_peak();
    const auto report = msbnb::convert_to_quantized_model_inplace(*block, nf4);
    const int64_t hwm = status_kb("VmHWM"), rss_after = status_kb("VmRSS");
    int64_t largest_q = 0, largest_f = 0;
    for (const auto& l : report.converted) {
      largest_q = std::max(largest_q, l.bytes_after);
      largest_f = std::max(largest_f, l.bytes_before);
    }
    std::cout << std::fixed << std::setprecision(1)
              << "in-place NF4+DQ conversion of one LLaMA-7B block (float32, " << float_bytes / 1e6
              << " MB; quantized " << report.bytes_after() / 1e6 << " MB; largest quantized layer "
              << largest_q / 1e6 << " MB):\n";
    if (peak_ok && hwm > 0 && rss_float > 0) {
      const double extra = (hwm - rss_float) * 1024.0;
      std::cout << "  VmRSS before " << rss_float / 1024 << " MiB, peak (VmHWM) " << hwm / 1024
                << " MiB, after " << rss_after / 1024 << " MiB: peak - before = " << extra / 1e6 << " MB\n";
      // One layer at a time: the transient of converting the largest layer (its quantized
      // output, the layer's zero-initialised buffers, and the finiteness check of the weight,
      // torch::isfinite(w).all(), whose temporaries are ~1.7x the float layer) bounds the growth.
      // A copy of the model would add the whole float block.
      const double bound = 2.0 * static_cast<double>(largest_f) + 2.0 * static_cast<double>(largest_q);
      std::cout << "  bound (2 x largest float layer + 2 x largest quantized layer) " << bound / 1e6
                << " MB\n";
      if (extra > bound) {
        std::cout << "FAIL: the in-place peak grew by more than one layer's conversion\n";
        status = 1;
      }
    } else {
      std::cout << "  /proc/self/clear_refs or VmHWM unavailable: peak not measured\n";
    }
  }
  {
    auto block = make_block();
    const int64_t rss_float = status_kb("VmRSS");
    const bool peak_ok = reset_peak();
    auto copy = msbnb::convert_to_quantized_model(block, nf4);
    const int64_t hwm = status_kb("VmHWM");
    if (peak_ok && hwm > 0 && rss_float > 0) {
      std::cout << "copying NF4+DQ conversion of the same block: VmRSS before " << rss_float / 1024
                << " MiB, peak " << hwm / 1024 << " MiB: peak - before = " << (hwm - rss_float) * 1024.0 / 1e6
                << " MB (the clone of the float block, then its layers are freed one by one)\n";
    }
  }

  const auto t_table = std::chrono::steady_clock::now();
  const std::vector<Llama> models = {
      {"LLaMA-7B", 4096, 11008, 4096, 32, 32000, 14, 7, 3.5},
      {"LLaMA-13B", 5120, 13824, 5120, 40, 32000, 26, 13, 6.5},
      {"LLaMA-70B", 8192, 28672, 1024, 80, 32000, 140, 70, 35},
  };
  const std::vector<Format> formats = {
      {"INT8", msbnb::Int8Config().convert_embeddings(true)},
      {"INT4 g128",
       msbnb::Int4Config().quant_type("int4").compress_statistics(false).convert_embeddings(true)},
      {"NF4", msbnb::Int4Config().quant_type("nf4").compress_statistics(false).convert_embeddings(true)},
      {"NF4+DQ", msbnb::Int4Config().quant_type("nf4").compress_statistics(true).convert_embeddings(true)},
  };
  int64_t largest = 0;
  for (const auto& m : models) {
    for (const auto& s : m.block()) largest = std::max(largest, s.out * s.in);
    largest = std::max(largest, m.vocab * m.hidden);
  }
  // The table converts ~8 G weights in layers of up to 1 GB: let malloc reuse freed memory
  // instead of mapping (and page-faulting) fresh zeroed pages for every layer. (After the peaks:
  // with these settings freed memory stays in the process and VmRSS would not show it.)
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  // One buffer for every shape (random values: realistic statistics, sizes do not depend on them).
  torch::Tensor buffer = torch::randn({largest}) * 0.02;

  struct Row {
    std::string model;
    int64_t params = 0;
    double fp16 = 0;
    std::vector<double> all, kept;  // per format: everything converted / embed + lm_head kept in fp16
  };
  std::vector<Row> rows;
  std::cout << "per-layer bytes, measured (one layer of each distinct shape at real size):\n";
  for (const auto& m : models) {
    Row row;
    row.model = m.name;
    int64_t block_params = 2 * m.hidden;  // two RMSNorm weights
    for (const auto& s : m.block()) block_params += s.per_block * s.out * s.in;
    const int64_t head_params = m.vocab * m.hidden;  // the embedding, and the lm_head alike
    row.params = block_params * m.layers + 2 * head_params + m.hidden;
    row.fp16 = 2.0 * static_cast<double>(row.params);
    for (const auto& f : formats) {
      int64_t block_bytes = 2 * m.hidden * 2;  // norms stay fp16
      std::ostringstream line;
      line << "  " << std::left << std::setw(10) << m.name << std::setw(10) << f.name;
      for (const auto& s : m.block()) {
        const int64_t b = measured_bytes(buffer, s.out, s.in, f.config, false);
        line << " " << s.name << " [" << s.out << "x" << s.in << "] " << b;
        block_bytes += s.per_block * b;
      }
      const int64_t lm_head = measured_bytes(buffer, m.vocab, m.hidden, f.config, false);
      const int64_t embed = measured_bytes(buffer, m.vocab, m.hidden, f.config, true);
      line << " lm_head " << lm_head << " embed " << embed;
      std::cout << line.str() << "\n";
      const double body = static_cast<double>(block_bytes) * static_cast<double>(m.layers) + 2.0 * m.hidden;
      row.all.push_back(body + static_cast<double>(lm_head + embed));
      row.kept.push_back(body + 2.0 * 2.0 * static_cast<double>(head_params));
    }
    rows.push_back(row);
  }
  buffer = torch::Tensor();  // 1 GB, not to be counted in the peaks below
  const double table_secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_table).count();

  auto print_table = [&](const char* title, bool kept) {
    std::cout << "\n" << title << " (GB = 1e9 bytes; GiB in parentheses)\n";
    std::cout << std::left << std::setw(11) << "model" << std::setw(9) << "params" << std::setw(18) << "FP16";
    for (const auto& f : formats) std::cout << std::setw(18) << f.name;
    std::cout << "\n" << std::fixed << std::setprecision(2);
    for (const auto& r : rows) {
      std::ostringstream p, c;
      p << std::setprecision(2) << std::fixed << r.params / 1e9 << "B";
      c << std::fixed << std::setprecision(2) << gb(r.fp16) << " (" << gib(r.fp16) << ")";
      std::cout << std::setw(11) << r.model << std::setw(9) << p.str() << std::setw(18) << c.str();
      for (double v : kept ? r.kept : r.all) {
        std::ostringstream cell;
        cell << std::fixed << std::setprecision(2) << gb(v) << " (" << gib(v) << ")";
        std::cout << std::setw(18) << cell.str();
      }
      std::cout << "\n";
    }
  };
  print_table("memory, every Linear and the embedding converted", false);
  print_table("memory, embedding and lm_head kept in FP16 (the usual practice)", true);

  std::cout << "\nclaims checked (FP16 / INT8 / INT4, GB), measured with everything converted:\n";
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto& m = models[i];
    const auto& r = rows[i];
    std::cout << "  " << std::setw(10) << m.name << " claim " << m.claim_fp16 << " / " << m.claim_int8
              << " / " << m.claim_int4 << "  measured " << gb(r.fp16) << " / " << gb(r.all[0]) << " / "
              << gb(r.all[1]) << " (nf4 " << gb(r.all[2]) << ", nf4+dq " << gb(r.all[3])
              << "); with embed + lm_head fp16: " << gb(r.kept[0]) << " / " << gb(r.kept[1]) << "\n";
  }

  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << "\nelapsed " << std::setprecision(1) << secs << " s (table " << table_secs << " s)\n";
  return status;
}
