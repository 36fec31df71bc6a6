// bitsandbytes' packed quant_state JSON: parsing real bitsandbytes output, writing it back byte
// for byte, and refusing every malformed field with a message naming it.
#include "msbnb/io/quant_state.h"

#include <gtest/gtest.h>

#include <fstream>
#include <sstream>
#include <string>

namespace {

using msbnb::io::FormatError;
using msbnb::io::parse_quant_state_json;
using msbnb::io::quant_state_json;
using msbnb::io::QuantStateJson;

std::string read_fixture(const std::string& name) {
  std::ifstream f(std::string(MSBNB_FIXTURES_DIR) + "/safetensors/" + name, std::ios::binary);
  EXPECT_TRUE(f.good()) << name;
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// The message of the FormatError `text` raises, or "" if it parses.
std::string error_of(const std::string& text) {
  try {
    parse_quant_state_json(text, "layer.weight.quant_state");
  } catch (const FormatError& e) {
    return e.what();
  }
  return "";
}

#define EXPECT_REFUSED(text, ...)                                                               \
  do {                                                                                          \
    const std::string msg = error_of(text);                                                     \
    ASSERT_FALSE(msg.empty()) << "accepted: " << (text);                                        \
    EXPECT_NE(msg.find("layer.weight.quant_state"), std::string::npos) << msg;                  \
    for (const char* part : {__VA_ARGS__}) EXPECT_NE(msg.find(part), std::string::npos) << msg; \
  } while (0)

const std::string kValid = R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [64, 96]})";

TEST(QuantStateJson, ParsesBitsandbytesNf4AndWritesItBackByteForByte) {
  const std::string text = read_fixture("bnb_quant_state_nf4.json");
  const QuantStateJson q = parse_quant_state_json(text);
  EXPECT_EQ(q.quant_type, "nf4");
  EXPECT_EQ(q.blocksize, 64);
  EXPECT_EQ(q.dtype, "float16");
  EXPECT_EQ(q.shape, (std::vector<int64_t>{64, 96}));
  EXPECT_FALSE(q.nested);
  EXPECT_EQ(q.numel(), 64 * 96);
  EXPECT_EQ(quant_state_json(q), text);
  EXPECT_EQ(msbnb::io::quant_state_key_suffix(q.quant_type), "quant_state.bitsandbytes__nf4");
}

TEST(QuantStateJson, ParsesBitsandbytesDoubleQuantFp4AndWritesItBackByteForByte) {
  const std::string text = read_fixture("bnb_quant_state_fp4_dq.json");
  const QuantStateJson q = parse_quant_state_json(text);
  EXPECT_EQ(q.quant_type, "fp4");
  EXPECT_EQ(q.blocksize, 128);
  EXPECT_EQ(q.dtype, "bfloat16");
  EXPECT_TRUE(q.nested);
  EXPECT_EQ(q.nested_blocksize, 256);
  EXPECT_EQ(q.nested_dtype, "float32");
  EXPECT_EQ(q.nested_offset, 2.7233073711395264);
  EXPECT_EQ(quant_state_json(q), text);
}

// Python's repr(float), as json.dumps writes nested_offset (expected strings printed by Python).
TEST(QuantStateJson, NestedOffsetIsWrittenAsPythonRepr) {
  const std::pair<double, const char*> cases[] = {
      {2.7233073711395264, "2.7233073711395264"},
      {0.1, "0.1"},
      {1e-05, "1e-05"},
      {0.0001, "0.0001"},
      {0.0001234, "0.0001234"},
      {1e+16, "1e+16"},
      {1000000000000000.0, "1000000000000000.0"},
      {1.2345678901234568e+17, "1.2345678901234568e+17"},
      {-0.0, "-0.0"},
      {0.0, "0.0"},
      {5e-324, "5e-324"},
      {1.7976931348623157e+308, "1.7976931348623157e+308"},
      {0.012299999594688416, "0.012299999594688416"},
      {100.0, "100.0"},
      {1.5, "1.5"},
      {-3.0, "-3.0"},
      {-2.5e-07, "-2.5e-07"},
      {12345.678, "12345.678"},
      {9999999999999998.0, "9999999999999998.0"},
      {9.5367431640625e-07, "9.5367431640625e-07"},
  };
  QuantStateJson q = parse_quant_state_json(kValid);
  q.nested = true;
  for (const auto& [v, s] : cases) {
    q.nested_offset = v;
    const std::string text = quant_state_json(q);
    const std::string want = std::string("\"nested_offset\": ") + s + "}";
    EXPECT_EQ(text.substr(text.size() - want.size()), want) << text;
    const QuantStateJson back = parse_quant_state_json(text);
    EXPECT_EQ(back, q) << text;
    EXPECT_EQ(std::signbit(back.nested_offset), std::signbit(v)) << s;
  }
}

