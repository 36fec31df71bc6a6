// Data-parallel training over 2 processes on the loopback address (msbnb/train/distributed.h).
//
// The parent test starts 2 copies of this binary with launch_local (posix_spawn of /proc/self/exe:
// no fork of a process that already runs libtorch's threads, and it works under ASan), each
// running only the disabled worker case DistributedWorker.DISABLED_Run, told what to do by
// environment variables. Workers write what they saw into a temporary directory; the parent
// checks it against a one-process run on the full batch. Every launch has a deadline after which
// the children are killed, so a hang is a failure, not a stuck CI job.
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <torch/torch.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "expect_error.h"
#include "msbnb/msbnb.h"

namespace {

using msbnb::train::DataParallel;
using msbnb::train::DataParallelOptions;
using msbnb::train::ProcessGroup;
using msbnb::train::ProcessGroupOptions;

constexpr int64_t kBatch = 16, kIn = 8, kHidden = 16, kOut = 4, kSteps = 5;
constexpr double kLr = 0.1;

using ::msbnb::test::expect_error;

// The model of a run: "plain" or "qlora" (MSBNB_DDP_MODEL in the workers; the parent sets it).
bool g_qlora = false;

// plain: Linear(8,16) frozen, tanh, Linear(16,16) trainable, tanh, Linear(16,4) with a trainable
// weight and a frozen bias: the frozen parameters must be neither communicated nor changed.
// qlora: the same shapes as QLoRA trains them: an NF4 (double-quantized) base with LoRA r = 4, a
// float base with LoRA, an int8 base with LoRA; freeze_model_except_lora leaves only the six
// adapter tensors trainable. B starts nonzero so that every adapter tensor gets a gradient.
torch::nn::Sequential make_model() {
  torch::manual_seed(0);
  if (g_qlora) {
    const auto cfg = msbnb::lora::LoraConfig().r(4).lora_alpha(8);
    torch::nn::Sequential m(msbnb::lora::Linear4bitWithLoRA::from_linear(
                                torch::nn::Linear(kIn, kHidden), cfg,
                                msbnb::nn::Linear4bitOptions(kIn, kHidden).quant_type("nf4")),
                            torch::nn::Functional(torch::tanh),
                            msbnb::lora::LoRALinear::from_linear(torch::nn::Linear(kHidden, kHidden), cfg),
                            torch::nn::Functional(torch::tanh),
                            msbnb::lora::Linear8bitWithLoRA::from_linear(
                                torch::nn::Linear(kHidden, kOut), cfg,
                                msbnb::nn::Linear8bitOptions(kHidden, kOut).threshold(0.0)));
    msbnb::lora::freeze_model_except_lora(*m);
    torch::NoGradGuard ng;
    for (auto& kv : m->named_parameters())
      if (kv.key().find("lora_B") != std::string::npos) torch::nn::init::normal_(kv.value(), 0.0, 0.2);
    return m;
  }
  torch::nn::Sequential m(torch::nn::Linear(kIn, kHidden), torch::nn::Functional(torch::tanh),
                          torch::nn::Linear(kHidden, kHidden), torch::nn::Functional(torch::tanh),
                          torch::nn::Linear(kHidden, kOut));
  auto named = m->named_parameters();
  named["0.weight"].requires_grad_(false);
  named["0.bias"].requires_grad_(false);
  named["4.bias"].requires_grad_(false);
  return m;
}

std::pair<torch::Tensor, torch::Tensor> make_data() {
  auto gen = torch::make_generator<at::CPUGeneratorImpl>(1);
  auto x = torch::randn({kBatch, kIn}, gen);
  auto y = torch::randn({kBatch, kOut}, gen);
  return {x, y};
}

std::vector<torch::Tensor> trainable(const torch::nn::Module& m) {
  std::vector<torch::Tensor> out;
  for (const auto& p : m.parameters())
    if (p.requires_grad()) out.push_back(p);
  return out;
}

torch::Tensor flat_params(const std::vector<torch::Tensor>& ps) {
  std::vector<torch::Tensor> v;
  for (const auto& p : ps) v.push_back(p.detach().reshape({-1}));
  return torch::cat(v);
}

void write_floats(const std::string& path, const torch::Tensor& t) {
  auto c = t.contiguous();
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(c.data_ptr<float>()), static_cast<std::streamsize>(c.numel() * 4));
}

