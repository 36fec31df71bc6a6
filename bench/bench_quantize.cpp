// Quantize / dequantize throughput of every format and ISA, against the memory bandwidth of the
// same machine measured in the same run (docs/benchmarks.md).
//
//   msbnb_bench_quantize [--quick] [--threads=1,2] [Google Benchmark flags]
//
// Before any benchmark runs it measures the read bandwidth (sum of a 1 GiB float buffer, best
// of a few passes) and the write bandwidth (memset) for each thread count, and checks that every
// ISA's kernels give bit-identical results to the scalar reference. Each benchmark reports
//   GB/s         bytes read + written per second (the tile variant: packed codes + stats read),
//   pct_read_bw  GB/s as a percentage of the startup read bandwidth with the same thread count,
//   read_bw_now, pct_read_bw_now  the read bandwidth measured just before the case, and GB/s
//                as a percentage of it (the bandwidth of a shared or virtual machine can move),
//   items_per_second  elements per second,
// and a summary table is printed at the end (stdout for the console format, else stderr).
#include <benchmark/benchmark.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench_util.h"
#include "msbnb/kernels/formats.h"
#include "msbnb/kernels/kernel_table.h"
#include "msbnb/kernels/ops.h"

namespace {

namespace bm = benchmark;
namespace mk = msbnb::kernels;
using mk::DType;
using mk::Format;
using mk::Isa;
using mk::KernelTable;
using msbnb::bench::Buffer;
using Clock = std::chrono::steady_clock;

// ---- options -----------------------------------------------------------------------------------

struct Options {
  bool quick = false;
  std::vector<int> threads{1, 2};
  bool user_min_time = false;  // --benchmark_min_time given: do not override it
  bool list_only = false;      // --benchmark_list_tests: skip the measurements
  std::string format = "console";
  bool color = false, tabular = false;
};

bool starts_with(const char* s, const char* prefix) {
  return std::strncmp(s, prefix, std::strlen(prefix)) == 0;
}

bool flag_true(const char* v) {
  return !std::strcmp(v, "true") || !std::strcmp(v, "yes") || !std::strcmp(v, "1") || !std::strcmp(v, "on");
}

void usage() {
  std::fprintf(stderr,
               "msbnb_bench_quantize [--quick] [--threads=1,2] [Google Benchmark flags]\n"
               "  --quick         4096x8192 weight, 128 MiB tile weight, 4 formats, 0.1 s per case\n"
               "  --threads=LIST  OpenMP thread counts to run (default 1,2)\n"
               "Google Benchmark flags follow (--benchmark_filter, --benchmark_format=json, "
               "--benchmark_out=FILE, ...).\n\n");
}

// Takes this program's flags out of argv (before benchmark::Initialize) and peeks at the
// Google Benchmark flags that decide how results are shown.
Options parse_options(int* argc, char** argv) {
  Options o;
  o.color = isatty(fileno(stdout)) && std::getenv("TERM") && std::strcmp(std::getenv("TERM"), "dumb") != 0;
  int out = 1;
  for (int i = 1; i < *argc; ++i) {
    const char* a = argv[i];
    if (!std::strcmp(a, "--quick")) {
      o.quick = true;
      continue;
    }
    if (starts_with(a, "--threads=")) {
      o.threads.clear();
      for (const char* p = a + 10; *p;) {
        char* end = nullptr;
        const long t = std::strtol(p, &end, 10);
        if (end == p || t < 1 || t > 1024) {
          std::fprintf(stderr, "msbnb_bench_quantize: bad --threads list '%s'\n", a + 10);
          std::exit(2);
        }
        o.threads.push_back(static_cast<int>(t));
        p = *end == ',' ? end + 1 : end;
      }
      continue;
    }
    if (!std::strcmp(a, "--help") || !std::strcmp(a, "-h")) usage();
    if (starts_with(a, "--benchmark_min_time")) o.user_min_time = true;
    if (starts_with(a, "--benchmark_list_tests") && !std::strstr(a, "=false")) o.list_only = true;
    if (starts_with(a, "--benchmark_format=")) o.format = a + 19;
    if (starts_with(a, "--benchmark_color=")) {
      const char* v = a + 18;
      o.color = !std::strcmp(v, "auto") ? o.color : flag_true(v);
    }
    if (starts_with(a, "--benchmark_counters_tabular"))
      o.tabular = !std::strchr(a, '=') || flag_true(std::strchr(a, '=') + 1);
    argv[out++] = argv[i];
  }
  *argc = out;
  argv[out] = nullptr;
  if (o.threads.empty()) o.threads = {1, 2};
  return o;
}

// ---- formats -----------------------------------------------------------------------------------

struct Shape {
  int64_t rows = 0, cols = 0;
  int64_t n() const { return rows * cols; }
};

// Elements dequantized per tile in the cache-resident variant: 16 KiB of float32.
constexpr int64_t kTile = 4096;

struct FormatCase {
  const char* name;
  Format format;
  bool asym;
  bool quick;  // part of the --quick run
  bool tile;   // has a tile variant
};

const FormatCase kFormats[] = {
    {"nf4", Format::nf4, false, true, true},           {"fp4", Format::fp4, false, false, true},
    {"int4_sym", Format::int4, false, true, true},     {"int4_asym", Format::int4, true, false, true},
    {"int8_sym", Format::int8, false, true, true},     {"int8_asym", Format::int8, true, false, true},
    {"dynamic8", Format::dynamic8, false, true, true},
};

int bits_of(const FormatCase& f) { return mk::format_info(f.format).bits; }
// Block (group) size: the format table's default, or one row (per channel) where that is 0.
int64_t block_of(const FormatCase& f, Shape s) {
  const int b = mk::format_info(f.format).default_block;
  return b > 0 ? b : s.cols;
}
int64_t stat_count(const FormatCase& f, Shape s) { return s.n() / block_of(f, s); }
int64_t code_bytes(const FormatCase& f, Shape s) { return bits_of(f) == 4 ? s.n() / 2 : s.n(); }
// Stats stored with the codes: absmax or scale (float), plus an int32 zero point if asymmetric.
int64_t stat_bytes(const FormatCase& f, Shape s) { return stat_count(f, s) * (f.asym ? 8 : 4); }

struct Codebooks {
  std::array<float, 256> dynamic;
  mk::Lut8 dynamic_lut;
};
const Codebooks& codebooks() {
  static const Codebooks c = [] {
    Codebooks b;
    b.dynamic = mk::create_dynamic_map(true);
    b.dynamic_lut = mk::make_lut8(b.dynamic.data());
    return b;
  }();
  return c;
}
// The codebook of the format's formats.def row.
const mk::Lut4& lut4_of(Format f) { return mk::format_lut4(f); }
const float* code16_of(Format f) { return mk::format_info(f).codebook; }

// Codes and stats of one format for one weight.
struct Encoded {
  Buffer<uint8_t> codes;
  Buffer<float> stats;   // absmax (nf4, fp4, dynamic8) or scale (int4, int8)
  Buffer<int32_t> zp;    // asymmetric only
  Buffer<float> lo, hi;  // asymmetric only: per-block min / max
  bool ready = false;

