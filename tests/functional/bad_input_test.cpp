// Bad input: every case throws c10::Error whose message names the argument, the expected and
// the actual value; inputs are never modified.
#include <gtest/gtest.h>

#include <functional>
#include <limits>

#include "msbnb/msbnb.h"

namespace {

using msbnb::Int8Options;
using msbnb::Quantize4bitOptions;

// Runs fn, which must throw c10::Error with every one of `parts` in its message.
void expect_error(const std::function<void()>& fn, std::initializer_list<const char*> parts) {
  try {
    fn();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    for (const char* p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
    return;
  }
  ADD_FAILURE() << "no c10::Error thrown";
}

const auto kNF4 = Quantize4bitOptions().quant_type("nf4");

TEST(BadInput, WrongDtype) {
  for (auto dt : {torch::kFloat64, torch::kInt32, torch::kInt8}) {
    const torch::Tensor x = torch::ones({4, 4}, dt);
    expect_error([&] { msbnb::quantize_4bit(x, kNF4); }, {"x:", "float32, float16 or bfloat16", "got"});
    expect_error([&] { msbnb::quantize_8bit(x); }, {"x:", "float32, float16 or bfloat16"});
    expect_error([&] { msbnb::quantize_blockwise(x); }, {"x:", "float32, float16 or bfloat16"});
  }
  auto q = msbnb::quantize_4bit(torch::randn({8, 8}), kNF4);
  expect_error([&] { msbnb::dequantize_4bit(q.data.to(torch::kInt8), q.state); }, {"data:", "Byte", "Char"});
  auto q8 = msbnb::quantize_8bit(torch::randn({8, 8}));
  expect_error([&] { msbnb::dequantize_8bit(q8.weight_int8.to(torch::kUInt8), q8.scale, {}, {}); },
               {"weight_int8:", "Char", "Byte"});
  expect_error([&] { msbnb::dequantize_8bit(q8.weight_int8, q8.scale.to(torch::kFloat64), {}, {}); },
               {"scale:", "Float", "Double"});
}

TEST(BadInput, EmptyAndUndefined) {
  expect_error([&] { msbnb::quantize_4bit(torch::empty({0, 4}), kNF4); }, {"x:", "non-empty", "[0, 4]"});
  expect_error([&] { msbnb::quantize_8bit(torch::empty({0})); }, {"x:", "non-empty"});
  expect_error([&] { msbnb::quantize_4bit(torch::Tensor(), kNF4); }, {"x:", "undefined"});
}

TEST(BadInput, NanAndInf) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    torch::Tensor x = torch::randn({4, 64});
    x[2][5] = bad;
    expect_error([&] { msbnb::quantize_4bit(x, kNF4); }, {"x:", "finite", "[128, 192)"});
    expect_error([&] { msbnb::quantize_4bit(x, Quantize4bitOptions().quant_type("int4").blocksize(32)); },
                 {"x:", "finite", "row 2, columns [0, 32)"});
    expect_error([&] { msbnb::quantize_4bit(x, Quantize4bitOptions().quant_type("int4").symmetric(false)); },
                 {"x", "finite"});
    expect_error([&] { msbnb::quantize_8bit(x); }, {"x:", "finite"});
    expect_error([&] { msbnb::quantize_8bit(x, Int8Options().symmetric(false)); }, {"x:", "finite"});
    expect_error([&] { msbnb::quantize_blockwise(x, 64); }, {"x:", "finite"});
    expect_error([&] { msbnb::quantize_tensor(x, 4, false); }, {"x:", "finite"});
    expect_error([&] { msbnb::estimate_quantization_error(x, torch::zeros_like(x)); },
                 {"original:", "finite"});
    // The same in bfloat16 and float16.
    expect_error([&] { msbnb::quantize_4bit(x.to(torch::kBFloat16), kNF4); }, {"x:", "finite"});
    expect_error([&] { msbnb::quantize_4bit(x.to(torch::kFloat16), kNF4); }, {"x:", "finite"});
  }
}

TEST(BadInput, BlockAndGroupSizes) {
  const torch::Tensor x = torch::randn({4, 64});
  for (int64_t bs : {0, -64, 16, 48, 8192})
    expect_error([&] { msbnb::quantize_4bit(x, Quantize4bitOptions(kNF4).blocksize(bs)); },
                 {"blocksize:", "power of two in [32, 4096]", std::to_string(bs).c_str()});
  for (int64_t gs : {0, -2, 1, 33})
    expect_error([&] { msbnb::quantize_4bit(x, Quantize4bitOptions().quant_type("int4").blocksize(gs)); },
                 {"blocksize:", "even int4 group size", std::to_string(gs).c_str()});
  expect_error(
      [&] { msbnb::quantize_8bit(x, Int8Options().granularity(msbnb::Granularity::per_block).blocksize(0)); },
      {"blocksize:", "positive", "0"});
  expect_error([&] { msbnb::quantize_blockwise(x, 100); }, {"blocksize:", "100"});
  expect_error([&] { msbnb::quantize_4bit(x, Quantize4bitOptions().quant_type("nf3")); },
               {"quant_type:", "\"nf4\", \"fp4\" or \"int4\"", "nf3"});
}