torch::Tensor read_floats(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) return {};
  const auto n = static_cast<int64_t>(f.tellg()) / 4;
  f.seekg(0);
  auto t = torch::empty({n});
  f.read(reinterpret_cast<char*>(t.data_ptr<float>()), n * 4);
  return t;
}

std::string read_text(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write_text(const std::string& path, const std::string& s) { std::ofstream(path) << s; }

const char* env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v ? v : fallback;
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The worker: run only as a child (--gtest_also_run_disabled_tests), with
//   MSBNB_DDP_SCENARIO  train | die | hang
//   MSBNB_DDP_OUT       directory for the results
//   MSBNB_DDP_OVERLAP   0 | 1,  MSBNB_DDP_BUCKET_MB  bucket cap
//   MSBNB_DDP_VICTIM    the rank that dies or stops answering after step 2 (die, hang)
// and the launcher's RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, MSBNB_DIST_TIMEOUT.
TEST(DistributedWorker, DISABLED_Run) {
  const char* scenario_env = std::getenv("MSBNB_DDP_SCENARIO");
  if (scenario_env == nullptr) GTEST_SKIP() << "run by the Distributed tests as a child process";
  const std::string scenario = scenario_env, out = env_or("MSBNB_DDP_OUT", ".");
  const bool overlap = std::string(env_or("MSBNB_DDP_OVERLAP", "0")) == "1";
  const double bucket_mb = std::atof(env_or("MSBNB_DDP_BUCKET_MB", "25"));
  const int64_t victim = std::atoi(env_or("MSBNB_DDP_VICTIM", "-1"));
  g_qlora = std::string(env_or("MSBNB_DDP_MODEL", "plain")) == "qlora";
  torch::set_num_threads(1);

  auto pg = ProcessGroup::from_env();
  const int64_t rank = pg.rank(), world = pg.world_size();
  const std::string prefix = out + "/rank" + std::to_string(rank);

  auto model = make_model();
  // Every rank starts from different trainable weights: the broadcast must make them rank 0's.
  {
    torch::NoGradGuard ng;
    for (auto& p : trainable(*model)) p.add_(0.5 * static_cast<double>(rank));
  }
  DataParallel dp(pg, *model, DataParallelOptions().overlap_with_backward(overlap).bucket_cap_mb(bucket_mb));
  // plain: 2.weight, 2.bias, 4.weight; qlora: lora_A, lora_B of each layer.
  ASSERT_EQ(dp.parameters().size(), g_qlora ? 6u : 3u);
  torch::optim::SGD opt(dp.parameters(), torch::optim::SGDOptions(kLr));
  auto [x, y] = make_data();
  auto xs = msbnb::train::shard_batch(x, rank, world), ys = msbnb::train::shard_batch(y, rank, world);

  std::vector<torch::Tensor> snapshots{flat_params(dp.parameters())};
  std::ostringstream info;
  for (int64_t step = 0; step < kSteps; ++step) {
    if (step == 3 && rank == victim) {
      if (scenario == "die") ::raise(SIGKILL);  // no cleanup, as a crash
      if (scenario == "hang") {
        // Alive, sockets open, but silent: the peer must time out, not wait forever.
        std::this_thread::sleep_for(std::chrono::seconds(3));
        std::_Exit(0);
      }
    }
    opt.zero_grad();
    torch::mse_loss(model->forward(xs), ys).backward();
    const auto local = flat_params([&] {
      std::vector<torch::Tensor> g;
      for (const auto& p : dp.parameters()) g.push_back(p.grad().clone());
      return g;
    }());
    const auto t0 = std::chrono::steady_clock::now();
    try {
      dp.synchronize_gradients();
    } catch (const c10::Error& e) {
      // The survivor of die / hang: report what it got and how long it took, then leave.
      write_text(prefix + ".error", e.what_without_backtrace());
      write_text(prefix + ".error_ms", std::to_string(ms_since(t0)));
      return;
    }
    if (step == 0) {
      std::vector<torch::Tensor> g;
      for (const auto& p : dp.parameters()) g.push_back(p.grad());
      info << "local_vs_mean " << (local - flat_params(g)).abs().max().item<double>() << "\n";
      info << "started_in_backward " << dp.buckets_started_in_backward() << "\n";
      info << "buckets " << dp.bucket_indices().size() << "\n";
    }
    opt.step();
    snapshots.push_back(flat_params(dp.parameters()));
  }
  write_floats(prefix + ".params", torch::stack(snapshots));
  // The frozen parameters and the quantized buffers never moved (and got no gradient).
  auto fresh = make_model();
  auto want = fresh->named_parameters();
  int64_t frozen = 0;
  for (const auto& kv : model->named_parameters()) {
    if (kv.value().requires_grad()) continue;
    ++frozen;
    EXPECT_TRUE(torch::equal(kv.value(), want[kv.key()])) << kv.key();
    EXPECT_FALSE(kv.value().grad().defined()) << kv.key();
  }
  EXPECT_EQ(frozen, g_qlora ? 4 : 3);  // qlora: the bases' weight (float base) and biases
  auto want_buffers = fresh->named_buffers();
  for (const auto& kv : model->named_buffers())
    EXPECT_TRUE(torch::equal(kv.value(), want_buffers[kv.key()])) << kv.key();
  write_text(prefix + ".info", info.str());
}

// ---------------------------------------------------------------------------------------------
namespace {

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/msbnb_ddp_XXXXXX";
    const char* p = ::mkdtemp(tmpl);
    path = p ? p : "/tmp";
  }
  ~TempDir() { std::system(("rm -rf '" + path + "'").c_str()); }
};