  Encoded() = default;
  Encoded(const FormatCase& f, Shape s)
      : codes(static_cast<size_t>(code_bytes(f, s))), stats(static_cast<size_t>(stat_count(f, s))) {
    if (f.asym) {
      const size_t c = static_cast<size_t>(stat_count(f, s));
      zp = Buffer<int32_t>(c);
      lo = Buffer<float>(c);
      hi = Buffer<float>(c);
    }
  }
};

// What dequantize reads.
struct View {
  const uint8_t* codes;
  const float* stats;
  const int32_t* zp;
  Shape shape;
};
View view_of(const Encoded& e, Shape s) { return {e.codes.data(), e.stats.data(), e.zp.data(), s}; }

// The whole quantize of a float32 weight as msbnb's functional layer does it: the per-block
// statistics (one pass over the input), then the codes (a second pass).
void quantize(const FormatCase& f, const KernelTable& k, const float* w, Shape s, Encoded& e) {
  const int64_t n = s.n(), bs = block_of(f, s), count = stat_count(f, s);
  switch (f.format) {
    case Format::nf4:
    case Format::fp4:
      mk::absmax_blocks(w, DType::f32, n, bs, e.stats.data(), k);
      mk::quantize_lut4(w, DType::f32, n, bs, e.stats.data(), lut4_of(f.format), e.codes.data(), k);
      break;
    case Format::int4:
    case Format::int8: {
      const bool int4 = f.format == Format::int4;
      if (f.asym) {
        mk::minmax_blocks(w, DType::f32, n, bs, e.lo.data(), e.hi.data(), k);
        mk::asymmetric_scales(e.lo.data(), e.hi.data(), count, int4 ? 0 : -128, int4 ? 15 : 127,
                              e.stats.data(), e.zp.data());
      } else {
        mk::absmax_blocks(w, DType::f32, n, bs, e.stats.data(), k);
        mk::symmetric_scales(e.stats.data(), count, int4 ? 7.0f : 127.0f, e.stats.data());
      }
      const int32_t* zp = f.asym ? e.zp.data() : nullptr;
      if (int4)
        mk::quantize_int4(w, DType::f32, s.rows, s.cols, bs, e.stats.data(), zp, e.codes.data(), k);
      else
        mk::quantize_int8(w, DType::f32, n, bs, e.stats.data(), zp, f.asym ? -128 : -127, 127,
                          reinterpret_cast<int8_t*>(e.codes.data()), k);
      break;
    }
    case Format::dynamic8:
      mk::absmax_blocks(w, DType::f32, n, bs, e.stats.data(), k);
      mk::quantize_lut8(w, DType::f32, n, bs, e.stats.data(), codebooks().dynamic_lut, e.codes.data(), k);
      break;
  }
}

// Threaded dequantize of the whole weight into a float32 buffer (ops.h).
void dequantize(const FormatCase& f, const KernelTable& k, const View& v, float* out) {
  const Shape s = v.shape;
  const int64_t n = s.n(), bs = block_of(f, s);
  const int32_t* zp = f.asym ? v.zp : nullptr;
  switch (f.format) {
    case Format::nf4:
    case Format::fp4:
      mk::dequantize_lut4(v.codes, n, bs, v.stats, code16_of(f.format), out, k);
      break;
    case Format::int4:
      mk::dequantize_int4(v.codes, s.rows, s.cols, bs, v.stats, zp, out, k);
      break;
    case Format::int8:
      mk::dequantize_int8(reinterpret_cast<const int8_t*>(v.codes), n, bs, v.stats, zp, out, k);
      break;
    case Format::dynamic8:
      mk::dequantize_lut8(v.codes, n, bs, v.stats, codebooks().dynamic.data(), out, k);
      break;
  }
}

// One tile [s0, s0 + kTile) through the kernel table entry itself (single-threaded), as a fused
// matmul would decode the weight tile it is about to use. Needs cols % kTile == 0.
inline void decode_tile(const FormatCase& f, const KernelTable& k, const View& v, int64_t s0, float* tile) {
  const Shape s = v.shape;
  const int64_t bs = block_of(f, s);
  const int32_t* zp = f.asym ? v.zp : nullptr;
  switch (f.format) {
    case Format::nf4:
    case Format::fp4:
      k.dequantize_lut4(v.codes + s0 / 2, s0, kTile, bs, v.stats, code16_of(f.format), tile);
      break;
    case Format::int4: {
      const int64_t r = s0 / s.cols, c0 = s0 % s.cols, groups = s.cols / bs, g0 = r * groups + c0 / bs;
      k.dequantize_int4(v.codes + r * (s.cols / 2) + c0 / 2, 1, kTile, bs, v.stats + g0,
                        zp ? zp + g0 : nullptr, tile);
      break;
    }
    case Format::int8:
      k.dequantize_int8(reinterpret_cast<const int8_t*>(v.codes) + s0, s0, kTile, bs, v.stats, zp, tile);
      break;
    case Format::dynamic8:
      k.dequantize_lut8(v.codes + s0, s0, kTile, bs, v.stats, codebooks().dynamic.data(), tile);
      break;
  }
}

// Each of `threads` OpenMP threads walks its contiguous share of the tiles, decoding each into
// its own tile buffer. With `gather`, each tile is also copied to its place there (checks only).
void run_tiles(const FormatCase& f, const KernelTable& k, const View& v, int threads, float* const* tiles,
               float* gather) {
  const int64_t ntiles = v.shape.n() / kTile;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    float* tile = tiles[t];
    for (int64_t i = ntiles * t / nt, end = ntiles * (t + 1) / nt; i < end; ++i) {
      decode_tile(f, k, v, i * kTile, tile);
      if (gather) std::memcpy(gather + i * kTile, tile, kTile * sizeof(float));
    }
  }
}

