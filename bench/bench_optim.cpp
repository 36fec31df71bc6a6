// Cost of one optimizer step per parameter: the fused 8-bit kernels (msbnb/kernels/optim8.h)
// through AdamW8bit / Lion8bit and through each ISA's kernel table directly (the scalar path
// included), against torch::optim::AdamW's step on the same parameters, 1 and 2 threads. Prints
// one JSON line per case and a table: median ms per step, ns per parameter, GB/s of the state +
// parameter traffic, and the CPUs other processes used meanwhile (bench_util.h other_cpu: >= 0.1
// means the case shared the machine).
//
//   msbnb_bench_optim [--n=16777216] [--steps=15] [--threads=1,2] [--isa=all]
//
// Traffic counted per parameter (the minimum a step must move): 8-bit Adam reads p, g (4 + 4),
// two codes (1 + 1) and writes p and the codes (4 + 1 + 1): 16 bytes (+ 2 x 2 x 4 / 256 of absmax);
// 8-bit Lion 4 + 4 + 1 + 4 + 1 = 14; fp32 AdamW reads p, g, m, v and writes p, m, v: 28.
#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "bench_util.h"
#include "msbnb/kernels/kernel_table.h"
#include "msbnb/kernels/ops.h"
#include "msbnb/kernels/optim8.h"
#include "msbnb/optim/optim8bit.h"

namespace {

namespace K = msbnb::kernels;

std::string arg_str(int argc, char** argv, const char* name, const std::string& def) {
  const std::string prefix = std::string("--") + name + "=";
  for (int i = 1; i < argc; ++i)
    if (std::strncmp(argv[i], prefix.c_str(), prefix.size()) == 0) return argv[i] + prefix.size();
  return def;
}

std::vector<int> int_list(const std::string& s) {
  std::vector<int> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) v.push_back(std::atoi(item.c_str()));
  return v;
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Result {
  std::string name;
  int threads;
  double ms, ns_per_param, gbs, other_cpu;
};

// Median seconds of `steps` calls of fn (after 2 warm-up calls), and the other processes' CPUs.
std::pair<double, double> time_steps(int steps, const std::function<void()>& fn) {
  fn();
  fn();
  std::vector<double> t;
  const msbnb::bench::CpuSnapshot a = msbnb::bench::cpu_snapshot();
  const double w0 = now_s();
  for (int i = 0; i < steps; ++i) {
    const double t0 = now_s();
    fn();
    t.push_back(now_s() - t0);
  }
  const double other = msbnb::bench::other_cpu(a, msbnb::bench::cpu_snapshot(), now_s() - w0);
  return {msbnb::bench::median(t), other};
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t n = std::atoll(arg_str(argc, argv, "n", "16777216").c_str());
  const int steps = std::atoi(arg_str(argc, argv, "steps", "15").c_str());
  const std::vector<int> thread_list = int_list(arg_str(argc, argv, "threads", "1,2"));
  const std::string isa_arg = arg_str(argc, argv, "isa", "all");
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);

  const torch::Tensor p0 = torch::randn({n}) * 0.1, grad = torch::randn({n}) * 1e-3;
  std::vector<Result> results;
  auto record = [&](const std::string& name, int threads, double bytes_per_param,
                    std::pair<double, double> r) {
    const double sec = r.first;
    results.push_back({name, threads, sec * 1e3, sec / static_cast<double>(n) * 1e9,
                       bytes_per_param * static_cast<double>(n) / sec / 1e9, r.second});
    const Result& x = results.back();
    std::printf(
        "{\"case\":\"%s\",\"threads\":%d,\"n\":%lld,\"ms_per_step\":%.3f,\"ns_per_param\":%.4f,\"GBps\":%.2f,"
        "\"other_cpu\":%.2f}\n",
        x.name.c_str(), x.threads, static_cast<long long>(n), x.ms, x.ns_per_param, x.gbs, x.other_cpu);
    std::fflush(stdout);
  };
  const double adam8_bytes = 16.0 + 16.0 / 256, lion8_bytes = 14.0 + 8.0 / 256, adam32_bytes = 28.0;

  for (int threads : thread_list) {
    at::set_num_threads(threads);
    K::set_num_threads(threads);
    msbnb::bench::wait_idle(20);
    {  // torch::optim::AdamW, fp32 states
      torch::Tensor p = p0.clone().requires_grad_(true);
      p.mutable_grad() = grad.clone();
      torch::optim::AdamW opt(std::vector<torch::Tensor>{p},
                              torch::optim::AdamWOptions(1e-3).weight_decay(1e-2));
      record("torch AdamW (fp32 states)", threads, adam32_bytes, time_steps(steps, [&] { opt.step(); }));
    }
    {  // msbnb AdamW8bit (the optimizer: checks + the active ISA's kernel)
      torch::Tensor p = p0.clone().requires_grad_(true);
      p.mutable_grad() = grad.clone();
      msbnb::optim::AdamW8bit opt(std::vector<torch::Tensor>{p}, msbnb::optim::AdamW8bitOptions(1e-3));
      record(std::string("msbnb AdamW8bit (") + K::isa_name(K::active_isa()) + ")", threads, adam8_bytes,
             time_steps(steps, [&] { opt.step(); }));
    }
    {  // msbnb Lion8bit
      torch::Tensor p = p0.clone().requires_grad_(true);
      p.mutable_grad() = grad.clone();
      msbnb::optim::Lion8bit opt(std::vector<torch::Tensor>{p}, msbnb::optim::Lion8bitOptions(1e-4));
      record(std::string("msbnb Lion8bit (") + K::isa_name(K::active_isa()) + ")", threads, lion8_bytes,
             time_steps(steps, [&] { opt.step(); }));
    }
    // The kernel tables directly (every ISA this CPU runs, scalar included), through the driver.
    for (int i = 0; i < K::kNumIsas; ++i) {
      const K::Isa isa = static_cast<K::Isa>(i);
      if (!K::isa_supported(isa) || (isa_arg != "all" && isa_arg != K::isa_name(isa))) continue;
      torch::Tensor p = p0.clone();
      const torch::Tensor s1 = torch::zeros({n}, torch::kUInt8), s2 = torch::zeros({n}, torch::kUInt8);
      const torch::Tensor a1 = torch::zeros({(n + 255) / 256}), a2 = torch::zeros({(n + 255) / 256});
      int64_t t = 0;
      const K::KernelTable& k = K::kernels_for(isa);
      record(std::string("kernel optim8_adam ") + K::isa_name(isa), threads, adam8_bytes,
             time_steps(steps, [&] {
               K::optim8_adam(p.data_ptr<float>(), grad.data_ptr<float>(), s1.data_ptr<uint8_t>(),
                              s2.data_ptr<uint8_t>(), a1.data_ptr<float>(), a2.data_ptr<float>(), n, 256,
                              K::optim8_adam_params(1e-3, 0.9, 0.999, 1e-8, 1e-2, true, ++t),
                              K::optim8_signed_map(), K::optim8_unsigned_map(), k);
             }));
    }
  }
  std::printf("\n%-34s %7s %10s %10s %8s %9s\n", "case", "threads", "ms/step", "ns/param", "GB/s",
              "other_cpu");
  for (const Result& r : results)
    std::printf("%-34s %7d %10.2f %10.3f %8.2f %9.2f\n", r.name.c_str(), r.threads, r.ms, r.ns_per_param,
                r.gbs, r.other_cpu);
  return 0;
}
