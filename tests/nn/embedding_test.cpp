// Embedding8bit / Embedding4bit: looked-up rows decode bit-exactly as the whole table does,
// bounds, clone / to, bad input.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <sstream>

#include "nn/nn_test_util.h"

namespace msbnb::nn::test {
namespace {

constexpr uint64_t kSeed = 7;

std::vector<Embedding4bitOptions> options_4bit(int64_t num, int64_t dim) {
  std::vector<Embedding4bitOptions> v;
  for (const std::string qt : {"nf4", "fp4"})
    for (bool dq : {false, true})
      v.push_back(Embedding4bitOptions(num, dim).quant_type(qt).compress_statistics(dq));
  for (bool dq : {false, true})
    for (bool sym : {true, false})
      v.push_back(
          Embedding4bitOptions(num, dim).quant_type("int4").compress_statistics(dq).symmetric(sym).blocksize(
              32));
  return v;
}

std::string name_of(const Embedding4bitOptions& o) {
  return o.quant_type() + (o.compress_statistics() ? "_dq" : "") + (o.symmetric() ? "" : "_asym");
}

// Rows straddle blocks (dim not a multiple of 64), the table has an odd element count (7 x 33),
// a last short int4 group (33 = 32 + 1), one row longer than a block (dim 100), and rows whose
// statistics straddle a nested (double-quantization) block of 256 (400 x 100 nf4: block 256 starts
// inside row 163; 200 x 70 int4: 3 groups a row, row 85 holds stats 255..257).
TEST(NnEmbedding, LookedUpRowsDecodeAsTheWholeTable) {
  for (auto [num, dim] : std::vector<std::pair<int64_t, int64_t>>{
           {7, 33}, {50, 100}, {9, 64}, {300, 3}, {400, 100}, {200, 70}}) {
    for (const Embedding4bitOptions& o : options_4bit(num, dim)) {
      SCOPED_TRACE(name_of(o) + " " + std::to_string(num) + "x" + std::to_string(dim));
      torch::manual_seed(kSeed);
      const torch::Tensor w = torch::randn({num, dim});
      Embedding4bit e(o);
      e->quantize_weights(w);
      const torch::Tensor table = e->dequantize_weights();
      const Quantized4bit q = quantize_4bit(w, Quantize4bitOptions()
                                                   .quant_type(o.quant_type())
                                                   .blocksize(o.effective_blocksize())
                                                   .compress_statistics(o.compress_statistics())
                                                   .symmetric(o.symmetric()));
      EXPECT_TRUE(torch::equal(table, dequantize_4bit(q.data, q.state)));
      const torch::Tensor idx = torch::randint(0, num, {4, 5}, torch::kLong);
      idx[0][0] = num - 1;
      idx[0][1] = 0;
      const torch::Tensor y = e->forward(idx);
      ASSERT_EQ(y.sizes(), (std::vector<int64_t>{4, 5, dim}));
      EXPECT_TRUE(torch::equal(y, table.index_select(0, idx.reshape({-1})).reshape({4, 5, dim})));
      EXPECT_TRUE(torch::equal(e->forward(idx.to(torch::kInt32)), y));
      EXPECT_TRUE(torch::equal(e->forward(torch::arange(num)), table));  // every row
    }
  }
}

TEST(NnEmbedding, Embedding8bitIsBitsandbytesRowScaling) {
  torch::manual_seed(kSeed);
  torch::nn::Embedding ref(torch::nn::EmbeddingOptions(40, 24));
  auto e = Embedding8bit::from_embedding(ref);
  const Int8VectorwiseQuant q = int8_vectorwise_quant(ref->weight.detach());
  EXPECT_TRUE(torch::equal(e->weight, q.CB));
  EXPECT_TRUE(torch::equal(e->SCB, q.SCB));
  const torch::Tensor idx = torch::tensor({3, 39, 0, 3});
  // bitsandbytes' Embedding8bit.forward: rows * (row_stats / 127.0).
  const torch::Tensor want =
      q.CB.index_select(0, idx).to(torch::kFloat32) * (q.SCB.index_select(0, idx).unsqueeze(1) / 127.0);
  EXPECT_TRUE(torch::equal(e->forward(idx), want));
  EXPECT_TRUE(torch::equal(e->dequantize_weights().index_select(0, idx), want));
  // Within one quantization step of the float table.
  EXPECT_LE((e->dequantize_weights() - ref->weight.detach()).abs().max().item<float>(),
            q.SCB.max().item<float>() / 127.0f / 2 * (1 + 1e-5f));
}

TEST(NnEmbedding, FromEmbeddingOutputDtypeAndPrint) {
  torch::manual_seed(kSeed);
  torch::nn::Embedding ref(torch::nn::EmbeddingOptions(10, 64));
  ref->to(torch::kBFloat16);
  auto e = Embedding4bit::from_embedding(ref, Embedding4bitOptions(1, 1).quant_type("nf4"));
  EXPECT_EQ(e->options.num_embeddings(), 10);
  EXPECT_EQ(e->forward(torch::tensor({1, 2})).scalar_type(), torch::kBFloat16);
  std::ostringstream s;
  s << *e;
  EXPECT_EQ(s.str(),
            "msbnb::nn::Embedding4bit(num_embeddings=10, embedding_dim=64, quant_type=nf4, blocksize=64)");
  std::ostringstream s8;
  s8 << *Embedding8bit(32000, 4096);
  EXPECT_EQ(s8.str(), "msbnb::nn::Embedding8bit(num_embeddings=32000, embedding_dim=4096)");
  EXPECT_EQ(Embedding4bitOptions(3, 4).quant_type(), "fp4");
  EXPECT_FALSE(Embedding4bitOptions(3, 4).compress_statistics());  // as bitsandbytes' Embedding4bit
}

TEST(NnEmbedding, CloneToAndMemory) {
  for (const Embedding4bitOptions& o : options_4bit(50, 100)) {
    SCOPED_TRACE(name_of(o));
    torch::manual_seed(kSeed);
    Embedding4bit e(o);
    e->quantize_weights(torch::randn({50, 100}));
    const torch::Tensor idx = torch::tensor({4, 49, 0});
    const torch::Tensor y = e->forward(idx);
    auto c = std::dynamic_pointer_cast<Embedding4bitImpl>(e->clone());
    EXPECT_TRUE(torch::equal(c->forward(idx), y));
    for (const auto& b : e->named_buffers())
      EXPECT_NE(b.value().data_ptr(), c->named_buffers()[b.key()].data_ptr());
    std::vector<torch::Tensor> before;
    for (const auto& b : e->buffers()) before.push_back(b.clone());
    e->to(torch::kBFloat16);
    for (size_t i = 0; i < before.size(); ++i) EXPECT_TRUE(same_bytes(e->buffers()[i], before[i]));
    EXPECT_TRUE(torch::equal(e->forward(idx), y));
    expect_error([&] { e->to(torch::kCUDA); }, {"Embedding4bit", "CUDA kernels do not exist yet"});
    int64_t bytes = 0;
    for (const auto& b : e->buffers()) bytes += b.numel() * static_cast<int64_t>(b.element_size());
    EXPECT_EQ(e->memory_bytes(), bytes);
    EXPECT_LT(bytes, 50 * 100 * 4 / 4);  // well under the float table
  }
}

TEST(NnEmbedding, BadInputNamesArgumentExpectedAndGot) {
  Embedding4bit e(Embedding4bitOptions(10, 16).quant_type("nf4"));
  Embedding8bit f(10, 16);
  for (auto fwd : std::vector<std::function<torch::Tensor(const torch::Tensor&)>>{
           [&](const torch::Tensor& i) { return e->forward(i); },
           [&](const torch::Tensor& i) { return f->forward(i); }}) {
    expect_error([&] { fwd(torch::tensor({1, 10})); }, {"indices", "[0, 10)", "got 10", "position 1"});
    expect_error([&] { fwd(torch::tensor({-1})); }, {"indices", "[0, 10)", "got -1"});
    expect_error([&] { fwd(torch::tensor({1.0f})); }, {"indices", "integer", "Float"});
    expect_error([&] { fwd(torch::tensor({true})); }, {"indices", "integer", "Bool"});
  }
  expect_error(
      [&] {
        e->quantize_weights(torch::randn({16, 10}));
      },
      {"weight", "[10, 16]", "num_embeddings", "[16, 10]"});
  expect_error([&] { f->quantize_weights(torch::full({10, 16}, NAN)); }, {"weight", "finite"});
  expect_error([] { Embedding4bit(Embedding4bitOptions(10, 16).quant_type("q4")); }, {"quant_type", "q4"});
  expect_error([] { Embedding4bit(Embedding4bitOptions(10, 16).blocksize(100)); }, {"blocksize", "100"});
  expect_error([] { Embedding8bit(0, 16); }, {"num_embeddings", "> 0", "0"});
  expect_error([] { Embedding8bit(Embedding8bitOptions(3, 4).dtype(torch::kInt32)); }, {"dtype", "Int"});
}

}  // namespace
}  // namespace msbnb::nn::test
