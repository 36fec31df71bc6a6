// QLoRA on real text, side by side with full fine-tuning and fp32 LoRA.
//
// A small decoder-only LM (byte-level, vocabulary 256; pre-norm blocks of causal self-attention
// + MLP with RMSNorm; learned positions) is pretrained briefly in fp32 on the King James Bible
// (Debian's bible-kjv: `bible -f Gen1:1-Rev22:21`), then fine-tuned on another text every Debian
// machine has, /usr/share/common-licenses (each file's first 90 % trains, its last 10 % is held
// out for perplexity), four ways:
//   (a) full fp32 fine-tuning (every parameter, torch AdamW)
//   (b) fp32 LoRA on every projection of every block (torch AdamW on the adapters)
//   (c) QLoRA: each projection NF4 with double quantization (Linear4bit::from_linear, nf4,
//       compress_statistics) + LoRA, msbnb::optim::AdamW8bit
//   (d) (c) data parallel on 2 processes (msbnb::train::launch_local re-runs this program as 2
//       ranks on the loopback address; each trains on half of every batch; the LoRA gradients are
//       averaged by msbnb::train::DataParallel; only rank 0 reports)
// and prints held-out perplexity before and after, trainable parameters, weight + optimizer
// memory (bytes of the tensors), seconds per step; the goals; the peak training memory
// of a QLoRA step with and without activation checkpointing (msbnb::train::checkpoint per
// block, counted by msbnb::train::CpuMemoryCounter); and where the step time goes (Linear4bit
// against torch's fp32 Linear at the model's shapes). Loss curves go to an SVG (--svg PATH).
//
// Modes: --short (default; tiny sizes, well under a minute on 2 cores, the test runs it) and
// --full (the sizes of docs/qlora.md). Exit status: 0; 1 if a check fails (training loss does
// not fall, a LoRA run does not improve held-out perplexity, the 2-process run's adapters differ
// between ranks); 77 if the bible is not installed (`bash scripts/setup.sh` installs it).
//
// LoRA: msbnb::lora::LoRALinear / Linear4bitWithLoRA (r = 8, alpha = 16, A Kaiming-uniform, B zero,
// PEFT's layout) on q/k/v/o/up/down of every block; msbnb::lora::freeze_model_except_lora.
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "msbnb/lora/lora.h"
#include "msbnb/nn/linear.h"
#include "msbnb/optim/optim8bit.h"
#include "msbnb/train/checkpoint.h"
#include "msbnb/train/distributed.h"
#include "msbnb/train/memory.h"

namespace {

namespace tnn = torch::nn;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct Sizes {
  int64_t d = 64, layers = 2, heads = 4, context = 64, batch = 16, r = 8;
  int64_t pretrain_steps = 100, finetune_steps = 40, eval_windows = 48;
  double pretrain_lr = 3e-3, full_lr = 1e-3, lora_lr = 3e-3;
};

// ---------------------------------------------------------------------------------------------
// Data

std::string bible_text() {
  FILE* p = popen("bible -f Gen1:1-Rev22:21 2>/dev/null", "r");
  if (p == nullptr) return {};
  std::string out, line;
  char buf[1 << 16];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  pclose(p);
  // Each line is "Ge1:1 In the beginning ...": drop the reference.
  std::istringstream in(out);
  std::string text;
  while (std::getline(in, line)) {
    const auto sp = line.find(' ');
    if (sp == std::string::npos) continue;
    text += line.substr(sp + 1);
    text += '\n';
  }
  return text;
}

// Every file of /usr/share/common-licenses once (GPL -> GPL-3 etc. are links), sorted: the first
// 90 % of each trains, the last 10 % is held out.
void license_texts(std::string& train, std::string& held_out) {
  std::set<fs::path> seen;
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator("/usr/share/common-licenses")) {
    const fs::path real = fs::canonical(e.path());
    if (fs::is_regular_file(real) && seen.insert(real).second) files.push_back(real);
  }
  std::sort(files.begin(), files.end());
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const size_t cut = s.size() * 9 / 10;
    train += s.substr(0, cut);
    held_out += s.substr(cut);
  }
}

