// PEFT adapter files (msbnb/lora/peft.h) against the fixtures PEFT itself wrote
// (tests/fixtures/peft/, tools/make_peft_fixtures.py: peft 0.21.2, transformers 5.24.0,
// torch 2.15.0): loading reproduces PEFT's per-module outputs, saving round-trips bit for bit
// and writes PEFT's adapter_config.json byte for byte, and every mismatch is one clear error.
//
// Tolerance of the output comparison (float32, u = 2^-24). A LoRA layer computes
//   y_i = sum_k W_ik x_k + b_i + s * sum_j B_ij t_j,   t_j = sum_k A_jk x_k
// Recursive summation of n terms in float32 is off the exact sum by at most n·u·sum|terms|
// (to first order), in any order. With T_i = sum_k |W_ik x_k| + |b_i|
// + s·sum_j |B_ij|·(|t_j| + sum_k |A_jk x_k|) every float32 evaluation (PEFT's MKL order or
// ours) is within (in + r + 4)·u·T_i of the exact value (the +4: the bias add, the scaling,
// the final add, the rounding of t_j that B multiplies), and two of them within twice that.
// The test checks ours against PEFT's with the doubled bound and ours against a float64
// reference with the single one.
#include "msbnb/lora/peft.h"

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "msbnb/convert/convert.h"
#include "msbnb/io/safetensors.h"
#include "msbnb/lora/lora.h"

namespace fs = std::filesystem;
using msbnb::lora::AdapterConfig;
using msbnb::lora::LoadAdapterOptions;
using msbnb::lora::LoraConfig;
using msbnb::lora::SaveAdapterOptions;

namespace {

const std::string kDir = std::string(MSBNB_FIXTURES_DIR) + "/peft";
const std::vector<std::string> kCases = {"qv_r4", "rslora_r8_bias", "all_linear_r2", "regex_pattern"};

nlohmann::json index_json() {
  std::ifstream f(kDir + "/index.json");
  return nlohmann::json::parse(f);
}

const nlohmann::json& case_json(const nlohmann::json& index, const std::string& name) {
  for (const auto& c : index.at("cases")) {
    if (c.at("name") == name) return c;
  }
  throw std::runtime_error("no case " + name);
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
}

// A module tree with a torch::nn::Linear at every dotted path of the base model's 2-D weights
// (embed_tokens aside), weights and biases from `base/model.safetensors` (transformers' names,
// so the paths are PEFT's). `in_scale` > 1 makes every in_features that much larger: "another
// model" with the same paths. No handle to a layer is kept (inject_lora refuses shared layers).
std::shared_ptr<torch::nn::Module> base_tree(int64_t in_scale = 1) {
  auto root = std::make_shared<torch::nn::Module>();
  const auto tensors = msbnb::io::load_safetensors(kDir + "/base/model.safetensors");
  std::map<std::string, torch::Tensor> by_name(tensors.begin(), tensors.end());
  for (const auto& [name, w] : by_name) {
    if (w.dim() != 2 || name.find("embed_tokens") != std::string::npos) continue;
    const std::string path = name.substr(0, name.size() - std::string(".weight").size());
    std::shared_ptr<torch::nn::Module> node = root;
    std::stringstream ss(path);
    std::string part;
    std::vector<std::string> parts;
    while (std::getline(ss, part, '.')) parts.push_back(part);
    for (size_t i = 0; i + 1 < parts.size(); ++i) {
      auto children = node->named_children();
      if (auto* c = children.find(parts[i])) {
        node = *c;
      } else {
        node = node->register_module(parts[i], std::make_shared<torch::nn::Module>());
      }
    }
    auto it = by_name.find(path + ".bias");
    const bool has_bias = it != by_name.end();
    torch::nn::Linear lin(torch::nn::LinearOptions(w.size(1) * in_scale, w.size(0)).bias(has_bias));
    torch::NoGradGuard g;
    if (in_scale == 1) lin->weight.copy_(w);
    if (has_bias) lin->bias.copy_(it->second);
    node->register_module(parts.back(), lin);
  }
  return root;
}

std::shared_ptr<torch::nn::Module> find_module(torch::nn::Module& root, const std::string& path) {
  for (const auto& item : root.named_modules("", false)) {
    if (item.key() == path) return item.value();
  }
  return nullptr;
}

torch::Tensor lora_forward(torch::nn::Module& root, const std::string& path, const torch::Tensor& x) {
  auto m = find_module(root, path);
  EXPECT_TRUE(m) << path;
  auto* l = dynamic_cast<msbnb::lora::LoRALinearImpl*>(m.get());
  EXPECT_TRUE(l) << path << " is not a LoRALinear";
  return l->forward(x);
}

std::vector<std::string> lora_paths(const torch::nn::Module& root) {
  std::vector<std::string> out;
  for (const auto& l : msbnb::lora::lora_info(root).layers) out.push_back(l.name);
  std::sort(out.begin(), out.end());
  return out;
}

// Removes this process's scratch folder at exit.
struct ScratchCleanup {
  ~ScratchCleanup() {
    std::error_code ec;
    fs::remove_all(fs::temp_directory_path() / ("msbnb_peft_" + std::to_string(::getpid())), ec);
  }
} scratch_cleanup;

std::string tmp_dir(const std::string& name) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  fs::path p = fs::temp_directory_path() / ("msbnb_peft_" + std::to_string(::getpid())) /
               (std::string(info->test_suite_name()) + "." + info->name() + "." + name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

std::string copy_case(const std::string& name, const std::string& to) {
  fs::copy(kDir + "/" + name, to, fs::copy_options::overwrite_existing | fs::copy_options::recursive);
  return to;
}

// The error message of `f()`, or "" if it did not throw c10::Error.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

// Parameters of the model by name, cloned (to prove a failed load left them unchanged).
std::map<std::string, torch::Tensor> snapshot(const torch::nn::Module& m) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& item : m.named_parameters()) out[item.key()] = item.value().detach().clone();
  return out;
}

