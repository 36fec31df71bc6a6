// Whole models: inject_lora (names, tails, globs, all-linear, exclusions, containers, shared
// layers, bad entries, injecting twice), freeze_model_except_lora, lora_info / print_lora_info,
// merge_lora / unmerge_lora, merge_and_unload, unload_lora.
#include <gtest/gtest.h>

#include <sstream>

#include "lora_test_util.h"
#include "msbnb/convert/convert.h"

namespace {

using namespace msbnb::lora;
using msbnb::lora::test::expect_error;

// A decoder-shaped tree: layers (ModuleList) of blocks (ModuleDict: q_proj, v_proj, mlp
// (Sequential: up_proj, act, down_proj)), then lm_head. in != out everywhere, so counts that
// mix them up differ.
std::shared_ptr<torch::nn::Module> decoder(int64_t d = 16, int64_t h = 24, int64_t vocab = 40) {
  auto root = std::make_shared<torch::nn::Module>();
  torch::nn::ModuleList layers;
  for (int i = 0; i < 2; ++i) {
    torch::nn::Sequential mlp;
    mlp->push_back("up_proj", torch::nn::Linear(d, h));
    mlp->push_back("act", torch::nn::ReLU());
    mlp->push_back("down_proj", torch::nn::Linear(h, d));
    torch::nn::ModuleDict block(std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>>{
        {"q_proj", torch::nn::Linear(d, d).ptr()},
        {"v_proj", torch::nn::Linear(torch::nn::LinearOptions(d, d / 2).bias(false)).ptr()},
        {"mlp", mlp.ptr()}});
    layers->push_back(block);
  }
  root->register_module("layers", layers);
  root->register_module("lm_head", torch::nn::Linear(d, vocab));
  return root;
}

std::vector<std::string> wrapped_names(const LoraInjectionReport& r) {
  std::vector<std::string> v;
  for (const auto& w : r.wrapped) v.push_back(w.name);
  return v;
}

TEST(InjectLora, NamesAndTails) {
  auto m = decoder();
  const auto r =
      inject_lora(*m, LoraConfig().r(2).target_modules({"q_proj", "layers.1.mlp.down_proj", "k_proj"}));
  EXPECT_EQ(wrapped_names(r),
            (std::vector<std::string>{"layers.0.q_proj", "layers.1.q_proj", "layers.1.mlp.down_proj"}));
  EXPECT_EQ(r.unmatched_target_entries, (std::vector<std::string>{"k_proj"}));
  const auto* w = r.find("layers.1.mlp.down_proj");
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(w->base, "Linear");
  EXPECT_EQ(w->entry, "layers.1.mlp.down_proj");
  EXPECT_EQ(w->in_features, 24);
  EXPECT_EQ(w->out_features, 16);
  EXPECT_EQ(w->lora_parameters, 2 * 24 + 16 * 2);
  EXPECT_EQ(r.lora_parameters(), 2 * (2 * 16 + 16 * 2) + (2 * 24 + 16 * 2));
  // The names PEFT uses, through the containers.
  const auto p = m->named_parameters();
  EXPECT_NE(p.find("layers.0.q_proj.lora_A.weight"), nullptr);
  EXPECT_NE(p.find("layers.0.q_proj.base_layer.weight"), nullptr);
  EXPECT_NE(p.find("layers.1.mlp.down_proj.lora_B.weight"), nullptr);
  EXPECT_EQ(p.find("layers.0.v_proj.lora_A.weight"), nullptr);
  std::ostringstream s;
  s << r;
  EXPECT_NE(s.str().find("target entry \"k_proj\" matched no linear layer"), std::string::npos) << s.str();
  // A dot-boundary tail: "proj" is not a tail of "q_proj".
  auto m2 = decoder();
  expect_error(
      [&] { inject_lora(*m2, LoraConfig().target_modules({"proj"})); },
      {"target_modules", "\"proj\"", "matched no linear layer", "layers.0.q_proj", "Nothing was changed"});
}

TEST(InjectLora, GlobsSelectOnlyLinearLayers) {
  auto m = decoder();
  const auto r = inject_lora(*m, LoraConfig().target_modules({"layers.*.mlp.*_proj"}));
  EXPECT_EQ(wrapped_names(r), (std::vector<std::string>{"layers.0.mlp.up_proj", "layers.0.mlp.down_proj",
                                                        "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"}));
  EXPECT_TRUE(r.unmatched_target_entries.empty());
  // "*" matches containers too; a glob only selects linear layers.
  auto m2 = decoder();
  EXPECT_EQ(inject_lora(*m2, LoraConfig().target_modules({"*"})).wrapped.size(), 9u);
}

TEST(InjectLora, AllLinearLeavesOutLmHeadAndHonoursExcludes) {
  auto m = decoder();
  const auto r = inject_lora(
      *m, LoraConfig().target_modules({"all-linear"}).exclude_modules({"layers.1.mlp", "nothing"}));
  EXPECT_EQ(wrapped_names(r),
            (std::vector<std::string>{"layers.0.q_proj", "layers.0.v_proj", "layers.0.mlp.up_proj",
                                      "layers.0.mlp.down_proj", "layers.1.q_proj", "layers.1.v_proj"}));
  ASSERT_EQ(r.excluded.size(), 2u);
  EXPECT_EQ(r.excluded[0].name, "layers.1.mlp");  // with everything below it
  EXPECT_EQ(r.excluded[1].name, "lm_head");
  EXPECT_EQ(r.unmatched_exclude_entries, (std::vector<std::string>{"nothing"}));
  EXPECT_TRUE(r.unmatched_target_entries.empty());
  EXPECT_NE(dynamic_cast<torch::nn::LinearImpl*>(m->named_children()["lm_head"].get()), nullptr);
}

TEST(InjectLora, BadTargetsRefusedBeforeChangingAnything) {
  auto m = decoder();
  const auto before = m->named_parameters().keys();
  expect_error([&] { inject_lora(*m, LoraConfig()); }, {"target_modules", "all-linear", "empty list"});
  expect_error(
      [&] {
        inject_lora(*m, LoraConfig().target_modules({"q_proj", ""}));
      },
      {"target_modules[1]", "empty string"});
  expect_error(
      [&] {
        inject_lora(*m, LoraConfig().target_modules({"all-linear", "q_proj"}));
      },
      {"target_modules", "\"all-linear\" alone"});
  // A plain name matching a container.
  expect_error(
      [&] {
        inject_lora(*m, LoraConfig().target_modules({"q_proj", "mlp"}));
      },
      {"\"mlp\"", "layers.0.mlp", "Sequential", "expected a linear layer", "mlp.*"});
  expect_error([&] { inject_lora(*m, LoraConfig().r(0).target_modules({"q_proj"})); }, {"LoraConfig.r"});
  EXPECT_EQ(m->named_parameters().keys(), before);
  // The root itself.
  torch::nn::Linear lin(4, 4);
  expect_error([&] { inject_lora(*lin, LoraConfig().target_modules({"all-linear"})); },
               {"model", "Linear", "wrap_with_lora"});
}

TEST(InjectLora, TwiceIsRefused) {
  auto m = decoder();
  inject_lora(*m, LoraConfig().target_modules({"q_proj"}));
  const auto before = m->named_parameters().keys();
  expect_error([&] { inject_lora(*m, LoraConfig().target_modules({"q_proj"})); },
               {"layers.0.q_proj", "already has a LoRA adapter", "merge_and_unload", "Nothing was changed"});
  expect_error([&] { inject_lora(*m, LoraConfig().target_modules({"all-linear"})); },
               {"already has a LoRA adapter"});
  EXPECT_EQ(m->named_parameters().keys(), before);
  // Other layers can still get adapters; the LoRA layers are not walked into.
  const auto r = inject_lora(*m, LoraConfig().target_modules({"v_proj"}));
  EXPECT_EQ(r.wrapped.size(), 2u);
}

TEST(InjectLora, SequentialForwardRunsTheNewLayers) {
  torch::manual_seed(40);
  torch::nn::Sequential seq;
  seq->push_back("fc1", torch::nn::Linear(8, 12));
  seq->push_back("act", torch::nn::Tanh());
  seq->push_back("fc2", torch::nn::Linear(12, 4));
  const torch::Tensor x = torch::randn({3, 8});
  const torch::Tensor y0 = seq->forward(x);
  inject_lora(seq, LoraConfig().r(2).target_modules({"fc1", "fc2"}));
  EXPECT_TRUE(torch::equal(seq->forward(x), y0));  // B = 0
  auto* fc2 = as_lora_layer(*seq->named_children()["fc2"]);
  ASSERT_NE(fc2, nullptr);
  msbnb::lora::test::randomize_lora(*fc2);
  EXPECT_FALSE(torch::allclose(seq->forward(x), y0));
}

struct FieldNet : torch::nn::Cloneable<FieldNet> {
  torch::nn::Linear fc{nullptr};
  FieldNet() { reset(); }
  void reset() override { fc = register_module("fc", torch::nn::Linear(4, 4)); }
  torch::Tensor forward(const torch::Tensor& x) { return fc(x); }
};

struct HookNet : torch::nn::Cloneable<HookNet>, msbnb::ChildReplaceHook {
  torch::nn::AnyModule fc;
  HookNet() { reset(); }
  void reset() override { fc = torch::nn::AnyModule(register_module("fc", torch::nn::Linear(4, 4))); }
  void child_replaced(const std::string& name, const torch::nn::AnyModule& m) override {
    if (name == "fc") fc = m;
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc.forward(x); }
};

TEST(InjectLora, SharedLayersAndChildReplaceHook) {
  auto f = std::make_shared<FieldNet>();
  expect_error([&] { inject_lora(*f, LoraConfig().target_modules({"fc"})); },
               {"layer 'fc'", "also held outside", "allow_shared_modules", "Nothing was changed"});
  EXPECT_NE(dynamic_cast<torch::nn::LinearImpl*>(f->named_children()["fc"].get()), nullptr);
  const auto r =
      inject_lora(*f, LoraConfig().target_modules({"fc"}), InjectOptions().allow_shared_modules(true));
  EXPECT_EQ(r.wrapped.size(), 1u);
  auto h = std::make_shared<HookNet>();
  inject_lora(*h, LoraConfig().target_modules({"fc"}));
  auto* l = as_lora_layer(*h->fc.ptr());
  ASSERT_NE(l, nullptr);  // the field now runs the LoRA layer
  msbnb::lora::test::randomize_lora(*l);
  const torch::Tensor x = torch::randn({2, 4});
  EXPECT_FALSE(torch::allclose(h->forward(x), l->base_module()->as<torch::nn::Linear>()->forward(x)));
}

TEST(InjectLora, QuantizedModelGetsQuantizedLoraLayers) {
  auto m = decoder(64, 96);
  msbnb::convert_to_quantized_model_inplace(*m, msbnb::Int4Config().quant_type("nf4"), {"lm_head"});
  const auto r = inject_lora(*m, LoraConfig().r(4).target_modules({"all-linear"}));
  ASSERT_EQ(r.wrapped.size(), 8u);
  EXPECT_EQ(r.wrapped[0].base, "Linear4bit(nf4)");
  EXPECT_NE(dynamic_cast<Linear4bitWithLoRAImpl*>(m->named_modules()["layers.0.q_proj"].get()), nullptr);
  auto m8 = decoder();
  msbnb::convert_to_quantized_model_inplace(*m8, msbnb::Int8Config());
  const auto r8 = inject_lora(*m8, LoraConfig().target_modules({"down_proj"}));
  EXPECT_EQ(r8.wrapped.at(0).base, "Linear8bit");
}

TEST(FreezeAndInfo, CountsTensorsAndElements) {
  auto m = decoder();  // d 16, h 24, vocab 40
  inject_lora(*m, LoraConfig().r(2).target_modules({"q_proj", "up_proj"}));
  int64_t total = 0, tensors = 0;
  for (const auto& p : m->parameters()) {
    total += p.numel();
    ++tensors;
  }
  const int64_t lora = 2 * (2 * 16 + 16 * 2) + 2 * (2 * 16 + 24 * 2);  // r·in + out·r per layer
  const FreezeReport f = freeze_model_except_lora(*m);
  EXPECT_EQ(f.lora_layers, 4);
  EXPECT_EQ(f.trainable_tensors, 8);
  EXPECT_EQ(f.trainable_elements, lora);
  EXPECT_EQ(f.frozen_tensors, tensors - 8);
  EXPECT_EQ(f.frozen_elements, total - lora);
  for (const auto& p : m->named_parameters())
    EXPECT_EQ(p.value().requires_grad(), p.key().find(".lora_") != std::string::npos) << p.key();

  const LoraInfo info = lora_info(*m);
  EXPECT_EQ(info.layers.size(), 4u);
  EXPECT_EQ(info.lora_parameters, lora);
  EXPECT_EQ(info.trainable_parameters, lora);
  EXPECT_EQ(info.total_parameters, total);
  std::ostringstream s;
  print_lora_info(*m, s);
  std::ostringstream line;
  line << "trainable params: " << lora << " || all params: " << total << " || trainable%: ";
  // thousands separators: 320 and 2,540-ish values; build the expected text the same way.
  auto sep = [](int64_t v) {
    std::string t = std::to_string(v);
    for (int i = static_cast<int>(t.size()) - 3; i > 0; i -= 3) t.insert(static_cast<size_t>(i), ",");
    return t;
  };
  char pct[32];
  std::snprintf(pct, sizeof pct, "%.4f", 100.0 * lora / total);
  const std::string expected =
      "trainable params: " + sep(lora) + " || all params: " + sep(total) + " || trainable%: " + pct + "\n";
  EXPECT_NE(s.str().find(expected), std::string::npos) << s.str() << "\nexpected: " << expected;
  EXPECT_NE(s.str().find("layers.0.mlp.up_proj: Linear 16 -> 24, r=2"), std::string::npos) << s.str();
}

TEST(FreezeAndInfo, BiasModes) {
  auto m = decoder();
  inject_lora(*m, LoraConfig().r(2).target_modules({"q_proj"}).bias("lora_only"));
  FreezeReport f = freeze_model_except_lora(*m);  // the layers' bias: lora_only
  EXPECT_EQ(f.trainable_tensors, 4 + 2);          // A, B of 2 layers + their base biases
  EXPECT_EQ(f.trainable_elements, 2 * (2 * 16 + 16 * 2) + 2 * 16);
  EXPECT_TRUE(m->named_parameters()["layers.0.q_proj.base_layer.bias"].requires_grad());
  EXPECT_FALSE(m->named_parameters()["lm_head.bias"].requires_grad());
  f = freeze_model_except_lora(*m, std::string("all"));
  // biases: q (2), up (2), down (2), lm_head; v_proj has none.
  EXPECT_EQ(f.trainable_tensors, 4 + 7);
  EXPECT_TRUE(m->named_parameters()["lm_head.bias"].requires_grad());
  f = freeze_model_except_lora(*m, std::string("none"));
  EXPECT_EQ(f.trainable_tensors, 4);
  expect_error([&] { freeze_model_except_lora(*m, std::string("some")); }, {"bias", "lora_only", "some"});
}

TEST(FreezeAndInfo, QuantizedWeightsCountAsTheWeightsTheyHold) {
  auto m = decoder(64, 96);
  msbnb::convert_to_quantized_model_inplace(*m, msbnb::Int4Config().quant_type("nf4"), {"lm_head"});
  inject_lora(*m, LoraConfig().r(4).target_modules({"q_proj"}));
  freeze_model_except_lora(*m);
  const LoraInfo info = lora_info(*m);
  // Weights: per block q 64·64, v 64·32, up 64·96, down 96·64; lm_head 64·40 (float).
  const int64_t weights = 2 * (64 * 64 + 64 * 32 + 64 * 96 + 96 * 64) + 64 * 40;
  const int64_t biases = 2 * (64 + 96 + 64) + 40;
  const int64_t lora = 2 * (4 * 64 + 64 * 4);
  EXPECT_EQ(info.total_parameters, weights + biases + lora);
  EXPECT_EQ(info.trainable_parameters, lora);
}

TEST(ModelMerge, MergeUnmergeAndUnload) {
  torch::manual_seed(41);
  auto m = decoder(64, 96);
  msbnb::convert_to_quantized_model_inplace(*m, msbnb::Int4Config().quant_type("nf4"), {"lm_head", "v_proj"});
  inject_lora(*m, LoraConfig().r(4).lora_alpha(8).target_modules({"q_proj", "v_proj", "up_proj"}));
  for (const auto& item : m->named_modules())
    if (auto* l = as_lora_layer(*item.value())) msbnb::lora::test::randomize_lora(*l);
  const auto buffers = msbnb::lora::test::snapshot_buffers(*m);
  std::map<std::string, torch::Tensor> floats;
  for (const auto& p : m->named_parameters()) floats[p.key()] = p.value().detach().clone();

  const ModelMergeReport r = merge_lora(*m);
  ASSERT_EQ(r.size(), 6u);
  EXPECT_EQ(r[0].first, "layers.0.q_proj");
  EXPECT_TRUE(r[0].second.requantized);
  EXPECT_EQ(r[1].first, "layers.0.v_proj");
  EXPECT_FALSE(r[1].second.requantized);  // v_proj stayed float
  expect_error([&] { merge_lora(*m); },
               {"merge_lora", "layers.0.q_proj", "already merged", "Nothing was changed"});
  unmerge_lora(*m);
  msbnb::lora::test::expect_same_buffers(*m, buffers);
  for (const auto& p : m->named_parameters()) {
    // float v_proj: one rounding each way (LoraMerge.FloatBaseIsExactAndUnmergeUndoesIt derives it)
    EXPECT_TRUE(torch::allclose(p.value(), floats[p.key()], 0, 1e-6)) << p.key();
  }
  expect_error([&] { unmerge_lora(*m); }, {"unmerge_lora", "not merged"});

  // merge_and_unload: the bases back in place, the merged weights kept.
  auto* q0 = dynamic_cast<Linear4bitWithLoRAImpl*>(m->named_modules()["layers.0.q_proj"].get());
  ASSERT_NE(q0, nullptr);
  auto q0_base = q0->base_layer();
  const torch::Tensor x = torch::randn({3, 64});
  q0->merge();
  const torch::Tensor merged_out = q0->forward(x);
  const ModelMergeReport u = merge_and_unload(*m);
  EXPECT_EQ(u.size(), 5u);  // q0 was merged already
  const auto mods = m->named_modules();
  EXPECT_EQ(mods["layers.0.q_proj"].get(), q0_base.ptr().get());
  EXPECT_NE(dynamic_cast<torch::nn::LinearImpl*>(mods["layers.1.v_proj"].get()), nullptr);
  for (const auto& p : m->named_parameters()) EXPECT_EQ(p.key().find("lora_"), std::string::npos) << p.key();
  for (const auto& p : m->named_parameters())
    EXPECT_EQ(p.key().find("base_layer"), std::string::npos) << p.key();
  EXPECT_TRUE(torch::equal(q0_base->forward(x), merged_out));
  // The mlp Sequential runs the unloaded layers.
  auto mlp = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(mods["layers.0.mlp"]);
  ASSERT_NE(mlp, nullptr);
  EXPECT_EQ(mlp->forward(x).sizes(), (std::vector<int64_t>{3, 64}));
}

TEST(ModelMerge, UnloadDropsTheAdapters) {
  torch::manual_seed(42);
  torch::nn::Sequential seq;
  seq->push_back("fc1", torch::nn::Linear(8, 12));
  seq->push_back("fc2", torch::nn::Linear(12, 4));
  const torch::Tensor x = torch::randn({3, 8});
  const torch::Tensor y0 = seq->forward(x);
  inject_lora(seq, LoraConfig().target_modules({"all-linear"}));
  for (const auto& c : seq->named_children()) msbnb::lora::test::randomize_lora(*as_lora_layer(*c.value()));
  merge_lora(*seq);
  unload_lora(*seq);  // unmerges first
  EXPECT_TRUE(torch::allclose(seq->forward(x), y0, 0, 1e-5));
  EXPECT_EQ(seq->named_parameters().keys(),
            (std::vector<std::string>{"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}));
  auto l = LoRALinear(4, 4);
  expect_error([&] { unload_lora(*l); }, {"unload_lora", "model", "base_layer()"});
}

}  // namespace
