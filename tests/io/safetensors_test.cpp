// safetensors: values of a file the Python library wrote, round trips of every dtype, zero-copy
// views, and hostile files (each refused with a message naming the file and the tensor).
#include "msbnb/io/safetensors.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace {

namespace fs = std::filesystem;
using msbnb::io::NamedTensors;
using msbnb::io::SafetensorsFile;
using msbnb::io::StDtype;

const std::string kFixture = std::string(MSBNB_FIXTURES_DIR) + "/safetensors/python_dtypes.safetensors";

std::string slurp(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

struct TempDir {
  fs::path path;
  TempDir() {
    std::string templ = (fs::temp_directory_path() / "msbnb_st_XXXXXX").string();
    path = mkdtemp(templ.data());
  }
  ~TempDir() { fs::remove_all(path); }
};

// A file: 8-byte length, `json` padded to `pad` (0: no padding), then `data_bytes` bytes.
std::string make_file(const std::string& json, size_t data_bytes, size_t pad = 8, uint8_t fill = 0) {
  std::string h = json;
  if (pad) h.append((pad - h.size() % pad) % pad, ' ');
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((uint64_t{h.size()} >> (8 * i)) & 0xff);
  return out + h + std::string(data_bytes, static_cast<char>(fill));
}

std::string with_length(uint64_t n, const std::string& rest) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + rest;
}

