// Data-parallel training on c10d Gloo (see msbnb/train/distributed.h).
//
// The c10d/Gloo symbols are in Debian's libtorch_cpu (${TORCH_LIBRARIES}); only the headers of
// Gloo come from another package (libgloo-dev), and only this file includes them.
#include "msbnb/train/distributed.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#if !__has_include(<gloo/context.h>)
#error "msbnb's data-parallel training needs Gloo's headers: apt-get install libgloo-dev"
#endif
// Debian's libtorch is built with Gloo, but its headers only show ProcessGroupGloo when told so.
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO 1
#endif
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <thread>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <unordered_set>

extern char** environ;

namespace msbnb::train {

namespace {

constexpr const char* kWho = "msbnb::train::ProcessGroup";

// c10::Error::what() carries a C++ backtrace; the message alone reads better inside ours.
std::string message_of(const std::exception& e) {
  if (const auto* ce = dynamic_cast<const c10::Error*>(&e)) return ce->what_without_backtrace();
  return e.what();
}

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// What most likely went wrong, from the transport's words.
std::string cause_of(const std::string& message, std::chrono::milliseconds timeout) {
  const std::string m = lower(message);
  std::ostringstream os;
  if (m.find("timed out") != std::string::npos || m.find("timeout") != std::string::npos) {
    os << "a peer did not answer within the timeout of " << timeout.count() << " ms";
  } else if (m.find("closed") != std::string::npos || m.find("reset") != std::string::npos ||
             m.find("broken pipe") != std::string::npos || m.find("refused") != std::string::npos) {
    os << "a peer disconnected (its process may have died)";
  } else {
    os << "a peer disconnected or did not answer within the timeout of " << timeout.count() << " ms";
  }
  return os.str();
}

bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1" || addr == "[::1]";
}

std::string strip_brackets(const std::string& addr) {
  if (addr.size() >= 2 && addr.front() == '[' && addr.back() == ']') return addr.substr(1, addr.size() - 2);
  return addr;
}

// Calls fn(addrinfo) for each address of host:port until it returns true; throws naming the
// option if the name does not resolve. Returns whether some fn call returned true.
template <typename Fn>
bool for_each_address(const std::string& host, int64_t port, int socktype, const std::string& option, Fn fn) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = socktype;
  addrinfo* res = nullptr;
  const std::string service = std::to_string(port);
  const int rc = ::getaddrinfo(strip_brackets(host).c_str(), service.c_str(), &hints, &res);
  TORCH_CHECK(rc == 0 && res != nullptr, kWho, ": ", option,
              ": expected a resolvable host name or address, got '", host,
              "' (getaddrinfo: ", ::gai_strerror(rc), ")");
  bool found = false;
  for (addrinfo* p = res; p != nullptr && !found; p = p->ai_next) found = fn(*p);
  ::freeaddrinfo(res);
  return found;
}

std::string numeric_host(const sockaddr* sa, socklen_t len) {
  char host[NI_MAXHOST] = {0};
  if (::getnameinfo(sa, len, host, sizeof(host), nullptr, 0, NI_NUMERICHOST) != 0) return "";
  return host;
}

// The local address this machine uses to reach master_addr: connect a UDP socket (no packet is
// sent) and read its local end.
std::string local_address_towards(const std::string& master_addr, int64_t port) {
  std::string host;
  const bool found = for_each_address(master_addr, port, SOCK_DGRAM, "master_addr", [&](const addrinfo& a) {
    const int fd = ::socket(a.ai_family, SOCK_DGRAM, 0);
    if (fd < 0) return false;
    sockaddr_storage local{};
    socklen_t len = sizeof(local);
    const bool ok = ::connect(fd, a.ai_addr, a.ai_addrlen) == 0 &&
                    ::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) == 0;
    ::close(fd);
    if (ok) host = numeric_host(reinterpret_cast<sockaddr*>(&local), len);
    return !host.empty();
  });
  TORCH_CHECK(found, kWho, ": master_addr: no local address can reach '", master_addr,
              "'; set ProcessGroupOptions::interface (GLOO_SOCKET_IFNAME) or bind_address");
  return host;
}

