// PEFT adapter files (msbnb/lora/peft.h; the rules and the PEFT version followed: docs/peft.md).
#include "msbnb/lora/peft.h"

#include <c10/util/Exception.h>
#include <torch/nn/modules/linear.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include "../io/json_strict.h"
#include "msbnb/io/atomic_file.h"
#include "msbnb/io/safetensors.h"
#include "msbnb/nn/linear.h"

namespace msbnb::lora {
namespace {

using json = nlohmann::json;
using io::detail::quote_cut;
using io::detail::shown;
using io::detail::type_name;

// PeftConfig / LoraConfig fields as PEFT 0.21.2 writes them from save_pretrained (LoraConfig()
// with inference_mode true); save_adapter starts from these and overrides what msbnb knows.
constexpr const char* kPeftDefaults = R"({
  "alora_invocation_tokens": null,
  "alpha_pattern": {},
  "arrow_config": null,
  "auto_mapping": null,
  "base_model_name_or_path": null,
  "bias": "none",
  "corda_config": null,
  "ensure_weight_tying": false,
  "eva_config": null,
  "exclude_modules": null,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "kasa_config": null,
  "layer_replication": null,
  "layers_pattern": null,
  "layers_to_transform": null,
  "loftq_config": {},
  "lora_alpha": 8,
  "lora_bias": false,
  "lora_dropout": 0.0,
  "lora_ga_config": null,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": null,
  "monteclora_config": null,
  "peft_type": "LORA",
  "peft_version": "0.21.2",
  "qalora_group_size": 16,
  "r": 8,
  "rank_pattern": {},
  "revision": null,
  "target_modules": null,
  "target_parameters": null,
  "task_type": null,
  "trainable_token_indices": null,
  "use_bdlora": null,
  "use_dora": false,
  "use_qalora": false,
  "use_rslora": false,
  "velora_config": null
})";

// Fields msbnb interprets (everything else goes to AdapterConfig::unknown).
const std::set<std::string>& interpreted_fields() {
  static const std::set<std::string> s = {"r",
                                          "lora_alpha",
                                          "lora_dropout",
                                          "use_rslora",
                                          "bias",
                                          "init_lora_weights",
                                          "target_modules",
                                          "exclude_modules",
                                          "rank_pattern",
                                          "alpha_pattern",
                                          "base_model_name_or_path",
                                          "revision",
                                          "task_type",
                                          "inference_mode",
                                          "peft_type"};
  return s;
}

// PEFT features that change what the adapter computes or holds: refused when set. A field is
// "set" when it is present and neither null, false, an empty list nor an empty object.
const std::vector<std::pair<const char*, const char*>>& unsupported_fields() {
  static const std::vector<std::pair<const char*, const char*>> v = {
      {"use_dora", "DoRA (magnitude vectors)"},
      {"fan_in_fan_out", "fan_in_fan_out (GPT-2 Conv1D weights stored [in, out])"},
      {"modules_to_save", "modules_to_save (full copies of modules in the adapter)"},
      {"layers_to_transform", "layers_to_transform (a layer-index subset)"},
      {"layer_replication", "layer_replication"},
      {"trainable_token_indices", "trainable_token_indices"},
      {"target_parameters", "target_parameters (LoRA on nn.Parameter)"},
      {"lora_bias", "lora_bias (a bias on lora_B)"},
      {"use_qalora", "QALoRA"},
      {"alora_invocation_tokens", "activated LoRA"},
      {"megatron_config", "Megatron layers"},
      {"arrow_config", "Arrow routing"},
      {"kasa_config", "KaSA"},
      {"monteclora_config", "MonteCLoRA"},
      {"velora_config", "VeLoRA"},
      {"use_bdlora", "block-diagonal LoRA"},
      {"lora_ga_config", "LoRA-GA (it changes the base weights)"},
  };
  return v;
}

bool is_set(const json& j) {
  if (j.is_null()) return false;
  if (j.is_boolean()) return j.get<bool>();
  if (j.is_array() || j.is_object()) return !j.empty();
  return true;
}

[[noreturn]] void fail(const std::string& source, const std::string& field, const std::string& what) {
  TORCH_CHECK(false, source, ": field '", field, "': ", what);
}

[[noreturn]] void expect_type(const std::string& source, const std::string& field, const json& v,
                              const char* want) {
  fail(source, field, std::string("expected ") + want + ", got " + type_name(v) + " " + shown(v));
}

int64_t get_int(const std::string& source, const std::string& field, const json& v) {
  // PEFT writes ints; a float with an integral value (8.0) is what json.dumps of a float gives.
  if (v.is_number_integer() && !(v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX))) {
    return v.get<int64_t>();
  }
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15) return static_cast<int64_t>(d);
  }
  expect_type(source, field, v, "an integer");
  return 0;
}

double get_number(const std::string& source, const std::string& field, const json& v) {
  if (!v.is_number()) expect_type(source, field, v, "a number");
  return v.get<double>();
}

std::string get_string_or_null(const std::string& source, const std::string& field, const json& v) {
  if (v.is_null()) return "";
  if (!v.is_string()) expect_type(source, field, v, "a string or null");
  return v.get<std::string>();
}

