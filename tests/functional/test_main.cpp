// ctest runs this suite once per ISA with MSBNB_ISA set. On a CPU without that ISA nothing runs
// and the run says SKIPPED, which ctest reports as skipped (a global GTEST_SKIP would count as
// passed in GoogleTest 1.12).
#include <gtest/gtest.h>
#include <torch/types.h>

#include <cstdio>
#include <cstdlib>

#include "msbnb/kernels/kernel_table.h"

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  torch::manual_seed(0);  // tests that draw without a seed of their own draw the same values
  const char* forced = std::getenv("MSBNB_ISA");
  if (forced && *forced) {
    if (!msbnb::kernels::isa_supported(msbnb::kernels::isa_from_name(forced))) {
      std::printf("[  SKIPPED ] this CPU lacks %s: its kernels are not tested here\n", forced);
      return 0;
    }
    std::printf("msbnb kernels: %s (MSBNB_ISA)\n", msbnb::kernels::isa_name(msbnb::kernels::active_isa()));
  }
  return RUN_ALL_TESTS();
}