void check_options(const ProcessGroupOptions& o) {
  TORCH_CHECK(o.world_size() >= 1, kWho, ": world_size: expected >= 1, got ", o.world_size());
  TORCH_CHECK(o.rank() >= 0 && o.rank() < o.world_size(), kWho,
              ": rank: expected 0 <= rank < world_size = ", o.world_size(), ", got ", o.rank());
  TORCH_CHECK(o.timeout().count() > 0, kWho, ": timeout: expected > 0 ms, got ", o.timeout().count(), " ms");
  TORCH_CHECK(o.threads() >= 1, kWho, ": threads: expected >= 1, got ", o.threads());
  if (o.world_size() > 1) {
    TORCH_CHECK(o.master_port() >= 1 && o.master_port() <= 65535, kWho,
                ": master_port: expected a TCP port in [1, 65535], got ", o.master_port());
    TORCH_CHECK(!o.master_addr().empty(), kWho, ": master_addr: expected a host name or address, got ''");
  }
}

int64_t parse_env_int(const char* name, const char* value, int64_t lo, int64_t hi) {
  const std::string s = value;
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  const bool ok = !s.empty() && end == s.c_str() + s.size() && errno == 0 && v >= lo && v <= hi;
  TORCH_CHECK(ok, "msbnb::train::ProcessGroupOptions::from_env: ", name, ": expected an integer in [", lo,
              ", ", hi, "], got '", s, "'");
  return v;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
ProcessGroupOptions ProcessGroupOptions::from_env() {
  constexpr const char* who = "msbnb::train::ProcessGroupOptions::from_env";
  const char* rank = std::getenv("RANK");
  const char* world = std::getenv("WORLD_SIZE");
  TORCH_CHECK(rank != nullptr, who,
              ": RANK: expected the rank of this process (0 … WORLD_SIZE-1), got nothing "
              "(the variable is not set)");
  TORCH_CHECK(world != nullptr, who,
              ": WORLD_SIZE: expected the number of processes, got nothing (the variable "
              "is not set)");
  ProcessGroupOptions o;
  o.world_size(parse_env_int("WORLD_SIZE", world, 1, 1 << 20));
  o.rank(parse_env_int("RANK", rank, 0, o.world_size() - 1));
  if (const char* addr = std::getenv("MASTER_ADDR")) {
    TORCH_CHECK(*addr != '\0', who, ": MASTER_ADDR: expected a host name or address, got ''");
    o.master_addr(addr);
  }
  if (const char* port = std::getenv("MASTER_PORT"))
    o.master_port(parse_env_int("MASTER_PORT", port, 1, 65535));
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME")) o.interface(ifname);
  if (const char* t = std::getenv("MSBNB_DIST_TIMEOUT"))
    o.timeout(std::chrono::seconds(parse_env_int("MSBNB_DIST_TIMEOUT", t, 1, 24 * 3600 * 7)));
  return o;
}

// ---------------------------------------------------------------------------------------------
struct ProcessGroup::Impl {
  ProcessGroupOptions options;
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;

  // Turns a transport failure into our error: who, what, and the likely cause.
  [[noreturn]] void fail(const std::string& op, const std::string& what, const std::exception& e) const {
    const std::string msg = message_of(e);
    TORCH_CHECK(false, kWho, ": rank ", options.rank(), " of ", options.world_size(), ": ", op, " of ", what,
                " failed: ", cause_of(msg, options.timeout()), ". Gloo said: ", msg,
                ". The process group cannot be used any more.");
  }
};

struct PendingCollective::Impl {
  std::shared_ptr<const ProcessGroup::Impl> group;
  c10::intrusive_ptr<c10d::Work> work;
  std::string op, what;
  bool done = false;
};

void PendingCollective::wait() {
  TORCH_CHECK(impl_ != nullptr, "msbnb::train::PendingCollective::wait: no collective (default-constructed)");
  if (impl_->done) return;
  impl_->done = true;
  if (!impl_->work) return;  // world_size 1
  try {
    // Gloo fails the collective itself after the timeout (with its own, better message); the
    // margin only guards against a collective that never completes at all.
    impl_->work->wait(impl_->group->options.timeout() + std::chrono::milliseconds(2000));
  } catch (const std::exception& e) {
    impl_->group->fail(impl_->op, impl_->what, e);
  }
}

ProcessGroup::ProcessGroup(const ProcessGroupOptions& options) : impl_(std::make_shared<Impl>()) {
  check_options(options);
  impl_->options = options;
  const auto& o = impl_->options;
  const int rank = static_cast<int>(o.rank()), size = static_cast<int>(o.world_size());

  std::string bind;
  if (size > 1) {
    // Fail fast and clearly on an address that does not resolve (TCPStore would retry until
    // the timeout and then report a socket error).
    for_each_address(o.master_addr(), o.master_port(), SOCK_STREAM, "master_addr",
                     [](const addrinfo&) { return true; });
    if (o.interface().empty()) {
      bind = !o.bind_address().empty()      ? o.bind_address()
             : is_loopback(o.master_addr()) ? std::string("127.0.0.1")
                                            : local_address_towards(o.master_addr(), o.master_port());
    }
  } else {
    bind = "127.0.0.1";
  }

  std::ostringstream where;
  where << "rank " << rank << " of " << size << " joining the group at " << o.master_addr() << ":"
        << o.master_port() << " (timeout " << o.timeout().count() << " ms)";
  try {
    if (size == 1) {
      impl_->store = c10::make_intrusive<c10d::HashStore>();
    } else {
      c10d::TCPStoreOptions so;
      so.port = static_cast<std::uint16_t>(o.master_port());
      so.isServer = rank == 0;
      so.numWorkers = static_cast<std::size_t>(size);
      so.waitWorkers = true;
      so.timeout = o.timeout();
      impl_->store = c10::make_intrusive<c10d::TCPStore>(strip_brackets(o.master_addr()), so);
    }
    impl_->store->setTimeout(o.timeout());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, kWho, ": ", where.str(), ": the rendezvous (TCPStore",
                rank == 0 ? ", server on this rank" : ", server on rank 0", ") failed: ", message_of(e));
  }

  std::shared_ptr<::gloo::transport::Device> device;
  try {
    device = o.interface().empty() ? c10d::ProcessGroupGloo::createDeviceForHostname(bind)
                                   : c10d::ProcessGroupGloo::createDeviceForInterface(o.interface());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, kWho, ": ", where.str(), ": cannot create the Gloo transport on ",
                o.interface().empty() ? "address '" + bind + "'" : "interface '" + o.interface() + "'", ": ",
                message_of(e));
  }
  try {
    auto gopts = c10d::ProcessGroupGloo::Options::create(o.timeout());
    gopts->devices.push_back(device);
    gopts->threads = static_cast<int>(o.threads());
    impl_->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(impl_->store, rank, size, gopts);
  } catch (const std::exception& e) {
    const std::string msg = message_of(e);
    TORCH_CHECK(false, kWho, ": ", where.str(),
                ": connecting to the other ranks failed: ", cause_of(msg, o.timeout()), ". Gloo said: ", msg);
  }
}

