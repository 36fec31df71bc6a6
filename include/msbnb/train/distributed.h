// Data-parallel training on libtorch's c10d engine (ProcessGroupGloo, TCPStore rendezvous).
//
// N processes ("ranks" 0 … N-1) each run the same program on their shard of every batch. At the
// start, DataParallel broadcasts the trainable parameters from rank 0, so every rank starts from
// the same weights; after each backward, synchronize_gradients() all-reduces the gradients of the
// trainable parameters (requires_grad) and divides them by N. Every rank then takes the same
// optimizer step and ends it with bit-identical trainable parameters. Frozen parameters (a
// quantized base) are never communicated: each rank loads them itself.
//
// Rendezvous. Rank 0 runs the TCPStore server on master_addr:master_port; the other ranks
// connect to it, and the Gloo process group exchanges its peers' addresses through the store.
// ProcessGroupOptions::from_env() reads the variables torchrun sets (MASTER_ADDR, MASTER_PORT,
// RANK, WORLD_SIZE), so one command line runs on one machine or across several (docs/distributed.md).
//
// Failure. Every collective runs under the group's timeout (Gloo's and the store's). When a peer
// dies, its sockets close and the others' pending collective fails at once; when a peer stops
// answering, the collective fails after the timeout. Either way the caller gets a c10::Error that
// names this rank, the operation and the cause ("a peer disconnected or did not answer within …
// ms") instead of hanging. After such an error the group is unusable: end the process.
//
// Bucketing. Gradients are copied into flat buckets of about bucket_cap_mb MiB (one dtype each,
// parameters in reverse registration order, the order backward produces them) and each bucket
// is reduced with one allreduce: a few large messages instead of one per tensor
// (docs/distributed.md has the measurement). With overlap_with_backward, a bucket's allreduce is
// started from an autograd hook as soon as all of its gradients are final, while backward goes on.
#pragma once
#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace c10d {
class ProcessGroup;
}  // namespace c10d

namespace msbnb::train {

/// Where and how to join a process group.
///
/// rank in [0, world_size); world_size >= 1; master_addr: a host name or IPv4/IPv6 address of the
/// machine of rank 0 (for world_size 1 it is not used); master_port in [1, 65535], free on that
/// machine (rank 0 listens on it); timeout > 0 bounds the rendezvous and every collective.
/// The Gloo transport binds to: `interface` if set (e.g. "eth0"), else `bind_address` if set,
/// else 127.0.0.1 when master_addr is a loopback address, else the local address this machine
/// uses to reach master_addr (found with a connected UDP socket; no packet is sent).
///
/// Example:
///   auto pg = msbnb::train::ProcessGroup(msbnb::train::ProcessGroupOptions()
///                                            .rank(1).world_size(2).master_addr("10.0.0.1")
///                                            .master_port(29500).timeout(std::chrono::seconds(60)));
struct ProcessGroupOptions {
  /// Reads RANK, WORLD_SIZE (both required), MASTER_ADDR (default 127.0.0.1), MASTER_PORT
  /// (default 29500), GLOO_SOCKET_IFNAME (optional) and MSBNB_DIST_TIMEOUT (seconds, optional,
  /// default 300). Throws c10::Error naming the variable, what was expected and its value.
  static ProcessGroupOptions from_env();

  TORCH_ARG(int64_t, rank) = 0;
  TORCH_ARG(int64_t, world_size) = 1;
  TORCH_ARG(std::string, master_addr) = "127.0.0.1";
  TORCH_ARG(int64_t, master_port) = 29500;
  TORCH_ARG(std::chrono::milliseconds, timeout) = std::chrono::milliseconds(300000);
  /// Network interface for Gloo (torch's GLOO_SOCKET_IFNAME); empty: see above.
  TORCH_ARG(std::string, interface) = "";
  /// Local address Gloo binds to; empty: see above. Ignored when `interface` is set.
  TORCH_ARG(std::string, bind_address) = "";
  /// Gloo worker threads (each runs one collective at a time).
  TORCH_ARG(int64_t, threads) = 2;
};

/// The outcome of an asynchronous collective; wait() rethrows its failure as a c10::Error that
/// names the operation and the rank.
class PendingCollective {
 public:
  PendingCollective() = default;
  /// Blocks until the collective has finished (at most the group's timeout).
  void wait();
  bool valid() const { return impl_ != nullptr; }
  struct Impl;