TEST(QuantStateJson, AcceptsEveryBitsandbytesBlocksizeAndDtype) {
  for (int64_t b = 32; b <= 4096; b *= 2) {
    for (const char* d : {"float32", "float16", "bfloat16"}) {
      const std::string text = "{\"quant_type\": \"fp4\", \"blocksize\": " + std::to_string(b) +
                               ", \"dtype\": \"" + d + "\", \"shape\": [3]}";
      EXPECT_EQ(quant_state_json(parse_quant_state_json(text)), text);
    }
  }
}

TEST(QuantStateJson, RefusesMalformedJson) {
  EXPECT_REFUSED("", "well-formed JSON");
  EXPECT_REFUSED("{\"quant_type\": \"nf4\"", "well-formed JSON");
  EXPECT_REFUSED("[1, 2]", "expected a JSON object");
  EXPECT_REFUSED("\"nf4\"", "expected a JSON object");
  EXPECT_REFUSED(R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [[64]]})",
                 "nested at most 2");
  EXPECT_REFUSED(
      R"({"quant_type": "nf4", "quant_type": "fp4", "blocksize": 64, "dtype": "float16", "shape": [1]})",
      "unique keys", "quant_type");
  EXPECT_REFUSED(R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [1], "absmax": 1})",
                 "'absmax'");
}

TEST(QuantStateJson, RefusesEachBadField) {
  EXPECT_REFUSED(R"({"blocksize": 64, "dtype": "float16", "shape": [1]})", "quant_type", "got none");
  EXPECT_REFUSED(R"({"quant_type": "nf4", "dtype": "float16", "shape": [1]})", "blocksize", "got none");
  EXPECT_REFUSED(R"({"quant_type": "nf4", "blocksize": 64, "shape": [1]})", "dtype", "got none");
  EXPECT_REFUSED(R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float16"})", "shape", "got none");
  EXPECT_REFUSED(R"({"quant_type": "int4", "blocksize": 64, "dtype": "float16", "shape": [1]})", "quant_type",
                 "nf4 or fp4", "'int4'");
  EXPECT_REFUSED(R"({"quant_type": 4, "blocksize": 64, "dtype": "float16", "shape": [1]})", "quant_type",
                 "expected a string");
  for (const char* b : {"16", "48", "8192", "0", "-64", "64.0", "\"64\"", "18446744073709551615"}) {
    EXPECT_REFUSED(
        std::string(R"({"quant_type": "nf4", "blocksize": )") + b + R"(, "dtype": "float16", "shape": [1]})",
        "blocksize");
  }
  EXPECT_REFUSED(R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float64", "shape": [1]})", "dtype",
                 "'float64'");
  EXPECT_REFUSED(R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": null})", "shape",
                 "expected a list");
  EXPECT_REFUSED(R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [64, 0]})", "shape",
                 "positive", "got 0");
  EXPECT_REFUSED(R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [-1]})", "shape",
                 "positive");
  EXPECT_REFUSED(R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [1.5]})", "shape",
                 "integers");
  // 2^40 x 2^40 overflows int64.
  EXPECT_REFUSED(
      R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [1099511627776, 1099511627776]})",
      "shape", "overflow");
}

TEST(QuantStateJson, RefusesPartialOrBadNestedFields) {
  const std::string head = R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [4])";
  EXPECT_REFUSED(head + R"(, "nested_blocksize": 256})", "all present or all absent", "got 1");
  EXPECT_REFUSED(head + R"(, "nested_blocksize": 256, "nested_dtype": "float32"})", "got 2");
  EXPECT_REFUSED(head + R"(, "nested_blocksize": 100, "nested_dtype": "float32", "nested_offset": 0.5})",
                 "nested_blocksize", "power of two");
  EXPECT_REFUSED(head + R"(, "nested_blocksize": 256, "nested_dtype": "int8", "nested_offset": 0.5})",
                 "nested_dtype");
  EXPECT_REFUSED(head + R"(, "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": "0.5"})",
                 "nested_offset", "expected a number");
  EXPECT_REFUSED(head + R"(, "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 1e400})",
                 "1e400");  // out of double range: nlohmann refuses it
  // An integer offset is a number (json.dumps would write 1.0, but any JSON number is accepted).
  EXPECT_EQ(parse_quant_state_json(
                head + R"(, "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 1})")
                .nested_offset,
            1.0);
}

TEST(QuantStateJson, WriterValidatesItsInput) {
  QuantStateJson q = parse_quant_state_json(kValid);
  q.blocksize = 100;
  EXPECT_THROW(quant_state_json(q), FormatError);
  q = parse_quant_state_json(kValid);
  q.nested = true;
  q.nested_offset = std::numeric_limits<double>::infinity();
  EXPECT_THROW(quant_state_json(q), FormatError);
  EXPECT_THROW(msbnb::io::quant_state_key_suffix("int8"), FormatError);
}

}  // namespace
