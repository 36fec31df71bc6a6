// Tokenizers: SentencePiece BPE against Python sentencepiece's encodings
// (tests/fixtures/tokenizer, tools/make_tokenizer_fixture.py), the byte tokenizer, errors.
#include "msbnb/models/tokenizer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "expect_error.h"

namespace fs = std::filesystem;
namespace mm = msbnb::models;
using msbnb::test::expect_error;

namespace {
const std::string kDir = std::string(MSBNB_FIXTURES_DIR) + "/tokenizer/";
std::string read_all(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}
}  // namespace

TEST(SentencePiece, EncodesAndDecodesAsPythonSentencepiece) {
  auto tok = mm::SentencePieceTokenizer::from_file(kDir + "tokenizer.model");
  EXPECT_EQ(tok->vocab_size(), 400);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  auto cases = nlohmann::json::parse(read_all(kDir + "expected.json"));
  ASSERT_GE(cases.size(), 30u);
  for (const auto& c : cases) {
    const std::string text = c["text"];
    const auto ids = c["ids"].get<std::vector<int64_t>>();
    EXPECT_EQ(tok->encode(text), ids) << "text: '" << text << "'";
    EXPECT_EQ(tok->encode_pieces(text), c["pieces"].get<std::vector<std::string>>()) << text;
    EXPECT_EQ(tok->decode(ids), c["decoded"].get<std::string>()) << text;
  }
}

TEST(SentencePiece, RefusesWhatItDoesNotImplementAndHostileBytes) {
  expect_error([&] { mm::SentencePieceTokenizer::from_file(kDir + "unigram.model"); },
               {"unigram.model", "model_type BPE", "UNIGRAM"});
  const std::string good = read_all(kDir + "tokenizer.model");
  // Every truncation is an error, never a crash or an over-read.
  for (size_t n : {size_t{1}, size_t{2}, size_t{7}, good.size() / 3, good.size() - 1}) {
    try {
      mm::SentencePieceTokenizer::from_bytes(good.substr(0, n), "cut");
      // A cut that ends exactly at a field boundary may parse; it must then be a valid model.
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find("cut"), std::string::npos);
    }
  }
  std::string huge = "\x0a\xff\xff\xff\xff\x0f";  // a piece claiming 4 GiB
  expect_error([&] { mm::SentencePieceTokenizer::from_bytes(huge, "huge"); }, {"huge", "bytes"});
}

TEST(ByteTokenizer, RoundTripsEveryByte) {
  mm::ByteTokenizer t;
  std::string all;
  for (int i = 0; i < 256; ++i) all.push_back(static_cast<char>(i));
  auto ids = t.encode(all);
  EXPECT_EQ(ids.size(), 256u);
  EXPECT_EQ(ids[200], 200);
  EXPECT_EQ(t.decode(ids), all);
  expect_error([&] { t.decode({256}); }, {"[0, 256)", "256"});
}

TEST(LoadTokenizer, PicksTheFolderTokenizerOrSaysWhatItFound) {
  const fs::path d = fs::path(::testing::TempDir()) / ("msbnb_tok_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  std::ofstream(d / "tokenizer.json") << "{}";
  expect_error([&] { mm::load_tokenizer(d.string()); }, {"tokenizer.json", "unsupported tokenizer"});
  std::ofstream(d / "msbnb_tokenizer.json") << "{\"type\": \"byte\"}";
  EXPECT_EQ(mm::load_tokenizer(d.string())->kind(), "byte");
  std::ofstream(d / "msbnb_tokenizer.json", std::ios::trunc) << "{\"type\": \"wordpiece\"}";
  expect_error([&] { mm::load_tokenizer(d.string()); }, {"wordpiece"});
  fs::remove(d / "msbnb_tokenizer.json");
  fs::copy_file(kDir + "tokenizer.model", d / "tokenizer.model");
  EXPECT_EQ(mm::load_tokenizer(d.string())->kind(), "sentencepiece-bpe");
  fs::remove_all(d);
  expect_error([&] { mm::load_tokenizer(d.string()); }, {"expected a tokenizer"});
}
