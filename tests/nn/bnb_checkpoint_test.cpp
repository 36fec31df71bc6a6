// Bit compatibility with bitsandbytes 0.50.2: its QuantState.as_dict(packed=True) of a fixed
// weight, embedded below, equals what Linear4bit quantizes and saves (codes, absmax, nested
// statistics, the JSON byte for byte), and loads back to identical bytes.
//
// The constants were printed by this script (torch 2.15.0+cu132, bitsandbytes 0.50.2, CPU):
//   import torch, bitsandbytes.functional as F
//   out, inf = 16, 96
//   i = torch.arange(out * inf, dtype=torch.int64)
//   w = (((37 * i) % 101 - 50).to(torch.float32) / 64).reshape(out, inf)   # exact in float32
//   for qt, cs in (("nf4", True), ("fp4", False)):
//       q, s = F.quantize_4bit(w, blocksize=64, compress_statistics=cs, quant_type=qt)
//       print(q.view(torch.uint8).numpy().tobytes().hex())                  # weight
//       for k, v in s.as_dict(packed=True).items(): ...                      # hex, or the JSON text
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <map>

#include "../../src/nn/common.h"  // python_float_repr (private to the library)
#include "nn/nn_test_util.h"

namespace msbnb::nn::test {
namespace {

// clang-format off
// nf4 compress_statistics=True
const char* kNF4Weight =
    "04c16e29f3b05d17e29f3c05d18e2af4c16e18e3b05d17e29f3b05d18e2af4c16d18e3b04c17e29f3b05d17e2af4c06d"
    "18e2a04c16e29f3b05d17e29f3c05d18e2af4c16e18e3b05d17e29f3b05d18e2af4c16d18e3b04c17e29f3b05d17e2af"
    "4c06d18e2a04c16e29f3b05d17e29f3c05d18e2af4c16e18e3b05d17e29f3b05d18e2af4c16d18e3b04c17e29f3b05d1"
    "7e2af4c06d18e2a04c16e29f3b05d17e29f3c05d18e2af4c16e18e3b05d17e29f3b05d18e2af4c16d18e3b04c17e29f3"
    "b05d17e2af4c06d18e2a04c16e29f3b05d17e29f3c05d18e2af4c16e18e3b05d17e29f3b05d18e2af4c16d18e3b04c17"
    "e29f3b05d17e2af4c06d18e2a04c16e29f3b05d17e29f3c05d18e2af4c16e18e3b05d17e29f3b05d18e2af4c16d18e3b"
    "04c17e29f3b05d17e2af4c06d18e2a04c16e29f3b05d17e29f3c05d18e2af4c16e19f3b05d17e29f3b05d18e2af4c06e"
    "18e3b04d17e29f3b05d17e2af4c06d18e2a04c16e29f3b05d17e29f3c05d18e2af4c16e18e3b05d17e29f3b05d18e2af"
    "4c16d18e3b04c17e29f3b05d17e2af4c06d18e2a04c16e29f3b05d17e29f3c05d18e2af4c16e18e3b05d17e29f3b05d1"
    "8e2af4c16d18e3b04c17e29f3b05d17e2af4c06d18e2a04c16e29f3b05d17e29f3c05d18e2af4c16e18e3b05d17e29f3"
    "b05d18e2af4c16d18e3b04c17e29f3b05d17e2af4c06d18e2a04c16e29f3b05d17e29f3c05d18e2af4c16e18e3b05d17"
    "e29f3b05d18e2af4c16d18e3b04c17e29f3b05d17e2af4c06d18e2a04c16e29f3b05d17e29f3c05d18e2af4c16e18e3b"
    "05d17e29f3b05d18e2af4c16d18e3b04c17e29f3b05d17e2af4c06d18e2a04c16e29f3b05d17e29f3c05d18e2af4c16e"
    "18e3b05d17e29f3b05d18e2af4c16d18e3b04c17e29f3b05d17e2af4c06d18e2a04c16e29f3b05d17e29f3c05d18e2af"
    "4c16e19f3b05d17e29f3b05d18e2af4c06e18e3b04d17e29f3b05d17e2af4c06d18e2a04c16e29f3b05d17e29f3c05d1"
    "8e2af4c16e18e3b05d17e29f3b05d18e2af4c16d18e3b04c17e29f3b05d17e2af4c06d18e2a04c16e29f3b05d17e29f3";
const char* kNF4_absmax =
    "bbbbbbbbbbbbbbbbbbbb00bbbbbbbbbbbbbbbbbbbb00bbbb";  // torch.uint8 (24,)
const char* kNF4_nested_absmax =
    "c0aa6a3c";  // torch.float32 (1,)
const char* kNF4_json_nf4 = R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [16, 96], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.7799479365348816})";
// fp4 compress_statistics=False
const char* kFP4Weight =
    "bf5a92a63c4be5a02d63c4be2a12d73f5a92a63d4bf5a92d63c4be5a12d73c5be2a63d4bf5a92d63c4be5a12d73c5be2"
    "a12d7bf5a92a63c4be5a02d63c4be2a12d73f5a92a63d4bf5a92d63c4be5a12d73c5be2a63d4bf5a92d63c4be5a12d73"
    "c5be2a12d7bf5a92a63c4be5a02d63c4be2a12d73f5a92a63d4bf5a92d63c4be5a12d73c5be2a63d4bf5a92d63c4be5a"
    "12d73c5be2a12d7bf5a92a63c4be5a02d63c4be2a12d73f5a92a63d4bf5a92d63c4be5a12d73c5be2a63d4bf5a92d63c"
    "4be5a12d73c5be2a12d7bf5a92a63c4be5a02d63c4be2a12d73f5a92a63d4bf5a92d63c4be5a12d73c5be2a63d4bf5a9"
    "2d63c4be5a12d73c5be2a12d7bf5a92a63c4be5a02d63c4be2a12d73f5a92a63d4bf5a92d63c4be5a12d73c5be2a63d4"
    "bf5a92d63c4be5a12d73c5be2a12d7bf5a92a63c4be5a02d63c4be2a12d73f5a92a63d4bf5a92d63c4be2a12d73c5be2"
    "a63d4bf5a92a63c4be5a12d73c5be2a12d7bf5a92a63c4be5a02d63c4be2a12d73f5a92a63d4bf5a92d63c4be5a12d73"
    "c5be2a63d4bf5a92d63c4be5a12d73c5be2a12d7bf5a92a63c4be5a02d63c4be2a12d73f5a92a63d4bf5a92d63c4be5a"
    "12d73c5be2a63d4bf5a92d63c4be5a12d73c5be2a12d7bf5a92a63c4be5a02d63c4be2a12d73f5a92a63d4bf5a92d63c"
    "4be5a12d73c5be2a63d4bf5a92d63c4be5a12d73c5be2a12d7bf5a92a63c4be5a02d63c4be2a12d73f5a92a63d4bf5a9"
    "2d63c4be5a12d73c5be2a63d4bf5a92d63c4be5a12d73c5be2a12d7bf5a92a63c4be5a02d63c4be2a12d73f5a92a63d4"
    "bf5a92d63c4be5a12d73c5be2a63d4bf5a92d63c4be5a12d73c5be2a12d7bf5a92a63c4be5a02d63c4be2a12d73f5a92"
    "a63d4bf5a92d63c4be5a12d73c5be2a63d4bf5a92d63c4be5a12d73c5be2a12d7bf5a92a63c4be5a02d63c4be2a12d73"
    "f5b92a63d4bf5a92d63c4be2a12d73c5be2a63d4bf5a92a63c4be5a12d73c5be2a12d7bf5a92a63c4be5a02d63c4be2a"
    "12d73f5a92a63d4bf5a92d63c4be5a12d73c5be2a63d4bf5a92d63c4be5a12d73c5be2a12d7bf5a92a63c4be5a02d63c";
