// config.json of LLaMA-family checkpoints (transformers 4 and 5 layouts) and bitsandbytes'
// quantization_config.
#include "msbnb/models/llama_config.h"

#include <c10/util/Exception.h>
#include <sys/stat.h>

#include <cmath>
#include <fstream>
#include <sstream>

#include "../io/json_strict.h"

namespace msbnb::models {
namespace {

using io::detail::shown;
using nlohmann::json;

// Sizes beyond this are refused: products of two of them still fit in int64 with room for
// element sizes (2^24 · 2^24 · 8 < 2^63).
constexpr int64_t kMaxDim = int64_t{1} << 24;

struct Reader {
  const json& obj;
  std::string source, where;  // where: "" or "quantization_config."

  [[noreturn]] void fail(const std::string& field, const std::string& expected, const json* got) const {
    TORCH_CHECK(false, source, ": field '", where, field, "': expected ", expected, ", got ",
                got == nullptr ? std::string("nothing (missing)") : shown(*got));
  }
  const json* find(const std::string& field) const {
    auto it = obj.find(field);
    return it == obj.end() || it->is_null() ? nullptr : &*it;
  }
  int64_t integer(const std::string& field, std::optional<int64_t> def, int64_t lo, int64_t hi) const {
    const json* v = find(field);
    if (v == nullptr) {
      if (def) return *def;
      fail(field, "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]", nullptr);
    }
    if (!v->is_number_integer()) fail(field, "an integer", v);
    int64_t x = 0;
    if (v->is_number_unsigned()) {
      const uint64_t u = v->get<uint64_t>();
      if (u > static_cast<uint64_t>(hi)) fail(field, "an integer <= " + std::to_string(hi), v);
      x = static_cast<int64_t>(u);
    } else {
      x = v->get<int64_t>();
    }
    if (x < lo || x > hi) {
      fail(field, "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]", v);
    }
    return x;
  }
  std::optional<int64_t> optional_token(const std::string& field) const {
    const json* v = find(field);
    if (v == nullptr) return std::nullopt;
    // eos_token_id may be a list (Llama 3): the first one is the stop token we use.
    if (v->is_array()) {
      if (v->empty()) return std::nullopt;
      if (!(*v)[0].is_number_integer()) fail(field, "an integer or a list of integers", v);
      return (*v)[0].get<int64_t>();
    }
    return integer(field, std::nullopt, 0, kMaxDim);
  }
  double number(const std::string& field, std::optional<double> def, double lo, double hi) const {
    const json* v = find(field);
    if (v == nullptr) {
      if (def) return *def;
      fail(field, "a number", nullptr);
    }
    if (!v->is_number()) fail(field, "a number", v);
    const double x = v->get<double>();
    if (!std::isfinite(x) || x < lo || x > hi) {
      std::ostringstream os;
      os << "a finite number in [" << lo << ", " << hi << "]";
      fail(field, os.str(), v);
    }
    return x;
  }
  bool boolean(const std::string& field, bool def) const {
    const json* v = find(field);
    if (v == nullptr) return def;
    if (!v->is_boolean()) fail(field, "true or false", v);
    return v->get<bool>();
  }
  std::string string(const std::string& field, const std::string& def) const {
    const json* v = find(field);
    if (v == nullptr) return def;
    if (!v->is_string()) fail(field, "a string", v);
    return v->get<std::string>();
  }
  std::vector<std::string> strings(const std::string& field, const std::vector<std::string>& def) const {
    const json* v = find(field);
    if (v == nullptr) return def;
    if (!v->is_array()) fail(field, "a list of strings", v);
    std::vector<std::string> out;
    for (const auto& e : *v) {
      if (!e.is_string()) fail(field, "a list of strings", v);
      out.push_back(e.get<std::string>());
    }
    return out;
  }
};

std::string dtype_name(const Reader& r, const std::string& field, const std::string& def) {
  std::string d = r.string(field, def);
  if (d.rfind("torch.", 0) == 0) d = d.substr(6);  // transformers 4.2x wrote "torch.float16" at times
  if (d == "float" || d == "fp32") d = "float32";
  if (d == "half" || d == "fp16") d = "float16";
  if (d == "bf16") d = "bfloat16";
  if (d != "float32" && d != "float16" && d != "bfloat16") {
    const json* v = r.find(field);
    r.fail(field, "\"float32\", \"float16\" or \"bfloat16\"", v);
  }
  return d;
}

QuantizationSpec parse_quantization(const json& q, const std::string& source) {
  if (!q.is_object()) {
    TORCH_CHECK(false, source, ": field 'quantization_config': expected an object, got ", shown(q));
  }
  Reader r{q, source, "quantization_config."};
  QuantizationSpec s;
  s.method = r.string("quant_method", "bitsandbytes");
  if (s.method == "bitsandbytes") {
    const bool in4 = r.boolean("load_in_4bit", r.boolean("_load_in_4bit", false));
    const bool in8 = r.boolean("load_in_8bit", r.boolean("_load_in_8bit", false));
    if (in4 == in8) {
      TORCH_CHECK(false, source,
                  ": quantization_config: expected exactly one of load_in_4bit / load_in_8bit true, got ",
                  in4 ? "both" : "neither");
    }
    if (in4) {
      s.format = r.string("bnb_4bit_quant_type", "fp4");
      if (s.format != "nf4" && s.format != "fp4")
        r.fail("bnb_4bit_quant_type", "\"nf4\" or \"fp4\"", r.find("bnb_4bit_quant_type"));
      s.double_quant = r.boolean("bnb_4bit_use_double_quant", false);
      s.compute_dtype = dtype_name(r, "bnb_4bit_compute_dtype", "float32");
      const std::string storage = r.string("bnb_4bit_quant_storage", "uint8");
      if (storage != "uint8")
        r.fail("bnb_4bit_quant_storage", "\"uint8\" (the only storage msbnb reads)",
               r.find("bnb_4bit_quant_storage"));
      s.blocksize = r.integer("bnb_4bit_blocksize", 64, 32,
                              4096);  // not a transformers field; msbnb writes it when not 64
    } else {
      s.format = "int8";
      if (r.boolean("llm_int8_has_fp16_weight", false)) {
        r.fail("llm_int8_has_fp16_weight", "false (msbnb loads int8 weights only)",
               r.find("llm_int8_has_fp16_weight"));
      }
    }
    s.threshold = r.number("llm_int8_threshold", 6.0, 0.0, 1e30);
    s.skip_modules = r.strings("llm_int8_skip_modules", {"lm_head"});
  } else if (s.method == "msbnb") {
    s.format = r.string("quant_type", "int4");
    if (s.format != "int4") r.fail("quant_type", "\"int4\"", r.find("quant_type"));
    s.blocksize = r.integer("group_size", 128, 2, kMaxDim);
    s.double_quant = r.boolean("double_quant", false);
    s.skip_modules = r.strings("skip_modules", {"lm_head"});
  } else {
    r.fail("quant_method",
           "\"bitsandbytes\" or \"msbnb\" (other methods such as gptq / awq are not supported)",
           r.find("quant_method"));
  }
  s.validate();
  return s;
}

json quantization_json(const QuantizationSpec& s) {
  json q;
  if (s.method == "msbnb") {
    q["quant_method"] = "msbnb";
    q["quant_type"] = s.format;
    q["group_size"] = s.blocksize;
    q["double_quant"] = s.double_quant;
    q["skip_modules"] = s.skip_modules;
    return q;
  }
  // BitsAndBytesConfig.to_dict() as transformers writes it.
  const bool in4 = s.format != "int8";
  q["quant_method"] = "bitsandbytes";
  q["_load_in_4bit"] = in4;
  q["_load_in_8bit"] = !in4;
  q["load_in_4bit"] = in4;
  q["load_in_8bit"] = !in4;
  q["bnb_4bit_compute_dtype"] = s.compute_dtype;
  q["bnb_4bit_quant_storage"] = "uint8";
  q["bnb_4bit_quant_type"] = in4 ? s.format : std::string("fp4");
  q["bnb_4bit_use_double_quant"] = in4 && s.double_quant;
  if (in4 && s.blocksize != 64) q["bnb_4bit_blocksize"] = s.blocksize;
  q["llm_int8_enable_fp32_cpu_offload"] = false;
  q["llm_int8_has_fp16_weight"] = false;
  q["llm_int8_skip_modules"] = s.skip_modules;
  q["llm_int8_threshold"] = s.threshold;
  return q;
}

}  // namespace

QuantizationSpec QuantizationSpec::for_format(const std::string& format, bool double_quant) {
  QuantizationSpec s;
  s.format = format;
  s.double_quant = double_quant;
  if (format == "int4") {
    s.method = "msbnb";
    s.blocksize = 128;
  } else if (format == "int8") {
    s.double_quant = false;
  } else if (format != "nf4" && format != "fp4") {
    TORCH_CHECK(false, "format: expected one of int8, int4, nf4, fp4, got '", format, "'");
  }
  s.validate();
  return s;
}

void QuantizationSpec::validate() const {
  TORCH_CHECK(method == "bitsandbytes" || method == "msbnb",
              "quantization method: expected bitsandbytes or msbnb, got '", method, "'");
  TORCH_CHECK(format == "nf4" || format == "fp4" || format == "int8" || format == "int4",
              "format: expected one of int8, int4, nf4, fp4, got '", format, "'");
  TORCH_CHECK((format == "int4") == (method == "msbnb"), "format '", format, "' with method '", method,
              "': int4 is msbnb's format, the others bitsandbytes'");
  if (format == "nf4" || format == "fp4") {
    TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
                "blocksize: expected a power of two in [32, 4096] for ", format, ", got ", blocksize);
  }
  if (format == "int4") {
    TORCH_CHECK(blocksize >= 2 && blocksize % 2 == 0 && blocksize <= kMaxDim,
                "group size: expected an even number >= 2 for int4, got ", blocksize);
  }
  TORCH_CHECK(std::isfinite(threshold) && threshold >= 0, "threshold: expected a finite number >= 0, got ",
              threshold);
  TORCH_CHECK(compute_dtype == "float32" || compute_dtype == "float16" || compute_dtype == "bfloat16",
              "compute dtype: expected float32, float16 or bfloat16, got '", compute_dtype, "'");
  for (const auto& m : skip_modules)
    TORCH_CHECK(!m.empty(), "skip modules: expected non-empty names, got an empty one");
}

