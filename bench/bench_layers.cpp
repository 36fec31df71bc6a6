// Overhead of the torch::nn modules over the raw functional call they wrap: Linear4bit /
// Linear8bit forward against msbnb::quantized_matmul on the same packed
// weight, same input, in the same run. Copies of the layer (--copies) are cycled so that the
// weights stream from memory as in a model; the two forms alternate pass by pass, so a change of
// the machine's bandwidth state hits both alike. Prints one JSON line per case.
//
//   msbnb_bench_layers [--m=4096] [--k=4096] [--n=1] [--copies=8] [--rounds=300] [--threads=2]
#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "msbnb/functional/matmul.h"
#include "msbnb/nn/linear.h"

namespace {

int64_t arg(int argc, char** argv, const char* name, int64_t def) {
  const std::string prefix = std::string("--") + name + "=";
  for (int i = 1; i < argc; ++i)
    if (std::strncmp(argv[i], prefix.c_str(), prefix.size()) == 0) return std::atoll(argv[i] + prefix.size());
  return def;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double now_us() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct Case {
  std::string name;
  std::function<void(size_t)> module_call, functional_call;
};

}  // namespace

int main(int argc, char** argv) {
  const int64_t m = arg(argc, argv, "m", 4096), k = arg(argc, argv, "k", 4096), n = arg(argc, argv, "n", 1);
  const int64_t copies = arg(argc, argv, "copies", 8), rounds = arg(argc, argv, "rounds", 300);
  at::set_num_threads(static_cast<int>(arg(argc, argv, "threads", 2)));
  torch::manual_seed(0);
  torch::NoGradGuard no_grad;
  const torch::Tensor x = torch::randn({n, k});

  std::vector<msbnb::nn::Linear4bit> nf4;
  std::vector<msbnb::nn::Linear8bit> i8;
  std::vector<msbnb::PackedWeight> nf4_w, i8_w;
  for (int64_t c = 0; c < copies; ++c) {
    torch::nn::Linear lin(torch::nn::LinearOptions(k, m).bias(true));
    nf4.push_back(msbnb::nn::Linear4bit::from_linear(
        lin, msbnb::nn::Linear4bitOptions(k, m).quant_type("nf4").compress_statistics(true)));
    nf4_w.push_back(nf4.back()->packed_weight());
    i8.push_back(msbnb::nn::Linear8bit::from_linear(lin, msbnb::nn::Linear8bitOptions(k, m).threshold(0.0)));
    i8_w.push_back(i8.back()->packed_weight());
  }
  std::vector<Case> cases = {
      {"nf4 double quant (Linear4bit vs quantized_matmul)", [&](size_t c) { nf4[c]->forward(x); },
       [&](size_t c) { msbnb::quantized_matmul(x, nf4_w[c], nf4[c]->bias); }},
      {"int8 threshold 0 (Linear8bit vs quantized_matmul)", [&](size_t c) { i8[c]->forward(x); },
       [&](size_t c) { msbnb::quantized_matmul(x, i8_w[c], i8[c]->bias); }},
  };
  std::printf("# %lld x %lld weights, n = %lld, %lld copies, %d threads, %lld rounds\n",
              static_cast<long long>(m), static_cast<long long>(k), static_cast<long long>(n),
              static_cast<long long>(copies), at::get_num_threads(), static_cast<long long>(rounds));
  int failures = 0;
  for (const Case& cs : cases) {
    // The module's result must be the functional call's, bit for bit (same kernels, same path).
    if (!torch::equal(cs.name[0] == 'n' ? nf4[0]->forward(x) : i8[0]->forward(x),
                      cs.name[0] == 'n' ? msbnb::quantized_matmul(x, nf4_w[0], nf4[0]->bias)
                                        : msbnb::quantized_matmul(x, i8_w[0], i8[0]->bias))) {
      std::printf("MISMATCH: %s: module and functional results differ\n", cs.name.c_str());
      ++failures;
    }
    // One pass over every copy with the module, one with the functional call, their order
    // alternating by round: each call reads its weight from memory (copies * weight > cache).
    std::vector<double> mod, fun;
    for (int64_t r = 0; r < rounds + 10; ++r)
      for (int pass = 0; pass < 2; ++pass) {
        const bool is_module = (pass == 0) == (r % 2 == 0);
        for (size_t c = 0; c < static_cast<size_t>(copies); ++c) {
          const double t0 = now_us();
          is_module ? cs.module_call(c) : cs.functional_call(c);
          const double t = now_us() - t0;
          if (r >= 10) (is_module ? mod : fun).push_back(t);  // 10 warm-up rounds
        }
      }
    const double mm = median(mod), fm = median(fun);
    std::printf("{\"case\":\"%s\",\"module_median_us\":%.2f,\"functional_median_us\":%.2f,\"ratio\":%.4f}\n",
                cs.name.c_str(), mm, fm, mm / fm);
  }
  return failures ? 1 : 0;
}
