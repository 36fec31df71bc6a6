// Byte-level and SentencePiece BPE tokenizers (msbnb's own ModelProto reader and BPE encoder).
#include "msbnb/models/tokenizer.h"

#include <c10/util/Exception.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <queue>
#include <sstream>

#include "../io/json_strict.h"

namespace msbnb::models {
namespace fs = std::filesystem;
namespace {

const std::string kSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's visible space

// --- protobuf wire format (just what ModelProto needs), every length checked ---------------
struct Wire {
  const uint8_t* p;
  const uint8_t* end;
  const std::string& source;

  bool done() const { return p >= end; }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      TORCH_CHECK(p < end, source, ": expected a protobuf varint, got the end of the data");
      const uint8_t b = *p++;
      v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if ((b & 0x80) == 0) return v;
    }
    TORCH_CHECK(false, source, ": expected a protobuf varint of at most 10 bytes, got a longer one");
  }
  Wire sub() {
    const uint64_t n = varint();
    TORCH_CHECK(n <= static_cast<uint64_t>(end - p), source, ": expected ", n,
                " bytes of a length-delimited field, got only ", end - p);
    Wire w{p, p + n, source};
    p += n;
    return w;
  }
  std::string bytes() {
    Wire w = sub();
    return std::string(reinterpret_cast<const char*>(w.p), static_cast<size_t>(w.end - w.p));
  }
  float fixed32f() {
    TORCH_CHECK(end - p >= 4, source, ": expected 4 bytes of a fixed32 field, got ", end - p);
    float f;
    std::memcpy(&f, p, 4);
    p += 4;
    return f;
  }
  void skip(uint32_t wire_type) {
    switch (wire_type) {
      case 0:
        varint();
        break;
      case 1:
        TORCH_CHECK(end - p >= 8, source, ": truncated fixed64 field");
        p += 8;
        break;
      case 2:
        sub();
        break;
      case 5:
        TORCH_CHECK(end - p >= 4, source, ": truncated fixed32 field");
        p += 4;
        break;
      default:
        TORCH_CHECK(false, source, ": expected a protobuf wire type 0, 1, 2 or 5, got ", wire_type);
    }
  }
  // (field, wire type) of the next key.
  std::pair<uint32_t, uint32_t> key() {
    const uint64_t k = varint();
    TORCH_CHECK((k >> 3) > 0 && (k >> 3) < (1u << 29), source, ": expected a protobuf field number, got ",
                (k >> 3));
    return {static_cast<uint32_t>(k >> 3), static_cast<uint32_t>(k & 7)};
  }
};

