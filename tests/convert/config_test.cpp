// Configs: defaults, chained setters, validate() messages; skip-list matching rules.
#include "msbnb/convert/config.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "common.h"
#include "msbnb/convert/convert.h"

namespace {

using msbnb::Int4Config;
using msbnb::Int8Config;
using msbnb::QuantConfig;
using msbnb_test::expect_error;

TEST(Config, Int8Defaults) {
  const Int8Config c;
  EXPECT_TRUE(c.symmetric());
  EXPECT_TRUE(c.per_channel());
  EXPECT_EQ(c.threshold(), 6.0);
  // The seed package's default kept the float weights and saved nothing.
  EXPECT_FALSE(c.has_fp16_weights());
  EXPECT_FALSE(c.convert_embeddings());
  EXPECT_NO_THROW(c.validate());
}

TEST(Config, Int4Defaults) {
  const Int4Config c;
  EXPECT_EQ(c.quant_type(), "int4");
  EXPECT_EQ(c.group_size(), 128);
  EXPECT_EQ(c.blocksize(), 64);
  EXPECT_TRUE(c.compress_statistics());
  EXPECT_EQ(c.effective_blocksize(), 128);
  EXPECT_EQ(Int4Config().quant_type("nf4").effective_blocksize(), 64);
  EXPECT_NO_THROW(c.validate());
}

TEST(Config, ChainedSetters) {
  const auto c =
      Int4Config().quant_type("fp4").blocksize(256).compress_statistics(false).convert_embeddings(true);
  EXPECT_EQ(c.quant_type(), "fp4");
  EXPECT_EQ(c.blocksize(), 256);
  EXPECT_FALSE(c.compress_statistics());
  EXPECT_TRUE(c.convert_embeddings());
  const auto d = Int8Config().threshold(0.0).has_fp16_weights(true);
  EXPECT_EQ(d.threshold(), 0.0);
  EXPECT_TRUE(d.has_fp16_weights());
}

TEST(Config, Int8ValidateNamesFieldExpectedActual) {
  expect_error([] { Int8Config().threshold(-1.5).validate(); }, {"Int8Config.threshold", ">= 0", "-1.5"});
  expect_error([] { Int8Config().threshold(std::nan("")).validate(); },
               {"Int8Config.threshold", "finite", "nan"});
  expect_error([] { Int8Config().threshold(std::numeric_limits<double>::infinity()).validate(); },
               {"Int8Config.threshold", "inf"});
  expect_error([] { Int8Config().symmetric(false).validate(); },
               {"Int8Config.symmetric", "expected true", "false"});
  expect_error([] { Int8Config().per_channel(false).validate(); },
               {"Int8Config.per_channel", "expected true", "false"});
  EXPECT_NO_THROW(Int8Config().threshold(0.0).validate());
}

TEST(Config, Int4ValidateNamesFieldExpectedActual) {
  expect_error([] { Int4Config().quant_type("nf5").validate(); },
               {"Int4Config.quant_type", "\"nf4\"", "\"nf5\""});
  expect_error([] { Int4Config().group_size(3).validate(); }, {"Int4Config.group_size", "even", "got 3"});
  expect_error([] { Int4Config().group_size(0).validate(); }, {"Int4Config.group_size", ">= 2", "got 0"});
  expect_error([] { Int4Config().quant_type("nf4").blocksize(48).validate(); },
               {"Int4Config.blocksize", "power of two in [32, 4096]", "nf4", "got 48"});
  expect_error([] { Int4Config().quant_type("fp4").blocksize(8192).validate(); },
               {"Int4Config.blocksize", "fp4", "got 8192"});
  expect_error([] { Int4Config().quant_type("nf4").blocksize(16).validate(); },
               {"Int4Config.blocksize", "got 16"});
  // Each size is checked only for the format that uses it.
  EXPECT_NO_THROW(Int4Config().quant_type("int4").blocksize(48).validate());
  EXPECT_NO_THROW(Int4Config().quant_type("nf4").group_size(3).validate());
  EXPECT_NO_THROW(Int4Config().group_size(2).validate());
  EXPECT_NO_THROW(Int4Config().quant_type("nf4").blocksize(4096).validate());
}

TEST(Config, QuantConfigHoldsEither) {
  const QuantConfig a = Int8Config().threshold(0.0);
  EXPECT_TRUE(a.is_int8());
  EXPECT_FALSE(a.is_int4());
  EXPECT_EQ(a.int8().threshold(), 0.0);
  EXPECT_EQ(a.quant_type(), "int8");
  EXPECT_EQ(a.describe(), "int8 per_channel threshold=0");
  expect_error([&] { a.int4(); }, {"QuantConfig::int4()", "Int4Config", "Int8Config"});

  const QuantConfig b = Int4Config().quant_type("nf4").convert_embeddings(true);
  EXPECT_TRUE(b.is_int4());
  EXPECT_EQ(b.quant_type(), "nf4");
  EXPECT_TRUE(b.convert_embeddings());
  EXPECT_EQ(b.describe(), "nf4 blocksize=64 +double_quant +embeddings");
  EXPECT_EQ(QuantConfig(Int4Config().compress_statistics(false)).describe(), "int4 group_size=128");
  expect_error([&] { b.int8(); }, {"QuantConfig::int8()", "Int8Config", "Int4Config"});
  // validate() forwards to the held config.
  expect_error([] { QuantConfig(Int4Config().quant_type("x")).validate(); },
               {"Int4Config.quant_type", "\"x\""});
}

TEST(SkipList, ExactAndDotBoundarySuffix) {
  using msbnb::module_name_matches;
  EXPECT_TRUE(module_name_matches("lm_head", "lm_head"));
  EXPECT_TRUE(module_name_matches("model.lm_head", "lm_head"));
  EXPECT_TRUE(module_name_matches("model.layers.0.mlp.down_proj", "mlp.down_proj"));
  EXPECT_TRUE(module_name_matches("model.layers.0.mlp.down_proj", "0.mlp.down_proj"));
  // Not a dot boundary, not a prefix, not a substring.
  EXPECT_FALSE(module_name_matches("model.my_lm_head", "lm_head"));
  EXPECT_FALSE(module_name_matches("model.lm_head", "head"));
  EXPECT_FALSE(module_name_matches("model.lm_head", "model"));
  EXPECT_FALSE(module_name_matches("model.lm_head.x", "lm_head"));
  EXPECT_FALSE(module_name_matches("lm_head", "model.lm_head"));
  EXPECT_FALSE(module_name_matches("lm_head", ""));
}

TEST(SkipList, Globs) {
  using msbnb::module_name_matches;
  // '*' crosses dots; the glob matches the whole name or a dot-boundary tail.
  EXPECT_TRUE(module_name_matches("model.layers.3.mlp.down_proj", "layers.*.down_proj"));
  EXPECT_TRUE(module_name_matches("model.layers.3.mlp.down_proj", "*down_proj"));
  EXPECT_TRUE(module_name_matches("model.layers.3.mlp.down_proj", "model.*"));
  EXPECT_TRUE(module_name_matches("anything.at.all", "*"));
  EXPECT_TRUE(module_name_matches("model.layers.12.self_attn.q_proj", "layers.1*.q_proj"));
  EXPECT_FALSE(module_name_matches("model.layers.3.self_attn.q_proj", "layers.1*.q_proj"));
  EXPECT_FALSE(module_name_matches("model.layers.3.mlp.down_proj", "layers.*.up_proj"));
  EXPECT_FALSE(module_name_matches("model.layers.3.mlp.down_proj_x", "*down_proj"));
  // A tail must start after a dot: "odel.*" is not a tail of "model.x".
  EXPECT_FALSE(module_name_matches("model.x", "odel.*"));
  EXPECT_TRUE(module_name_matches("a.b", "**b"));
}

}  // namespace