// The c10::Error message of opening `bytes` as "hostile.safetensors", or "".
std::string error_of(const std::string& bytes) {
  try {
    SafetensorsFile::from_bytes(bytes, "hostile.safetensors");
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

#define EXPECT_REFUSED(bytes, ...)                                                              \
  do {                                                                                          \
    const std::string msg = error_of(bytes);                                                    \
    ASSERT_FALSE(msg.empty()) << "accepted";                                                    \
    EXPECT_NE(msg.find("hostile.safetensors"), std::string::npos) << msg;                       \
    for (const char* part : {__VA_ARGS__}) EXPECT_NE(msg.find(part), std::string::npos) << msg; \
  } while (0)

TEST(Safetensors, ReadsTheFilePythonWrote) {
  std::map<std::string, std::string> meta;
  const NamedTensors t = msbnb::io::load_safetensors(kFixture, &meta);
  std::vector<std::string> names;
  for (const auto& [n, unused] : t) names.push_back(n);
  EXPECT_EQ(names, (std::vector<std::string>{"bf16", "bool", "c64", "empty", "empty2d", "f16", "f32", "f64",
                                             "i16", "i32", "i64", "i8", "scalar", "u8"}));
  EXPECT_EQ(meta, (std::map<std::string, std::string>{{"format", "pt"}, {"msbnb", "fixture \xc3\xa9"}}));
  std::map<std::string, torch::Tensor> m(t.begin(), t.end());
  EXPECT_TRUE(torch::equal(m["f64"], torch::tensor({1.0 / 3.0, -2.5, 1e300}, torch::kFloat64)));
  EXPECT_TRUE(torch::equal(m["f32"], (torch::arange(6, torch::kFloat32) * 0.5 - 1.0).reshape({2, 3})));
  EXPECT_TRUE(
      torch::equal(m["f16"], torch::tensor({0.5, -1.25, 65504.0, std::ldexp(1.0, -14)}).to(torch::kHalf)));
  EXPECT_TRUE(torch::equal(
      m["bf16"], torch::tensor({1.5, -2.25, 3.0, std::ldexp(1.0, -7)}).reshape({2, 2}).to(torch::kBFloat16)));
  EXPECT_TRUE(
      torch::equal(m["i64"], torch::tensor({-(int64_t{1} << 62), int64_t{0}, (int64_t{1} << 62) + 1})));
  EXPECT_TRUE(torch::equal(m["i32"], torch::tensor({INT32_MIN, INT32_MAX}, torch::kInt32)));
  EXPECT_TRUE(torch::equal(m["i16"], torch::tensor({-32768, 32767}, torch::kInt16)));
  EXPECT_TRUE(torch::equal(m["i8"], torch::tensor({-128, 0, 127}, torch::kInt8)));
  EXPECT_TRUE(torch::equal(m["u8"], torch::tensor({0, 1, 128, 255}, torch::kUInt8)));
  EXPECT_TRUE(torch::equal(m["bool"], torch::tensor({true, false, true, true, false})));
  EXPECT_TRUE(torch::equal(torch::view_as_real(m["c64"]), torch::tensor({{1.f, 2.f}, {-0.5f, -0.25f}})));
  EXPECT_EQ(m["scalar"].dim(), 0);
  EXPECT_EQ(m["scalar"].item<float>(), 7.25f);
  EXPECT_EQ(m["empty"].sizes(), torch::IntArrayRef({0}));
  EXPECT_EQ(m["empty"].scalar_type(), torch::kFloat32);
  EXPECT_EQ(m["empty2d"].sizes(), torch::IntArrayRef({2, 0}));
  EXPECT_EQ(m["empty2d"].scalar_type(), torch::kInt64);
}

TEST(Safetensors, InfoGivesDtypeShapeAndSpan) {
  const SafetensorsFile f = SafetensorsFile::open(kFixture);
  EXPECT_EQ(f.size(), 14u);
  EXPECT_TRUE(f.has("f32"));
  EXPECT_FALSE(f.has("f33"));
  const auto& e = f.info("f32");
  EXPECT_EQ(e.dtype, StDtype::F32);
  EXPECT_EQ(e.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(e.nbytes(), 24u);
  EXPECT_EQ(f.header().data_start % 8, 0u);
  try {
    f.get("f33");
    FAIL();
  } catch (const c10::Error& err) {
    const std::string msg = err.what_without_backtrace();
    EXPECT_NE(msg.find(kFixture), std::string::npos) << msg;
    EXPECT_NE(msg.find("'f33'"), std::string::npos) << msg;
  }
}

NamedTensors every_dtype() {
  return {
      {"f64", torch::tensor({1.5, -2.0}, torch::kFloat64)},
      {"f32_t", torch::arange(12, torch::kFloat32).reshape({3, 4}).t()},  // not contiguous
      {"f16", torch::tensor({0.25, 3.0}).to(torch::kHalf)},
      {"bf16", torch::tensor({-1.0, 0.5, 8.0}).to(torch::kBFloat16)},
      {"i64", torch::tensor({int64_t{-5}, INT64_MAX})},
      {"i32", torch::tensor({7}, torch::kInt32)},
      {"i16", torch::tensor({-2}, torch::kInt16)},
      {"i8", torch::tensor({1, -1, 3}, torch::kInt8)},  // 3 bytes: the next tensor would be misaligned
      {"u8", torch::tensor({200}, torch::kUInt8)},
      {"bool", torch::tensor({true, false, true})},
      {"c64", torch::complex(torch::tensor({1.f}), torch::tensor({-1.f}))},
      {"scalar", torch::tensor(3.5)},
      {"empty", torch::zeros({0, 3}, torch::kInt32)},
      {"slice", torch::arange(10, torch::kFloat32).slice(0, 1, 9, 3)},  // offset + stride
  };
}

TEST(Safetensors, RoundTripsEveryDtypeAlignedAndSorted) {
  TempDir d;
  const std::string p = (d.path / "all.safetensors").string();
  const NamedTensors in = every_dtype();
  msbnb::io::save_safetensors(p, in, {{"a", "1"}, {"b", ""}});
  std::map<std::string, std::string> meta;
  const NamedTensors out = msbnb::io::load_safetensors(p, &meta);
  EXPECT_EQ(meta, (std::map<std::string, std::string>{{"a", "1"}, {"b", ""}}));
  ASSERT_EQ(out.size(), in.size());
  std::map<std::string, torch::Tensor> want(in.begin(), in.end());
  for (size_t i = 0; i < out.size(); ++i) {
    const auto& [name, t] = out[i];
    if (i > 0) {
      EXPECT_LT(out[i - 1].first, name);
    }
    ASSERT_TRUE(want.count(name)) << name;
    EXPECT_EQ(t.scalar_type(), want[name].scalar_type()) << name;
    EXPECT_EQ(t.sizes(), want[name].sizes()) << name;
    EXPECT_TRUE(torch::equal(t, want[name])) << name;
  }
  // Every tensor's data is aligned for its dtype, so every non-empty one is a zero-copy view.
  const SafetensorsFile f = SafetensorsFile::open(p);
  for (const auto& e : f.header().tensors) {
    const size_t elem = static_cast<size_t>(msbnb::io::dtype_bits(e.dtype)) / 8;
    EXPECT_EQ((f.header().data_start + e.begin) % elem, 0u) << e.name;
  }
  // serialize_safetensors gives the bytes save_safetensors wrote.
  EXPECT_EQ(msbnb::io::serialize_safetensors(in, {{"a", "1"}, {"b", ""}}), slurp(p));
}

// tests/fixtures/safetensors/msbnb_written.safetensors is what our writer gives for these
// tensors (checked byte for byte here); tools/check_safetensors_interop.py reads it with the
// Python safetensors library. MSBNB_REGENERATE_FIXTURES=1 rewrites it.
NamedTensors interop_tensors() {
  return {
      {"f64", torch::tensor({1.0 / 3.0, -2.5, 1e300}, torch::kFloat64)},
      {"f32_t", (torch::arange(6, torch::kFloat32) * 0.5 - 1.0).reshape({2, 3}).t()},  // written as [3, 2]
      {"f16", torch::tensor({0.5, -1.25, 65504.0, std::ldexp(1.0, -14)}).to(torch::kHalf)},
      {"bf16", torch::tensor({1.5, -2.25, 3.0, std::ldexp(1.0, -7)}).reshape({2, 2}).to(torch::kBFloat16)},
      {"i64", torch::tensor({-(int64_t{1} << 62), int64_t{0}, (int64_t{1} << 62) + 1})},
      {"i32", torch::tensor({INT32_MIN, INT32_MAX}, torch::kInt32)},
      {"i16", torch::tensor({-32768, 32767}, torch::kInt16)},
      {"i8", torch::tensor({-128, 0, 127}, torch::kInt8)},
      {"u8", torch::tensor({0, 1, 128, 255}, torch::kUInt8)},
      {"bool", torch::tensor({true, false, true, true, false})},
      {"c64", torch::complex(torch::tensor({1.f, -0.5f}), torch::tensor({2.f, -0.25f}))},
      {"scalar", torch::tensor(7.25f)},
      {"empty", torch::zeros({0}, torch::kFloat32)},
      {"empty2d", torch::zeros({2, 0}, torch::kInt64)},
  };
}

TEST(Safetensors, WriterOutputMatchesTheCommittedInteropFile) {
  const std::string path = std::string(MSBNB_FIXTURES_DIR) + "/safetensors/msbnb_written.safetensors";
  const std::map<std::string, std::string> meta{{"format", "pt"}, {"writer", "msbnb \xc3\xa9"}};
  if (std::getenv("MSBNB_REGENERATE_FIXTURES")) msbnb::io::save_safetensors(path, interop_tensors(), meta);
  EXPECT_EQ(msbnb::io::serialize_safetensors(interop_tensors(), meta), slurp(path))
      << "the writer's output changed: check it with tools/check_safetensors_interop.py, then regenerate";
}

TEST(Safetensors, TensorsAreViewsThatOutliveTheFileAndNeverWriteIt) {
  TempDir d;
  const std::string p = (d.path / "v.safetensors").string();
  msbnb::io::save_safetensors(p, {{"x", torch::arange(4, torch::kFloat32)}});
  const std::string bytes = slurp(p);
  torch::Tensor a, b;
  {
    const SafetensorsFile f = SafetensorsFile::open(p);
    a = f.get("x");
    b = f.get("x");
  }
  EXPECT_EQ(a.data_ptr(), b.data_ptr());  // one mapping, no copy
  a.add_(1);                              // private pages: the file does not change
  EXPECT_TRUE(torch::equal(b, torch::arange(4, torch::kFloat32) + 1));
  EXPECT_EQ(slurp(p), bytes);
  EXPECT_TRUE(torch::equal(msbnb::io::load_safetensors(p).at(0).second, torch::arange(4, torch::kFloat32)));
}

TEST(Safetensors, MisalignedDataIsCopied) {
  // Header of 9 bytes, not padded: data start at offset 17, misaligned for F32.
  std::string bytes = make_file(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 0, 0);
  const float v[2] = {1.5f, -4.0f};
  bytes.append(reinterpret_cast<const char*>(v), sizeof v);
  const SafetensorsFile f = SafetensorsFile::from_bytes(bytes, "unaligned");
  ASSERT_NE(f.header().data_start % 4, 0u);
  const torch::Tensor t = f.get("x");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data_ptr()) % 4, 0u);
  EXPECT_TRUE(torch::equal(t, torch::tensor({1.5f, -4.0f})));
}

TEST(Safetensors, SaveRefusesBadArguments) {
  TempDir d;
  const std::string p = (d.path / "bad.safetensors").string();
  const auto refuses = [&](const NamedTensors& t, const char* part) {
    try {
      msbnb::io::save_safetensors(p, t);
      ADD_FAILURE() << "accepted: " << part;
    } catch (const c10::Error& e) {
      const std::string msg = e.what_without_backtrace();
      EXPECT_NE(msg.find(p), std::string::npos) << msg;
      EXPECT_NE(msg.find(part), std::string::npos) << msg;
    }
    EXPECT_FALSE(fs::exists(p));
  };
  const torch::Tensor x = torch::ones({2});
  refuses({{"a", x}, {"a", x}}, "unique");
  refuses({{"", x}}, "non-empty name");
  refuses({{"__metadata__", x}}, "__metadata__");
  refuses({{"u", torch::Tensor()}}, "undefined");
  refuses({{"m", torch::empty({2}, torch::TensorOptions().device(torch::kMeta))}}, "expected a CPU tensor");
  refuses({{"c128", torch::zeros({2}, torch::kComplexDouble)}}, "'c128'");
  refuses({{"sparse", torch::eye(2).to_sparse()}}, "dense");
}

TEST(Safetensors, UnsupportedDtypesOpenButRefuseGet) {
  for (const char* dt : {"U16", "U32", "U64", "F8_E4M3", "F8_E5M2"}) {
    const size_t bits = msbnb::io::dtype_bits(*msbnb::io::dtype_from_name(dt));
    const std::string json =
        std::string(R"({"ok":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"x":{"dtype":")") + dt +
        R"(","shape":[2],"data_offsets":[1,)" + std::to_string(1 + bits / 4) + "]}}";
    const SafetensorsFile f =
        SafetensorsFile::from_bytes(make_file(json, 1 + bits / 4), "new_dtypes.safetensors");
    EXPECT_EQ(f.get("ok").item<uint8_t>(), 0);
    try {
      f.get("x");
      ADD_FAILURE() << dt;
    } catch (const c10::Error& e) {
      const std::string msg = e.what_without_backtrace();
      EXPECT_NE(msg.find("new_dtypes.safetensors"), std::string::npos) << msg;
      EXPECT_NE(msg.find("'x'"), std::string::npos) << msg;
      EXPECT_NE(msg.find(dt), std::string::npos) << msg;
    }
  }
}