// Length of the UTF-8 character starting at s[i] (1 for an invalid lead byte or truncation).
size_t utf8_len(const std::string& s, size_t i) {
  const auto c = static_cast<uint8_t>(s[i]);
  size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
  if (i + n > s.size()) return 1;
  for (size_t k = 1; k < n; ++k) {
    if ((static_cast<uint8_t>(s[i + k]) & 0xC0) != 0x80) return 1;
  }
  return n;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

std::vector<int64_t> ByteTokenizer::encode(const std::string& text) const {
  std::vector<int64_t> out(text.size());
  for (size_t i = 0; i < text.size(); ++i) out[i] = static_cast<uint8_t>(text[i]);
  return out;
}

std::string ByteTokenizer::decode(const std::vector<int64_t>& ids) const {
  std::string out;
  out.reserve(ids.size());
  for (int64_t id : ids) {
    TORCH_CHECK(id >= 0 && id < 256, "ByteTokenizer::decode: expected ids in [0, 256), got ", id);
    out.push_back(static_cast<char>(id));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------

std::unique_ptr<SentencePieceTokenizer> SentencePieceTokenizer::from_bytes(const std::string& bytes,
                                                                           const std::string& source) {
  auto t = std::unique_ptr<SentencePieceTokenizer>(new SentencePieceTokenizer());
  Wire w{reinterpret_cast<const uint8_t*>(bytes.data()),
         reinterpret_cast<const uint8_t*>(bytes.data()) + bytes.size(), source};
  int64_t model_type = 1;  // UNIGRAM is the proto's default
  int64_t unk = 0, bos = 1, eos = 2;
  std::string normalizer = "nmt_nfkc";
  bool has_charsmap = false;
  while (!w.done()) {
    auto [field, type] = w.key();
    if (field == 1 && type == 2) {  // SentencePiece
      Wire s = w.sub();
      Piece piece;
      while (!s.done()) {
        auto [f, ty] = s.key();
        if (f == 1 && ty == 2) {
          piece.text = s.bytes();
        } else if (f == 2 && ty == 5) {
          piece.score = s.fixed32f();
        } else if (f == 3 && ty == 0) {
          const uint64_t v = s.varint();
          TORCH_CHECK(v >= 1 && v <= 6, source, ": piece ", t->pieces_.size(),
                      ": expected a type in [1, 6], got ", v);
          piece.type = static_cast<Type>(v);
        } else {
          s.skip(ty);
        }
      }
      TORCH_CHECK(t->pieces_.size() < (size_t{1} << 24), source, ": expected at most 2^24 pieces");
      t->pieces_.push_back(std::move(piece));
    } else if (field == 2 && type == 2) {  // TrainerSpec
      Wire s = w.sub();
      while (!s.done()) {
        auto [f, ty] = s.key();
        if (ty != 0) {
          s.skip(ty);
          continue;
        }
        const auto v = static_cast<int64_t>(static_cast<int32_t>(s.varint()));  // int32 fields
        if (f == 3) model_type = v;
        if (f == 35) t->byte_fallback_ = v != 0;
        if (f == 40) unk = v;
        if (f == 41) bos = v;
        if (f == 42) eos = v;
      }
    } else if (field == 3 && type == 2) {  // NormalizerSpec
      Wire s = w.sub();
      while (!s.done()) {
        auto [f, ty] = s.key();
        if (f == 1 && ty == 2) {
          normalizer = s.bytes();
        } else if (f == 2 && ty == 2) {
          has_charsmap = !s.bytes().empty();
        } else if (f == 3 && ty == 0) {
          t->add_dummy_prefix_ = s.varint() != 0;
        } else if (f == 4 && ty == 0) {
          t->remove_extra_whitespaces_ = s.varint() != 0;
        } else {
          s.skip(ty);
        }
      }
    } else {
      w.skip(type);
    }
  }
  static const char* kTypes[] = {"", "UNIGRAM", "BPE", "WORD", "CHAR"};
  TORCH_CHECK(model_type == 2, source,
              ": unsupported SentencePiece model: expected model_type BPE (LLaMA-1/2), got ",
              model_type >= 1 && model_type <= 4 ? kTypes[model_type] : std::to_string(model_type).c_str());
  TORCH_CHECK(normalizer == "identity" || (!has_charsmap && normalizer.empty()), source,
              ": unsupported SentencePiece normalizer: expected 'identity' (LLaMA-1/2), got '", normalizer,
              "'");
  TORCH_CHECK(!t->pieces_.empty(), source, ": expected a SentencePiece model with pieces, got none");
  const auto n = static_cast<int64_t>(t->pieces_.size());
  std::fill(std::begin(t->byte_ids_), std::end(t->byte_ids_), -1);
  for (int64_t i = 0; i < n; ++i) {
    const Piece& p = t->pieces_[static_cast<size_t>(i)];
    TORCH_CHECK(p.type != Type::user_defined, source,
                ": unsupported SentencePiece model: user-defined piece '", p.text, "' (id ", i, ")");
    TORCH_CHECK(t->all_.emplace(p.text, i).second, source, ": piece '", p.text, "' appears twice");
    if (p.type == Type::normal) t->mergeable_.emplace(p.text, i);
    if (p.type == Type::byte) {
      unsigned v = 0;
      TORCH_CHECK(p.text.size() == 6 && std::sscanf(p.text.c_str(), "<0x%2X>", &v) == 1, source,
                  ": byte piece: expected '<0xXX>', got '", p.text, "'");
      t->byte_ids_[v] = i;
    }
  }
  if (t->byte_fallback_) {
    for (int b = 0; b < 256; ++b) {
      TORCH_CHECK(t->byte_ids_[b] >= 0, source, ": byte_fallback is on but byte piece <0x", std::hex, b,
                  "> is missing");
    }
  }
  TORCH_CHECK(unk >= 0 && unk < n && t->pieces_[static_cast<size_t>(unk)].type == Type::unknown, source,
              ": expected unk_id to name the <unk> piece, got ", unk);
  t->unk_ = unk;
  auto control = [&](int64_t id) -> std::optional<int64_t> {
    if (id >= 0 && id < n && t->pieces_[static_cast<size_t>(id)].type == Type::control) return id;
    return std::nullopt;
  };
  t->bos_ = control(bos);
  t->eos_ = control(eos);
  return t;
}

std::unique_ptr<SentencePieceTokenizer> SentencePieceTokenizer::from_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  TORCH_CHECK(f.good(), path, ": expected a readable tokenizer.model, got none");
  std::ostringstream ss;
  ss << f.rdbuf();
  const std::string bytes = ss.str();
  TORCH_CHECK(bytes.size() <= (size_t{256} << 20), path, ": expected at most 256 MiB, got ", bytes.size(),
              " bytes");
  return from_bytes(bytes, path);
}

const std::string& SentencePieceTokenizer::piece(int64_t id) const {
  TORCH_CHECK(id >= 0 && id < vocab_size(), "SentencePieceTokenizer: id: expected in [0, ", vocab_size(),
              "), got ", id);
  return pieces_[static_cast<size_t>(id)].text;
}

std::string SentencePieceTokenizer::normalize(const std::string& text) const {
  std::string s = text;
  if (remove_extra_whitespaces_) {  // leading, trailing and repeated spaces go
    std::string t;
    for (char c : s) {
      if (c == ' ' && (t.empty() || t.back() == ' ')) continue;
      t.push_back(c);
    }
    while (!t.empty() && t.back() == ' ') t.pop_back();
    s = t;
  }
  if (s.empty()) return s;
  std::string out = add_dummy_prefix_ ? kSpace : "";
  for (char c : s) {
    if (c == ' ') {
      out += kSpace;
    } else {
      out.push_back(c);
    }
  }
  return out;
}

std::vector<std::string> SentencePieceTokenizer::encode_pieces(const std::string& text) const {
  const std::vector<int64_t> ids = encode(text);
  std::vector<std::string> out;
  for (int64_t id : ids) out.push_back(piece(id));
  return out;
}

std::vector<int64_t> SentencePieceTokenizer::encode(const std::string& text) const {
  const std::string s = normalize(text);
  struct Symbol {
    int prev, next;
    size_t start, len;
  };
  std::vector<Symbol> sym;
  for (size_t i = 0; i < s.size();) {
    const size_t n = utf8_len(s, i);
    const int idx = static_cast<int>(sym.size());
    sym.push_back({idx - 1, idx + 1, i, n});
    i += n;
  }
  if (sym.empty()) return {};
  sym.back().next = -1;
  struct Pair {
    float score;
    int left, right;
    size_t len;
  };
  // Highest score first; equal scores: the leftmost pair (SentencePiece's order).
  auto cmp = [](const Pair& a, const Pair& b) {
    return a.score != b.score ? a.score < b.score : a.left > b.left;
  };
  std::priority_queue<Pair, std::vector<Pair>, decltype(cmp)> agenda(cmp);
  auto try_pair = [&](int l, int r) {
    if (l < 0 || r < 0) return;
    auto it = mergeable_.find(s.substr(sym[static_cast<size_t>(l)].start,
                                       sym[static_cast<size_t>(l)].len + sym[static_cast<size_t>(r)].len));
    if (it == mergeable_.end()) return;
    agenda.push({pieces_[static_cast<size_t>(it->second)].score, l, r,
                 sym[static_cast<size_t>(l)].len + sym[static_cast<size_t>(r)].len});
  };
  for (size_t i = 0; i + 1 < sym.size(); ++i) try_pair(static_cast<int>(i), static_cast<int>(i) + 1);
  while (!agenda.empty()) {
    const Pair top = agenda.top();
    agenda.pop();
    Symbol& l = sym[static_cast<size_t>(top.left)];
    Symbol& r = sym[static_cast<size_t>(top.right)];
    // Stale: one side was merged since this pair was queued.
    if (l.len == 0 || r.len == 0 || l.next != top.right || l.len + r.len != top.len) continue;
    l.len += r.len;
    r.len = 0;
    l.next = r.next;
    if (r.next >= 0) sym[static_cast<size_t>(r.next)].prev = top.left;
    try_pair(l.prev, top.left);
    try_pair(top.left, l.next);
  }
  std::vector<int64_t> ids;
  for (int i = 0; i >= 0; i = sym[static_cast<size_t>(i)].next) {
    const Symbol& x = sym[static_cast<size_t>(i)];
    const std::string w = s.substr(x.start, x.len);
    auto it = all_.find(w);
    if (it != all_.end() && pieces_[static_cast<size_t>(it->second)].type != Type::control &&
        pieces_[static_cast<size_t>(it->second)].type != Type::byte) {
      ids.push_back(it->second);
    } else if (byte_fallback_) {
      for (char c : w) ids.push_back(byte_ids_[static_cast<uint8_t>(c)]);
    } else {
      ids.push_back(unk_);
    }
  }
  return ids;
}

std::string SentencePieceTokenizer::decode(const std::vector<int64_t>& ids) const {
  std::string out;
  bool first = true;
  for (int64_t id : ids) {
    TORCH_CHECK(id >= 0 && id < vocab_size(), "SentencePieceTokenizer::decode: expected ids in [0, ",
                vocab_size(), "), got ", id);
    const Piece& p = pieces_[static_cast<size_t>(id)];
    std::string text;
    switch (p.type) {
      case Type::control:
        continue;
      case Type::byte: {
        unsigned v = 0;
        std::sscanf(p.text.c_str(), "<0x%2X>", &v);
        text.push_back(static_cast<char>(v));
        break;
      }
      case Type::unknown:
        text = " \xE2\x81\x87 ";
        break;
      default:
        for (size_t i = 0; i < p.text.size();) {
          if (p.text.compare(i, kSpace.size(), kSpace) == 0) {
            text.push_back(' ');
            i += kSpace.size();
          } else {
            text.push_back(p.text[i++]);
          }
        }
    }
    // The dummy prefix: the first piece's leading space is not part of the text.
    if (first && add_dummy_prefix_ && !text.empty() && text[0] == ' ' && p.type != Type::byte)
      text.erase(0, 1);
    first = false;
    out += text;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir) {
  const std::string marker = dir + "/msbnb_tokenizer.json", spm = dir + "/tokenizer.model";
  if (fs::exists(marker)) {
    std::ifstream f(marker, std::ios::binary);
    std::ostringstream ss;
    ss << f.rdbuf();
    nlohmann::json j;
    try {
      j = io::detail::parse_json_strict(ss.str(), 4, marker);
    } catch (const io::FormatError& e) {
      TORCH_CHECK(false, e.what());
    }
    TORCH_CHECK(j.is_object() && j.contains("type") && j["type"].is_string(), marker,
                ": expected {\"type\": \"byte\"}, got ", io::detail::shown(j));
    const std::string type = j["type"].get<std::string>();
    TORCH_CHECK(type == "byte", marker, ": unsupported tokenizer type: expected \"byte\", got '", type, "'");
    return std::make_unique<ByteTokenizer>();
  }
  if (fs::exists(spm)) return SentencePieceTokenizer::from_file(spm);
  TORCH_CHECK(!fs::exists(dir + "/tokenizer.json"), dir,
              ": unsupported tokenizer: found only tokenizer.json (a Hugging Face fast tokenizer, e.g. Llama "
              "3's); msbnb "
              "reads tokenizer.model (SentencePiece BPE) or msbnb_tokenizer.json (byte-level)");
  TORCH_CHECK(false, dir, ": expected a tokenizer (tokenizer.model or msbnb_tokenizer.json), found none");
}

}  // namespace msbnb::models