 private:
  friend class ProcessGroup;
  explicit PendingCollective(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<Impl> impl_;
};

/// A joined c10d Gloo process group. Construction blocks until all world_size ranks have joined
/// (or throws after the timeout). Copies share the same group. Collectives must be issued in the
/// same order on every rank.
///
/// Throws c10::Error on bad options (naming the option, expected and actual value) and on a
/// failed rendezvous (naming rank, address and port).
class ProcessGroup {
 public:
  explicit ProcessGroup(const ProcessGroupOptions& options);
  /// ProcessGroup(ProcessGroupOptions::from_env()).
  static ProcessGroup from_env();

  int64_t rank() const;
  int64_t world_size() const;
  /// True on rank 0: the one process that writes checkpoints and logs.
  bool is_main_process() const { return rank() == 0; }
  const ProcessGroupOptions& options() const;

  /// In-place sum over ranks of a contiguous CPU tensor (same shape and dtype on every rank).
  void all_reduce_sum(torch::Tensor& tensor, const std::string& what = "tensor");
  PendingCollective all_reduce_sum_async(torch::Tensor& tensor, const std::string& what = "tensor");
  /// In-place: every rank's `tensor` becomes root's.
  void broadcast(torch::Tensor& tensor, int64_t root = 0, const std::string& what = "tensor");
  /// Returns once every rank has called it.
  void barrier();

  /// The underlying c10d group, for collectives this class does not wrap (their errors are
  /// c10d's own).
  c10d::ProcessGroup& c10d_group();

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

/// Rows [begin, end) of a batch that belong to one rank: contiguous, in rank order; the first
/// batch_size % world_size ranks get one row more.
struct ShardRange {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
};

/// Throws c10::Error unless batch_size >= 0 and 0 <= rank < world_size.
ShardRange shard_range(int64_t batch_size, int64_t rank, int64_t world_size);

/// This rank's slice of `batch` along `dim` (a view, see shard_range).
/// Example: auto x = msbnb::train::shard_batch(inputs, pg.rank(), pg.world_size());
torch::Tensor shard_batch(const torch::Tensor& batch, int64_t rank, int64_t world_size, int64_t dim = 0);

/// Factor by which to multiply a loss averaged over this rank's shard, so that the averaged
/// gradients equal those of the loss averaged over the whole batch even when shards are uneven:
/// shard_size · world_size / batch_size (1 for equal shards). 0 for an empty shard.
double shard_loss_weight(int64_t batch_size, int64_t rank, int64_t world_size);

struct DataParallelOptions {
  /// Bucket size in MiB (gradients are packed into flat buffers of at most this size; a single
  /// larger tensor gets a bucket of its own). > 0.
  TORCH_ARG(double, bucket_cap_mb) = 25.0;
  /// Start each bucket's allreduce from an autograd hook as soon as its gradients are final.
  /// Requires exactly one backward per synchronize_gradients() (no gradient accumulation).
  TORCH_ARG(bool, overlap_with_backward) = false;
  /// Broadcast the parameters from rank 0 in the constructor.
  TORCH_ARG(bool, broadcast_parameters) = true;
};

/// Averages the gradients of a set of trainable parameters over the ranks of a ProcessGroup.
///
/// The parameters must be CPU tensors that require grad, the same list (shapes, dtypes, order)
/// on every rank. After synchronize_gradients() every parameter has a defined gradient equal on
/// all ranks (bitwise) to the mean over ranks; a rank where a parameter got no gradient
/// contributes zeros.
///
/// Example:
///   auto pg = msbnb::train::ProcessGroup::from_env();
///   msbnb::train::DataParallel dp(pg, *model);        // trainable parameters of model
///   torch::optim::SGD opt(dp.parameters(), 0.1);
///   for (...) {
///     opt.zero_grad();
///     auto x = msbnb::train::shard_batch(inputs, pg.rank(), pg.world_size());
///     auto y = msbnb::train::shard_batch(targets, pg.rank(), pg.world_size());
///     torch::mse_loss(model->forward(x), y).backward();
///     dp.synchronize_gradients();
///     opt.step();
///     if (pg.is_main_process()) { /* log, save */ }
///   }
class DataParallel {
 public:
  /// Throws c10::Error if a parameter is undefined, not on the CPU, does not require grad, or is
  /// listed twice, or if bucket_cap_mb <= 0; and whatever the broadcast throws.
  DataParallel(ProcessGroup group, std::vector<torch::Tensor> parameters, DataParallelOptions options = {});
  /// The parameters of `model` that require grad, in model.parameters() order.
  DataParallel(ProcessGroup group, const torch::nn::Module& model, DataParallelOptions options = {});
  ~DataParallel();
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  /// Overwrites every rank's parameters with rank 0's (one broadcast per bucket).
  void broadcast_parameters();
  /// Call after backward, before the optimizer step: gradients become the mean over ranks.
  void synchronize_gradients();