ProcessGroup ProcessGroup::from_env() { return ProcessGroup(ProcessGroupOptions::from_env()); }

int64_t ProcessGroup::rank() const { return impl_->options.rank(); }
int64_t ProcessGroup::world_size() const { return impl_->options.world_size(); }
const ProcessGroupOptions& ProcessGroup::options() const { return impl_->options; }
c10d::ProcessGroup& ProcessGroup::c10d_group() { return *impl_->pg; }

namespace {
void check_collective_tensor(const torch::Tensor& t, const char* op, const std::string& what) {
  TORCH_CHECK(t.defined(), kWho, "::", op, ": ", what, ": expected a defined tensor, got an undefined one");
  TORCH_CHECK(t.device().is_cpu(), kWho, "::", op, ": ", what, ": expected a CPU tensor (Gloo), got one on ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), kWho, "::", op, ": ", what, ": expected a contiguous tensor, got strides ",
              t.strides());
}
}  // namespace

PendingCollective ProcessGroup::all_reduce_sum_async(torch::Tensor& tensor, const std::string& what) {
  check_collective_tensor(tensor, "all_reduce_sum", what);
  auto p = std::make_shared<PendingCollective::Impl>();
  p->group = impl_;
  p->op = "allreduce";
  p->what = what;
  if (world_size() > 1) {
    std::vector<at::Tensor> ts{tensor};
    try {
      p->work = impl_->pg->allreduce(ts);
    } catch (const std::exception& e) {
      impl_->fail(p->op, what, e);
    }
  }
  return PendingCollective(std::move(p));
}

