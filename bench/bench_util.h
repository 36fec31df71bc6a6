// Helpers for the benchmarks: large aligned buffers first touched by the threads, fast
// deterministic fills, and the memory read / write bandwidth passes. No torch, no benchmark.h.
#pragma once
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <new>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace msbnb::bench {

/// splitmix64: a counter-based hash, so fills are deterministic for any thread count.
inline uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/// A heap buffer of n trivially copyable T, 2 MiB aligned (transparent huge pages requested so
/// that TLB misses do not blur the bandwidth), zero filled in parallel so that every page is
/// touched before any timing.
template <typename T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t n) : n_(n) {
    if (n == 0) return;
    const size_t align = size_t{2} << 20;
    const size_t bytes = (n * sizeof(T) + align - 1) / align * align;
    void* p = std::aligned_alloc(align, bytes);
    if (!p) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);
#endif
    ptr_.reset(static_cast<T*>(p));
    char* c = static_cast<char*>(p);
    const int64_t pages = static_cast<int64_t>(bytes / 4096);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < pages; ++i) std::memset(c + i * 4096, 0, 4096);
  }
  T* data() { return ptr_.get(); }
  const T* data() const { return ptr_.get(); }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }
  explicit operator bool() const { return ptr_ != nullptr; }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> ptr_;
  size_t n_ = 0;
};

/// Weight-like values: mean 0, standard deviation `sigma` (sum of four uniforms, close to a
/// normal), deterministic in (seed, index).
inline void fill_weights(float* x, int64_t n, uint64_t seed, float sigma) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t h = mix64(seed * 0x100000001b3ull + static_cast<uint64_t>(i));
    const float s =
        static_cast<float>((h & 0xffff) + ((h >> 16) & 0xffff) + ((h >> 32) & 0xffff) + (h >> 48));
    // Sum of 4 uniforms on [0, 65536): mean 131070, variance 4 * 65536^2 / 12.
    x[i] = (s - 131070.0f) * (sigma * 1.7320508f / 65536.0f);
  }
}

/// Uniformly random bytes.
inline void fill_bytes(uint8_t* p, int64_t n, uint64_t seed) {
  const int64_t words = n / 8;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < words; ++i) {
    const uint64_t h = mix64(seed ^ static_cast<uint64_t>(i) * 0x9e3779b97f4a7c15ull);
    std::memcpy(p + i * 8, &h, 8);
  }
  for (int64_t i = words * 8; i < n; ++i) p[i] = static_cast<uint8_t>(mix64(seed + static_cast<uint64_t>(i)));
}

// Sums of a float range with 8 independent accumulators, so the adds never limit the loads.
__attribute__((target("avx2"))) inline float sum_avx2(const float* p, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
    a4 = _mm256_add_ps(a4, _mm256_loadu_ps(p + i + 32));
    a5 = _mm256_add_ps(a5, _mm256_loadu_ps(p + i + 40));
    a6 = _mm256_add_ps(a6, _mm256_loadu_ps(p + i + 48));
    a7 = _mm256_add_ps(a7, _mm256_loadu_ps(p + i + 56));
  }
  const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                                 _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, s);
  float total = 0;
  for (float v : lanes) total += v;
  for (; i < n; ++i) total += p[i];
  return total;
}

inline float sum_sse2(const float* p, int64_t n) {
  __m128 a0 = _mm_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm_add_ps(a0, _mm_loadu_ps(p + i));
    a1 = _mm_add_ps(a1, _mm_loadu_ps(p + i + 4));
    a2 = _mm_add_ps(a2, _mm_loadu_ps(p + i + 8));
    a3 = _mm_add_ps(a3, _mm_loadu_ps(p + i + 12));
    a4 = _mm_add_ps(a4, _mm_loadu_ps(p + i + 16));
    a5 = _mm_add_ps(a5, _mm_loadu_ps(p + i + 20));
    a6 = _mm_add_ps(a6, _mm_loadu_ps(p + i + 24));
    a7 = _mm_add_ps(a7, _mm_loadu_ps(p + i + 28));
  }
  const __m128 s = _mm_add_ps(_mm_add_ps(_mm_add_ps(a0, a1), _mm_add_ps(a2, a3)),
                              _mm_add_ps(_mm_add_ps(a4, a5), _mm_add_ps(a6, a7)));
  alignas(16) float lanes[4];
  _mm_store_ps(lanes, s);
  float total = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  for (; i < n; ++i) total += p[i];
  return total;
}

