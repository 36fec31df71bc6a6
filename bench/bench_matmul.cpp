// Fused dequantize-matmul (kernels/matmul.h) against the memory bandwidth and against torch fp32,
// with the weights streamed from DRAM as in a real model.
//
//   msbnb_bench_matmul [--quick] [--shapes=4096x4096,11008x4096] [--n=1,16] [--threads=1,2]
//                      [--formats=nf4,int8_sym,llm_int8] [--isa=active|scalar|avx2|avx512|all]
//                      [--paths=exact,fast,int8] [--ops=matmul,matmul_transposed,matmul_llm_int8,
//                      torch_linear,torch_mv] [--min-bytes=1G] [--case-seconds=1.0] [--no-torch]
//                      [--no-hugepages] [--wait-idle=S] [--retries=2] [--contention=N] [--contention-ms=3]
//                      [--list] > results.jsonl
//
//   --quick          4096x4096, n 1 and 128, threads 2 then 1, formats nf4 int4_sym int8_sym
//                    llm_int8, 0.5 s per case (each other flag still overrides its part)
//   --shapes=MxK,..  weights of m = out_features rows by k = in_features columns
//                    (default 4096x4096, 11008x4096, 4096x11008)
//   --n=..           activation rows (default 1, 4, 16, 128, 512)
//   --threads=..     thread counts, run in this order (default 1, 2)
//   --formats=..     nf4 nf4_dq fp4 int4_sym int4_asym int8_sym int8_asym llm_int8; int4 / int8 mean
//                    both variants, all every format (default all)
//   --isa=..         kernel table: active (default, active_kernels()), scalar, avx2, avx512, or all
//                    (every ISA this CPU runs; scalar only at n = 1)
//   --paths=..       MatmulPath of op matmul: exact, fast, int8, auto (default exact, fast, int8; auto is the
//                    library's default, MatmulPath::automatic, which resolves to one of the two:
//                    see resolve_path in matmul.h)
//   --ops=..         restrict the ops (default all of them)
//   --min-bytes=N    DRAM footprint of each weight set, suffix K / M / G (default 1G)
//   --case-seconds=S time cap of a case (default 1.0; 0.5 with --quick)
//   --no-torch       skip the torch baselines (they are absent when built without torch)
//   --no-hugepages   weight copies on 64-byte aligned memory as the packing functions allocate it,
//                    instead of 2 MiB aligned MADV_HUGEPAGE memory like the bandwidth buffer
//   --wait-idle=S    before each case wait up to S seconds for other processes to use < 0.15 CPUs,
//                    and rerun a case they disturbed anyway (other_cpu >= 0.1) up to --retries times
//                    (default 0: no waiting; other_cpu is reported either way)
//   --contention=N   time every case under a competing load of N compile-like workers: processes
//                    that each fork short-lived children doing ~3 ms of CPU work, one after the
//                    other, like make -jN (a plain busy loop did not show the cost of a thread
//                    descheduled mid-call); started before the weights exist, paused (SIGSTOP)
//                    outside the timed calls; "contention":N in every JSON line (default 0)
//   --contention-ms=M each child's CPU work in ms (default 3)
//   --list           print the planned cases (stderr) and exit
//   --check-only     only the checks against the scalar kernels (below), no timing (for ctest)
//
// Before it is timed, every case runs once and is checked against the scalar kernel table on the
// first, middle and last rows of W (see "validation" below); a mismatch prints MISMATCH lines,
// sets "check":"FAIL" in its JSON and makes the exit status 1 (after the summary).
//
// Output: one JSON object per line on stdout; progress and a summary table on stderr.
//   {"op":"info", ...}                               the machine and the settings
//   {"op":"read_bandwidth","threads":T,"GB_s":..}    per thread count, at startup: best of 3 read
//                                                    passes (after one warm-up) over a 1 GiB buffer
//   {"op":"vnni_peak","threads":T,"GOP_s":..}        per thread count, at startup: vpdpbusd on
//                                                    registers, 2 * 64 ops each (0 without VNNI)
//   {"op","format","path","isa","m","k","n","threads","median_us","min_us","samples","copies",
//    "weight_bytes","GB_s","GFLOP_s","bw_GB_s","bw_after_GB_s","pct_bw","other_cpu","contention","check"} one
//    per case
// op: matmul (path exact / fast / int8), matmul_transposed (exact; nf4, nf4_dq, int4_sym and int8_sym),
// matmul_llm_int8 (int8_sym weights; path thr0 = threshold 0, thr6 = threshold 6.0 with 0.1 % of
// the activation columns planted as outliers; also "threshold" and "outlier_cols"), torch_linear
// (at::linear on a float32 [m, k] weight) and torch_mv (at::mv, n = 1), format f32, isa torch.
// weight_bytes: PackedLut4::bytes() / PackedInt8::bytes() (codes + statistics), 4 m k for f32;
// GB_s = weight_bytes / median; GFLOP_s = 2 m k n / median; bw_GB_s: read bandwidth with the same
// thread count measured just before the case (best of 2 passes over 256 MiB; bw_after_GB_s: one pass
// just after, to see drift); pct_bw = 100 GB_s / bw_GB_s; other_cpu: CPUs' worth of time other
// processes used during the case (from /proc; >= 0.1 means the timing shared the machine);
// check: ok / FAIL, the output against the scalar kernels (none for torch).
//
// Method. For each shape and weight format one random weight is made (random codes and positive
// statistics: the speed does not depend on the values), packed once, and copied into enough distinct
// packed weights to fill --min-bytes; every timed call multiplies with the next copy, so the weight
// always comes from DRAM. The torch baselines cycle through float32 copies the same way (16 x 64 MiB
// for 4096 x 4096). Each call is timed alone; a case stops after 5 full cycles through the copies,
// or after --case-seconds with at least 3 samples, or at 3 x --case-seconds; a call slower than
// --case-seconds is timed once. One untimed warm-up call comes first (if it already takes
// --case-seconds, it is the only sample). Each weight set is freed before the next one is made. nf4 with
// double quantization (nf4_dq) keeps the uint8 absmax, decoded tile by tile by the driver, fp4 the
// same kernel as nf4 with another codebook. Torch threads: at::set_num_threads and openblas_set_num_threads
// (found with dlsym) for its BLAS.
#include <dlfcn.h>
#include <omp.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include "bench_util.h"
#include "msbnb/kernels/formats.h"
#include "msbnb/kernels/kernel_table.h"
#include "msbnb/kernels/matmul.h"
#include "msbnb/kernels/ops.h"

#ifdef MSBNB_BENCH_WITH_TORCH
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#endif

namespace {

namespace mk = msbnb::kernels;
namespace mb = msbnb::bench;
using mk::Isa;
using mk::KernelTable;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

[[noreturn]] void die(const std::string& msg) {
  std::fprintf(stderr, "msbnb_bench_matmul: %s\n", msg.c_str());
  std::exit(2);
}

// ---- formats -----------------------------------------------------------------------------------

// How a weight set is made; several format cases can share one (llm_int8 runs on int8_sym).
enum class Weight { nf4, fp4, int4_sym, int4_asym, int8_sym, int8_asym, nf4_dq };

struct FormatCase {
  const char* name;
  Weight weight;
  bool llm;         // op matmul_llm_int8 instead of matmul
  bool transposed;  // also op matmul_transposed
};

const FormatCase kFormats[] = {
    {"nf4", Weight::nf4, false, true},
    {"nf4_dq", Weight::nf4_dq, false, true},
    {"fp4", Weight::fp4, false, false},
    {"int4_sym", Weight::int4_sym, false, true},
    {"int4_asym", Weight::int4_asym, false, false},
    {"int8_sym", Weight::int8_sym, false, true},
    {"int8_asym", Weight::int8_asym, false, false},
    {"llm_int8", Weight::int8_sym, true, false},
};

const char* weight_name(Weight w) {
  switch (w) {
    case Weight::nf4:
      return "nf4";
    case Weight::fp4:
      return "fp4";
    case Weight::int4_sym:
      return "int4_sym";
    case Weight::int4_asym:
      return "int4_asym";
    case Weight::int8_sym:
      return "int8_sym";
    case Weight::int8_asym:
      return "int8_asym";
    case Weight::nf4_dq:
      return "nf4_dq";
  }
  return "?";
}

bool is_lut4(Weight w) { return w != Weight::int8_sym && w != Weight::int8_asym; }

const FormatCase* format_by_name(const std::string& name) {
  for (const FormatCase& f : kFormats)
    if (name == f.name) return &f;
  return nullptr;
}

// ---- options -----------------------------------------------------------------------------------

struct Shape {
  int64_t m = 0, k = 0;  // rows (out_features), cols (in_features)
};

struct Options {
  bool quick = false;
  std::vector<Shape> shapes{{4096, 4096}, {11008, 4096}, {4096, 11008}};
  std::vector<int64_t> ns{1, 4, 16, 128, 512};
  std::vector<int> threads{1, 2};
  std::vector<const FormatCase*> formats;
  std::string isa = "active";
  std::vector<std::string> paths{"exact", "fast", "int8"};
  std::vector<std::string> ops{"matmul", "matmul_transposed", "matmul_llm_int8", "torch_linear", "torch_mv"};
  int64_t min_bytes = int64_t{1} << 30;
  double case_seconds = 1.0;
  bool torch = true;
  bool huge = true;
  bool list = false;         // print the planned cases and exit
  bool check_only = false;   // run the checks against the scalar kernels, time nothing
  double wait_idle = 0;      // seconds to wait for an idle machine before each case (0: do not wait)
  int retries = 2;           // reruns of a case disturbed by other processes (with wait_idle)
  int contention = 0;        // compile-like competing workers during the timed calls
  double contention_ms = 3;  // CPU time of each of their short-lived children
  bool has_op(const char* op) const { return std::find(ops.begin(), ops.end(), op) != ops.end(); }
};

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  size_t b = 0;
  while (b <= s.size()) {
    const size_t e = std::min(s.find(',', b), s.size());
    if (e > b) out.push_back(s.substr(b, e - b));
    b = e + 1;
  }
  return out;
}