void expect_same(const std::map<std::string, torch::Tensor>& a, const torch::nn::Module& m) {
  auto b = snapshot(m);
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [k, t] : a) {
    ASSERT_TRUE(b.count(k)) << k;
    EXPECT_TRUE(torch::equal(t, b[k])) << k;
  }
}

// Max over outputs of |got - want| / bound (pass: <= 1), bound = factor·(in + r + 4)·u·T_i.
double bound_ratio(const torch::Tensor& got, const torch::Tensor& want, const torch::Tensor& x,
                   const msbnb::lora::LoraLayer& l, const torch::Tensor& w, const torch::Tensor& b,
                   double factor) {
  auto xd = x.to(torch::kFloat64), wd = w.to(torch::kFloat64), ad = l.lora_A().detach().to(torch::kFloat64),
       bd = l.lora_B().detach().to(torch::kFloat64);
  const double s = l.scaling();
  auto t = torch::matmul(xd, ad.t());
  auto T = torch::matmul(xd.abs(), wd.abs().t()) +
           s * torch::matmul(t.abs() + torch::matmul(xd.abs(), ad.abs().t()), bd.abs().t());
  if (b.defined()) T = T + b.to(torch::kFloat64).abs();
  const double u = std::ldexp(1.0, -24);
  auto bound = factor * static_cast<double>(l.in_features() + l.r() + 4) * u * T + 1e-30;
  return ((got.to(torch::kFloat64) - want.to(torch::kFloat64)).abs() / bound).max().item<double>();
}

class PeftFixture : public ::testing::TestWithParam<std::string> {};

}  // namespace

// Loading PEFT's adapter into the C++ tree (injecting LoRA by the config) gives PEFT's outputs.
TEST_P(PeftFixture, LoadReproducesPeftOutputs) {
  const std::string name = GetParam();
  const auto index = index_json();
  const auto& cj = case_json(index, name);
  auto model = base_tree();
  model->eval();
  const std::string dir = kDir + "/" + name;
  const auto report = msbnb::lora::load_adapter(*model, dir);
  EXPECT_TRUE(report.injected);
  EXPECT_EQ(report.loaded, cj.at("keys").get<std::vector<std::string>>());

  std::vector<std::string> want_paths;
  for (const auto& m : cj.at("modules")) want_paths.push_back(m.at("path"));
  std::sort(want_paths.begin(), want_paths.end());
  EXPECT_EQ(lora_paths(*model), want_paths);

  const msbnb::io::SafetensorsFile adapter =
      msbnb::io::SafetensorsFile::open(dir + "/adapter_model.safetensors");
  const msbnb::io::SafetensorsFile expected = msbnb::io::SafetensorsFile::open(dir + "/expected.safetensors");
  for (const auto& mj : cj.at("modules")) {
    const std::string path = mj.at("path");
    SCOPED_TRACE(name + " " + path);
    auto m = find_module(*model, path);
    ASSERT_TRUE(m);
    const auto* l = msbnb::lora::as_lora_layer(*m);
    ASSERT_TRUE(l);
    EXPECT_EQ(l->r(), mj.at("r").get<int64_t>());
    EXPECT_EQ(l->lora_alpha(), mj.at("lora_alpha").get<double>());
    EXPECT_DOUBLE_EQ(l->scaling(), mj.at("scaling").get<double>());
    EXPECT_EQ(l->use_rslora(), name == "rslora_r8_bias");
    EXPECT_TRUE(torch::equal(l->lora_A(), adapter.get("base_model.model." + path + ".lora_A.weight")));
    EXPECT_TRUE(torch::equal(l->lora_B(), adapter.get("base_model.model." + path + ".lora_B.weight")));
    auto* lin = dynamic_cast<msbnb::lora::LoRALinearImpl*>(m.get());
    ASSERT_TRUE(lin);
    const auto& base = lin->base_layer();
    const torch::Tensor x = expected.get("x." + path), y_peft = expected.get("y." + path);
    torch::Tensor y;
    {
      torch::NoGradGuard g;
      y = lin->forward(x);
    }
    ASSERT_EQ(y.sizes(), y_peft.sizes());
    // float64 reference from the same tensors
    auto xd = x.to(torch::kFloat64);
    auto ref = torch::matmul(xd, base->weight.detach().to(torch::kFloat64).t()) +
               l->scaling() * torch::matmul(torch::matmul(xd, l->lora_A().detach().to(torch::kFloat64).t()),
                                            l->lora_B().detach().to(torch::kFloat64).t());
    torch::Tensor bias = base->options.bias() ? base->bias.detach() : torch::Tensor();
    if (bias.defined()) ref = ref + bias.to(torch::kFloat64);
    EXPECT_LE(bound_ratio(y, y_peft, x, *l, base->weight.detach(), bias, 2.0), 1.0);
    EXPECT_LE(bound_ratio(y, ref, x, *l, base->weight.detach(), bias, 1.0), 1.0);
    EXPECT_LE(bound_ratio(y_peft, ref, x, *l, base->weight.detach(), bias, 1.0), 1.0);
    // The adapter changes the output (B is not zero), so the comparison tests the LoRA branch.
    torch::Tensor y_base = torch::nn::functional::linear(x, base->weight.detach(), bias);
    EXPECT_GT((y - y_base).abs().max().item<double>(), 1e-3);
  }
}