/// One read pass: `threads` OpenMP threads each sum a contiguous share of x[0, n). Returns the
/// sum (to be kept alive by the caller).
inline float read_pass(const float* x, int64_t n, int threads, bool avx2) {
  float total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t lo = n * t / nt / 64 * 64, hi = t + 1 == nt ? n : n * (t + 1) / nt / 64 * 64;
    total += avx2 ? sum_avx2(x + lo, hi - lo) : sum_sse2(x + lo, hi - lo);
  }
  return total;
}

/// One write pass: each thread memsets a contiguous share of p[0, bytes) to `value`.
inline void write_pass(void* p, size_t bytes, int threads, int value) {
  char* c = static_cast<char*>(p);
  const int64_t total = static_cast<int64_t>(bytes);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t lo = total * t / nt / 64 * 64, hi = t + 1 == nt ? total : total * (t + 1) / nt / 64 * 64;
    std::memset(c + lo, value, static_cast<size_t>(hi - lo));
  }
}

/// An uninitialised buffer of n T behind a shared_ptr (freed with std::free): 2 MiB aligned with
/// transparent huge pages requested when `huge` (as Buffer), else 64-byte aligned (as the
/// library's own packed weights).
template <typename T>
std::shared_ptr<T> shared_alloc(size_t n, bool huge) {
  const size_t align = huge ? size_t{2} << 20 : 64;
  const size_t bytes = std::max<size_t>((n * sizeof(T) + align - 1) / align * align, align);
  void* p = std::aligned_alloc(align, bytes);
  if (!p) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  if (huge) madvise(p, bytes, MADV_HUGEPAGE);
#endif
  return std::shared_ptr<T>(static_cast<T*>(p), [](T* q) { std::free(q); });
}

/// memcpy of `bytes` split across the OpenMP threads (each first-touches its share of dst).
inline void parallel_copy(void* dst, const void* src, size_t bytes) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  const int64_t total = static_cast<int64_t>(bytes);
#pragma omp parallel
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t lo = total * t / nt / 64 * 64, hi = t + 1 == nt ? total : total * (t + 1) / nt / 64 * 64;
    if (hi > lo) std::memcpy(d + lo, s + lo, static_cast<size_t>(hi - lo));
  }
}

/// Median of a sample (mean of the two middle values for an even count); NaN when empty.
inline double median(std::vector<double> v) {
  if (v.empty()) return std::nan("");
  const size_t h = v.size() / 2;
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(h), v.end());
  if (v.size() % 2) return v[h];
  const double hi = v[h];
  return (*std::max_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(h)) + hi) / 2;
}

/// Read bandwidth in GB/s (1e9 bytes): the best of `passes` read_pass over x[0, n) after
/// `warmup` untimed passes.
inline double read_bandwidth(const float* x, int64_t n, int threads, bool avx2, int passes, int warmup = 0) {
  volatile float keep = 0;
  for (int i = 0; i < warmup; ++i) keep = keep + read_pass(x, n, threads, avx2);
  double best = 0;
  for (int i = 0; i < passes; ++i) {
    const double t0 = omp_get_wtime();
    const float s = read_pass(x, n, threads, avx2);
    const double sec = omp_get_wtime() - t0;
    keep = keep + s;
    best = std::max(best, static_cast<double>(n) * sizeof(float) / sec / 1e9);
  }
  return best;
}

