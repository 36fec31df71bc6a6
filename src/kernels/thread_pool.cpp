// The kernels' thread pool (kernels/thread_pool.h): std::thread workers, no OpenMP.
#include "kernels/thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "kernels/parallel_errors.h"
#include "msbnb/kernels/ops.h"

namespace msbnb::kernels {

namespace {

// How long an idle worker (or a caller waiting for the last chunks) polls before it blocks: long
// enough to catch the next call of a layer-by-layer loop without a wake-up, short enough that an
// idle pool costs nothing measurable.
constexpr std::chrono::microseconds kSpin{30};

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// Polls done() for up to kSpin; true if it came. Between short bursts of polling it yields: on a
// busy machine the thread it waits for may be queued behind it on the same CPU, and a plain spin
// would hold that CPU until the scheduler's tick.
template <class Done>
bool spin_until(Done done) {
  const auto deadline = std::chrono::steady_clock::now() + kSpin;
  for (;;) {
    for (int i = 0; i < 32; ++i) {
      if (done()) return true;
      cpu_relax();
    }
    std::this_thread::yield();
    if (done()) return true;
    if (std::chrono::steady_clock::now() >= deadline) return false;
  }
}

// Set while this thread runs chunks: a nested call runs inline.
thread_local bool t_in_job = false;

struct InJob {
  InJob() { t_in_job = true; }
  ~InJob() { t_in_job = false; }
};

// One call's chunks. Shared (shared_ptr) by the caller and every worker that picked it up, so a
// worker that wakes after the call returned still holds valid counters: it finds next >= total
// and never touches call / ctx, which may be gone.
struct Job {
  detail::ChunkCall call = nullptr;
  void* ctx = nullptr;
  int64_t total = 0;
  int workers = 0;  // pool workers that take part (index < workers)
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;  // the caller's blocking wait for done == total
  std::condition_variable cv;
  ParallelErrors errors;

  void work() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < total;) {
      errors.run([&] { call(ctx, c); });
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == total) {
        const std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
  bool finished() const { return done.load(std::memory_order_acquire) == total; }
};

class Pool {
 public:
  ~Pool() { resize(0); }

  // Whether this thread got the pool (false: another thread's call is running on it).
  bool try_acquire() { return !busy_.exchange(true, std::memory_order_acquire); }
  void release() { busy_.store(false, std::memory_order_release); }

  // With the pool acquired: `workers` threads, started or joined as needed.
  void resize(size_t workers) {
    if (workers == threads_.size()) return;
    if (workers < threads_.size()) {
      {
        const std::lock_guard<std::mutex> lock(mu_);
        target_ = workers;
      }
      cv_.notify_all();
      for (size_t i = workers; i < threads_.size(); ++i) threads_[i].join();
      threads_.resize(workers);
    } else {
      {
        const std::lock_guard<std::mutex> lock(mu_);
        target_ = workers;
      }
      const uint64_t gen = gen_.load(std::memory_order_relaxed);
      try {
        while (threads_.size() < workers) {
          const size_t index = threads_.size();
          threads_.emplace_back([this, index, gen] { worker(index, gen); });
        }
      } catch (...) {  // no more threads to be had: run with those there are
        const std::lock_guard<std::mutex> lock(mu_);
        target_ = threads_.size();
      }
    }
    count_.store(static_cast<int>(threads_.size()), std::memory_order_relaxed);
  }

  // With the pool acquired: runs the chunks on this thread and up to threads - 1 workers.
  void run(int64_t chunks, int threads, detail::ChunkCall call, void* ctx) {
    resize(static_cast<size_t>(std::max(0, num_threads() - 1)));
    auto job = std::make_shared<Job>();
    job->call = call;
    job->ctx = ctx;
    job->total = chunks;
    job->workers = static_cast<int>(std::min<int64_t>(
        {static_cast<int64_t>(threads) - 1, chunks - 1, static_cast<int64_t>(threads_.size())}));
    if (job->workers > 0) {
      {
        const std::lock_guard<std::mutex> lock(mu_);
        job_ = job;
        gen_.fetch_add(1, std::memory_order_release);
      }
      cv_.notify_all();
    }
    {
      const InJob in_job;
      job->work();
    }
    // Every chunk is claimed; wait for those still running on workers (not for idle workers).
    if (!job->finished() && !spin_until([&] { return job->finished(); })) {
      std::unique_lock<std::mutex> lock(job->mu);
      job->cv.wait(lock, [&] { return job->finished(); });
    }
    if (job->workers > 0) {
      const std::lock_guard<std::mutex> lock(mu_);
      job_.reset();
    }
    job->errors.rethrow();
  }

  int workers() const { return count_.load(std::memory_order_relaxed); }

 private:
  void worker(size_t index, uint64_t seen) {
    for (;;) {
      spin_until([&] { return gen_.load(std::memory_order_acquire) != seen; });
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return gen_.load(std::memory_order_relaxed) != seen || index >= target_; });
        if (index >= target_) return;
        seen = gen_.load(std::memory_order_relaxed);
        job = job_;
      }
      if (job && index < static_cast<size_t>(job->workers)) {
        const InJob in_job;
        job->work();
      }
    }
  }

  std::atomic<bool> busy_{false};
  std::mutex mu_;  // guards job_ and target_; with cv_, the idle workers' wait
  std::condition_variable cv_;
  std::shared_ptr<Job> job_;      // the call in flight, if any
  std::atomic<uint64_t> gen_{0};  // bumped per published job
  size_t target_ = 0;             // workers with index >= target_ exit
  std::vector<std::thread> threads_;
  std::atomic<int> count_{0};
};

// The pool, made on first use. A forked child has none of the parent's workers: it abandons the
// parent's pool (kept reachable, never destroyed: its threads do not exist there) and makes its
// own. At exit the pool's destructor joins the workers; a call after that runs inline.
std::atomic<Pool*> g_pool{nullptr};
std::atomic<Pool*> g_abandoned{nullptr};
std::atomic<bool> g_closed{false};

void forget_pool_in_child() { g_abandoned.store(g_pool.exchange(nullptr)); }

struct PoolOwner {
  PoolOwner() { pthread_atfork(nullptr, nullptr, forget_pool_in_child); }
  ~PoolOwner() {
    g_closed.store(true);
    delete g_pool.exchange(nullptr);
  }
};
PoolOwner g_owner;

Pool* pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p || g_closed.load()) return p;
  auto fresh = std::make_unique<Pool>();
  if (g_pool.compare_exchange_strong(p, fresh.get(), std::memory_order_acq_rel)) return fresh.release();
  return p;  // another thread made it first
}

void run_inline(int64_t chunks, detail::ChunkCall call, void* ctx) {
  for (int64_t c = 0; c < chunks; ++c) call(ctx, c);
}

}  // namespace

namespace detail {
void run_chunks(int64_t chunks, int threads, ChunkCall call, void* ctx) {
  if (chunks <= 0) return;
  if (chunks == 1 || threads <= 1 || t_in_job) return run_inline(chunks, call, ctx);
  Pool* p = pool();
  if (!p || !p->try_acquire()) return run_inline(chunks, call, ctx);
  struct Release {
    Pool* p;
    ~Release() { p->release(); }
  } release{p};
  p->run(chunks, threads, call, ctx);
}
}  // namespace detail

int pool_workers() {
  const Pool* p = g_pool.load(std::memory_order_acquire);
  return p ? p->workers() : 0;
}

}  // namespace msbnb::kernels