// target_modules / exclude_modules: null, a string (regex) or a list of strings.
void get_modules(const std::string& source, const std::string& field, const json& v,
                 std::vector<std::string>& out, bool& is_regex) {
  out.clear();
  is_regex = false;
  if (v.is_null()) return;
  if (v.is_string()) {
    out.push_back(v.get<std::string>());
    is_regex = true;
    return;
  }
  if (!v.is_array()) expect_type(source, field, v, "null, a string or a list of strings");
  for (const json& e : v) {
    if (!e.is_string()) expect_type(source, field, e, "a list of strings");
    const auto& s = e.get_ref<const std::string&>();
    if (s.empty()) fail(source, field, "expected non-empty names, got ''");
    out.push_back(s);
  }
}

std::regex compile_regex(const std::string& pattern, const std::string& what) {
  try {
    return std::regex(pattern, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    TORCH_CHECK(false, what, ": expected a regular expression (ECMAScript syntax, the subset shared with ",
                "Python's re), got ", quote_cut(pattern), " (", e.what(), ")");
  }
}

// PEFT's pattern lookup (peft.utils.other.get_pattern_key): the first key k (file order, sorted)
// with re.match(r"(.*\.)?(k)$", path).
template <typename V>
const V* pattern_lookup(const std::vector<std::pair<std::string, V>>& pattern, const std::string& path) {
  for (const auto& [key, value] : pattern) {
    if (std::regex_match(path, compile_regex("(.*\\.)?(" + key + ")", "rank_pattern / alpha_pattern key"))) {
      return &value;
    }
  }
  return nullptr;
}

bool ends_with_dot(const std::string& name, const std::string& entry) {
  if (name == entry) return true;
  return name.size() > entry.size() && name.compare(name.size() - entry.size(), entry.size(), entry) == 0 &&
         name[name.size() - entry.size() - 1] == '.';
}

std::string last_component(const std::string& name) {
  const auto dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(dot + 1);
}

std::string regex_escape(const std::string& s) {
  static const std::string special = R"(\^$.|?*+()[]{})";
  std::string out;
  for (char c : s) {
    if (special.find(c) != std::string::npos) out += '\\';
    out += c;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// The model walk: linear layers and LoRA layers (not walked into), by dotted path.

struct Site {
  std::string path;
  torch::nn::Module* module = nullptr;  // not owned: inject_lora counts the holders of a layer
  LoraLayer* lora = nullptr;            // non-null for a LoRA layer
  int64_t in = 0, out = 0;
};

bool linear_shape(torch::nn::Module& m, int64_t& in, int64_t& out) {
  if (auto* l = dynamic_cast<torch::nn::LinearImpl*>(&m)) {
    in = l->options.in_features();
    out = l->options.out_features();
    return true;
  }
  if (auto* l = dynamic_cast<nn::Linear8bitImpl*>(&m)) {
    in = l->options.in_features();
    out = l->options.out_features();
    return true;
  }
  if (auto* l = dynamic_cast<nn::Linear4bitImpl*>(&m)) {
    in = l->options.in_features();
    out = l->options.out_features();
    return true;
  }
  return false;
}

void walk(const std::shared_ptr<torch::nn::Module>& m, const std::string& path, std::vector<Site>& sites) {
  for (const auto& item : m->named_children()) {
    const std::string p = path.empty() ? item.key() : path + "." + item.key();
    const auto& child = item.value();
    Site s;
    s.path = p;
    s.module = child.get();
    if (auto* l = as_lora_layer(*child)) {
      s.lora = l;
      s.in = l->in_features();
      s.out = l->out_features();
      sites.push_back(s);
      continue;
    }
    if (linear_shape(*child, s.in, s.out)) {
      sites.push_back(s);
      continue;
    }
    walk(child, p, sites);
  }
}

std::vector<Site> sites_of(const torch::nn::Module& model) {
  std::vector<Site> sites;
  // named_children() is non-const-free in libtorch 1.13's API; the walk changes nothing.
  auto& m = const_cast<torch::nn::Module&>(model);
  for (const auto& item : m.named_children()) {
    Site s;
    s.path = item.key();
    s.module = item.value().get();
    if (auto* l = as_lora_layer(*item.value())) {
      s.lora = l;
      s.in = l->in_features();
      s.out = l->out_features();
      sites.push_back(s);
    } else if (linear_shape(*item.value(), s.in, s.out)) {
      sites.push_back(s);
    } else {
      walk(item.value(), s.path, sites);
    }
  }
  return sites;
}

bool selects(const std::vector<std::string>& entries, bool is_regex, const std::string& path,
             const std::vector<std::regex>& regexes, bool all_linear) {
  if (is_regex) {
    if (all_linear) return last_component(path) != "lm_head";
    return std::regex_match(path, regexes.at(0));
  }
  for (const auto& e : entries) {
    if (ends_with_dot(path, e)) return true;
  }
  return false;
}

std::vector<std::string> select_paths(const std::vector<Site>& sites, const AdapterConfig& config) {
  const bool t_all = config.target_modules_is_regex() && config.target_modules().size() == 1 &&
                     config.target_modules()[0] == "all-linear";
  const bool e_all = config.exclude_modules_is_regex() && config.exclude_modules().size() == 1 &&
                     config.exclude_modules()[0] == "all-linear";
  std::vector<std::regex> t_re, e_re;
  if (config.target_modules_is_regex() && !t_all) {
    TORCH_CHECK(config.target_modules().size() == 1, "target_modules: expected one regular expression, got ",
                config.target_modules().size());
    t_re.push_back(compile_regex(config.target_modules()[0], "target_modules"));
  }
  if (config.exclude_modules_is_regex() && !e_all) {
    TORCH_CHECK(config.exclude_modules().size() == 1,
                "exclude_modules: expected one regular expression, got ", config.exclude_modules().size());
    e_re.push_back(compile_regex(config.exclude_modules()[0], "exclude_modules"));
  }
  std::vector<std::string> out;
  for (const auto& s : sites) {
    if (!selects(config.target_modules(), config.target_modules_is_regex(), s.path, t_re, t_all)) continue;
    if (!config.exclude_modules().empty() &&
        selects(config.exclude_modules(), config.exclude_modules_is_regex(), s.path, e_re, e_all)) {
      continue;
    }
    out.push_back(s.path);
  }
  return out;
}

std::string join(const std::vector<std::string>& v, const char* sep = ", ") {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? sep : "") + v[i];
  return s;
}

std::string shape_str(c10::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

std::string read_text(const std::string& path, size_t max_bytes) {
  std::ifstream f(path, std::ios::binary);
  TORCH_CHECK(f.good(), path, ": expected a readable file, got none (", std::strerror(errno), ")");
  std::string text;
  char buf[65536];
  while (f.read(buf, sizeof buf) || f.gcount() > 0) {
    text.append(buf, static_cast<size_t>(f.gcount()));
    TORCH_CHECK(text.size() <= max_bytes, path, ": expected at most ", max_bytes, " bytes, got more");
  }
  TORCH_CHECK(!f.bad(), path, ": read failed");
  return text;
}

std::string join_path(const std::string& dir, const char* file) {
  return (std::filesystem::path(dir) / file).string();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// AdapterConfig

int64_t AdapterConfig::r_for(const std::string& path) const {
  const int64_t* v = pattern_lookup(rank_pattern(), path);
  return v ? *v : r();
}

double AdapterConfig::lora_alpha_for(const std::string& path) const {
  const double* v = pattern_lookup(alpha_pattern(), path);
  return v ? *v : lora_alpha();
}

LoraConfig AdapterConfig::lora_config_for(const std::string& path) const {
  return LoraConfig()
      .r(r_for(path))
      .lora_alpha(lora_alpha_for(path))
      .lora_dropout(lora_dropout())
      .use_rslora(use_rslora())
      .init(init_lora_weights() == "gaussian" ? "gaussian" : "kaiming")
      .bias(bias());
}

AdapterConfig parse_adapter_config(const std::string& json_text, const std::string& source) {
  json j;
  try {
    j = io::detail::parse_json_strict(json_text, 8, source);
  } catch (const io::FormatError& e) {
    TORCH_CHECK(false, e.what());
  }
  TORCH_CHECK(j.is_object(), source, ": expected a JSON object, got ", type_name(j), " ", shown(j));
  TORCH_CHECK(j.contains("peft_type"), source, ": field 'peft_type': expected \"LORA\", got none");
  AdapterConfig c;
  c.peft_type(get_string_or_null(source, "peft_type", j.at("peft_type")));
  TORCH_CHECK(c.peft_type() == "LORA", source, ": field 'peft_type': expected \"LORA\" (msbnb loads LoRA ",
              "adapters only), got ", shown(j.at("peft_type")));
  for (const auto& [field, what] : unsupported_fields()) {
    if (j.contains(field) && is_set(j.at(field))) {
      fail(source, field,
           std::string("expected it unset (") + what + " is not supported by msbnb), got " +
               shown(j.at(field)));
    }
  }
  if (j.contains("r")) c.r(get_int(source, "r", j.at("r")));
  TORCH_CHECK(c.r() > 0, source, ": field 'r': expected a rank > 0, got ", c.r());
  if (j.contains("lora_alpha")) c.lora_alpha(get_number(source, "lora_alpha", j.at("lora_alpha")));
  TORCH_CHECK(std::isfinite(c.lora_alpha()) && c.lora_alpha() > 0, source,
              ": field 'lora_alpha': expected a finite number > 0, got ", c.lora_alpha());
  if (j.contains("lora_dropout")) c.lora_dropout(get_number(source, "lora_dropout", j.at("lora_dropout")));
  TORCH_CHECK(c.lora_dropout() >= 0 && c.lora_dropout() < 1, source,
              ": field 'lora_dropout': expected a number in [0, 1), got ", c.lora_dropout());
  if (j.contains("use_rslora")) {
    const json& v = j.at("use_rslora");
    if (!v.is_boolean()) expect_type(source, "use_rslora", v, "true or false");
    c.use_rslora(v.get<bool>());
  }
  if (j.contains("bias")) {
    const json& v = j.at("bias");
    if (!v.is_string()) expect_type(source, "bias", v, "\"none\", \"all\" or \"lora_only\"");
    c.bias(v.get<std::string>());
    TORCH_CHECK(c.bias() == "none" || c.bias() == "all" || c.bias() == "lora_only", source,
                ": field 'bias': expected \"none\", \"all\" or \"lora_only\", got ", shown(v));
  }
  if (j.contains("init_lora_weights")) {
    const json& v = j.at("init_lora_weights");
    if (v.is_boolean()) {
      c.init_lora_weights(v.get<bool>() ? "true" : "false");
    } else if (v.is_string()) {
      c.init_lora_weights(v.get<std::string>());
    } else {
      expect_type(source, "init_lora_weights", v, "true, false or a string");
    }
  }
  bool re = false;
  std::vector<std::string> mods;
  if (j.contains("target_modules")) {
    get_modules(source, "target_modules", j.at("target_modules"), mods, re);
    if (re && mods[0] != "all-linear") compile_regex(mods[0], source + ": field 'target_modules'");
    c.target_modules(mods).target_modules_is_regex(re);
  }
  if (j.contains("exclude_modules")) {
    get_modules(source, "exclude_modules", j.at("exclude_modules"), mods, re);
    if (re && mods[0] != "all-linear") compile_regex(mods[0], source + ": field 'exclude_modules'");
    c.exclude_modules(mods).exclude_modules_is_regex(re);
  }
  for (const char* field : {"rank_pattern", "alpha_pattern"}) {
    if (!j.contains(field) || j.at(field).is_null()) continue;
    const json& v = j.at(field);
    if (!v.is_object()) expect_type(source, field, v, "an object (name -> value)");
    for (const auto& [key, value] : v.items()) {
      const std::string f = std::string(field) + "." + key;
      compile_regex("(.*\\.)?(" + key + ")", source + ": field '" + f + "'");
      if (field[0] == 'r') {
        const int64_t r = get_int(source, f, value);
        TORCH_CHECK(r > 0, source, ": field '", f, "': expected a rank > 0, got ", r);
        c.rank_pattern().emplace_back(key, r);
      } else {
        const double a = get_number(source, f, value);
        TORCH_CHECK(std::isfinite(a) && a > 0, source, ": field '", f,
                    "': expected a finite number > 0, got ", a);
        c.alpha_pattern().emplace_back(key, a);
      }
    }
  }
  if (j.contains("base_model_name_or_path")) {
    c.base_model_name_or_path(
        get_string_or_null(source, "base_model_name_or_path", j.at("base_model_name_or_path")));
  }
  if (j.contains("revision")) c.revision(get_string_or_null(source, "revision", j.at("revision")));
  if (j.contains("task_type")) c.task_type(get_string_or_null(source, "task_type", j.at("task_type")));
  if (j.contains("inference_mode")) {
    const json& v = j.at("inference_mode");
    if (!v.is_boolean()) expect_type(source, "inference_mode", v, "true or false");
    c.inference_mode(v.get<bool>());
  }
  for (const auto& [key, value] : j.items()) {
    if (!interpreted_fields().count(key)) c.unknown()[key] = value.dump();
  }
  return c;
}

AdapterConfig read_adapter_config(const std::string& path) {
  std::string file = path;
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) file = join_path(path, kAdapterConfigFile);
  // A config is a few kB; 16 MiB bounds what a hostile file can make us read.
  return parse_adapter_config(read_text(file, 16u << 20), file);
}

std::string adapter_config_json(const AdapterConfig& c) {
  json j = json::parse(kPeftDefaults);
  for (const auto& [key, text] : c.unknown()) {
    try {
      j[key] = json::parse(text);
    } catch (const json::exception& e) {
      TORCH_CHECK(false, "adapter_config_json: unknown field ", quote_cut(key), ": expected JSON text, got ",
                  quote_cut(text), " (", e.what(), ")");
    }
  }
  for (const auto& [field, what] : unsupported_fields()) {
    TORCH_CHECK(!j.contains(field) || !is_set(j.at(field)), "adapter_config_json: unknown field '", field,
                "': expected it unset (", what, " is not supported by msbnb), got ", shown(j.at(field)));
  }
  TORCH_CHECK(c.peft_type() == "LORA", "adapter_config_json: peft_type: expected \"LORA\", got ",
              quote_cut(c.peft_type()));
  TORCH_CHECK(c.r() > 0, "adapter_config_json: r: expected > 0, got ", c.r());
  TORCH_CHECK(std::isfinite(c.lora_alpha()) && c.lora_alpha() > 0,
              "adapter_config_json: lora_alpha: expected a finite number > 0, got ", c.lora_alpha());
  TORCH_CHECK(c.lora_dropout() >= 0 && c.lora_dropout() < 1,
              "adapter_config_json: lora_dropout: expected a number in [0, 1), got ", c.lora_dropout());
  // PEFT's lora_alpha is an int: an integral value is written as one (8, not 8.0).
  auto number = [](double v) -> json {
    if (v == std::floor(v) && std::fabs(v) < 9.0e15) return json(static_cast<int64_t>(v));
    return json(v);
  };
  auto str_or_null = [](const std::string& s) -> json { return s.empty() ? json(nullptr) : json(s); };
  auto modules = [](const std::vector<std::string>& v, bool is_regex) -> json {
    if (is_regex) {
      TORCH_CHECK(v.size() == 1, "adapter_config_json: expected one regular expression, got ", v.size());
      return json(v[0]);
    }
    if (v.empty()) return json(nullptr);
    return json(v);
  };
  j["peft_type"] = "LORA";
  j["r"] = c.r();
  j["lora_alpha"] = number(c.lora_alpha());
  j["lora_dropout"] = c.lora_dropout();
  j["use_rslora"] = c.use_rslora();
  j["bias"] = c.bias();
  if (c.init_lora_weights() == "true" || c.init_lora_weights() == "false") {
    j["init_lora_weights"] = c.init_lora_weights() == "true";
  } else {
    j["init_lora_weights"] = c.init_lora_weights();
  }
  j["target_modules"] = modules(c.target_modules(), c.target_modules_is_regex());
  j["exclude_modules"] = modules(c.exclude_modules(), c.exclude_modules_is_regex());
  json rp = json::object(), ap = json::object();
  for (const auto& [k, v] : c.rank_pattern()) rp[k] = v;
  for (const auto& [k, v] : c.alpha_pattern()) ap[k] = number(v);
  j["rank_pattern"] = rp;
  j["alpha_pattern"] = ap;
  j["base_model_name_or_path"] = str_or_null(c.base_model_name_or_path());
  j["revision"] = str_or_null(c.revision());
  j["task_type"] = str_or_null(c.task_type());
  j["inference_mode"] = c.inference_mode();
  // json.dumps(indent=2, sort_keys=True) (nlohmann's object is sorted), ASCII escapes as Python.
  return j.dump(2, ' ', /*ensure_ascii=*/true);
}

std::vector<std::string> select_target_modules(const torch::nn::Module& model, const AdapterConfig& config) {
  return select_paths(sites_of(model), config);
}

// ---------------------------------------------------------------------------------------------
// Saving

SaveAdapterOptions SaveAdapterOptions::from_config(const AdapterConfig& c) {
  SaveAdapterOptions o;
  o.base_model_name_or_path(c.base_model_name_or_path())
      .revision(c.revision())
      .task_type(c.task_type())
      .r(c.r())
      .lora_alpha(c.lora_alpha())
      .rank_pattern(c.rank_pattern())
      .alpha_pattern(c.alpha_pattern())
      .extra_fields(c.unknown())
      .init_lora_weights(c.init_lora_weights());
  if (c.target_modules_is_regex()) {
    o.target_modules_regex(c.target_modules().at(0));
  } else {
    o.target_modules(c.target_modules());
  }
  if (c.exclude_modules_is_regex()) {
    o.exclude_modules_regex(c.exclude_modules().at(0));
  } else {
    o.exclude_modules(c.exclude_modules());
  }
  return o;
}

std::pair<std::vector<std::pair<std::string, torch::Tensor>>, AdapterConfig> adapter_state(
    const torch::nn::Module& model, const SaveAdapterOptions& options) {
  const auto sites = sites_of(model);
  std::vector<const Site*> loras;
  for (const auto& s : sites) {
    if (s.lora) loras.push_back(&s);
  }
  TORCH_CHECK(!loras.empty(), "save_adapter: model: expected LoRA layers (inject_lora first), got none");
  std::vector<std::string> merged;
  for (const Site* s : loras) {
    if (s->lora->merged()) merged.push_back(s->path);
  }
  TORCH_CHECK(merged.empty(),
              "save_adapter: expected unmerged LoRA layers (their A / B are in the base weight: ",
              "unmerge_lora first), got merged: ", join(merged));
  const LoraConfig& first = loras[0]->lora->lora_config();
  for (const Site* s : loras) {
    const LoraConfig& lc = s->lora->lora_config();
    TORCH_CHECK(lc.use_rslora() == first.use_rslora(),
                "save_adapter: expected every LoRA layer with the same ",
                "use_rslora (PEFT has one flag), got ", first.use_rslora(), " at ", loras[0]->path, " and ",
                lc.use_rslora(), " at ", s->path);
    TORCH_CHECK(lc.lora_dropout() == first.lora_dropout(),
                "save_adapter: expected every LoRA layer with the ",
                "same lora_dropout (PEFT has one value), got ", first.lora_dropout(), " at ", loras[0]->path,
                " and ", lc.lora_dropout(), " at ", s->path);
    TORCH_CHECK(lc.bias() == first.bias(), "save_adapter: expected every LoRA layer with the same bias, got ",
                first.bias(), " at ", loras[0]->path, " and ", lc.bias(), " at ", s->path);
  }
  AdapterConfig c;
  c.r(options.r().value_or(first.r()))
      .lora_alpha(options.lora_alpha().value_or(first.lora_alpha()))
      .lora_dropout(first.lora_dropout())
      .use_rslora(first.use_rslora())
      .bias(first.bias())
      .init_lora_weights(
          options.init_lora_weights().value_or(first.init() == "gaussian" ? "gaussian" : "true"))
      .base_model_name_or_path(options.base_model_name_or_path())
      .revision(options.revision())
      .task_type(options.task_type());
  c.unknown(options.extra_fields());
  if (options.rank_pattern()) c.rank_pattern(*options.rank_pattern());
  if (options.alpha_pattern()) c.alpha_pattern(*options.alpha_pattern());
  RankPattern rp;
  AlphaPattern ap;
  for (const Site* s : loras) {
    if (s->lora->r() != c.r()) rp.emplace_back(regex_escape(s->path), s->lora->r());
    if (s->lora->lora_alpha() != c.lora_alpha())
      ap.emplace_back(regex_escape(s->path), s->lora->lora_alpha());
  }
  std::sort(rp.begin(), rp.end());
  std::sort(ap.begin(), ap.end());
  if (!options.rank_pattern()) c.rank_pattern(rp);
  if (!options.alpha_pattern()) c.alpha_pattern(ap);
  std::vector<std::string> wrong;
  for (const Site* s : loras) {
    if (c.r_for(s->path) != s->lora->r() || c.lora_alpha_for(s->path) != s->lora->lora_alpha()) {
      std::ostringstream os;
      os << s->path << " (r " << s->lora->r() << ", lora_alpha " << s->lora->lora_alpha()
         << "; the config gives r " << c.r_for(s->path) << ", lora_alpha " << c.lora_alpha_for(s->path)
         << ")";
      wrong.push_back(os.str());
    }
  }
  TORCH_CHECK(wrong.empty(),
              "save_adapter: r / lora_alpha with rank_pattern / alpha_pattern: expected them to ",
              "give every LoRA layer its own values, got: ", join(wrong, "; "));
  if (!options.exclude_modules_regex().empty()) {
    TORCH_CHECK(options.exclude_modules().empty(),
                "save_adapter: expected exclude_modules or exclude_modules_regex, got both");
    c.exclude_modules({options.exclude_modules_regex()}).exclude_modules_is_regex(true);
  } else {
    c.exclude_modules(options.exclude_modules());
  }

  std::vector<std::string> lora_paths;
  for (const Site* s : loras) lora_paths.push_back(s->path);
  auto check_selects = [&](const AdapterConfig& probe) { return select_paths(sites, probe) == lora_paths; };
  TORCH_CHECK(options.target_modules().empty() || options.target_modules_regex().empty(),
              "save_adapter: expected target_modules or target_modules_regex, got both");
  if (!options.target_modules_regex().empty()) {
    c.target_modules({options.target_modules_regex()}).target_modules_is_regex(true);
    TORCH_CHECK(check_selects(c), "save_adapter: target_modules_regex ",
                quote_cut(options.target_modules_regex()),
                ": expected it to select exactly the LoRA layers [", join(lora_paths), "], got [",
                join(select_paths(sites, c)), "]");
  } else if (!options.target_modules().empty()) {
    c.target_modules(options.target_modules());
    TORCH_CHECK(check_selects(c), "save_adapter: target_modules [", join(options.target_modules()),
                "]: expected them to select exactly the LoRA layers [", join(lora_paths), "], got [",
                join(select_paths(sites, c)), "]");
  } else {
    std::set<std::string> tails;
    for (const auto& p : lora_paths) tails.insert(last_component(p));
    c.target_modules(std::vector<std::string>(tails.begin(), tails.end()));
    if (!check_selects(c)) {
      std::vector<std::string> full = lora_paths;
      std::sort(full.begin(), full.end());
      c.target_modules(full);
    }
  }

  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  const std::string& prefix = options.key_prefix();
  for (const Site* s : loras) {
    tensors.emplace_back(prefix + s->path + ".lora_A.weight", s->lora->lora_A());
    tensors.emplace_back(prefix + s->path + ".lora_B.weight", s->lora->lora_B());
  }
  if (c.bias() != "none") {
    // PEFT's get_peft_model_state_dict: bias "all" saves every parameter whose name holds
    // "bias"; "lora_only" looks up "<path>.bias" for each LoRA layer, a name PEFT >= 0.7's
    // layers no longer have (theirs is "<path>.base_layer.bias"), so PEFT saves no bias there.
    // msbnb saves the LoRA layers' base_layer.bias for lora_only (PEFT loads them: they are
    // its parameter names).
    auto& m = const_cast<torch::nn::Module&>(model);
    if (c.bias() == "all") {
      for (const auto& item : m.named_parameters()) {
        if (item.key().find("bias") != std::string::npos && item.key().find("lora_") == std::string::npos) {
          tensors.emplace_back(prefix + item.key(), item.value());
        }
      }
    } else {
      for (const Site* s : loras) {
        for (const auto& item : s->lora->base_module()->named_parameters(false)) {
          if (item.key() == "bias") tensors.emplace_back(prefix + s->path + ".base_layer.bias", item.value());
        }
      }
    }
  }
  std::sort(tensors.begin(), tensors.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (size_t i = 1; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].first != tensors[i - 1].first, "save_adapter: key ", tensors[i].first, " twice");
  }
  return {std::move(tensors), std::move(c)};
}

void save_adapter(const torch::nn::Module& model, const std::string& dir, const SaveAdapterOptions& options) {
  TORCH_CHECK(!dir.empty(), "save_adapter: dir: expected a folder, got ''");
  auto [tensors, config] = adapter_state(model, options);
  const std::string config_text = adapter_config_json(config);
  io::NamedTensors out;
  out.reserve(tensors.size());
  for (auto& [k, t] : tensors) out.emplace_back(k, t.detach().to(torch::kCPU).contiguous());
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  TORCH_CHECK(!ec && std::filesystem::is_directory(dir), "save_adapter: dir ", quote_cut(dir),
              ": expected a folder that exists or can be created, got ", ec ? ec.message() : "not a folder");
  io::save_safetensors(join_path(dir, kAdapterWeightsFile), out, {{"format", "pt"}});
  try {
    io::write_file_atomic(join_path(dir, kAdapterConfigFile), config_text);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "save_adapter: ", e.what());
  }
}

// ---------------------------------------------------------------------------------------------
// Loading

AdapterLoadReport load_adapter(torch::nn::Module& model, const std::string& dir,
                               const LoadAdapterOptions& options) {
  AdapterLoadReport report;
  report.config = read_adapter_config(join_path(dir, kAdapterConfigFile));
  const AdapterConfig& cfg = report.config;
  const std::string wfile = join_path(dir, kAdapterWeightsFile);
  const io::SafetensorsFile file = io::SafetensorsFile::open(wfile);

  const auto sites = sites_of(model);
  std::vector<const Site*> loras;
  for (const auto& s : sites) {
    if (s.lora) loras.push_back(&s);
  }
  // The LoRA layers the model has, or would get: (path, r, in, out).
  struct Target {
    std::string path;
    int64_t r, in, out;
  };
  std::vector<Target> targets;
  std::vector<std::string> problems;
  const bool inject = loras.empty();
  if (inject) {
    TORCH_CHECK(options.inject(), "load_adapter: ", dir,
                ": the model has no LoRA layers and inject is false");
    TORCH_CHECK(
        !cfg.target_modules().empty(), "load_adapter: ", dir,
        ": the model has no LoRA layers and the config's target_modules is null (PEFT's per-architecture ",
        "default, which msbnb does not know): expected a list or a regular expression");
    std::map<std::string, const Site*> by_path;
    for (const auto& s : sites) by_path[s.path] = &s;
    for (const auto& p : select_paths(sites, cfg)) {
      const Site* s = by_path.at(p);
      targets.push_back({p, cfg.r_for(p), s->in, s->out});
    }
    TORCH_CHECK(!targets.empty(), "load_adapter: ", dir, ": the config's target_modules ",
                cfg.target_modules_is_regex() ? "regular expression " : "", "[", join(cfg.target_modules()),
                "] select no linear layer of the model");
  } else {
    for (const Site* s : loras) {
      const LoraLayer& l = *s->lora;
      targets.push_back({s->path, l.r(), s->in, s->out});
      if (l.r() != cfg.r_for(s->path)) {
        problems.push_back("r of " + s->path + ": the model has " + std::to_string(l.r()) + ", the config " +
                           std::to_string(cfg.r_for(s->path)));
      }
      if (l.lora_alpha() != cfg.lora_alpha_for(s->path)) {
        std::ostringstream os;
        os << "lora_alpha of " << s->path << ": the model has " << l.lora_alpha() << ", the config "
           << cfg.lora_alpha_for(s->path);
        problems.push_back(os.str());
      }
      if (l.use_rslora() != cfg.use_rslora()) {
        problems.push_back(std::string("use_rslora of ") + s->path + ": the model has " +
                           (l.use_rslora() ? "true" : "false") + ", the config " +
                           (cfg.use_rslora() ? "true" : "false"));
      }
    }
  }

  // Expected keys (module-path form) -> shape, and where each goes.
  std::map<std::string, std::vector<int64_t>> expected;
  std::set<std::string> target_paths;
  for (const auto& t : targets) {
    expected[t.path + ".lora_A.weight"] = {t.r, t.in};
    expected[t.path + ".lora_B.weight"] = {t.out, t.r};
    target_paths.insert(t.path);
  }
  // Bias parameters by the names they have (or will have) with LoRA layers in place.
  std::map<std::string, torch::Tensor> biases;
  for (const auto& item : model.named_parameters()) {
    std::string name = item.key();
    if (name.find("bias") == std::string::npos || name.find("lora_") != std::string::npos) continue;
    const auto dot = name.rfind('.');
    if (inject && dot != std::string::npos && target_paths.count(name.substr(0, dot))) {
      name = name.substr(0, dot) + ".base_layer" + name.substr(dot);
    }
    biases[name] = item.value();
  }

  const std::string prefix = kPeftKeyPrefix;
  std::map<std::string, std::string> file_key;  // module-path form -> key in the file
  std::vector<std::string> extra, shapes, dtypes;
  for (const auto& key : file.names()) {
    std::string k = key;
    if (k.compare(0, prefix.size(), prefix) == 0) k = k.substr(prefix.size());
    if (!file_key.emplace(k, key).second) {
      problems.push_back("key " + key + " and " + file_key[k] + " name the same tensor (with and without " +
                         prefix + ")");
      continue;
    }
    const io::TensorEntry& e = file.info(key);
    const bool is_float = e.dtype == io::StDtype::F16 || e.dtype == io::StDtype::BF16 ||
                          e.dtype == io::StDtype::F32 || e.dtype == io::StDtype::F64;
    std::vector<int64_t> want;
    auto it = expected.find(k);
    if (it != expected.end()) {
      want = it->second;
    } else if (cfg.bias() != "none" && biases.count(k)) {
      want = biases[k].sizes().vec();
    } else {
      extra.push_back(key);
      continue;
    }
    if (!is_float) {
      dtypes.push_back(key + ": expected F16, BF16, F32 or F64, got " + io::dtype_name(e.dtype));
      continue;
    }
    if (e.shape != want)
      shapes.push_back(key + ": expected " + shape_str(want) + ", got " + shape_str(e.shape));
  }
  std::vector<std::string> missing;
  for (const auto& [k, shape] : expected) {
    if (!file_key.count(k)) missing.push_back(prefix + k);
  }
  // Values: finite (a NaN adapter poisons every output).
  if (extra.empty() && missing.empty() && shapes.empty() && dtypes.empty() && problems.empty()) {
    for (const auto& [k, key] : file_key) {
      const torch::Tensor t = file.get(key);
      const int64_t bad = t.numel() - torch::isfinite(t).sum().item<int64_t>();
      if (bad > 0) {
        dtypes.push_back(key + ": expected finite values, got " + std::to_string(bad) + " NaN / Inf of " +
                         std::to_string(t.numel()));
      }
    }
  }
  if (!(extra.empty() && missing.empty() && shapes.empty() && dtypes.empty() && problems.empty())) {
    std::ostringstream os;
    os << "load_adapter: " << dir << ": the adapter does not match the model";
    if (!problems.empty()) os << "\n  config vs model: " << join(problems, "; ");
    if (!missing.empty()) os << "\n  missing keys (" << missing.size() << "): " << join(missing);
    if (!extra.empty()) os << "\n  unexpected keys (" << extra.size() << "): " << join(extra);
    if (!shapes.empty()) os << "\n  shape mismatches (" << shapes.size() << "): " << join(shapes, "; ");
    if (!dtypes.empty()) os << "\n  bad tensors (" << dtypes.size() << "): " << join(dtypes, "; ");
    os << "\n  (keys are PEFT's: " << prefix
       << "<module path>.lora_A.weight / .lora_B.weight; the model's LoRA " << (inject ? "targets" : "layers")
       << ": " << targets.size() << ", first " << targets.front().path << ")";
    TORCH_CHECK(false, os.str());
  }

  if (inject) {
    // Group by (r, alpha) (rank_pattern / alpha_pattern) and inject each group by its full paths.
    // A full path passed as a target entry also matches a longer path ending in ".<path>":
    // refuse that case rather than wrap a layer the config did not select.
    for (const auto& t : targets) {
      for (const auto& s : sites) {
        TORCH_CHECK(s.path == t.path || !ends_with_dot(s.path, t.path), "load_adapter: cannot inject ",
                    t.path, " alone: the layer ", s.path, " ends with the same path");
      }
    }
    std::map<std::pair<int64_t, double>, std::vector<std::string>> groups;
    for (const auto& t : targets) groups[{t.r, cfg.lora_alpha_for(t.path)}].push_back(t.path);
    try {
      for (const auto& [ra, paths] : groups) {
        LoraConfig lc = cfg.lora_config_for(paths.front()).target_modules(paths);
        report.injection.push_back(
            inject_lora(model, lc, InjectOptions().allow_shared_modules(options.allow_shared_modules())));
      }
      report.injected = true;
      // New modules start in train mode (LoRA dropout active): give them the model's mode, as
      // PeftModel.from_pretrained's eval() does for a model in eval mode.
      for (const auto& s : sites_of(model)) {
        if (s.lora && target_paths.count(s.path)) s.module->train(model.is_training());
      }
    } catch (...) {
      if (!report.injection.empty()) unload_lora(model);
      throw;
    }
  }

  try {
    // Destinations by their names in the model (now with LoRA layers).
    std::map<std::string, torch::Tensor> dest;
    for (const auto& item : model.named_parameters()) dest[item.key()] = item.value();
    torch::NoGradGuard no_grad;
    std::vector<std::pair<torch::Tensor, torch::Tensor>> copies;
    for (const auto& [k, key] : file_key) {
      auto it = dest.find(k);
      TORCH_CHECK(it != dest.end(), "load_adapter: ", key, ": no parameter ", k,
                  " in the model after injection");
      const torch::Tensor src = file.get(key);
      TORCH_CHECK(it->second.sizes() == src.sizes(), "load_adapter: ", key, ": expected ",
                  shape_str(it->second.sizes()), ", got ", shape_str(src.sizes()));
      copies.emplace_back(it->second, src.to(it->second.options()));
      report.loaded.push_back(key);
    }
    for (auto& [d, s] : copies) d.copy_(s);
  } catch (...) {
    if (report.injected) unload_lora(model);
    throw;
  }
  std::sort(report.loaded.begin(), report.loaded.end());
  return report;
}

}  // namespace msbnb::lora