// ASan makes every libtorch process start in seconds: generous, but a hang still ends.
constexpr auto kDeadline = std::chrono::seconds(90);

msbnb::train::LaunchResult launch(const std::string& dir, const msbnb::train::Environment& env) {
  msbnb::train::Environment e = env;
  e["MSBNB_DDP_OUT"] = dir;
  return msbnb::train::launch_local(
      "/proc/self/exe",
      {"--gtest_filter=DistributedWorker.DISABLED_Run", "--gtest_also_run_disabled_tests", "--gtest_brief=1"},
      msbnb::train::LaunchOptions().world_size(2).env(e).deadline(kDeadline));
}

std::string describe(const msbnb::train::LaunchResult& r) {
  std::ostringstream os;
  os << "port " << r.master_port << ", exit codes";
  for (int c : r.exit_codes) os << " " << c;
  os << ", killed at the deadline:";
  for (auto k : r.killed_at_deadline) os << " " << k;
  return os.str();
}

// One full-batch SGD step from `start` (flat trainable parameters) in this process, and the
// largest per-sample gradient element there (the A of the tolerance below).
struct RefStep {
  torch::Tensor next;
  double max_sample_grad = 0;
};

RefStep reference_step(const torch::Tensor& start) {
  auto model = make_model();
  auto ps = trainable(*model);
  {
    torch::NoGradGuard ng;
    int64_t off = 0;
    for (auto& p : ps) {
      p.copy_(start.narrow(0, off, p.numel()).view(p.sizes()));
      off += p.numel();
    }
  }
  auto [x, y] = make_data();
  RefStep r;
  for (int64_t i = 0; i < kBatch; ++i) {
    for (auto& p : ps) p.mutable_grad() = torch::Tensor();
    torch::mse_loss(model->forward(x.narrow(0, i, 1)), y.narrow(0, i, 1)).backward();
    for (auto& p : ps) r.max_sample_grad = std::max(r.max_sample_grad, p.grad().abs().max().item<double>());
  }
  for (auto& p : ps) p.mutable_grad() = torch::Tensor();
  torch::optim::SGD opt(ps, torch::optim::SGDOptions(kLr));
  torch::mse_loss(model->forward(x), y).backward();
  opt.step();
  r.next = flat_params(ps);
  return r;
}