// The rslora case saved bias "all" with q_proj's biases moved by +0.25: they were loaded.
TEST(PeftLoad, BiasAllLoadsTheBiases) {
  auto model = base_tree();
  const auto base = msbnb::io::SafetensorsFile::open(kDir + "/base/model.safetensors");
  msbnb::lora::load_adapter(*model, kDir + "/rslora_r8_bias");
  auto params = model->named_parameters();
  const std::string p = "model.layers.0.self_attn.q_proj";
  EXPECT_TRUE(torch::equal(params[p + ".base_layer.bias"], base.get(p + ".bias") + 0.25));
  const std::string k = "model.layers.0.self_attn.k_proj";
  EXPECT_TRUE(torch::equal(params[k + ".base_layer.bias"], base.get(k + ".bias")));
}

// save(load(PEFT's files)) with the loaded config: the same keys and bits, and PEFT's
// adapter_config.json byte for byte; loading ours again gives bit-identical A / B.
TEST_P(PeftFixture, SaveRoundTripIsBitExact) {
  const std::string name = GetParam();
  const std::string src = kDir + "/" + name;
  auto model = base_tree();
  const auto report = msbnb::lora::load_adapter(*model, src);
  const std::string out = tmp_dir("out");
  msbnb::lora::save_adapter(*model, out, SaveAdapterOptions::from_config(report.config));
  EXPECT_EQ(read_file(out + "/adapter_config.json"), read_file(src + "/adapter_config.json"));
  std::map<std::string, std::string> meta_ours, meta_peft;
  const auto ours = msbnb::io::load_safetensors(out + "/adapter_model.safetensors", &meta_ours);
  const auto peft = msbnb::io::load_safetensors(src + "/adapter_model.safetensors", &meta_peft);
  EXPECT_EQ(meta_ours, meta_peft);
  // Our writer lays the data out as the Python one does: the same data bytes. (The headers differ
  // in the order of the fields of each entry: the Python writer puts dtype, shape,
  // data_offsets; ours sorts them. Both are valid JSON objects.)
  const std::string fo = read_file(out + "/adapter_model.safetensors"),
                    fp = read_file(src + "/adapter_model.safetensors");
  ASSERT_EQ(fo.size(), fp.size());
  ASSERT_GE(fo.size(), 8u);
  const size_t header = 8 + static_cast<size_t>(static_cast<uint8_t>(fp[0])) +
                        (static_cast<size_t>(static_cast<uint8_t>(fp[1])) << 8);
  EXPECT_TRUE(fo.compare(header, std::string::npos, fp, header, std::string::npos) == 0);
  ASSERT_EQ(ours.size(), peft.size());
  for (size_t i = 0; i < ours.size(); ++i) {
    EXPECT_EQ(ours[i].first, peft[i].first);
    EXPECT_EQ(ours[i].second.scalar_type(), peft[i].second.scalar_type());
    EXPECT_TRUE(torch::equal(ours[i].second, peft[i].second)) << ours[i].first;
  }
  auto again = base_tree();
  msbnb::lora::load_adapter(*again, out);
  auto a = model->named_parameters(), b = again->named_parameters();
  ASSERT_EQ(a.size(), b.size());
  for (const auto& item : a) EXPECT_TRUE(torch::equal(item.value(), b[item.key()])) << item.key();
}

INSTANTIATE_TEST_SUITE_P(Peft, PeftFixture, ::testing::ValuesIn(kCases));

// Keys without PEFT's "base_model.model." prefix load the same.
TEST(PeftLoad, KeysWithoutPrefixLoad) {
  const std::string dir = copy_case("qv_r4", tmp_dir("noprefix"));
  msbnb::io::NamedTensors t;
  for (auto& [k, v] : msbnb::io::load_safetensors(dir + "/adapter_model.safetensors")) {
    t.emplace_back(k.substr(std::string("base_model.model.").size()), v.clone());
  }
  msbnb::io::save_safetensors(dir + "/adapter_model.safetensors", t, {{"format", "pt"}});
  auto a = base_tree(), b = base_tree();
  msbnb::lora::load_adapter(*a, dir);
  msbnb::lora::load_adapter(*b, kDir + "/qv_r4");
  auto pa = a->named_parameters(), pb = b->named_parameters();
  for (const auto& item : pa) EXPECT_TRUE(torch::equal(item.value(), pb[item.key()])) << item.key();
  // Saving with key_prefix "" writes that form.
  const std::string out = tmp_dir("out");
  msbnb::lora::save_adapter(*a, out, SaveAdapterOptions().key_prefix(""));
  EXPECT_TRUE(msbnb::io::SafetensorsFile::open(out + "/adapter_model.safetensors")
                  .has("model.layers.0.self_attn.q_proj.lora_A.weight"));
}

