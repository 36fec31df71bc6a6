// Gradient allreduce on c10d Gloo between processes (docs/distributed.md, "What is measured").
//
// Run without RANK in the environment, it starts itself twice on 127.0.0.1 (launch_local) and
// rank 0 prints one JSON line per case; with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set (by
// hand or torchrun) it is one rank of a group, so the same program measures across machines.
//
// Cases: adapter-sized gradients (`total` MiB cut into tensors of `tensor` KiB, e.g. LLaMA-7B
// LoRA r=8 on q_proj+v_proj: 128 tensors of 128 KiB = 16 MiB), reduced
//   per_tensor_sync   one allreduce per tensor, each waited for before the next,
//   per_tensor_async  one allreduce per tensor, all started, then all waited for,
//   bucketed_<cap>    DataParallel::synchronize_gradients() with bucket_cap_mb = cap (copy into
//                     the bucket, one allreduce per bucket, divide, copy back);
// and a training step (forward + backward + gradient sync of an MLP) with and without
// overlap_with_backward. Times are the median of `reps` after `warmup`; a barrier precedes each.
//
//   msbnb_bench_allreduce [--reps=20] [--warmup=3] [--world=2] [--threads=1]
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "msbnb/train/distributed.h"

namespace {

using msbnb::train::DataParallel;
using msbnb::train::DataParallelOptions;
using msbnb::train::ProcessGroup;

int arg_int(int argc, char** argv, const std::string& name, int fallback) {
  const std::string key = "--" + name + "=";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind(key, 0) == 0) return std::atoi(a.c_str() + key.size());
  }
  return fallback;
}

double median_ms(ProcessGroup& pg, int warmup, int reps, const std::function<void()>& f) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    pg.barrier();
    const auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

struct GradCase {
  double total_mib;
  int64_t tensor_kib;
  const char* what;
};