void check_training(bool overlap, double bucket_mb, bool qlora = false) {
  torch::set_num_threads(1);
  g_qlora = qlora;
  TempDir dir;
  const auto res = launch(dir.path, {{"MSBNB_DDP_SCENARIO", "train"},
                                     {"MSBNB_DDP_MODEL", qlora ? "qlora" : "plain"},
                                     {"MSBNB_DDP_OVERLAP", overlap ? "1" : "0"},
                                     {"MSBNB_DDP_BUCKET_MB", std::to_string(bucket_mb)},
                                     {"MSBNB_DIST_TIMEOUT", "20"}});
  ASSERT_TRUE(res.ok()) << describe(res);
  const auto p0 = read_floats(dir.path + "/rank0.params"), p1 = read_floats(dir.path + "/rank1.params");
  ASSERT_TRUE(p0.defined() && p1.defined());
  const int64_t n = flat_params(trainable(*make_model())).numel();  // trainable elements
  ASSERT_EQ(p0.numel(), (kSteps + 1) * n);
  const auto s0 = p0.view({kSteps + 1, n}), s1 = p1.view({kSteps + 1, n});

  // Every rank ends every step (and starts, after the broadcast) with bit-identical parameters:
  // both add the same two bucket values (a + b == b + a in IEEE arithmetic) and take the same
  // SGD step.
  EXPECT_TRUE(torch::equal(s0, s1)) << "max |rank0 - rank1| = " << (s0 - s1).abs().max().item<double>();
  // The broadcast gave rank 1 rank 0's weights, which are make_model()'s (rank 0 adds 0.5·0).
  auto start = make_model();
  EXPECT_TRUE(torch::equal(s0[0], flat_params(trainable(*start))));

  // Tolerance of one step. Each gradient element is g = (1/N) Σ_i t_i over the N = 16 samples,
  // t_i the gradient of sample i's own loss. One process sums the 16 terms in one GEMM, the two
  // ranks sum 8 each and the allreduce adds the two halves (the 1/8 and 1/2 scalings are exact
  // powers of two). A float32 sum of N terms in any order is within (N-1)·u·Σ|t_i| of the exact
  // sum (u = 2^-24, first order), so two orders differ by at most 2(N-1)·u·Σ|t_i|, and after the
  // 1/N, with Σ|t_i| <= N·A:
  //   |Δg| <= 2(N-1)·u·A,  A = max_i |t_i|  (measured below by per-sample backward).
  // The t_i come from dot products of length <= H = 16 (forward and backward, 3 layers), which a
  // GEMM may block differently for M = 8 and M = 16 rows: another <= 2·3·H·u·A. One SGD step
  // moves the parameters by lr·g, hence per element
  //   tol_step = lr · 2 (N - 1 + 3 H) · u · A.
  // Steps are compared one at a time, each from the parameters both runs share at its start, so
  // earlier differences do not compound into the bound.
  const double u = std::ldexp(1.0, -24);
  double worst_ratio = 0;
  for (int64_t s = 0; s < kSteps; ++s) {
    const auto ref = reference_step(s0[s]);
    const double tol = kLr * 2.0 * static_cast<double>(kBatch - 1 + 3 * kHidden) * u * ref.max_sample_grad;
    const double diff = (s0[s + 1] - ref.next).abs().max().item<double>();
    EXPECT_LE(diff, tol) << "step " << s << ": max |ddp - one process| = " << diff << ", tol " << tol;
    worst_ratio = std::max(worst_ratio, diff / tol);
    // The step moved the parameters by far more than the tolerance: the comparison has teeth.
    EXPECT_GT((ref.next - s0[s]).abs().max().item<double>(), 1000 * tol);
  }
  std::printf("[ distributed ] 5 steps, max |ddp - one process| per step <= %.3g of the tolerance\n",
              worst_ratio);

  // Each rank really trained on its half: its local gradient differed from the mean.
  const std::string info = read_text(dir.path + "/rank0.info");
  double local_vs_mean = 0;
  std::sscanf(info.c_str(), "local_vs_mean %lf", &local_vs_mean);
  EXPECT_GT(local_vs_mean, 1e-3) << info;
  if (overlap) {
    EXPECT_NE(info.find("started_in_backward"), std::string::npos);
    EXPECT_EQ(info.find("started_in_backward 0\n"), std::string::npos)
        << "no bucket was started from a backward hook: " << info;
  }
}