int64_t parse_int(const std::string& s, const char* flag, int64_t lo, int64_t hi) {
  char* end = nullptr;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end || v < lo || v > hi)
    die(std::string("bad value '") + s + "' in " + flag + " (expected an integer in [" + std::to_string(lo) +
        ", " + std::to_string(hi) + "])");
  return v;
}

int64_t parse_bytes(const std::string& s) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  double mult = 1;
  const std::string suffix = end ? end : "";
  if (suffix == "K" || suffix == "k" || suffix == "KiB") mult = 1024.0;
  if (suffix == "M" || suffix == "m" || suffix == "MiB") mult = 1024.0 * 1024;
  if (suffix == "G" || suffix == "g" || suffix == "GiB") mult = 1024.0 * 1024 * 1024;
  if (s.empty() || end == s.c_str() || !(v > 0) || (mult == 1 && !suffix.empty()))
    die("bad value '" + s + "' in --min-bytes (expected bytes, with an optional K / M / G suffix)");
  return static_cast<int64_t>(v * mult);
}

void usage() {
  std::fprintf(stderr,
               "msbnb_bench_matmul [--quick] [--shapes=MxK,..] [--n=..] [--threads=..] [--formats=..]\n"
               "                   [--isa=active|scalar|avx2|avx512|all] [--paths=exact,fast,int8,auto]\n"
               "                   [--ops=matmul,matmul_transposed,matmul_llm_int8,torch_linear,torch_mv]\n"
               "                   [--min-bytes=1G] [--case-seconds=1.0] [--no-torch] [--no-hugepages]\n"
               "                   [--wait-idle=SECONDS] [--retries=2] [--contention=N] [--contention-ms=3]\n"
               "                   [--list] [--check-only]\n"
               "formats: nf4 nf4_dq fp4 int4_sym int4_asym int8_sym int8_asym llm_int8 (int4, int8, all)\n"
               "JSON lines on stdout, progress and a summary on stderr; see the top of bench_matmul.cpp.\n");
}

Options parse_options(int argc, char** argv) {
  Options o;
  bool shapes = false, ns = false, threads = false, formats = false, secs = false;
  std::vector<std::string> format_names;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const size_t eq = a.find('=');
    const std::string key = a.substr(0, eq), val = eq == std::string::npos ? "" : a.substr(eq + 1);
    if (a == "--quick") {
      o.quick = true;
    } else if (a == "--no-torch") {
      o.torch = false;
    } else if (a == "--list") {
      o.list = true;
    } else if (a == "--check-only") {
      o.check_only = true;
    } else if (a == "--no-hugepages") {
      o.huge = false;
    } else if (a == "--help" || a == "-h") {
      usage();
      std::exit(0);
    } else if (key == "--shapes") {
      shapes = true;
      o.shapes.clear();
      for (const std::string& s : split_list(val)) {
        const size_t x = s.find_first_of("xX");
        if (x == std::string::npos) die("bad shape '" + s + "' in --shapes (expected MxK)");
        o.shapes.push_back({parse_int(s.substr(0, x), "--shapes", 1, int64_t{1} << 20),
                            parse_int(s.substr(x + 1), "--shapes", 1, int64_t{1} << 20)});
      }
    } else if (key == "--n") {
      ns = true;
      o.ns.clear();
      for (const std::string& s : split_list(val)) o.ns.push_back(parse_int(s, "--n", 1, 65536));
    } else if (key == "--threads") {
      threads = true;
      o.threads.clear();
      for (const std::string& s : split_list(val))
        o.threads.push_back(static_cast<int>(parse_int(s, "--threads", 1, 1024)));
    } else if (key == "--formats") {
      formats = true;
      format_names = split_list(val);
    } else if (key == "--isa") {
      o.isa = val;
    } else if (key == "--paths") {
      o.paths = split_list(val);
      for (const std::string& p : o.paths)
        if (p != "exact" && p != "fast" && p != "int8" && p != "auto")
          die("bad path '" + p + "' (expected exact, fast, auto)");
    } else if (key == "--ops") {
      const Options all;
      o.ops = split_list(val);
      for (const std::string& op : o.ops)
        if (!all.has_op(op.c_str())) die("bad op '" + op + "' in --ops");
    } else if (key == "--wait-idle") {
      char* end = nullptr;
      o.wait_idle = std::strtod(val.c_str(), &end);
      if (val.empty() || *end || !(o.wait_idle >= 0)) die("bad value '" + val + "' in --wait-idle");
    } else if (key == "--contention-ms") {
      o.contention_ms = static_cast<double>(parse_int(val, "--contention-ms", 1, 10000));
    } else if (key == "--contention") {
      o.contention = static_cast<int>(parse_int(val, "--contention", 0, 64));
    } else if (key == "--retries") {
      o.retries = static_cast<int>(parse_int(val, "--retries", 0, 100));
    } else if (key == "--min-bytes") {
      o.min_bytes = parse_bytes(val);
    } else if (key == "--case-seconds") {
      secs = true;
      char* end = nullptr;
      o.case_seconds = std::strtod(val.c_str(), &end);
      if (val.empty() || *end || !(o.case_seconds > 0)) die("bad value '" + val + "' in --case-seconds");
    } else {
      usage();
      die("unknown argument '" + a + "'");
    }
  }
  if (o.quick) {
    if (!shapes) o.shapes = {{4096, 4096}};
    if (!ns) o.ns = {1, 128};
    if (!threads) o.threads = {2, 1};
    if (!formats) format_names = {"nf4", "int4_sym", "int8_sym", "llm_int8"};
    if (!secs) o.case_seconds = 0.5;
  }
  if (format_names.empty() ||
      std::find(format_names.begin(), format_names.end(), "all") != format_names.end())
    for (const FormatCase& f : kFormats) format_names.push_back(f.name);
  for (const std::string& name : format_names) {
    std::vector<std::string> names{name};
    if (name == "int4") names = {"int4_sym", "int4_asym"};
    if (name == "int8") names = {"int8_sym", "int8_asym"};
    if (name == "all") continue;
    for (const std::string& n : names) {
      const FormatCase* f = format_by_name(n);
      if (!f) die("bad format '" + n + "' in --formats");
      if (std::find(o.formats.begin(), o.formats.end(), f) == o.formats.end()) o.formats.push_back(f);
    }
  }
  if (o.shapes.empty() || o.ns.empty() || o.threads.empty() || o.formats.empty() || o.paths.empty() ||
      o.ops.empty())
    die("empty list in the options");
  return o;
}

// ---- weights -----------------------------------------------------------------------------------

// A positive statistic in [lo, hi), deterministic in i.
float random_in(uint64_t i, float lo, float hi) {
  return lo + (hi - lo) * static_cast<float>(mb::mix64(i) >> 40) / 16777216.0f;
}

