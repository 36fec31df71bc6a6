// quantized_state_dict / load_quantized_state_dict: the bitsandbytes key layout, save -> load
// round trips for every format, and hostile state dicts.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "nn/nn_test_util.h"

namespace msbnb::nn::test {
namespace {

constexpr uint64_t kSeed = 99;

// A small model: a quantized layer under a dotted path, a plain torch Linear, a buffer, an
// embedding.
struct NetImpl : torch::nn::Module {
  NetImpl(const Fmt& f, bool bias) {
    block = register_module("block", std::make_shared<torch::nn::Module>());
    if (f.quant_type == "int8")
      proj = block->register_module(
          "proj", Linear8bit(Linear8bitOptions(100, 172).bias(bias).threshold(f.threshold)).ptr());
    else
      proj = block->register_module("proj", Linear4bit(Linear4bitOptions(100, 172)
                                                           .bias(bias)
                                                           .quant_type(f.quant_type)
                                                           .compress_statistics(f.double_quant)
                                                           .symmetric(f.symmetric))
                                                .ptr());
    head = register_module("head", torch::nn::Linear(172, 3));
    scale = register_buffer("scale", torch::rand({3}));
    if (f.quant_type == "int8")
      emb = register_module("emb", Embedding8bit(11, 100).ptr());
    else
      emb = register_module("emb", Embedding4bit(Embedding4bitOptions(11, 100)
                                                     .quant_type(f.quant_type)
                                                     .compress_statistics(f.double_quant)
                                                     .symmetric(f.symmetric))
                                       .ptr());
  }
  void quantize(const torch::Tensor& w, const torch::Tensor& e) {
    if (auto p = std::dynamic_pointer_cast<Linear4bitImpl>(proj)) p->quantize_weights(w);
    if (auto p = std::dynamic_pointer_cast<Linear8bitImpl>(proj)) p->quantize_weights(w);
    if (auto p = std::dynamic_pointer_cast<Embedding4bitImpl>(emb)) p->quantize_weights(e);
    if (auto p = std::dynamic_pointer_cast<Embedding8bitImpl>(emb)) p->quantize_weights(e);
  }
  torch::Tensor forward(const torch::Tensor& idx) {
    torch::Tensor h;
    if (auto p = std::dynamic_pointer_cast<Embedding4bitImpl>(emb)) h = p->forward(idx);
    if (auto p = std::dynamic_pointer_cast<Embedding8bitImpl>(emb)) h = p->forward(idx);
    return head->forward(msbnb::nn::test::forward(proj, h)) * scale;
  }
  std::shared_ptr<torch::nn::Module> block, proj, emb;
  torch::nn::Linear head{nullptr};
  torch::Tensor scale;
};
TORCH_MODULE(Net);

Net make_net(const Fmt& f, bool bias, uint64_t seed) {
  torch::manual_seed(seed);
  Net n(f, bias);
  n->quantize(torch::randn({172, 100}), torch::randn({11, 100}));
  return n;
}

std::vector<std::string> keys_of(const NamedTensors& sd) {
  std::vector<std::string> k;
  for (const auto& [name, t] : sd) k.push_back(name);
  return k;
}

void expect_same_state(const NamedTensors& a, const NamedTensors& b) {
  ASSERT_EQ(keys_of(a), keys_of(b));
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(same_bytes(a[i].second, b[i].second)) << a[i].first;
}

TEST(NnStateDict, SaveLoadRoundTripEveryFormat) {
  for (const Fmt& f : all_formats()) {
    for (bool bias : {true, false}) {
      SCOPED_TRACE(f.name() + " bias=" + std::to_string(bias));
      Net a = make_net(f, bias, kSeed);
      const NamedTensors sd = quantized_state_dict(*a);
      Net b = make_net(f, bias, kSeed + 1);  // other weights
      const torch::Tensor idx = torch::tensor({{0, 3, 10}, {7, 7, 1}});
      torch::NoGradGuard no_grad;
      ASSERT_FALSE(torch::equal(a->forward(idx), b->forward(idx)));
      const LoadReport r = load_quantized_state_dict(*b, sd);
      EXPECT_TRUE(r.missing_keys.empty());
      EXPECT_TRUE(r.unexpected_keys.empty());
      EXPECT_EQ(r.loaded_keys.size(), sd.size());
      EXPECT_TRUE(torch::equal(a->forward(idx), b->forward(idx)));
      expect_same_state(quantized_state_dict(*b), sd);
      // And once more through clones of the loaded layers (packed weights rebuilt over copies).
      for (const auto& [child, prefix] : {std::pair{b->proj, std::string("block.proj.")}, {b->emb, "emb."}}) {
        NamedTensors want;
        for (const auto& [k, t] : sd)
          if (k.rfind(prefix, 0) == 0) want.emplace_back(k.substr(prefix.size()), t);
        expect_same_state(quantized_state_dict(*child->clone()), want);
      }
    }
  }
}

TEST(NnStateDict, BitsandbytesKeyLayout) {
  {
    Net n = make_net({"nf4", true}, true, kSeed);
    const NamedTensors sd = quantized_state_dict(*n);
    // Python's state_dict order: own parameters, own buffers, then the children in order.
    const std::vector<std::string> want = {"scale",
                                           "block.proj.weight",
                                           "block.proj.bias",
                                           "block.proj.weight.absmax",
                                           "block.proj.weight.quant_map",
                                           "block.proj.weight.nested_absmax",
                                           "block.proj.weight.nested_quant_map",
                                           "block.proj.weight.quant_state.bitsandbytes__nf4",
                                           "head.weight",
                                           "head.bias",
                                           "emb.weight",
                                           "emb.weight.absmax",
                                           "emb.weight.quant_map",
                                           "emb.weight.nested_absmax",
                                           "emb.weight.nested_quant_map",
                                           "emb.weight.quant_state.bitsandbytes__nf4"};
    ASSERT_EQ(keys_of(sd), want);
    std::map<std::string, torch::Tensor> m(sd.begin(), sd.end());
    for (const auto& k : want) ASSERT_TRUE(m.count(k)) << k;
    const int64_t n_el = 172 * 100, blocks = (n_el + 63) / 64;
    EXPECT_EQ(m["block.proj.weight"].scalar_type(), torch::kUInt8);
    EXPECT_EQ(m["block.proj.weight"].sizes(), (std::vector<int64_t>{n_el / 2, 1}));
    EXPECT_EQ(m["block.proj.weight.absmax"].scalar_type(), torch::kUInt8);
    EXPECT_EQ(m["block.proj.weight.absmax"].sizes(), (std::vector<int64_t>{blocks}));
    EXPECT_EQ(m["block.proj.weight.quant_map"].sizes(), (std::vector<int64_t>{16}));
    EXPECT_EQ(m["block.proj.weight.nested_absmax"].sizes(), (std::vector<int64_t>{(blocks + 255) / 256}));
    EXPECT_EQ(m["block.proj.weight.nested_quant_map"].sizes(), (std::vector<int64_t>{256}));
    EXPECT_EQ(m["block.proj.bias"].scalar_type(), torch::kFloat32);
    const torch::Tensor js = m["block.proj.weight.quant_state.bitsandbytes__nf4"];
    const std::string json(reinterpret_cast<const char*>(js.data_ptr<uint8_t>()),
                           static_cast<size_t>(js.numel()));
    EXPECT_EQ(
        json.rfind(
            "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [172, 100], "
            "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": ",
            0),
        0u)
        << json;
  }
  {
    Net n = make_net({"int8", false, true, 6.0}, true, kSeed);
    std::map<std::string, torch::Tensor> m;
    for (const auto& [k, t] : quantized_state_dict(*n)) m[k] = t;
    EXPECT_EQ(m["block.proj.weight"].scalar_type(), torch::kInt8);
    EXPECT_EQ(m["block.proj.weight"].sizes(), (std::vector<int64_t>{172, 100}));
    EXPECT_EQ(m["block.proj.SCB"].scalar_type(), torch::kFloat32);
    EXPECT_EQ(m["block.proj.SCB"].sizes(), (std::vector<int64_t>{172}));
    EXPECT_EQ(m["block.proj.weight_format"].scalar_type(), torch::kUInt8);
    EXPECT_EQ(m["block.proj.weight_format"].dim(), 0);
    EXPECT_EQ(m["block.proj.weight_format"].item<int>(), 0);
    EXPECT_EQ(m["emb.SCB"].sizes(), (std::vector<int64_t>{11}));
  }
  {
    Net n = make_net({"int4", true, false}, false, kSeed);
    std::map<std::string, torch::Tensor> m;
    for (const auto& [k, t] : quantized_state_dict(*n)) m[k] = t;
    EXPECT_EQ(m["block.proj.weight"].sizes(), (std::vector<int64_t>{172, 50}));
    EXPECT_EQ(m["block.proj.weight.scale"].scalar_type(), torch::kUInt8);  // double-quantized
    EXPECT_EQ(m["block.proj.weight.zero_point"].sizes(), (std::vector<int64_t>{172, 1}));
    EXPECT_TRUE(m.count("block.proj.weight.nested_absmax"));
    const torch::Tensor js = m["block.proj.weight.quant_state.msbnb__int4"];
    const std::string json(reinterpret_cast<const char*>(js.data_ptr<uint8_t>()),
                           static_cast<size_t>(js.numel()));
    EXPECT_EQ(
        json.rfind(
            "{\"quant_type\": \"int4\", \"blocksize\": 128, \"dtype\": \"float32\", \"shape\": [172, 100], "
            "\"symmetric\": false, \"nested_blocksize\": 256",
            0),
        0u)
        << json;
    EXPECT_FALSE(m.count("block.proj.bias"));
  }
}

TEST(NnStateDict, WeightDtypeIsRecordedAndKept) {
  torch::manual_seed(kSeed);
  Linear4bit m(Linear4bitOptions(64, 32).quant_type("fp4").compress_statistics(false));
  m->quantize_weights(torch::randn({32, 64}).to(torch::kBFloat16));
  const NamedTensors sd = quantized_state_dict(*m);
  const torch::Tensor js = sd.back().second;
  const std::string json(reinterpret_cast<const char*>(js.data_ptr<uint8_t>()),
                         static_cast<size_t>(js.numel()));
  EXPECT_EQ(json,
            "{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [32, 64]}");
  Linear4bit n(Linear4bitOptions(64, 32).quant_type("fp4").compress_statistics(false));
  load_quantized_state_dict(*n, sd);
  expect_same_state(quantized_state_dict(*n), sd);
  expect_same_state(quantized_state_dict(*n->clone()), sd);
}

// ---------------------------------------------------------------------------------------------
// Hostile and mismatched state dicts

NamedTensors replace(NamedTensors sd, const std::string& key, const torch::Tensor& t) {
  for (auto& [k, v] : sd)
    if (k == key) v = t;
  return sd;
}
NamedTensors without(NamedTensors sd, const std::string& key) {
  NamedTensors out;
  for (auto& [k, v] : sd)
    if (k != key) out.emplace_back(k, v);
  return out;
}
torch::Tensor json_tensor(const std::string& s) {
  torch::Tensor t = torch::empty({static_cast<int64_t>(s.size())}, torch::kUInt8);
  std::memcpy(t.data_ptr<uint8_t>(), s.data(), s.size());
  return t;
}

TEST(NnStateDict, MissingAndUnexpectedKeys) {
  Net a = make_net({"nf4", true}, true, kSeed);
  const NamedTensors sd = quantized_state_dict(*a);
  Net b = make_net({"nf4", true}, true, kSeed + 1);
  const NamedTensors before = quantized_state_dict(*b);
  NamedTensors bad = without(sd, "block.proj.weight.absmax");
  bad.emplace_back("block.extra", torch::zeros({1}));
  expect_error([&] { load_quantized_state_dict(*b, bad); },
               {"missing keys [block.proj.weight.absmax]", "unexpected keys [block.extra]"});
  expect_same_state(quantized_state_dict(*b), before);  // strict: nothing loaded
  const LoadReport r = load_quantized_state_dict(*b, bad, /*strict=*/false);
  EXPECT_EQ(r.missing_keys, std::vector<std::string>{"block.proj.weight.absmax"});
  EXPECT_EQ(r.unexpected_keys, std::vector<std::string>{"block.extra"});
  // The incomplete layer is left as it was; everything else is loaded.
  const NamedTensors after = quantized_state_dict(*b);
  std::map<std::string, torch::Tensor> m(after.begin(), after.end()), o(before.begin(), before.end()),
      s(sd.begin(), sd.end());
  EXPECT_TRUE(same_bytes(m["block.proj.weight"], o["block.proj.weight"]));
  EXPECT_TRUE(same_bytes(m["head.weight"], s["head.weight"]));
  EXPECT_TRUE(same_bytes(m["emb.weight"], s["emb.weight"]));
  NamedTensors dup = sd;
  dup.push_back(sd[0]);
  expect_error([&] { load_quantized_state_dict(*b, dup); }, {"sd", "once", sd[0].first});
}

TEST(NnStateDict, OtherFormatIsRefused) {
  Net nf4 = make_net({"nf4", false}, true, kSeed);
  Net fp4 = make_net({"fp4", false}, true, kSeed);
  Net nf4dq = make_net({"nf4", true}, true, kSeed);
  Net i8 = make_net({"int8", false, true, 6.0}, true, kSeed);
  Net i4 = make_net({"int4", false}, true, kSeed);
  expect_error([&] { load_quantized_state_dict(*nf4, quantized_state_dict(*fp4)); },
               {"block.proj.weight.quant_state.bitsandbytes__fp4", "fp4", "expected nf4", "block.proj"});
  expect_error([&] { load_quantized_state_dict(*nf4, quantized_state_dict(*fp4), false); },
               {"bitsandbytes__fp4", "expected nf4"});
  expect_error([&] { load_quantized_state_dict(*i8, quantized_state_dict(*nf4)); },
               {"bitsandbytes__nf4", "expected int8"});
  expect_error([&] { load_quantized_state_dict(*nf4, quantized_state_dict(*i8)); },
               {"block.proj.SCB", "int8", "expected nf4"});
  expect_error([&] { load_quantized_state_dict(*i4, quantized_state_dict(*nf4)); },
               {"bitsandbytes__nf4", "expected int4"});
  // Same format, other double quantization or blocksize: the JSON says so.
  expect_error([&] { load_quantized_state_dict(*nf4, quantized_state_dict(*nf4dq)); }, {"missing keys"});
  const NamedTensors sd = quantized_state_dict(*nf4);
  const std::string jk = "block.proj.weight.quant_state.bitsandbytes__nf4";
  expect_error(
      [&] {
        load_quantized_state_dict(
            *nf4, replace(sd, jk,
                          json_tensor("{\"quant_type\": \"nf4\", \"blocksize\": 128, \"dtype\": \"float32\", "
                                      "\"shape\": [172, 100]}")));
      },
      {jk, "blocksize", "expected 64", "got 128"});
  expect_error(
      [&] {
        load_quantized_state_dict(
            *nf4, replace(sd, jk,
                          json_tensor("{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"float32\", "
                                      "\"shape\": [172, 100]}")));
      },
      {jk, "quant_type", "expected \"nf4\"", "got \"fp4\""});
  expect_error(
      [&] {
        load_quantized_state_dict(
            *nf4, replace(sd, jk,
                          json_tensor("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", "
                                      "\"shape\": [172, 100], \"nested_blocksize\": 256, \"nested_dtype\": "
                                      "\"float32\", \"nested_offset\": 0.5}")));
      },
      {jk, "expected no double quantization", "compress_statistics=false"});
}

TEST(NnStateDict, HostileTensorsAndJsonAreRefused) {
  Net n = make_net({"nf4", true}, true, kSeed);
  const NamedTensors sd = quantized_state_dict(*n);
  const NamedTensors before = quantized_state_dict(*n);
  const std::string p = "block.proj.";
  const std::string jk = p + "weight.quant_state.bitsandbytes__nf4";
  auto load = [&](const NamedTensors& s) { load_quantized_state_dict(*n, s); };
  auto json = [&](const std::string& j) { return replace(sd, jk, json_tensor(j)); };
  const std::string head = "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", ";
  const std::string nested =
      ", \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.5}";
  // Tensors: dtype, shape, element counts.
  expect_error(
      [&] {
        load(replace(sd, p + "weight", torch::zeros({8599, 1}, torch::kUInt8)));
      },
      {p + "weight", "expected shape [8600, 1]", "[8599, 1]"});
  expect_error(
      [&] {
        load(replace(sd, p + "weight", torch::zeros({8600, 1}, torch::kInt8)));
      },
      {p + "weight", "expected dtype Byte", "Char"});
  expect_error([&] { load(replace(sd, p + "weight.absmax", torch::zeros({268}, torch::kFloat32))); },
               {p + "weight.absmax", "Byte", "Float"});
  expect_error([&] { load(replace(sd, p + "weight.absmax", torch::zeros({270}, torch::kUInt8))); },
               {p + "weight.absmax", "expected shape [269]", "[270]"});
  expect_error([&] { load(replace(sd, p + "weight.nested_absmax", torch::full({3}, 1.0f))); },
               {p + "weight.nested_absmax", "expected shape [2]", "[3]"});
  expect_error([&] { load(replace(sd, p + "weight.nested_absmax", torch::full({2}, NAN))); },
               {p + "weight.nested_absmax", "finite"});
  expect_error([&] { load(replace(sd, p + "weight.quant_map", torch::linspace(-1, 1, 16))); },
               {p + "weight.quant_map", "nf4 code table"});
  expect_error([&] { load(replace(sd, p + "weight.nested_quant_map", torch::linspace(-1, 1, 256))); },
               {p + "weight.nested_quant_map", "dynamic"});
  expect_error([&] { load(replace(sd, p + "bias", torch::zeros({171}))); }, {p + "bias", "[172]", "[171]"});
  expect_error([&] { load(replace(sd, p + "bias", torch::zeros({172}, torch::kInt32))); },
               {p + "bias", "Int"});
  expect_error(
      [&] {
        load(replace(sd, "head.weight", torch::zeros({3, 171})));
      },
      {"head.weight", "[3, 172]", "[3, 171]"});
  expect_error(
      [&] {
        load(replace(sd, "head.weight", torch::zeros({3, 172}, torch::kDouble)));
      },
      {"head.weight", "Float", "Double"});
  // JSON: malformed, wrong types, missing / extra / duplicate keys, shapes that do not match or
  // overflow, offsets that are not finite.
  expect_error([&] { load(json("{\"quant_type\": \"nf4\", ")); }, {jk, "JSON", "parse error"});
  expect_error([&] { load(json("[1, 2]")); }, {jk, "object", "array"});
  expect_error([&] { load(json("\xff\xfe")); }, {jk, "JSON"});
  expect_error([&] { load(json(head + "\"shape\": [172, 100]}")); }, {jk, "double quantization"});
  expect_error([&] { load(json(head + "\"shape\": [100, 172]" + nested)); },
               {jk, "shape", "[172, 100]", "[100, 172]"});
  expect_error([&] { load(json(head + "\"shape\": [172]" + nested)); }, {jk, "shape", "[172]"});
  expect_error([&] { load(json(head + "\"shape\": [1099511627776, 1099511627776]" + nested)); },
               {jk, "shape"});
  expect_error([&] { load(json(head + "\"shape\": [18446744073709551615, 1]" + nested)); }, {jk, "shape"});
  expect_error([&] { load(json(head + "\"shape\": [172, -100]" + nested)); }, {jk, "shape", "-100"});
  expect_error([&] { load(json(head + "\"shape\": [172, 100.5]" + nested)); },
               {jk, "shape", "integer", "100.5"});
  expect_error([&] { load(json(head + "\"shape\": \"172x100\"" + nested)); }, {jk, "shape"});
  expect_error(
      [&] {
        load(
            json("{\"quant_type\": \"nf4\", \"blocksize\": \"64\", \"dtype\": \"float32\", \"shape\": "
                 "[172, 100]" +
                 nested));
      },
      {jk, "blocksize", "integer", "\"64\""});
  expect_error(
      [&] {
        load(
            json("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"int8\", \"shape\": [172, "
                 "100]" +
                 nested));
      },
      {jk, "dtype", "float32", "int8"});
  expect_error(
      [&] { load(json("{\"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [172, 100]" + nested)); },
      {jk, "quant_type"});
  expect_error([&] { load(json(head + "\"shape\": [172, 100], \"extra\": 1" + nested)); }, {jk, "extra"});
  expect_error([&] { load(json(head + "\"shape\": [172, 100], \"shape\": [172, 100]" + nested)); },
               {jk, "shape", "twice"});
  expect_error(
      [&] {
        load(json(head + "\"shape\": [172, 100], \"nested_blocksize\": 128, \"nested_dtype\": "
                         "\"float32\", \"nested_offset\": 0.5}"));
      },
      {jk, "nested_blocksize", "256", "128"});
  expect_error(
      [&] {
        load(json(head + "\"shape\": [172, 100], \"nested_blocksize\": 256, \"nested_dtype\": "
                         "\"float32\", \"nested_offset\": NaN}"));
      },
      {jk, "JSON"});
  expect_error(
      [&] {
        load(json(head + "\"shape\": [172, 100], \"nested_blocksize\": 256, \"nested_dtype\": "
                         "\"float32\", \"nested_offset\": 1e39}"));
      },
      {jk, "nested_offset", "finite float32"});
  expect_error(
      [&] {
        load(json(head + "\"shape\": [172, 100], \"nested_blocksize\": 256, \"nested_dtype\": "
                         "\"float32\"}"));
      },
      {jk, "nested_offset"});
  expect_error([&] { load(replace(sd, jk, torch::zeros({3}, torch::kFloat32))); }, {jk, "uint8"});
  // Nothing was changed by any refused load.
  expect_same_state(quantized_state_dict(*n), before);
}

TEST(NnStateDict, HostileInt8AndInt4AreRefused) {
  {
    Net n = make_net({"int8", false, true, 6.0}, true, kSeed);
    const NamedTensors sd = quantized_state_dict(*n);
    auto load = [&](const NamedTensors& s) { load_quantized_state_dict(*n, s); };
    const std::string p = "block.proj.";
    expect_error(
        [&] {
          load(replace(sd, p + "weight", torch::zeros({172, 100}, torch::kUInt8)));
        },
        {p + "weight", "Char", "Byte"});
    expect_error([&] { load(replace(sd, p + "SCB", torch::zeros({171}))); }, {p + "SCB", "[172]", "[171]"});
    expect_error([&] { load(replace(sd, p + "SCB", torch::full({172}, -1.0f))); }, {p + "SCB", ">= 0", "-1"});
    expect_error([&] { load(replace(sd, p + "SCB", torch::full({172}, INFINITY))); }, {p + "SCB", "finite"});
    expect_error([&] { load(replace(sd, p + "weight_format", torch::ones({}, torch::kUInt8))); },
                 {p + "weight_format", "expected 0", "got 1"});
    expect_error([&] { load(replace(sd, p + "weight_format", torch::zeros({2}, torch::kUInt8))); },
                 {p + "weight_format", "scalar"});
    expect_error(
        [&] {
          load(replace(sd, "emb.weight", torch::zeros({11, 99}, torch::kInt8)));
        },
        {"emb.weight", "[11, 100]", "[11, 99]"});
  }
  {
    Net n = make_net({"int4", false, false}, true, kSeed);
    const NamedTensors sd = quantized_state_dict(*n);
    auto load = [&](const NamedTensors& s) { load_quantized_state_dict(*n, s); };
    const std::string p = "block.proj.";
    expect_error(
        [&] {
          load(replace(sd, p + "weight.zero_point", torch::full({172, 1}, 16, torch::kUInt8)));
        },
        {p + "weight.zero_point", "[0, 15]", "16"});
    expect_error(
        [&] {
          load(replace(sd, p + "weight.scale", torch::zeros({172, 2})));
        },
        {p + "weight.scale", "[172, 1]"});
    const std::string jk = p + "weight.quant_state.msbnb__int4";
    expect_error(
        [&] {
          load(replace(
              sd, jk,
              json_tensor("{\"quant_type\": \"int4\", \"blocksize\": 128, \"dtype\": \"float32\", \"shape\": "
                          "[172, 100], \"symmetric\": true}")));
        },
        {jk, "symmetric", "expected false", "got true"});
    expect_error(
        [&] {
          load(replace(
              sd, jk,
              json_tensor("{\"quant_type\": \"int4\", \"blocksize\": 128, \"dtype\": \"float32\", \"shape\": "
                          "[172, 100]}")));
        },
        {jk, "symmetric"});
    // msbnb's own int4 JSON goes through the nn layer's parser: the same refusals.
    const std::string ok =
        "{\"quant_type\": \"int4\", \"blocksize\": 128, \"dtype\": \"float32\", \"shape\": [172, 100]";
    expect_error(
        [&] { load(replace(sd, jk, json_tensor(ok + ", \"symmetric\": false, \"symmetric\": false}"))); },
        {jk, "once", "symmetric"});
    expect_error([&] { load(replace(sd, jk, json_tensor(ok + ", \"symmetric\": 0}"))); },
                 {jk, "symmetric", "true or false"});
    expect_error([&] { load(replace(sd, jk, json_tensor(ok + ", \"symmetric\": false, \"x\": 1}"))); },
                 {jk, "\"x\""});
    expect_error([&] { load(replace(sd, jk, json_tensor("{\"quant_type\": \"int4\", "))); },
                 {jk, "parse error"});
    expect_error(
        [&] {
          load(replace(sd, jk,
                       json_tensor("{\"quant_type\": \"int4\", \"blocksize\": 64, \"dtype\": \"float32\", "
                                   "\"shape\": [172, 100], \"symmetric\": false}")));
        },
        {jk, "blocksize", "expected 128", "got 64"});
    expect_error(
        [&] {
          load(replace(sd, jk, json_tensor(ok + ", \"symmetric\": false, \"nested_blocksize\": 256}")));
        },
        {jk, "nested_dtype"});
  }
}

}  // namespace
}  // namespace msbnb::nn::test