torch::Tensor bytes_tensor(const std::string& s) {
  auto t = torch::empty({static_cast<int64_t>(s.size())}, torch::kLong);
  auto* p = t.data_ptr<int64_t>();
  for (size_t i = 0; i < s.size(); ++i) p[i] = static_cast<unsigned char>(s[i]);
  return t;
}

// Random windows of context + 1 bytes; the same seed gives every run the same batches.
struct Sampler {
  torch::Tensor data;
  int64_t context, batch;
  std::mt19937_64 rng;
  Sampler(torch::Tensor d, int64_t c, int64_t b, uint64_t seed)
      : data(std::move(d)), context(c), batch(b), rng(seed) {}
  std::pair<torch::Tensor, torch::Tensor> next() {
    std::uniform_int_distribution<int64_t> pick(0, data.size(0) - context - 2);
    std::vector<torch::Tensor> rows;
    for (int64_t i = 0; i < batch; ++i) rows.push_back(data.narrow(0, pick(rng), context + 1));
    auto w = torch::stack(rows);
    return {w.narrow(1, 0, context), w.narrow(1, 1, context)};
  }
};

// ---------------------------------------------------------------------------------------------
// Model

enum class Kind { fp32, lora, qlora };

// Pre-norm block. Its projections are children held in a name -> AnyModule map (no Linear
// fields), so a variant can put any layer there.
struct BlockImpl : tnn::Module {
  BlockImpl(const Sizes& s) : d(s.d), heads(s.heads) {
    norm1 = register_parameter("norm1", torch::ones({d}));
    norm2 = register_parameter("norm2", torch::ones({d}));
    for (const auto& [name, in, out] : shapes(s)) {
      set_proj(name, tnn::AnyModule(tnn::Linear(tnn::LinearOptions(in, out).bias(false))));
    }
  }
  static std::vector<std::tuple<std::string, int64_t, int64_t>> shapes(const Sizes& s) {
    return {{"q_proj", s.d, s.d}, {"k_proj", s.d, s.d},      {"v_proj", s.d, s.d},
            {"o_proj", s.d, s.d}, {"up_proj", s.d, 4 * s.d}, {"down_proj", 4 * s.d, s.d}};
  }
  void set_proj(const std::string& name, tnn::AnyModule m) {
    if (proj.count(name) != 0) {
      replace_module(name, m.ptr());
    } else {
      register_module(name, m.ptr());
    }
    proj[name] = std::move(m);
  }
  static torch::Tensor rms(const torch::Tensor& x, const torch::Tensor& w) {
    return x * torch::rsqrt(x.pow(2).mean(-1, true) + 1e-6) * w;
  }
  torch::Tensor forward(const torch::Tensor& x) {
    const int64_t b = x.size(0), t = x.size(1), hd = d / heads;
    auto h = rms(x, norm1);
    auto split = [&](const torch::Tensor& y) { return y.view({b, t, heads, hd}).transpose(1, 2); };
    auto q = split(proj["q_proj"].forward(h)), k = split(proj["k_proj"].forward(h));
    auto v = split(proj["v_proj"].forward(h));
    auto scores = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(hd));
    auto mask = torch::ones({t, t}, torch::kBool).triu(1);
    auto att = torch::softmax(scores.masked_fill(mask, -1e9), -1);
    auto x1 = x + proj["o_proj"].forward(torch::matmul(att, v).transpose(1, 2).reshape({b, t, d}));
    return x1 + proj["down_proj"].forward(torch::gelu(proj["up_proj"].forward(rms(x1, norm2))));
  }
  int64_t d, heads;
  torch::Tensor norm1, norm2;
  std::map<std::string, tnn::AnyModule> proj;
};
TORCH_MODULE(Block);

