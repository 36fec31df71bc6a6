// ggml's CPU matmul (ggml_mul_mat through the CPU backend's public API) on the shapes of
// bench/bench_matmul.cpp, timed the same way, for a side-by-side with msbnb (issue 13). Built
// against a ggml checkout (github:ggml-org/ggml) or ik_llama.cpp's ggml/ folder by
// tools/bench_ggml.sh; only ggml's public headers are used.
//
//   ggml_harness [--shapes=4096x4096,4096x11008] [--n=1,128] [--threads=1,2] [--formats=..]
//                [--min-bytes=1G] [--case-seconds=1.0] [--no-hugepages] [--wait-idle=S]
//                [--retries=2] [--label=TEXT] [--list] > results.jsonl
//
//   --shapes=MxK,..  weights of m = out rows by k = in columns (a ggml tensor ne0 = k, ne1 = m)
//   --formats=..     ggml type names (q4_0, iq4_nl, q8_0, ik_llama.cpp's q4_0_r8, iq4_nl_r4,
//                    q8_0_r8, ...); NAME_repack (mainline ggml only) puts the weight in the CPU
//                    backend's CPU_REPACK extra buffer type, which repacks it on upload (q4_0 and
//                    iq4_nl to their 8x8 interleaved layouts with AVX2). Default: mainline q4_0,
//                    q4_0_repack, iq4_nl, iq4_nl_repack, q8_0; ik_llama.cpp q4_0, q4_0_r8, iq4_nl,
//                    iq4_nl_r4, q8_0, q8_0_r8
//   --label=TEXT     copied into the info line (the checkout and build, say)
//   the rest as in bench_matmul.
//
// Output: JSON lines in bench_matmul's format: {"op":"info",..}, {"op":"read_bandwidth",..} per
// thread count, then per case {"op":"ggml_mul_mat","format","isa":"ggml","impl","m","k","n",
// "threads","median_us","min_us","samples","copies","weight_bytes","GB_s","GFLOP_s","bw_GB_s",
// "bw_after_GB_s","pct_bw","other_cpu","loadavg","check","rel_err","layout"}; layout: the type, or
// for _repack the layout CPU_REPACK chose (from its log line, e.g. q4_0_8x8).
// weight_bytes = ggml_nbytes of one weight tensor; GB_s = weight_bytes / median; GFLOP_s =
// 2 m k n / median; bw_GB_s: read bandwidth with the case's thread count just before it (best of
// 2 passes over 256 MiB, bench_util.h's read_pass); pct_bw = 100 GB_s / bw_GB_s; loadavg: the
// 1-minute load average before the case; check: ok when the output's relative RMS error against a
// float64 product with the unquantized weight is below 0.3 on rows 0, m/2, m-1 (4-bit
// quantization gives about 0.1, a wrong layout about 1.4); rel_err is that error.
//
// Method, as bench_matmul: one random float weight per shape, quantized once per format with
// ggml_quantize_chunk, uploaded (ggml_backend_tensor_set) into enough distinct weight tensors to
// fill --min-bytes; call i multiplies with copy i mod copies, so the weight streams from DRAM.
// Every call is its own one-node graph (out = ggml_mul_mat(W_i, x), x float32 [n, k]) run by
// ggml_backend_graph_compute on the CPU backend with ggml_backend_cpu_set_n_threads; the time
// includes what ggml does per call (quantizing x to the weight's vec_dot type, the threads'
// start). All outputs alias one buffer. One untimed warm-up call; a case stops after 5 cycles
// through the copies, or after --case-seconds with >= 3 samples, or at 3 x --case-seconds.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "bench_util.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#if __has_include("ggml-cpu.h")
#include "ggml-cpu.h"
#define HARNESS_MAINLINE 1
#else
#define HARNESS_MAINLINE 0  // ik_llama.cpp: the CPU backend is still in ggml.c / ggml-backend.cpp
#endif

namespace mb = msbnb::bench;
using Clock = std::chrono::steady_clock;

namespace {

[[noreturn]] void die(const std::string& msg) {
  std::fprintf(stderr, "ggml_harness: %s\n", msg.c_str());
  std::exit(2);
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string num(double v, int prec = 6) {
  if (!std::isfinite(v)) return "null";
  char b[64];
  std::snprintf(b, sizeof b, "%.*g", prec, v);
  return b;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep))
    if (!item.empty()) out.push_back(item);
  return out;
}