// A model that already has LoRA layers (same r / alpha): no injection, values copied.
TEST(PeftLoad, IntoExistingLoraLayers) {
  auto model = base_tree();
  msbnb::lora::inject_lora(*model, LoraConfig().r(4).lora_alpha(8).target_modules({"q_proj", "v_proj"}));
  const auto report = msbnb::lora::load_adapter(*model, kDir + "/qv_r4");
  EXPECT_FALSE(report.injected);
  EXPECT_EQ(report.loaded.size(), 8u);
  const auto f = msbnb::io::SafetensorsFile::open(kDir + "/qv_r4/adapter_model.safetensors");
  EXPECT_TRUE(torch::equal(model->named_parameters()["model.layers.1.self_attn.v_proj.lora_B.weight"],
                           f.get("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")));
}

// The adapter of another model (other in_features at the same paths): one error listing every
// shape, expected vs found; the model is unchanged (no LoRA layers, same weights).
TEST(PeftErrors, AdapterForAnotherModel) {
  auto model = base_tree(/*in_scale=*/2);
  const auto before = snapshot(*model);
  const std::string msg = error_of([&] { msbnb::lora::load_adapter(*model, kDir + "/qv_r4"); });
  EXPECT_NE(msg.find("shape mismatches (4)"), std::string::npos) << msg;
  EXPECT_NE(
      msg.find(
          "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight: expected [4, 64], got [4, 32]"),
      std::string::npos)
      << msg;
  EXPECT_NE(msg.find("model.layers.1.self_attn.v_proj.lora_A.weight"), std::string::npos) << msg;
  EXPECT_TRUE(lora_paths(*model).empty());
  expect_same(before, *model);
}

