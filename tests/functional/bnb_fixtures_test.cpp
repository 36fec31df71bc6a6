// Bit-compatibility with bitsandbytes 0.50.2 (CPU), against fixtures that
// tools/make_bnb_fixtures.py wrote from the real library (tests/fixtures/bnb/).
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "msbnb/msbnb.h"

namespace {

using nlohmann::json;

json load(const std::string& name) {
  const std::string path = std::string(MSBNB_FIXTURES_DIR) + "/bnb/" + name;
  std::ifstream f(path);
  if (!f) throw std::runtime_error("cannot open fixture " + path);
  return json::parse(f);
}

torch::Tensor floats(const json& j) {
  std::vector<float> v;
  for (const auto& e : j) v.push_back(e.get<float>());
  return torch::tensor(v, torch::kFloat32);
}

template <typename T>
torch::Tensor ints(const json& j, torch::ScalarType st) {
  std::vector<int64_t> v;
  for (const auto& e : j) v.push_back(e.get<int64_t>());
  return torch::tensor(v, torch::kInt64).to(st);
}

std::vector<int64_t> shape_of(const json& j) { return j.get<std::vector<int64_t>>(); }

torch::ScalarType dtype_of(const std::string& s) {
  if (s == "float16") return torch::kFloat16;
  if (s == "bfloat16") return torch::kBFloat16;
  return torch::kFloat32;
}

torch::Tensor input_of(const json& file, const json& c) {
  const json& in = file["inputs"][c["input"].get<std::string>()];
  return floats(in["values"]).reshape(shape_of(in["shape"])).to(dtype_of(in["dtype"].get<std::string>()));
}

// Floats within `ulps` units in the last place (bit patterns of same-sign values).
bool within_ulps(float a, float b, int ulps) {
  int32_t ia, ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  return (a == b) || ((ia < 0) == (ib < 0) && std::abs(ia - ib) <= ulps);
}

TEST(Bitsandbytes, CodeMaps) {
  const json maps = load("maps.json")["maps"];
  EXPECT_TRUE(torch::equal(msbnb::create_dynamic_map(true), floats(maps["dynamic_signed"])));
  EXPECT_TRUE(torch::equal(msbnb::create_dynamic_map(false), floats(maps["dynamic_unsigned"])));
  const torch::Tensor normal = msbnb::create_normal_map(), expected = floats(maps["normal"]);
  // scipy's ndtri against our double-precision inverse CDF, each rounded to float32 once.
  for (int64_t i = 0; i < 256; ++i)
    EXPECT_TRUE(within_ulps(normal[i].item<float>(), expected[i].item<float>(), 1)) << i;
  const torch::Tensor nf4 = floats(maps["nf4"]), fp4 = floats(maps["fp4"]);
  for (int i = 0; i < 16; ++i) {
    EXPECT_EQ(msbnb::kernels::kCodeNF4[i], nf4[i].item<float>()) << i;
    EXPECT_EQ(msbnb::kernels::kCodeFP4[i], fp4[i].item<float>()) << i;  // -0 == +0 at index 8
  }
}

// One 4-bit case: our quantization against bitsandbytes', and our dequantize of its state.
void check_4bit_case(const json& file, const json& c) {
  SCOPED_TRACE(c["name"].get<std::string>());
  const json& p = c["params"];
  const json& o = c["outputs"];
  const torch::Tensor x = input_of(file, c);
  const bool nested = p["compress_statistics"].get<bool>();
  const auto q = msbnb::quantize_4bit(x, msbnb::Quantize4bitOptions()
                                             .quant_type(p["quant_type"].get<std::string>())
                                             .blocksize(p["blocksize"].get<int64_t>())
                                             .compress_statistics(nested));
  ASSERT_EQ(q.data.sizes().vec(), shape_of(o["packed_shape"]));
  EXPECT_TRUE(torch::equal(q.data.reshape({-1}), ints<uint8_t>(o["packed"], torch::kUInt8)))
      << "packed codes";

  // absmax: bitsandbytes stores its 1e-38 floor for an all-zero short last block, we store 0.
  const torch::Tensor raw = floats(o["absmax_raw"]);
  const torch::Tensor ours_raw =
      nested ? msbnb::quantize_4bit(x, msbnb::Quantize4bitOptions()
                                           .quant_type(p["quant_type"].get<std::string>())
                                           .blocksize(p["blocksize"].get<int64_t>()))
                   .state.absmax
             : q.state.absmax;
  EXPECT_TRUE(torch::equal(ours_raw, torch::where(raw <= 1e-38f, torch::zeros_like(raw), raw))) << "absmax";

  const torch::Tensor expected = floats(o["dequant"]).reshape(x.sizes());
  if (!nested) {
    EXPECT_TRUE(torch::equal(msbnb::dequantize_4bit(q.data, q.state).to(torch::kFloat32), expected))
        << "dequantize";
  } else {
    // Offset: torch's float32 cascade mean against our double mean, both rounded to float32.
    EXPECT_TRUE(within_ulps(q.state.offset.item<float>(), static_cast<float>(o["offset"].get<double>()), 2))
        << q.state.offset.item<float>() << " vs " << o["offset"].get<double>();
    // bitsandbytes' CPU quantize_blockwise picks codes through a 65536-point grid, not the
    // nearest code: ours are nearest, so each absmax is recovered at least as well as there.
    const torch::Tensor ours = msbnb::dequantize_blockwise(q.state.absmax, *q.state.state2) + q.state.offset;
    const torch::Tensor theirs = floats(o["nested_absmax_dequant"]);
    const torch::Tensor slack = 4 * std::numeric_limits<float>::epsilon() * raw.abs();
    EXPECT_TRUE(((ours - raw).abs() <= (theirs - raw).abs() + slack).all().item<bool>()) << "nested absmax";
  }
  // Checkpoint compatibility: our dequantize of bitsandbytes' own state gives its output exactly.
  msbnb::QuantState s;
  s.quant_type = p["quant_type"].get<std::string>();
  s.shape = shape_of(o["shape"]);
  s.dtype = x.scalar_type();
  s.blocksize = o["blocksize"].get<int64_t>();
  s.code = floats(o["code"]);
  if (nested) {
    s.absmax = ints<uint8_t>(o["absmax"], torch::kUInt8);
    s.offset = torch::tensor(static_cast<float>(o["offset"].get<double>()));
    auto s2 = std::make_shared<msbnb::QuantState>();
    s2->quant_type = "dynamic8";
    s2->shape = {s.absmax.numel()};
    s2->blocksize = o["nested_blocksize"].get<int64_t>();
    s2->absmax = floats(o["nested_absmax"]);
    s2->code = floats(o["nested_code"]);
    s.state2 = s2;
  } else {
    s.absmax = floats(o["absmax"]);
  }
  const torch::Tensor packed = ints<uint8_t>(o["packed"], torch::kUInt8).reshape(shape_of(o["packed_shape"]));
  EXPECT_TRUE(torch::equal(msbnb::dequantize_4bit(packed, s).to(torch::kFloat32), expected))
      << "dequantize of bitsandbytes' state";
}

TEST(Bitsandbytes, Quantize4bitFloat32) {
  const json f = load("q4_f32.json");
  for (const json& c : f["cases"]) check_4bit_case(f, c);
}

TEST(Bitsandbytes, Quantize4bitBlock4096) {
  const json f = load("q4_b4096.json");
  for (const json& c : f["cases"]) check_4bit_case(f, c);
}

TEST(Bitsandbytes, Quantize4bitHalfInputs) {
  const json f = load("q4_half.json");
  for (const json& c : f["cases"]) check_4bit_case(f, c);
}

// Ties on exact midpoints, the code values, +-0, +-1e-30, +-1e-45, an all-zero short block.
TEST(Bitsandbytes, Quantize4bitEdgeValues) {
  const json f = load("q4_edge.json");
  for (const json& c : f["cases"]) check_4bit_case(f, c);
}

TEST(Bitsandbytes, QuantizeBlockwiseDynamic) {
  const json f = load("q8_blockwise.json");
  for (const json& c : f["cases"]) {
    SCOPED_TRACE(c["name"].get<std::string>());
    const json& o = c["outputs"];
    const torch::Tensor x = input_of(f, c);
    const int64_t bs = o["blocksize"].get<int64_t>();
    const auto q = msbnb::quantize_blockwise(x, bs);
    EXPECT_TRUE(torch::equal(q.state.absmax, floats(o["absmax"]))) << "absmax";
    EXPECT_TRUE(torch::equal(q.state.code, floats(o["code"]))) << "code";
    // Their codes, our dequantize: the same floats.
    const torch::Tensor theirs_q = ints<uint8_t>(o["codes"], torch::kUInt8).reshape(x.sizes());
    const torch::Tensor theirs = msbnb::dequantize_blockwise(theirs_q, q.state);
    EXPECT_TRUE(torch::equal(theirs, floats(o["dequant"]).reshape(x.sizes()))) << "dequantize of their codes";
    // Ours are the nearest codes; theirs come from a 65536-point grid (see tools/README.md).
    const torch::Tensor ours = msbnb::dequantize_blockwise(q.data, q.state);
    const torch::Tensor slack =
        2 * std::numeric_limits<float>::epsilon() *
        q.state.absmax.repeat_interleave(bs).slice(0, 0, x.numel()).reshape(x.sizes());
    EXPECT_TRUE(((ours - x).abs() <= (theirs - x).abs() + slack).all().item<bool>());
    testing::Test::RecordProperty(
        c["name"].get<std::string>() + "_codes_equal_percent",
        std::to_string(100 * (q.data == theirs_q).to(torch::kFloat64).mean().item<double>()));
  }
}

}  // namespace