// Deep copies: fresh codes buffers (memcpy), statistics vectors copied, the view re-pointed.
mk::PackedLut4 copy_packed(const mk::PackedLut4& p, bool huge) {
  mk::PackedLut4 c;
  c.view = p.view;
  const size_t bytes = static_cast<size_t>(p.view.rows * p.view.kpad / 2);
  c.codes = mb::shared_alloc<uint8_t>(bytes, huge);
  mb::parallel_copy(c.codes.get(), p.codes.get(), bytes);
  c.scale = p.scale;
  c.zero_point = p.zero_point;
  c.view.codes = c.codes.get();
  c.view.scale = c.scale.data();
  c.view.zero_point = p.view.zero_point ? c.zero_point.data() : nullptr;
  c.nested_q = p.nested_q;
  c.nested_code = p.nested_code;
  c.nested_absmax = p.nested_absmax;
  c.nested_offset = p.nested_offset;
  if (!p.nested_q.empty()) {
    c.view.scale = nullptr;
    c.view.nested.q = c.nested_q.data();
    c.view.nested.code = c.nested_code.data();
    c.view.nested.nested = c.nested_absmax.data();
    c.view.nested.offset = c.nested_offset.data();
  }
  return c;
}
mk::PackedInt8 copy_packed(const mk::PackedInt8& p, bool huge) {
  mk::PackedInt8 c;
  c.view = p.view;
  const size_t bytes = static_cast<size_t>(p.view.rows * p.view.kpad);
  c.codes = mb::shared_alloc<int8_t>(bytes, huge);
  mb::parallel_copy(c.codes.get(), p.codes.get(), bytes);
  c.scale = p.scale;
  c.offset = p.offset;
  c.row_sum = p.row_sum;
  c.view.codes = c.codes.get();
  c.view.scale = c.scale.data();
  c.view.offset = p.view.offset ? c.offset.data() : nullptr;
  c.view.row_sum = c.row_sum.data();
  return c;
}

// Distinct packed copies of one random weight, together >= min_bytes.
struct WeightSet {
  std::vector<mk::PackedLut4> lut4;
  std::vector<mk::PackedInt8> int8;
  int64_t bytes_each = 0;
  int64_t copies() const { return static_cast<int64_t>(lut4.size() + int8.size()); }
};

int64_t copies_for(int64_t bytes_each, int64_t min_bytes) {
  return std::max<int64_t>(2, mk::ceil_div(min_bytes, std::max<int64_t>(bytes_each, 1)));
}

WeightSet make_weights(Weight kind, Shape s, const Options& o) {
  WeightSet ws;
  const int64_t m = s.m, k = s.k;
  const uint64_t seed = static_cast<uint64_t>(kind) * 1000003 + static_cast<uint64_t>(m * 31 + k);
  if (kind == Weight::nf4 || kind == Weight::fp4) {
    const int64_t elems = m * k, blocks = mk::ceil_div(elems, 64);
    std::vector<uint8_t> codes(static_cast<size_t>((elems + 1) / 2));
    mb::fill_bytes(codes.data(), static_cast<int64_t>(codes.size()), seed);
    std::vector<float> absmax(static_cast<size_t>(blocks));
    for (int64_t b = 0; b < blocks; ++b) absmax[b] = random_in(seed + static_cast<uint64_t>(b), 0.01f, 0.05f);
    const mk::PackedLut4 src = mk::pack_lut4_bnb(codes.data(), m, k, 64, absmax.data(),
                                                 kind == Weight::nf4 ? mk::kCodeNF4 : mk::kCodeFP4);
    ws.bytes_each = src.bytes();
    for (int64_t c = copies_for(ws.bytes_each, o.min_bytes); c > 0; --c)
      ws.lut4.push_back(copy_packed(src, o.huge));
  } else if (kind == Weight::nf4_dq) {
    // bitsandbytes' compress_statistics: uint8 absmax codes, a float per 256 of them, an offset.
    const int64_t elems = m * k, blocks = mk::ceil_div(elems, 64), nested = mk::ceil_div(blocks, 256);
    std::vector<uint8_t> codes(static_cast<size_t>((elems + 1) / 2)), absmax_q(static_cast<size_t>(blocks));
    mb::fill_bytes(codes.data(), static_cast<int64_t>(codes.size()), seed);
    mb::fill_bytes(absmax_q.data(), blocks, seed + 1);
    std::vector<float> code256(256), nested_absmax(static_cast<size_t>(nested));
    for (int i = 0; i < 256; ++i) code256[i] = (static_cast<float>(i) - 127.5f) / 127.5f;
    for (int64_t b = 0; b < nested; ++b)
      nested_absmax[b] = random_in(seed + static_cast<uint64_t>(b), 0.005f, 0.01f);
    const mk::PackedLut4 src =
        mk::pack_lut4_bnb_nested(codes.data(), m, k, 64, absmax_q.data(), code256.data(),
                                 nested_absmax.data(), 256, 0.03f, mk::kCodeNF4);
    ws.bytes_each = src.bytes();
    for (int64_t c = copies_for(ws.bytes_each, o.min_bytes); c > 0; --c)
      ws.lut4.push_back(copy_packed(src, o.huge));
  } else if (kind == Weight::int4_sym || kind == Weight::int4_asym) {
    const int64_t group = 128, groups = mk::ceil_div(k, group), row_bytes = (k + 1) / 2;
    std::vector<uint8_t> codes(static_cast<size_t>(m * row_bytes));
    mb::fill_bytes(codes.data(), static_cast<int64_t>(codes.size()), seed);
    std::vector<float> scale(static_cast<size_t>(m * groups));
    std::vector<int32_t> zp(scale.size());
    for (size_t g = 0; g < scale.size(); ++g) {
      scale[g] = random_in(seed + g, 0.001f, 0.01f);
      zp[g] = static_cast<int32_t>(mb::mix64(~(seed + g)) & 15);
    }
    const mk::PackedLut4 src = mk::pack_int4(codes.data(), m, k, group, scale.data(),
                                             kind == Weight::int4_asym ? zp.data() : nullptr);
    ws.bytes_each = src.bytes();
    for (int64_t c = copies_for(ws.bytes_each, o.min_bytes); c > 0; --c)
      ws.lut4.push_back(copy_packed(src, o.huge));
  } else {
    std::vector<int8_t> q(static_cast<size_t>(m * k));
    mb::fill_bytes(reinterpret_cast<uint8_t*>(q.data()), m * k, seed);
    for (int8_t& v : q) v = v == -128 ? int8_t{-127} : v;  // symmetric range
    std::vector<float> scale(static_cast<size_t>(m)), offset(static_cast<size_t>(m));
    for (int64_t r = 0; r < m; ++r) {
      scale[r] = random_in(seed + static_cast<uint64_t>(r), 1e-4f, 1e-3f);
      offset[r] =
          static_cast<float>(static_cast<int>(mb::mix64(~(seed + static_cast<uint64_t>(r))) % 17) - 8);
    }
    const mk::PackedInt8 src =
        mk::pack_int8(q.data(), m, k, scale.data(), kind == Weight::int8_asym ? offset.data() : nullptr);
    ws.bytes_each = src.bytes();
    for (int64_t c = copies_for(ws.bytes_each, o.min_bytes); c > 0; --c)
      ws.int8.push_back(copy_packed(src, o.huge));
  }
  return ws;
}

// Activations of one shape: x (N(0, 1)-like, |x| < 3.5, so no accidental outliers), the same with
// planted outlier columns for LLM.int8() at threshold 6, and the output.
struct Activations {
  mb::Buffer<float> x, x_outliers, y;
  int64_t outlier_cols = 0;
  Activations(Shape s, int64_t nmax) {
    const int64_t width = std::max(s.m, s.k);
    x = mb::Buffer<float>(static_cast<size_t>(nmax * width));
    mb::fill_weights(x.data(), nmax * width, 17, 1.0f);
    x_outliers = mb::Buffer<float>(static_cast<size_t>(nmax * s.k));
    std::memcpy(x_outliers.data(), x.data(), x_outliers.bytes());
    outlier_cols = std::max<int64_t>(1, std::llround(0.001 * static_cast<double>(s.k)));
    for (int64_t j = 0; j < outlier_cols; ++j) {
      const int64_t c = (2 * j + 1) * s.k / (2 * outlier_cols);
      for (int64_t i = 0; i < nmax; ++i) x_outliers.data()[i * s.k + c] = (i + j) % 2 ? 8.0f : -9.5f;
    }
    y = mb::Buffer<float>(static_cast<size_t>(nmax * width));
  }
};