// A peer dies (die) or stops answering (hang) after step 2: the other rank's allreduce of step 3
// must fail with a c10::Error naming rank, operation and cause within the timeout.
void check_peer_failure(const std::string& scenario, int64_t victim, int timeout_s) {
  TempDir dir;
  const auto t0 = std::chrono::steady_clock::now();
  const auto res = launch(dir.path, {{"MSBNB_DDP_SCENARIO", scenario},
                                     {"MSBNB_DDP_VICTIM", std::to_string(victim)},
                                     {"MSBNB_DIST_TIMEOUT", std::to_string(timeout_s)}});
  const double wall_ms = ms_since(t0);
  const int64_t survivor = 1 - victim;
  EXPECT_TRUE(res.killed_at_deadline.empty()) << describe(res);
  EXPECT_EQ(res.exit_codes[static_cast<size_t>(survivor)], 0) << describe(res);
  if (scenario == "die") {
    EXPECT_EQ(res.exit_codes[static_cast<size_t>(victim)], -SIGKILL) << describe(res);
  }
  const std::string prefix = dir.path + "/rank" + std::to_string(survivor);
  const std::string msg = read_text(prefix + ".error");
  ASSERT_FALSE(msg.empty()) << "the survivor got no error; " << describe(res);
  const double error_ms = std::atof(read_text(prefix + ".error_ms").c_str());
  std::printf(
      "[ distributed ] %s of rank %lld: rank %lld failed after %.0f ms (timeout %d s), whole run %.0f ms: "
      "%s\n",
      scenario.c_str(), static_cast<long long>(victim), static_cast<long long>(survivor), error_ms, timeout_s,
      wall_ms, msg.c_str());
  EXPECT_NE(msg.find("rank " + std::to_string(survivor) + " of 2"), std::string::npos) << msg;
  EXPECT_NE(msg.find("allreduce of gradient bucket"), std::string::npos) << msg;
  if (scenario == "die") {
    EXPECT_NE(msg.find("a peer disconnected"), std::string::npos) << msg;
  } else {
    EXPECT_NE(msg.find("did not answer within the timeout of " + std::to_string(timeout_s * 1000) + " ms"),
              std::string::npos)
        << msg;
  }
  // Within the timeout (plus scheduling slack under a sanitizer); a death is seen at once.
  EXPECT_LT(error_ms, timeout_s * 1000.0 + 1500.0);
  if (scenario == "die") {
    EXPECT_LT(error_ms, 1000.0 * timeout_s);
  }
}

}  // namespace

TEST(Distributed, TwoProcessesMatchOneProcessOnTheFullBatch) { check_training(/*overlap=*/false, 25.0); }

// Buckets of 512 bytes, in reverse order: 4.weight (256 B) + 2.bias (64 B), then 2.weight (1 KiB)
// alone; started from backward hooks.
// The adapters of a QLoRA model (NF4 + LoRA, float + LoRA, int8 + LoRA): the same bound holds,
// the LoRA products being dot products of length <= H as well (r = 4 < H).
TEST(Distributed, QloraAdaptersMatchOneProcessOnTheFullBatch) {
  check_training(/*overlap=*/false, 25.0, /*qlora=*/true);
}

TEST(Distributed, OverlappedSmallBucketsMatchToo) { check_training(/*overlap=*/true, 512.0 / (1024 * 1024)); }

TEST(Distributed, DyingPeerFailsTheOtherWithAClearError) {
  check_peer_failure("die", /*victim=*/1, /*timeout_s=*/5);
  check_peer_failure("die", /*victim=*/0, /*timeout_s=*/5);  // rank 0 also runs the store
}

TEST(Distributed, SilentPeerTimesOut) { check_peer_failure("hang", /*victim=*/1, /*timeout_s=*/2); }

