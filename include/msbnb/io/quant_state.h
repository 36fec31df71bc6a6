// The JSON bitsandbytes stores beside a 4-bit weight, in the uint8 tensor
// `<prefix>.weight.quant_state.bitsandbytes__nf4` (or `__fp4`) of a checkpoint (DESIGN.md,
// Checkpoint keys): QuantState.as_dict(packed=True) -> utils.pack_dict_to_tensor, i.e.
// json.dumps of {"quant_type", "blocksize", "dtype", "shape"[, "nested_blocksize",
// "nested_dtype", "nested_offset"]} in UTF-8. No libtorch: errors are FormatError
// (std::runtime_error) naming the key, the expected and the actual value.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "msbnb/io/safetensors_format.h"  // FormatError

namespace msbnb::io {

struct QuantStateJson {
  std::string quant_type;          // "nf4" or "fp4"
  int64_t blocksize = 64;          // 32, 64, ..., 4096 (bitsandbytes' accepted 4-bit block sizes)
  std::string dtype;               // dtype of the unquantized weight: "float32", "float16", "bfloat16"
  std::vector<int64_t> shape;      // of the unquantized weight; entries > 0, product < 2^63
  bool nested = false;             // double quantization: the three fields below are present
  int64_t nested_blocksize = 256;  // block of the absmax quantization (bitsandbytes uses 256)
  std::string nested_dtype = "float32";
  double nested_offset = 0;  // mean subtracted from absmax before quantizing it; finite

  int64_t numel() const;  // product of shape
  bool operator==(const QuantStateJson& o) const;
  bool operator!=(const QuantStateJson& o) const { return !(*this == o); }
};

/// Parses and validates the JSON text. Every field is checked: quant_type nf4 | fp4, blocksize
/// and nested_blocksize powers of two in [32, 4096], dtypes float32 | float16 | bfloat16, shape
/// a list of positive integers whose product does not overflow, nested_offset a finite number,
/// the nested fields all present or all absent, no unknown or duplicate key. `source` (for
/// example the tensor's name) prefixes messages. Throws FormatError.
QuantStateJson parse_quant_state_json(const std::string& json, const std::string& source = "quant_state");

/// The JSON text exactly as bitsandbytes writes it (json.dumps: that key order, ", " and ": "
/// separators, nested_offset as Python's repr of the double). Validates `qs` as the parser does.
std::string quant_state_json(const QuantStateJson& qs);

/// "quant_state.bitsandbytes__nf4" or "...__fp4": the key suffix of the packed tensor.
std::string quant_state_key_suffix(const std::string& quant_type);

}  // namespace msbnb::io