/// vpdpbusd peak of `threads` threads in GOP/s (2 * 64 multiply-adds per instruction): 16
/// independent accumulators per thread (more than latency x throughput on current x86), all
/// operands in registers. 0 where the CPU lacks AVX512-VNNI. The int8 GEMM is held to a fraction
/// of this.
__attribute__((target("avx512f,avx512vnni"))) inline double vnni_chain(int64_t iters) {
  __m512i a0 = _mm512_set1_epi32(1), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0,
          a9 = a0, a10 = a0, a11 = a0, a12 = a0, a13 = a0, a14 = a0, a15 = a0;
  const __m512i x = _mm512_set1_epi8(3), w = _mm512_set1_epi8(-2);
  // 16 independent vpdpbusd on named registers, nothing else in the loop body.
  for (int64_t it = 0; it < iters; ++it) {
    __asm__ volatile(
        "vpdpbusd %[w], %[x], %[a0]\n\tvpdpbusd %[w], %[x], %[a1]\n\tvpdpbusd %[w], %[x], %[a2]\n\t"
        "vpdpbusd %[w], %[x], %[a3]\n\tvpdpbusd %[w], %[x], %[a4]\n\tvpdpbusd %[w], %[x], %[a5]\n\t"
        "vpdpbusd %[w], %[x], %[a6]\n\tvpdpbusd %[w], %[x], %[a7]"
        : [a0] "+v"(a0), [a1] "+v"(a1), [a2] "+v"(a2), [a3] "+v"(a3), [a4] "+v"(a4), [a5] "+v"(a5),
          [a6] "+v"(a6), [a7] "+v"(a7)
        : [x] "v"(x), [w] "v"(w));
    __asm__ volatile(
        "vpdpbusd %[w], %[x], %[a0]\n\tvpdpbusd %[w], %[x], %[a1]\n\tvpdpbusd %[w], %[x], %[a2]\n\t"
        "vpdpbusd %[w], %[x], %[a3]\n\tvpdpbusd %[w], %[x], %[a4]\n\tvpdpbusd %[w], %[x], %[a5]\n\t"
        "vpdpbusd %[w], %[x], %[a6]\n\tvpdpbusd %[w], %[x], %[a7]"
        : [a0] "+v"(a8), [a1] "+v"(a9), [a2] "+v"(a10), [a3] "+v"(a11), [a4] "+v"(a12), [a5] "+v"(a13),
          [a6] "+v"(a14), [a7] "+v"(a15)
        : [x] "v"(x), [w] "v"(w));
  }
  const __m512i all[16] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15};
  alignas(64) int32_t lanes[16 * 16];
  for (int i = 0; i < 16; ++i) _mm512_store_si512(lanes + 16 * i, all[i]);
  double sum = 0;
  for (int32_t v : lanes) sum += v;
  return sum;
}
inline double vnni_peak_gops(int threads) {
  if (!__builtin_cpu_supports("avx512vnni")) return 0.0;
  const int64_t iters = int64_t{1} << 21;  // 33 M instructions a thread: ~10 ms
  volatile double keep = 0;
  double best = 0;
  for (int pass = 0; pass < 3; ++pass) {
    const double t0 = omp_get_wtime();
    double sum = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sum)
    sum += vnni_chain(iters);
    const double sec = omp_get_wtime() - t0;
    keep = keep + sum;
    best = std::max(best, double(threads) * double(iters) * 16 * 64 * 2 / sec / 1e9);
  }
  return best;
}

// ---- other load (bench_matmul, tools/ggml_harness) ----------------------------------------------

// CPU time of the whole machine (all but idle and iowait) and of this process, in clock ticks.
struct CpuSnapshot {
  int64_t busy = -1, self = -1;
};
inline CpuSnapshot cpu_snapshot() {
  CpuSnapshot s;
  std::ifstream st("/proc/stat");
  std::string cpu;
  int64_t v[8] = {};
  if (!(st >> cpu) || cpu != "cpu") return s;
  for (int64_t& x : v)
    if (!(st >> x)) return s;
  std::ifstream me("/proc/self/stat");
  std::string line;
  std::getline(me, line);
  const size_t paren = line.rfind(')');
  if (paren == std::string::npos) return s;
  std::istringstream fields(line.substr(paren + 1));
  std::string f;
  int64_t utime = 0, stime = 0;
  for (int i = 0; i < 13 && fields >> f; ++i) {
    if (i == 11) utime = std::atoll(f.c_str());
    if (i == 12) stime = std::atoll(f.c_str());
  }
  s.busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];  // user nice system irq softirq steal
  s.self = utime + stime;
  return s;
}
// CPUs' worth of time other processes used between two snapshots `wall` seconds apart (NaN if
// /proc is unreadable).
inline double other_cpu(const CpuSnapshot& a, const CpuSnapshot& b, double wall) {
  if (a.busy < 0 || b.busy < 0 || wall <= 0) return std::nan("");
  const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
  return std::max<double>(0.0, static_cast<double>((b.busy - a.busy) - (b.self - a.self))) / ticks / wall;
}
constexpr double kDisturbed = 0.1;  // other_cpu at or above this: the case shared the CPUs

// Waits up to max_s seconds until other processes use less than 0.15 CPUs over `sample_s`.
inline void wait_idle(double max_s, double sample_s = 0.3) {
  const auto t0 = std::chrono::steady_clock::now();
  bool told = false;
  for (;;) {
    const CpuSnapshot a = cpu_snapshot();
    std::this_thread::sleep_for(std::chrono::duration<double>(sample_s));
    const double o = other_cpu(a, cpu_snapshot(), sample_s);
    if (!(o >= 0.15)) return;
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() >= max_s) {
      std::fprintf(stderr, "  warning: other processes use %.2f CPUs; timings will be disturbed\n", o);
      return;
    }
    if (!told) std::fprintf(stderr, "  other processes use %.2f CPUs; waiting (up to %.0f s)\n", o, max_s);
    told = true;
  }
}

}  // namespace msbnb::bench