void ProcessGroup::all_reduce_sum(torch::Tensor& tensor, const std::string& what) {
  all_reduce_sum_async(tensor, what).wait();
}

void ProcessGroup::broadcast(torch::Tensor& tensor, int64_t root, const std::string& what) {
  check_collective_tensor(tensor, "broadcast", what);
  TORCH_CHECK(root >= 0 && root < world_size(), kWho,
              "::broadcast: root: expected 0 <= root < world_size = ", world_size(), ", got ", root);
  if (world_size() == 1) return;
  auto p = std::make_shared<PendingCollective::Impl>();
  p->group = impl_;
  p->op = "broadcast from rank " + std::to_string(root);
  p->what = what;
  std::vector<at::Tensor> ts{tensor};
  c10d::BroadcastOptions bo;
  bo.rootRank = root;
  try {
    p->work = impl_->pg->broadcast(ts, bo);
  } catch (const std::exception& e) {
    impl_->fail(p->op, what, e);
  }
  PendingCollective(std::move(p)).wait();
}

void ProcessGroup::barrier() {
  if (world_size() == 1) return;
  auto p = std::make_shared<PendingCollective::Impl>();
  p->group = impl_;
  p->op = "barrier";
  p->what = "all ranks";
  try {
    p->work = impl_->pg->barrier();
  } catch (const std::exception& e) {
    impl_->fail(p->op, p->what, e);
  }
  PendingCollective(std::move(p)).wait();
}

// ---------------------------------------------------------------------------------------------
ShardRange shard_range(int64_t batch_size, int64_t rank, int64_t world_size) {
  TORCH_CHECK(world_size >= 1, "msbnb::train::shard_range: world_size: expected >= 1, got ", world_size);
  TORCH_CHECK(rank >= 0 && rank < world_size,
              "msbnb::train::shard_range: rank: expected 0 <= rank < world_size = ", world_size, ", got ",
              rank);
  TORCH_CHECK(batch_size >= 0, "msbnb::train::shard_range: batch_size: expected >= 0, got ", batch_size);
  const int64_t base = batch_size / world_size, extra = batch_size % world_size;
  ShardRange r;
  r.begin = rank * base + std::min(rank, extra);
  r.end = r.begin + base + (rank < extra ? 1 : 0);
  return r;
}

torch::Tensor shard_batch(const torch::Tensor& batch, int64_t rank, int64_t world_size, int64_t dim) {
  TORCH_CHECK(batch.defined(),
              "msbnb::train::shard_batch: batch: expected a defined tensor, got an undefined one");
  TORCH_CHECK(batch.dim() >= 1,
              "msbnb::train::shard_batch: batch: expected at least 1 dimension, got a scalar");
  TORCH_CHECK(dim >= -batch.dim() && dim < batch.dim(), "msbnb::train::shard_batch: dim: expected in [",
              -batch.dim(), ", ", batch.dim(), "), got ", dim);
  const auto r = shard_range(batch.size(dim), rank, world_size);
  return batch.narrow(dim, r.begin, r.size());
}