struct LMImpl : tnn::Module {
  explicit LMImpl(const Sizes& s) {
    tok = register_module("tok_emb", tnn::Embedding(256, s.d));
    pos = register_parameter("pos_emb", torch::randn({s.context, s.d}) * 0.02);
    blocks = register_module("blocks", tnn::ModuleList());
    for (int64_t i = 0; i < s.layers; ++i) {
      block_list.emplace_back(s);
      blocks->push_back(block_list.back());
    }
    norm = register_parameter("norm", torch::ones({s.d}));
    lm_head = register_module("lm_head", tnn::Linear(tnn::LinearOptions(s.d, 256).bias(false)));
  }
  torch::Tensor forward(const torch::Tensor& ids, bool checkpointing = false) {
    auto h = tok(ids) + pos.narrow(0, 0, ids.size(1));
    for (auto& blk : block_list) {
      if (checkpointing) {
        h = msbnb::train::checkpoint([&blk](const torch::Tensor& x) { return blk->forward(x); }, h);
      } else {
        h = blk->forward(h);
      }
    }
    return lm_head(BlockImpl::rms(h, norm));
  }
  tnn::Embedding tok{nullptr};
  torch::Tensor pos, norm;
  tnn::ModuleList blocks{nullptr};
  std::vector<Block> block_list;
  tnn::Linear lm_head{nullptr};
};
TORCH_MODULE(LM);

// A copy of the pretrained fp32 model `src` as variant `kind`: fp32 (all trainable), LoRA on
// every projection over fp32 bases, or over NF4 + double-quantized bases. Everything but the
// adapters is frozen in the LoRA variants.
LM make_variant(const LM& src, const Sizes& s, Kind kind) {
  LM m(s);
  {
    torch::NoGradGuard g;
    auto dst = m->named_parameters();
    for (const auto& p : src->named_parameters()) dst[p.key()].copy_(p.value());
  }
  if (kind == Kind::fp32) return m;
  const auto cfg = msbnb::lora::LoraConfig().r(s.r).lora_alpha(2.0 * static_cast<double>(s.r));
  for (auto& blk : m->block_list) {
    for (const auto& [name, in, out] : BlockImpl::shapes(s)) {
      auto linear = std::dynamic_pointer_cast<tnn::LinearImpl>(blk->proj[name].ptr());
      if (kind == Kind::lora) {
        blk->set_proj(name, tnn::AnyModule(msbnb::lora::LoRALinear::from_linear(tnn::Linear(linear), cfg)));
      } else {
        blk->set_proj(
            name, tnn::AnyModule(msbnb::lora::Linear4bitWithLoRA::from_linear(
                      tnn::Linear(linear), cfg,
                      msbnb::nn::Linear4bitOptions(in, out).quant_type("nf4").compress_statistics(true).bias(
                          false))));
      }
    }
  }
  msbnb::lora::freeze_model_except_lora(*m);
  return m;
}

std::vector<torch::Tensor> trainable(const tnn::Module& m) {
  std::vector<torch::Tensor> out;
  for (const auto& p : m.parameters()) {
    if (p.requires_grad()) out.push_back(p);
  }
  return out;
}
int64_t numel(const std::vector<torch::Tensor>& ts) {
  int64_t n = 0;
  for (const auto& t : ts) n += t.numel();
  return n;
}

torch::Tensor lm_loss(LM& m, const torch::Tensor& x, const torch::Tensor& y, bool ckpt = false) {
  auto logits = m->forward(x, ckpt);
  return torch::cross_entropy_loss(logits.reshape({-1, 256}), y.reshape({-1}));
}

// Held-out perplexity: exp(mean NLL) over consecutive windows of the held-out bytes.
double perplexity(LM& m, const torch::Tensor& data, const Sizes& s) {
  torch::NoGradGuard g;
  m->eval();
  const int64_t windows = std::min<int64_t>(s.eval_windows, (data.size(0) - 1) / s.context);
  double nll = 0;
  for (int64_t w0 = 0; w0 < windows; w0 += s.batch) {
    const int64_t nb = std::min(s.batch, windows - w0);
    std::vector<torch::Tensor> xs, ys;
    for (int64_t i = 0; i < nb; ++i) {
      xs.push_back(data.narrow(0, (w0 + i) * s.context, s.context));
      ys.push_back(data.narrow(0, (w0 + i) * s.context + 1, s.context));
    }
    auto logits = m->forward(torch::stack(xs));
    nll += torch::cross_entropy_loss(logits.reshape({-1, 256}), torch::stack(ys).reshape({-1}), {},
                                     at::Reduction::Sum)
               .item<double>();
  }
  m->train();
  return std::exp(nll / static_cast<double>(windows * s.context));
}

