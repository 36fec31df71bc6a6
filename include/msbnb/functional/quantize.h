// Functional quantization API on torch::Tensor (CPU). Names follow the seed package
// ("MindSpore BitsAndBytes") and bitsandbytes.functional; numerics are DESIGN.md's / docs/formats.md.
//
// Every function checks its inputs and throws c10::Error (std::exception) with a message naming
// the argument, what was expected and what came: dtype (float32 / float16 / bfloat16 inputs),
// device (CPU), empty tensors, NaN / Inf, block or group sizes, and states that do not match the
// data. Non-contiguous inputs are accepted (copied once). Inputs are never modified.
#pragma once
#include <torch/arg.h>
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace msbnb {

// ---------------------------------------------------------------------------------------------
// int8

/// Which elements share one scale.
enum class Granularity { per_tensor, per_channel, per_block };

/// Options of quantize_8bit, in libtorch's dialect (TORCH_ARG: `o.symmetric(false)` sets,
/// `o.symmetric()` reads). Per channel means per row of dim 0 (the output channel of a
/// [out_features, in_features] weight); per block means blocks of `blocksize` elements of the
/// flattened tensor (the last one may be short; `blocksize` is used only per block).
/// Example:
///   auto q = msbnb::quantize_8bit(w, msbnb::Int8Options().symmetric(false).granularity(
///                                        msbnb::Granularity::per_tensor));
struct Int8Options {
  /// true: q in [-127, 127], no offset; false: [-128, 127] with a zero point.
  TORCH_ARG(bool, symmetric) = true;
  /// Which elements share one scale.
  TORCH_ARG(Granularity, granularity) = Granularity::per_channel;
  /// Elements per block for Granularity::per_block (> 0).
  TORCH_ARG(int64_t, blocksize) = 4096;
};

/// Result of quantize_8bit.
///  weight_int8  int8, the input's shape. Symmetric: q in [-127, 127], w' = q * scale.
///               Asymmetric: q in [-128, 127], w' = (q + offset) * scale.
///  scale        float32 [1] (per tensor), [size(0)] (per channel) or [blocks] (per block).
///  offset       float32, scale's shape, integral values: MindSpore's antiquant offset, i.e. minus
///               the zero point z of q = round(w / scale) + z. Undefined for symmetric.
struct Int8Quantized {
  torch::Tensor weight_int8, scale, offset;
  Int8Options options;
  torch::ScalarType dtype = torch::kFloat32;  // dtype of the original tensor
};

/// Quantizes a float32 / float16 / bfloat16 tensor to int8.
/// Example: auto q = msbnb::quantize_8bit(w);  auto w2 = msbnb::dequantize_8bit(q);
Int8Quantized quantize_8bit(const torch::Tensor& x, const Int8Options& options = {});
/// Inverse of quantize_8bit, as `dtype` (default: the original dtype).
torch::Tensor dequantize_8bit(const Int8Quantized& q, c10::optional<torch::ScalarType> dtype = c10::nullopt);
/// The same from separate tensors (offset may be undefined for symmetric).
torch::Tensor dequantize_8bit(const torch::Tensor& weight_int8, const torch::Tensor& scale,
                              const torch::Tensor& offset, const Int8Options& options,
                              torch::ScalarType dtype = torch::kFloat32);

// ---------------------------------------------------------------------------------------------
// 4-bit (int4 per group, NF4, FP4) and blockwise 8-bit

/// Everything needed to dequantize, as bitsandbytes' QuantState.
///  quant_type  "nf4" | "fp4" (bitsandbytes layout) | "int4" (MindSpore qint4x2) | "dynamic8".
///  shape, dtype  of the original tensor.
///  blocksize   nf4 / fp4 / dynamic8: elements per block of the flattened tensor;
///              int4: group size along the last dimension.
///  absmax      per-block statistic, float32: absmax (nf4 / fp4 / dynamic8), or the int4 scale
///              [rows, groups]. With double quantization (state2 set) it is uint8 codes instead,
///              and absmax = state2.code[q] * state2.absmax[i / 256] + offset.
///  code        float32 codebook: [16] (nf4 / fp4; the quant_map), [256] (dynamic8); undefined
///              for int4.
///  offset      float32 scalar: mean of the absmax that was double-quantized.
///  zero_point  int4 asymmetric only: uint8 [rows, groups] in [0, 15], w' = (q - zp) * scale.
struct QuantState {
  std::string quant_type;
  std::vector<int64_t> shape;
  torch::ScalarType dtype = torch::kFloat32;
  int64_t blocksize = 64;
  torch::Tensor absmax, code, offset, zero_point;
  std::shared_ptr<QuantState> state2;

  bool nested() const { return state2 != nullptr; }
  int64_t numel() const;
};

/// Options of quantize_4bit, in libtorch's dialect (TORCH_ARG: `o.quant_type("nf4")` sets,
/// `o.quant_type()` reads). Names and defaults are bitsandbytes' quantize_4bit (quant_type
/// "fp4", no double quantization) where it has them.
///  quant_type           "nf4" | "fp4" (bitsandbytes layout) | "int4" (MindSpore qint4x2).
///  blocksize            nf4 / fp4: elements per block of the flattened tensor, a power of two in
///                       [32, 4096]; int4: group size along the last dimension, even, >= 2.
///                       Unset (std::nullopt): the format's default_block in formats.def, i.e.
///                       128 for int4 and 64 for nf4 / fp4 (bitsandbytes). See
///                       effective_blocksize().
///  compress_statistics  double-quantize absmax / scales (blockwise 8-bit, blocks of 256).
///  symmetric            int4 only: false gives uint4 with a zero point. nf4 / fp4 are symmetric
///                       codebooks: symmetric(false) with them throws.
/// Example:
///   auto q = msbnb::quantize_4bit(w, msbnb::Quantize4bitOptions().quant_type("int4"));  // group 128
///   auto n = msbnb::quantize_4bit(w,
///   msbnb::Quantize4bitOptions().quant_type("nf4").compress_statistics(true));
struct Quantize4bitOptions {
  /// The block or group size quantize_4bit uses: blocksize() if set, else the format's default
  /// (int4: 128, nf4 / fp4: 64). Throws c10::Error for an unknown quant_type.
  int64_t effective_blocksize() const;

  TORCH_ARG(std::string, quant_type) = "fp4";
  TORCH_ARG(std::optional<int64_t>, blocksize) = std::nullopt;
  TORCH_ARG(bool, compress_statistics) = false;
  TORCH_ARG(bool, symmetric) = true;
};

struct Quantized4bit {
  /// nf4 / fp4: uint8 [(numel + 1) / 2, 1], first element of a pair in the HIGH nibble.
  /// int4: uint8 [rows, (cols + 1) / 2] with cols = size(-1), element 2j in the LOW nibble.
  torch::Tensor data;
  QuantState state;
};

/// Quantizes to 4 bits. Example:
///   auto [packed, state] = msbnb::quantize_4bit(w, msbnb::Quantize4bitOptions().quant_type("nf4"));
///   torch::Tensor w2 = msbnb::dequantize_4bit(packed, state);
Quantized4bit quantize_4bit(const torch::Tensor& x, const Quantize4bitOptions& options = {});
/// Inverse of quantize_4bit: a tensor of state.shape and state.dtype.
torch::Tensor dequantize_4bit(const torch::Tensor& data, const QuantState& state);

struct QuantizedBlockwise {
  torch::Tensor data;  // uint8, the input's shape
  QuantState state;    // quant_type "dynamic8"
};

/// Blockwise 8-bit with a 256-entry codebook (default: the signed dynamic map), absmax per block
/// of the flattened tensor (bitsandbytes.functional.quantize_blockwise). With `nested`, the
/// absmax is itself double-quantized.
QuantizedBlockwise quantize_blockwise(const torch::Tensor& x, int64_t blocksize = 4096,
                                      const torch::Tensor& code = {}, bool nested = false);
torch::Tensor dequantize_blockwise(const torch::Tensor& data, const QuantState& state);

// ---------------------------------------------------------------------------------------------
// Generic front end, packing, scales

/// A tensor quantized to `bits` (8: int8, 4: int4 qint4x2 along the last dimension).
struct QuantizedTensor {
  torch::Tensor data;    // int8 (bits 8) or packed uint8 (bits 4)
  torch::Tensor scale;   // float32: [1] or [size(0)] (8 bits); [rows, 1] (4 bits)
  torch::Tensor offset;  // MindSpore offset (minus zero point), float32; undefined if symmetric
  int bits = 8;
  bool symmetric = true;
  bool per_channel = true;
  std::vector<int64_t> shape;
  torch::ScalarType dtype = torch::kFloat32;
};

/// Quantizes with one scale per tensor or per channel (dim 0), to 8 or 4 bits.
QuantizedTensor quantize_tensor(const torch::Tensor& x, int bits = 8, bool symmetric = true,
                                bool per_channel = true);
torch::Tensor dequantize_tensor(const QuantizedTensor& q);

/// Packs int8 values in [-8, 7] along the last dimension into MindSpore qint4x2: uint8
/// [..., (cols + 1) / 2], element 2j in the LOW nibble, two's complement, odd cols padded with 0.
torch::Tensor pack_int4_to_qint4x2(const torch::Tensor& values);
/// Inverse: int8 [..., cols] in [-8, 7]; `cols` defaults to 2 * size(-1).
torch::Tensor unpack_qint4x2_to_int8(const torch::Tensor& packed, int64_t cols = -1);

struct ScaleOffset {
  torch::Tensor scale;   // float32 [1] or [size(0)]
  torch::Tensor offset;  // float32, MindSpore convention (minus zero point); zeros if symmetric
};
/// Scale and offset for `bits` (2..8) over the tensor or per channel (dim 0). Symmetric:
/// scale = absmax / (2^(bits-1) - 1). Asymmetric: [min(x, 0), max(x, 0)] onto
/// [-2^(bits-1), 2^(bits-1) - 1].
ScaleOffset compute_scale_offset(const torch::Tensor& x, int bits = 8, bool symmetric = true,
                                 bool per_channel = true);

/// bitsandbytes.functional.create_dynamic_map: float32 [256], sorted.
torch::Tensor create_dynamic_map(bool is_signed = true, int max_exponent_bits = 7, int total_bits = 8);
/// bitsandbytes.functional.create_normal_map: float32 [256] (the NF4 values and zeros), sorted.
torch::Tensor create_normal_map(double offset = 0.9677083, bool use_extra_value = true);

// ---------------------------------------------------------------------------------------------
// Statistics

/// Error of a reconstruction against the original, computed in double.
///  mean_error      mean |x - x'|          max_error   max |x - x'|
///  relative_error  100 * ||x - x'|| / ||x|| (Frobenius, in %)
///  snr_db          10 log10(sum x^2 / sum (x - x')^2)  (+inf when exact)
///  mse             mean (x - x')^2        cosine      <x, x'> / (||x|| ||x'||)
struct QuantizationError {
  double mean_error = 0, max_error = 0, relative_error = 0, snr_db = 0, mse = 0, cosine = 0;
};
QuantizationError estimate_quantization_error(const torch::Tensor& original,
                                              const torch::Tensor& dequantized);

/// What a quantized tensor costs and holds.
///  bits_per_weight    all stored bits (codes, scales, offsets, nested statistics) / numel
///  compression_ratio  bits of the original dtype / bits_per_weight
///  scale_*            over the per-block scales (absmax for nf4 / fp4 / dynamic8)
///  weight_*           over the dequantized values
struct QuantizationInfo {
  std::string format;
  std::vector<int64_t> shape;
  int64_t numel = 0;
  int64_t storage_bytes = 0;
  double bits_per_weight = 0, compression_ratio = 0;
  double scale_min = 0, scale_max = 0, scale_mean = 0;
  double weight_min = 0, weight_max = 0;
};
QuantizationInfo get_quantization_info(const torch::Tensor& data, const QuantState& state);
QuantizationInfo get_quantization_info(const Int8Quantized& q);

}  // namespace msbnb