// nf4 / fp4 have no zero point: symmetric(false) is an error, not silently ignored.
TEST(BadInput, AsymmetricNf4Fp4) {
  const torch::Tensor x = torch::randn({4, 64});
  for (const char* type : {"nf4", "fp4"}) {
    SCOPED_TRACE(type);
    const std::string named = std::string("quant_type \"") + type + "\"";
    expect_error(
        [&] { msbnb::quantize_4bit(x, Quantize4bitOptions().quant_type(type).symmetric(false)); },
        {"symmetric:", "expected true", named.c_str(), "only with quant_type \"int4\"", "got false"});
  }
  // Still accepted where it means something.
  EXPECT_TRUE(msbnb::quantize_4bit(x, Quantize4bitOptions().quant_type("int4").symmetric(false))
                  .state.zero_point.defined());
  // An unknown quant_type is named by effective_blocksize too.
  expect_error([&] { (void)Quantize4bitOptions().quant_type("nf3").effective_blocksize(); },
               {"quant_type:", "\"nf4\", \"fp4\" or \"int4\"", "nf3"});
}

TEST(BadInput, StateDoesNotMatchData) {
  const torch::Tensor x = torch::randn({16, 64});
  for (const char* type : {"nf4", "int4"})
    for (bool nested : {false, true}) {
      auto q = msbnb::quantize_4bit(x, Quantize4bitOptions().quant_type(type).compress_statistics(nested));
      expect_error([&] { msbnb::dequantize_4bit(q.data.slice(0, 1), q.state); },
                   {"data:", "expected", "elements"});
      msbnb::QuantState s = q.state;
      s.shape = {16, 65};
      expect_error([&] { msbnb::dequantize_4bit(q.data, s); }, {"expected", "got"});
      s = q.state;
      s.absmax = q.state.absmax.slice(0, 1);
      expect_error([&] { msbnb::dequantize_4bit(q.data, s); }, {"state.absmax", "expected"});
      s = q.state;
      s.quant_type = "nf5";
      expect_error([&] { msbnb::dequantize_4bit(q.data, s); }, {"state.quant_type:", "nf5"});
      s = q.state;
      s.blocksize = 3;
      expect_error([&] { msbnb::dequantize_4bit(q.data, s); }, {"state.blocksize:", "3"});
      if (nested) {
        s = q.state;
        s.absmax = q.state.absmax.to(torch::kFloat32);
        expect_error([&] { msbnb::dequantize_4bit(q.data, s); }, {"state.absmax:", "Byte", "Float"});
      }
    }
  auto q = msbnb::quantize_4bit(x, Quantize4bitOptions().quant_type("int4").symmetric(false));
  msbnb::QuantState s = q.state;
  s.zero_point = torch::full_like(q.state.zero_point, 16);
  expect_error([&] { msbnb::dequantize_4bit(q.data, s); }, {"state.zero_point:", "[0, 15]", "16"});
  auto q8 = msbnb::quantize_8bit(x, Int8Options().symmetric(false));
  expect_error([&] { msbnb::dequantize_8bit(q8.weight_int8, q8.scale.slice(0, 1), q8.offset, q8.options); },
               {"scale:", "expected 16 elements", "got 15"});
  expect_error([&] { msbnb::dequantize_8bit(q8.weight_int8, q8.scale, q8.offset + 0.5, q8.options); },
               {"offset:", "integral"});
  expect_error([&] { msbnb::dequantize_8bit(q8.weight_int8, q8.scale, {}, q8.options); },
               {"offset:", "undefined"});
  auto b = msbnb::quantize_blockwise(x, 256);
  msbnb::QuantState bs = b.state;
  bs.code = b.state.code.slice(0, 0, 16);
  expect_error([&] { msbnb::dequantize_blockwise(b.data, bs); }, {"state.code:", "256", "16"});
  expect_error([&] { msbnb::quantize_blockwise(x, 256, torch::zeros({255})); }, {"code:", "256", "255"});
  expect_error([&] { msbnb::estimate_quantization_error(x, x.slice(0, 1)); },
               {"dequantized:", "[16, 64]", "[15, 64]"});
}

TEST(BadInput, NonContiguousIsHandledAndInputUnchanged) {
  const torch::Tensor base = torch::randn({64, 96});
  const torch::Tensor t = base.t();  // non-contiguous view
  const torch::Tensor before = t.clone();
  auto a = msbnb::quantize_4bit(t, kNF4);
  auto b = msbnb::quantize_4bit(t.contiguous(), kNF4);
  EXPECT_TRUE(torch::equal(a.data, b.data));
  auto c = msbnb::quantize_8bit(t, Int8Options().symmetric(false));
  EXPECT_TRUE(torch::equal(c.weight_int8,
                           msbnb::quantize_8bit(t.contiguous(), Int8Options().symmetric(false)).weight_int8));
  msbnb::quantize_blockwise(t, 64, {}, true);
  msbnb::quantize_tensor(t, 4, false, true);
  EXPECT_TRUE(torch::equal(t, before));
  EXPECT_FALSE(t.is_contiguous());
}