// ---- torch -------------------------------------------------------------------------------------

using BlasSetThreads = void (*)(int);
// openblas_set_num_threads when torch's BLAS is OpenBLAS (at::set_num_threads does not reach it).
BlasSetThreads blas_set_threads() {
  static const BlasSetThreads f =
      reinterpret_cast<BlasSetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  return f;
}

#ifdef MSBNB_BENCH_WITH_TORCH
constexpr bool kWithTorch = true;
void set_torch_threads(int t) {
  at::set_num_threads(t);
  if (BlasSetThreads f = blas_set_threads()) f(t);
}
// Float32 copies of one random weight [m, k], together >= min_bytes, as tensors over our buffers.
struct TorchWeights {
  std::vector<std::shared_ptr<float>> buffers;
  std::vector<at::Tensor> w;
  int64_t bytes_each = 0;
  TorchWeights(Shape s, const Options& o) {
    const int64_t elems = s.m * s.k;
    bytes_each = elems * 4;
    const int64_t copies = copies_for(bytes_each, o.min_bytes);
    for (int64_t c = 0; c < copies; ++c) {
      buffers.push_back(mb::shared_alloc<float>(static_cast<size_t>(elems), o.huge));
      if (c == 0)
        mb::fill_weights(buffers[0].get(), elems, 5, 0.02f);
      else
        mb::parallel_copy(buffers[c].get(), buffers[0].get(), static_cast<size_t>(bytes_each));
      w.push_back(at::from_blob(buffers[c].get(), {s.m, s.k}, at::kFloat));
    }
  }
};
#else
constexpr bool kWithTorch = false;
#endif

// ---- cases -------------------------------------------------------------------------------------

enum class Op { matmul, transposed, llm, torch_linear, torch_mv };
const char* op_name(Op op) {
  switch (op) {
    case Op::matmul:
      return "matmul";
    case Op::transposed:
      return "matmul_transposed";
    case Op::llm:
      return "matmul_llm_int8";
    case Op::torch_linear:
      return "torch_linear";
    case Op::torch_mv:
      return "torch_mv";
  }
  return "?";
}

struct Case {
  Op op;
  const FormatCase* format = nullptr;  // null for torch
  std::string path;                    // exact / fast / auto, thr0 / thr6, f32
  const KernelTable* table = nullptr;  // null for torch
  int64_t n = 0;
  int threads = 1;
  float threshold = 0;
};

// The cases sharing one weight set (or the torch baselines of a shape).
struct Group {
  Weight weight = Weight::nf4;
  bool torch = false;
  std::vector<Case> cases;
};

mk::MatmulPath path_of(const std::string& p) {
  return p == "exact"  ? mk::MatmulPath::exact
         : p == "fast" ? mk::MatmulPath::fast
         : p == "int8" ? mk::MatmulPath::int8
                       : mk::MatmulPath::automatic;
}

std::vector<Group> plan_shape(const Options& o, const std::vector<const KernelTable*>& tables, bool all_isas,
                              bool torch) {
  std::vector<Group> groups;
  std::vector<Weight> weights;
  for (const FormatCase* f : o.formats)
    if (std::find(weights.begin(), weights.end(), f->weight) == weights.end()) weights.push_back(f->weight);
  for (Weight w : weights) {
    Group g;
    g.weight = w;
    for (const KernelTable* k : tables)
      for (int64_t n : o.ns) {
        if (all_isas && k->isa == Isa::scalar && n != 1) continue;  // scalar: GEMV only
        for (int t : o.threads)
          for (const FormatCase* f : o.formats) {
            if (f->weight != w) continue;
            if (f->llm) {
              if (o.has_op("matmul_llm_int8")) {
                g.cases.push_back({Op::llm, f, "thr0", k, n, t, 0.0f});
                g.cases.push_back({Op::llm, f, "thr6", k, n, t, 6.0f});
              }
              continue;
            }
            if (o.has_op("matmul"))
              for (const std::string& p : o.paths) g.cases.push_back({Op::matmul, f, p, k, n, t, 0.0f});
            if (f->transposed && o.has_op("matmul_transposed"))
              g.cases.push_back({Op::transposed, f, "exact", k, n, t, 0.0f});
          }
      }
    if (!g.cases.empty()) groups.push_back(std::move(g));
  }
  if (torch) {
    Group g;
    g.torch = true;
    for (int64_t n : o.ns)
      for (int t : o.threads) {
        if (o.has_op("torch_linear"))
          g.cases.push_back({Op::torch_linear, nullptr, "f32", nullptr, n, t, 0.0f});
        if (n == 1 && o.has_op("torch_mv"))
          g.cases.push_back({Op::torch_mv, nullptr, "f32", nullptr, n, t, 0.0f});
      }
    if (!g.cases.empty()) groups.push_back(std::move(g));
  }
  return groups;
}

// ---- other load --------------------------------------------------------------------------------

// ---- competing load ----------------------------------------------------------------------------

// N driver processes, each in its own process group, each like one job of make -jN: fork a child
// that burns ~3 ms of CPU (touching fresh stack pages, as a compiler touches memory) and exits,
// reap it, repeat. Forked before the weights are allocated, so a fork copies few page tables.
// Only async-signal-safe calls after fork (the parent may have threads).
class CompetingLoad {
 public:
  CompetingLoad(int n, double child_ms) {
    const pid_t self = getpid();
    for (int i = 0; i < n; ++i) {
      const pid_t pid = fork();
      if (pid < 0) die("--contention: fork failed");
      if (pid == 0) driver(self, child_ms / 1e3);
      setpgid(pid, pid);
      pids_.push_back(pid);
    }
    pause();
  }
  ~CompetingLoad() {
    for (pid_t p : pids_) {
      kill(-p, SIGTERM);
      kill(-p, SIGCONT);
    }
    for (pid_t p : pids_) waitpid(p, nullptr, 0);
  }
  CompetingLoad(const CompetingLoad&) = delete;
  CompetingLoad& operator=(const CompetingLoad&) = delete;
  void resume() { signal_all(SIGCONT); }
  void pause() { signal_all(SIGSTOP); }

 private:
  void signal_all(int sig) {
    for (pid_t p : pids_) kill(-p, sig);
  }
  static volatile sig_atomic_t stop_;
  static void on_term(int) { stop_ = 1; }
  static double now() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
  }
  [[noreturn]] static void burn(double seconds) {
    volatile char pages[1 << 18];
    const double t0 = now();
    for (size_t i = 0; now() - t0 < seconds; i = (i + 4096) % sizeof pages) pages[i] = static_cast<char>(i);
    _exit(0);
  }
  [[noreturn]] static void driver(pid_t parent, double child_s) {
    setpgid(0, 0);
    // Gone with the bench, however it ends (die() exits without destructors).
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(0);
    struct sigaction sa {};
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, nullptr);
    while (!stop_) {
      const pid_t c = fork();
      if (c == 0) {
        signal(SIGTERM, SIG_DFL);
        burn(child_s);
      }
      if (c < 0) continue;
      while (waitpid(c, nullptr, 0) < 0 && errno == EINTR) {
      }
    }
    _exit(0);
  }
  std::vector<pid_t> pids_;
};
volatile sig_atomic_t CompetingLoad::stop_ = 0;

// ---- timing ------------------------------------------------------------------------------------

struct Timing {
  std::vector<double> samples;  // seconds per call
};

// One untimed warm-up call, then one call per copy in turn, each timed alone, until 5 full cycles
// through the copies, or `cap` seconds with >= 3 samples, or 3 x `cap`. A warm-up slower than
// `cap` is the only sample.
template <class Fn>
Timing time_calls(int64_t copies, double cap, Fn&& call) {
  Timing t;
  const auto w0 = Clock::now();
  call(int64_t{0});
  const double warm = seconds_since(w0);
  if (warm >= cap) {
    t.samples.push_back(warm);
    return t;
  }
  const auto start = Clock::now();
  for (int64_t i = 1;; ++i) {
    const auto a = Clock::now();
    call(i % copies);
    t.samples.push_back(seconds_since(a));
    const double elapsed = seconds_since(start);
    const auto count = static_cast<int64_t>(t.samples.size());
    if (count >= 5 * copies || (elapsed >= cap && count >= 3) || elapsed >= 3 * cap) break;
  }
  return t;
}