// Per-thread tile buffers (64-byte aligned, 16 KiB each).
struct Tiles {
  std::vector<std::vector<float>> storage;
  std::vector<float*> ptrs;
  explicit Tiles(int threads) {
    for (int t = 0; t < threads; ++t) {
      storage.emplace_back(kTile + 16);
      float* p = storage.back().data();
      const auto addr = reinterpret_cast<uintptr_t>(p);
      ptrs.push_back(p + ((64 - addr % 64) % 64) / sizeof(float));
    }
  }
};

// ---- global state ------------------------------------------------------------------------------

struct Sizes {
  Shape weight;             // DRAM variants: a float32 weight and its float32 output
  int64_t tile_code_bytes;  // tile variant: bytes of codes (random), any format
  int64_t cols;
};

Options g_opt;
Sizes g_sizes;
std::map<int, double> g_read_bw, g_write_bw;  // GB/s by thread count, measured at startup
Buffer<float> g_bw_buffer;                    // >= 1 GiB
bool g_avx2 = false;

// DRAM variants: the weight, its output, and each format's codes (built on first use).
struct DramData {
  Buffer<float> weight, out;
  std::map<std::string, Encoded> encoded;
};
DramData& dram() {
  static DramData d = [] {
    DramData x;
    const size_t n = static_cast<size_t>(g_sizes.weight.n());
    x.weight = Buffer<float>(n);
    msbnb::bench::fill_weights(x.weight.data(), g_sizes.weight.n(), 1, 0.02f);
    x.out = Buffer<float>(n);
    return x;
  }();
  return d;
}
Encoded& encoded_for(const FormatCase& f, bool need_codes) {
  DramData& d = dram();
  auto it = d.encoded.find(f.name);
  if (it == d.encoded.end()) it = d.encoded.emplace(f.name, Encoded(f, g_sizes.weight)).first;
  Encoded& e = it->second;
  if (need_codes && !e.ready) {
    const KernelTable& best = mk::kernels_for(mk::active_isa());
    mk::set_num_threads(0);
    quantize(f, best, d.weight.data(), g_sizes.weight, e);
    e.ready = true;
  }
  return e;
}