TEST(BadInput, MisplacedArguments) {
  expect_error([&] { msbnb::create_normal_map(1.5); }, {"offset:", "(0.5, 1)", "1.5"});
  expect_error([&] { msbnb::compute_scale_offset(torch::randn({4}), 1); }, {"bits:", "2..8", "1"});
  expect_error([&] { msbnb::quantize_tensor(torch::randn({4}), 3); }, {"bits:", "8 or 4", "3"});
}

TEST(BadInput, HugeBlockSizesAreOneBlock) {
  const torch::Tensor x = torch::randn({4, 8});
  const int64_t huge = std::numeric_limits<int64_t>::max();
  auto per_block =
      msbnb::quantize_8bit(x, Int8Options().granularity(msbnb::Granularity::per_block).blocksize(huge));
  auto per_tensor = msbnb::quantize_8bit(x, Int8Options().granularity(msbnb::Granularity::per_tensor));
  EXPECT_TRUE(torch::equal(per_block.weight_int8, per_tensor.weight_int8));
  EXPECT_TRUE(torch::equal(msbnb::dequantize_8bit(per_block), msbnb::dequantize_8bit(per_tensor)));
  auto q = msbnb::quantize_4bit(x, Quantize4bitOptions().quant_type("int4").blocksize(huge - 1));
  EXPECT_EQ(q.state.absmax.sizes(), (std::vector<int64_t>{4, 1}));
  msbnb::QuantState s = q.state;
  s.absmax = torch::empty({4, 0});
  expect_error([&] { msbnb::dequantize_4bit(q.data, s); }, {"state.absmax:", "expected 4 elements", "got 0"});
}

TEST(BadInput, HostileStates) {
  const torch::Tensor x = torch::randn({16, 64});
  auto q = msbnb::quantize_4bit(x, Quantize4bitOptions().quant_type("nf4").compress_statistics(true));
  msbnb::QuantState s = q.state;
  s.dtype = torch::kInt8;
  expect_error([&] { msbnb::dequantize_4bit(q.data, s); },
               {"state.dtype:", "float32, float16 or bfloat16", "Char"});
  s = q.state;
  s.state2 = std::make_shared<msbnb::QuantState>(*q.state.state2);
  s.state2->dtype = torch::kFloat16;
  expect_error([&] { msbnb::dequantize_4bit(q.data, s); }, {"state.state2.dtype:", "Float", "Half"});
  s = q.state;
  s.state2 = std::make_shared<msbnb::QuantState>(*q.state.state2);
  s.state2->state2 = s.state2;  // a cycle
  expect_error([&] { msbnb::dequantize_4bit(q.data, s); }, {"state.state2:", "without a state2"});
  s.state2->state2 = nullptr;
  s = q.state;
  s.shape = {int64_t{1} << 62, 64};
  expect_error([&] { msbnb::dequantize_4bit(q.data, s); }, {"state.shape:", "2^63"});
  auto plain = msbnb::quantize_4bit(x, Quantize4bitOptions().quant_type("nf4"));
  s = plain.state;
  s.absmax = plain.state.absmax.clone();
  s.absmax[3] = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { msbnb::dequantize_4bit(plain.data, s); }, {"state.absmax:", "finite"});
  s = plain.state;
  s.code = plain.state.code.clone();
  s.code[2] = std::numeric_limits<float>::infinity();
  expect_error([&] { msbnb::dequantize_4bit(plain.data, s); }, {"state.code:", "finite"});
  s = plain.state;
  s.offset = torch::zeros({});
  expect_error([&] { msbnb::dequantize_4bit(plain.data, s); }, {"state.offset:", "undefined"});
  auto q8 = msbnb::quantize_8bit(x);
  expect_error([&] { msbnb::dequantize_8bit(q8, torch::kInt8); },
               {"dtype:", "float32, float16 or bfloat16", "Char"});
  auto qt = msbnb::quantize_tensor(x, 4, false);
  qt.offset = qt.offset - 100.5;
  expect_error([&] { msbnb::dequantize_tensor(qt); }, {"q.offset:", "integral values in [-15, 0]"});
  expect_error([&] { msbnb::quantize_4bit(x.to_sparse(), kNF4); }, {"x:", "dense", "Sparse"});
}

TEST(BadInput, NegatedViewsAreReadAsTheirValues) {
  const torch::Tensor x = torch::randn({8, 64});
  const torch::Tensor neg = torch::_neg_view(x);  // memory holds x, the view reads -x
  EXPECT_TRUE(torch::equal(msbnb::quantize_8bit(neg).weight_int8, msbnb::quantize_8bit(-x).weight_int8));
  EXPECT_TRUE(torch::equal(msbnb::quantize_4bit(neg, kNF4).data, msbnb::quantize_4bit(-x, kNF4).data));
}

}  // namespace
