// Checkpoint folders: load (float / quantize while loading / pre-quantized), and streaming
// quantization of a folder into a new one.
#include "msbnb/models/loader.h"

#include <c10/util/Exception.h>
#include <torch/nn/modules/linear.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <unordered_set>

#include "../io/json_strict.h"
#include "msbnb/io/atomic_file.h"
#include "msbnb/lora/peft.h"
#include "msbnb/nn/linear.h"

namespace msbnb::models {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kIndexFile = "model.safetensors.index.json";
constexpr const char* kSingleFile = "model.safetensors";

std::string read_small_file(const std::string& path, size_t max_bytes) {
  std::ifstream f(path, std::ios::binary);
  TORCH_CHECK(f.good(), path, ": expected a readable file, got none");
  std::ostringstream ss;
  ss << f.rdbuf();
  std::string s = ss.str();
  TORCH_CHECK(s.size() <= max_bytes, path, ": expected at most ", max_bytes, " bytes, got ", s.size());
  return s;
}

// Streaming order: the embeddings, the layers by number, then the rest (norm, lm_head).
std::tuple<int, int64_t, std::string> order_key(const std::string& name) {
  const std::string layers = "model.layers.";
  if (name.rfind("model.embed_tokens", 0) == 0) return {0, 0, name};
  if (name.rfind(layers, 0) == 0) {
    size_t end = name.find('.', layers.size());
    const std::string num =
        name.substr(layers.size(), end == std::string::npos ? std::string::npos : end - layers.size());
    if (!num.empty() && num.size() < 10 && std::all_of(num.begin(), num.end(), ::isdigit)) {
      return {1, std::stoll(num), name};
    }
  }
  return {2, 0, name};
}

bool is_float(io::StDtype d) {
  return d == io::StDtype::F32 || d == io::StDtype::F16 || d == io::StDtype::BF16;
}

std::string dtype_string(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat32:
      return "float32";
    case torch::kFloat16:
      return "float16";
    case torch::kBFloat16:
      return "bfloat16";
    default:
      return std::string(c10::toString(t));
  }
}

// A module path's linear layers that quantization converts: the decoder's projections and lm_head.
bool is_quantizable_linear(const std::string& module_path) {
  static const std::vector<std::string> tails = {".q_proj",    ".k_proj",  ".v_proj",   ".o_proj",
                                                 ".gate_proj", ".up_proj", ".down_proj"};
  if (module_path == "lm_head") return true;
  for (const auto& t : tails) {
    if (module_path.size() > t.size() && module_path.compare(module_path.size() - t.size(), t.size(), t) == 0)
      return true;
  }
  return false;
}

bool skipped(const QuantizationSpec& spec, const std::string& module_path) {
  for (const auto& e : spec.skip_modules) {
    if (msbnb::module_name_matches(module_path, e)) return true;
  }
  return false;
}

// A quantized layer of `spec` for a [out, in] weight (no bias: the bias is its own key).
torch::nn::AnyModule make_quantized(const QuantizationSpec& spec, int64_t in, int64_t out, bool bias) {
  if (spec.format == "int8") {
    return torch::nn::AnyModule(
        nn::Linear8bit(nn::Linear8bitOptions(in, out).bias(bias).threshold(spec.threshold)));
  }
  return torch::nn::AnyModule(nn::Linear4bit(nn::Linear4bitOptions(in, out)
                                                 .bias(bias)
                                                 .quant_type(spec.format)
                                                 .blocksize(spec.blocksize)
                                                 .compress_statistics(spec.double_quant)));
}

void quantize_into(torch::nn::Module& m, const torch::Tensor& w) {
  if (auto* l4 = dynamic_cast<nn::Linear4bitImpl*>(&m)) return l4->quantize_weights(w);
  // bitsandbytes' Int8Params quantize the weight cast to float16 (CB, SCB of the float16
  // values): the same here, so checkpoints match transformers + bitsandbytes.
  if (auto* l8 = dynamic_cast<nn::Linear8bitImpl*>(&m)) return l8->quantize_weights(w.to(torch::kFloat16));
  TORCH_CHECK(false, "internal: not a quantized linear layer");
}