// ---- validation --------------------------------------------------------------------------------
//
// Before a case is timed its op runs once on copy 0 of the weights and is compared with the
// scalar kernel table (kernels_for(Isa::scalar)) on three ranges of the output: the first, the
// middle (where two threads split the rows) and the last rows of W (columns of W for the
// transposed product; the scalar table on all of a 4096 x 4096 GEMM would take seconds). The
// bounds are the ones tests/kernels/matmul_test.cpp derives ("Tolerances"), u = 2^-24:
//   exact path (also fast 4-bit at n <= kGemvMaxRows, which runs the exact GEMV) and the
//     transposed product: each result is within (k + 4) u P + (k + 4) 2^-149 of the exact sum,
//     P = sum_j |x_j w_j| over its k terms, so the two results are within twice that;
//   fast 4-bit, n > kGemvMaxRows: both sum the same products bf16(x) bf16(w) (exact in fp32) in
//     fp32, so they are within 2 ((k + 4) u P~ + (k + 4) 2^-126), P~ = sum_j |bf16(x_j) bf16(w_j)|
//     (VDPBF16PS flushes denormal inputs and outputs: 2^-126 per operation);
//   fast int8: int32 products and the same float scaling: bit-identical;
//   LLM.int8(): the int8 part bit-identical; the fp32 sum over the c outlier columns and the add
//     of the two parts: within 2 (c + 4) u (P_o + |y|), P_o = sum over the outlier columns.
// Every output element must also be written and finite (the output starts as NaN).

struct Range {
  int64_t lo = 0, hi = 0;
};

// [0, len), about [total / 2 - len / 2, ..) and [total - len, total): starts moved down to a
// multiple of `align` (0 always is one; the last range still ends at total), overlaps merged.
std::vector<Range> check_ranges(int64_t total, int64_t len, int64_t align) {
  len = std::min(len, total);
  std::vector<Range> out;
  const int64_t starts[3] = {0, std::max<int64_t>(0, total / 2 - len / 2), total - len};
  for (int t = 0; t < 3; ++t) {
    const int64_t lo = starts[t] - starts[t] % align;
    const Range r{lo, t == 2 ? total : std::min(total, lo + len)};
    if (!out.empty() && r.lo <= out.back().hi)
      out.back().hi = std::max(out.back().hi, r.hi);
    else
      out.push_back(r);
  }
  return out;
}

// Rows [r0, r1) of a packed weight as a weight of its own (r0 row_stride a multiple of group).
mk::Lut4Matrix rows_of(const mk::Lut4Matrix& w, int64_t r0, int64_t r1) {
  mk::Lut4Matrix v = w;
  v.rows = r1 - r0;
  v.codes = w.codes + r0 * w.kpad / 2;
  const int64_t s0 = r0 * w.row_stride / w.group;
  v.scale = w.scale + s0;
  if (w.zero_point) v.zero_point = w.zero_point + s0;
  return v;
}
mk::Int8Matrix rows_of(const mk::Int8Matrix& w, int64_t r0, int64_t r1) {
  mk::Int8Matrix v = w;
  v.rows = r1 - r0;
  v.codes = w.codes + r0 * w.kpad;
  v.scale = w.scale + r0;
  if (w.offset) v.offset = w.offset + r0;
  v.row_sum = w.row_sum + r0;
  return v;
}
int64_t row_align(const mk::Lut4Matrix& w) {
  int64_t a = 1;
  while ((a * w.row_stride) % w.group != 0) ++a;
  return a;
}
int64_t row_align(const mk::Int8Matrix&) { return 1; }
int64_t col_chunk(const mk::Lut4Matrix&) { return mk::kLut4Chunk; }
int64_t col_chunk(const mk::Int8Matrix&) { return mk::kInt8Chunk; }

// A double-quantized weight with its statistics decoded into buf (as float scales), for the
// scalar reference and value_at; other weights as they are.
mk::Lut4Matrix float_scale(const mk::Lut4Matrix& w, std::vector<float>& buf) {
  if (w.scale || w.rows == 0) return w;
  const int64_t count = std::max(w.nested.count, ((w.rows - 1) * w.row_stride + w.kpad - 1) / w.group + 1);
  buf.resize(static_cast<size_t>(count));
  mk::decode_nested_scale(w.nested, 0, count, buf.data(), mk::kernels_for(Isa::scalar));
  mk::Lut4Matrix v = w;
  v.scale = buf.data();
  v.nested = mk::Lut4NestedScale{};
  return v;
}
const mk::Int8Matrix& float_scale(const mk::Int8Matrix& w, std::vector<float>&) { return w; }

// The float value of element (r, j), as dequantize() gives it (see matmul.h).
float value_at(const mk::Lut4Matrix& w, int64_t r, int64_t j) {
  const int64_t s = (r * w.row_stride + j) / w.group;
  const float v = w.lut[mk::lut4_index(w.codes + r * w.kpad / 2, j)];
  return (w.zero_point ? v - w.zero_point[s] : v) * w.scale[s];
}
float value_at(const mk::Int8Matrix& w, int64_t r, int64_t j) {
  const float q = static_cast<float>(w.codes[r * w.kpad + j]);
  return (w.offset ? q + w.offset[r] : q) * w.scale[r];
}
float round_bf16(float f) {  // round to nearest even (finite f)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

constexpr double kU = 0x1p-24;

// op matmul (path), or matmul_llm_int8 (threshold) when llm.
void run_forward(const mk::Lut4Matrix& w, const mk::MatmulIO& io, mk::MatmulPath path, bool, float,
                 std::vector<int64_t>*, const KernelTable& k) {
  mk::matmul(w, io, path, k);
}
void run_forward(const mk::Int8Matrix& w, const mk::MatmulIO& io, mk::MatmulPath path, bool llm,
                 float threshold, std::vector<int64_t>* outlier_cols, const KernelTable& k) {
  if (llm)
    mk::matmul_llm_int8(w, io, threshold, outlier_cols, k);
  else
    mk::matmul(w, io, path, k);
}

// Counts the mismatches of one case; prints the first few.
struct Checker {
  std::string name;
  int64_t bad = 0;
  void compare(const char* what, int64_t i, int64_t c, double got, double ref, double bound) {
    const double err = std::fabs(got - ref);
    if (err <= bound && std::isfinite(got)) return;
    if (++bad <= 5)
      std::fprintf(
          stderr, "MISMATCH %s: %s[%lld][%lld] = %.9g, scalar reference %.9g, |diff| %.3g > bound %.3g\n",
          name.c_str(), what, static_cast<long long>(i), static_cast<long long>(c), got, ref, err, bound);
  }
  void finite(const float* y, int64_t n, int64_t cols, int64_t ld) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < cols; ++c)
        if (!std::isfinite(y[i * ld + c]) && ++bad <= 5)
          std::fprintf(stderr, "MISMATCH %s: y[%lld][%lld] = %g (not written, or not finite)\n", name.c_str(),
                       static_cast<long long>(i), static_cast<long long>(c),
                       static_cast<double>(y[i * ld + c]));
  }
};

