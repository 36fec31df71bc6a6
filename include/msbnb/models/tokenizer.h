// Tokenizers of LLaMA-family checkpoints: SentencePiece BPE models (tokenizer.model, as LLaMA-1
// and LLaMA-2 ship) and the byte-level tokenizer of msbnb's built-in model.
//
// SentencePiece: msbnb reads the ModelProto itself (a protobuf, parsed with every length
// checked) and encodes as SentencePiece's BPE does: the identity normalizer, the dummy-prefix
// space, spaces as U+2581, then merges of the adjacent pair whose merged piece scores highest
// (ties: leftmost), characters outside the vocabulary as <0xXX> byte pieces (byte_fallback) or
// <unk>. Tested against Python sentencepiece's encodings (tests/fixtures/tokenizer). Why not
// Debian's libsentencepiece: its shared library carries its own copy of protobuf-lite, whose
// symbols collide with the libprotobuf libtorch loads (the process crashes at start-up).
// Unigram models, other normalizers and user-defined symbols are refused, naming them.
//
// load_tokenizer(dir) picks msbnb_tokenizer.json ({"type": "byte"}) or tokenizer.model; a
// folder with only tokenizer.json (Hugging Face fast tokenizers: Llama 3) is a clear error.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace msbnb::models {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  /// Token ids of `text` (no BOS / EOS).
  virtual std::vector<int64_t> encode(const std::string& text) const = 0;
  /// The text of `ids` (ids out of range throw, naming them).
  virtual std::string decode(const std::vector<int64_t>& ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual std::optional<int64_t> bos_id() const { return std::nullopt; }
  virtual std::optional<int64_t> eos_id() const { return std::nullopt; }
  /// "byte" or "sentencepiece-bpe".
  virtual std::string kind() const = 0;
};

/// Bytes are tokens: vocab 256, id = byte value.
class ByteTokenizer : public Tokenizer {
 public:
  std::vector<int64_t> encode(const std::string& text) const override;
  std::string decode(const std::vector<int64_t>& ids) const override;
  int64_t vocab_size() const override { return 256; }
  std::string kind() const override { return "byte"; }
};

/// A SentencePiece BPE model.
class SentencePieceTokenizer : public Tokenizer {
 public:
  /// Parses a serialized ModelProto; `source` names it in messages.
  static std::unique_ptr<SentencePieceTokenizer> from_bytes(const std::string& bytes,
                                                            const std::string& source = "tokenizer.model");
  static std::unique_ptr<SentencePieceTokenizer> from_file(const std::string& path);

  std::vector<int64_t> encode(const std::string& text) const override;
  std::string decode(const std::vector<int64_t>& ids) const override;
  int64_t vocab_size() const override { return static_cast<int64_t>(pieces_.size()); }
  std::optional<int64_t> bos_id() const override { return bos_; }
  std::optional<int64_t> eos_id() const override { return eos_; }
  std::string kind() const override { return "sentencepiece-bpe"; }
  /// The piece of `id` (as SentencePiece's IdToPiece).
  const std::string& piece(int64_t id) const;
  /// Pieces of the encoding (as SentencePiece's encode(out_type=str)).
  std::vector<std::string> encode_pieces(const std::string& text) const;

  enum class Type { normal = 1, unknown = 2, control = 3, user_defined = 4, unused = 5, byte = 6 };

 private:
  struct Piece {
    std::string text;
    float score = 0;
    Type type = Type::normal;
  };
  std::vector<Piece> pieces_;
  std::unordered_map<std::string, int64_t> mergeable_;  // normal pieces: text -> id
  std::unordered_map<std::string, int64_t> all_;        // every piece: text -> id
  int64_t byte_ids_[256] = {};
  bool byte_fallback_ = false, add_dummy_prefix_ = true, remove_extra_whitespaces_ = true;
  int64_t unk_ = 0;
  std::optional<int64_t> bos_, eos_;
  std::string normalize(const std::string& text) const;
};

/// The tokenizer of a checkpoint folder (see the top of this header).
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir);

}  // namespace msbnb::models