// Tile variant: one large buffer of random codes with random stats, shared by every format (a
// 4-bit format sees twice as many elements as an 8-bit one).
struct TileData {
  Buffer<uint8_t> codes;
  Buffer<float> stats;
  Buffer<int32_t> zp;
  Tiles tiles{1};
};
TileData& tile_data() {
  static TileData d = [] {
    TileData x;
    const int64_t bytes = g_sizes.tile_code_bytes, max_elements = 2 * bytes;
    x.codes = Buffer<uint8_t>(static_cast<size_t>(bytes));
    msbnb::bench::fill_bytes(x.codes.data(), bytes, 3);
    // The most stats any format needs: one per 64 elements (nf4 / fp4); int4 needs one zero
    // point per 128.
    x.stats = Buffer<float>(static_cast<size_t>(max_elements / 64));
    x.zp = Buffer<int32_t>(static_cast<size_t>(max_elements / 128));
    float* st = x.stats.data();
    int32_t* zp = x.zp.data();
    const int64_t ns = max_elements / 64, nz = max_elements / 128;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < ns; ++i)
      st[i] = 0.01f +
              0.04f * static_cast<float>(msbnb::bench::mix64(static_cast<uint64_t>(i)) >> 40) / 16777216.0f;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < nz; ++i)
      zp[i] = static_cast<int32_t>(msbnb::bench::mix64(~static_cast<uint64_t>(i)) & 15);
    int max_threads = 1;
    for (int t : g_opt.threads) max_threads = std::max(max_threads, t);
    x.tiles = Tiles(max_threads);
    return x;
  }();
  return d;
}
View tile_view(const FormatCase& f) {
  TileData& d = tile_data();
  const int64_t elements = bits_of(f) == 4 ? 2 * g_sizes.tile_code_bytes : g_sizes.tile_code_bytes;
  return {d.codes.data(), d.stats.data(), d.zp.data(), Shape{elements / g_sizes.cols, g_sizes.cols}};
}

// ---- memory bandwidth --------------------------------------------------------------------------

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double measure_read_bw(int threads, int reps) {
  const int64_t n = static_cast<int64_t>(g_bw_buffer.size());
  double best = 0;
  for (int r = 0; r <= reps; ++r) {  // pass 0 warms the thread pool up
    const auto t0 = Clock::now();
    float s = msbnb::bench::read_pass(g_bw_buffer.data(), n, threads, g_avx2);
    const double sec = seconds_since(t0);
    bm::DoNotOptimize(s);
    if (r > 0) best = std::max(best, static_cast<double>(g_bw_buffer.bytes()) / sec / 1e9);
  }
  return best;
}

double measure_write_bw(int threads, int reps) {
  double best = 0;
  for (int r = 0; r <= reps; ++r) {
    const auto t0 = Clock::now();
    msbnb::bench::write_pass(g_bw_buffer.data(), g_bw_buffer.bytes(), threads, r + 1);
    bm::ClobberMemory();
    const double sec = seconds_since(t0);
    if (r > 0) best = std::max(best, static_cast<double>(g_bw_buffer.bytes()) / sec / 1e9);
  }
  return best;
}

// ---- correctness check -------------------------------------------------------------------------

[[noreturn]] void mismatch(const char* what, const FormatCase& f, Isa isa, size_t at) {
  std::fprintf(stderr,
               "msbnb_bench_quantize: %s of %s with %s differs from the scalar reference at byte %zu; "
               "not benchmarking wrong kernels\n",
               what, f.name, mk::isa_name(isa), at);
  std::exit(1);
}

size_t first_diff(const void* a, const void* b, size_t bytes) {
  const auto* x = static_cast<const unsigned char*>(a);
  const auto* y = static_cast<const unsigned char*>(b);
  for (size_t i = 0; i < bytes; ++i)
    if (x[i] != y[i]) return i;
  return bytes;
}

void expect_same(const void* ref, const void* got, size_t bytes, const char* what, const FormatCase& f,
                 Isa isa) {
  if (bytes && std::memcmp(ref, got, bytes) != 0) mismatch(what, f, isa, first_diff(ref, got, bytes));
}