std::string QuantizationSpec::describe() const {
  std::ostringstream os;
  if (format == "int8") {
    os << "int8 (LLM.int8(), threshold " << threshold << ")";
  } else {
    os << format << (double_quant ? " + double quant" : "") << " ("
       << (format == "int4" ? "group size " : "blocksize ") << blocksize << ")";
  }
  return os.str();
}

void LlamaConfig::validate(const std::string& source) const {
  auto pos = [&](const char* f, int64_t v) {
    TORCH_CHECK(v > 0 && v <= kMaxDim, source, ": field '", f, "': expected an integer in [1, ", kMaxDim,
                "], got ", v);
  };
  pos("vocab_size", vocab_size);
  pos("hidden_size", hidden_size);
  pos("intermediate_size", intermediate_size);
  pos("num_hidden_layers", num_hidden_layers);
  pos("num_attention_heads", num_attention_heads);
  pos("num_key_value_heads", num_key_value_heads);
  pos("head_dim", head_dim);
  pos("max_position_embeddings", max_position_embeddings);
  TORCH_CHECK(num_hidden_layers <= 4096, source, ": field 'num_hidden_layers': expected at most 4096, got ",
              num_hidden_layers);
  TORCH_CHECK(
      num_attention_heads % num_key_value_heads == 0, source,
      ": fields 'num_attention_heads' / 'num_key_value_heads': expected the heads to be a multiple of the "
      "key/value heads, got ",
      num_attention_heads, " and ", num_key_value_heads);
  TORCH_CHECK(head_dim % 2 == 0, source,
              ": field 'head_dim': expected an even number (RoPE rotates pairs), got ", head_dim);
  TORCH_CHECK(num_attention_heads * head_dim <= kMaxDim, source,
              ": num_attention_heads · head_dim too large: ", num_attention_heads, " · ", head_dim);
  TORCH_CHECK(std::isfinite(rms_norm_eps) && rms_norm_eps > 0 && rms_norm_eps < 1, source,
              ": field 'rms_norm_eps': expected a number in (0, 1), got ", rms_norm_eps);
  TORCH_CHECK(std::isfinite(rope_theta) && rope_theta > 1, source,
              ": field 'rope_theta': expected a number > 1, got ", rope_theta);
  TORCH_CHECK(rope_type == "default" || rope_type == "llama3", source,
              ": rope type: expected \"default\" or \"llama3\", got '", rope_type, "'");
  for (auto t : {bos_token_id, eos_token_id, pad_token_id}) {
    TORCH_CHECK(!t || *t < vocab_size || *t < kMaxDim, source, ": a special token id is out of range: ", *t);
  }
  if (quantization) quantization->validate();
}

