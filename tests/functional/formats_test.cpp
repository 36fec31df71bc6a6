// Format definitions against DESIGN.md: code tables, nibble orders, maps, known values.
#include <gtest/gtest.h>

#include "msbnb/msbnb.h"

namespace {

using msbnb::Quantize4bitOptions;

TEST(Formats, TableRowsMatchDesign) {
  using msbnb::kernels::Format;
  EXPECT_STREQ(msbnb::kernels::format_info(Format::nf4).name, "nf4");
  EXPECT_EQ(msbnb::kernels::format_info(Format::nf4).default_block, 64);
  EXPECT_EQ(msbnb::kernels::format_info(Format::int4).default_block, 128);
  EXPECT_EQ(msbnb::kernels::format_info(Format::fp4).nibble_order, msbnb::kernels::NibbleOrder::high_first);
  EXPECT_EQ(msbnb::kernels::format_info(Format::int4).nibble_order, msbnb::kernels::NibbleOrder::low_first);
  EXPECT_EQ(msbnb::kernels::format_from_name("fp4"), Format::fp4);
  EXPECT_THROW(msbnb::kernels::format_from_name("int3"), std::invalid_argument);
}

TEST(Formats, NF4AndFP4CodesAsDesign) {
  // DESIGN.md prints 7 decimals: each code is within half a unit of the 7th decimal.
  const double nf4[16] = {-1.0,       -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734,
                          -0.0910500, 0.0,        0.0795803,  0.1609302,  0.2461123,  0.3379152,
                          0.4407098,  0.5626170,  0.7229568,  1.0};
  const double fp4[8] = {0.0, 0.0052083, 0.6666667, 1.0, 0.3333333, 0.5, 0.1666667, 0.25};
  for (int i = 0; i < 16; ++i) EXPECT_NEAR(msbnb::kernels::kCodeNF4[i], nf4[i], 5e-8) << i;
  for (int i = 0; i < 8; ++i) {
    EXPECT_NEAR(msbnb::kernels::kCodeFP4[i], fp4[i], 5e-8) << i;
    if (i > 0) {
      EXPECT_EQ(msbnb::kernels::kCodeFP4[i + 8], -msbnb::kernels::kCodeFP4[i]) << i;
    }
  }
  // Index 8 is +0, byte for byte bitsandbytes' quant_map (its `-0` is a Python int): a -0 here
  // made our saved quant_map differ from bitsandbytes' (torch::equal cannot see the sign).
  EXPECT_EQ(msbnb::kernels::kCodeFP4[8], 0.0f);
  EXPECT_FALSE(std::signbit(msbnb::kernels::kCodeFP4[8]));
}

// Each code value quantizes to its own index; the high nibble holds the first element.
TEST(Formats, CodebookValuesQuantizeToTheirIndexHighNibbleFirst) {
  for (const char* type : {"nf4", "fp4"}) {
    const float* code = std::string(type) == "nf4" ? msbnb::kernels::kCodeNF4 : msbnb::kernels::kCodeFP4;
    // 64 elements = one block whose absmax is 1 (codes 3 / 15 are 1.0): x / absmax = code.
    torch::Tensor x = torch::zeros({64});
    for (int i = 0; i < 16; ++i) x[i] = code[i];
    auto q = msbnb::quantize_4bit(x, Quantize4bitOptions().quant_type(type).blocksize(64));
    ASSERT_EQ(q.data.sizes(), (std::vector<int64_t>{32, 1}));
    const uint8_t* p = q.data.data_ptr<uint8_t>();
    for (int i = 0; i < 16; i += 2) {
      // FP4: -0 (index 8) codes as +0 (index 0), as bitsandbytes' sign test x < 0 does.
      const int a = (std::string(type) == "fp4" && i == 8) ? 0 : i;
      EXPECT_EQ(p[i / 2], (a << 4) | (i + 1)) << type << " pair " << i;
    }
    EXPECT_TRUE(
        torch::equal(msbnb::dequantize_4bit(q.data, q.state).slice(0, 0, 16).abs(), x.slice(0, 0, 16).abs()));
  }
}

// bitsandbytes pads an odd count with x = 0, so the pad nibble is the code of 0.
TEST(Formats, OddCountPadsWithTheCodeOfZero) {
  const torch::Tensor x = torch::tensor({1.0f, -1.0f, 1.0f});
  auto nf4 = msbnb::quantize_4bit(x, Quantize4bitOptions().quant_type("nf4").blocksize(64));
  ASSERT_EQ(nf4.data.numel(), 2);
  EXPECT_EQ(nf4.data.data_ptr<uint8_t>()[0], 0xF0);
  EXPECT_EQ(nf4.data.data_ptr<uint8_t>()[1], 0xF7);  // NF4 index 7 is 0.0
  auto fp4 = msbnb::quantize_4bit(x, Quantize4bitOptions().quant_type("fp4").blocksize(64));
  EXPECT_EQ(fp4.data.data_ptr<uint8_t>()[0], 0x3B);  // +1 is index 3, -1 is index 11
  EXPECT_EQ(fp4.data.data_ptr<uint8_t>()[1], 0x30);  // FP4 index 0 is 0.0
}

TEST(Formats, Int4Qint4x2LowNibbleFirstTwosComplement) {
  // One group of 4, absmax 7 -> scale 1: values are their own codes.
  torch::Tensor x = torch::tensor({{1.0f, -1.0f, 7.0f, -7.0f}, {0.0f, 3.0f, -2.0f, 0.0f}});
  auto q = msbnb::quantize_4bit(x, Quantize4bitOptions().quant_type("int4").blocksize(4));
  ASSERT_EQ(q.data.sizes(), (std::vector<int64_t>{2, 2}));
  const uint8_t* p = q.data.data_ptr<uint8_t>();
  EXPECT_EQ(p[0], 0xF1);  // 1 low, -1 (0xF) high
  EXPECT_EQ(p[1], 0x97);  // 7 low, -7 (0x9) high
  // Row 2 has absmax 3, scale 3/7: 0 -> 0, 3 -> 7, -2 -> rne(-4.67) = -5 (0xB), 0 -> 0.
  EXPECT_EQ(p[2], 0x70);
  EXPECT_EQ(p[3], 0x0B);
}

TEST(Formats, PackUnpackQint4x2) {
  torch::Tensor v = torch::tensor({{-8, 7, 0, -1, 5}, {1, 2, 3, 4, -3}}, torch::kInt8);
  torch::Tensor p = msbnb::pack_int4_to_qint4x2(v);
  ASSERT_EQ(p.sizes(), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(p.data_ptr<uint8_t>()[0], 0x78);  // -8 = 0x8 low, 7 high
  EXPECT_EQ(p.data_ptr<uint8_t>()[1], 0xF0);  // 0 low, -1 high
  EXPECT_EQ(p.data_ptr<uint8_t>()[2], 0x05);  // 5 low, zero pad high
  EXPECT_TRUE(torch::equal(msbnb::unpack_qint4x2_to_int8(p, 5), v));
  EXPECT_THROW(msbnb::pack_int4_to_qint4x2(torch::tensor({8}, torch::kInt8)), c10::Error);
  EXPECT_THROW(msbnb::unpack_qint4x2_to_int8(p, 7), c10::Error);
}

TEST(Formats, DynamicMapShape) {
  torch::Tensor m = msbnb::create_dynamic_map(true);
  ASSERT_EQ(m.numel(), 256);
  EXPECT_TRUE(torch::equal(std::get<0>(m.sort()), m)) << "not sorted";
  EXPECT_EQ((m < 0).sum().item<int64_t>(), 127);
  EXPECT_EQ((m == 0).sum().item<int64_t>(), 1);
  EXPECT_EQ((m > 0).sum().item<int64_t>(), 128);
  EXPECT_EQ(m.max().item<float>(), 1.0f);
  EXPECT_GT(m.min().item<float>(), -1.0f);  // the signed map has no -1.0
  // Smallest magnitude: 10^-6 times the first mean of linspace(0.1, 1, 2) = 0.55e-6.
  EXPECT_NEAR(m[128].item<float>(), 0.55e-6f, 1e-12);
  torch::Tensor u = msbnb::create_dynamic_map(false);
  EXPECT_EQ((u < 0).sum().item<int64_t>(), 0);
  EXPECT_EQ((u == 0).sum().item<int64_t>(), 1);
  EXPECT_EQ(u.max().item<float>(), 1.0f);
  EXPECT_THROW(msbnb::create_dynamic_map(true, 9, 8), c10::Error);
}

TEST(Formats, NormalMapHoldsNF4) {
  torch::Tensor m = msbnb::create_normal_map();
  ASSERT_EQ(m.numel(), 256);
  torch::Tensor nz = m.index({m != 0});
  ASSERT_EQ(nz.numel(), 15);  // + the zero = the 16 NF4 codes
  int j = 0;
  for (int i = 0; i < 16; ++i) {
    if (msbnb::kernels::kCodeNF4[i] == 0.0f) continue;
    EXPECT_NEAR(nz[j++].item<float>(), msbnb::kernels::kCodeNF4[i], 2e-7) << i;
  }
}

}  // namespace
