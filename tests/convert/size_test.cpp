// get_model_size, compare_model_sizes, print_quantization_summary: values computed by hand from
// shapes and dtypes (float modules), or from the packed weight's own tensor list (quantized).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <sstream>

#include "common.h"
#include "msbnb/convert/convert.h"
#include "msbnb/nn/embedding.h"
#include "msbnb/nn/linear.h"

namespace {

using msbnb::Int4Config;
using msbnb::Int8Config;
using msbnb_test::expect_error;
using msbnb_test::nbytes;
namespace tnn = torch::nn;

TEST(ModelSize, FloatModulesParametersAndBuffers) {
  tnn::Sequential seq(tnn::Linear(3, 4), tnn::BatchNorm1d(4),
                      tnn::Linear(tnn::LinearOptions(4, 2).bias(false)));
  const auto s = msbnb::get_model_size(*seq);
  ASSERT_EQ(s.layers.size(), 3u);
  EXPECT_EQ(s.layers[0].name, "0");
  EXPECT_EQ(s.layers[0].type, "torch::nn::Linear");
  EXPECT_EQ(s.layers[0].format, "float32");
  EXPECT_EQ(s.layers[0].parameter_bytes, (3 * 4 + 4) * 4);
  EXPECT_EQ(s.layers[0].parameter_count, 16);
  EXPECT_EQ(s.layers[0].buffer_bytes, 0);
  // BatchNorm1d(4): weight + bias; running_mean, running_var (float) and num_batches_tracked (int64).
  EXPECT_EQ(s.layer("1").parameter_bytes, 2 * 4 * 4);
  EXPECT_EQ(s.layer("1").buffer_bytes, 2 * 4 * 4 + 8);
  EXPECT_EQ(s.layer("2").bytes(), 4 * 2 * 4);
  EXPECT_EQ(s.parameter_bytes, 64 + 32 + 32);
  EXPECT_EQ(s.buffer_bytes, 40);
  EXPECT_EQ(s.total_bytes, 168);
  EXPECT_DOUBLE_EQ(s.total_mb(), 168.0 / (1024.0 * 1024.0));
  expect_error([&] { s.layer("9"); }, {"name:", "'9'"});
}

TEST(ModelSize, HalfModelAndSharedStorageCountOnce) {
  tnn::Sequential seq(tnn::Linear(8, 8), tnn::Linear(8, 8));
  seq->to(torch::kFloat16);
  EXPECT_EQ(msbnb::get_model_size(*seq).total_bytes, 2 * (64 + 8) * 2);
  EXPECT_EQ(msbnb::get_model_size(*seq).layers[0].format, "float16");
  // Tie the second layer's weight to the first's: the model holds it once, each layer still
  // reports what it holds.
  auto a = seq->ptr<tnn::LinearImpl>(0);
  auto b = seq->ptr<tnn::LinearImpl>(1);
  b->weight.set_data(a->weight);  // now shares a's storage
  const auto s = msbnb::get_model_size(*seq);
  EXPECT_EQ(s.layers[1].bytes(), (64 + 8) * 2);
  EXPECT_EQ(s.total_bytes, (64 + 8 + 8) * 2);
  // A view of a larger storage counts the storage (the memory actually held).
  auto m = std::make_shared<tnn::Module>();
  m->register_buffer("v", torch::zeros({100}).narrow(0, 0, 10));
  EXPECT_EQ(msbnb::get_model_size(*m).total_bytes, 400);
}

// Bytes of a quantized layer counted a second way: the packed weight's tensor list plus the bias.
int64_t packed_bytes(const msbnb::PackedWeight& w, const torch::Tensor& bias) {
  int64_t s = bias.defined() ? nbytes(bias) : 0;
  for (const auto& t : w.tensors()) s += nbytes(t.second);
  return s;
}

TEST(ModelSize, QuantizedLayersCountCodesAndStatistics) {
  torch::manual_seed(4);
  tnn::Sequential seq(tnn::Linear(300, 70), tnn::Linear(70, 10));
  auto nf4 = msbnb::convert_to_quantized_model(seq, Int4Config().quant_type("nf4"));
  auto q = nf4.as<tnn::SequentialImpl>();
  const auto s = msbnb::get_model_size(*q);
  for (size_t i = 0; i < 2; ++i) {
    auto l = q->ptr<msbnb::nn::Linear4bitImpl>(i);
    EXPECT_EQ(s.layers[i].bytes(), packed_bytes(l->packed_weight(), l->bias)) << i;
    EXPECT_EQ(s.layers[i].bytes(), l->memory_bytes()) << i;
    EXPECT_EQ(s.layers[i].format, "nf4 +double_quant");
    EXPECT_EQ(s.layers[i].type, "msbnb::nn::Linear4bit");
    EXPECT_EQ(s.layers[i].parameter_count, 0);
    // At least the 4-bit codes, one double-quantized absmax byte per block and the bias.
    const int64_t n = l->options.in_features() * l->options.out_features();
    EXPECT_GE(s.layers[i].bytes(), (n + 1) / 2 + (n + 63) / 64 + l->options.out_features() * 4) << i;
  }
  auto i8 = msbnb::convert_to_quantized_model(seq, Int8Config());
  auto q8 = i8.as<tnn::SequentialImpl>()->ptr<msbnb::nn::Linear8bitImpl>(0);
  const auto s8 = msbnb::get_model_size(*i8.model);
  EXPECT_EQ(s8.layers[0].bytes(), packed_bytes(q8->packed_weight(), q8->bias));
  EXPECT_EQ(s8.layers[0].format, "int8");
  EXPECT_GE(s8.layers[0].bytes(), 300 * 70 + 70 * 4 + 70 * 4);
}

TEST(CompareSizes, ValuesFromTotals) {
  tnn::Sequential seq(tnn::Linear(512, 256), tnn::Linear(256, 64));
  auto out =
      msbnb::convert_to_quantized_model(seq, Int4Config().quant_type("nf4").compress_statistics(false));
  const int64_t fp = ((512 * 256 + 256) + (256 * 64 + 64)) * 4;
  const int64_t qb = msbnb::get_model_size(*out.model).total_bytes;
  const auto c = msbnb::compare_model_sizes(*seq, *out.model);
  EXPECT_EQ(c.fp_bytes, fp);
  EXPECT_EQ(c.quant_bytes, qb);
  constexpr double mib = 1024.0 * 1024.0;
  EXPECT_DOUBLE_EQ(c.fp_size_mb, fp / mib);
  EXPECT_DOUBLE_EQ(c.quant_size_mb, qb / mib);
  EXPECT_DOUBLE_EQ(c.memory_saved_mb, (fp - qb) / mib);
  EXPECT_DOUBLE_EQ(c.memory_saved_percent, 100.0 * (fp - qb) / fp);
  EXPECT_DOUBLE_EQ(c.compression_ratio, static_cast<double>(fp) / qb);
  // nf4 without double quant: 4 bits + a float32 absmax per 64 weights = 4.5 bits; float32 is
  // 32 bits, so the ratio is at most 32 / 4.5 (the biases and padding only lower it).
  EXPECT_LE(c.compression_ratio, 32.0 / 4.5);
  EXPECT_GT(c.compression_ratio, 6.0);
  auto empty = std::make_shared<tnn::Module>();
  expect_error([&] { msbnb::compare_model_sizes(*seq, *empty); }, {"quant_model:", "0 bytes"});
}

struct RootImpl : tnn::Cloneable<RootImpl> {
  RootImpl() { reset(); }
  void reset() override {
    register_module("embed", tnn::Embedding(10, 16));
    register_module("block",
                    tnn::Sequential({{"proj", tnn::Linear(16, 16)}, {"act", tnn::Functional(torch::relu)}}));
    register_module("lm_head", tnn::Linear(16, 10));
  }
};

TEST(Summary, WholeTreeFormatsAndTotals) {
  auto out = msbnb::convert_to_quantized_model(std::make_shared<RootImpl>(), Int8Config(), {"lm_head"});
  std::ostringstream os;
  msbnb::print_quantization_summary(*out.model, os);
  const std::string s = os.str();
  const auto sizes = msbnb::get_model_size(*out.model);
  for (const char* part :
       {"(root)  (anonymous namespace)::Root\n", "  embed  torch::nn::Embedding", "float32",
        "  block  torch::nn::Sequential", "    proj  msbnb::nn::Linear8bit", "int8",
        "    act  torch::nn::Functional", "  lm_head  torch::nn::Linear", "by format:"}) {
    EXPECT_NE(s.find(part), std::string::npos) << "'" << part << "' not in:\n" << s;
  }
  EXPECT_NE(s.find(std::to_string(sizes.layer("block.proj").bytes()) + " B"), std::string::npos) << s;
  EXPECT_NE(s.find("total: " + std::to_string(sizes.total_bytes) + " B"), std::string::npos) << s;
  EXPECT_EQ(sizes.total_bytes, (10 * 16) * 4 + sizes.layer("block.proj").bytes() + (16 * 10 + 10) * 4);
}

}  // namespace