void check_finite(const torch::Tensor& t, const std::string& where) {
  if (!t.is_floating_point()) return;
  TORCH_CHECK(torch::isfinite(t).all().item<bool>(), where, ": expected finite values, got NaN or Inf");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// CheckpointFiles

CheckpointFiles CheckpointFiles::open(const std::string& dir) {
  CheckpointFiles c;
  const std::string index = dir + "/" + kIndexFile, single = dir + "/" + kSingleFile;
  TORCH_CHECK(fs::is_directory(dir), dir, ": expected a checkpoint folder, got ",
              fs::exists(dir) ? "a file" : "nothing (no such folder)");
  if (fs::exists(index)) {
    json j;
    try {
      j = io::detail::parse_json_strict(read_small_file(index, size_t{64} << 20), 8, index);
    } catch (const io::FormatError& e) {
      TORCH_CHECK(false, e.what());
    }
    TORCH_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(), index,
                ": expected an object with a \"weight_map\" object, got ", io::detail::shown(j));
    std::map<std::string, size_t> file_index;
    std::vector<std::pair<std::string, std::string>> entries;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      TORCH_CHECK(it.value().is_string(), index, ": weight_map['", it.key(), "']: expected a file name, got ",
                  io::detail::shown(it.value()));
      const std::string f = it.value().get<std::string>();
      TORCH_CHECK(!f.empty() && f.find('/') == std::string::npos && f != "." && f != "..", index,
                  ": weight_map['", it.key(), "']: expected a file name in the folder, got ",
                  io::detail::quote_cut(f));
      if (!file_index.count(f)) {
        const std::string path = dir + "/" + f;
        TORCH_CHECK(fs::exists(path), index, ": names shard '", f, "', which is missing (expected ", path,
                    ")");
        file_index[f] = c.files_.size();
        c.files_.push_back(io::SafetensorsFile::open(path));
      }
      entries.emplace_back(it.key(), f);
    }
    TORCH_CHECK(!entries.empty(), index, ": expected a non-empty weight_map, got an empty one");
    for (const auto& [name, f] : entries) {
      const auto& file = c.files_[file_index[f]];
      TORCH_CHECK(file.has(name), index, ": weight_map says tensor '", name, "' is in '", f,
                  "', which lacks it");
      c.where_[name] = file_index[f];
    }
    for (const auto& file : c.files_) {
      for (const auto& n : file.names()) {
        TORCH_CHECK(c.where_.count(n) && c.files_[c.where_[n]].path() == file.path(), file.path(),
                    ": tensor '", n, "' is not in ", kIndexFile, "'s weight_map for this file");
      }
    }
  } else if (fs::exists(single)) {
    c.files_.push_back(io::SafetensorsFile::open(single));
    for (const auto& n : c.files_[0].names()) c.where_[n] = 0;
  } else {
    const bool bin =
        fs::exists(dir + "/pytorch_model.bin") || fs::exists(dir + "/pytorch_model.bin.index.json");
    TORCH_CHECK(
        false, dir, ": expected ", kSingleFile, " or ", kIndexFile, ", found neither",
        bin ? " (pytorch_model.bin, a pickle, is not read: save the model with safe_serialization=True)"
            : "");
  }
  for (const auto& [n, i] : c.where_) c.names_.push_back(n);
  std::sort(c.names_.begin(), c.names_.end(),
            [](const std::string& a, const std::string& b) { return order_key(a) < order_key(b); });
  return c;
}

const io::SafetensorsFile& CheckpointFiles::file_of(const std::string& name) const {
  auto it = where_.find(name);
  TORCH_CHECK(it != where_.end(), "checkpoint: expected a tensor '", name, "', got none");
  return files_[it->second];
}
const io::TensorEntry& CheckpointFiles::info(const std::string& name) const {
  return file_of(name).info(name);
}
torch::Tensor CheckpointFiles::get(const std::string& name) const { return file_of(name).get(name); }
void CheckpointFiles::release(const std::string& name) const { file_of(name).release(name); }
std::vector<std::string> CheckpointFiles::paths() const {
  std::vector<std::string> out;
  for (const auto& f : files_) out.push_back(f.path());
  return out;
}
int64_t CheckpointFiles::total_bytes() const {
  int64_t n = 0;
  for (const auto& [name, i] : where_) n += static_cast<int64_t>(files_[i].info(name).nbytes());
  return n;
}

