// Helpers shared by the conversion tests.
#pragma once
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <initializer_list>
#include <string>

#include "expect_error.h"

namespace msbnb_test {

using ::msbnb::test::expect_error;

// Bytes of a tensor's elements, computed from its shape and dtype.
inline int64_t nbytes(const torch::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

}  // namespace msbnb_test