double shard_loss_weight(int64_t batch_size, int64_t rank, int64_t world_size) {
  const auto r = shard_range(batch_size, rank, world_size);
  if (r.size() == 0) return 0.0;
  return static_cast<double>(r.size()) * static_cast<double>(world_size) / static_cast<double>(batch_size);
}

// ---------------------------------------------------------------------------------------------
namespace {
struct Bucket {
  std::vector<int64_t> params;   // indices into State::params
  std::vector<int64_t> offsets;  // element offset of each in `flat`
  torch::Tensor flat;
  int64_t pending = 0;  // gradients of this round not yet final (overlap mode)
  bool launched = false;
  PendingCollective work;
};
}  // namespace

struct DataParallel::State {
  ProcessGroup group;
  DataParallelOptions options;
  std::vector<torch::Tensor> params;
  std::vector<Bucket> buckets;
  std::vector<int64_t> bucket_of;
  std::vector<char> ready;
  int64_t next_launch = 0;
  int64_t started_in_hooks = 0, last_started_in_hooks = 0;
  std::mutex mutex;
  std::string hook_error;
  // (accumulator, hook key): the accumulators are held so the hooks live as long as we do.
  std::vector<std::pair<std::shared_ptr<torch::autograd::Node>, uintptr_t>> hooks;

  explicit State(ProcessGroup g) : group(std::move(g)) {}

  std::string bucket_name(size_t b) const {
    std::ostringstream os;
    os << "gradient bucket " << b << " of " << buckets.size() << " (" << buckets[b].flat.numel() << " "
       << buckets[b].flat.scalar_type() << " elements)";
    return os.str();
  }

  // Copies bucket b's gradients into its flat buffer and starts the allreduce. Caller holds mutex.
  void launch(size_t b) {
    Bucket& bk = buckets[b];
    for (size_t j = 0; j < bk.params.size(); ++j) {
      const auto& p = params[static_cast<size_t>(bk.params[j])];
      auto dst = bk.flat.narrow(0, bk.offsets[j], p.numel());
      const auto& g = p.grad();
      if (g.defined()) {
        dst.copy_(g.reshape({-1}));
      } else {
        dst.zero_();
      }
    }
    bk.work = group.all_reduce_sum_async(bk.flat, bucket_name(b));
    bk.launched = true;
  }

  // Buckets are started strictly in index order, so every rank issues the same sequence of
  // collectives even if its gradients become ready in another order (Gloo matches them by order).
  void launch_ready_in_order(bool from_hook) {
    while (next_launch < static_cast<int64_t>(buckets.size()) &&
           buckets[static_cast<size_t>(next_launch)].pending == 0) {
      launch(static_cast<size_t>(next_launch));
      if (from_hook) ++started_in_hooks;
      ++next_launch;
    }
  }

  void on_grad_ready(int64_t i) {
    std::lock_guard<std::mutex> lock(mutex);
    if (ready[static_cast<size_t>(i)]) {
      hook_error = "msbnb::train::DataParallel: parameter " + std::to_string(i) +
                   " got a second gradient before synchronize_gradients(); with overlap_with_backward, call "
                   "synchronize_gradients() after every backward (gradient accumulation needs "
                   "overlap_with_backward(false))";
      TORCH_CHECK(false, hook_error);
    }
    ready[static_cast<size_t>(i)] = 1;
    --buckets[static_cast<size_t>(bucket_of[static_cast<size_t>(i)])].pending;
    launch_ready_in_order(/*from_hook=*/true);
  }

  void reset_round() {
    std::fill(ready.begin(), ready.end(), 0);
    for (auto& b : buckets) {
      b.pending = static_cast<int64_t>(b.params.size());
      b.launched = false;
      b.work = PendingCollective();
    }
    next_launch = 0;
    last_started_in_hooks = started_in_hooks;
    started_in_hooks = 0;
  }
};

