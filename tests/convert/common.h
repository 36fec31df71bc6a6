// Helpers shared by the conversion tests.
#pragma once
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <initializer_list>
#include <string>

namespace msbnb_test {

// Runs fn, which must throw c10::Error with every one of `parts` in its message.
inline void expect_error(const std::function<void()>& fn, std::initializer_list<const char*> parts) {
  try {
    fn();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    for (const char* p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
    return;
  }
  ADD_FAILURE() << "no c10::Error thrown";
}

// Bytes of a tensor's elements, computed from its shape and dtype.
inline int64_t nbytes(const torch::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

}  // namespace msbnb_test
