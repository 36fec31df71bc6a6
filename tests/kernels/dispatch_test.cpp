// The one dispatch point: names, the forced ISA, and errors for unknown or unsupported ones.
#include <gtest/gtest.h>

#include <cstdlib>
#include <stdexcept>
#include <string>

#include "msbnb/kernels/kernel_table.h"
#include "test_util.h"

namespace msbnb::test {
namespace {

TEST(Dispatch, NamesRoundTrip) {
  for (Isa isa : all_isas()) EXPECT_EQ(kernels::isa_from_name(kernels::isa_name(isa)), isa);
  try {
    kernels::isa_from_name("avx9");
    ADD_FAILURE() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("avx9"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(kernels::isa_supported(Isa::scalar));
  for (Isa isa : all_isas()) {
    if (!kernels::isa_supported(isa)) {
      EXPECT_THROW(kernels::kernels_for(isa), std::runtime_error);
    }
  }
}

// Run with MSBNB_ISA unset (best ISA), set to a supported ISA (honoured) or to an unknown or
// unsupported one (an error naming the variable; ctest runs that case too).
TEST(Dispatch, ForcedIsaIsHonouredOrRejected) {
  const char* forced = std::getenv("MSBNB_ISA");
  if (!forced || !*forced) {
    Isa best = Isa::scalar;
    for (Isa isa : all_isas())
      if (kernels::isa_supported(isa)) best = isa;
    EXPECT_EQ(kernels::active_isa(), best);
    EXPECT_EQ(kernels::active_kernels().isa, best);
    return;
  }
  bool valid = true;
  try {
    valid = kernels::isa_supported(kernels::isa_from_name(forced));
  } catch (const std::invalid_argument&) {
    valid = false;
  }
  if (valid) {
    EXPECT_STREQ(kernels::isa_name(kernels::active_isa()), forced);
    return;
  }
  try {
    kernels::active_isa();
    ADD_FAILURE() << "MSBNB_ISA=" << forced << " was accepted";
  } catch (const std::runtime_error& e) {
    // The message names the variable, the value and what is accepted.
    const std::string what = e.what();
    EXPECT_NE(what.find("MSBNB_ISA"), std::string::npos) << what;
    EXPECT_NE(what.find(std::string("'") + forced + "'"), std::string::npos) << what;
    EXPECT_NE(what.find("scalar"), std::string::npos) << what;
  }
}

// Each tier's null entries come from the completed tier below, never straight from scalar: the
// avx512 row (no VNNI) has avx2's int8_i8, avx2 (no quantize_row_u8) has scalar's; and no
// completed table has a null entry.
TEST(Dispatch, TablesAreCompletedFromTheTierBelow) {
  EXPECT_EQ(kernels::isa_base(Isa::scalar), Isa::scalar);
  for (Isa isa : all_isas()) {
    if (!kernels::isa_supported(isa)) continue;
    const kernels::KernelTable& t = kernels::kernels_for(isa);
    EXPECT_EQ(t.isa, isa);
#define MSBNB_KERNEL(name, params) EXPECT_NE(t.name, nullptr) << kernels::isa_name(isa) << " " #name;
#define MSBNB_MATMUL_KERNEL(name, params) \
  EXPECT_NE(t.matmul.name, nullptr) << kernels::isa_name(isa) << " matmul." #name;
#include "msbnb/kernels/kernels.def"
#undef MSBNB_KERNEL
#undef MSBNB_MATMUL_KERNEL
    if (isa == Isa::scalar) continue;
    const Isa base = kernels::isa_base(isa);
    EXPECT_LT(static_cast<int>(base), static_cast<int>(isa)) << kernels::isa_name(isa);
    EXPECT_TRUE(kernels::isa_supported(base)) << kernels::isa_name(isa) << " runs but its base does not";
  }
#if defined(__x86_64__)
  if (kernels::isa_supported(Isa::avx512)) {
    EXPECT_EQ(kernels::isa_base(Isa::avx512), Isa::avx2);
    EXPECT_EQ(kernels::kernels_for(Isa::avx512).matmul.int8_i8,
              kernels::kernels_for(Isa::avx2).matmul.int8_i8);
    EXPECT_NE(kernels::kernels_for(Isa::avx512).matmul.int8_i8,
              kernels::kernels_for(Isa::scalar).matmul.int8_i8);
    EXPECT_EQ(kernels::kernels_for(Isa::avx512).matmul.lut4_bf16,
              kernels::kernels_for(Isa::avx2).matmul.lut4_bf16);
  }
  if (kernels::isa_supported(Isa::avx512_vnni)) {
    EXPECT_NE(kernels::kernels_for(Isa::avx512_vnni).matmul.int8_i8,
              kernels::kernels_for(Isa::avx2).matmul.int8_i8);
  }
  if (kernels::isa_supported(Isa::avx512_bf16)) {
    EXPECT_NE(kernels::kernels_for(Isa::avx512_bf16).matmul.lut4_bf16,
              kernels::kernels_for(Isa::avx512_vnni).matmul.lut4_bf16);
  }
  if (kernels::isa_supported(Isa::avx2)) {
    EXPECT_EQ(kernels::kernels_for(Isa::avx2).matmul.quantize_row_u8,
              kernels::kernels_for(Isa::scalar).matmul.quantize_row_u8);
  }
#else
  // Only the scalar row is built here: every other row is of another architecture.
  for (Isa isa : all_isas()) {
    if (isa != Isa::scalar) {
      EXPECT_FALSE(kernels::isa_supported(isa)) << kernels::isa_name(isa);
    }
  }
#endif
}

// Messages list every accepted id of isa.def.
TEST(Dispatch, NamesListEveryRow) {
  const std::string names = kernels::isa_names();
  for (Isa isa : all_isas()) EXPECT_NE(names.find(kernels::isa_name(isa)), std::string::npos) << names;
  try {
    kernels::isa_from_name("avx9");
    ADD_FAILURE() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(names), std::string::npos) << e.what();
  }
}

// The prepared codebook of a format is its formats.def row's (never another format's table).
TEST(FormatTable, Lut4ComesFromTheFormatRow) {
  for (const kernels::FormatInfo& info : codebook_formats()) {
    const kernels::Lut4& lut = kernels::format_lut4(info.format);
    const kernels::Lut4 want = kernels::make_lut4(info.codebook);
    for (int i = 0; i < 16; ++i) {
      EXPECT_EQ(bits_of(lut.code[i]), bits_of(info.codebook[i])) << info.name << " " << i;
      EXPECT_EQ(lut.sorted_to_code[i], want.sorted_to_code[i]) << info.name << " " << i;
    }
    EXPECT_EQ(lut.zero_code, want.zero_code) << info.name;
  }
  try {
    kernels::format_lut4(kernels::Format::int8);
    ADD_FAILURE() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("'int8'"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace msbnb::test