// ---------------------------------------------------------------------------------------------
// Loading

LinearFactory quantized_linear_factory(const QuantizationSpec& spec) {
  spec.validate();
  return [spec](const std::string& name, int64_t in, int64_t out, bool bias) {
    if (skipped(spec, name))
      return torch::nn::AnyModule(torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(bias)));
    return make_quantized(spec, in, out, bias);
  };
}

int64_t module_bytes(const torch::nn::Module& module) {
  std::unordered_set<const void*> seen;
  int64_t n = 0;
  auto add = [&](const torch::Tensor& t) {
    if (!t.defined() || !seen.insert(t.unsafeGetTensorImpl()).second) return;
    n += t.numel() * static_cast<int64_t>(t.element_size());
  };
  for (const auto& p : module.parameters(true)) add(p);
  for (const auto& b : module.buffers(true)) add(b);
  return n;
}

LoadedModel load_pretrained(const std::string& dir, const LoadOptions& options) {
  const auto t0 = std::chrono::steady_clock::now();
  LoadedModel out;
  out.dir = dir;
  TORCH_CHECK(fs::is_directory(dir), dir, ": expected a checkpoint folder, got ",
              fs::exists(dir) ? "a file" : "nothing (no such folder)");
  out.config = read_config(dir);
  const LlamaConfig& cfg = out.config;
  out.quantization = cfg.quantization ? cfg.quantization : options.quantize;
  const bool prequantized = cfg.quantization.has_value();
  CheckpointFiles files = CheckpointFiles::open(dir);
  out.file_bytes = files.total_bytes();
  torch::NoGradGuard no_grad;
  out.model = LlamaForCausalLM(
      cfg, out.quantization ? quantized_linear_factory(*out.quantization) : float_linear_factory());

  std::set<std::string> consumed;
  int64_t done = 0;
  const int64_t total = static_cast<int64_t>(files.names().size());
  auto tick = [&](const std::string& what) {
    ++done;
    if (options.progress) options.progress(std::min(done, total), total, what);
  };
  auto take = [&](const std::string& name) {
    TORCH_CHECK(files.has(name), dir, ": expected tensor '", name, "' in the checkpoint, got none",
                prequantized ? " (is it a checkpoint of this quantization_config?)" : "");
    consumed.insert(name);
    return files.get(name);
  };
  auto copy_param = [&](const std::string& name, torch::Tensor& dst) {
    torch::Tensor src = take(name);
    TORCH_CHECK(src.sizes() == dst.sizes(), dir, ": tensor '", name, "': expected shape ", dst.sizes(),
                ", got ", src.sizes());
    TORCH_CHECK(src.is_floating_point(), dir, ": tensor '", name, "': expected a float dtype, got ",
                src.scalar_type());
    check_finite(src, dir + ": tensor '" + name + "'");
    dst.copy_(src);
    files.release(name);
    tick(name);
  };

  for (const auto& item : out.model->named_modules("", /*include_self=*/true)) {
    const std::string& path = item.key();
    torch::nn::Module& m = *item.value();
    auto dotted = [&](const std::string& key) { return path.empty() ? key : path + "." + key; };
    if (auto* qm = dynamic_cast<nn::QuantizedModule*>(&m)) {
      const std::string wname = dotted("weight");
      if (files.has(wname) && is_float(files.info(wname).dtype) && !prequantized) {
        // Quantize while loading: the float weight is read (a view of the file), quantized
        // into the layer's packed buffers and its pages released.
        torch::Tensor w = take(wname);
        quantize_into(m, w);
        files.release(wname);
        tick(wname);
        for (auto& p : m.named_parameters(false)) copy_param(dotted(p.key()), p.value());
        continue;
      }
      std::map<std::string, torch::Tensor> entries;
      for (const auto& key : qm->quantized_state_keys()) {
        const std::string full = dotted(key);
        if (key == "weight_format" && !files.has(full)) {
          entries[key] = torch::zeros({}, torch::kUInt8);  // older savers omit it: "row" is the only format
          continue;
        }
        entries[key] = take(full);
      }
      qm->load_quantized_state(entries, path);
      for (const auto& [key, t] : entries) {
        if (files.has(dotted(key))) {
          files.release(dotted(key));
          tick(dotted(key));
        }
      }
      continue;
    }
    const bool tied_head = cfg.tie_word_embeddings && path == "lm_head";
    for (auto& p : m.named_parameters(false)) {
      if (tied_head) {  // the embedding's weight; some savers write it twice
        if (files.has(dotted(p.key()))) consumed.insert(dotted(p.key()));
        continue;
      }
      copy_param(dotted(p.key()), p.value());
    }
    for (auto& b : m.named_buffers(false)) copy_param(dotted(b.key()), b.value());
  }
  std::vector<std::string> unexpected;
  for (const auto& n : files.names()) {
    if (consumed.count(n)) continue;
    if (n.size() > 20 && n.compare(n.size() - 20, 20, ".rotary_emb.inv_freq") == 0) continue;  // old savers
    unexpected.push_back(n);
  }
  if (!unexpected.empty()) {
    std::ostringstream os;
    for (size_t i = 0; i < unexpected.size() && i < 8; ++i)
      os << (i ? ", " : "") << "'" << unexpected[i] << "'";
    if (unexpected.size() > 8) os << ", ... (" << unexpected.size() << " in all)";
    TORCH_CHECK(false, dir, ": unexpected tensors for a LlamaForCausalLM of this config",
                prequantized ? " and quantization_config" : "", ": ", os.str());
  }
  if (!options.adapter.empty()) lora::load_adapter(*out.model, options.adapter);
  if (options.matmul_path != MatmulPath::automatic) set_matmul_path(*out.model, options.matmul_path);
  out.model->eval();
  out.model_bytes = module_bytes(*out.model);
  out.linear_bytes = linear_bytes(*out.model);
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return out;
}