namespace {
struct GradReadyHook : torch::autograd::FunctionPostHook {
  GradReadyHook(std::weak_ptr<DataParallel::State> s, int64_t i) : state(std::move(s)), index(i) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list& /*inputs*/) override {
    if (auto s = state.lock()) s->on_grad_ready(index);
    return outputs;
  }
  std::weak_ptr<DataParallel::State> state;
  int64_t index;
};

std::vector<torch::Tensor> trainable_parameters(const torch::nn::Module& model) {
  std::vector<torch::Tensor> out;
  for (const auto& p : model.parameters(/*recurse=*/true))
    if (p.requires_grad()) out.push_back(p);
  return out;
}
}  // namespace

DataParallel::DataParallel(ProcessGroup group, std::vector<torch::Tensor> parameters,
                           DataParallelOptions options)
    : state_(std::make_shared<State>(std::move(group))) {
  constexpr const char* who = "msbnb::train::DataParallel";
  auto& s = *state_;
  rank_ = s.group.rank();
  world_size_ = s.group.world_size();
  TORCH_CHECK(options.bucket_cap_mb() > 0, who, ": bucket_cap_mb: expected > 0, got ",
              options.bucket_cap_mb());
  s.options = options;
  std::unordered_set<const void*> seen;
  for (size_t i = 0; i < parameters.size(); ++i) {
    const auto& p = parameters[i];
    TORCH_CHECK(p.defined(), who, ": parameters[", i, "]: expected a defined tensor, got an undefined one");
    TORCH_CHECK(p.device().is_cpu(), who, ": parameters[", i, "]: expected a CPU tensor (Gloo), got one on ",
                p.device());
    TORCH_CHECK(p.requires_grad(), who, ": parameters[", i,
                "]: expected a trainable tensor (requires_grad), got a frozen one; frozen parameters are not "
                "synchronized");
    TORCH_CHECK(p.is_leaf(), who, ": parameters[", i,
                "]: expected a leaf tensor (a parameter), got one with grad_fn ", p.grad_fn()->name());
    TORCH_CHECK(seen.insert(p.unsafeGetTensorImpl()).second, who, ": parameters[", i,
                "]: expected each parameter once, got it twice");
  }
  s.params = std::move(parameters);

  // Buckets in reverse registration order (backward produces the last layers' gradients first).
  const double cap_bytes = options.bucket_cap_mb() * 1024.0 * 1024.0;
  s.bucket_of.assign(s.params.size(), -1);
  double bytes = 0;
  for (int64_t i = static_cast<int64_t>(s.params.size()) - 1; i >= 0; --i) {
    const auto& p = s.params[static_cast<size_t>(i)];
    const double nbytes = static_cast<double>(p.numel()) * static_cast<double>(p.element_size());
    const bool new_bucket =
        s.buckets.empty() ||
        s.params[static_cast<size_t>(s.buckets.back().params.front())].scalar_type() != p.scalar_type() ||
        (bytes + nbytes > cap_bytes && !s.buckets.back().params.empty());
    if (new_bucket) {
      s.buckets.emplace_back();
      bytes = 0;
    }
    auto& b = s.buckets.back();
    b.offsets.push_back(
        b.params.empty() ? 0 : b.offsets.back() + s.params[static_cast<size_t>(b.params.back())].numel());
    b.params.push_back(i);
    s.bucket_of[static_cast<size_t>(i)] = static_cast<int64_t>(s.buckets.size()) - 1;
    bytes += nbytes;
  }
  for (auto& b : s.buckets) {
    const auto& last = s.params[static_cast<size_t>(b.params.back())];
    b.flat = torch::empty({b.offsets.back() + last.numel()}, last.options().requires_grad(false));
  }
  s.ready.assign(s.params.size(), 0);
  s.reset_round();

  if (options.broadcast_parameters()) broadcast_parameters();

  if (options.overlap_with_backward() && world_size_ > 1) {
    std::weak_ptr<State> weak = state_;
    for (size_t i = 0; i < s.params.size(); ++i) {
      auto acc = torch::autograd::impl::grad_accumulator(s.params[i]);
      TORCH_CHECK(acc != nullptr, who, ": parameters[", i, "]: no gradient accumulator to hook");
      const auto key = acc->add_post_hook(std::make_unique<GradReadyHook>(weak, static_cast<int64_t>(i)));
      s.hooks.emplace_back(std::move(acc), key);
    }
  }
}