// Every ISA (the scalar one included, for the tile path) on a small weight: the threaded
// quantize and dequantize and the tile walk must equal the scalar table's results byte for byte.
void check_isas(const std::vector<Isa>& isas) {
  const Shape s{12, g_sizes.cols};
  const int64_t n = s.n();
  std::vector<float> w(static_cast<size_t>(n));
  msbnb::bench::fill_weights(w.data(), n, 7, 0.02f);
  w[5] = 0.0f;
  w[100] = 0.5f;  // an outlier
  w[static_cast<size_t>(n - 1)] = -0.25f;
  const KernelTable& ref = mk::kernels_for(Isa::scalar);
  mk::set_num_threads(2);
  Tiles tiles(2);
  std::vector<float> d_ref(static_cast<size_t>(n)), d(static_cast<size_t>(n));
  for (const FormatCase& f : kFormats) {
    Encoded e_ref(f, s);
    quantize(f, ref, w.data(), s, e_ref);
    const View v = view_of(e_ref, s);
    dequantize(f, ref, v, d_ref.data());
    for (Isa isa : isas) {
      const KernelTable& k = mk::kernels_for(isa);
      Encoded e(f, s);
      quantize(f, k, w.data(), s, e);
      expect_same(e_ref.codes.data(), e.codes.data(), e.codes.bytes(), "quantize (codes)", f, isa);
      expect_same(e_ref.stats.data(), e.stats.data(), e.stats.bytes(), "quantize (stats)", f, isa);
      expect_same(e_ref.zp.data(), e.zp.data(), e.zp.bytes(), "quantize (zero points)", f, isa);
      std::fill(d.begin(), d.end(), -1.0f);
      dequantize(f, k, v, d.data());
      expect_same(d_ref.data(), d.data(), d.size() * sizeof(float), "dequantize", f, isa);
      std::fill(d.begin(), d.end(), -1.0f);
      run_tiles(f, k, v, 2, tiles.ptrs.data(), d.data());
      expect_same(d_ref.data(), d.data(), d.size() * sizeof(float), "tile dequantize", f, isa);
    }
  }
  mk::set_num_threads(0);
}

// ---- benchmarks --------------------------------------------------------------------------------

struct CaseInfo {
  std::string name, op, format, isa;
  int threads;
};
std::vector<CaseInfo> g_cases;

// Read bandwidth just before a benchmark's timed loop (best of `passes` passes over the 1 GiB
// buffer): on a shared or virtual machine it can move a lot within one run.
double read_bw_now(int threads) {
  const int64_t n = static_cast<int64_t>(g_bw_buffer.size());
  const int passes = g_opt.quick ? 1 : 2;
  double best = 0;
  for (int p = 0; p < passes; ++p) {
    const auto t0 = Clock::now();
    float s = msbnb::bench::read_pass(g_bw_buffer.data(), n, threads, g_avx2);
    const double sec = seconds_since(t0);
    bm::DoNotOptimize(s);
    best = std::max(best, static_cast<double>(g_bw_buffer.bytes()) / sec / 1e9);
  }
  return best;
}

// Sets the counters from the loop's wall time: `bytes` per iteration; bw_now > 0 adds the
// fraction of the bandwidth measured just before the loop.
void set_counters(bm::State& st, double seconds, double bytes, int64_t elements, int threads, bool pct,
                  double bw_now = 0) {
  const double iters = static_cast<double>(st.iterations());
  if (iters <= 0 || seconds <= 0) return;
  const double gbps = bytes * iters / seconds / 1e9;
  st.counters["GB/s"] = gbps;
  if (pct) st.counters["pct_read_bw"] = 100.0 * gbps / g_read_bw.at(threads);
  if (bw_now > 0) {
    st.counters["read_bw_now"] = bw_now;
    st.counters["pct_read_bw_now"] = 100.0 * gbps / bw_now;
  }
  st.SetItemsProcessed(static_cast<int64_t>(iters) * elements);
}

template <typename Fn>
double timed_loop(bm::State& st, Fn fn) {
  const auto t0 = Clock::now();
  for (auto _ : st) {
    fn();
    bm::ClobberMemory();
  }
  return seconds_since(t0);
}

void BM_mem_read(bm::State& st, int threads) {
  const int64_t n = static_cast<int64_t>(g_bw_buffer.size());
  const double sec = timed_loop(st, [&] {
    float s = msbnb::bench::read_pass(g_bw_buffer.data(), n, threads, g_avx2);
    bm::DoNotOptimize(s);
  });
  set_counters(st, sec, static_cast<double>(g_bw_buffer.bytes()), n, threads, true);
}