TEST(Safetensors, RefusesBoolBytesOtherThanZeroAndOne) {
  const SafetensorsFile f = SafetensorsFile::from_bytes(
      make_file(R"({"flags":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]}})", 3, 8, 2),
      "hostile.safetensors");
  try {
    f.get("flags");
    FAIL();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT_NE(msg.find("hostile.safetensors"), std::string::npos) << msg;
    EXPECT_NE(msg.find("'flags'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("got 2"), std::string::npos) << msg;
  }
}

TEST(Safetensors, RefusesTruncatedFiles) {
  TempDir d;
  const std::string good = slurp(kFixture);
  const std::string p = (d.path / "truncated.safetensors").string();
  for (size_t cut : {size_t{0}, size_t{5}, size_t{100}, good.size() - 1}) {
    std::ofstream(p, std::ios::binary) << good.substr(0, cut);
    try {
      SafetensorsFile::open(p);
      ADD_FAILURE() << "accepted a file cut to " << cut;
    } catch (const c10::Error& e) {
      const std::string msg = e.what_without_backtrace();
      EXPECT_NE(msg.find(p), std::string::npos) << msg;
      if (cut == good.size() - 1) {  // the last tensor of the data section is cut
        EXPECT_NE(msg.find("'bool'"), std::string::npos) << msg;
      }
    }
  }
  EXPECT_THROW(SafetensorsFile::open((d.path / "missing").string()), c10::Error);
  EXPECT_THROW(SafetensorsFile::open(d.path.string()), c10::Error);  // a directory
}

TEST(Safetensors, RefusesHostileHeaderLengths) {
  EXPECT_REFUSED(std::string("\x05\0\0", 3), "at least 8 bytes");
  EXPECT_REFUSED(with_length(uint64_t{1} << 63, "{}"), "header length <= 100000000");
  EXPECT_REFUSED(with_length(100'000'001, "{}"), "header length <= 100000000");
  EXPECT_REFUSED(with_length(1000, std::string(40, ' ')), "header length <= 40", "got 1000");
  EXPECT_REFUSED(with_length(0, ""), "empty header");
  EXPECT_REFUSED(with_length(4, " {} "), "starting with '{'");
}

TEST(Safetensors, RefusesMalformedJson) {
  EXPECT_REFUSED(make_file(R"({"a": {)", 0), "well-formed JSON");
  EXPECT_REFUSED(make_file(R"({"a": 5})", 0), "'a'", "expected an object");
  EXPECT_REFUSED(make_file(R"({"a": {"dtype": "F32", "shape": [[1]], "data_offsets": [0, 4]}})", 4),
                 "nested at most");
  EXPECT_REFUSED(
      make_file(std::string(R"({"a": {"b": )") + std::string(10000, '[') + std::string(10000, ']') + "}}", 0),
      "nested at most");
  EXPECT_REFUSED(make_file(std::string("{\"a\xff\": 1}"), 0), "well-formed JSON");  // not UTF-8
  EXPECT_REFUSED(make_file(R"({"a": {"dtype": "F32", "shape": [1]}})", 4), "'a'", "data_offsets", "got none");
  EXPECT_REFUSED(make_file(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}})", 4),
                 "'a'", "'extra'");
  EXPECT_REFUSED(make_file(R"({"__metadata__": {"k": 1}})", 0), "__metadata__", "'k'", "expected a string");
  EXPECT_REFUSED(make_file(R"({"__metadata__": ["k"]})", 0), "__metadata__", "object of strings");
}

