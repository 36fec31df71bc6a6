// `msbnb bench`: whole-model speed against the memory-bandwidth bound, and (--matmul) the
// matmul benchmark program.
//
// Whole model: a LlamaForCausalLM of a given shape (--shape 7b | tiny | a checkpoint folder,
// whose config.json gives the shape) with random weights quantized in memory, one format after
// the other. Per format: decode tokens/s at batch 1 (greedy, KV cache) against the bound
// read bandwidth / bytes of weights read per token (every linear layer's weights, lm_head
// included; the KV cache and the one embedding row are left out: < 1 % here), the read
// bandwidth measured just before the case; and prefill tokens/s of a --prefill-token prompt.
// With --model DIR the checkpoint's own weights are used (quantized while loading).
#include <c10/util/Exception.h>
#include <omp.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "common.h"
#include "msbnb/io/safetensors.h"
#include "msbnb/models/generate.h"
#include "msbnb/nn/linear.h"

namespace msbnb::cli {
namespace {

using Clock = std::chrono::steady_clock;

// Read bandwidth (GB/s, 1e9 bytes) over a 1 GiB buffer with as many threads as torch uses: each
// thread sums its contiguous share as 64-bit integers (8 accumulators: the compiler vectorizes
// it without reassociating floats); best of 3 passes after a warm-up. The decode of a quantized
// model reads its weights the same way: once, in order, from DRAM.
template <int kLanes>
inline uint64_t sum_share(const uint64_t* p, int64_t lo, int64_t hi) {
  uint64_t a[kLanes] = {};
  for (int64_t i = lo; i < hi; i += kLanes)
    for (int j = 0; j < kLanes; ++j) a[j] += p[i + j];
  uint64_t t = 0;
  for (uint64_t v : a) t += v;
  return t;
}
#if defined(__x86_64__)
__attribute__((target("avx2"))) uint64_t sum_share_avx2(const uint64_t* p, int64_t lo, int64_t hi) {
  return sum_share<16>(p, lo, hi);
}
#endif

uint64_t read_pass(const uint64_t* p, int64_t n, int threads) {
#if defined(__x86_64__)
  const bool avx2 = __builtin_cpu_supports("avx2");
#endif
  uint64_t total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t lo = n * t / nt / 16 * 16, hi = t + 1 == nt ? n / 16 * 16 : n * (t + 1) / nt / 16 * 16;
#if defined(__x86_64__)
    total += avx2 ? sum_share_avx2(p, lo, hi) : sum_share<16>(p, lo, hi);
#else
    total += sum_share<16>(p, lo, hi);
#endif
  }
  return total;
}

// A 1 GiB buffer, 2 MiB aligned with transparent huge pages requested (TLB misses would blur
// the bandwidth), touched by every thread before timing.
struct BandwidthBuffer {
  static constexpr int64_t kWords = int64_t{1} << 27;
  uint64_t* p = nullptr;
  BandwidthBuffer() {
    p = static_cast<uint64_t*>(std::aligned_alloc(size_t{2} << 20, kWords * 8));
    TORCH_CHECK(p != nullptr, "bench: could not allocate the 1 GiB bandwidth buffer");
    ::madvise(p, kWords * 8, MADV_HUGEPAGE);
#pragma omp parallel for
    for (int64_t i = 0; i < kWords; ++i) p[i] = static_cast<uint64_t>(i);
  }
  ~BandwidthBuffer() { std::free(p); }
  BandwidthBuffer(const BandwidthBuffer&) = delete;
  BandwidthBuffer& operator=(const BandwidthBuffer&) = delete;
};

double read_bandwidth_gbs(const BandwidthBuffer& buffer) {
  const int threads = at::get_num_threads();
  volatile uint64_t keep = read_pass(buffer.p, BandwidthBuffer::kWords, threads);
  double best = 0;
  for (int i = 0; i < 3; ++i) {
    const auto t0 = Clock::now();
    keep = keep + read_pass(buffer.p, BandwidthBuffer::kWords, threads);
    const double sec = std::chrono::duration<double>(Clock::now() - t0).count();
    best = std::max(best, static_cast<double>(BandwidthBuffer::kWords) * 8 / sec / 1e9);
  }
  (void)keep;
  return best;
}

models::LlamaConfig shape_config(const std::string& shape, int64_t layers) {
  models::LlamaConfig c;
  if (shape == "7b") {
    // LLaMA-2-7B: the LlamaConfig defaults.
  } else if (shape == "tiny") {
    c = models::read_config(std::string(MSBNB_SOURCE_DIR) + "/models/msbnb-kjv-tiny");
  } else {
    c = models::read_config(shape);
  }
  c.quantization.reset();
  if (layers > 0) c.num_hidden_layers = std::min(layers, c.num_hidden_layers);
  return c;
}

// Each linear layer gets random normal(0, 0.02) weights, quantized as it is built: the float
// model never exists as a whole.
models::LinearFactory random_weights(const models::LinearFactory& inner, uint64_t seed) {
  auto counter = std::make_shared<uint64_t>(seed);
  return [inner, counter](const std::string& name, int64_t in, int64_t out, bool bias) {
    torch::nn::AnyModule m = inner(name, in, out, bias);
    auto gen = at::make_generator<at::CPUGeneratorImpl>((*counter)++);
    auto w = [&] { return at::normal(0.0, 0.02, {out, in}, gen); };
    if (auto* l4 = m.ptr()->as<nn::Linear4bitImpl>()) {
      l4->quantize_weights(w());
    } else if (auto* l8 = m.ptr()->as<nn::Linear8bitImpl>()) {
      l8->quantize_weights(w());
    } else if (auto* lin = m.ptr()->as<torch::nn::LinearImpl>()) {
      torch::NoGradGuard ng;
      lin->weight.copy_(w());
    }
    return m;
  };
}

struct Case {
  std::string format;
  int64_t weight_bytes = 0, linear_bytes = 0;
  double build_seconds = 0, bandwidth = 0, decode_tps = 0, prefill_tps = 0;
  // Beside transformers + bitsandbytes (--peer): their speeds, our logits against theirs
  // (max |difference| / max |their logit|) and how many greedy tokens agree before the first
  // difference.
  bool has_peer = false;
  double peer_decode_tps = 0, peer_prefill_tps = 0, logits_rel_diff = 0;
  int64_t greedy_agree = 0, greedy_total = 0;
  double bound_tps() const {
    return linear_bytes > 0 ? bandwidth * 1e9 / static_cast<double>(linear_bytes) : 0;
  }
};

}  // namespace