// ---------------------------------------------------------------------------------------------
TEST(Distributed, BadOptionsAreRefused) {
  auto o = [] {
    return ProcessGroupOptions().world_size(2).master_port(29500).timeout(std::chrono::seconds(1));
  };
  expect_error([&] { ProcessGroup(o().rank(2)); }, {"rank", "0 <= rank < world_size = 2", "got 2"});
  expect_error([&] { ProcessGroup(o().rank(-1)); }, {"rank", "got -1"});
  expect_error([&] { ProcessGroup(o().world_size(0)); }, {"world_size", ">= 1", "got 0"});
  expect_error([&] { ProcessGroup(o().world_size(-3)); }, {"world_size", "got -3"});
  expect_error([&] { ProcessGroup(o().master_port(0)); }, {"master_port", "[1, 65535]", "got 0"});
  expect_error([&] { ProcessGroup(o().master_port(70000)); }, {"master_port", "got 70000"});
  expect_error([&] { ProcessGroup(o().master_port(-1)); }, {"master_port", "got -1"});
  expect_error([&] { ProcessGroup(o().master_addr("")); }, {"master_addr", "got ''"});
  expect_error([&] { ProcessGroup(o().timeout(std::chrono::milliseconds(0))); },
               {"timeout", "> 0 ms", "got 0"});
  expect_error([&] { ProcessGroup(o().threads(0)); }, {"threads", ">= 1", "got 0"});
  const auto t0 = std::chrono::steady_clock::now();
  expect_error([&] { ProcessGroup(o().master_addr("no-such-host.invalid")); },
               {"master_addr", "resolvable", "no-such-host.invalid"});
  EXPECT_LT(ms_since(t0), 5000.0);
}

TEST(Distributed, MissingPeersFailTheRendezvousWithinTheTimeout) {
  const auto port = msbnb::train::find_free_port();
  const auto o = ProcessGroupOptions().world_size(2).master_port(port).timeout(std::chrono::seconds(1));
  // Rank 1 with no rank 0 (no server to connect to), then rank 0 with no rank 1.
  for (int64_t rank : {1, 0}) {
    const auto t0 = std::chrono::steady_clock::now();
    const std::string msg = expect_error(
        [&] { ProcessGroup(ProcessGroupOptions(o).rank(rank)); },
        {"rank " + std::to_string(rank) + " of 2", "127.0.0.1:" + std::to_string(port), "timeout 1000 ms"});
    const double ms = ms_since(t0);
    std::printf("[ distributed ] rank %lld alone: refused after %.0f ms: %s\n", static_cast<long long>(rank),
                ms, msg.c_str());
    // Rank 1 fails on its first connect; rank 0 waits in three bounded stages (the store's wait
    // for workers, Gloo's wait for the peer's address, its connect): measured 3.0 s.
    EXPECT_LT(ms, 3 * 1000.0 + 1500.0);
  }
}

namespace {
struct EnvGuard {
  std::vector<std::pair<std::string, std::string>> saved;
  std::vector<std::string> unset_after;
  void set(const std::string& k, const char* v) {
    const char* old = std::getenv(k.c_str());
    if (old) {
      saved.emplace_back(k, old);
    } else {
      unset_after.push_back(k);
    }
    if (v) {
      ::setenv(k.c_str(), v, 1);
    } else {
      ::unsetenv(k.c_str());
    }
  }
  ~EnvGuard() {
    for (auto& [k, v] : saved) ::setenv(k.c_str(), v.c_str(), 1);
    for (auto& k : unset_after) ::unsetenv(k.c_str());
  }
};
}  // namespace

