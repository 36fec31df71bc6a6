// An exception thrown on a pool worker (kernels/thread_pool.h) would be std::terminate: each chunk
// runs in ParallelErrors::run, which keeps the first exception, and rethrow() raises it in the caller.
#pragma once
#include <exception>
#include <mutex>

namespace msbnb::kernels {
namespace {

class ParallelErrors {
 public:
  template <class F>
  void run(F&& f) noexcept {
    try {
      f();
    } catch (...) {
      const std::lock_guard<std::mutex> lock(mu_);
      if (!first_) first_ = std::current_exception();
    }
  }
  void rethrow() const {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::mutex mu_;
  std::exception_ptr first_;
};

}  // namespace
}  // namespace msbnb::kernels