struct RunResult {
  std::string name;
  double ppl_before = 0, ppl_after = 0, step_seconds = 0;
  int64_t trainable = 0, weight_bytes = 0, optimizer_bytes = 0;
  std::vector<double> losses;
};

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Fine-tunes `m` on `train` for s.finetune_steps; with a DataParallel, on this rank's shard of
// each batch.
RunResult finetune(const std::string& name, LM& m, Kind kind, const Sizes& s, const torch::Tensor& train,
                   const torch::Tensor& held_out, msbnb::train::DataParallel* dp = nullptr) {
  RunResult r;
  r.name = name;
  r.ppl_before = perplexity(m, held_out, s);
  auto params = trainable(*m);
  r.trainable = numel(params);
  std::unique_ptr<torch::optim::Optimizer> opt;
  const double lr = kind == Kind::fp32 ? s.full_lr : s.lora_lr;
  if (kind == Kind::qlora) {
    // min_8bit_size 256: the adapters of this small model have 512 - 4096 elements, below
    // bitsandbytes' default 4096 every state would stay float32.
    opt = std::make_unique<msbnb::optim::AdamW8bit>(
        params, msbnb::optim::AdamW8bitOptions().lr(lr).weight_decay(0.0).min_8bit_size(256));
  } else {
    opt = std::make_unique<torch::optim::AdamW>(params, torch::optim::AdamWOptions(lr).weight_decay(0.0));
  }
  Sampler sampler(train, s.context, s.batch, 1234);
  std::vector<double> times;
  const bool main = dp == nullptr || dp->is_main_process();
  for (int64_t step = 0; step < s.finetune_steps; ++step) {
    auto [x, y] = sampler.next();
    const auto t0 = Clock::now();
    opt->zero_grad();
    torch::Tensor loss;
    if (dp != nullptr) {
      loss = lm_loss(m, msbnb::train::shard_batch(x, dp->rank(), dp->world_size()),
                     msbnb::train::shard_batch(y, dp->rank(), dp->world_size()));
      loss.backward();
      dp->synchronize_gradients();
    } else {
      loss = lm_loss(m, x, y);
      loss.backward();
    }
    opt->step();
    times.push_back(seconds_since(t0));
    double l = loss.item<double>();
    if (dp != nullptr) {  // the curve shows the whole batch's loss
      auto t = torch::tensor({l}, torch::kFloat64);
      dp->group().all_reduce_sum(t, "loss");
      l = t.item<double>() / static_cast<double>(dp->world_size());
    }
    r.losses.push_back(l);
    if (main && (step % std::max<int64_t>(1, s.finetune_steps / 5) == 0 || step + 1 == s.finetune_steps)) {
      std::printf("  [%s] step %3lld/%lld  loss %.4f  %.3f s/step\n", name.c_str(),
                  static_cast<long long>(step + 1), static_cast<long long>(s.finetune_steps), l,
                  times.back());
      std::fflush(stdout);
    }
  }
  times.erase(times.begin(), times.begin() + std::min<size_t>(3, times.size() / 2));  // warm-up
  r.step_seconds = median(times);
  r.ppl_after = perplexity(m, held_out, s);
  r.weight_bytes = msbnb::train::module_bytes(*m).total();
  r.optimizer_bytes = msbnb::train::optimizer_state_bytes(*opt);
  return r;
}

// ---------------------------------------------------------------------------------------------
// Output

std::string human(int64_t bytes) {
  std::ostringstream o;
  o << std::fixed << std::setprecision(bytes >= 10 << 20 ? 1 : 2);
  if (bytes >= 1 << 20) {
    o << bytes / 1048576.0 << " MiB";
  } else {
    o << bytes / 1024.0 << " KiB";
  }
  return o.str();
}

