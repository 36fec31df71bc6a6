// An exception thrown inside an OpenMP region would be std::terminate: each task body runs in
// ParallelErrors::run, which keeps the first exception, and rethrow() raises it after the region.
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