void add_bench(CLI::App& app) {
  struct Opts {
    std::string shape = "7b", model, formats = "nf4,int8";
    int64_t layers = 0, prefill = 128, decode = 32;
    std::string peer, paths = "auto,int8";
    bool json = false, short_mode = false, matmul = false;
    std::vector<std::string> matmul_args;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* c = app.add_subcommand("bench", "Whole-model decode / prefill speed against the bandwidth bound");
  c->add_option("--shape", o->shape, "7b | tiny | a checkpoint folder (its config.json) with random weights")
      ->capture_default_str();
  c->add_option("--model", o->model, "a checkpoint folder, with its own weights (instead of --shape)");
  c->add_option("--layers", o->layers, "decoder layers to build (0: the shape's; fewer for a quick run)");
  c->add_option("--formats", o->formats,
                "comma-separated: fp32 int8 int4 nf4 nf4-dq fp4 fp4-dq; stored (--model as it is)")
      ->capture_default_str();
  c->add_option("--prefill", o->prefill, "prompt tokens of the prefill case")->capture_default_str();
  c->add_option("--decode", o->decode, "tokens decoded per case")->capture_default_str();
  c->add_option("--paths", o->paths,
                "4-bit MatmulPaths to time, comma-separated: auto (exact) | fast | int8 (int8 activations)")
      ->capture_default_str();
  c->add_flag("--short", o->short_mode, "CI mode: the tiny shape, 8 decoded tokens, prefill 32");
  c->add_flag("--matmul", o->matmul,
              "run the matmul benchmark program instead (msbnb_bench_matmul; arguments after --)");
  c->add_option("matmul_args", o->matmul_args, "arguments of msbnb_bench_matmul (after --)");
  c->add_option("--peer", o->peer,
                "PREFIX of tools/bench_hf_tiny.py's output (PREFIX.safetensors, PREFIX.json): transformers + "
                "bitsandbytes on the same checkpoint, side by side (needs --model)");
  c->add_flag("--json", o->json, "machine-readable output");
  c->callback([o] {
    if (o->matmul) {
      // The matmul benchmark is its own program (bench/bench_matmul.cpp): find it beside this one,
      // in the build tree, or on PATH.
      namespace fs = std::filesystem;
      std::vector<std::string> where;
      std::error_code ec;
      const fs::path self = fs::read_symlink("/proc/self/exe", ec);
      if (!ec) where.push_back((self.parent_path() / "msbnb_bench_matmul").string());
      where.push_back(std::string(MSBNB_BINARY_DIR) + "/bench/msbnb_bench_matmul");
      std::string exe = "msbnb_bench_matmul";
      for (const auto& w : where)
        if (::access(w.c_str(), X_OK) == 0) exe = w;
      std::vector<std::string> args = {exe};
      if (o->matmul_args.empty()) args.push_back("--quick");
      args.insert(args.end(), o->matmul_args.begin(), o->matmul_args.end());
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      std::fflush(stdout);
      ::execvp(exe.c_str(), argv.data());
      TORCH_CHECK(false, "bench --matmul: could not run ", exe,
                  " (build the benchmarks: bash scripts/build.sh builds bench/)");
    }
    TORCH_CHECK(o->matmul_args.empty(), "bench: unexpected arguments (", o->matmul_args.front(),
                " ...): they are for --matmul only");
    if (o->short_mode) {
      if (o->model.empty()) o->shape = "tiny";
      o->decode = std::min<int64_t>(o->decode, 8);
      o->prefill = std::min<int64_t>(o->prefill, 32);
    }
    TORCH_CHECK(o->prefill >= 1 && o->prefill <= 65536, "--prefill: expected 1..65536, got ", o->prefill);
    TORCH_CHECK(o->decode >= 2 && o->decode <= 65536, "--decode: expected 2..65536, got ", o->decode);
    TORCH_CHECK(o->layers >= 0, "--layers: expected >= 0, got ", o->layers);
    std::vector<std::string> formats;
    {
      std::stringstream ss(o->formats);
      for (std::string f; std::getline(ss, f, ',');)
        if (!f.empty()) formats.push_back(f);
    }
    std::vector<std::string> paths;
    {
      std::stringstream ss(o->paths);
      for (std::string f; std::getline(ss, f, ',');)
        if (!f.empty()) paths.push_back(f);
    }
    TORCH_CHECK(!paths.empty(), "--paths: expected at least one path, got \"", o->paths, "\"");
    for (const auto& p : paths) models::parse_matmul_path(p, "--paths");
    TORCH_CHECK(!formats.empty(), "--formats: expected at least one format, got \"", o->formats, "\"");
    for (const auto& f : formats)
      if (f != "fp32" && f != "stored") parse_quantize_option(f);  // throws naming a bad one before any work

    const models::LlamaConfig cfg =
        o->model.empty() ? shape_config(o->shape, o->layers) : models::read_config(o->model);
    const BandwidthBuffer bw_buffer;
    std::vector<Case> cases;
    std::mt19937_64 rng(1);
    int64_t max_prefill = std::min(o->prefill, cfg.max_position_embeddings - 1);
    std::vector<int64_t> prompt(static_cast<size_t>(max_prefill));
    for (auto& t : prompt) t = static_cast<int64_t>(rng() % static_cast<uint64_t>(cfg.vocab_size));
    std::vector<int64_t> short_prompt(prompt.begin(), prompt.begin() + std::min<int64_t>(8, max_prefill));
    std::optional<io::SafetensorsFile> peer;
    nlohmann::json peer_json;
    auto ids_of = [](const torch::Tensor& t) {
      const auto ids = t.to(torch::kInt64).contiguous();
      return std::vector<int64_t>(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel());
    };
    if (!o->peer.empty()) {
      // The peer's own workload: its prompt, its number of new tokens, its prefill ids.
      TORCH_CHECK(!o->model.empty(), "--peer: expected --model (the checkpoint the peer ran), got none");
      peer.emplace(io::SafetensorsFile::open(o->peer + ".safetensors"));
      peer_json = nlohmann::json::parse(read_text_file(o->peer + ".json", "--peer"), nullptr, false);
      TORCH_CHECK(!peer_json.is_discarded() && peer_json.contains("variants"), "--peer: ", o->peer,
                  ".json: expected the JSON of tools/bench_hf_tiny.py");
      short_prompt = ids_of(peer->get("prompt_ids"));
      prompt = ids_of(peer->get("prefill_ids"));
      max_prefill = static_cast<int64_t>(prompt.size());
      o->decode = peer_json.value("new_tokens", o->decode);
    }
    if (!o->json)
      std::printf("msbnb bench: %s, %lld layers, hidden %lld, intermediate %lld, vocab %lld, %d threads\n\n",
                  o->model.empty() ? o->shape.c_str() : o->model.c_str(),
                  static_cast<long long>(cfg.num_hidden_layers), static_cast<long long>(cfg.hidden_size),
                  static_cast<long long>(cfg.intermediate_size), static_cast<long long>(cfg.vocab_size),
                  at::get_num_threads());
    for (const auto& f : formats) {
      Case k;
      k.format = f;
      const auto t0 = Clock::now();
      models::LlamaForCausalLM model{nullptr};
      const auto spec = f == "fp32" || f == "stored" ? std::nullopt : parse_quantize_option(f);
      {
        ProgressBar bar("build " + f);
        if (!o->model.empty()) {
          models::LoadOptions lo;
          lo.quantize = spec;
          lo.progress = bar.callback();
          model = models::load_pretrained(o->model, lo).model;
        } else {
          const auto base = spec ? models::quantized_linear_factory(*spec) : models::float_linear_factory();
          model = models::LlamaForCausalLM(cfg, random_weights(base, 42));
          model->eval();
        }
      }
      k.build_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
      k.weight_bytes = models::module_bytes(*model);
      k.linear_bytes = models::linear_bytes(*model);
      const Case base = k;
      for (const auto& path_name : paths) {
        const MatmulPath path = models::parse_matmul_path(path_name, "--paths");
        // Only the 4-bit layers have paths: the other formats run once.
        const int64_t layers4 = models::set_matmul_path(*model, path);
        if (layers4 == 0 && path_name != paths.front()) continue;
        k = base;
        if (layers4 > 0 && path != MatmulPath::automatic) k.format += " " + path_name;
        models::SamplingOptions s;
        s.max_new_tokens = o->decode;
        models::generate(*model, short_prompt, [&] {
          auto w = s;
          w.max_new_tokens = 2;
          return w;
        }());  // warm-up: first-touch of the weights, thread pool
        k.bandwidth = read_bandwidth_gbs(bw_buffer);
        k.decode_tps = models::generate(*model, short_prompt, s).decode_tokens_per_second();
        s.max_new_tokens = 1;
        k.prefill_tps = models::generate(*model, prompt, s).prefill_tokens_per_second();
        const std::string variant = f == "nf4-dq" ? "nf4" : f;
        if (peer && peer->has(variant + ".logits") && peer_json["variants"].contains(variant)) {
          const auto& v = peer_json["variants"][variant];
          k.has_peer = true;
          k.peer_decode_tps = v.value("decode_tokens_per_s", 0.0);
          k.peer_prefill_tps = v.value("prefill_tokens_per_s", 0.0);
          torch::NoGradGuard ng;
          const torch::Tensor theirs = peer->get(variant + ".logits").to(torch::kFloat32);
          const torch::Tensor ours =
              model->forward(torch::tensor(short_prompt).view({1, -1})).view_as(theirs);
          k.logits_rel_diff =
              (ours - theirs).abs().max().item<double>() / std::max(theirs.abs().max().item<double>(), 1e-30);
          models::SamplingOptions g;
          g.max_new_tokens = o->decode;
          const auto mine = models::generate(*model, short_prompt, g).tokens;
          const auto gen = ids_of(peer->get(variant + ".generated"));
          k.greedy_total = static_cast<int64_t>(gen.size() - short_prompt.size());
          while (k.greedy_agree < k.greedy_total && k.greedy_agree < static_cast<int64_t>(mine.size()) &&
                 mine[static_cast<size_t>(k.greedy_agree)] ==
                     gen[short_prompt.size() + static_cast<size_t>(k.greedy_agree)])
            ++k.greedy_agree;
        }
        cases.push_back(k);
        if (!o->json)
          std::fprintf(stderr, "  %s: built in %.1f s, decode %.2f tok/s\n", k.format.c_str(),
                       k.build_seconds, k.decode_tps);
      }
    }
    if (o->json) {
      nlohmann::json rows = nlohmann::json::array();
      for (const auto& k : cases)
        rows.push_back({{"format", k.format},
                        {"weight_bytes", k.weight_bytes},
                        {"bytes_read_per_token", k.linear_bytes},
                        {"read_bandwidth_GBs", k.bandwidth},
                        {"decode_tokens_per_second", k.decode_tps},
                        {"bound_tokens_per_second", k.bound_tps()},
                        {"fraction_of_bound", k.bound_tps() > 0 ? k.decode_tps / k.bound_tps() : 0},
                        {"prefill_tokens", max_prefill},
                        {"prefill_tokens_per_second", k.prefill_tps}});
      for (size_t i = 0; i < cases.size(); ++i) {
        const auto& k = cases[i];
        if (!k.has_peer) continue;
        rows[i]["peer"] = {{"decode_tokens_per_second", k.peer_decode_tps},
                           {"prefill_tokens_per_second", k.peer_prefill_tps},
                           {"logits_max_abs_diff_relative", k.logits_rel_diff},
                           {"greedy_tokens_agreeing", k.greedy_agree},
                           {"greedy_tokens", k.greedy_total}};
      }
      std::cout << nlohmann::json({{"shape", o->model.empty() ? o->shape : o->model},
                                   {"layers", cfg.num_hidden_layers},
                                   {"threads", at::get_num_threads()},
                                   {"cases", rows}})
                       .dump(2)
                << "\n";
      return;
    }
    std::printf("%-13s %10s %12s %9s %11s %11s %8s %13s\n", "format", "weights", "read/token", "bw GB/s",
                "decode t/s", "bound t/s", "% bound", "prefill t/s");
    for (const auto& k : cases) {
      std::printf("%-13s %10s %12s %9.1f %11.2f %11.2f %7.1f%% %13.1f\n", k.format.c_str(),
                  human_bytes(static_cast<double>(k.weight_bytes)).c_str(),
                  human_bytes(static_cast<double>(k.linear_bytes)).c_str(), k.bandwidth, k.decode_tps,
                  k.bound_tps(), 100.0 * k.decode_tps / k.bound_tps(), k.prefill_tps);
    }
    if (peer) {
      std::printf("\nbeside transformers %s + bitsandbytes %s (%s threads), same prompt, %lld new tokens:\n",
                  peer_json.value("transformers", "?").c_str(), peer_json.value("bitsandbytes", "?").c_str(),
                  peer_json.contains("threads") ? peer_json["threads"].dump().c_str() : "?",
                  static_cast<long long>(o->decode));
      std::printf("%-8s %11s %11s %8s %12s %12s %8s %14s %10s\n", "format", "decode t/s", "HF t/s", "ratio",
                  "prefill t/s", "HF prefill", "ratio", "logits diff", "greedy =");
      for (const auto& k : cases) {
        if (!k.has_peer) continue;
        std::printf("%-8s %11.1f %11.1f %7.2fx %12.1f %12.1f %7.2fx %14.2e %4lld/%-5lld\n", k.format.c_str(),
                    k.decode_tps, k.peer_decode_tps, k.decode_tps / k.peer_decode_tps, k.prefill_tps,
                    k.peer_prefill_tps, k.prefill_tps / k.peer_prefill_tps, k.logits_rel_diff,
                    static_cast<long long>(k.greedy_agree), static_cast<long long>(k.greedy_total));
      }
      std::printf(
          "(logits diff: max |ours - theirs| / max |theirs| over the prompt's positions; greedy =: tokens\n"
          " equal to theirs before the first difference)\n");
    }
    std::printf(
        "\n(\"nf4 int8\": the 4-bit layers with MatmulPath::int8, int8 activations per block as llama.cpp's "
        "q8;\n"
        " batch 1, greedy, KV cache; bound = read bandwidth measured just before the case / weight bytes\n"
        " read per token; prefill: one forward over %lld tokens)\n",
        static_cast<long long>(max_prefill));
  });
}

}  // namespace msbnb::cli
