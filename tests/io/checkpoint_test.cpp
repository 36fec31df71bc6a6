// Quantized model files (msbnb/io/checkpoint.h): a model of every quantized layer kind saved to
// safetensors and loaded into a fresh model gives the identical state dict bytes and outputs;
// files that do not fit the model are refused with the key named.
#include "msbnb/io/checkpoint.h"

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "msbnb/io/safetensors.h"
#include "msbnb/nn/embedding.h"
#include "msbnb/nn/linear.h"

namespace {

namespace mnn = msbnb::nn;

// Embedding -> nf4 (double quant) -> int8 (LLM.int8) -> fp4 (odd in_features) -> int4 asym ->
// float head: every quantized kind of layer, and a plain module beside them.
struct TinyModelImpl : torch::nn::Module {
  TinyModelImpl() {
    emb = register_module("emb", mnn::Embedding4bit(mnn::Embedding4bitOptions(50, 96).quant_type("nf4")));
    q = register_module("q", mnn::Linear4bit(mnn::Linear4bitOptions(96, 80).quant_type("nf4")));
    k = register_module("k", mnn::Linear8bit(mnn::Linear8bitOptions(80, 33).threshold(6.0)));
    v = register_module("v", mnn::Linear4bit(mnn::Linear4bitOptions(33, 40).quant_type("fp4").bias(false)));
    o = register_module(
        "o",
        mnn::Linear4bit(mnn::Linear4bitOptions(40, 24).quant_type("int4").blocksize(16).symmetric(false)));
    head = register_module("head", torch::nn::Linear(24, 7));
  }
  torch::Tensor forward(const torch::Tensor& ids) { return head(o(v(k(q(emb(ids)))))); }
  mnn::Embedding4bit emb{nullptr};
  mnn::Linear4bit q{nullptr}, v{nullptr}, o{nullptr};
  mnn::Linear8bit k{nullptr};
  torch::nn::Linear head{nullptr};
};
TORCH_MODULE(TinyModel);

// A model with every quantized layer filled from seeded float weights.
TinyModel make_model(uint64_t seed) {
  torch::manual_seed(seed);
  TinyModel m;
  m->emb->quantize_weights(torch::randn({50, 96}));
  m->q->quantize_weights(torch::randn({80, 96}) * 0.1);
  m->k->quantize_weights(torch::randn({33, 80}) * 0.1);
  m->v->quantize_weights(torch::randn({40, 33}) * 0.2);
  m->o->quantize_weights(torch::randn({24, 40}) * 0.2);
  return m;
}

std::string temp_path(const std::string& name) {
  return testing::TempDir() + "/msbnb_ckpt_" + std::to_string(getpid()) + "_" + name + ".safetensors";
}

void expect_same_dicts(const msbnb::nn::NamedTensors& a, const msbnb::nn::NamedTensors& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].first, b[i].first);
    EXPECT_EQ(a[i].second.scalar_type(), b[i].second.scalar_type()) << a[i].first;
    EXPECT_TRUE(a[i].second.sizes() == b[i].second.sizes()) << a[i].first;
    EXPECT_TRUE(torch::equal(a[i].second, b[i].second)) << a[i].first;
  }
}

TEST(Checkpoint, SaveLoadIsBitExactWithIdenticalOutputs) {
  TinyModel src = make_model(1);
  const std::string path = temp_path("roundtrip");
  msbnb::io::save_quantized_model(path, *src);
  TinyModel dst = make_model(2);  // other weights: every byte must come from the file
  const msbnb::nn::LoadReport r = msbnb::io::load_quantized_model(path, *dst);
  EXPECT_TRUE(r.missing_keys.empty());
  EXPECT_TRUE(r.unexpected_keys.empty());
  expect_same_dicts(msbnb::nn::quantized_state_dict(*src), msbnb::nn::quantized_state_dict(*dst));
  const torch::Tensor ids = torch::randint(0, 50, {3, 5});
  torch::NoGradGuard ng;
  EXPECT_TRUE(torch::equal(src->forward(ids), dst->forward(ids)));
  // The file carries transformers' "format" metadata and the bitsandbytes keys.
  std::map<std::string, std::string> meta;
  const auto file = msbnb::io::load_safetensors(path, &meta);
  EXPECT_EQ(meta.at("format"), "pt");
  bool has_nf4_state = false, has_scb = false;
  for (const auto& [name, t] : file) {
    has_nf4_state |= name == "q.weight.quant_state.bitsandbytes__nf4";
    has_scb |= name == "k.SCB";
  }
  EXPECT_TRUE(has_nf4_state);
  EXPECT_TRUE(has_scb);
  std::remove(path.c_str());
}

TEST(Checkpoint, TruncatedFileIsRefusedAndTheModelUnchanged) {
  TinyModel src = make_model(1);
  const std::string path = temp_path("truncated");
  msbnb::io::save_quantized_model(path, *src);
  std::string bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size() / 2));
  }
  TinyModel dst = make_model(2);
  const auto before = msbnb::nn::quantized_state_dict(*dst);
  try {
    msbnb::io::load_quantized_model(path, *dst);
    ADD_FAILURE() << "a truncated file loaded";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
  expect_same_dicts(before, msbnb::nn::quantized_state_dict(*dst));
  std::remove(path.c_str());
}

TEST(Checkpoint, FileOfAnotherFormatIsRefusedNamingTheKey) {
  TinyModel src = make_model(1);
  const std::string path = temp_path("otherformat");
  msbnb::io::save_quantized_model(path, *src);
  // The same shapes with q as fp4: the nf4 quant state must not load into it.
  struct OtherImpl : TinyModelImpl {
    OtherImpl() {
      q = replace_module("q", mnn::Linear4bit(mnn::Linear4bitOptions(96, 80).quant_type("fp4")));
    }
  };
  auto other = std::make_shared<OtherImpl>();
  try {
    msbnb::io::load_quantized_model(path, *other);
    ADD_FAILURE() << "an nf4 checkpoint loaded into an fp4 layer";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("q.weight"), std::string::npos) << e.what();
  }
  std::remove(path.c_str());
}

}  // namespace