void BM_mem_write(bm::State& st, int threads) {
  int value = 0;
  const double sec = timed_loop(st, [&] {
    msbnb::bench::write_pass(g_bw_buffer.data(), g_bw_buffer.bytes(), threads, ++value & 0xff);
  });
  set_counters(st, sec, static_cast<double>(g_bw_buffer.bytes()), static_cast<int64_t>(g_bw_buffer.size()),
               threads, false);
}

void BM_quantize(bm::State& st, const FormatCase* f, Isa isa, int threads) {
  const KernelTable& k = mk::kernels_for(isa);
  DramData& d = dram();
  Encoded& e = encoded_for(*f, false);
  const Shape s = g_sizes.weight;
  const double bw_now = read_bw_now(threads);
  mk::set_num_threads(threads);
  const double sec = timed_loop(st, [&] { quantize(*f, k, d.weight.data(), s, e); });
  mk::set_num_threads(0);
  e.ready = true;
  // Two passes over the input (statistics, then codes); codes and stats written once.
  const double bytes = 2.0 * static_cast<double>(s.n()) * 4 + static_cast<double>(code_bytes(*f, s)) +
                       static_cast<double>(stat_bytes(*f, s));
  set_counters(st, sec, bytes, s.n(), threads, true, bw_now);
}

void BM_dequantize(bm::State& st, const FormatCase* f, Isa isa, int threads) {
  const KernelTable& k = mk::kernels_for(isa);
  DramData& d = dram();
  const Shape s = g_sizes.weight;
  const View v = view_of(encoded_for(*f, true), s);
  const double bw_now = read_bw_now(threads);
  mk::set_num_threads(threads);
  const double sec = timed_loop(st, [&] { dequantize(*f, k, v, d.out.data()); });
  mk::set_num_threads(0);
  const double bytes = static_cast<double>(code_bytes(*f, s)) + static_cast<double>(stat_bytes(*f, s)) +
                       static_cast<double>(s.n()) * 4;
  set_counters(st, sec, bytes, s.n(), threads, true, bw_now);
}

void BM_dequantize_tile(bm::State& st, const FormatCase* f, Isa isa, int threads) {
  const KernelTable& k = mk::kernels_for(isa);
  const View v = tile_view(*f);
  float* const* tiles = tile_data().tiles.ptrs.data();
  const double bw_now = read_bw_now(threads);
  const double sec = timed_loop(st, [&] { run_tiles(*f, k, v, threads, tiles, nullptr); });
  // Only what comes from DRAM: the codes and their stats; the tiles stay in L1 / L2.
  const double bytes =
      static_cast<double>(code_bytes(*f, v.shape)) + static_cast<double>(stat_bytes(*f, v.shape));
  set_counters(st, sec, bytes, v.shape.n(), threads, true, bw_now);
}

bm::internal::Benchmark* configure(bm::internal::Benchmark* b) {
  b->UseRealTime()->Unit(bm::kMillisecond);
  if (g_opt.quick && !g_opt.user_min_time) b->MinTime(0.1);
  return b;
}

void add_case(const std::string& op, const std::string& format, const std::string& isa, int threads,
              const std::function<void(bm::State&)>& fn) {
  std::string name = op + "/" + format + "/" + isa + "/t:" + std::to_string(threads);
  if (format.empty()) name = op + "/" + isa + "/t:" + std::to_string(threads);
  configure(bm::RegisterBenchmark(name.c_str(), fn));
  g_cases.push_back({name, op, format.empty() ? "-" : format, isa, threads});
}

void register_all(const std::vector<Isa>& isas) {
  const char* load = g_avx2 ? "avx2" : "sse2";
  for (int t : g_opt.threads) add_case("mem_read", "", load, t, [t](bm::State& st) { BM_mem_read(st, t); });
  for (int t : g_opt.threads)
    add_case("mem_write", "", "memset", t, [t](bm::State& st) { BM_mem_write(st, t); });
  for (const FormatCase& f : kFormats) {
    if (g_opt.quick && !f.quick) continue;
    const FormatCase* fp = &f;
    for (const char* op : {"quantize", "dequantize", "dequantize_tile"}) {
      if (!std::strcmp(op, "dequantize_tile") && !f.tile) continue;
      for (Isa isa : isas)
        for (int t : g_opt.threads) {
          std::function<void(bm::State&)> fn;
          if (!std::strcmp(op, "quantize"))
            fn = [fp, isa, t](bm::State& st) { BM_quantize(st, fp, isa, t); };
          else if (!std::strcmp(op, "dequantize"))
            fn = [fp, isa, t](bm::State& st) { BM_dequantize(st, fp, isa, t); };
          else
            fn = [fp, isa, t](bm::State& st) { BM_dequantize_tile(st, fp, isa, t); };
          add_case(op, f.name, mk::isa_name(isa), t, fn);
        }
    }
  }
  // Again at the end: a drift of the bandwidth during the run (other load, vCPU placement)
  // shows here.
  for (int t : g_opt.threads)
    add_case("mem_read_end", "", load, t, [t](bm::State& st) { BM_mem_read(st, t); });
}

