// Fused quantized matmul on torch::Tensor (CPU): y = x · dequant(W)ᵀ + bias without
// materialising dequant(W), its transposed product for backward, and LLM.int8().
// Kernels and numerics: msbnb/kernels/matmul.h, docs/matmul.md.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "msbnb/functional/quantize.h"
#include "msbnb/kernels/matmul.h"

namespace msbnb {

/// exact: fp32 activations, weights decoded exactly as dequantize gives them.
/// fast:  4-bit weights multiply in bf16 (~0.2 % error), int8 weights with activations
///        quantized per row to int8 (LLM.int8() numerics, ~0.9 % error on Gaussian rows).
/// int8:  int8 activations for 4-bit weights too: per block of 64 / 128 with the weight's codes
///        as int8 through a byte table up to 8 rows (the fastest decode, ~0.6-0.9 % error),
///        rows requantized to int8 and the int8 GEMM above (~1.2 %, more with outliers).
/// automatic: exact for every batch size (the fast paths change the class of error: opt in);
///        LLM.int8() with a threshold is int8_matmul. docs/matmul.md has the bounds per format.
using MatmulPath = kernels::MatmulPath;

/// What a packed weight is besides its tensors: enough to allocate one (zeros) or to rebuild one
/// over tensors that were cloned, moved or loaded (from_tensors). A torch::nn module keeps this
/// and registers tensors() as its buffers.
///
/// The tensors of each layout (tensors() gives them in this order; all CPU, contiguous, 1-D unless
/// noted; stats = the Lut4Layout's padded statistics count, blocks = ceil(out * in / blocksize)
/// for nf4 / fp4 and out * ceil(in / blocksize) for int4):
///   nf4 / fp4      "codes" uint8 [codes_bytes] (64-byte aligned), "scale" float32 [stats] (the
///                  absmax as given, zero padded), "code" float32 [16] (the codebook as given).
///   + double_quant instead of "scale": "absmax" uint8 [blocks], "nested_absmax" float32
///                  [ceil(blocks / nested_blocksize)], "nested_code" float32 [256], "offset"
///                  float32 [] (bitsandbytes' tensors as given; absmax = nested_code[absmax] *
///                  nested_absmax[block / nested_blocksize] + offset is decoded by the kernels).
///   int4           "codes", "scale" float32 [stats], and with asymmetric "zero_point" float32
///                  [stats] (integral); double_quant replaces "scale" as for nf4 / fp4 (no "code").
///   int8           "codes" uint8 [out * round_up(in, 64)], "scale" float32 [out] (per_tensor:
///                  the scale repeated), with asymmetric "offset" float32 [out], "row_sum" int32
///                  [out] (sum of each row's codes), and with scb "SCB" float32 [out] as given.
struct PackedLayout {
  std::string format;  // "nf4", "fp4", "int4" or "int8"
  int64_t out_features = 0, in_features = 0;
  int64_t blocksize = 0;      // nf4 / fp4 block, int4 group size; 0 for int8
  bool asymmetric = false;    // int4 with zero points, int8 with offsets
  bool double_quant = false;  // 4-bit with double-quantized (nested) absmax / scales
  bool scb = false;           // int8 made by from_int8_scb (LLM.int8(): SCB kept as given)
  Granularity granularity = Granularity::per_channel;  // int8: per_channel or per_tensor
  torch::ScalarType dtype = torch::kFloat32;           // the original weight's dtype (state.dtype / q.dtype)
  int64_t nested_blocksize = 256;                      // double_quant: statistics per nested absmax
  bool operator==(const PackedLayout& o) const {
    return format == o.format && out_features == o.out_features && in_features == o.in_features &&
           blocksize == o.blocksize && asymmetric == o.asymmetric && double_quant == o.double_quant &&
           scb == o.scb && granularity == o.granularity && dtype == o.dtype &&
           nested_blocksize == o.nested_blocksize;
  }
  bool operator!=(const PackedLayout& o) const { return !(*this == o); }
};

/// A 2-D quantized weight [out_features, in_features] repacked once into the kernels' private
/// layout. Converting back (to_4bit / to_8bit) gives the interchange tensors bit for bit.
/// Copies share the packed data (it is immutable).
class PackedWeight {
 public:
  PackedWeight() = default;
  /// nf4 / fp4 (with or without double quantization) or int4 (sym / asym) of a 2-D weight.
  static PackedWeight from_4bit(const torch::Tensor& data, const QuantState& state);
  /// int8 of a 2-D weight, per channel or per tensor, symmetric or asymmetric.
  static PackedWeight from_8bit(const Int8Quantized& q);
  /// bitsandbytes' LLM.int8() layout: CB int8 [out, in] and SCB float32 [out] (row absmax).
  static PackedWeight from_int8_scb(const torch::Tensor& CB, const torch::Tensor& SCB);