  const std::vector<torch::Tensor>& parameters() const;
  /// Parameter indices (into parameters()) of each bucket, in reduction order.
  std::vector<std::vector<int64_t>> bucket_indices() const;
  /// Collectives started by hooks during the last backward (overlap_with_backward only).
  int64_t buckets_started_in_backward() const;
  ProcessGroup& group();
  int64_t rank() const { return rank_; }
  int64_t world_size() const { return world_size_; }
  bool is_main_process() const { return rank_ == 0; }

  struct State;

 private:
  std::shared_ptr<State> state_;
  int64_t rank_ = 0;
  int64_t world_size_ = 1;
};

/// Environment variables, name -> value.
using Environment = std::map<std::string, std::string>;

/// How launch_local starts its processes.
struct LaunchOptions {
  TORCH_ARG(int64_t, world_size) = 2;
  TORCH_ARG(std::string, master_addr) = "127.0.0.1";
  /// 0: pick a free port on master_addr (bind to port 0 and read it back).
  TORCH_ARG(int64_t, master_port) = 0;
  /// The processes still running after this are killed (SIGKILL).
  TORCH_ARG(std::chrono::milliseconds, deadline) = std::chrono::milliseconds(600000);
  /// Extra environment variables for every rank (beside RANK, WORLD_SIZE, MASTER_ADDR,
  /// MASTER_PORT, LOCAL_RANK, LOCAL_WORLD_SIZE, which launch_local sets).
  TORCH_ARG(Environment, env) = {};
};

/// What became of each launched process.
struct LaunchResult {
  /// Per rank: the exit status (0…255), or -signal if it was killed by a signal.
  std::vector<int> exit_codes;
  /// Ranks killed because they outlived the deadline.
  std::vector<int64_t> killed_at_deadline;
  int64_t master_port = 0;
  bool ok() const;
};

/// Starts world_size copies of `executable` (argv = executable + args, environment = this
/// process's plus RANK etc.) with posix_spawn, waits for all of them until the deadline and
/// kills the rest. A small local torchrun: `msbnb::train::launch_local("/proc/self/exe", {...})`.
/// Throws c10::Error if world_size < 1 or a process cannot be started.
LaunchResult launch_local(const std::string& executable, const std::vector<std::string>& args,
                          const LaunchOptions& options = {});

/// A TCP port that was free on `address` a moment ago (bound to port 0, read back, released).
int64_t find_free_port(const std::string& address = "127.0.0.1");

}  // namespace msbnb::train
