// Input checks shared by the functional API. Each throws c10::Error naming the argument, what
// was expected and what came.
#pragma once
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "msbnb/functional/quantize.h"
#include "msbnb/kernels/formats.h"
#include "msbnb/kernels/types.h"

namespace msbnb::detail {

inline std::string shape_str(c10::IntArrayRef s) {
  std::ostringstream o;
  o << s;
  return o.str();
}

inline void check_defined(const torch::Tensor& t, const char* arg) {
  TORCH_CHECK(t.defined(), arg, ": expected a tensor, got an undefined tensor");
}

inline void check_cpu(const torch::Tensor& t, const char* arg) {
  check_defined(t, arg);
  TORCH_CHECK(t.device().is_cpu(), arg, ": expected a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.layout() == torch::kStrided, arg, ": expected a dense (strided) tensor, got layout ",
              t.layout());
}

/// The tensor's values in contiguous memory: lazy negation / conjugation views (whose memory
/// holds the un-negated values) are materialised, non-contiguous tensors copied.
inline torch::Tensor dense(const torch::Tensor& t) { return t.resolve_conj().resolve_neg().contiguous(); }

/// An output dtype: float32, float16 or bfloat16.
inline void check_float_dtype(torch::ScalarType dt, const char* arg) {
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kFloat16 || dt == torch::kBFloat16, arg,
              ": expected float32, float16 or bfloat16, got ", dt);
}

/// Values that must all be finite (statistics and code tables read from a state).
inline void check_all_finite(const torch::Tensor& t, const char* arg) {
  TORCH_CHECK(torch::isfinite(t).all().item<bool>(), arg, ": expected finite values, got NaN or Inf");
}

inline void check_dtype(const torch::Tensor& t, torch::ScalarType expected, const char* arg) {
  check_cpu(t, arg);
  TORCH_CHECK(t.scalar_type() == expected, arg, ": expected dtype ", expected, ", got ", t.scalar_type());
}

inline void check_numel(const torch::Tensor& t, int64_t expected, const char* arg) {
  TORCH_CHECK(t.numel() == expected, arg, ": expected ", expected, " elements, got ", t.numel(), " (shape ",
              shape_str(t.sizes()), ")");
}

/// A float input for quantization: CPU, float32 / float16 / bfloat16, not empty. Returns the
/// kernel dtype; `x` is made contiguous (copied if it was not).
inline kernels::DType float_input(torch::Tensor& x, const char* arg) {
  check_cpu(x, arg);
  kernels::DType dt;
  switch (x.scalar_type()) {
    case torch::kFloat32:
      dt = kernels::DType::f32;
      break;
    case torch::kFloat16:
      dt = kernels::DType::f16;
      break;
    case torch::kBFloat16:
      dt = kernels::DType::bf16;
      break;
    default:
      TORCH_CHECK(false, arg, ": expected dtype float32, float16 or bfloat16, got ", x.scalar_type());
  }
  TORCH_CHECK(x.numel() > 0, arg, ": expected a non-empty tensor, got shape ", shape_str(x.sizes()));
  x = dense(x);
  return dt;
}

/// Block statistics come out non-finite iff the block holds NaN or Inf (n elements in all).
inline void check_finite_blocks(const float* stats, int64_t count, int64_t bs, int64_t n, const char* arg) {
  for (int64_t b = 0; b < count; ++b)
    TORCH_CHECK(std::isfinite(stats[b]), arg, ": expected finite values, got NaN or Inf in elements [",
                b * bs, ", ", std::min(n, b * bs + bs), ")");
}

inline bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

/// Float32 per-block statistics of a 4-bit / blockwise state (double quantization undone),
/// checked to hold `expected` finite values. Defined in quantize_4bit.cpp.
torch::Tensor resolved_absmax(const QuantState& s, int64_t expected);

/// The 4-bit format named `quant_type`: a row of formats.def with 4 bits (int4 and every
/// 16-value codebook format); else an error naming `arg` and the accepted names. Defined in
/// quantize_4bit.cpp.
kernels::Format format_4bit(const std::string& quant_type, const char* arg);

}  // namespace msbnb::detail