DataParallel::DataParallel(ProcessGroup group, const torch::nn::Module& model, DataParallelOptions options)
    : DataParallel(std::move(group), trainable_parameters(model), options) {}

DataParallel::~DataParallel() {
  if (!state_) return;
  for (auto& [acc, key] : state_->hooks) acc->del_post_hook(key);
  // A collective still in flight (after an error elsewhere) writes into our buffers: wait for it
  // (bounded by the timeout) and drop its error, a destructor must not throw.
  for (auto& b : state_->buckets) {
    if (b.launched && b.work.valid()) {
      try {
        b.work.wait();
      } catch (const std::exception&) {
      }
    }
  }
}

void DataParallel::broadcast_parameters() {
  auto& s = *state_;
  if (world_size_ == 1) return;
  torch::NoGradGuard no_grad;
  for (size_t b = 0; b < s.buckets.size(); ++b) {
    auto& bk = s.buckets[b];
    for (size_t j = 0; j < bk.params.size(); ++j) {
      const auto& p = s.params[static_cast<size_t>(bk.params[j])];
      bk.flat.narrow(0, bk.offsets[j], p.numel()).copy_(p.reshape({-1}));
    }
    std::ostringstream what;
    what << "parameter bucket " << b << " of " << s.buckets.size() << " (" << bk.flat.numel() << " "
         << bk.flat.scalar_type() << " elements)";
    s.group.broadcast(bk.flat, 0, what.str());
    for (size_t j = 0; j < bk.params.size(); ++j) {
      auto p = s.params[static_cast<size_t>(bk.params[j])];
      p.copy_(bk.flat.narrow(0, bk.offsets[j], p.numel()).view(p.sizes()));
    }
  }
}

void DataParallel::synchronize_gradients() {
  auto& s = *state_;
  if (world_size_ == 1) return;
  std::lock_guard<std::mutex> lock(s.mutex);
  TORCH_CHECK(s.hook_error.empty(), s.hook_error);
  s.launch_ready_in_order(false);
  while (s.next_launch < static_cast<int64_t>(s.buckets.size()))
    s.launch(static_cast<size_t>(s.next_launch++));
  torch::NoGradGuard no_grad;
  for (auto& bk : s.buckets) {
    bk.work.wait();
    bk.flat.div_(static_cast<double>(world_size_));
    for (size_t j = 0; j < bk.params.size(); ++j) {
      auto& p = s.params[static_cast<size_t>(bk.params[j])];
      auto avg = bk.flat.narrow(0, bk.offsets[j], p.numel()).view(p.sizes());
      if (p.grad().defined()) {
        p.mutable_grad().copy_(avg);
      } else {
        p.mutable_grad() = avg.clone();
      }
    }
  }
  s.reset_round();
}

const std::vector<torch::Tensor>& DataParallel::parameters() const { return state_->params; }

std::vector<std::vector<int64_t>> DataParallel::bucket_indices() const {
  std::vector<std::vector<int64_t>> out;
  for (const auto& b : state_->buckets) out.push_back(b.params);
  return out;
}

int64_t DataParallel::buckets_started_in_backward() const { return state_->last_started_in_hooks; }

ProcessGroup& DataParallel::group() { return state_->group; }

// ---------------------------------------------------------------------------------------------
bool LaunchResult::ok() const {
  if (!killed_at_deadline.empty()) return false;
  for (int c : exit_codes)
    if (c != 0) return false;
  return true;
}