// ---- reporting ---------------------------------------------------------------------------------

struct Result {
  double gbps = NAN, pct = NAN, bw_now = NAN, pct_now = NAN, items = NAN, ms = NAN;
  bool error = false, final = false;
};
std::map<std::string, Result> g_results;

double counter_or_nan(const bm::BenchmarkReporter::Run& r, const char* name) {
  const auto it = r.counters.find(name);
  return it == r.counters.end() ? NAN : static_cast<double>(it->second.value);
}

// Forwards everything to the reporter Google Benchmark would have used and keeps the numbers
// for the summary table (the median when --benchmark_repetitions gives one, else the last run).
class Collector : public bm::BenchmarkReporter {
 public:
  explicit Collector(std::unique_ptr<bm::BenchmarkReporter> inner) : inner_(std::move(inner)) {}
  bool ReportContext(const Context& context) override { return inner_->ReportContext(context); }
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs) {
      const bool median = r.run_type == Run::RT_Aggregate && r.aggregate_name == "median";
      if (r.run_type == Run::RT_Aggregate && !median) continue;
      Result& res = g_results[r.run_name.function_name];
      if (res.final && !median) continue;
      res.error = r.error_occurred;
      res.final = median;
      res.gbps = counter_or_nan(r, "GB/s");
      res.pct = counter_or_nan(r, "pct_read_bw");
      res.bw_now = counter_or_nan(r, "read_bw_now");
      res.pct_now = counter_or_nan(r, "pct_read_bw_now");
      res.items = counter_or_nan(r, "items_per_second");
      res.ms = r.GetAdjustedRealTime();
    }
    inner_->ReportRuns(runs);
  }
  void Finalize() override { inner_->Finalize(); }

 private:
  std::unique_ptr<bm::BenchmarkReporter> inner_;
};

std::unique_ptr<bm::BenchmarkReporter> make_display_reporter(const Options& o) {
  if (o.format == "json") return std::make_unique<bm::JSONReporter>();
  if (o.format == "csv") {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    return std::make_unique<bm::CSVReporter>();
#pragma GCC diagnostic pop
  }
  int opts = bm::ConsoleReporter::OO_None;
  if (o.color) opts |= bm::ConsoleReporter::OO_Color;
  if (o.tabular) opts |= bm::ConsoleReporter::OO_Tabular;
  return std::make_unique<bm::ConsoleReporter>(static_cast<bm::ConsoleReporter::OutputOptions>(opts));
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      return colon == std::string::npos ? line : line.substr(colon + 2);
    }
  return "unknown";
}

void print_summary(FILE* out, Isa best) {
  if (g_results.empty()) return;
  std::fprintf(
      out, "\nmsbnb quantize benchmark summary (%s; weight %lldx%lld f32, tile weight %lld MiB of codes)\n",
      cpu_model().c_str(), static_cast<long long>(g_sizes.weight.rows),
      static_cast<long long>(g_sizes.weight.cols), static_cast<long long>(g_sizes.tile_code_bytes >> 20));
  std::fprintf(out, "read bandwidth (startup, best pass):");
  for (const auto& [t, bw] : g_read_bw) std::fprintf(out, "  %d thr %.1f GB/s", t, bw);
  std::fprintf(out, "\nwrite bandwidth (memset):");
  for (const auto& [t, bw] : g_write_bw) std::fprintf(out, "  %d thr %.1f GB/s", t, bw);
  std::fprintf(out, "\n\n%-16s %-10s %-7s %3s %8s %9s %8s %8s %8s %9s\n", "op", "format", "isa", "thr",
               "GB/s", "%read_bw", "bw_now", "%bw_now", "Gelem/s", "ms/iter");
  std::string last_group;
  for (const CaseInfo& c : g_cases) {
    const auto it = g_results.find(c.name);
    if (it == g_results.end()) continue;  // filtered out
    const Result& r = it->second;
    const std::string group = c.op + c.format;
    if (!last_group.empty() && group != last_group) std::fprintf(out, "\n");
    last_group = group;
    if (r.error) {
      std::fprintf(out, "%-16s %-10s %-7s %3d   (error)\n", c.op.c_str(), c.format.c_str(), c.isa.c_str(),
                   c.threads);
      continue;
    }
    char pct[32] = "-", now[32] = "-", pct_now[32] = "-";
    if (!std::isnan(r.pct)) std::snprintf(pct, sizeof pct, "%.1f%%", r.pct);
    if (!std::isnan(r.bw_now)) std::snprintf(now, sizeof now, "%.1f", r.bw_now);
    if (!std::isnan(r.pct_now)) std::snprintf(pct_now, sizeof pct_now, "%.1f%%", r.pct_now);
    std::fprintf(out, "%-16s %-10s %-7s %3d %8.2f %9s %8s %8s %8.3f %9.2f\n", c.op.c_str(), c.format.c_str(),
                 c.isa.c_str(), c.threads, r.gbps, pct, now, pct_now, r.items / 1e9, r.ms);
  }
  // The goal: 4-bit dequantize at >= 70 % of the read bandwidth with 2 threads. Two
  // readings: dequantize to DRAM counts every byte it moves (codes + stats read, float32 written,
  // 8x the codes); dequantize_tile counts only the codes and stats read, its float32 output staying
  // in cache (the bytes a fused matmul would stream), and is bound by storing 8 floats per byte.
  for (const char* op : {"dequantize", "dequantize_tile"}) {
    const std::string goal = std::string(op) + "/nf4/" + mk::isa_name(best) + "/t:2";
    const auto it = g_results.find(goal);
    if (it == g_results.end() || std::isnan(it->second.pct)) continue;
    std::fprintf(
        out,
        "\ngoal (4-bit dequantize >= 70%% of read bandwidth, 2 threads): %s %.2f GB/s = %.1f%% of the "
        "startup read bandwidth (%.1f%% of bw_now) -> %s",
        goal.c_str(), it->second.gbps, it->second.pct, it->second.pct_now,
        it->second.pct >= 70.0 ? "met" : "NOT met");
  }
  std::fprintf(out,
               "\n(dequantize: codes + stats read and float32 written; dequantize_tile: codes + stats read "
               "only, output kept in cache)");
  std::fprintf(out, "\n");
  std::fflush(out);
}

}  // namespace

