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
    EXPECT_NE(std::string(e.what()).find("MSBNB_ISA"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace msbnb::test