const char* kFP4_absmax =
    "0000483f0000483f0000483f0000483f0000483f0000483f0000483f0000483f0000483f0000483f0000443f0000483f"
    "0000483f0000483f0000483f0000483f0000483f0000483f0000483f0000483f0000483f0000443f0000483f0000483f";  // torch.float32 (24,)
const char* kFP4_json_fp4 = R"({"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [16, 96]})";

// clang-format on

torch::Tensor from_hex(const char* hex, torch::Dtype dtype) {
  const std::string h(hex);
  torch::Tensor b = torch::empty({static_cast<int64_t>(h.size() / 2)}, torch::kUInt8);
  for (size_t i = 0; i < h.size() / 2; ++i)
    b.data_ptr<uint8_t>()[i] = static_cast<uint8_t>(std::stoi(h.substr(2 * i, 2), nullptr, 16));
  return b.view(dtype);
}

torch::Tensor json_tensor(const std::string& s) {
  torch::Tensor t = torch::empty({static_cast<int64_t>(s.size())}, torch::kUInt8);
  std::memcpy(t.data_ptr<uint8_t>(), s.data(), s.size());
  return t;
}

std::string json_of(const torch::Tensor& t) {
  return std::string(reinterpret_cast<const char*>(t.data_ptr<uint8_t>()), static_cast<size_t>(t.numel()));
}