int64_t LlamaConfig::linear_parameter_count() const {
  const int64_t q = hidden_size * num_attention_heads * head_dim;
  const int64_t kv = 2 * hidden_size * num_key_value_heads * head_dim;
  const int64_t o = num_attention_heads * head_dim * hidden_size;
  const int64_t mlp = 3 * hidden_size * intermediate_size;
  return num_hidden_layers * (q + kv + o + mlp);
}

int64_t LlamaConfig::parameter_count() const {
  const int64_t emb = vocab_size * hidden_size;
  const int64_t norms = (2 * num_hidden_layers + 1) * hidden_size;
  return linear_parameter_count() + norms + emb * (tie_word_embeddings ? 1 : 2);
}

LlamaConfig parse_config(const std::string& json_text, const std::string& source) {
  json j;
  try {
    j = io::detail::parse_json_strict(json_text, 16, source);
  } catch (const io::FormatError& e) {
    TORCH_CHECK(false, e.what());
  }
  TORCH_CHECK(j.is_object(), source, ": expected a JSON object, got ", shown(j));
  Reader r{j, source, ""};
  LlamaConfig c;
  c.model_type = r.string("model_type", "");
  c.architectures = r.strings("architectures", {});
  if (c.model_type != "llama") {
    std::string arch =
        c.architectures.empty() ? "" : " (architectures " + shown(*r.find("architectures")) + ")";
    TORCH_CHECK(false, source,
                ": unsupported architecture: expected model_type \"llama\" (LlamaForCausalLM), got ",
                c.model_type.empty() ? std::string("none") : "\"" + c.model_type + "\"", arch);
  }
  if (!c.architectures.empty()) {
    bool ok = false;
    for (const auto& a : c.architectures) ok = ok || a == "LlamaForCausalLM";
    TORCH_CHECK(ok, source,
                ": unsupported architecture: expected architectures to hold \"LlamaForCausalLM\", got ",
                shown(*r.find("architectures")));
  }
  c.vocab_size = r.integer("vocab_size", std::nullopt, 1, kMaxDim);
  c.hidden_size = r.integer("hidden_size", std::nullopt, 1, kMaxDim);
  c.intermediate_size = r.integer("intermediate_size", std::nullopt, 1, kMaxDim);
  c.num_hidden_layers = r.integer("num_hidden_layers", std::nullopt, 1, 4096);
  c.num_attention_heads = r.integer("num_attention_heads", std::nullopt, 1, kMaxDim);
  c.num_key_value_heads = r.integer("num_key_value_heads", c.num_attention_heads, 1, kMaxDim);
  TORCH_CHECK(r.find("head_dim") != nullptr || c.hidden_size % c.num_attention_heads == 0, source,
              ": fields 'hidden_size' / 'num_attention_heads': expected hidden_size divisible by the heads "
              "(no head_dim "
              "given), got ",
              c.hidden_size, " and ", c.num_attention_heads);
  c.head_dim = r.integer("head_dim", c.hidden_size / c.num_attention_heads, 1, kMaxDim);
  c.max_position_embeddings = r.integer("max_position_embeddings", 2048, 1, kMaxDim);
  c.rms_norm_eps = r.number("rms_norm_eps", 1e-6, 1e-30, 0.5);
  const std::string act = r.string("hidden_act", "silu");
  if (act != "silu") r.fail("hidden_act", "\"silu\" (SwiGLU)", r.find("hidden_act"));
  c.attention_bias = r.boolean("attention_bias", false);
  c.mlp_bias = r.boolean("mlp_bias", false);
  c.tie_word_embeddings = r.boolean("tie_word_embeddings", false);
  c.torch_dtype = dtype_name(r, r.find("dtype") != nullptr ? "dtype" : "torch_dtype", "float32");
  c.bos_token_id = r.optional_token("bos_token_id");
  c.eos_token_id = r.optional_token("eos_token_id");
  c.pad_token_id = r.optional_token("pad_token_id");

  // RoPE: transformers 5 puts theta and the type under rope_parameters; transformers 4 has
  // rope_theta at the top and rope_scaling (null, or {"rope_type": ...}).
  const json* params = r.find("rope_parameters");
  const json* scaling = r.find("rope_scaling");
  if (params != nullptr && !params->is_object()) r.fail("rope_parameters", "an object", params);
  if (scaling != nullptr && !scaling->is_object()) r.fail("rope_scaling", "an object or null", scaling);
  const json* rope = params != nullptr ? params : scaling;
  c.rope_theta = r.number("rope_theta", 10000.0, 1.0000001, 1e30);
  if (rope != nullptr) {
    Reader rr{*rope, source, params != nullptr ? "rope_parameters." : "rope_scaling."};
    c.rope_theta = rr.number("rope_theta", c.rope_theta, 1.0000001, 1e30);
    c.rope_type = rr.string("rope_type", rr.string("type", "default"));
    if (c.rope_type == "llama3") {
      c.rope_factor = rr.number("factor", std::nullopt, 1.0, 1e6);
      c.rope_low_freq_factor = rr.number("low_freq_factor", std::nullopt, 1e-6, 1e6);
      c.rope_high_freq_factor = rr.number("high_freq_factor", std::nullopt, 1e-6, 1e6);
      c.rope_original_max_position_embeddings =
          rr.integer("original_max_position_embeddings", std::nullopt, 1, kMaxDim);
      TORCH_CHECK(c.rope_high_freq_factor > c.rope_low_freq_factor, source,
                  ": llama3 RoPE: expected high_freq_factor > low_freq_factor, got ", c.rope_high_freq_factor,
                  " and ", c.rope_low_freq_factor);
    } else if (c.rope_type != "default") {
      rr.fail("rope_type", "\"default\" or \"llama3\" (other RoPE scalings are not supported)",
              rope->contains("rope_type") ? &rope->at("rope_type") : &rope->at("type"));
    }
  }
  if (const json* q = r.find("quantization_config")) c.quantization = parse_quantization(*q, source);
  c.validate(source);
  return c;
}