int64_t parse_int(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end || x <= 0) die(flag + ": expected a positive integer, got '" + v + "'");
  return x;
}

int64_t parse_bytes(const std::string& v) {
  char* end = nullptr;
  double x = std::strtod(v.c_str(), &end);
  const std::string suf = end;
  if (suf == "K" || suf == "k")
    x *= 1024;
  else if (suf == "M" || suf == "m")
    x *= 1048576;
  else if (suf == "G" || suf == "g")
    x *= 1073741824;
  else if (!suf.empty())
    x = -1;
  if (v.empty() || !(x > 0)) die("--min-bytes: expected a size like 1G, 512M, got '" + v + "'");
  return static_cast<int64_t>(x);
}

struct Options {
  std::vector<std::pair<int64_t, int64_t>> shapes{{4096, 4096}, {4096, 11008}};
  std::vector<int64_t> ns{1, 128};
  std::vector<int> threads{1, 2};
  std::vector<std::string> formats;
  int64_t min_bytes = int64_t{1} << 30;
  double case_seconds = 1.0;
  bool hugepages = true;
  double wait_idle = 0;
  int retries = 2;
  std::string label;
  bool list = false;
};

Options parse(int argc, char** argv) {
  Options o;
#if HARNESS_MAINLINE
  o.formats = {"q4_0", "q4_0_repack", "iq4_nl", "iq4_nl_repack", "q8_0"};
#else
  o.formats = {"q4_0", "q4_0_r8", "iq4_nl", "iq4_nl_r4", "q8_0", "q8_0_r8"};
#endif
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const size_t eq = a.find('=');
    const std::string key = a.substr(0, eq), val = eq == std::string::npos ? "" : a.substr(eq + 1);
    if (key == "--shapes") {
      o.shapes.clear();
      for (const auto& s : split(val, ',')) {
        const size_t x = s.find('x');
        if (x == std::string::npos) die("--shapes: expected MxK, got '" + s + "'");
        o.shapes.emplace_back(parse_int("--shapes", s.substr(0, x)), parse_int("--shapes", s.substr(x + 1)));
      }
    } else if (key == "--n") {
      o.ns.clear();
      for (const auto& s : split(val, ',')) o.ns.push_back(parse_int("--n", s));
    } else if (key == "--threads") {
      o.threads.clear();
      for (const auto& s : split(val, ',')) o.threads.push_back(static_cast<int>(parse_int("--threads", s)));
    } else if (key == "--formats") {
      o.formats = split(val, ',');
    } else if (key == "--min-bytes") {
      o.min_bytes = parse_bytes(val);
    } else if (key == "--case-seconds") {
      o.case_seconds = std::strtod(val.c_str(), nullptr);
      if (!(o.case_seconds > 0)) die("--case-seconds: expected seconds > 0, got '" + val + "'");
    } else if (key == "--wait-idle") {
      o.wait_idle = std::strtod(val.c_str(), nullptr);
    } else if (key == "--retries") {
      o.retries = static_cast<int>(std::strtol(val.c_str(), nullptr, 10));
    } else if (key == "--label") {
      o.label = val;
    } else if (a == "--no-hugepages") {
      o.hugepages = false;
    } else if (a == "--list") {
      o.list = true;
    } else {
      die("unknown argument '" + a + "' (see the header of tools/ggml_harness/harness.cpp)");
    }
  }
  if (o.shapes.empty() || o.ns.empty() || o.threads.empty() || o.formats.empty())
    die("--shapes, --n, --threads and --formats need at least one value each");
  return o;
}

std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    if (static_cast<unsigned char>(c) >= 0x20) o += c;
  }
  return o;
}

double loadavg1() {
  std::ifstream f("/proc/loadavg");
  double v = std::nan("");
  f >> v;
  return v;
}

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "";
}

// ---- ggml ---------------------------------------------------------------------------------------

struct Format {
  std::string name;
  ggml_type type = GGML_TYPE_COUNT;
  bool repack = false;
};