// op matmul (path) or matmul_llm_int8 (threshold, llm) on w: returns the number of mismatches.
template <class W>
int64_t check_forward(const std::string& name, const W& wq, const float* x, int64_t n, mk::MatmulPath path,
                      bool llm, float threshold, float* y, const KernelTable& k) {
  std::vector<float> scale;
  const W w = float_scale(wq, scale);
  const int64_t m = w.rows, kk = w.cols;
  Checker ck{name};
  mk::MatmulIO io;
  io.x = x;
  io.n = n;
  io.ldx = kk;
  io.y = y;
  io.ldy = m;
  std::fill(y, y + n * m, std::nanf(""));
  run_forward(wq, io, path, llm, threshold, nullptr, k);
  ck.finite(y, n, m, m);
  const KernelTable& scalar = mk::kernels_for(Isa::scalar);
  const bool int8 = std::is_same_v<W, mk::Int8Matrix>;
  const mk::MatmulPath resolved = mk::resolve_path(path, n);
  const bool bf16 = !llm && !int8 && resolved == mk::MatmulPath::fast && n > mk::kGemvMaxRows;
  // The int8 path: integer products, exact; the 4-bit GEMV sums its blocks in float (with lane
  // values up to (|T| + 128) / |T| times the products' on AVX-512: 8 p covers them).
  bool q8_gemv = false;
  if constexpr (!std::is_same_v<W, mk::Int8Matrix>)
    q8_gemv = resolved == mk::MatmulPath::int8 && n <= mk::kGemvMaxRows && mk::q8_block(w) > 0;
  // Where the table's int8 GEMM does not pay, the int8 path runs exact, and so does the reference.
  const bool int8_exact = !int8 && resolved == mk::MatmulPath::int8 && !q8_gemv && !mk::int8_gemm_pays(k);
  const mk::MatmulPath ref_path = int8_exact ? mk::MatmulPath::exact : path;
  const bool same_bits = !llm && ((int8 && resolved != mk::MatmulPath::exact) ||
                                  (resolved == mk::MatmulPath::int8 && !q8_gemv && !int8_exact));
  std::vector<float> wrow(static_cast<size_t>(kk));
  for (const Range& rg : check_ranges(m, 16, row_align(w))) {
    const int64_t len = rg.hi - rg.lo;
    std::vector<float> ref(static_cast<size_t>(n * len));
    std::vector<int64_t> outliers;
    mk::MatmulIO rio = io;
    rio.y = ref.data();
    rio.ldy = len;
    const W sub = rows_of(w, rg.lo, rg.hi);
    run_forward(sub, rio, ref_path, llm, threshold, &outliers, scalar);
    std::vector<char> is_outlier(static_cast<size_t>(kk), 0);
    for (int64_t c : outliers) is_outlier[static_cast<size_t>(c)] = 1;
    for (int64_t r = rg.lo; r < rg.hi; ++r) {
      for (int64_t j = 0; j < kk; ++j) wrow[static_cast<size_t>(j)] = value_at(w, r, j);
      for (int64_t i = 0; i < n; ++i) {
        const double got = y[i * m + r], want = ref[static_cast<size_t>(i * len + r - rg.lo)];
        double bound = 0;
        if (same_bits) {
          bound = 0;
        } else if (llm) {
          double p = 0;
          for (int64_t c : outliers) p += std::fabs(double(x[i * kk + c]) * wrow[static_cast<size_t>(c)]);
          bound = 2 * (static_cast<double>(outliers.size()) + 4) * kU * (p + std::fabs(want));
        } else {
          double p = 0;
          for (int64_t j = 0; j < kk; ++j) {
            const float xv = x[i * kk + j], wv = wrow[static_cast<size_t>(j)];
            p += bf16 ? std::fabs(double(round_bf16(xv)) * round_bf16(wv)) : std::fabs(double(xv) * wv);
          }
          const double kd = static_cast<double>(kk) + 4;
          bound = 2 * (kd * kU * (q8_gemv ? 8 * p : p) + kd * (bf16 ? 0x1p-126 : 0x1p-149));
        }
        ck.compare("y", i, r, got, want, bound);
      }
    }
  }
  if (ck.bad > 5)
    std::fprintf(stderr, "MISMATCH %s: %lld bad elements in all\n", name.c_str(),
                 static_cast<long long>(ck.bad));
  return ck.bad;
}

// op matmul_transposed on w: gx = gy w with gy [n, rows]; returns the number of mismatches.
template <class W>
int64_t check_transposed(const std::string& name, const W& wq, const float* gy, int64_t n, float* gx,
                         const KernelTable& k) {
  std::vector<float> scale;
  const W w = float_scale(wq, scale);
  const int64_t m = w.rows, kk = w.cols;
  Checker ck{name};
  mk::MatmulIO io;
  io.x = gy;
  io.n = n;
  io.ldx = m;
  io.y = gx;
  io.ldy = kk;
  std::fill(gx, gx + n * kk, std::nanf(""));
  mk::matmul_transposed(wq, io, k);
  ck.finite(gx, n, kk, kk);
  const KernelTable& scalar = mk::kernels_for(Isa::scalar);
  const auto entry = [&] {
    if constexpr (std::is_same_v<W, mk::Int8Matrix>)
      return scalar.matmul.int8_t_f32;
    else
      return scalar.matmul.lut4_t_f32;
  }();
  std::vector<float> ref(static_cast<size_t>(n * kk)), wcol(static_cast<size_t>(m));
  for (const Range& rg : check_ranges(kk, col_chunk(w), col_chunk(w))) {
    entry(w, gy, n, m, rg.lo, rg.hi, ref.data(), kk, false);
    for (int64_t j = rg.lo; j < rg.hi; ++j) {
      for (int64_t r = 0; r < m; ++r) wcol[static_cast<size_t>(r)] = value_at(w, r, j);
      for (int64_t i = 0; i < n; ++i) {
        double p = 0;
        for (int64_t r = 0; r < m; ++r) p += std::fabs(double(gy[i * m + r]) * wcol[static_cast<size_t>(r)]);
        const double kd = static_cast<double>(m) + 4;
        ck.compare("gx", i, j, gx[i * kk + j], ref[static_cast<size_t>(i * kk + j)],
                   2 * (kd * kU * p + kd * 0x1p-149));
      }
    }
  }
  if (ck.bad > 5)
    std::fprintf(stderr, "MISMATCH %s: %lld bad elements in all\n", name.c_str(),
                 static_cast<long long>(ck.bad));
  return ck.bad;
}

// ---- results -----------------------------------------------------------------------------------

struct Result {
  std::string op, format, path, isa;
  Shape shape;
  int64_t n = 0;
  int threads = 1;
  int contention = 0;  // competing compile-like workers during the timing
  double median_us = 0, min_us = 0;
  int64_t samples = 0, copies = 0, weight_bytes = 0;
  double bw = 0, bw_after = 0;      // read GB/s just before and just after
  double other_cpu = std::nan("");  // CPUs' worth of time other processes used during the case
  bool llm = false;
  float threshold = 0;
  int64_t outlier_cols = 0;
  const char* check = "none";  // ok / FAIL: the output against the scalar table (see "validation")
  double gb_s() const { return static_cast<double>(weight_bytes) / median_us / 1e3; }
  double gflop_s() const {
    return 2.0 * static_cast<double>(shape.m) * static_cast<double>(shape.k) * static_cast<double>(n) /
           median_us / 1e3;
  }
  double pct_bw() const { return 100.0 * gb_s() / bw; }
};

std::string num(double v, int prec = 4) {
  if (!std::isfinite(v)) return "null";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", prec, v);
  return buf;
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) >= 0x20) out += c;
  }
  return out;
}

void emit(const Result& r) {
  std::string line = "{\"op\":\"" + r.op + "\",\"format\":\"" + r.format + "\",\"path\":\"" + r.path +
                     "\",\"isa\":\"" + r.isa + "\",\"m\":" + std::to_string(r.shape.m) +
                     ",\"k\":" + std::to_string(r.shape.k) + ",\"n\":" + std::to_string(r.n) +
                     ",\"threads\":" + std::to_string(r.threads) + ",\"median_us\":" + num(r.median_us, 3) +
                     ",\"min_us\":" + num(r.min_us, 3) + ",\"samples\":" + std::to_string(r.samples) +
                     ",\"copies\":" + std::to_string(r.copies) +
                     ",\"weight_bytes\":" + std::to_string(r.weight_bytes) + ",\"GB_s\":" + num(r.gb_s()) +
                     ",\"GFLOP_s\":" + num(r.gflop_s()) + ",\"bw_GB_s\":" + num(r.bw) +
                     ",\"bw_after_GB_s\":" + num(r.bw_after) + ",\"pct_bw\":" + num(r.pct_bw(), 2) +
                     ",\"other_cpu\":" + num(r.other_cpu, 3) +
                     ",\"contention\":" + std::to_string(r.contention) + ",\"check\":\"" + r.check + "\"";
  if (r.llm)
    line += ",\"threshold\":" + num(r.threshold, 1) +
            ",\"outlier_cols\":" + std::to_string(r.threshold > 0 ? r.outlier_cols : 0);
  line += "}\n";
  std::fputs(line.c_str(), stdout);
  std::fflush(stdout);
}

using ScalarKey = std::tuple<std::string, std::string, std::string, int64_t, int64_t, int64_t, int>;
ScalarKey scalar_key(const Result& r) {
  return {r.op, r.format, r.path, r.shape.m, r.shape.k, r.n, r.threads};
}
using TorchKey = std::tuple<int64_t, int64_t, int64_t, int>;