LlamaConfig read_config(const std::string& path) {
  std::string file = path;
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) file = path + "/config.json";
  std::ifstream f(file, std::ios::binary);
  TORCH_CHECK(f.good(), file, ": expected a readable config.json, got none (missing or unreadable)");
  std::ostringstream ss;
  ss << f.rdbuf();
  const std::string text = ss.str();
  TORCH_CHECK(text.size() < (size_t{16} << 20), file, ": expected a config.json under 16 MiB, got ",
              text.size(), " bytes");
  return parse_config(text, file);
}

std::string config_json(const LlamaConfig& c) {
  json j;
  j["architectures"] =
      c.architectures.empty() ? std::vector<std::string>{"LlamaForCausalLM"} : c.architectures;
  j["model_type"] = "llama";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["head_dim"] = c.head_dim;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["hidden_act"] = "silu";
  j["attention_bias"] = c.attention_bias;
  j["attention_dropout"] = 0.0;
  j["mlp_bias"] = c.mlp_bias;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["initializer_range"] = 0.02;
  j["pretraining_tp"] = 1;
  j["use_cache"] = true;
  j["dtype"] = c.torch_dtype;
  j["torch_dtype"] = c.torch_dtype;
  j["rope_theta"] = c.rope_theta;
  json rope;
  rope["rope_type"] = c.rope_type;
  rope["rope_theta"] = c.rope_theta;
  if (c.rope_type == "llama3") {
    rope["factor"] = c.rope_factor;
    rope["low_freq_factor"] = c.rope_low_freq_factor;
    rope["high_freq_factor"] = c.rope_high_freq_factor;
    rope["original_max_position_embeddings"] = c.rope_original_max_position_embeddings;
  }
  j["rope_parameters"] = rope;
  j["bos_token_id"] = c.bos_token_id ? json(*c.bos_token_id) : json(nullptr);
  j["eos_token_id"] = c.eos_token_id ? json(*c.eos_token_id) : json(nullptr);
  if (c.pad_token_id) j["pad_token_id"] = *c.pad_token_id;
  j["transformers_version"] = "5.0.0";
  if (c.quantization) j["quantization_config"] = quantization_json(*c.quantization);
  return j.dump(2) + "\n";
}

}  // namespace msbnb::models
