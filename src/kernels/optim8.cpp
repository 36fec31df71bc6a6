// Threaded drivers of the 8-bit optimizer kernels: whole blocks in chunks over the kernels' pool.
#include "msbnb/kernels/optim8.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels/thread_pool.h"
#include "msbnb/kernels/ops.h"

namespace msbnb::kernels {
namespace {

// Elements per task: a few hundred blocks, enough to amortise scheduling, small enough to balance.
constexpr int64_t kChunk = int64_t{1} << 15;

[[noreturn]] void bad_arg(const char* fn, const char* arg, const std::string& expected,
                          const std::string& got) {
  throw std::invalid_argument(std::string(fn) + ": " + arg + ": expected " + expected + ", got " + got);
}
void check_ptr(const char* fn, const char* arg, const void* p, int64_t n) {
  if (n > 0 && !p) bad_arg(fn, arg, "a buffer", "null");
}
void check_sizes(const char* fn, int64_t n, int64_t bs) {
  if (n < 0) bad_arg(fn, "n", ">= 0", std::to_string(n));
  if (bs < 1 || bs > kOptim8MaxBlock)
    bad_arg(fn, "bs", "a block size in [1, " + std::to_string(kOptim8MaxBlock) + "]", std::to_string(bs));
}

// fn(first_block, element_offset, count) over [0, n) in chunks of whole blocks.
template <class Fn>
void parallel_blocks(int64_t n, int64_t bs, Fn&& fn) {
  const int64_t per_task = std::max<int64_t>(1, kChunk / bs) * bs;
  const int64_t tasks = ceil_div(n, per_task);
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads(), tasks)));
  parallel_for_chunks(tasks, threads, [&](int64_t t) {
    const int64_t start = t * per_task;
    fn(start / bs, start, std::min(per_task, n - start));
  });
}

Lut8 make_map(bool is_signed) {
  const auto code = create_dynamic_map(is_signed);
  return make_lut8(code.data());
}

}  // namespace

const Lut8& optim8_signed_map() {
  static const Lut8 map = make_map(true);
  return map;
}
const Lut8& optim8_unsigned_map() {
  static const Lut8 map = make_map(false);
  return map;
}

Optim8Params optim8_adam_params(double lr, double beta1, double beta2, double eps, double weight_decay,
                                bool decoupled, int64_t t) {
  Optim8Params k;
  k.beta1 = static_cast<float>(beta1);
  k.beta2 = static_cast<float>(beta2);
  k.one_minus_beta1 = 1.0f - k.beta1;
  k.one_minus_beta2 = 1.0f - k.beta2;
  // The corrections of the float betas the moments use (bitsandbytes: __powf of the float
  // beta), so m / c1 and v / c2^2 are unbiased for exactly the weights the kernels apply.
  const double c1 = 1.0 - std::pow(static_cast<double>(k.beta1), static_cast<double>(t));
  const double c2 = std::sqrt(1.0 - std::pow(static_cast<double>(k.beta2), static_cast<double>(t)));
  k.step_size = static_cast<float>(lr * c2 / c1);
  k.eps = static_cast<float>(c2 * eps);
  k.lr = static_cast<float>(lr);
  k.decay = decoupled ? static_cast<float>(1.0 - lr * weight_decay) : 1.0f;
  k.l2 = decoupled ? 0.0f : static_cast<float>(weight_decay);
  return k;
}

Optim8Params optim8_lion_params(double lr, double beta1, double beta2, double weight_decay) {
  Optim8Params k;
  k.beta1 = static_cast<float>(beta1);
  k.beta2 = static_cast<float>(beta2);
  k.one_minus_beta1 = 1.0f - k.beta1;
  k.one_minus_beta2 = 1.0f - k.beta2;
  k.lr = static_cast<float>(lr);
  k.decay = static_cast<float>(1.0 - lr * weight_decay);
  return k;
}

void optim8_adam(float* p, const float* g, uint8_t* s1, uint8_t* s2, float* absmax1, float* absmax2,
                 int64_t n, int64_t bs, const Optim8Params& prm, const Lut8& map1, const Lut8& map2,
                 const KernelTable& k) {
  const char* fn = "optim8_adam";
  check_sizes(fn, n, bs);
  check_ptr(fn, "p", p, n);
  check_ptr(fn, "g", g, n);
  check_ptr(fn, "s1", s1, n);
  check_ptr(fn, "s2", s2, n);
  check_ptr(fn, "absmax1", absmax1, n);
  check_ptr(fn, "absmax2", absmax2, n);
  if (n == 0) return;
  parallel_blocks(n, bs, [&](int64_t b, int64_t s, int64_t len) {
    k.optim8_adam_blocks(p + s, g + s, s1 + s, s2 + s, absmax1 + b, absmax2 + b, len, bs, &prm, &map1, &map2);
  });
}

void optim8_lion(float* p, const float* g, uint8_t* s1, float* absmax1, int64_t n, int64_t bs,
                 const Optim8Params& prm, const Lut8& map1, const KernelTable& k) {
  const char* fn = "optim8_lion";
  check_sizes(fn, n, bs);
  check_ptr(fn, "p", p, n);
  check_ptr(fn, "g", g, n);
  check_ptr(fn, "s1", s1, n);
  check_ptr(fn, "absmax1", absmax1, n);
  if (n == 0) return;
  parallel_blocks(n, bs, [&](int64_t b, int64_t s, int64_t len) {
    k.optim8_lion_blocks(p + s, g + s, s1 + s, absmax1 + b, len, bs, &prm, &map1);
  });
}

}  // namespace msbnb::kernels