int main(int argc, char** argv) {
  g_opt = parse_options(&argc, argv);
  bm::Initialize(&argc, argv);
  if (bm::ReportUnrecognizedArguments(argc, argv)) return 1;

  // Sizes: every streamed buffer >= 128 MiB, beyond the last-level cache (on the 32 MiB-L3 test VM
  // caching still showed up to ~96 MiB); about 2.2 GiB resident in all by default.
  const int64_t rows = g_opt.quick ? 4096 : 8192, cols = 8192;
  g_sizes.weight = Shape{rows, cols};
  g_sizes.cols = cols;
  g_sizes.tile_code_bytes = (g_opt.quick ? int64_t{128} : int64_t{256}) << 20;
  if (cols % kTile != 0) return 1;

  std::vector<Isa> isas;
  for (int i = 0; i < mk::kNumIsas; ++i) {
    const Isa isa = static_cast<Isa>(i);
    if (mk::isa_supported(isa))
      isas.push_back(isa);
    else
      std::fprintf(stderr, "note: %s is not supported by this CPU; its cases are left out\n",
                   mk::isa_name(isa));
  }
  g_avx2 = mk::isa_supported(Isa::avx2);
  const Isa best = isas.back();

  if (!g_opt.list_only) {
    check_isas(isas);
    std::string names;
    for (Isa isa : isas) names += std::string(names.empty() ? "" : ",") + mk::isa_name(isa);
    std::fprintf(stderr,
                 "check: quantize, dequantize and tile dequantize of every format equal the scalar "
                 "reference on %s\n",
                 names.c_str());

    g_bw_buffer = Buffer<float>(size_t{1} << 28);  // 1 GiB
    const int reps = g_opt.quick ? 3 : 5;
    for (int t : g_opt.threads) {
      g_read_bw[t] = measure_read_bw(t, reps);
      g_write_bw[t] = measure_write_bw(t, reps);
      std::fprintf(stderr, "memory bandwidth, %d thread%s: read %.2f GB/s, write (memset) %.2f GB/s\n", t,
                   t == 1 ? "" : "s", g_read_bw[t], g_write_bw[t]);
      bm::AddCustomContext("msbnb_read_bw_GBps_t" + std::to_string(t), std::to_string(g_read_bw[t]));
      bm::AddCustomContext("msbnb_write_bw_GBps_t" + std::to_string(t), std::to_string(g_write_bw[t]));
    }
    bm::AddCustomContext("msbnb_cpu", cpu_model());
    bm::AddCustomContext("msbnb_isas", names);
    bm::AddCustomContext("msbnb_weight", std::to_string(rows) + "x" + std::to_string(cols) + " f32");
    bm::AddCustomContext("msbnb_tile_code_bytes", std::to_string(g_sizes.tile_code_bytes));
    bm::AddCustomContext("msbnb_mode", g_opt.quick ? "quick" : "full");
  }

  register_all(isas);
  Collector reporter(make_display_reporter(g_opt));
  bm::RunSpecifiedBenchmarks(&reporter);
  if (!g_opt.list_only) print_summary(g_opt.format == "console" ? stdout : stderr, best);
  bm::Shutdown();
  return 0;
}
