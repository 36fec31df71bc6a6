// Real data: an MLP 784-256-128-10 trained on Fashion-MNIST (fixed seed, a few epochs), then
// converted with INT8, INT4 (group 128), NF4 and NF4 + double quantization; test accuracy of
// each beside FP32.
//
// Data: the idx files of the Debian package dataset-fashion-mnist (gzipped, read with zlib) in
// /usr/share/datasets/fashion-mnist, or the folder given as argv[1] / $MSBNB_FASHION_MNIST_DIR.
// Exit status: 0; 1 if INT8 loses more than 0.3 points of accuracy against FP32 or NF4 more
// than 1.5 (the regressions CI catches); 77 (ctest's skip) if the data is missing.
#include <torch/torch.h>
#include <zlib.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <iomanip>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "msbnb/convert/convert.h"

namespace {

namespace tnn = torch::nn;

std::vector<uint8_t> read_gz(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr) throw std::runtime_error("cannot open " + path);
  std::vector<uint8_t> out;
  std::vector<uint8_t> chunk(1 << 20);
  int n = 0;
  while ((n = gzread(f, chunk.data(), static_cast<unsigned>(chunk.size()))) > 0) {
    out.insert(out.end(), chunk.begin(), chunk.begin() + n);
  }
  const bool failed = n < 0;
  gzclose(f);
  if (failed) throw std::runtime_error("cannot decompress " + path);
  return out;
}

uint32_t be32(const std::vector<uint8_t>& b, size_t at) {
  return (uint32_t{b[at]} << 24) | (uint32_t{b[at + 1]} << 16) | (uint32_t{b[at + 2]} << 8) |
         uint32_t{b[at + 3]};
}

// idx3 images -> float32 [n, 784] in [0, 1]; idx1 labels -> int64 [n]. Sizes checked.
torch::Tensor read_images(const std::string& path) {
  const auto b = read_gz(path);
  if (b.size() < 16 || be32(b, 0) != 0x803) throw std::runtime_error(path + ": not an idx3 ubyte file");
  const int64_t n = be32(b, 4), rows = be32(b, 8), cols = be32(b, 12);
  if (rows != 28 || cols != 28 || b.size() != static_cast<size_t>(16 + n * rows * cols)) {
    throw std::runtime_error(path + ": expected n x 28 x 28 bytes after the header");
  }
  auto t = torch::from_blob(const_cast<uint8_t*>(b.data()) + 16, {n, rows * cols}, torch::kUInt8);
  return t.to(torch::kFloat32).div_(255.0);
}

torch::Tensor read_labels(const std::string& path) {
  const auto b = read_gz(path);
  if (b.size() < 8 || be32(b, 0) != 0x801) throw std::runtime_error(path + ": not an idx1 ubyte file");
  const int64_t n = be32(b, 4);
  if (b.size() != static_cast<size_t>(8 + n)) throw std::runtime_error(path + ": expected n label bytes");
  return torch::from_blob(const_cast<uint8_t*>(b.data()) + 8, {n}, torch::kUInt8).to(torch::kInt64);
}