TEST(Safetensors, RefusesDuplicateNamesAndKeys) {
  EXPECT_REFUSED(make_file(R"({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},)"
                           R"( "w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}})",
                           2),
                 "unique keys", "'w'");
  EXPECT_REFUSED(
      make_file(R"({"w": {"dtype": "U8", "dtype": "F32", "shape": [1], "data_offsets": [0, 1]}})", 1),
      "unique keys", "'dtype'");
}

TEST(Safetensors, RefusesBadDtypesAndShapes) {
  EXPECT_REFUSED(make_file(R"({"w": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}})", 4), "'w'",
                 "dtype", "'F33'");
  EXPECT_REFUSED(make_file(R"({"w": {"dtype": 32, "shape": [1], "data_offsets": [0, 4]}})", 4), "'w'",
                 "expected a string");
  EXPECT_REFUSED(make_file(R"({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}})", 20), "'w'",
                 "24 bytes", "got 20 bytes");
  EXPECT_REFUSED(make_file(R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", 4), "'w'",
                 "shape");
  EXPECT_REFUSED(make_file(R"({"w": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}})", 4), "'w'",
                 "expected integers");
  EXPECT_REFUSED(make_file(R"({"w": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}})", 4), "'w'",
                 "expected a list");
  // 2^40 x 2^40 elements overflow 64 bits; 2^61 F32 elements overflow as bytes.
  EXPECT_REFUSED(
      make_file(R"({"w": {"dtype": "F32", "shape": [1099511627776, 1099511627776], "data_offsets": [0, 4]}})",
                4),
      "'w'", "overflowing");
  EXPECT_REFUSED(
      make_file(R"({"w": {"dtype": "F32", "shape": [2305843009213693952], "data_offsets": [0, 0]}})", 0),
      "'w'", "overflowing");
  EXPECT_REFUSED(
      make_file(R"({"w": {"dtype": "F32", "shape": [9223372036854775808], "data_offsets": [0, 4]}})", 4),
      "'w'", "shape");
  EXPECT_REFUSED(make_file(R"({"w": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}})", 1), "'w'",
                 "whole number of bytes");
}

TEST(Safetensors, RefusesBadSpans) {
  const auto two = [](const char* a, const char* b, size_t data) {
    return make_file(std::string(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": )") + a +
                         R"(}, "b": {"dtype": "F32", "shape": [2], "data_offsets": )" + b + "}}",
                     data);
  };
  EXPECT_REFUSED(two("[0, 8]", "[8, 16]", 12), "'b'", "inside the data section of 12 bytes", "[8, 16]");
  EXPECT_REFUSED(two("[0, 8]", "[4, 12]", 12), "'b'", "overlapping tensor 'a'");
  EXPECT_REFUSED(two("[0, 8]", "[0, 8]", 8), "overlapping");
  EXPECT_REFUSED(two("[0, 8]", "[12, 20]", 20), "'b'", "starting at 8", "no hole");
  EXPECT_REFUSED(two("[8, 16]", "[16, 24]", 24), "'a'", "starting at 0");
  EXPECT_REFUSED(two("[0, 8]", "[8, 16]", 20), "4 trailing bytes");
  EXPECT_REFUSED(two("[0, 8]", "[16, 8]", 16), "'b'", "begin <= end");
  EXPECT_REFUSED(two("[0, 8]", "[-8, 0]", 16), "'b'", "two integers >= 0");
  EXPECT_REFUSED(two("[0, 8]", "[8]", 16), "'b'", "[begin, end]");
  EXPECT_REFUSED(two("[0, 8]", "[8, 18446744073709551615]", 16), "'b'", "inside the data section");
  // An empty tensor inside another one's span is an overlap too.
  EXPECT_REFUSED(make_file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                           R"( "e": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}})",
                           8),
                 "'e'", "overlapping");
}

}  // namespace