TEST(Distributed, OptionsFromTheEnvironment) {
  {
    EnvGuard g;
    g.set("RANK", "1");
    g.set("WORLD_SIZE", "4");
    g.set("MASTER_ADDR", "10.1.2.3");
    g.set("MASTER_PORT", "12345");
    g.set("GLOO_SOCKET_IFNAME", "eth7");
    g.set("MSBNB_DIST_TIMEOUT", "7");
    const auto o = ProcessGroupOptions::from_env();
    EXPECT_EQ(o.rank(), 1);
    EXPECT_EQ(o.world_size(), 4);
    EXPECT_EQ(o.master_addr(), "10.1.2.3");
    EXPECT_EQ(o.master_port(), 12345);
    EXPECT_EQ(o.interface(), "eth7");
    EXPECT_EQ(o.timeout().count(), 7000);
  }
  {
    EnvGuard g;
    g.set("RANK", "0");
    g.set("WORLD_SIZE", "1");
    g.set("MASTER_ADDR", nullptr);
    g.set("MASTER_PORT", nullptr);
    g.set("GLOO_SOCKET_IFNAME", nullptr);
    g.set("MSBNB_DIST_TIMEOUT", nullptr);
    const auto o = ProcessGroupOptions::from_env();
    EXPECT_EQ(o.master_addr(), "127.0.0.1");
    EXPECT_EQ(o.master_port(), 29500);
    EXPECT_EQ(o.timeout().count(), 300000);
  }
  auto with = [](const char* rank, const char* world, const char* port) {
    EnvGuard g;
    g.set("RANK", rank);
    g.set("WORLD_SIZE", world);
    g.set("MASTER_PORT", port);
    ProcessGroupOptions::from_env();
  };
  expect_error([&] { with(nullptr, "2", "1234"); }, {"RANK", "not set"});
  expect_error([&] { with("0", nullptr, "1234"); }, {"WORLD_SIZE", "not set"});
  expect_error([&] { with("abc", "2", "1234"); }, {"RANK", "integer in [0, 1]", "got 'abc'"});
  expect_error([&] { with("2", "2", "1234"); }, {"RANK", "integer in [0, 1]", "got '2'"});
  expect_error([&] { with("0", "0", "1234"); }, {"WORLD_SIZE", "got '0'"});
  expect_error([&] { with("0", "2", "99999"); }, {"MASTER_PORT", "[1, 65535]", "got '99999'"});
  expect_error([&] { with("0", "2", "12x"); }, {"MASTER_PORT", "got '12x'"});
}

TEST(Distributed, OneProcessGroupIsANoOp) {
  ProcessGroup pg(ProcessGroupOptions().world_size(1));
  EXPECT_TRUE(pg.is_main_process());
  auto t = torch::arange(5, torch::kFloat);
  pg.all_reduce_sum(t);
  EXPECT_TRUE(torch::equal(t, torch::arange(5, torch::kFloat)));
  pg.broadcast(t);
  pg.barrier();
  auto model = make_model();
  DataParallel dp(pg, *model);
  EXPECT_EQ(dp.parameters().size(), 3u);
  auto [x, y] = make_data();
  torch::mse_loss(model->forward(x), y).backward();
  const auto g = dp.parameters()[0].grad().clone();
  dp.synchronize_gradients();
  EXPECT_TRUE(torch::equal(dp.parameters()[0].grad(), g));
}

TEST(Distributed, DataParallelRefusesBadParameters) {
  ProcessGroup pg(ProcessGroupOptions().world_size(1));
  auto w = torch::randn({3}, torch::requires_grad());
  expect_error([&] { DataParallel(pg, std::vector<torch::Tensor>{torch::randn({3})}); },
               {"parameters[0]", "trainable", "frozen"});
  expect_error(
      [&] {
        DataParallel(pg, std::vector<torch::Tensor>{w, torch::Tensor()});
      },
      {"parameters[1]", "defined"});
  expect_error(
      [&] {
        DataParallel(pg, std::vector<torch::Tensor>{w, w});
      },
      {"parameters[1]", "once", "twice"});
  expect_error([&] { DataParallel(pg, std::vector<torch::Tensor>{w * 2}); }, {"parameters[0]", "leaf"});
  expect_error(
      [&] { DataParallel(pg, std::vector<torch::Tensor>{w}, DataParallelOptions().bucket_cap_mb(0)); },
      {"bucket_cap_mb", "> 0", "got 0"});
  auto t = torch::zeros({4, 4}).t();
  expect_error([&] { pg.all_reduce_sum(t); }, {"contiguous"});
  auto c = torch::zeros({4});
  expect_error([&] { pg.broadcast(c, 1); }, {"root", "0 <= root < world_size = 1", "got 1"});
}

TEST(Distributed, BucketsFollowTheCapAndTheDtype) {
  ProcessGroup pg(ProcessGroupOptions().world_size(1));
  std::vector<torch::Tensor> ps{
      torch::zeros({256}, torch::requires_grad()),  // 1 KiB
      torch::zeros({64}, torch::requires_grad()),   // 256 B
      torch::zeros({64}, torch::requires_grad()),   // 256 B
      torch::zeros({64}, torch::TensorOptions().dtype(torch::kDouble).requires_grad(true))};
  DataParallel dp(pg, ps, DataParallelOptions().bucket_cap_mb(512.0 / (1024 * 1024)));
  // Reverse order; the double tensor alone; 2 + 1 share 512 B; 0 exceeds the cap on its own.
  const std::vector<std::vector<int64_t>> want{{3}, {2, 1}, {0}};
  EXPECT_EQ(dp.bucket_indices(), want);
}