int64_t find_free_port(const std::string& address) {
  int64_t port = 0;
  int err = 0;
  const bool found = for_each_address(address, 0, SOCK_STREAM, "address", [&](const addrinfo& a) {
    const int fd = ::socket(a.ai_family, SOCK_STREAM, 0);
    if (fd < 0) {
      err = errno;
      return false;
    }
    sockaddr_storage bound{};
    socklen_t len = sizeof(bound);
    const bool ok = ::bind(fd, a.ai_addr, a.ai_addrlen) == 0 &&
                    ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len) == 0;
    if (!ok) err = errno;
    ::close(fd);
    if (ok && bound.ss_family == AF_INET) port = ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
    if (ok && bound.ss_family == AF_INET6) port = ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port);
    return port != 0;
  });
  TORCH_CHECK(found, "msbnb::train::find_free_port: address: cannot bind a TCP socket on '", address,
              "': ", std::strerror(err));
  return port;
}

LaunchResult launch_local(const std::string& executable, const std::vector<std::string>& args,
                          const LaunchOptions& options) {
  constexpr const char* who = "msbnb::train::launch_local";
  TORCH_CHECK(options.world_size() >= 1, who, ": world_size: expected >= 1, got ", options.world_size());
  TORCH_CHECK(options.master_port() >= 0 && options.master_port() <= 65535, who,
              ": master_port: expected 0 (pick one) or a TCP port in [1, 65535], got ",
              options.master_port());
  TORCH_CHECK(options.deadline().count() > 0, who, ": deadline: expected > 0 ms, got ",
              options.deadline().count(), " ms");
  LaunchResult result;
  result.master_port =
      options.master_port() != 0 ? options.master_port() : find_free_port(options.master_addr());

  std::vector<pid_t> pids;
  auto kill_all = [&] {
    for (pid_t pid : pids) {
      if (pid > 0) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, nullptr, 0);
      }
    }
  };
  for (int64_t r = 0; r < options.world_size(); ++r) {
    Environment env;
    for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
      const std::string kv = *e;
      const auto eq = kv.find('=');
      if (eq != std::string::npos) env[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
    for (const auto& [k, v] : options.env()) env[k] = v;
    env["RANK"] = env["LOCAL_RANK"] = std::to_string(r);
    env["WORLD_SIZE"] = env["LOCAL_WORLD_SIZE"] = std::to_string(options.world_size());
    env["MASTER_ADDR"] = options.master_addr();
    env["MASTER_PORT"] = std::to_string(result.master_port);
    std::vector<std::string> env_strings, argv_strings{executable};
    for (const auto& [k, v] : env) env_strings.push_back(k + "=" + v);
    argv_strings.insert(argv_strings.end(), args.begin(), args.end());
    std::vector<char*> envp, argv;
    for (auto& e : env_strings) envp.push_back(e.data());
    envp.push_back(nullptr);
    for (auto& a : argv_strings) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_t pid = -1;
    const int rc = ::posix_spawn(&pid, executable.c_str(), nullptr, nullptr, argv.data(), envp.data());
    if (rc != 0) {
      kill_all();
      TORCH_CHECK(false, who, ": executable: cannot start '", executable, "' as rank ", r, ": ",
                  std::strerror(rc));
    }
    pids.push_back(pid);
  }

  result.exit_codes.assign(pids.size(), 0);
  std::vector<bool> done(pids.size(), false);
  size_t remaining = pids.size();
  const auto deadline = std::chrono::steady_clock::now() + options.deadline();
  while (remaining > 0 && std::chrono::steady_clock::now() < deadline) {
    for (size_t r = 0; r < pids.size(); ++r) {
      if (done[r]) continue;
      int status = 0;
      const pid_t got = ::waitpid(pids[r], &status, WNOHANG);
      if (got == pids[r]) {
        result.exit_codes[r] = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
        done[r] = true;
        --remaining;
      }
    }
    if (remaining > 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  for (size_t r = 0; r < pids.size(); ++r) {
    if (done[r]) continue;
    ::kill(pids[r], SIGKILL);
    int status = 0;
    ::waitpid(pids[r], &status, 0);
    result.exit_codes[r] = -SIGKILL;
    result.killed_at_deadline.push_back(static_cast<int64_t>(r));
  }
  return result;
}

}  // namespace msbnb::train