void write_svg(const std::string& path, const std::vector<RunResult>& runs) {
  const double W = 720, H = 420, L = 60, R = 170, T = 30, B = 50;
  double lo = 1e9, hi = -1e9;
  size_t n = 1;
  for (const auto& r : runs) {
    for (double v : r.losses) lo = std::min(lo, v), hi = std::max(hi, v);
    n = std::max(n, r.losses.size());
  }
  if (hi <= lo) hi = lo + 1;
  auto X = [&](size_t i) { return L + (W - L - R) * static_cast<double>(i) / std::max<double>(1, n - 1); };
  auto Y = [&](double v) { return T + (H - T - B) * (hi - v) / (hi - lo); };
  const char* colors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"};
  std::ostringstream s;
  s << std::fixed << std::setprecision(1);
  s << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
    << "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" "
       "fill=\"white\"/>\n"
    << "<text x=\"" << L
    << "\" y=\"18\" font-size=\"14\">Fine-tuning on common-licenses: training loss (nats/byte)"
    << " vs step</text>\n";
  for (int k = 0; k <= 4; ++k) {
    const double v = lo + (hi - lo) * k / 4.0;
    s << "<line x1=\"" << L << "\" x2=\"" << W - R << "\" y1=\"" << Y(v) << "\" y2=\"" << Y(v)
      << "\" stroke=\"#ddd\"/>\n<text x=\"" << L - 6 << "\" y=\"" << Y(v) + 4 << "\" text-anchor=\"end\">"
      << std::setprecision(2) << v << std::setprecision(1) << "</text>\n";
  }
  for (int k = 0; k <= 4; ++k) {
    const size_t i = (n - 1) * k / 4;
    s << "<text x=\"" << X(i) << "\" y=\"" << H - B + 18 << "\" text-anchor=\"middle\">" << i + 1
      << "</text>\n";
  }
  s << "<text x=\"" << (L + W - R) / 2 << "\" y=\"" << H - 12 << "\" text-anchor=\"middle\">step</text>\n";
  s << "<rect x=\"" << L << "\" y=\"" << T << "\" width=\"" << W - L - R << "\" height=\"" << H - T - B
    << "\" fill=\"none\" stroke=\"#333\"/>\n";
  for (size_t k = 0; k < runs.size(); ++k) {
    s << "<polyline fill=\"none\" stroke-width=\"1.5\" stroke=\"" << colors[k % 5] << "\" points=\"";
    for (size_t i = 0; i < runs[k].losses.size(); ++i) s << X(i) << "," << Y(runs[k].losses[i]) << " ";
    s << "\"/>\n<line x1=\"" << W - R + 10 << "\" x2=\"" << W - R + 30 << "\" y1=\"" << T + 10 + 18 * k
      << "\" y2=\"" << T + 10 + 18 * k << "\" stroke=\"" << colors[k % 5]
      << "\" stroke-width=\"2\"/>\n<text x=\"" << W - R + 35 << "\" y=\"" << T + 14 + 18 * k << "\">"
      << runs[k].name << "</text>\n";
  }
  s << "</svg>\n";
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f << s.str();
    TORCH_CHECK(f.good(), "--svg: could not write ", tmp);
  }
  fs::rename(tmp, path);
}

// Seconds of forward + backward (grad of x only: the weight is frozen) of one projection, fp32
// torch Linear against Linear4bit nf4, at [rows, in] -> [rows, out].
std::pair<double, double> time_projection(int64_t rows, int64_t in, int64_t out, int reps) {
  tnn::Linear f(tnn::LinearOptions(in, out).bias(false));
  f->weight.requires_grad_(false);
  auto q = msbnb::nn::Linear4bit::from_linear(
      f, msbnb::nn::Linear4bitOptions(in, out).quant_type("nf4").compress_statistics(true).bias(false));
  auto x = torch::randn({rows, in}, torch::requires_grad());
  auto g = torch::randn({rows, out});
  auto timeit = [&](auto&& layer) {
    std::vector<double> ts;
    for (int i = 0; i < reps + 2; ++i) {
      const auto t0 = Clock::now();
      layer(x).backward(g);
      ts.push_back(seconds_since(t0));
      x.mutable_grad() = torch::Tensor();
    }
    return median(ts);
  };
  return {timeit([&](const torch::Tensor& t) { return f(t); }),
          timeit([&](const torch::Tensor& t) { return q(t); })};
}

struct Args {
  bool full = false, ddp_worker = false;
  std::string svg = "qlora_loss.svg", state, result;
  int64_t threads = 2;
};

Sizes sizes_for(bool full) {
  Sizes s;
  if (full) {
    s.d = 128;
    s.layers = 4;
    s.context = 64;
    s.batch = 16;
    s.pretrain_steps = 250;
    s.finetune_steps = 60;
    s.eval_windows = 370;
  }
  return s;
}