// ---------------------------------------------------------------------------------------------
// Streaming quantization

QuantizeReport quantize_checkpoint(const std::string& in_dir, const std::string& out_dir,
                                   const QuantizeOptions& options) {
  const auto t0 = std::chrono::steady_clock::now();
  const QuantizationSpec& spec = options.spec;
  spec.validate();
  TORCH_CHECK(options.max_shard_bytes > 0, "max_shard_bytes: expected > 0, got ", options.max_shard_bytes);
  LlamaConfig cfg = read_config(in_dir);
  TORCH_CHECK(!cfg.quantization, in_dir, ": expected a float checkpoint, got one already quantized (",
              cfg.quantization->describe(), ")");
  TORCH_CHECK(!(cfg.tie_word_embeddings && !skipped(spec, "lm_head")), in_dir,
              ": lm_head is tied to the embeddings (tie_word_embeddings): keep it in float (skip lm_head)");
  CheckpointFiles files = CheckpointFiles::open(in_dir);
  TORCH_CHECK(!fs::exists(out_dir) || (fs::is_directory(out_dir) && fs::is_empty(out_dir)), out_dir,
              ": expected a new or empty folder, got ",
              fs::is_directory(out_dir) ? "a folder that is not empty" : "a file");
  const fs::path out_path = fs::absolute(out_dir);
  if (out_path.has_parent_path()) fs::create_directories(out_path.parent_path());
  const fs::path tmp = out_path.parent_path() /
                       ("." + out_path.filename().string() + ".msbnb-tmp-" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  QuantizeReport report;
  report.spec = spec;
  try {
    io::NamedTensors shard;
    std::vector<std::string> shard_sources;  // input tensors copied into the shard (release after writing)
    int64_t shard_bytes = 0;
    std::vector<std::vector<std::string>> shard_names;
    auto flush = [&] {
      if (shard.empty()) return;
      const std::string name = "shard-" + std::to_string(shard_names.size()) + ".tmp";
      io::save_safetensors((tmp / name).string(), shard, {{"format", "pt"}});
      std::vector<std::string> names;
      for (const auto& [n, t] : shard) names.push_back(n);
      shard_names.push_back(names);
      shard.clear();
      for (const auto& n : shard_sources) files.release(n);
      shard_sources.clear();
      shard_bytes = 0;
    };
    const int64_t total = static_cast<int64_t>(files.names().size());
    int64_t done = 0;
    for (const auto& name : files.names()) {
      const io::TensorEntry& e = files.info(name);
      QuantizedTensorReport r;
      r.name = name;
      r.shape = e.shape;
      r.bytes_before = static_cast<int64_t>(e.nbytes());
      const bool is_weight = name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0;
      const std::string module = is_weight ? name.substr(0, name.size() - 7) : name;
      if (is_weight && is_quantizable_linear(module) && e.shape.size() == 2 && is_float(e.dtype) &&
          !skipped(spec, module)) {
        torch::Tensor w = files.get(name);
        check_finite(w, in_dir + ": tensor '" + name + "'");
        torch::nn::AnyModule layer = make_quantized(spec, e.shape[1], e.shape[0], false);
        quantize_into(*layer.ptr(), w);
        files.release(name);
        for (auto& [k, t] : dynamic_cast<nn::QuantizedModule&>(*layer.ptr()).quantized_state()) {
          r.bytes_after += t.numel() * static_cast<int64_t>(t.element_size());
          shard.emplace_back(module + "." + k, t);
        }
        r.format = spec.format;
        report.quantized_parameters += e.numel();
      } else {
        torch::Tensor t = files.get(name);
        r.bytes_after = r.bytes_before;
        r.format = dtype_string(t.scalar_type());
        shard.emplace_back(name, t);
        shard_sources.push_back(name);
        report.kept_parameters += e.numel();
      }
      shard_bytes += r.bytes_after;
      report.bytes_before += r.bytes_before;
      report.bytes_after += r.bytes_after;
      report.tensors.push_back(r);
      if (shard_bytes >= options.max_shard_bytes) flush();
      if (options.progress) options.progress(++done, total, name);
    }
    flush();
    // Final names, the index, the tokenizer files, then config.json; then the folder appears.
    json weight_map = json::object();
    const size_t n = shard_names.size();
    for (size_t i = 0; i < n; ++i) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i + 1, n);
      const std::string final_name = n == 1 ? std::string(kSingleFile) : std::string(buf);
      fs::rename(tmp / ("shard-" + std::to_string(i) + ".tmp"), tmp / final_name);
      report.files.push_back(final_name);
      for (const auto& t : shard_names[i]) weight_map[t] = final_name;
    }
    if (n > 1) {
      json index;
      int64_t total_size = 0;
      for (const auto& f : report.files) total_size += static_cast<int64_t>(fs::file_size(tmp / f));
      index["metadata"] = {{"total_size", total_size}};
      index["weight_map"] = weight_map;
      io::write_file_atomic((tmp / kIndexFile).string(), index.dump(2) + "\n");
      report.files.push_back(kIndexFile);
    }
    for (const char* f : {"tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                          "special_tokens_map.json", "generation_config.json", "msbnb_tokenizer.json"}) {
      const fs::path src = fs::path(in_dir) / f;
      if (fs::is_regular_file(src)) {
        fs::copy_file(src, tmp / f);
        report.files.push_back(f);
      }
    }
    cfg.quantization = spec;
    io::write_file_atomic((tmp / "config.json").string(), config_json(cfg));
    report.files.push_back("config.json");
    if (fs::exists(out_path)) fs::remove(out_path);  // empty (checked above)
    fs::rename(tmp, out_path);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return report;
}

int64_t linear_bytes(const LlamaForCausalLMImpl& model) {
  int64_t other = 0;
  for (const auto& item : model.named_modules())
    if (dynamic_cast<RMSNormImpl*>(item.value().get())) other += item.value()->parameters()[0].numel() * 4;
  if (!model.config().tie_word_embeddings) other += model.model->embed_tokens->weight.numel() * 4;
  return module_bytes(model) - other;
}

int64_t set_matmul_path(torch::nn::Module& module, MatmulPath path) {
  int64_t n = 0;
  for (const auto& m : module.modules()) {
    if (auto* l = m->as<nn::Linear4bitImpl>()) {
      l->options.matmul_path(path);
      ++n;
    }
  }
  return n;
}

MatmulPath parse_matmul_path(const std::string& v, const std::string& what) {
  if (v == "auto" || v == "automatic") return MatmulPath::automatic;
  if (v == "exact") return MatmulPath::exact;
  if (v == "fast") return MatmulPath::fast;
  if (v == "int8") return MatmulPath::int8;
  TORCH_CHECK(false, what, ": expected auto, exact, fast or int8, got \"", v, "\"");
}

}  // namespace msbnb::models
