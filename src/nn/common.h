// Helpers shared by the nn modules and the state-dict walker (private to src/nn).
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "msbnb/functional/quantize.h"
#include "msbnb/nn/quantized_module.h"

namespace msbnb::nn::detail {

inline std::string shape_str(c10::IntArrayRef s) {
  std::ostringstream o;
  o << s;
  return o.str();
}

/// "float32", "float16", "bfloat16" (bitsandbytes' str(dtype).strip("torch.")); throws otherwise.
std::string dtype_name(torch::Dtype dt);
/// Inverse of dtype_name; throws naming `arg` for anything else.
torch::Dtype dtype_from_name(const std::string& name, const std::string& arg);
/// float32, float16 or bfloat16, else throws naming `arg`.
void check_float_dtype(torch::Dtype dt, const std::string& arg);

/// Python's repr(float) (what json.dumps writes for a float): shortest round-trip digits,
/// fixed notation for 1e-4 <= |v| < 1e16, else d.ddde[+-]XX; "NaN", "Infinity", "-Infinity".
std::string python_float_repr(double v);

/// x as a module input: defined, on the CPU, float32 / float16 / bfloat16, last dim `in`.
void check_input(const torch::Tensor& x, int64_t in, const char* what);
/// A float weight of shape [rows, cols], CPU, finite.
void check_weight(const torch::Tensor& w, int64_t rows, int64_t cols, const char* rows_name,
                  const char* cols_name);
/// Module device / dtype for to(): CPU only, float dtypes only. `module` names the module.
void check_to_device(const torch::Device& device, const char* module);
void check_to_dtype(torch::Dtype dtype, const char* module);
/// A positive size option.
void check_positive(int64_t v, const char* arg);
/// quant_type in {nf4, fp4, int4}, blocksize valid for it, symmetric only with int4.
void check_4bit_options(const std::string& quant_type, int64_t blocksize, bool symmetric);

/// The float32 [16] codebook of nf4 / fp4 (as msbnb::quantize_4bit writes it as state.code).
torch::Tensor codebook(const std::string& quant_type);
/// The signed dynamic map float32 [256] (the nested quant_map of double quantization).
torch::Tensor dynamic_map();
/// Blocks of double quantization (bitsandbytes' nested blocksize).
constexpr int64_t kNestedBlocksize = 256;

/// a * b, refused (naming `arg`) when it overflows or exceeds 2^59 elements.
int64_t checked_mul(int64_t a, int64_t b, const std::string& arg);
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/// The quant state JSON as bitsandbytes' pack_dict_to_tensor writes it (json.dumps: ", " and
/// ": " separators, keys in QuantState.as_dict order), as a uint8 tensor. int4 adds
/// "symmetric" after "shape".
torch::Tensor quant_state_json(const QuantState& s, bool int4_symmetric);
std::string quant_state_json_string(const QuantState& s, bool int4_symmetric);

/// A parsed and validated quant state JSON (the non-tensor fields).
struct ParsedQuantState {
  std::string quant_type;
  int64_t blocksize = 0;
  torch::Dtype dtype = torch::kFloat32;
  std::vector<int64_t> shape;
  bool nested = false;
  int64_t nested_blocksize = 0;
  float nested_offset = 0;
  std::optional<bool> symmetric;  // int4 only
};
/// Parses the uint8 JSON tensor `t` (key `key` for messages): UTF-8 object with exactly the keys
/// bitsandbytes writes (plus "symmetric" for int4), each of the right JSON type and range.
ParsedQuantState parse_quant_state(const torch::Tensor& t, const std::string& key);

/// The entry `key` of `entries`, or throws (an internal error: the walker passes exactly the
/// module's keys).
const torch::Tensor& entry(const std::map<std::string, torch::Tensor>& entries, const std::string& key,
                           const std::string& prefix);
/// Checks dtype and exact shape of a checkpoint tensor.
void check_entry(const torch::Tensor& t, const std::string& name, torch::Dtype dtype,
                 const std::vector<int64_t>& shape);
/// Checks all values finite.
void check_entry_finite(const torch::Tensor& t, const std::string& name);

/// Bytes of every parameter and buffer of a module (not recursing).
int64_t tensor_bytes(const torch::Tensor& t);

/// The 4-bit checkpoint keys of a weight prefix ("weight"): relative names in bitsandbytes'
/// order (absmax, quant_map, nested_absmax, nested_quant_map, quant_state); int4 has scale
/// (instead of absmax), zero_point (asymmetric), no quant_map.
std::vector<std::string> keys_4bit(const std::string& quant_type, bool nested, bool asymmetric);
/// The interchange tensors of (data, state) under keys_4bit's names (weight first).
NamedTensors state_4bit(const Quantized4bit& q, torch::Dtype weight_dtype, bool symmetric);
/// Validates the 4-bit entries against the expected configuration and returns (data, state)
/// ready for PackedWeight::from_4bit / dequantize_4bit. `rows`, `cols` the 2-D weight shape.
Quantized4bit load_4bit(const std::map<std::string, torch::Tensor>& entries, const std::string& prefix,
                        const std::string& quant_type, int64_t blocksize, bool nested, bool symmetric,
                        int64_t rows, int64_t cols, torch::Dtype* weight_dtype);
/// A float bias from a checkpoint: floating dtype, shape [n], finite.
torch::Tensor load_bias(const std::map<std::string, torch::Tensor>& entries, const std::string& prefix,
                        int64_t n);

}  // namespace msbnb::nn::detail
