// The check every test suite makes of bad input: f throws a c10::Error whose message holds each
// of `parts` (the argument, what was expected, what came).
#pragma once
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

namespace msbnb::test {

/// Runs f, expects a c10::Error whose message contains every one of `parts`; returns the message
/// ("" and a failure when nothing was thrown).
inline std::string expect_error(const std::function<void()>& f, const std::vector<std::string>& parts) {
  try {
    f();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    for (const auto& p : parts)
      EXPECT_NE(msg.find(p), std::string::npos) << "missing \"" << p << "\" in: " << msg;
    return msg;
  }
  ADD_FAILURE() << "expected a c10::Error containing \"" << (parts.empty() ? "" : parts[0]) << "\"";
  return "";
}

}  // namespace msbnb::test