TEST(Distributed, ShardsCoverTheBatch) {
  using msbnb::train::shard_range;
  const std::vector<std::pair<int64_t, int64_t>> want{{0, 4}, {4, 7}, {7, 10}};
  for (int64_t r = 0; r < 3; ++r) {
    EXPECT_EQ(shard_range(10, r, 3).begin, want[static_cast<size_t>(r)].first);
    EXPECT_EQ(shard_range(10, r, 3).end, want[static_cast<size_t>(r)].second);
  }
  EXPECT_EQ(shard_range(1, 1, 2).size(), 0);
  EXPECT_DOUBLE_EQ(msbnb::train::shard_loss_weight(10, 0, 3), 1.2);
  EXPECT_DOUBLE_EQ(msbnb::train::shard_loss_weight(10, 2, 3), 0.9);
  EXPECT_DOUBLE_EQ(msbnb::train::shard_loss_weight(1, 1, 2), 0.0);
  const auto b = torch::arange(12).view({2, 6});
  EXPECT_TRUE(torch::equal(msbnb::train::shard_batch(b, 1, 2, 1), b.narrow(1, 3, 3)));
  expect_error([] { shard_range(4, 2, 2); }, {"rank", "0 <= rank < world_size = 2", "got 2"});
  expect_error([] { shard_range(4, 0, 0); }, {"world_size", ">= 1", "got 0"});
  expect_error([] { shard_range(-1, 0, 1); }, {"batch_size", ">= 0", "got -1"});
  expect_error([&] { msbnb::train::shard_batch(b, 0, 2, 2); }, {"dim", "[-2, 2)", "got 2"});
}

TEST(Distributed, LaunchRefusesBadInput) {
  expect_error(
      [] { msbnb::train::launch_local("/bin/true", {}, msbnb::train::LaunchOptions().world_size(0)); },
      {"world_size", ">= 1", "got 0"});
  expect_error(
      [] { msbnb::train::launch_local("/bin/true", {}, msbnb::train::LaunchOptions().master_port(-2)); },
      {"master_port", "got -2"});
  expect_error([] { msbnb::train::launch_local("/no/such/exe", {}); }, {"executable", "/no/such/exe"});
  const auto r = msbnb::train::launch_local("/bin/sh", {"-c", "exit $RANK"},
                                            msbnb::train::LaunchOptions().world_size(3));
  EXPECT_EQ(r.exit_codes, (std::vector<int>{0, 1, 2}));
  const auto k = msbnb::train::launch_local(
      "/bin/sleep", {"30"},
      msbnb::train::LaunchOptions().world_size(1).deadline(std::chrono::milliseconds(200)));
  EXPECT_EQ(k.killed_at_deadline, (std::vector<int64_t>{0}));
  EXPECT_FALSE(k.ok());
}

// torchrun starts the ranks of different machines in no particular order: a rank that comes up
// before rank 0's store must wait for it (within the timeout), not fail at once. Two groups in one
// process (each has its own Gloo device and store client).
TEST(Distributed, RanksWaitForALateMaster) {
  const auto port = msbnb::train::find_free_port();
  const auto o = ProcessGroupOptions().world_size(2).master_port(port).timeout(std::chrono::seconds(10));
  std::string error0;
  std::thread master([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    try {
      ProcessGroup pg0(ProcessGroupOptions(o).rank(0));
      auto t = torch::full({3}, 1.0);
      pg0.all_reduce_sum(t);
    } catch (const std::exception& e) {
      error0 = e.what();
    }
  });
  std::string error1;
  try {
    ProcessGroup pg1(ProcessGroupOptions(o).rank(1));
    auto t = torch::full({3}, 2.0);
    pg1.all_reduce_sum(t);
    EXPECT_TRUE(torch::equal(t, torch::full({3}, 3.0)));
  } catch (const std::exception& e) {
    error1 = e.what();
  }
  master.join();
  EXPECT_EQ(error0, "");
  EXPECT_EQ(error1, "");
}