void print_summary(const std::vector<Result>& results, const std::map<int, double>& startup_bw) {
  std::map<TorchKey, double> linear;
  std::map<ScalarKey, double> scalar;
  for (const Result& r : results) {
    if (r.op == "torch_linear") linear[{r.shape.m, r.shape.k, r.n, r.threads}] = r.median_us;
    if (r.isa == "scalar") scalar[scalar_key(r)] = r.median_us;
  }
  std::fprintf(stderr, "\nread bandwidth at startup:");
  for (const auto& [t, bw] : startup_bw)
    std::fprintf(stderr, "  %d thread%s %.2f GB/s", t, t == 1 ? "" : "s", bw);
  std::fprintf(
      stderr,
      "\nxLinear = torch Linear (f32) time / this time, xScalar = scalar kernels' time / this time\n");
  std::fprintf(stderr, "%-11s %-17s %-9s %-5s %-6s %4s %3s %11s %8s %6s %9s %8s %8s\n", "shape", "op",
               "format", "path", "isa", "n", "thr", "us", "GB/s", "%bw", "GFLOP/s", "xLinear", "xScalar");
  Shape last{-1, -1};
  for (const Result& r : results) {
    if (r.shape.m != last.m || r.shape.k != last.k) std::fprintf(stderr, "\n");
    last = r.shape;
    char shape[32], vs_linear[16] = "-", vs_scalar[16] = "-";
    std::snprintf(shape, sizeof shape, "%lldx%lld", static_cast<long long>(r.shape.m),
                  static_cast<long long>(r.shape.k));
    const auto lin = linear.find({r.shape.m, r.shape.k, r.n, r.threads});
    if (lin != linear.end()) std::snprintf(vs_linear, sizeof vs_linear, "%.2fx", lin->second / r.median_us);
    const auto sc = scalar.find(scalar_key(r));
    if (sc != scalar.end() && r.isa != "scalar")
      std::snprintf(vs_scalar, sizeof vs_scalar, "%.1fx", sc->second / r.median_us);
    std::fprintf(stderr, "%-11s %-17s %-9s %-5s %-6s %4lld %3d %11.1f %8.2f %6.1f %9.2f %8s %8s\n", shape,
                 r.op.c_str(), r.format.c_str(), r.path.c_str(), r.isa.c_str(), static_cast<long long>(r.n),
                 r.threads, r.median_us, r.gb_s(), r.pct_bw(), r.gflop_s(), vs_linear, vs_scalar);
  }
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      const size_t c = line.find(':');
      return c == std::string::npos ? line : line.substr(std::min(c + 2, line.size()));
    }
  return "unknown";
}