Format resolve(const std::string& name) {
  Format f{name};
  std::string base = name;
  const std::string suffix = "_repack";
  if (base.size() > suffix.size() && base.compare(base.size() - suffix.size(), suffix.size(), suffix) == 0) {
    base.resize(base.size() - suffix.size());
    f.repack = true;
#if !HARNESS_MAINLINE
    die("--formats: '" + name +
        "' needs mainline ggml's CPU_REPACK buffer; ik_llama.cpp has the _r4/_r8 types instead");
#endif
  }
  for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
    const char* n = ggml_type_name(static_cast<ggml_type>(t));
    if (n && base == n && ggml_blck_size(static_cast<ggml_type>(t)) > 0) {
      f.type = static_cast<ggml_type>(t);
      return f;
    }
  }
  die("--formats: expected a ggml type name (q4_0, iq4_nl, q8_0, ...), optionally with _repack, got '" +
      name + "'");
}

ggml_backend_buffer_type_t repack_buffer_type() {
#if HARNESS_MAINLINE
  // As llama.cpp finds it: the CPU device's extra buffer types, by proc address.
  ggml_backend_reg_t reg = ggml_backend_cpu_reg();
  auto get = reinterpret_cast<ggml_backend_dev_get_extra_bufts_t>(
      ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts"));
  if (!get) return nullptr;
  for (ggml_backend_buffer_type_t* b = get(ggml_backend_reg_dev_get(reg, 0)); b && *b; ++b)
    if (std::strcmp(ggml_backend_buft_name(*b), "CPU_REPACK") == 0) return *b;
#endif
  return nullptr;
}

void madvise_huge(void* p, size_t bytes) {
#ifdef MADV_HUGEPAGE
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), align = uintptr_t{2} << 20;
  const uintptr_t lo = (a + align - 1) / align * align, hi = (a + bytes) / align * align;
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

#if HARNESS_MAINLINE
// ggml's log, less the line CPU_REPACK writes for every tensor it repacks; the last such line's
// layout ("iq4_nl_8x8") goes into the JSON as "layout".
std::string g_repack_layout;
std::mutex g_log_mutex;  // the copies are uploaded (and repacked) by several threads
void log_filter(ggml_log_level level, const char* text, void*) {
  const char* key = "repack: repack tensor";
  std::lock_guard<std::mutex> lock(g_log_mutex);
  if (std::strstr(text, key)) {
    const char* with = std::strstr(text, " with ");
    if (with) {
      g_repack_layout = with + 6;
      while (!g_repack_layout.empty() && (g_repack_layout.back() == '\n' || g_repack_layout.back() == ' '))
        g_repack_layout.pop_back();
    }
    return;
  }
  if (level != GGML_LOG_LEVEL_DEBUG) std::fputs(text, stderr);
}
#endif

struct Timing {
  std::vector<double> samples;
};

template <typename F>
Timing time_calls(int64_t copies, double case_s, F&& call) {
  Timing t;
  const auto w = Clock::now();
  call(0);
  if (seconds_since(w) >= case_s) {
    t.samples.push_back(seconds_since(w));
    return t;
  }
  const auto t0 = Clock::now();
  for (int64_t i = 1;; ++i) {
    const auto c0 = Clock::now();
    call(i % copies);
    t.samples.push_back(seconds_since(c0));
    const double el = seconds_since(t0);
    const auto s = static_cast<int64_t>(t.samples.size());
    if (s >= 5 * copies || (el >= case_s && s >= 3) || el >= 3 * case_s) break;
  }
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  std::vector<Format> formats;
  for (const auto& f : o.formats) formats.push_back(resolve(f));
  const char* impl = HARNESS_MAINLINE ? "ggml" : "ik_llama.cpp";

  if (o.list) {
    for (const auto& s : o.shapes)
      for (const auto& f : formats)
        for (int64_t n : o.ns)
          for (int t : o.threads)
            std::fprintf(stderr, "%s %s m=%lld k=%lld n=%lld threads=%d\n", impl, f.name.c_str(),
                         static_cast<long long>(s.first), static_cast<long long>(s.second),
                         static_cast<long long>(n), t);
    return 0;
  }

#if HARNESS_MAINLINE
  ggml_log_set(log_filter, nullptr);
#endif
  ggml_backend_buffer_type_t cpu_buft = ggml_backend_cpu_buffer_type();
  ggml_backend_buffer_type_t repack_buft = nullptr;
  for (const auto& f : formats)
    if (f.repack && !(repack_buft = repack_buffer_type()))
      die("--formats: '" + f.name +
          "' needs the CPU_REPACK buffer type, which this build lacks (GGML_CPU_REPACK=OFF?)");
  ggml_backend_t backend = ggml_backend_cpu_init();
  if (!backend) die("ggml_backend_cpu_init failed");

  std::printf(
      "{\"op\":\"info\",\"impl\":\"%s\",\"label\":\"%s\",\"cpu\":\"%s\",\"hw_threads\":%u,\"avx2\":%d,"
      "\"avx512\":%d,\"avx512_vnni\":%d,\"avx512_bf16\":%d,\"min_bytes\":%lld,\"case_seconds\":%s,"
      "\"hugepages\":%s}\n",
      impl, json_escape(o.label).c_str(), json_escape(cpu_model()).c_str(),
      std::thread::hardware_concurrency(), ggml_cpu_has_avx2(), ggml_cpu_has_avx512(),
      ggml_cpu_has_avx512_vnni(), ggml_cpu_has_avx512_bf16(), static_cast<long long>(o.min_bytes),
      num(o.case_seconds).c_str(), o.hugepages ? "true" : "false");

  // Read bandwidth: 1 GiB at startup (best of 3 after one warm-up pass), 256 MiB before each case.
  const bool avx2 = __builtin_cpu_supports("avx2");
  const int64_t bw_elems = int64_t{1} << 28, bw_case_elems = int64_t{1} << 26;
  mb::Buffer<float> bw_buffer(static_cast<size_t>(bw_elems));
  mb::fill_weights(bw_buffer.data(), bw_elems, 3, 1.0f);
  std::vector<int> seen;
  for (int t : o.threads) {
    if (std::find(seen.begin(), seen.end(), t) != seen.end()) continue;
    seen.push_back(t);
    const double gb = mb::read_bandwidth(bw_buffer.data(), bw_elems, t, avx2, 3, 1);
    std::printf("{\"op\":\"read_bandwidth\",\"threads\":%d,\"bytes\":%lld,\"GB_s\":%s}\n", t,
                static_cast<long long>(bw_elems * 4), num(gb).c_str());
    std::fflush(stdout);
    std::fprintf(stderr, "read bandwidth, %d thread(s): %.2f GB/s (1 GiB)\n", t, gb);
  }

  const int64_t n_max = *std::max_element(o.ns.begin(), o.ns.end());
  int failed = 0;
  for (size_t si = 0; si < o.shapes.size(); ++si) {
    const int64_t m = o.shapes[si].first, k = o.shapes[si].second;
    std::vector<float> w(static_cast<size_t>(m * k)), x(static_cast<size_t>(k * n_max));
    mb::fill_weights(w.data(), m * k, 11 + si, 0.02f);
    mb::fill_weights(x.data(), k * n_max, 7, 1.0f);

    for (const auto& f : formats) {
      if (k % ggml_blck_size(f.type) != 0) {
        std::fprintf(stderr, "skip %s: k = %lld is not a multiple of its block %lld\n", f.name.c_str(),
                     static_cast<long long>(k), static_cast<long long>(ggml_blck_size(f.type)));
        continue;
      }
      // Quantize once (row chunks of 64: the interleaved _r4 / _r8 types want multiples of their
      // row group), then upload into every copy.
      const size_t row_bytes = ggml_row_size(f.type, k), q_bytes = row_bytes * static_cast<size_t>(m);
      std::vector<uint8_t> q(q_bytes);
      ggml_quantize_init(f.type);
      const int64_t chunk = m % 64 == 0 ? 64 : m;
#pragma omp parallel for schedule(dynamic)
      for (int64_t r = 0; r < m; r += chunk)
#if HARNESS_MAINLINE
        ggml_quantize_chunk(f.type, w.data(), q.data(), r * k, std::min(chunk, m - r), k, nullptr);
#else
        ggml_quantize_chunk(f.type, w.data(), q.data(), r * k, std::min(chunk, m - r), k, nullptr, nullptr);
#endif

      const int64_t copies = std::max<int64_t>(
          1, (o.min_bytes + static_cast<int64_t>(q_bytes) - 1) / static_cast<int64_t>(q_bytes));
      ggml_init_params wp = {static_cast<size_t>(copies + 1) * ggml_tensor_overhead(), nullptr, true};
      ggml_context* wctx = ggml_init(wp);
      std::vector<ggml_tensor*> ws;
      for (int64_t c = 0; c < copies; ++c) ws.push_back(ggml_new_tensor_2d(wctx, f.type, k, m));
      ggml_backend_buffer_t wbuf =
          ggml_backend_alloc_ctx_tensors_from_buft(wctx, f.repack ? repack_buft : cpu_buft);
      if (!wbuf) die("allocating " + std::to_string(copies) + " weights of " + f.name + " failed");
      if (o.hugepages) madvise_huge(ggml_backend_buffer_get_base(wbuf), ggml_backend_buffer_get_size(wbuf));
      const size_t nbytes = ggml_nbytes(ws[0]);
      if (nbytes != q_bytes)
        die("ggml_nbytes of " + f.name + " is " + std::to_string(nbytes) + ", expected " +
            std::to_string(q_bytes));
#if HARNESS_MAINLINE
      g_repack_layout.clear();
#endif
#pragma omp parallel for schedule(dynamic)
      for (int64_t c = 0; c < copies; ++c) ggml_backend_tensor_set(ws[c], q.data(), 0, q_bytes);
#if HARNESS_MAINLINE
      const std::string layout = f.repack ? g_repack_layout : ggml_type_name(f.type);
#else
      const std::string layout = ggml_type_name(f.type);
#endif

      for (int64_t n : o.ns) {
        // x [n, k] and one output buffer that all the graphs' outputs alias.
        ggml_init_params gp = {static_cast<size_t>(copies + 2) *
                                       (ggml_tensor_overhead() + ggml_graph_overhead_custom(4, false)) +
                                   4096,
                               nullptr, true};
        ggml_context* gctx = ggml_init(gp);
        ggml_tensor* xt = ggml_new_tensor_2d(gctx, GGML_TYPE_F32, k, n);
        ggml_backend_buffer_t xbuf = ggml_backend_buft_alloc_buffer(cpu_buft, ggml_nbytes(xt) + 4096);
        ggml_backend_tensor_alloc(xbuf, xt, ggml_backend_buffer_get_base(xbuf));
        ggml_backend_tensor_set(xt, x.data(), 0, ggml_nbytes(xt));
        ggml_backend_buffer_t ybuf =
            ggml_backend_buft_alloc_buffer(cpu_buft, static_cast<size_t>(m * n) * 4 + 4096);
        std::vector<ggml_cgraph*> graphs;
        std::vector<ggml_tensor*> outs;
        for (int64_t c = 0; c < copies; ++c) {
          ggml_tensor* y = ggml_mul_mat(gctx, ws[c], xt);
          ggml_backend_tensor_alloc(ybuf, y, ggml_backend_buffer_get_base(ybuf));
          ggml_cgraph* g = ggml_new_graph_custom(gctx, 4, false);
          ggml_build_forward_expand(g, y);
          graphs.push_back(g);
          outs.push_back(y);
        }

        // Check copy 0 against float64 with the unquantized weight.
        ggml_backend_cpu_set_n_threads(backend, o.threads[0]);
        if (ggml_backend_graph_compute(backend, graphs[0]) != GGML_STATUS_SUCCESS)
          die("ggml_backend_graph_compute failed for " + f.name);
        std::vector<float> y(static_cast<size_t>(m * n));
        ggml_backend_tensor_get(outs[0], y.data(), 0, y.size() * 4);
        double e2 = 0, r2 = 0;
        for (int64_t r : {int64_t{0}, m / 2, m - 1})
          for (int64_t j = 0; j < n; ++j) {
            double ref = 0;
            for (int64_t i = 0; i < k; ++i) ref += static_cast<double>(w[r * k + i]) * x[j * k + i];
            const double d = y[j * m + r] - ref;
            e2 += d * d;
            r2 += ref * ref;
          }
        const double rel_err = std::sqrt(e2 / std::max(r2, 1e-300));
        const bool ok = rel_err < 0.3;
        if (!ok) {
          ++failed;
          std::fprintf(stderr, "MISMATCH %s m=%lld k=%lld n=%lld: relative RMS error %.3g\n", f.name.c_str(),
                       static_cast<long long>(m), static_cast<long long>(k), static_cast<long long>(n),
                       rel_err);
        }

        for (int t : o.threads) {
          Timing tm;
          double bw = 0, bw_after = 0, other = std::nan(""), load = std::nan("");
          for (int attempt = 0;; ++attempt) {
            if (o.wait_idle > 0) msbnb::bench::wait_idle(o.wait_idle);
            load = loadavg1();
            const msbnb::bench::CpuSnapshot s0 = msbnb::bench::cpu_snapshot();
            const auto w0 = Clock::now();
            ggml_backend_cpu_set_n_threads(backend, t);
            bw = mb::read_bandwidth(bw_buffer.data(), bw_case_elems, t, avx2, 2);
            tm = time_calls(copies, o.case_seconds,
                            [&](int64_t i) { ggml_backend_graph_compute(backend, graphs[i]); });
            bw_after = mb::read_bandwidth(bw_buffer.data(), bw_case_elems, t, avx2, 1);
            other = msbnb::bench::other_cpu(s0, msbnb::bench::cpu_snapshot(), seconds_since(w0));
            if (o.wait_idle <= 0 || !(other >= msbnb::bench::kDisturbed) || attempt >= o.retries) break;
            std::fprintf(stderr, "  disturbed (other processes %.2f CPUs); rerun %d\n", other, attempt + 1);
          }
          const double med = mb::median(tm.samples);
          const double mn = *std::min_element(tm.samples.begin(), tm.samples.end());
          const double gbs = static_cast<double>(nbytes) / med / 1e9;
          const double gflops =
              2.0 * static_cast<double>(m) * static_cast<double>(k) * static_cast<double>(n) / med / 1e9;
          std::printf(
              "{\"op\":\"ggml_mul_mat\",\"format\":\"%s\",\"isa\":\"ggml\",\"impl\":\"%s\",\"m\":%lld,\"k\":%"
              "lld,"
              "\"n\":%lld,\"threads\":%d,\"median_us\":%s,\"min_us\":%s,\"samples\":%zu,\"copies\":%lld,"
              "\"weight_bytes\":%zu,\"GB_s\":%s,\"GFLOP_s\":%s,\"bw_GB_s\":%s,\"bw_after_GB_s\":%s,"
              "\"pct_bw\":%s,\"other_cpu\":%s,\"loadavg\":%s,\"check\":\"%s\",\"rel_err\":%s,\"layout\":\"%"
              "s\"}\n",
              f.name.c_str(), impl, static_cast<long long>(m), static_cast<long long>(k),
              static_cast<long long>(n), t, num(med * 1e6).c_str(), num(mn * 1e6).c_str(), tm.samples.size(),
              static_cast<long long>(copies), nbytes, num(gbs).c_str(), num(gflops).c_str(), num(bw).c_str(),
              num(bw_after).c_str(), num(100.0 * gbs / bw, 4).c_str(), num(other, 3).c_str(),
              num(load, 3).c_str(), ok ? "ok" : "FAIL", num(rel_err, 3).c_str(), layout.c_str());
          std::fflush(stdout);
          std::fprintf(stderr,
                       "%-14s %5lldx%-5lld n=%-4lld t=%d %10.1f us %7.2f GB/s %5.1f %% of %.1f GB/s  load "
                       "%.2f other %.2f\n",
                       f.name.c_str(), static_cast<long long>(m), static_cast<long long>(k),
                       static_cast<long long>(n), t, med * 1e6, gbs, 100.0 * gbs / bw, bw, load, other);
        }
        ggml_backend_buffer_free(ybuf);
        ggml_backend_buffer_free(xbuf);
        ggml_free(gctx);
      }
      ggml_backend_buffer_free(wbuf);
      ggml_free(wctx);
    }
  }
  ggml_backend_free(backend);
  return failed ? 1 : 0;
}
