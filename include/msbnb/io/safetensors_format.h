// The safetensors byte format without libtorch: parsing and validating a header from a memory
// buffer, and serializing one. msbnb/io/safetensors.h builds tensors on top of it; the fuzzer
// (fuzz/fuzz_safetensors.cpp) links this layer alone.
//
// Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
// N bytes of UTF-8 JSON {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
// ..., "__metadata__": {"k": "v"}}, then the data section; offsets are relative to its start.
//
// The parser trusts nothing. It refuses, with a FormatError naming the source (file name) and
// the tensor, what was expected and what came:
//  - a buffer shorter than 8 bytes, N > 100 000 000 (the reference implementation's limit),
//    N > size - 8, a header not starting with '{';
//  - JSON that is malformed, not an object of objects, nested deeper than a header can be, with
//    a duplicate key (at any level), or with unknown keys in a tensor entry;
//  - an unknown dtype, a shape entry that is negative or not an integer, a shape whose element
//    count × dtype size overflows 64 bits or differs from end - begin, a sub-byte dtype whose
//    bit count is not a whole number of bytes;
//  - data_offsets that are not two integers begin <= end, a span past the data section, spans
//    that overlap, and (as the specification requires, against polyglot files) spans that leave
//    a hole or do not reach the end of the data section: sorted by begin, the spans tile
//    [0, size - 8 - N) exactly;
//  - __metadata__ that is not an object of string values.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace msbnb::io {

/// A malformed or hostile file (safetensors header, quant_state JSON). The libtorch layer
/// (msbnb/io/safetensors.h) rethrows it as c10::Error.
class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Every dtype the safetensors specification names (libtorch 1.13 lacks the unsigned > 8-bit,
/// float8, float6 and float4 ones: the parser accepts them, SafetensorsFile::get refuses them).
enum class StDtype {
  BOOL,
  U8,
  I8,
  I16,
  U16,
  F16,
  BF16,
  I32,
  U32,
  F32,
  C64,
  F64,
  I64,
  U64,
  F8_E4M3,
  F8_E5M2,
  F8_E4M3FNUZ,
  F8_E5M2FNUZ,
  F8_E8M0,
  F6_E2M3,
  F6_E3M2,
  F4,
};

/// "F32", "BF16", ... as written in the header.
const char* dtype_name(StDtype d);
/// Bits per element (BOOL: 8, F4: 4, F6_*: 6).
int dtype_bits(StDtype d);
/// The dtype a header names, or nullopt.
std::optional<StDtype> dtype_from_name(std::string_view name);

/// One tensor of a header. begin / end: byte offsets relative to the data section.
struct TensorEntry {
  std::string name;
  StDtype dtype = StDtype::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;
  uint64_t nbytes() const { return end - begin; }
  int64_t numel() const;  // product of shape (1 for a scalar), checked not to overflow
};

/// A parsed, validated header.
struct SafetensorsHeader {
  std::vector<TensorEntry> tensors;             // sorted by name, names unique
  std::map<std::string, std::string> metadata;  // __metadata__ (empty if absent)
  uint64_t data_start = 0;                      // offset of the data section in the buffer: 8 + N
  uint64_t data_size = 0;                       // size - data_start
  /// The entry named `name`, or nullptr.
  const TensorEntry* find(std::string_view name) const;
};

/// Parses and validates the header of a safetensors file held in `data[0, size)` (the whole
/// file: the spans are checked against `size`). `source` names the file in error messages.
/// Throws FormatError.
SafetensorsHeader parse_safetensors_header(const uint8_t* data, size_t size, const std::string& source);

/// The 8-byte length and the JSON header for `tensors` (in this order; their begin / end must
/// tile the data section from 0, as the writer lays them out) and `metadata`, padded with
/// spaces so that the data section starts at a multiple of 8. Keys are written sorted (JSON
/// objects are unordered; sorting makes files reproducible). Throws FormatError on duplicate
/// names, the reserved name "__metadata__", or spans that do not tile.
std::string serialize_safetensors_header(const std::vector<TensorEntry>& tensors,
                                         const std::map<std::string, std::string>& metadata);

}  // namespace msbnb::io