  /// A weight of `layout` whose codes and statistics are all zero (it multiplies to 0): what a
  /// module registers as buffers before weights are quantized or loaded into them.
  static PackedWeight zeros(const PackedLayout& layout);
  /// A weight over `tensors` (views, no copy): the names, dtypes and shapes that tensors() of a
  /// weight of `layout` has, CPU, contiguous, "codes" 64-byte aligned. Anything else throws,
  /// naming the tensor, what was expected and what came.
  static PackedWeight from_tensors(const PackedLayout& layout,
                                   const std::vector<std::pair<std::string, torch::Tensor>>& tensors);

  bool defined() const { return impl_ != nullptr; }
  PackedLayout layout() const;
  int64_t out_features() const;
  int64_t in_features() const;
  /// "nf4", "fp4", "int4" or "int8".
  const std::string& format() const;
  /// Bytes of the packed tensors (tensors()): what one matmul reads.
  int64_t bytes() const;
  /// Every tensor the weight consists of (torch owns the memory, no tensor twice): the packed
  /// "codes" (uint8, the kernels' layout) and statistics, plus what to_4bit / to_8bit /
  /// to_int8_scb need to give the interchange tensors back bit-exact. from_tensors(layout(),
  /// tensors()) rebuilds the weight. The kernels read them in place; do not write to them.
  std::vector<std::pair<std::string, torch::Tensor>> tensors() const;

  Quantized4bit to_4bit() const;
  Int8Quantized to_8bit() const;
  /// A from_int8_scb weight back as (CB, SCB), both bit-exact (to_8bit's scale is SCB / 127).
  std::pair<torch::Tensor, torch::Tensor> to_int8_scb() const;

  const kernels::Lut4Matrix* lut4() const;  // null unless 4-bit
  const kernels::Int8Matrix* int8() const;  // null unless int8

  struct Impl;

 private:
  std::shared_ptr<const Impl> impl_;
};

/// y = x · dequant(W)ᵀ + bias. x: float32, float16 or bfloat16 [..., in_features]; bias:
/// [out_features] (any float dtype) or undefined. Returns [..., out_features] in x's dtype.
/// Differentiable in x and bias (a torch::autograd::Function: backward runs the fused transposed
/// product, grad_bias sums grad_y over the rows); the packed weight gets no gradient.
/// The kernels run on at::get_num_threads() threads (read at each call; results do not depend
/// on it: each output is summed by one thread in a fixed order).
torch::Tensor quantized_matmul(const torch::Tensor& x, const PackedWeight& w, const torch::Tensor& bias = {},
                               MatmulPath path = MatmulPath::automatic);

/// grad_x = grad_y · dequant(W): grad_y float32, float16 or bfloat16 [..., out_features] -> [...,
/// in_features].
torch::Tensor quantized_matmul_transposed(const torch::Tensor& grad_y, const PackedWeight& w);

/// bitsandbytes.matmul_4bit(A, B, quant_state, bias): packs (data, state) and multiplies. For
/// repeated use, pack once with PackedWeight::from_4bit.
torch::Tensor matmul_4bit(const torch::Tensor& x, const torch::Tensor& data, const QuantState& state,
                          const torch::Tensor& bias = {});

/// LLM.int8(): int8 weight (symmetric, per row) times x quantized per row; input columns with any
/// |x| >= threshold are multiplied in fp32 against the dequantized weight columns instead
/// (threshold 0: none). Returns [..., out_features] in x's dtype; differentiable in x and bias
/// like quantized_matmul (grad_x through the transposed product with CB * SCB / 127).
struct Int8MatmulResult {
  torch::Tensor out;
  std::vector<int64_t> outlier_cols;
};
Int8MatmulResult int8_matmul(const torch::Tensor& x, const PackedWeight& w, double threshold = 0.0,
                             const torch::Tensor& bias = {});

/// bitsandbytes.functional.int8_vectorwise_quant: CB int8 (x's shape), SCB float32 [rows] (row
/// absmax over the elements below threshold), the outlier columns (threshold > 0).
struct Int8VectorwiseQuant {
  torch::Tensor CB, SCB;
  std::vector<int64_t> outlier_cols;
};
Int8VectorwiseQuant int8_vectorwise_quant(const torch::Tensor& x, double threshold = 0.0);

}  // namespace msbnb