TEST(PeftErrors, MissingAndExtraKeys) {
  const std::string dir = copy_case("qv_r4", tmp_dir("keys"));
  msbnb::io::NamedTensors t;
  for (auto& [k, v] : msbnb::io::load_safetensors(dir + "/adapter_model.safetensors")) {
    if (k.find("layers.1.self_attn.q_proj") != std::string::npos) continue;  // 2 missing
    t.emplace_back(k, v.clone());
  }
  t.emplace_back("base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight", torch::zeros({4, 32}));
  t.emplace_back("base_model.model.model.encoder.fc.lora_A.weight", torch::zeros({4, 32}));
  msbnb::io::save_safetensors(dir + "/adapter_model.safetensors", t);
  auto model = base_tree();
  const auto before = snapshot(*model);
  const std::string msg = error_of([&] { msbnb::lora::load_adapter(*model, dir); });
  EXPECT_NE(msg.find("missing keys (2): base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight, "
                     "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("unexpected keys (2)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("base_model.model.model.encoder.fc.lora_A.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("q_proj.lora_C.weight"), std::string::npos) << msg;
  EXPECT_TRUE(lora_paths(*model).empty());
  expect_same(before, *model);
}

// The model has LoRA layers of another rank: r named per layer, the shapes listed, A / B kept.
TEST(PeftErrors, RankMismatch) {
  auto model = base_tree();
  msbnb::lora::inject_lora(*model, LoraConfig().r(2).lora_alpha(8).target_modules({"q_proj", "v_proj"}));
  const auto before = snapshot(*model);
  const std::string msg = error_of([&] { msbnb::lora::load_adapter(*model, kDir + "/qv_r4"); });
  EXPECT_NE(msg.find("r of model.layers.0.self_attn.q_proj: the model has 2, the config 4"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("q_proj.lora_A.weight: expected [2, 32], got [4, 32]"), std::string::npos) << msg;
  expect_same(before, *model);
  // rsLoRA flag and alpha too.
  auto m2 = base_tree();
  msbnb::lora::inject_lora(
      *m2, LoraConfig().r(4).lora_alpha(4).use_rslora(true).target_modules({"q_proj", "v_proj"}));
  const std::string msg2 = error_of([&] { msbnb::lora::load_adapter(*m2, kDir + "/qv_r4"); });
  EXPECT_NE(msg2.find("lora_alpha of model.layers.0.self_attn.q_proj: the model has 4, the config 8"),
            std::string::npos)
      << msg2;
  EXPECT_NE(msg2.find("use_rslora of model.layers.0.self_attn.q_proj: the model has true, the config false"),
            std::string::npos)
      << msg2;
}

TEST(PeftErrors, BadConfigs) {
  const std::string good = read_file(kDir + "/qv_r4/adapter_config.json");
  auto with = [&](const std::string& field, const std::string& value) {
    auto j = nlohmann::json::parse(good);
    if (value.empty()) {
      j.erase(field);
    } else {
      j[field] = nlohmann::json::parse(value);
    }
    return j.dump();
  };
  struct Case {
    std::string text, needle;
  };
  const std::vector<Case> cases = {
      {with("peft_type", "\"PREFIX_TUNING\""), "field 'peft_type': expected \"LORA\""},
      {with("peft_type", ""), "field 'peft_type': expected \"LORA\", got none"},
      {with("r", "0"), "field 'r': expected a rank > 0, got 0"},
      {with("r", "\"4\""), "field 'r': expected an integer, got string \"4\""},
      {with("r", "4.5"), "field 'r': expected an integer, got number 4.5"},
      {with("lora_alpha", "-1"), "field 'lora_alpha': expected a finite number > 0, got -1"},
      {with("lora_dropout", "1.0"), "field 'lora_dropout': expected a number in [0, 1), got 1"},
      {with("bias", "\"some\""), "field 'bias': expected \"none\", \"all\" or \"lora_only\""},
      {with("use_rslora", "1"), "field 'use_rslora': expected true or false"},
      {with("use_dora", "true"), "field 'use_dora': expected it unset (DoRA"},
      {with("fan_in_fan_out", "true"), "field 'fan_in_fan_out': expected it unset"},
      {with("modules_to_save", "[\"lm_head\"]"), "field 'modules_to_save': expected it unset"},
      {with("target_modules", "[1]"), "field 'target_modules': expected a list of strings, got integer 1"},
      {with("target_modules", "\"(\""), "field 'target_modules': expected a regular expression"},
      {with("rank_pattern", "{\"q_proj\": 0}"), "field 'rank_pattern.q_proj': expected a rank > 0"},
      {"[1, 2]", "expected a JSON object, got array"},
      {"{\"peft_type\": \"LORA\", \"r\": 4, \"r\": 8}", "expected unique keys, got 'r' twice"},
      {good.substr(0, good.size() / 2), "expected well-formed JSON"},
      {"", "expected well-formed JSON"},
  };
  for (const auto& c : cases) {
    const std::string dir = copy_case("qv_r4", tmp_dir("cfg"));
    write_file(dir + "/adapter_config.json", c.text);
    auto model = base_tree();
    const auto before = snapshot(*model);
    const std::string msg = error_of([&] { msbnb::lora::load_adapter(*model, dir); });
    EXPECT_NE(msg.find(c.needle), std::string::npos) << "want: " << c.needle << "\ngot: " << msg;
    EXPECT_NE(msg.find("adapter_config.json"), std::string::npos) << msg;
    expect_same(before, *model);
  }
  // A config without target_modules cannot inject (PEFT would use its per-architecture table).
  const std::string dir = copy_case("qv_r4", tmp_dir("null"));
  write_file(dir + "/adapter_config.json", with("target_modules", "null"));
  auto model = base_tree();
  EXPECT_NE(error_of([&] { msbnb::lora::load_adapter(*model, dir); }).find("target_modules is null"),
            std::string::npos);
  // No files at all.
  EXPECT_NE(
      error_of([&] { msbnb::lora::load_adapter(*model, tmp_dir("empty")); }).find("expected a readable file"),
      std::string::npos);
}

// Hostile weight files: truncated, integer dtype, NaN. Clear errors naming the file / key.
TEST(PeftErrors, HostileWeights) {
  const std::string src = read_file(kDir + "/qv_r4/adapter_model.safetensors");
  {
    const std::string dir = copy_case("qv_r4", tmp_dir("trunc"));
    write_file(dir + "/adapter_model.safetensors", src.substr(0, src.size() - 100));
    auto model = base_tree();
    const std::string msg = error_of([&] { msbnb::lora::load_adapter(*model, dir); });
    EXPECT_NE(msg.find("adapter_model.safetensors"), std::string::npos) << msg;
    EXPECT_TRUE(lora_paths(*model).empty());
  }
  for (const bool nan : {false, true}) {
    const std::string dir = copy_case("qv_r4", tmp_dir(nan ? "nan" : "int"));
    msbnb::io::NamedTensors t;
    for (auto& [k, v] : msbnb::io::load_safetensors(dir + "/adapter_model.safetensors")) {
      torch::Tensor c = v.clone();
      if (k == "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight") {
        if (nan) {
          c[3][1] = std::nanf("");
        } else {
          c = c.to(torch::kInt32);
        }
      }
      t.emplace_back(k, c);
    }
    msbnb::io::save_safetensors(dir + "/adapter_model.safetensors", t);
    auto model = base_tree();
    const auto before = snapshot(*model);
    const std::string msg = error_of([&] { msbnb::lora::load_adapter(*model, dir); });
    EXPECT_NE(
        msg.find("v_proj.lora_B.weight: expected " + std::string(nan ? "finite values, got 1 NaN / Inf of 64"
                                                                     : "F16, BF16, F32 or F64, got I32")),
        std::string::npos)
        << msg;
    EXPECT_TRUE(lora_paths(*model).empty());
    expect_same(before, *model);
  }
  // The same tensor with and without the prefix.
  {
    const std::string dir = copy_case("qv_r4", tmp_dir("dup"));
    auto t = msbnb::io::load_safetensors(dir + "/adapter_model.safetensors");
    msbnb::io::NamedTensors t2(t.begin(), t.end());
    t2.emplace_back("model.layers.0.self_attn.q_proj.lora_A.weight", t[0].second.clone());
    msbnb::io::save_safetensors(dir + "/adapter_model.safetensors", t2);
    auto model = base_tree();
    EXPECT_NE(error_of([&] { msbnb::lora::load_adapter(*model, dir); }).find("name the same tensor"),
              std::string::npos);
  }
}

TEST(PeftSave, ErrorsAndDerivedTargets) {
  auto model = base_tree();
  EXPECT_NE(error_of([&] { msbnb::lora::save_adapter(*model, tmp_dir("x")); }).find("expected LoRA layers"),
            std::string::npos);
  msbnb::lora::inject_lora(*model,
                           LoraConfig().r(2).target_modules({"model.layers.0.self_attn.q_proj", "v_proj"}));
  // Derived target_modules: "q_proj" would also select layers.1's q_proj, so full paths.
  auto [tensors, cfg] = msbnb::lora::adapter_state(*model);
  EXPECT_EQ(cfg.target_modules(),
            (std::vector<std::string>{"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                      "model.layers.1.self_attn.v_proj"}));
  EXPECT_EQ(tensors.size(), 6u);
  EXPECT_NE(error_of([&] {
              msbnb::lora::save_adapter(*model, tmp_dir("x"),
                                        SaveAdapterOptions().target_modules({"q_proj", "v_proj"}));
            }).find("expected them to select exactly the LoRA layers"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              msbnb::lora::save_adapter(*model, tmp_dir("x"),
                                        SaveAdapterOptions().target_modules_regex("all-linear"));
            }).find("expected it to select exactly the LoRA layers"),
            std::string::npos);
  // A regex that selects them is written as PEFT's string form.
  const std::string dir = tmp_dir("re");
  msbnb::lora::save_adapter(*model, dir,
                            SaveAdapterOptions().target_modules_regex(
                                R"(model\.layers\.(0\.self_attn\.(q|v)|1\.self_attn\.v)_proj)"));
  const auto back = msbnb::lora::read_adapter_config(dir);
  EXPECT_TRUE(back.target_modules_is_regex());
  auto fresh = base_tree();
  msbnb::lora::load_adapter(*fresh, dir);
  EXPECT_EQ(lora_paths(*fresh), lora_paths(*model));
}

// Layers of different ranks: rank_pattern entries by full path, which PEFT's rule and ours
// resolve back to the same layers.
TEST(PeftSave, RankPatternRoundTrip) {
  auto model = base_tree();
  msbnb::lora::inject_lora(*model, LoraConfig().r(3).lora_alpha(6).target_modules({"gate_proj", "up_proj"}));
  msbnb::lora::inject_lora(*model,
                           LoraConfig().r(5).lora_alpha(6).target_modules({"model.layers.1.mlp.down_proj"}));
  const std::string dir = tmp_dir("rp");
  msbnb::lora::save_adapter(*model, dir);
  const auto cfg = msbnb::lora::read_adapter_config(dir);
  EXPECT_EQ(cfg.r(), 3);
  ASSERT_EQ(cfg.rank_pattern().size(), 1u);
  EXPECT_EQ(cfg.rank_pattern()[0].first, R"(model\.layers\.1\.mlp\.down_proj)");
  EXPECT_EQ(cfg.r_for("model.layers.1.mlp.down_proj"), 5);
  EXPECT_EQ(cfg.r_for("model.layers.0.mlp.up_proj"), 3);
  auto fresh = base_tree();
  const auto report = msbnb::lora::load_adapter(*fresh, dir);
  EXPECT_EQ(report.injection.size(), 2u);  // one inject_lora per (r, alpha)
  EXPECT_EQ(lora_paths(*fresh), lora_paths(*model));
  auto a = model->named_parameters(), b = fresh->named_parameters();
  for (const auto& item : a) EXPECT_TRUE(torch::equal(item.value(), b[item.key()])) << item.key();
}

// QLoRA: the base quantized to NF4 (msbnb::Linear4bit) before loading; PEFT's adapter lands on
// Linear4bitWithLoRA layers, and each computes its dequantized base plus PEFT's LoRA update.
// Tolerance: the same float32 bound with the dequantized weight as W (our Linear4bit product
// sums in float32 too; the reference is float64 over the same dequantized weight).
TEST(PeftLoad, IntoQuantizedBase) {
  auto model = base_tree();
  msbnb::convert_to_quantized_model_inplace(*model, msbnb::Int4Config().quant_type("nf4"), {"lm_head"});
  model->eval();
  msbnb::lora::load_adapter(*model, kDir + "/qv_r4");
  const auto expected = msbnb::io::SafetensorsFile::open(kDir + "/qv_r4/expected.safetensors");
  const auto info = msbnb::lora::lora_info(*model);
  ASSERT_EQ(info.layers.size(), 4u);
  for (const auto& li : info.layers) {
    SCOPED_TRACE(li.name);
    EXPECT_EQ(li.base.rfind("Linear4bit", 0), 0u) << li.base;
    auto m = find_module(*model, li.name);
    auto* q = dynamic_cast<msbnb::lora::Linear4bitWithLoRAImpl*>(m.get());
    ASSERT_TRUE(q);
    const torch::Tensor x = expected.get("x." + li.name);
    torch::Tensor y;
    {
      torch::NoGradGuard g;
      y = q->forward(x);
    }
    const torch::Tensor w = q->base_weight();
    torch::Tensor bias;
    for (const auto& item : q->base_layer()->named_parameters(false)) {
      if (item.key() == "bias") bias = item.value().detach();
    }
    if (!bias.defined()) {
      for (const auto& item : q->base_layer()->named_buffers(false)) {
        if (item.key() == "bias") bias = item.value().detach();
      }
    }
    auto xd = x.to(torch::kFloat64);
    auto ref = torch::matmul(xd, w.to(torch::kFloat64).t()) +
               q->scaling() * torch::matmul(torch::matmul(xd, q->lora_A().detach().to(torch::kFloat64).t()),
                                            q->lora_B().detach().to(torch::kFloat64).t());
    if (bias.defined()) ref = ref + bias.to(torch::kFloat64);
    EXPECT_LE(bound_ratio(y, ref, x, *q, w, bias, 1.0), 1.0);
  }
  // Saving from the quantized model writes the same adapter.
  const std::string out = tmp_dir("q");
  msbnb::lora::save_adapter(*model, out);
  const auto a = msbnb::io::load_safetensors(out + "/adapter_model.safetensors");
  const auto b = msbnb::io::load_safetensors(kDir + "/qv_r4/adapter_model.safetensors");
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i].second, b[i].second)) << a[i].first;
}

// A bfloat16 adapter file loads into float32 LoRA parameters (converted exactly).
TEST(PeftLoad, Bfloat16FileConverts) {
  const std::string dir = copy_case("qv_r4", tmp_dir("bf16"));
  msbnb::io::NamedTensors t;
  for (auto& [k, v] : msbnb::io::load_safetensors(dir + "/adapter_model.safetensors")) {
    t.emplace_back(k, v.to(torch::kBFloat16));
  }
  msbnb::io::save_safetensors(dir + "/adapter_model.safetensors", t);
  auto model = base_tree();
  msbnb::lora::load_adapter(*model, dir);
  auto params = model->named_parameters();
  for (const auto& [k, v] : t) {
    const auto& p = params[k.substr(std::string("base_model.model.").size())];
    EXPECT_EQ(p.scalar_type(), torch::kFloat32);
    EXPECT_TRUE(torch::equal(p, v.to(torch::kFloat32))) << k;
  }
}

TEST(PeftSave, MergedLayersAndBadFolder) {
  auto model = base_tree();
  msbnb::lora::load_adapter(*model, kDir + "/qv_r4");
  msbnb::lora::merge_lora(*model);
  EXPECT_NE(error_of([&] {
              msbnb::lora::save_adapter(*model, tmp_dir("m"));
            }).find("expected unmerged LoRA layers"),
            std::string::npos);
  msbnb::lora::unmerge_lora(*model);
  const std::string file = tmp_dir("f") + "/a_file";
  write_file(file, "x");
  EXPECT_NE(error_of([&] { msbnb::lora::save_adapter(*model, file); }).find("expected a folder"),
            std::string::npos);
  // Saving over an earlier adapter replaces both files and leaves no temporary file behind.
  const std::string dir = tmp_dir("over");
  msbnb::lora::save_adapter(*model, dir);
  msbnb::lora::save_adapter(*model, dir, SaveAdapterOptions().task_type("CAUSAL_LM"));
  EXPECT_EQ(msbnb::lora::read_adapter_config(dir).task_type(), "CAUSAL_LM");
  size_t files = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    (void)e;
    ++files;
  }
  EXPECT_EQ(files, 2u);
}

// PEFT's matching rules on their own: list tails, whole-path regex, all-linear, exclusions,
// and rank_pattern's "(.*\.)?(key)" with the first key in sorted order winning.
TEST(PeftConfig, TargetSelectionAndPatterns) {
  auto model = base_tree();
  auto cfg = AdapterConfig().target_modules({"q_proj", "mlp.up_proj"});
  EXPECT_EQ(msbnb::lora::select_target_modules(*model, cfg),
            (std::vector<std::string>{"model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj",
                                      "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj"}));
  cfg = AdapterConfig().target_modules({"proj"});  // not a dot-boundary tail: nothing
  EXPECT_TRUE(msbnb::lora::select_target_modules(*model, cfg).empty());
  cfg = AdapterConfig().target_modules({R"(.*\.1\..*_proj)"}).target_modules_is_regex(true);
  EXPECT_EQ(msbnb::lora::select_target_modules(*model, cfg).size(), 7u);
  cfg =
      AdapterConfig().target_modules({"q_proj"}).target_modules_is_regex(true);  // must match the whole path
  EXPECT_TRUE(msbnb::lora::select_target_modules(*model, cfg).empty());
  cfg = AdapterConfig()
            .target_modules({"all-linear"})
            .target_modules_is_regex(true)
            .exclude_modules({"self_attn", "self_attn.q_proj", "k_proj", "v_proj", "o_proj", "down_proj"});
  // As PEFT's check_target_module_exists: an exclude entry is a path or a dot-boundary tail of
  // the layer's own path ("self_attn" excludes nothing below it: only layers are matched).
  const auto sel = msbnb::lora::select_target_modules(*model, cfg);
  EXPECT_EQ(sel, (std::vector<std::string>{"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                                           "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"}));
  const auto parsed = msbnb::lora::parse_adapter_config(
      R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear",
          "rank_pattern": {"layers.1.mlp.down_proj": 7, "down_proj": 5}, "alpha_pattern": {"q_proj": 2.5}})");
  EXPECT_EQ(parsed.r_for("model.layers.0.mlp.down_proj"), 5);
  EXPECT_EQ(parsed.r_for("model.layers.1.mlp.down_proj"), 5);  // "down_proj" sorts first and matches
  EXPECT_EQ(parsed.r_for("model.layers.1.mlp.up_proj"), 4);
  EXPECT_EQ(parsed.lora_alpha_for("model.layers.0.self_attn.q_proj"), 2.5);
  EXPECT_EQ(parsed.lora_alpha_for("model.layers.0.self_attn.k_proj"), 8);
  EXPECT_EQ(parsed.r_for("model.layers.0.mlp.xdown_proj"), 4);  // a key only matches after a dot
  // inject(false) on a model without LoRA layers.
  EXPECT_NE(error_of([&] {
              msbnb::lora::load_adapter(*model, kDir + "/qv_r4", LoadAdapterOptions().inject(false));
            }).find("no LoRA layers and inject is false"),
            std::string::npos);
  // adapter_config_json of a parsed config is PEFT-loadable text that parses back the same.
  const auto again = msbnb::lora::parse_adapter_config(msbnb::lora::adapter_config_json(parsed));
  EXPECT_EQ(again.rank_pattern(), parsed.rank_pattern());
  EXPECT_EQ(again.alpha_pattern(), parsed.alpha_pattern());
  EXPECT_EQ(again.target_modules(), parsed.target_modules());
  EXPECT_TRUE(again.target_modules_is_regex());
}

// Files for tools/check_peft_interop.py (not a check by itself): with MSBNB_EXPORT_DIR set,
// writes adapters msbnb made and msbnb's outputs, for PEFT to load and compare.
//   <dir>/<case>/  adapter_model.safetensors, adapter_config.json (save_adapter),
//                  msbnb_outputs.safetensors: x.<path>, y.<path> (msbnb's LoRA forward, eval)
// Cases: each PEFT fixture loaded, A scaled by -1.5 and B shifted by +0.125 (so PEFT can only
// match by reading our file), saved with the loaded config; and "msbnb_mlp_gaussian": LoRA
// injected by msbnb (r 6, alpha 12, gaussian init, B random) on the MLP, saved with derived
// target_modules; "msbnb_rank_pattern": ranks 3 and 5 (rank_pattern by full path), rsLoRA.
TEST(PeftInterop, ExportForPython) {
  const char* env = std::getenv("MSBNB_EXPORT_DIR");
  if (!env) GTEST_SKIP() << "set MSBNB_EXPORT_DIR to write the files for tools/check_peft_interop.py";
  const std::string root = env;
  auto export_outputs = [](torch::nn::Module& model, const std::string& dir, uint64_t seed) {
    model.eval();
    msbnb::io::NamedTensors out;
    torch::manual_seed(seed);
    for (const auto& l : msbnb::lora::lora_info(model).layers) {
      torch::Tensor x = torch::randn({3, l.in_features});
      torch::NoGradGuard g;
      out.emplace_back("x." + l.name, x);
      out.emplace_back("y." + l.name, lora_forward(model, l.name, x));
    }
    msbnb::io::save_safetensors(dir + "/msbnb_outputs.safetensors", out);
  };
  uint64_t seed = 1;
  for (const auto& name : kCases) {
    auto model = base_tree();
    const auto report = msbnb::lora::load_adapter(*model, kDir + "/" + name);
    {
      torch::NoGradGuard g;
      for (auto& item : model->named_parameters()) {
        if (item.key().find("lora_A") != std::string::npos) item.value().mul_(-1.5);
        if (item.key().find("lora_B") != std::string::npos) item.value().add_(0.125);
      }
    }
    const std::string dir = root + "/" + name;
    msbnb::lora::save_adapter(*model, dir, SaveAdapterOptions::from_config(report.config));
    export_outputs(*model, dir, seed++);
  }
  {
    auto model = base_tree();
    torch::manual_seed(7);
    msbnb::lora::inject_lora(*model, LoraConfig()
                                         .r(6)
                                         .lora_alpha(12)
                                         .init("gaussian")
                                         .target_modules({"gate_proj", "up_proj", "down_proj"}));
    torch::NoGradGuard g;
    for (auto& item : model->named_parameters()) {
      if (item.key().find("lora_B") != std::string::npos) torch::nn::init::normal_(item.value(), 0, 0.1);
    }
    const std::string dir = root + "/msbnb_mlp_gaussian";
    msbnb::lora::save_adapter(
        *model, dir,
        SaveAdapterOptions().base_model_name_or_path("msbnb/tiny-llama-fixture").task_type("CAUSAL_LM"));
    export_outputs(*model, dir, seed++);
  }
  {
    auto model = base_tree();
    torch::manual_seed(8);
    msbnb::lora::inject_lora(
        *model, LoraConfig().r(3).lora_alpha(6).use_rslora(true).target_modules({"q_proj", "o_proj"}));
    msbnb::lora::inject_lora(*model, LoraConfig().r(5).lora_alpha(10).use_rslora(true).target_modules(
                                         {"model.layers.1.mlp.down_proj"}));
    torch::NoGradGuard g;
    for (auto& item : model->named_parameters()) {
      if (item.key().find("lora_B") != std::string::npos) torch::nn::init::normal_(item.value(), 0, 0.1);
    }
    const std::string dir = root + "/msbnb_rank_pattern";
    msbnb::lora::save_adapter(*model, dir,
                              SaveAdapterOptions().base_model_name_or_path("msbnb/tiny-llama-fixture"));
    export_outputs(*model, dir, seed++);
  }
}
