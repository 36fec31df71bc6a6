// convert_to_quantized_model (copying and in-place), replace_linear_layers: the tree walk over
// Sequential, ModuleList, ModuleDict and custom modules, the skip list, the report, freeing.
#include "msbnb/convert/convert.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "msbnb/nn/embedding.h"
#include "msbnb/nn/linear.h"

namespace {

using msbnb::ConvertOptions;
using msbnb::Int4Config;
using msbnb::Int8Config;
using msbnb_test::expect_error;
namespace tnn = torch::nn;

const msbnb::QuantConfig kNF4 = Int4Config().quant_type("nf4");

std::vector<std::string> converted_names(const msbnb::ConversionReport& r) {
  std::vector<std::string> out;
  for (const auto& l : r.converted) out.push_back(l.name);
  return out;
}

template <typename T>
bool is(const std::shared_ptr<tnn::Module>& m) {
  return std::dynamic_pointer_cast<T>(m) != nullptr;
}

// A custom Cloneable module with containers and a nested custom module, children held only in
// the children map and containers (the convertible way of writing a model).
struct BlockImpl : tnn::Cloneable<BlockImpl> {
  tnn::ModuleDict attn{nullptr};
  tnn::Sequential mlp{nullptr};
  BlockImpl() { reset(); }
  void reset() override {
    torch::OrderedDict<std::string, std::shared_ptr<tnn::Module>> d;
    d.insert("q", tnn::Linear(16, 16).ptr());
    d.insert("o", tnn::Linear(16, 16).ptr());
    attn = register_module("attn", tnn::ModuleDict(d));
    mlp = register_module("mlp", tnn::Sequential({{"up", tnn::Linear(16, 32)},
                                                  {"act", tnn::Functional(torch::relu)},
                                                  {"down", tnn::Linear(32, 16)}}));
  }
  torch::Tensor forward(torch::Tensor x) { return mlp->forward(x); }
};
TORCH_MODULE(Block);

struct NetImpl : tnn::Cloneable<NetImpl> {
  tnn::ModuleList layers{nullptr};
  tnn::Sequential head{nullptr};
  NetImpl() { reset(); }
  void reset() override {
    register_module("embed", tnn::Embedding(64, 16));  // no field: the embedding is convertible
    layers = register_module("layers", tnn::ModuleList(Block(), Block()));
    head = register_module("head", tnn::Sequential(tnn::Linear(16, 64)));
  }
};
TORCH_MODULE(Net);

TEST(Convert, SequentialForwardRunsQuantizedLayers) {
  torch::manual_seed(1);
  tnn::Sequential seq(tnn::Linear(64, 32), tnn::Functional(torch::relu), tnn::Linear(32, 8));
  const torch::Tensor w0 = seq->ptr<tnn::LinearImpl>(0)->weight.clone();
  const torch::Tensor x = torch::randn({5, 64});

  auto out = msbnb::convert_to_quantized_model(seq, Int8Config().threshold(0.0));
  auto q = out.as<tnn::SequentialImpl>();
  ASSERT_TRUE(is<msbnb::nn::Linear8bitImpl>(q->ptr(0)));
  ASSERT_TRUE(is<msbnb::nn::Linear8bitImpl>(q->ptr(2)));
  EXPECT_EQ(converted_names(out.report), (std::vector<std::string>{"0", "2"}));

  // forward() runs the AnyModule list: it must hold the quantized layers, not only children().
  auto l0 = msbnb::nn::Linear8bit::from_linear(tnn::Linear(seq->ptr<tnn::LinearImpl>(0)),
                                               msbnb::nn::Linear8bitOptions(64, 32).threshold(0.0));
  auto l2 = msbnb::nn::Linear8bit::from_linear(tnn::Linear(seq->ptr<tnn::LinearImpl>(2)),
                                               msbnb::nn::Linear8bitOptions(32, 8).threshold(0.0));
  const torch::Tensor expected = l2->forward(torch::relu(l0->forward(x)));
  EXPECT_TRUE(torch::equal(q->forward(x), expected));
  EXPECT_FALSE(torch::equal(seq->forward(x), expected));  // the float model differs

  // The input model is untouched.
  ASSERT_TRUE(is<tnn::LinearImpl>(seq->ptr(0)));
  EXPECT_TRUE(torch::equal(seq->ptr<tnn::LinearImpl>(0)->weight, w0));
}

TEST(Convert, NestedTreeNamesOrderAndContainers) {
  torch::manual_seed(2);
  Net net;
  auto out = msbnb::convert_to_quantized_model(net, kNF4);
  EXPECT_EQ(converted_names(out.report),
            (std::vector<std::string>{"layers.0.attn.q", "layers.0.attn.o", "layers.0.mlp.up",
                                      "layers.0.mlp.down", "layers.1.attn.q", "layers.1.attn.o",
                                      "layers.1.mlp.up", "layers.1.mlp.down", "head.0"}));
  auto q = out.as<NetImpl>();
  // Cloneable::clone re-ran reset(): the clone's fields point at the clone's children, which
  // were replaced through the containers (fields hold containers, not layers).
  auto block = q->layers->ptr<BlockImpl>(0);
  ASSERT_NE(block, nullptr);
  EXPECT_TRUE(is<msbnb::nn::Linear4bitImpl>(block->attn["q"]));
  for (const auto& item : *block->attn) EXPECT_TRUE(is<msbnb::nn::Linear4bitImpl>(item.value()));
  EXPECT_TRUE(is<msbnb::nn::Linear4bitImpl>(block->mlp->ptr(0)));
  EXPECT_TRUE(is<msbnb::nn::Linear4bitImpl>(block->mlp->named_children()["down"]));
  EXPECT_TRUE(is<msbnb::nn::Linear4bitImpl>(q->head->ptr(0)));
  // Embeddings are kept unless the config asks.
  EXPECT_TRUE(is<tnn::EmbeddingImpl>(q->named_children()["embed"]));
  // Every report entry says nf4 with double quantization (Int4Config's default).
  for (const auto& l : out.report.converted) EXPECT_EQ(l.format, "nf4 +double_quant") << l.name;
  EXPECT_EQ(out.report.find("head.0")->shape, (std::vector<int64_t>{64, 16}));

  // The block's forward runs through the replaced Sequential.
  const torch::Tensor x = torch::randn({3, 16});
  auto& down = *block->mlp->ptr<msbnb::nn::Linear4bitImpl>(2);
  auto& up = *block->mlp->ptr<msbnb::nn::Linear4bitImpl>(0);
  EXPECT_TRUE(torch::equal(block->forward(x), down.forward(torch::relu(up.forward(x)))));
}

TEST(Convert, ModuleListElementsReplaced) {
  tnn::ModuleList list(tnn::Linear(8, 8), tnn::ReLU(), tnn::Linear(8, 4));
  auto report = msbnb::convert_to_quantized_model_inplace(*list, Int8Config());
  EXPECT_EQ(converted_names(report), (std::vector<std::string>{"0", "2"}));
  // Both the list's own vector (operator[], iteration) and children() hold the new layers.
  EXPECT_TRUE(is<msbnb::nn::Linear8bitImpl>(list[0]));
  EXPECT_TRUE(is<msbnb::nn::Linear8bitImpl>(list[2]));
  EXPECT_TRUE(is<msbnb::nn::Linear8bitImpl>(list->children()[2]));
  int quantized = 0;
  for (const auto& m : *list) quantized += is<msbnb::nn::Linear8bitImpl>(m) ? 1 : 0;
  EXPECT_EQ(quantized, 2);
}

TEST(Convert, EmbeddingsWhenAsked) {
  Net net;
  auto o4 = msbnb::convert_to_quantized_model(net, Int4Config().quant_type("nf4").convert_embeddings(true));
  EXPECT_TRUE(is<msbnb::nn::Embedding4bitImpl>(o4.model->named_children()["embed"]));
  EXPECT_EQ(o4.report.converted.front().name, "embed");
  EXPECT_EQ(o4.report.converted.front().from, "Embedding");
  EXPECT_EQ(o4.report.converted.front().shape, (std::vector<int64_t>{64, 16}));
  auto o8 = msbnb::convert_to_quantized_model(net, Int8Config().convert_embeddings(true));
  EXPECT_TRUE(is<msbnb::nn::Embedding8bitImpl>(o8.model->named_children()["embed"]));
}

TEST(Convert, SkipListSubtreesSuffixGlobAndUnmatched) {
  Net net;
  auto out =
      msbnb::convert_to_quantized_model(net, kNF4, {"head", "layers.1", "mlp.*", "no_such_layer", "q"});
  // "head" and "layers.1" skip their subtrees; "mlp.*" matches mlp's children; "q" is a tail.
  EXPECT_EQ(converted_names(out.report), (std::vector<std::string>{"layers.0.attn.o"}));
  ASSERT_EQ(out.report.skipped.size(), 6u);
  EXPECT_EQ(out.report.skipped[0].name, "layers.0.attn.q");
  EXPECT_EQ(out.report.skipped[0].entry, "q");
  EXPECT_EQ(out.report.skipped[1].name, "layers.0.mlp.up");
  EXPECT_EQ(out.report.skipped[1].entry, "mlp.*");
  EXPECT_EQ(out.report.skipped[2].name, "layers.0.mlp.act");  // any child, not only layers
  EXPECT_EQ(out.report.skipped[3].name, "layers.0.mlp.down");
  EXPECT_EQ(out.report.skipped[4].name, "layers.1");
  EXPECT_EQ(out.report.skipped[4].entry, "layers.1");
  EXPECT_EQ(out.report.skipped[5].name, "head");
  EXPECT_EQ(out.report.unmatched_skip_entries, (std::vector<std::string>{"no_such_layer"}));
  auto q = out.as<NetImpl>();
  EXPECT_TRUE(is<tnn::LinearImpl>(q->head->ptr(0)));
  EXPECT_TRUE(is<tnn::LinearImpl>(q->layers->ptr<BlockImpl>(1)->attn["o"]));
  EXPECT_TRUE(is<msbnb::nn::Linear4bitImpl>(q->layers->ptr<BlockImpl>(0)->attn["o"]));
  expect_error(
      [&] {
        msbnb::convert_to_quantized_model(net, kNF4, {"head", ""});
      },
      {"modules_to_not_convert[1]", "empty"});
}

TEST(Convert, ReportBytes) {
  tnn::Sequential seq(tnn::Linear(tnn::LinearOptions(256, 128).bias(false)), tnn::Linear(128, 10));
  auto out = msbnb::convert_to_quantized_model(seq, Int8Config());
  ASSERT_EQ(out.report.converted.size(), 2u);
  const auto& a = out.report.converted[0];
  EXPECT_EQ(a.bytes_before, 256 * 128 * 4);
  EXPECT_EQ(a.bytes_after, out.as<tnn::SequentialImpl>()->ptr<msbnb::nn::Linear8bitImpl>(0)->memory_bytes());
  const auto& b = out.report.converted[1];
  EXPECT_EQ(b.bytes_before, (128 * 10 + 10) * 4);
  EXPECT_EQ(b.bytes_after, out.as<tnn::SequentialImpl>()->ptr<msbnb::nn::Linear8bitImpl>(1)->memory_bytes());
  EXPECT_EQ(out.report.bytes_before(), a.bytes_before + b.bytes_before);
  EXPECT_EQ(out.report.bytes_after(), a.bytes_after + b.bytes_after);
  EXPECT_FALSE(a.shared);
  std::ostringstream s;
  s << out.report;
  EXPECT_NE(s.str().find("converted 1 (Linear [10, 128]) -> int8: 5160 -> "), std::string::npos) << s.str();
}

// A custom module keeping a layer in a ModuleHolder field (the usual libtorch style).
struct FieldNetImpl : tnn::Cloneable<FieldNetImpl> {
  tnn::Linear fc{nullptr};
  tnn::Sequential rest{nullptr};
  FieldNetImpl() { reset(); }
  void reset() override {
    fc = register_module("fc", tnn::Linear(8, 8));
    rest = register_module("rest", tnn::Sequential(tnn::Linear(8, 4)));
  }
  torch::Tensor forward(torch::Tensor x) { return rest->forward(fc->forward(x)); }
};
TORCH_MODULE(FieldNet);

TEST(Convert, FieldHeldLayerIsRefusedBeforeAnyChange) {
  FieldNet net;
  expect_error([&] { msbnb::convert_to_quantized_model(net, Int8Config()); },
               {"convert_to_quantized_model", "'fc'", "held outside its parent", "ChildReplaceHook",
                "allow_shared_modules", "Nothing was changed"});
  expect_error([&] { msbnb::convert_to_quantized_model_inplace(*net, Int8Config()); },
               {"convert_to_quantized_model_inplace", "'fc'"});
  // "rest.0" was checked too, nothing was converted.
  EXPECT_TRUE(is<tnn::LinearImpl>(net->rest->ptr(0)));
  // Skipping the field-held layer makes the rest convertible.
  auto report = msbnb::convert_to_quantized_model_inplace(*net, Int8Config(), {"fc"});
  EXPECT_EQ(converted_names(report), (std::vector<std::string>{"rest.0"}));
}

TEST(Convert, AllowSharedConvertsAndReportsTheStaleField) {
  FieldNet net;
  auto report = msbnb::convert_to_quantized_model_inplace(*net, Int8Config(),
                                                          ConvertOptions().allow_shared_modules(true));
  EXPECT_EQ(converted_names(report), (std::vector<std::string>{"fc", "rest.0"}));
  EXPECT_TRUE(report.converted[0].shared);
  EXPECT_FALSE(report.converted[1].shared);
  EXPECT_TRUE(is<msbnb::nn::Linear8bitImpl>(net->named_children()["fc"]));
  // The documented limitation: the field still points to the float layer.
  EXPECT_TRUE(net->fc->weight.defined());
}

// The same with the hook: the module refreshes its AnyModule field.
struct HookNetImpl : tnn::Cloneable<HookNetImpl>, msbnb::ChildReplaceHook {
  tnn::AnyModule fc;
  HookNetImpl() { reset(); }
  void reset() override { fc = tnn::AnyModule(register_module("fc", tnn::Linear(8, 8))); }
  void child_replaced(const std::string& name, const tnn::AnyModule& m) override {
    if (name == "fc") fc = m;
  }
  torch::Tensor forward(torch::Tensor x) { return fc.forward(x); }
};
TORCH_MODULE(HookNet);

TEST(Convert, ChildReplaceHookUpdatesField) {
  torch::manual_seed(3);
  HookNet net;
  const torch::Tensor x = torch::randn({2, 8});
  auto expected = msbnb::nn::Linear4bit::from_linear(
      tnn::Linear(std::dynamic_pointer_cast<tnn::LinearImpl>(net->named_children()["fc"])),
      msbnb::nn::Linear4bitOptions(8, 8).quant_type("nf4").blocksize(64).compress_statistics(true));
  auto out = msbnb::convert_to_quantized_model(net, kNF4);
  auto q = out.as<HookNetImpl>();
  EXPECT_TRUE(is<msbnb::nn::Linear4bitImpl>(q->fc.ptr()));
  EXPECT_TRUE(torch::equal(q->forward(x), expected->forward(x)));
  // In place as well; the float layer is gone (the hook dropped the last reference).
  std::weak_ptr<tnn::Module> old = net->fc.ptr();
  msbnb::convert_to_quantized_model_inplace(*net, kNF4);
  EXPECT_TRUE(old.expired());
  EXPECT_TRUE(torch::equal(net->forward(x), expected->forward(x)));
}

TEST(Convert, InPlaceReleasesFloatLayersCopyKeepsThem) {
  std::weak_ptr<tnn::Module> first, second;
  tnn::Sequential seq;
  {
    tnn::Linear a(32, 32), b(32, 32);
    seq->push_back(a);
    seq->push_back(b);
    first = a.ptr();
    second = b.ptr();
  }
  auto copy = msbnb::convert_to_quantized_model(seq, Int8Config());
  EXPECT_FALSE(first.expired());  // the copying form leaves the input as it was
  ASSERT_TRUE(is<tnn::LinearImpl>(seq->ptr(0)));
  msbnb::convert_to_quantized_model_inplace(*seq, Int8Config());
  EXPECT_TRUE(first.expired());
  EXPECT_TRUE(second.expired());
  EXPECT_TRUE(is<msbnb::nn::Linear8bitImpl>(seq->ptr(0)));
}

TEST(Convert, CallerHandleCountsAsShared) {
  tnn::Linear kept(8, 8);
  tnn::Sequential seq(kept);
  expect_error([&] { msbnb::convert_to_quantized_model_inplace(*seq, Int8Config()); }, {"'0'", "use_count"});
  EXPECT_TRUE(is<tnn::LinearImpl>(seq->ptr(0)));
}

// Not Cloneable: the copying form cannot copy it, the in-place form converts it.
struct PlainNet : tnn::Module {
  tnn::Sequential body{nullptr};
  PlainNet() { body = register_module("body", tnn::Sequential(tnn::Linear(4, 4))); }
};

TEST(Convert, NonCloneableCopyRefusedInPlaceWorks) {
  auto net = std::make_shared<PlainNet>();
  expect_error([&] { msbnb::convert_to_quantized_model(net, Int8Config()); },
               {"convert_to_quantized_model: model", "Cloneable", "convert_to_quantized_model_inplace"});
  auto report = msbnb::convert_to_quantized_model_inplace(*net, Int8Config());
  EXPECT_EQ(converted_names(report), (std::vector<std::string>{"body.0"}));
  EXPECT_TRUE(is<msbnb::nn::Linear8bitImpl>(net->body->ptr(0)));
}

TEST(Convert, RootLayer) {
  tnn::Linear fc(16, 4);
  auto out = msbnb::convert_to_quantized_model(fc, Int8Config());
  EXPECT_TRUE(is<msbnb::nn::Linear8bitImpl>(out.model));
  EXPECT_EQ(converted_names(out.report), (std::vector<std::string>{""}));
  expect_error([&] { msbnb::convert_to_quantized_model_inplace(*fc, Int8Config()); },
               {"model:", "no parent", "convert_to_quantized_model"});
}

TEST(Convert, BadConfigThrowsBeforeChanges) {
  tnn::Sequential seq(tnn::Linear(8, 8));
  expect_error([&] { msbnb::convert_to_quantized_model_inplace(*seq, Int4Config().group_size(5)); },
               {"Int4Config.group_size", "got 5"});
  EXPECT_TRUE(is<tnn::LinearImpl>(seq->ptr(0)));
  expect_error([&] { msbnb::convert_to_quantized_model(std::shared_ptr<tnn::Module>(), Int8Config()); },
               {"model:", "nullptr"});
}

TEST(Convert, AlreadyQuantizedIsANoOp) {
  tnn::Sequential seq(tnn::Linear(8, 8));
  msbnb::convert_to_quantized_model_inplace(*seq, Int8Config());
  auto again = msbnb::convert_to_quantized_model_inplace(*seq, kNF4);
  EXPECT_TRUE(again.converted.empty());
  EXPECT_TRUE(is<msbnb::nn::Linear8bitImpl>(seq->ptr(0)));
}

TEST(ReplaceLinearLayers, FactoryAndKeep) {
  tnn::Sequential seq({{"a", tnn::Linear(4, 4)}, {"b", tnn::Linear(4, 4)}, {"c", tnn::Linear(4, 2)}});
  std::vector<std::string> seen;
  auto names = msbnb::replace_linear_layers(
      *seq,
      [&](const std::string& name, const tnn::Linear& l) {
        seen.push_back(name);
        // Keep layers whose output differs from their input size.
        if (l->options.out_features() != l->options.in_features()) return tnn::AnyModule();
        return tnn::AnyModule(tnn::Identity());
      },
      ConvertOptions().modules_to_not_convert({"b"}));
  EXPECT_EQ(seen, (std::vector<std::string>{"a", "c"}));
  EXPECT_EQ(names, (std::vector<std::string>{"a"}));
  EXPECT_TRUE(is<tnn::IdentityImpl>(seq->ptr(0)));
  EXPECT_TRUE(is<tnn::LinearImpl>(seq->ptr(1)));
  EXPECT_TRUE(is<tnn::LinearImpl>(seq->ptr(2)));
  expect_error([&] { msbnb::replace_linear_layers(*seq, msbnb::LinearFactory()); }, {"factory:", "callable"});
}

}  // namespace

namespace {

TEST(Convert, Int8WithFloatWeightsKeepsThemUntilQuantized) {
  torch::manual_seed(5);
  tnn::Sequential seq(tnn::Linear(16, 8));
  auto out = msbnb::convert_to_quantized_model(seq, Int8Config().has_fp16_weights(true));
  auto l = out.as<tnn::SequentialImpl>()->ptr<msbnb::nn::Linear8bitImpl>(0);
  ASSERT_NE(l, nullptr);
  EXPECT_FALSE(l->is_quantized());
  EXPECT_TRUE(torch::equal(l->weight, seq->ptr<tnn::LinearImpl>(0)->weight));
  EXPECT_TRUE(torch::equal(l->bias, seq->ptr<tnn::LinearImpl>(0)->bias));
  EXPECT_EQ(out.report.converted[0].format, "int8 (float weights kept)");
  // The seed package's default: it saves nothing (the float weight is all still there).
  EXPECT_GE(out.report.converted[0].bytes_after, out.report.converted[0].bytes_before);
  l->quantize_weights();
  EXPECT_EQ(msbnb::get_model_size(*out.model).layers[0].format, "int8");
}

}  // namespace