double accuracy(tnn::Sequential& model, const torch::Tensor& x, const torch::Tensor& y) {
  torch::NoGradGuard no_grad;
  const auto pred = model->forward(x).argmax(1);
  return 100.0 * pred.eq(y).sum().item<double>() / static_cast<double>(y.size(0));
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = "/usr/share/datasets/fashion-mnist";
  if (const char* env = std::getenv("MSBNB_FASHION_MNIST_DIR")) dir = env;
  if (argc > 1) dir = argv[1];
  torch::Tensor train_x, train_y, test_x, test_y;
  try {
    train_x = read_images(dir + "/train-images-idx3-ubyte.gz");
    train_y = read_labels(dir + "/train-labels-idx1-ubyte.gz");
    test_x = read_images(dir + "/t10k-images-idx3-ubyte.gz");
    test_y = read_labels(dir + "/t10k-labels-idx1-ubyte.gz");
  } catch (const std::exception& e) {
    std::cout << "Fashion-MNIST not available (" << e.what()
              << "): apt-get install dataset-fashion-mnist, or pass the folder of the idx .gz files\n";
    return 77;
  }
  const auto t0 = std::chrono::steady_clock::now();
  // Normalize with the training set's statistics.
  const double mean = train_x.mean().item<double>(), stdev = train_x.std().item<double>();
  train_x = (train_x - mean) / stdev;
  test_x = (test_x - mean) / stdev;
  std::cout << "Fashion-MNIST: " << train_x.size(0) << " train, " << test_x.size(0) << " test images from "
            << dir << "\n";

  torch::manual_seed(0);
  tnn::Sequential model(tnn::Linear(784, 256), tnn::Functional(torch::relu), tnn::Linear(256, 128),
                        tnn::Functional(torch::relu), tnn::Linear(128, 10));
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-3));
  const int epochs = 5;
  const int64_t batch = 128, n = train_x.size(0);
  for (int epoch = 0; epoch < epochs; ++epoch) {
    const auto perm = torch::randperm(n, torch::kInt64);
    double loss_sum = 0;
    int64_t steps = 0;
    for (int64_t i = 0; i < n; i += batch) {
      const auto idx = perm.slice(0, i, std::min(i + batch, n));
      opt.zero_grad();
      auto loss = torch::nn::functional::cross_entropy(model->forward(train_x.index_select(0, idx)),
                                                       train_y.index_select(0, idx));
      loss.backward();
      opt.step();
      loss_sum += loss.item<double>();
      ++steps;
    }
    std::cout << "epoch " << epoch + 1 << ": mean loss " << std::fixed << std::setprecision(4)
              << loss_sum / steps << ", test accuracy " << std::setprecision(2)
              << accuracy(model, test_x, test_y) << " %\n";
  }
  model->eval();
  const double fp32 = accuracy(model, test_x, test_y);

  struct Case {
    std::string name;
    msbnb::QuantConfig config;
    double max_drop;  // points of accuracy it may lose; < 0: reported only
  };
  const std::vector<Case> cases = {
      {"INT8 (LLM.int8, threshold 6)", msbnb::Int8Config(), 0.3},
      {"INT4 g128", msbnb::Int4Config().quant_type("int4").compress_statistics(false), -1},
      {"NF4", msbnb::Int4Config().quant_type("nf4").compress_statistics(false), 1.5},
      {"NF4 + double quant", msbnb::Int4Config().quant_type("nf4"), 1.5},
  };
  const int64_t fp_bytes = msbnb::get_model_size(*model).total_bytes;
  std::cout << "\n| format | test accuracy % | vs FP32 (points) | model bytes |\n|---|---|---|---|\n";
  std::cout << "| FP32 | " << std::setprecision(2) << fp32 << " | 0.00 | " << fp_bytes << " |\n";
  int status = 0;
  std::string failures;
  for (const auto& c : cases) {
    auto q = msbnb::convert_to_quantized_model(model, c.config);
    auto seq = tnn::Sequential(q.as<tnn::SequentialImpl>());
    const double acc = accuracy(seq, test_x, test_y);
    std::cout << "| " << c.name << " | " << acc << " | " << std::showpos << acc - fp32 << std::noshowpos
              << " | " << msbnb::get_model_size(*q.model).total_bytes << " |\n";
    if (c.max_drop >= 0 && fp32 - acc > c.max_drop) {
      status = 1;
      failures += "  " + c.name + " lost " + std::to_string(fp32 - acc) + " points (allowed " +
                  std::to_string(c.max_drop) + ")\n";
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << "\nelapsed " << std::setprecision(1) << secs << " s\n";
  if (status != 0) std::cout << "FAIL:\n" << failures;
  return status;
}
