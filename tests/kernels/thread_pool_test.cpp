// The kernels' thread pool (src/kernels/thread_pool.h): every chunk exactly once, exceptions,
// nested and concurrent calls, short jobs back to back (late workers), set_num_threads, fork; and
// the matmul drivers' outputs bit for bit the same at any thread count. No timing asserts.
#include "kernels/thread_pool.h"

#include <gtest/gtest.h>
#include <omp.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "msbnb/kernels/formats.h"
#include "msbnb/kernels/matmul.h"
#include "msbnb/kernels/ops.h"

#if defined(__SANITIZE_THREAD__)
#define MSBNB_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define MSBNB_TSAN 1
#endif
#endif

namespace {

namespace K = msbnb::kernels;

class ThreadPool : public ::testing::Test {
 protected:
  void TearDown() override { K::set_num_threads(0); }
};

// Runs `total` chunks on `threads` threads; every hit count must be 1.
void expect_each_once(int64_t total, int threads) {
  std::vector<std::atomic<int>> hits(static_cast<size_t>(total));
  K::parallel_for_chunks(total, threads, [&](int64_t c) {
    ASSERT_GE(c, 0);
    ASSERT_LT(c, total);
    hits[static_cast<size_t>(c)].fetch_add(1);
  });
  for (int64_t c = 0; c < total; ++c)
    ASSERT_EQ(hits[static_cast<size_t>(c)].load(), 1)
        << "chunk " << c << " of " << total << ", " << threads << " threads";
}

TEST_F(ThreadPool, EveryChunkExactlyOnce) {
  for (int threads : {1, 2, 3, 4, 8}) {
    K::set_num_threads(threads);
    for (int64_t total : {0, 1, 2, 3, 7, 16, 63, 1001, 5000}) expect_each_once(total, threads);
    // Fewer participants than the pool has threads.
    expect_each_once(999, 2);
  }
}

TEST_F(ThreadPool, ExceptionReachesTheCaller) {
  for (int threads : {1, 2, 4}) {
    K::set_num_threads(threads);
    std::atomic<int> ran{0};
    try {
      K::parallel_for_chunks(100, threads, [&](int64_t c) {
        ran.fetch_add(1);
        if (c == 37) throw std::runtime_error("chunk 37");
      });
      FAIL() << "no exception with " << threads << " threads";
    } catch (const std::runtime_error& e) {
      EXPECT_STREQ(e.what(), "chunk 37");
    }
    EXPECT_GE(ran.load(), 38);
    // Every chunk throwing: one of them arrives, and the pool still works afterwards.
    EXPECT_THROW(K::parallel_for_chunks(50, threads, [](int64_t) { throw std::logic_error("each"); }),
                 std::logic_error);
    expect_each_once(300, threads);
  }
}

TEST_F(ThreadPool, NestedCallsRunInline) {
  K::set_num_threads(4);
  constexpr int64_t kOuter = 16, kInner = 40;
  std::vector<std::atomic<int>> hits(static_cast<size_t>(kOuter * kInner));
  std::atomic<int> foreign{0};
  K::parallel_for_chunks(kOuter, 4, [&](int64_t o) {
    const std::thread::id me = std::this_thread::get_id();
    K::parallel_for_chunks(kInner, 4, [&](int64_t i) {
      if (std::this_thread::get_id() != me) foreign.fetch_add(1);
      hits[static_cast<size_t>(o * kInner + i)].fetch_add(1);
    });
  });
  EXPECT_EQ(foreign.load(), 0) << "a nested call's chunks ran on another thread";
  for (const auto& h : hits) ASSERT_EQ(h.load(), 1);
}

// Many tiny jobs, each with captures that die when the call returns: a worker that wakes late
// for one of them must find nothing to do and touch none of it (ASan / TSan check the rest).
TEST_F(ThreadPool, LateWorkersAreHarmless) {
  for (int threads : {2, 3, 8}) {
    K::set_num_threads(threads);
    for (int rep = 0; rep < 5000; ++rep) {
      const int64_t total = 2 + rep % 5;
      std::vector<int> hits(static_cast<size_t>(total), 0);  // each chunk its own element
      K::parallel_for_chunks(total, threads, [&hits](int64_t c) { ++hits[static_cast<size_t>(c)]; });
      for (int64_t c = 0; c < total; ++c) ASSERT_EQ(hits[static_cast<size_t>(c)], 1) << "rep " << rep;
    }
  }
}

TEST_F(ThreadPool, SetNumThreadsTakesEffect) {
  auto threads_used = [](int threads) {
    std::mutex mu;
    std::set<std::thread::id> ids;
    K::parallel_for_chunks(256, threads, [&](int64_t) {
      const std::lock_guard<std::mutex> lock(mu);
      ids.insert(std::this_thread::get_id());
    });
    return ids.size();
  };
  for (int threads : {3, 2, 5, 1, 4}) {
    K::set_num_threads(threads);
    EXPECT_EQ(K::num_threads(), threads);
    EXPECT_LE(threads_used(threads), static_cast<size_t>(threads));
    // A call asking for more threads than set gets no more.
    EXPECT_LE(threads_used(threads + 3), static_cast<size_t>(threads));
    if (threads > 1) {
      EXPECT_EQ(K::pool_workers(), threads - 1);
    }
  }
  K::set_num_threads(0);
  EXPECT_EQ(K::num_threads(), omp_get_max_threads());
}

// Calls from several threads at once: one runs on the pool, the others inline; each chunk once.
TEST_F(ThreadPool, ConcurrentCallers) {
  K::set_num_threads(3);
  std::atomic<bool> ok{true};
  std::vector<std::thread> callers;
  for (int t = 0; t < 3; ++t)
    callers.emplace_back([&ok, t] {
      for (int rep = 0; rep < 300; ++rep) {
        const int64_t total = 1 + (rep * 7 + t) % 50;
        std::vector<std::atomic<int>> hits(static_cast<size_t>(total));
        K::parallel_for_chunks(total, 3, [&](int64_t c) { hits[static_cast<size_t>(c)].fetch_add(1); });
        for (const auto& h : hits)
          if (h.load() != 1) ok = false;
      }
    });
  for (std::thread& c : callers) c.join();
  EXPECT_TRUE(ok.load());
}

// A forked child has none of the parent's workers: its calls still complete.
TEST_F(ThreadPool, WorksInAForkedChild) {
#ifdef MSBNB_TSAN
  GTEST_SKIP() << "ThreadSanitizer does not support threads started after a multi-threaded fork";
#endif
  K::set_num_threads(2);
  expect_each_once(100, 2);  // the parent's pool has its worker
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    std::vector<std::atomic<int>> hits(1000);
    K::parallel_for_chunks(1000, 2, [&](int64_t c) { hits[static_cast<size_t>(c)].fetch_add(1); });
    for (const auto& h : hits)
      if (h.load() != 1) _exit(1);
    _exit(0);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "status " << status;
  expect_each_once(100, 2);
}

// The drivers split the weight rows (or columns) into more chunks at more threads; each output
// is computed within one chunk, so the bits do not depend on the thread count.
TEST_F(ThreadPool, MatmulBitsIndependentOfThreadCount) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> byte(0, 255);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t rows = 4 * 16 * 8 + 13, cols = 300;  // more rows than 8 chunks per thread of 16
  std::vector<uint8_t> codes(static_cast<size_t>((rows * cols + 1) / 2));
  for (uint8_t& c : codes) c = static_cast<uint8_t>(byte(rng));
  std::vector<float> absmax(static_cast<size_t>((rows * cols + 63) / 64));
  for (float& a : absmax) a = 0.01f + 0.04f * static_cast<float>(byte(rng)) / 255.0f;
  const K::PackedLut4 w4 = K::pack_lut4_bnb(codes.data(), rows, cols, 64, absmax.data(), K::kCodeNF4);
  std::vector<int8_t> q(static_cast<size_t>(rows * cols));
  for (int8_t& v : q) v = static_cast<int8_t>(byte(rng) - 128);
  std::vector<float> scale(static_cast<size_t>(rows));
  for (float& s : scale) s = 0.001f + 0.01f * static_cast<float>(byte(rng)) / 255.0f;
  const K::PackedInt8 w8 = K::pack_int8(q.data(), rows, cols, scale.data(), nullptr);
  for (int64_t n : {1, 5, 33}) {
    std::vector<float> x(static_cast<size_t>(n * std::max(rows, cols)));
    for (float& v : x) v = normal(rng);
    // op 0..3: nf4 exact, nf4 fast, int8 fast, nf4 transposed, int8 transposed.
    for (int op = 0; op < 5; ++op) {
      const bool transposed = op >= 3;
      const int64_t in = transposed ? rows : cols, out = transposed ? cols : rows;
      std::vector<float> y1;
      for (int threads : {1, 2, 3, 4, 7}) {
        K::set_num_threads(threads);
        std::vector<float> y(static_cast<size_t>(n * out), -1.0f);
        K::MatmulIO io;
        io.n = n;
        io.x = x.data();
        io.ldx = in;
        io.y = y.data();
        io.ldy = out;
        if (op == 0) K::matmul(w4.view, io, K::MatmulPath::exact);
        if (op == 1) K::matmul(w4.view, io, K::MatmulPath::fast);
        if (op == 2) K::matmul(w8.view, io, K::MatmulPath::fast);
        if (op == 3) K::matmul_transposed(w4.view, io);
        if (op == 4) K::matmul_transposed(w8.view, io);
        if (threads == 1) {
          y1 = y;
          continue;
        }
        ASSERT_EQ(std::memcmp(y.data(), y1.data(), y.size() * sizeof(float)), 0)
            << "op " << op << " n=" << n << ": " << threads << " threads vs 1";
      }
    }
  }
}

}  // namespace