int run_rank(int argc, char** argv) {
  const int reps = arg_int(argc, argv, "reps", 20), warmup = arg_int(argc, argv, "warmup", 3);
  torch::set_num_threads(arg_int(argc, argv, "threads", 1));
  auto pg = ProcessGroup::from_env();
  auto report = [&](const std::string& json) {
    if (pg.is_main_process()) std::printf("%s\n", json.c_str());
    std::fflush(stdout);
  };

  const std::vector<GradCase> cases{
      {1, 16, "1 MiB as 64 x 16 KiB (hidden 512, r=8, 4 modules x 4 layers x A,B)"},
      {16, 128, "16 MiB as 128 x 128 KiB (LLaMA-7B r=8 q,v: 32 layers x 2 x A,B)"},
      {16, 16, "16 MiB as 1024 x 16 KiB"}};
  for (const auto& c : cases) {
    const int64_t n_tensors = static_cast<int64_t>(c.total_mib * 1024 / static_cast<double>(c.tensor_kib));
    const int64_t numel = c.tensor_kib * 1024 / 4;
    std::vector<torch::Tensor> params;
    for (int64_t i = 0; i < n_tensors; ++i) {
      params.push_back(torch::zeros({numel}, torch::requires_grad()));
      params.back().mutable_grad() = torch::full({numel}, static_cast<float>(pg.rank() + 1));
    }
    std::vector<torch::Tensor> grads;
    for (auto& p : params) grads.push_back(p.grad());
    auto emit = [&](const std::string& mode, double ms, int64_t collectives) {
      char buf[512];
      std::snprintf(
          buf, sizeof(buf),
          "{\"bench\":\"allreduce\",\"world\":%lld,\"total_mib\":%.0f,\"tensor_kib\":%lld,\"tensors\":%lld,"
          "\"mode\":\"%s\",\"collectives\":%lld,\"median_ms\":%.3f,\"GB_per_s\":%.2f,\"case\":\"%s\"}",
          static_cast<long long>(pg.world_size()), c.total_mib, static_cast<long long>(c.tensor_kib),
          static_cast<long long>(n_tensors), mode.c_str(), static_cast<long long>(collectives), ms,
          c.total_mib * 1024 * 1024 / (ms * 1e6), c.what);
      report(buf);
    };
    emit("per_tensor_sync",
         median_ms(pg, warmup, reps,
                   [&] {
                     for (auto& g : grads) pg.all_reduce_sum(g);
                   }),
         n_tensors);
    emit("per_tensor_async",
         median_ms(pg, warmup, reps,
                   [&] {
                     std::vector<msbnb::train::PendingCollective> w;
                     for (auto& g : grads) w.push_back(pg.all_reduce_sum_async(g));
                     for (auto& x : w) x.wait();
                   }),
         n_tensors);
    for (double cap : {1.0, 4.0, 25.0}) {
      DataParallel dp(pg, params, DataParallelOptions().bucket_cap_mb(cap).broadcast_parameters(false));
      const auto nb = static_cast<int64_t>(dp.bucket_indices().size());
      emit("bucketed_" + std::to_string(static_cast<int>(cap)) + "MiB",
           median_ms(pg, warmup, reps, [&] { dp.synchronize_gradients(); }), nb);
    }
  }

  // A training step: does starting the buckets from backward hooks pay?
  for (int64_t width : {512, 1024}) {
    const int64_t layers = 8, batch = 32;
    for (bool overlap : {false, true}) {
      torch::manual_seed(0);
      torch::nn::Sequential model;
      for (int64_t l = 0; l < layers; ++l) {
        model->push_back(torch::nn::Linear(width, width));
        model->push_back(torch::nn::Functional(torch::relu));
      }
      DataParallel dp(pg, *model, DataParallelOptions().bucket_cap_mb(4).overlap_with_backward(overlap));
      auto x = torch::randn({batch, width});
      auto step = [&] {
        for (auto& p : dp.parameters()) p.mutable_grad() = torch::Tensor();
        model->forward(x).square().mean().backward();
        dp.synchronize_gradients();
      };
      auto local = [&] {
        for (auto& p : dp.parameters()) p.mutable_grad() = torch::Tensor();
        model->forward(x).square().mean().backward();
      };
      const double ms = median_ms(pg, warmup, reps, step);
      double compute_ms = 0;
      if (!overlap) {
        // The same forward + backward without the sync, to see what communication adds. The
        // hooks are not installed without overlap, so this is compute alone.
        compute_ms = median_ms(pg, warmup, reps, local);
      }
      const double mib = static_cast<double>(layers * (width * width + width) * 4) / (1024.0 * 1024.0);
      char buf[512];
      std::snprintf(
          buf, sizeof(buf),
          "{\"bench\":\"train_step\",\"world\":%lld,\"layers\":%lld,\"width\":%lld,\"batch_per_rank\":%lld,"
          "\"grad_mib\":%.1f,\"buckets\":%zu,\"overlap\":%s,\"median_ms\":%.3f%s,"
          "\"started_in_backward\":%lld}",
          static_cast<long long>(pg.world_size()), static_cast<long long>(layers),
          static_cast<long long>(width), static_cast<long long>(batch), mib, dp.bucket_indices().size(),
          overlap ? "true" : "false", ms,
          overlap ? "" : (",\"compute_only_ms\":" + std::to_string(compute_ms)).c_str(),
          static_cast<long long>(dp.buckets_started_in_backward()));
      report(buf);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (std::getenv("RANK") != nullptr) return run_rank(argc, argv);
  std::vector<std::string> args(argv + 1, argv + argc);
  const auto r = msbnb::train::launch_local("/proc/self/exe", args,
                                            msbnb::train::LaunchOptions()
                                                .world_size(arg_int(argc, argv, "world", 2))
                                                .deadline(std::chrono::minutes(10)));
  if (!r.ok()) {
    std::fprintf(stderr, "bench_allreduce: a rank failed:");
    for (int c : r.exit_codes) std::fprintf(stderr, " %d", c);
    std::fprintf(stderr, "\n");
    return 1;
  }
  return 0;
}