std::string thp_mode() {
  std::ifstream in("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string s;
  std::getline(in, s);
  const size_t a = s.find('['), b = s.find(']');
  return a != std::string::npos && b != std::string::npos && b > a ? s.substr(a + 1, b - a - 1) : "unknown";
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse_options(argc, argv);
  const auto t_start = Clock::now();
  std::unique_ptr<CompetingLoad> competing;
  if (o.contention > 0 && !o.list && !o.check_only)
    competing = std::make_unique<CompetingLoad>(o.contention, o.contention_ms);

  // Kernel tables.
  std::vector<const KernelTable*> tables;
  const bool all_isas = o.isa == "all";
  try {
    if (o.isa == "active") {
      tables.push_back(&mk::active_kernels());
    } else if (all_isas) {
      for (int i = 0; i < mk::kNumIsas; ++i) {
        const Isa isa = static_cast<Isa>(i);
        if (mk::isa_supported(isa))
          tables.push_back(&mk::kernels_for(isa));
        else
          std::fprintf(stderr, "note: %s is not supported by this CPU; left out\n", mk::isa_name(isa));
      }
    } else {
      tables.push_back(&mk::kernels_for(mk::isa_from_name(o.isa.c_str())));
    }
  } catch (const std::exception& e) {
    die(std::string("--isa=") + o.isa + ": " + e.what());
  }
  const bool torch = kWithTorch && o.torch;
  if (!kWithTorch && o.torch)
    std::fprintf(stderr, "note: built without torch (MSBNB_WITH_TORCH=OFF): no torch baselines\n");
#ifdef MSBNB_BENCH_WITH_TORCH
  c10::InferenceMode inference_mode;
  if (torch && !blas_set_threads())
    std::fprintf(stderr,
                 "note: openblas_set_num_threads not found: torch's BLAS threads are its own default\n");
#endif

  std::string isa_names;
  for (const KernelTable* k : tables)
    isa_names += std::string(isa_names.empty() ? "" : ",") + mk::isa_name(k->isa);
  std::printf(
      "{\"op\":\"info\",\"cpu\":\"%s\",\"active_isa\":\"%s\",\"isas\":\"%s\",\"torch\":%s,"
      "\"blas_threads_set\":%s,\"hugepages\":%s,\"thp\":\"%s\",\"min_bytes\":%lld,\"case_seconds\":%s,"
      "\"quick\":%s,\"contention\":%d}\n",
      json_escape(cpu_model()).c_str(), mk::isa_name(mk::active_isa()), isa_names.c_str(),
      torch ? "true" : "false", torch && blas_set_threads() ? "true" : "false", o.huge ? "true" : "false",
      thp_mode().c_str(), static_cast<long long>(o.min_bytes), num(o.case_seconds, 3).c_str(),
      o.quick ? "true" : "false", o.contention);
  std::fflush(stdout);

  int64_t nmax = 1;
  for (int64_t n : o.ns) nmax = std::max(nmax, n);
  int total = 0;
  for (const Shape& s : o.shapes)
    for (const Group& g : plan_shape(o, tables, all_isas, torch)) {
      total += static_cast<int>(g.cases.size());
      if (o.list)
        for (const Case& c : g.cases)
          std::fprintf(stderr, "%lldx%lld %s %s %s %s n=%lld t=%d\n", static_cast<long long>(s.m),
                       static_cast<long long>(s.k), op_name(c.op), c.format ? c.format->name : "f32",
                       c.path.c_str(), c.table ? mk::isa_name(c.table->isa) : "torch",
                       static_cast<long long>(c.n), c.threads);
    }
  std::fprintf(stderr, "%d cases, %.2f s cap each, weight sets of >= %.0f MiB\n", total, o.case_seconds,
               static_cast<double>(o.min_bytes) / 1048576.0);
  if (o.list) return 0;
  [[maybe_unused]] const int omp_default = omp_get_max_threads();

  // Read bandwidth: 1 GiB at startup (best of 3 after one warm-up pass), 256 MiB before each case.
  const bool avx2 = mk::isa_supported(Isa::avx2);
  const int64_t bw_elems = o.check_only ? 16 : int64_t{1} << 28, bw_case_elems = int64_t{1} << 26;
  mb::Buffer<float> bw_buffer(static_cast<size_t>(bw_elems));
  mb::fill_weights(bw_buffer.data(), bw_elems, 3, 1.0f);
  std::map<int, double> startup_bw;
  for (int t : o.threads) {
    if (startup_bw.count(t) || o.check_only) continue;
    startup_bw[t] = mb::read_bandwidth(bw_buffer.data(), bw_elems, t, avx2, 3, 1);
    std::printf("{\"op\":\"read_bandwidth\",\"threads\":%d,\"bytes\":%lld,\"GB_s\":%s}\n", t,
                static_cast<long long>(bw_elems * 4), num(startup_bw[t]).c_str());
    std::fflush(stdout);
    std::fprintf(stderr, "read bandwidth, %d thread%s: %.2f GB/s (1 GiB)\n", t, t == 1 ? "" : "s",
                 startup_bw[t]);
    const double peak = mb::vnni_peak_gops(t);
    std::printf("{\"op\":\"vnni_peak\",\"threads\":%d,\"GOP_s\":%s}\n", t, num(peak).c_str());
    std::fprintf(stderr, "vpdpbusd peak, %d thread%s: %.0f GOP/s\n", t, t == 1 ? "" : "s", peak);
  }

  std::vector<Result> results;
  std::map<ScalarKey, double> scalar_us;
  int done = 0, failed = 0;
  for (const Shape& s : o.shapes) {
    Activations act(s, nmax);
    for (const Group& g : plan_shape(o, tables, all_isas, torch)) {
      const auto t_setup = Clock::now();
      WeightSet ws;
#ifdef MSBNB_BENCH_WITH_TORCH
      std::unique_ptr<TorchWeights> tw;
#endif
      int64_t copies = 0, bytes_each = 0;
      try {
        if (g.torch) {
#ifdef MSBNB_BENCH_WITH_TORCH
          tw = std::make_unique<TorchWeights>(s, o);
          copies = static_cast<int64_t>(tw->w.size());
          bytes_each = tw->bytes_each;
#endif
        } else {
          ws = make_weights(g.weight, s, o);
          copies = ws.copies();
          bytes_each = ws.bytes_each;
        }
      } catch (const std::exception& e) {
        std::fprintf(stderr, "error: making the weights of %lldx%lld: %s; skipped\n",
                     static_cast<long long>(s.m), static_cast<long long>(s.k), e.what());
        done += static_cast<int>(g.cases.size());
        continue;
      }
      std::fprintf(stderr, "%lldx%lld %s: %lld copies of %.2f MiB (%.2f GiB) in %.1f s\n",
                   static_cast<long long>(s.m), static_cast<long long>(s.k),
                   g.torch ? "f32" : weight_name(g.weight), static_cast<long long>(copies),
                   static_cast<double>(bytes_each) / 1048576.0,
                   static_cast<double>(bytes_each * copies) / 1073741824.0, seconds_since(t_setup));

      for (const Case& c : g.cases) {
        ++done;
        Result r;
        r.op = op_name(c.op);
        r.format = c.format ? c.format->name : "f32";
        r.path = c.path;
        r.isa = c.table ? mk::isa_name(c.table->isa) : "torch";
        r.shape = s;
        r.n = c.n;
        r.threads = c.threads;
        r.contention = o.contention;
        r.copies = copies;
        r.weight_bytes = bytes_each;
        r.llm = c.op == Op::llm;
        r.threshold = c.threshold;
        r.outlier_cols = act.outlier_cols;
        mk::MatmulIO io;
        io.n = c.n;
        io.x = c.op == Op::llm ? act.x_outliers.data() : act.x.data();
        io.ldx = c.op == Op::transposed ? s.m : s.k;
        io.y = act.y.data();
        io.ldy = c.op == Op::transposed ? s.k : s.m;
        Timing t;
        try {
          if (c.table) {  // validate before timing
            mk::set_num_threads(c.threads);
            char name[160];
            std::snprintf(name, sizeof name, "%s %s %s %s %lldx%lld n=%lld t=%d", r.op.c_str(),
                          r.format.c_str(), r.path.c_str(), r.isa.c_str(), static_cast<long long>(s.m),
                          static_cast<long long>(s.k), static_cast<long long>(c.n), c.threads);
            const float* x = static_cast<const float*>(io.x);
            int64_t bad = 0;
            if (c.op == Op::transposed)
              bad = is_lut4(g.weight)
                        ? check_transposed(name, ws.lut4[0].view, x, c.n, act.y.data(), *c.table)
                        : check_transposed(name, ws.int8[0].view, x, c.n, act.y.data(), *c.table);
            else if (is_lut4(g.weight))
              bad = check_forward(name, ws.lut4[0].view, x, c.n, path_of(c.path), false, 0.0f, act.y.data(),
                                  *c.table);
            else
              bad = check_forward(name, ws.int8[0].view, x, c.n, path_of(c.path), c.op == Op::llm,
                                  c.threshold, act.y.data(), *c.table);
            r.check = bad == 0 ? "ok" : "FAIL";
            if (bad) ++failed;
          }
          if (o.check_only) continue;
          for (int attempt = 0;; ++attempt) {
            if (o.wait_idle > 0) mb::wait_idle(o.wait_idle);
            const mb::CpuSnapshot snap0 = mb::cpu_snapshot();
            const auto w0 = Clock::now();
            if (c.table) {
              mk::set_num_threads(c.threads);
            } else {
#ifdef MSBNB_BENCH_WITH_TORCH
              set_torch_threads(c.threads);
#endif
            }
            r.bw = mb::read_bandwidth(bw_buffer.data(), bw_case_elems, c.threads, avx2, 2);
            const KernelTable& k = c.table ? *c.table : mk::active_kernels();
            const mk::MatmulPath path = path_of(c.path);
            if (competing) competing->resume();
            switch (c.op) {
              case Op::matmul:
                if (is_lut4(g.weight))
                  t = time_calls(copies, o.case_seconds,
                                 [&](int64_t i) { mk::matmul(ws.lut4[i].view, io, path, k); });
                else
                  t = time_calls(copies, o.case_seconds,
                                 [&](int64_t i) { mk::matmul(ws.int8[i].view, io, path, k); });
                break;
              case Op::transposed:
                if (is_lut4(g.weight))
                  t = time_calls(copies, o.case_seconds,
                                 [&](int64_t i) { mk::matmul_transposed(ws.lut4[i].view, io, k); });
                else
                  t = time_calls(copies, o.case_seconds,
                                 [&](int64_t i) { mk::matmul_transposed(ws.int8[i].view, io, k); });
                break;
              case Op::llm:
                t = time_calls(copies, o.case_seconds, [&](int64_t i) {
                  mk::matmul_llm_int8(ws.int8[i].view, io, c.threshold, nullptr, k);
                });
                break;
              case Op::torch_linear:
              case Op::torch_mv: {
#ifdef MSBNB_BENCH_WITH_TORCH
                if (c.op == Op::torch_linear) {
                  const at::Tensor x = at::from_blob(act.x.data(), {c.n, s.k}, at::kFloat);
                  t = time_calls(copies, o.case_seconds, [&](int64_t i) { (void)at::linear(x, tw->w[i]); });
                } else {
                  const at::Tensor x = at::from_blob(act.x.data(), {s.k}, at::kFloat);
                  t = time_calls(copies, o.case_seconds, [&](int64_t i) { (void)at::mv(tw->w[i], x); });
                }
                // Let the BLAS worker threads stop spinning before the next bandwidth pass.
                std::this_thread::sleep_for(std::chrono::milliseconds(200));
                omp_set_num_threads(omp_default);  // at::set_num_threads changed it
#endif
                break;
              }
            }
            if (competing) competing->pause();
            r.bw_after = mb::read_bandwidth(bw_buffer.data(), bw_case_elems, c.threads, avx2, 1);
            r.other_cpu = mb::other_cpu(snap0, mb::cpu_snapshot(), seconds_since(w0));
            // Under --contention the other load is the point: no reruns.
            if (o.wait_idle <= 0 || competing || !(r.other_cpu >= mb::kDisturbed) || attempt >= o.retries)
              break;
            std::fprintf(stderr, "[%3d/%d] disturbed (other processes used %.2f CPUs), attempt %d\n", done,
                         total, r.other_cpu, attempt + 1);
          }
        } catch (const std::exception& e) {
          std::fprintf(stderr, "[%3d/%d] %s %s %s: error: %s\n", done, total, r.op.c_str(), r.format.c_str(),
                       r.path.c_str(), e.what());
          continue;
        }
        if (t.samples.empty()) continue;
        r.samples = static_cast<int64_t>(t.samples.size());
        r.median_us = mb::median(t.samples) * 1e6;
        r.min_us = *std::min_element(t.samples.begin(), t.samples.end()) * 1e6;
        emit(r);
        results.push_back(r);
        char vs[48] = "", load[64] = "";
        if (r.other_cpu >= mb::kDisturbed)
          std::snprintf(load, sizeof load, "  OTHER LOAD %.2f CPUs", r.other_cpu);
        if (r.isa == "scalar") {
          scalar_us[scalar_key(r)] = r.median_us;
        } else if (const auto sc = scalar_us.find(scalar_key(r)); sc != scalar_us.end()) {
          std::snprintf(vs, sizeof vs, "  %.1fx vs scalar", sc->second / r.median_us);
        }
        std::fprintf(stderr,
                     "[%3d/%d] %-17s %-9s %-5s %-6s %lldx%lld n=%-3lld t=%d %10.1f us %7.2f GB/s %5.1f%% of "
                     "%.1f (after %.1f) %8.2f GFLOP/s (%lld samples)%s%s\n",
                     done, total, r.op.c_str(), r.format.c_str(), r.path.c_str(), r.isa.c_str(),
                     static_cast<long long>(s.m), static_cast<long long>(s.k), static_cast<long long>(r.n),
                     r.threads, r.median_us, r.gb_s(), r.pct_bw(), r.bw, r.bw_after, r.gflop_s(),
                     static_cast<long long>(r.samples), vs, load);
      }
    }
  }
  mk::set_num_threads(0);
  print_summary(results, startup_bw);
  std::fprintf(stderr, "\ntotal %.1f s\n", seconds_since(t_start));
  if (failed) {
    std::fprintf(stderr, "%d case%s FAILED the check against the scalar kernels (MISMATCH lines above)\n",
                 failed, failed == 1 ? "" : "s");
    return 1;
  }
  std::fprintf(stderr, "every case matched the scalar kernels within its derived bound\n");
  return 0;
}
