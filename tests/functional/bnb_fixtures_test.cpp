// Bit-compatibility with bitsandbytes 0.50.2 (CPU), against fixtures that
// tools/make_bnb_fixtures.py wrote from the real library (tests/fixtures/bnb/): JSON, and raw
// little-endian *.bin arrays for the large LLM.int8 cases.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
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

// ---------------------------------------------------------------------------------------------
// LLM.int8 row codes, large: int8_vectorwise_large.json and its *.bin files.

std::string read_bytes(const std::string& name) {
  const std::string path = std::string(MSBNB_FIXTURES_DIR) + "/bnb/" + name;
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open fixture " + path);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

// FNV-1a 64 as 16 hex digits, the script's fnv1a64.
std::string fnv1a64(const void* p, size_t n) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<const uint8_t*>(p)[i]) * 0x100000001B3ull;
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}
std::string fnv1a64(const torch::Tensor& t) {
  const torch::Tensor c = t.contiguous();
  return fnv1a64(c.data_ptr(), static_cast<size_t>(c.numel() * c.element_size()));
}

// The script's splitmix_input: integer arithmetic and one exact double -> float rounding, so no
// dependence on torch's or the C library's random numbers (SPLITMIX_NOTE in the fixture).
torch::Tensor splitmix_input(uint64_t seed, int64_t rows, int64_t cols) {
  torch::Tensor x = torch::empty({rows, cols}, torch::kFloat32);
  float* p = x.data_ptr<float>();
  for (int64_t i = 0; i < rows * cols; ++i) {
    uint64_t z = seed + static_cast<uint64_t>(i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const double m = static_cast<double>(z & 0xFFFFFF);
    const int k = static_cast<int>((z >> 25) % 5) - 2;
    double mag = std::ldexp(m, k - 24);
    if (((z >> 32) & 0xFFFF) == 0) mag = 6.0 + std::ldexp(m, -21);
    p[i] = static_cast<float>((z >> 24) & 1 ? -mag : mag);
  }
  return x;
}

// A large input, its bytes checked against the hash bitsandbytes was given.
torch::Tensor large_input(const json& in) {
  const std::vector<int64_t> shape = shape_of(in["shape"]);
  torch::Tensor x;
  if (!in["file"].is_null()) {
    const std::string raw = read_bytes(in["file"].get<std::string>());
    x = torch::empty(shape, torch::kFloat16);
    if (raw.size() != static_cast<size_t>(x.numel() * 2)) throw std::runtime_error("bad fixture size");
    std::memcpy(x.data_ptr(), raw.data(), raw.size());
    EXPECT_EQ(fnv1a64(x), in["fnv1a64"].get<std::string>()) << "input file";
  } else {
    x = splitmix_input(in["seed"].get<uint64_t>(), shape[0], shape[1]);
    EXPECT_EQ(fnv1a64(x), in["fnv1a64"].get<std::string>()) << "regenerated input";
  }
  return x.to(dtype_of(in["dtype"].get<std::string>()));
}

// Our int8_vectorwise_quant against bitsandbytes' codes, scales and outlier columns, bit for bit.
// The fixtures hold codes that one rounding of 127 / absmax gets wrong (bitsandbytes evaluates
// `127.0 / row_stats` as row_stats.reciprocal() * 127: two roundings); the script prints how many.
void check_int8_large_n(const std::string& prefix, int expected) {
  const json f = load("int8_vectorwise_large.json");
  int checked = 0;
  for (const json& c : f["cases"]) {
    const std::string name = c["name"].get<std::string>();
    if (name.rfind(prefix, 0) != 0) continue;
    SCOPED_TRACE(name);
    ++checked;
    const json& o = c["outputs"];
    const torch::Tensor x = large_input(f["inputs"][c["input"].get<std::string>()]);
    const auto r = msbnb::int8_vectorwise_quant(x, c["params"]["threshold"].get<double>());
    ASSERT_EQ(r.CB.sizes().vec(), shape_of(o["CB_shape"]));
    EXPECT_EQ(fnv1a64(r.CB), o["CB_fnv1a64"].get<std::string>()) << "CB hash (all rows)";
    const std::string raw = read_bytes(o["CB_file"].get<std::string>());
    torch::Tensor ours = r.CB;
    if (!o["CB_rows"].is_null())
      ours = r.CB.index_select(0, torch::tensor(o["CB_rows"].get<std::vector<int64_t>>(), torch::kInt64));
    ASSERT_EQ(raw.size(), static_cast<size_t>(ours.numel()));
    const torch::Tensor theirs =
        torch::from_blob(const_cast<char*>(raw.data()), ours.sizes(), torch::kInt8).clone();
    EXPECT_EQ((ours != theirs).sum().item<int64_t>(), 0) << "codes that differ from bitsandbytes'";
    EXPECT_TRUE(torch::equal(r.SCB, floats(o["SCB"]))) << "SCB";
    const std::vector<int64_t> cols =
        o["outlier_cols"].is_null() ? std::vector<int64_t>{} : o["outlier_cols"].get<std::vector<int64_t>>();
    EXPECT_EQ(r.outlier_cols, cols);
  }
  EXPECT_EQ(checked, expected) << prefix;
}

// float16 (and the same values in float32) rows whose codes sit on, next to, or across the
// two-rounding boundary; thresholds 0 and 6 (outlier columns, one exactly 6.0).
TEST(Bitsandbytes, Int8VectorwiseQuantNearTies) { check_int8_large_n("ties_", 4); }

// Random float32 2048 x 1024 with sparse outliers in [6, 14), thresholds 0 and 6.
TEST(Bitsandbytes, Int8VectorwiseQuantRandom2048x1024) { check_int8_large_n("random_", 2); }

}  // namespace