// Rank of the 2-process run: loads the pretrained model, runs QLoRA on its shard, rank 0 writes
// the result. Returns the exit status.
int ddp_worker(const Args& a, const torch::Tensor& train, const torch::Tensor& held_out) {
  const Sizes s = sizes_for(a.full);
  at::set_num_threads(1);  // 2 processes on 2 cores
  auto pg = msbnb::train::ProcessGroup::from_env();
  LM base(s);
  {
    std::vector<torch::Tensor> ts;
    torch::load(ts, a.state);
    torch::NoGradGuard g;
    auto ps = base->parameters();
    TORCH_CHECK(ts.size() == ps.size(), "--state: expected ", ps.size(), " tensors, got ", ts.size());
    for (size_t i = 0; i < ps.size(); ++i) ps[i].copy_(ts[i]);
  }
  LM m = make_variant(base, s, Kind::qlora);
  msbnb::train::DataParallel dp(pg, *m);
  RunResult r = finetune("(d) QLoRA, 2 processes", m, Kind::qlora, s, train, held_out, &dp);
  // Every rank must end with the same adapters: compare a checksum.
  double sum = 0;
  for (const auto& p : dp.parameters()) sum += p.to(torch::kFloat64).abs().sum().item<double>();
  auto t = torch::tensor({sum}, torch::kFloat64);
  pg.all_reduce_sum(t, "checksum");
  const bool same = t.item<double>() == 2 * sum;  // bitwise equal adapters give exactly twice
  if (pg.is_main_process()) {
    std::ofstream f(a.result);
    f << std::setprecision(17) << r.ppl_before << " " << r.ppl_after << " " << r.step_seconds << " "
      << r.trainable << " " << r.weight_bytes << " " << r.optimizer_bytes << " " << (same ? 1 : 0) << " "
      << r.losses.size();
    for (double l : r.losses) f << " " << l;
    f << "\n";
  }
  pg.barrier();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      TORCH_CHECK(i + 1 < argc, arg, ": expected a value after it");
      return argv[++i];
    };
    if (arg == "--full") {
      a.full = true;
    } else if (arg == "--short") {
      a.full = false;
    } else if (arg == "--svg") {
      a.svg = value();
    } else if (arg == "--threads") {
      a.threads = std::stoll(value());
    } else if (arg == "--ddp-worker") {
      a.ddp_worker = true;
    } else if (arg == "--state") {
      a.state = value();
    } else if (arg == "--result") {
      a.result = value();
    } else {
      std::cerr << "usage: qlora_training [--short | --full] [--svg PATH] [--threads N]\n";
      return 2;
    }
  }
  const auto t_start = Clock::now();
  std::string lic_train_s, lic_held_s;
  license_texts(lic_train_s, lic_held_s);
  const torch::Tensor lic_train = bytes_tensor(lic_train_s), lic_held = bytes_tensor(lic_held_s);
  if (a.ddp_worker) return ddp_worker(a, lic_train, lic_held);

  at::set_num_threads(static_cast<int>(a.threads));
  const Sizes s = sizes_for(a.full);
  const std::string bible = bible_text();
  if (bible.size() < 100000) {
    std::cerr
        << "the King James text is missing (`bible` from Debian's bible-kjv): run `bash scripts/setup.sh`"
        << " as root; skipping\n";
    return 77;
  }
  std::printf(
      "qlora_training (%s): d=%lld, %lld blocks, %lld heads, context %lld, batch %lld, LoRA r=%lld on "
      "every projection; %d threads\n",
      a.full ? "full" : "short", static_cast<long long>(s.d), static_cast<long long>(s.layers),
      static_cast<long long>(s.heads), static_cast<long long>(s.context), static_cast<long long>(s.batch),
      static_cast<long long>(s.r), at::get_num_threads());
  std::printf("data: King James Bible %zu bytes; common-licenses %zu bytes to train, %zu held out\n",
              bible.size(), lic_train_s.size(), lic_held_s.size());

  // ---- pretraining, fp32, on the Bible
  torch::manual_seed(0);
  LM base(s);
  {
    torch::optim::AdamW opt(base->parameters(), torch::optim::AdamWOptions(s.pretrain_lr).weight_decay(0.0));
    Sampler sampler(bytes_tensor(bible), s.context, s.batch, 42);
    const auto t0 = Clock::now();
    double first = 0, last = 0;
    for (int64_t step = 0; step < s.pretrain_steps; ++step) {
      auto [x, y] = sampler.next();
      opt.zero_grad();
      auto loss = lm_loss(base, x, y);
      loss.backward();
      opt.step();
      last = loss.item<double>();
      if (step == 0) first = last;
      if (step % std::max<int64_t>(1, s.pretrain_steps / 5) == 0 || step + 1 == s.pretrain_steps) {
        std::printf("  [pretrain] step %4lld/%lld  loss %.4f  (%.1f s)\n", static_cast<long long>(step + 1),
                    static_cast<long long>(s.pretrain_steps), last, seconds_since(t0));
        std::fflush(stdout);
      }
    }
    std::printf("pretrained in %.1f s: loss %.3f -> %.3f nats/byte\n", seconds_since(t0), first, last);
    if (!(last < first)) {
      std::printf("CHECK FAILED: pretraining loss did not fall\n");
      return 1;
    }
  }

  // ---- the four fine-tuning runs
  std::vector<RunResult> runs;
  {
    LM m = make_variant(base, s, Kind::fp32);
    runs.push_back(finetune("(a) full fp32", m, Kind::fp32, s, lic_train, lic_held));
  }
  {
    LM m = make_variant(base, s, Kind::lora);
    runs.push_back(finetune("(b) fp32 LoRA", m, Kind::lora, s, lic_train, lic_held));
  }
  LM qlora = make_variant(base, s, Kind::qlora);
  runs.push_back(finetune("(c) QLoRA", qlora, Kind::qlora, s, lic_train, lic_held));

  bool ddp_ok = false;
  {
    const fs::path dir = fs::temp_directory_path() / ("msbnb_qlora_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    const std::string state = (dir / "pretrained.pt").string(), result = (dir / "rank0.txt").string();
    torch::save(base->parameters(), state);
    std::vector<std::string> args = {
        "--ddp-worker", a.full ? "--full" : "--short", "--state", state, "--result", result};
    std::printf("  [(d) QLoRA, 2 processes] launching 2 ranks on 127.0.0.1\n");
    std::fflush(stdout);
    const auto launch =
        msbnb::train::launch_local("/proc/self/exe", args, msbnb::train::LaunchOptions().world_size(2));
    std::ifstream f(result);
    RunResult r;
    r.name = "(d) QLoRA, 2 processes";
    int same = 0;
    size_t n = 0;
    if (launch.ok() && f >> r.ppl_before >> r.ppl_after >> r.step_seconds >> r.trainable >> r.weight_bytes >>
                           r.optimizer_bytes >> same >> n) {
      r.losses.resize(n);
      for (auto& l : r.losses) f >> l;
      ddp_ok = same == 1 && static_cast<bool>(f);
      runs.push_back(r);
    } else {
      std::printf("CHECK FAILED: the 2-process run failed (exit codes %d %d)\n", launch.exit_codes.at(0),
                  launch.exit_codes.at(1));
    }
    fs::remove_all(dir);
  }

  // ---- the table
  std::printf("\n%-24s %10s %10s %11s %12s %12s %12s %10s\n", "run", "ppl before", "ppl after", "trainable",
              "weights", "optimizer", "w + opt", "s/step");
  for (const auto& r : runs) {
    std::printf("%-24s %10.3f %10.3f %11lld %12s %12s %12s %10.4f\n", r.name.c_str(), r.ppl_before,
                r.ppl_after, static_cast<long long>(r.trainable), human(r.weight_bytes).c_str(),
                human(r.optimizer_bytes).c_str(), human(r.weight_bytes + r.optimizer_bytes).c_str(),
                r.step_seconds);
  }
  std::printf(
      "(bytes: every parameter and buffer of the model, and every optimizer state tensor; s/step: median"
      " wall time of a step; (d): 2 processes x 1 thread, half the batch each)\n");

  // ---- the goals
  const RunResult &lora = runs[1], &q = runs[2];
  const double lora_gain = runs[1].ppl_before - lora.ppl_after;
  const double q_gain_common = lora.ppl_before - q.ppl_after;  // from the same fp32 start
  const double q_gain_own = q.ppl_before - q.ppl_after;        // from the quantized start
  const double mem_ratio = static_cast<double>(q.weight_bytes) / static_cast<double>(lora.weight_bytes);
  const double time_ratio = q.step_seconds / lora.step_seconds;
  std::printf("\ngoals (QLoRA against fp32 LoRA):\n");
  std::printf(
      "  perplexity improvement >= 90 %%: %.1f %% from the fp32 model's %.3f (%.1f %% from the quantized "
      "model's own %.3f) -> %s\n",
      100 * q_gain_common / lora_gain, lora.ppl_before, 100 * q_gain_own / lora_gain, q.ppl_before,
      q_gain_common >= 0.9 * lora_gain ? "met" : "NOT met");
  std::printf("  weight memory <= 35 %%: %.1f %% (%s vs %s) -> %s\n", 100 * mem_ratio,
              human(q.weight_bytes).c_str(), human(lora.weight_bytes).c_str(),
              mem_ratio <= 0.35 ? "met" : "NOT met");
  std::printf("  step time <= 1.2x: %.2fx (%.4f vs %.4f s) -> %s\n", time_ratio, q.step_seconds,
              lora.step_seconds, time_ratio <= 1.2 ? "met" : "NOT met");

  // ---- where QLoRA's step time goes: one projection of each shape, fp32 Linear vs Linear4bit
  std::printf(
      "\nforward + backward (grad of x) of one projection at %lld rows, median of 10 (fp32 torch Linear vs "
      "Linear4bit nf4):\n",
      static_cast<long long>(s.batch * s.context));
  for (const auto& [in, out] :
       std::vector<std::pair<int64_t, int64_t>>{{s.d, s.d}, {s.d, 4 * s.d}, {4 * s.d, s.d}}) {
    const auto [tf, tq] = time_projection(s.batch * s.context, in, out, 10);
    std::printf("  %4lld -> %4lld: fp32 %.3f ms, nf4 %.3f ms (%.2fx)\n", static_cast<long long>(in),
                static_cast<long long>(out), tf * 1e3, tq * 1e3, tq / tf);
  }

  // ---- activation checkpointing: peak memory of one QLoRA step
  {
    Sampler sampler(lic_train, s.context, s.batch, 99);
    auto [x, y] = sampler.next();
    auto step_peak = [&](bool ckpt) {
      for (auto& p : qlora->parameters()) p.mutable_grad() = torch::Tensor();
      msbnb::train::CpuMemoryCounter counter;
      const auto t0 = Clock::now();
      lm_loss(qlora, x, y, ckpt).backward();
      return std::make_pair(counter.peak_bytes(), seconds_since(t0));
    };
    step_peak(false);  // warm-up
    const auto [plain, t_plain] = step_peak(false);
    const auto [ck, t_ck] = step_peak(true);
    std::printf(
        "\nQLoRA forward + backward, peak memory beyond weights and optimizer (counted CPU allocations):\n"
        "  without checkpointing %s (%.4f s), with checkpointing per block %s (%.4f s)\n",
        human(plain).c_str(), t_plain, human(ck).c_str(), t_ck);
    std::printf(
        "  training memory with checkpointing: weights %s + optimizer %s + activations/gradients %s = %s\n",
        human(q.weight_bytes).c_str(), human(q.optimizer_bytes).c_str(), human(ck).c_str(),
        human(q.weight_bytes + q.optimizer_bytes + ck).c_str());
  }

  write_svg(a.svg, runs);
  std::printf("\nloss curves: %s\ntotal %.1f s\n", a.svg.c_str(), seconds_since(t_start));

  // ---- checks
  int status = 0;
  for (const auto& r : runs) {
    const size_t k = std::max<size_t>(1, r.losses.size() / 4);
    double head = 0, tail = 0;
    for (size_t i = 0; i < k; ++i) head += r.losses[i], tail += r.losses[r.losses.size() - 1 - i];
    if (!(tail < head)) {
      std::printf("CHECK FAILED: %s: training loss did not fall\n", r.name.c_str());
      status = 1;
    }
    if (!(r.ppl_after < r.ppl_before)) {
      std::printf("CHECK FAILED: %s: held-out perplexity did not improve\n", r.name.c_str());
      status = 1;
    }
  }
  if (!ddp_ok) {
    std::printf("CHECK FAILED: the 2-process run did not finish with equal adapters on both ranks\n");
    status = 1;
  }
  return status;
}