torch::Tensor fixture_weight() {
  const torch::Tensor i = torch::arange(16 * 96, torch::kLong);
  return ((i * 37).remainder(101) - 50).to(torch::kFloat32).div(64).reshape({16, 96});
}

struct Case {
  std::string qt;
  bool dq;
  NamedTensors bnb;  // bitsandbytes' state dict of the layer (no bias)
};

std::vector<Case> cases() {
  const int64_t n = 16 * 96;
  Case nf4{"nf4", true, {}};
  nf4.bnb = {{"weight", from_hex(kNF4Weight, torch::kUInt8).reshape({n / 2, 1})},
             {"weight.absmax", from_hex(kNF4_absmax, torch::kUInt8)},
             {"weight.quant_map",
              quantize_4bit(torch::zeros({2}), Quantize4bitOptions().quant_type("nf4")).state.code},
             {"weight.nested_absmax", from_hex(kNF4_nested_absmax, torch::kFloat32)},
             {"weight.nested_quant_map", create_dynamic_map()},
             {"weight.quant_state.bitsandbytes__nf4", json_tensor(kNF4_json_nf4)}};
  Case fp4{"fp4", false, {}};
  fp4.bnb = {{"weight", from_hex(kFP4Weight, torch::kUInt8).reshape({n / 2, 1})},
             {"weight.absmax", from_hex(kFP4_absmax, torch::kFloat32)},
             {"weight.quant_map",
              quantize_4bit(torch::zeros({2}), Quantize4bitOptions().quant_type("fp4")).state.code},
             {"weight.quant_state.bitsandbytes__fp4", json_tensor(kFP4_json_fp4)}};
  return {nf4, fp4};
}

Linear4bit layer(const Case& c) {
  return Linear4bit(Linear4bitOptions(96, 16).bias(false).quant_type(c.qt).compress_statistics(c.dq));
}

TEST(NnBitsandbytes, QuantizedStateEqualsBitsandbytes) {
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.qt);
    Linear4bit m = layer(c);
    m->quantize_weights(fixture_weight());
    const NamedTensors sd = quantized_state_dict(*m);
    ASSERT_EQ(sd.size(), c.bnb.size());
    for (size_t i = 0; i < sd.size(); ++i) {
      EXPECT_EQ(sd[i].first, c.bnb[i].first);
      if (sd[i].first.find("quant_state") != std::string::npos)
        EXPECT_EQ(json_of(sd[i].second), json_of(c.bnb[i].second));
      else
        EXPECT_TRUE(same_bytes(sd[i].second, c.bnb[i].second)) << sd[i].first;
    }
  }
}

TEST(NnBitsandbytes, LoadsBitsandbytesStateAndSavesItBack) {
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.qt);
    Linear4bit m = layer(c);
    load_quantized_state_dict(*m, c.bnb);
    const NamedTensors sd = quantized_state_dict(*m);
    ASSERT_EQ(sd.size(), c.bnb.size());
    for (size_t i = 0; i < sd.size(); ++i)
      EXPECT_TRUE(same_bytes(sd[i].second, c.bnb[i].second)) << sd[i].first;
    Linear4bit ref = layer(c);
    ref->quantize_weights(fixture_weight());
    torch::NoGradGuard no_grad;
    const torch::Tensor x = torch::randn({3, 96});
    EXPECT_TRUE(torch::equal(m->forward(x), ref->forward(x)));
  }
}

TEST(NnBitsandbytes, JsonFloatsArePythonRepr) {
  // json.dumps(float) (Python's repr), values printed by Python 3.11.
  const std::vector<std::pair<double, std::string>> want = {
      {0.7799479365348816, "0.7799479365348816"},
      {0.0, "0.0"},
      {-0.0, "-0.0"},
      {1.0, "1.0"},
      {1e-05, "1e-05"},
      {0.0001, "0.0001"},
      {1.5e-05, "1.5e-05"},
      {123456789.0, "123456789.0"},
      {1e16, "1e+16"},
      {1e15, "1000000000000000.0"},
      {2.5e-300, "2.5e-300"},
      {1.7976931348623157e308, "1.7976931348623157e+308"},
      {-3.25, "-3.25"},
      {static_cast<double>(0.1f), "0.10000000149011612"},
      {5e-324, "5e-324"},
      {100.0, "100.0"},
      {0.001953125, "0.001953125"}};
  for (const auto& [v, s] : want) EXPECT_EQ(detail::python_float_repr(v), s) << v;
}

}  // namespace
}  // namespace msbnb::nn::test
