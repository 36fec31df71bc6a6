// models::finetune: QLoRA on the plain fixture (NF4 base, LoRA, 8-bit AdamW) learns a repetitive
// token stream; the checkpoint resumes to the same steps bit for bit; the saved PEFT adapter
// reproduces the trained model; gradient checkpointing changes nothing; bad input is refused.
#include "msbnb/models/finetune.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "expect_error.h"
#include "msbnb/io/safetensors.h"
#include "msbnb/lora/lora.h"
#include "msbnb/lora/peft.h"
#include "msbnb/models/loader.h"

namespace fs = std::filesystem;
using msbnb::test::expect_error;
namespace mm = msbnb::models;

namespace {

const std::string kPlain = std::string(MSBNB_FIXTURES_DIR) + "/llama/plain";

mm::LoadedModel nf4_model() {
  mm::LoadOptions lo;
  lo.quantize = mm::QuantizationSpec::for_format("nf4", true);
  return mm::load_pretrained(kPlain, lo);
}

// A period-7 pattern: a model that learns it predicts every token after the first 7.
std::vector<int64_t> pattern_tokens(int64_t vocab, int64_t n) {
  const int64_t period[] = {3, 17, 5, 42, 8, 23, 11};
  std::vector<int64_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[static_cast<size_t>(i)] = period[i % 7] % vocab;
  return t;
}

mm::FinetuneOptions options(const std::string& out) {
  mm::FinetuneOptions o;
  o.r = 4;
  o.lora_alpha = 8;
  o.lr = 1e-2;
  o.steps = 8;
  o.batch = 4;
  o.context = 16;
  o.save_every = 3;
  o.out_dir = out;
  return o;
}

std::string temp_dir(const std::string& name) {
  const fs::path p =
      fs::temp_directory_path() / ("msbnb_finetune_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  return p.string();
}

TEST(Finetune, LearnsAndSavesAPeftAdapterThatReproducesTheModel) {
  auto m = nf4_model();
  const auto tokens = pattern_tokens(m.config.vocab_size, 2000);
  const std::string out = temp_dir("learn");
  auto o = options(out);
  o.steps = 30;
  const auto r = mm::finetune(*m.model, tokens, o);
  ASSERT_EQ(r.step, 30);
  EXPECT_TRUE(r.finished);
  ASSERT_EQ(r.losses.size(), 30u);
  // Random init predicts ~uniformly (loss ~ ln vocab); the pattern is learnable well below it.
  EXPECT_LT(r.losses.back(), 0.5 * r.losses.front());
  EXPECT_GT(r.trainable_parameters, 0);
  EXPECT_GT(r.optimizer_bytes, 0);
  for (const char* f : {"adapter_model.safetensors", "adapter_config.json", "trainer_state.json",
                        "checkpoint/optimizer.pt", "checkpoint/adapter_model.safetensors"})
    EXPECT_TRUE(fs::exists(fs::path(out) / f)) << f;
  EXPECT_EQ(msbnb::lora::read_adapter_config(out).r(), 4);

  // A fresh NF4 model with the saved adapter gives the trained model's logits exactly.
  auto fresh = nf4_model();
  msbnb::lora::load_adapter(*fresh.model, out);
  torch::NoGradGuard ng;
  auto x = torch::tensor(std::vector<int64_t>(tokens.begin(), tokens.begin() + 16)).view({1, 16});
  EXPECT_TRUE(torch::equal(m.model->forward(x), fresh.model->forward(x)));
  fs::remove_all(out);
}

TEST(Finetune, AnInterruptedRunResumesToTheSameStepsBitForBit) {
  const std::string a = temp_dir("a"), b = temp_dir("b");
  std::vector<double> full;
  torch::Tensor full_adapter;
  {
    auto m = nf4_model();
    const auto r = mm::finetune(*m.model, pattern_tokens(m.config.vocab_size, 500), options(a));
    full = r.losses;
  }
  {
    auto m = nf4_model();
    auto o = options(b);
    o.max_seconds = 1e-9;  // stops after its first step, checkpointed
    const auto r = mm::finetune(*m.model, pattern_tokens(m.config.vocab_size, 500), o);
    EXPECT_EQ(r.step, 1);
    EXPECT_FALSE(r.finished);
  }
  {
    auto m = nf4_model();
    const auto r = mm::finetune(*m.model, pattern_tokens(m.config.vocab_size, 500), options(b));
    EXPECT_EQ(r.resumed_from, 1);
    EXPECT_TRUE(r.finished);
    EXPECT_EQ(r.losses, full);
  }
  auto fa = msbnb::io::SafetensorsFile::open(a + "/adapter_model.safetensors");
  auto fb = msbnb::io::SafetensorsFile::open(b + "/adapter_model.safetensors");
  for (const auto& name : fa.names()) EXPECT_TRUE(torch::equal(fa.get(name), fb.get(name))) << name;
  {
    // Another learning rate on the same folder: refused, naming it.
    auto m = nf4_model();
    auto o = options(b);
    o.lr = 2e-2;
    expect_error([&] { mm::finetune(*m.model, pattern_tokens(m.config.vocab_size, 500), o); },
                 {"lr = 0.01", "this run has 0.02", "--restart"});
    o.restart = true;  // ... unless the checkpoint is discarded
    EXPECT_EQ(mm::finetune(*m.model, pattern_tokens(m.config.vocab_size, 500), o).resumed_from, 0);
  }
  fs::remove_all(a);
  fs::remove_all(b);
}

TEST(Finetune, GradientCheckpointingGivesTheSameSteps) {
  const std::string a = temp_dir("gc_a"), b = temp_dir("gc_b");
  auto m1 = nf4_model(), m2 = nf4_model();
  auto o = options(a);
  o.steps = 3;
  const auto r1 = mm::finetune(*m1.model, pattern_tokens(m1.config.vocab_size, 500), o);
  o.out_dir = b;
  o.gradient_checkpointing = true;
  const auto r2 = mm::finetune(*m2.model, pattern_tokens(m2.config.vocab_size, 500), o);
  EXPECT_EQ(r1.losses, r2.losses);  // the recomputation runs the same ops on the same inputs
  fs::remove_all(a);
  fs::remove_all(b);
}

TEST(Finetune, RefusesBadInput) {
  auto m = nf4_model();
  const std::string out = temp_dir("bad");
  const auto tokens = pattern_tokens(m.config.vocab_size, 500);
  auto o = options(out);
  o.r = 0;
  expect_error([&] { mm::finetune(*m.model, tokens, o); }, {"r:", "expected 1..4096", "got 0"});
  o = options(out);
  o.lr = -1;
  expect_error([&] { mm::finetune(*m.model, tokens, o); }, {"lr:", "got -1"});
  o = options(out);
  o.out_dir = "";
  expect_error([&] { mm::finetune(*m.model, tokens, o); }, {"out_dir"});
  o = options(out);
  expect_error([&] { mm::finetune(*m.model, std::vector<int64_t>(10, 1), o); },
               {"at least context + 2 = 18", "got 10"});
  auto bad = tokens;
  bad[7] = m.config.vocab_size;
  expect_error([&] { mm::finetune(*m.model, bad, o); }, {"token ids", std::to_string(m.config.vocab_size)});
  o.context = m.config.max_position_embeddings + 1;
  expect_error([&] { mm::finetune(*m.model, tokens, o); }, {"context", "max_position_embeddings"});
  // A checkpoint file that is not ours.
  fs::create_directories(fs::path(out) / "checkpoint");
  std::ofstream(fs::path(out) / "checkpoint" / "trainer_state.json") << "{\"step\": 1}";
  expect_error([&] { mm::finetune(*m.model, tokens, options(out)); },
               {"trainer_state.json", "run, step, losses"});
  fs::remove_all(out);
}

}  // namespace
