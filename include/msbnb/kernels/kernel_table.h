// The per-ISA kernel table. Each ISA folder (src/kernels/ref, x86/avx2, x86/avx512) exports one
// constant KernelTable; dispatch.cpp picks one per process. Entries are single-threaded and work
// on a range; ops.h splits work across threads and calls them.
//
// Conventions for the elementwise entries: `x` points at logical element `start` of a flat tensor
// cut into blocks of `bs` elements (the last one may be short); the scale / absmax / zero point
// of element i is at index (start + i) / bs. For 4-bit packed data `start` is even and `packed`
// points at byte start / 2.
#pragma once
#include <cstdint>

#include "msbnb/kernels/formats.h"
#include "msbnb/kernels/matmul.h"
#include "msbnb/kernels/types.h"

namespace msbnb::kernels {

struct KernelTable {
  Isa isa;

  /// out[b] = max |x| over block b of x[0, n) (n from a block boundary). NaN in a block gives
  /// NaN, Inf gives Inf: the maximum is taken on the magnitude bits, so it is exact and
  /// independent of order.
  void (*absmax_blocks)(const void* x, DType dt, int64_t n, int64_t bs, float* out);

  /// mins[b], maxs[b] over block b (n from a block boundary); NaN shows as NaN in either.
  void (*minmax_blocks)(const void* x, DType dt, int64_t n, int64_t bs, float* mins, float* maxs);

  /// q = clamp(rne(x / scale) + zp, lo, hi); scale 0 gives q = zp (zp = 0 when zero_point is
  /// null). Symmetric int8 uses lo = -127, hi = 127; asymmetric lo = -128, hi = 127.
  void (*quantize_int8)(const void* x, DType dt, int64_t start, int64_t n, int64_t bs, const float* scale,
                        const int32_t* zero_point, int32_t lo, int32_t hi, int8_t* q);

  /// out = (q - zp) * scale.
  void (*dequantize_int8)(const int8_t* q, int64_t start, int64_t n, int64_t bs, const float* scale,
                          const int32_t* zero_point, float* out);

  /// int4 per group along rows of a [rows, cols] matrix, qint4x2 packing (LOW nibble first,
  /// (cols + 1) / 2 bytes per row, odd cols padded with a zero nibble). scale and zero_point are
  /// [rows, ceil(cols / gs)]. Symmetric (zero_point null): q = clamp(rne(x / s), -7, 7) as a
  /// two's-complement nibble; asymmetric: q = clamp(rne(x / s) + zp, 0, 15). Scale 0 gives zp.
  void (*quantize_int4)(const void* x, DType dt, int64_t rows, int64_t cols, int64_t gs, const float* scale,
                        const int32_t* zero_point, uint8_t* packed);

  /// out = (q - zp) * scale, the inverse layout of quantize_int4.
  void (*dequantize_int4)(const uint8_t* packed, int64_t rows, int64_t cols, int64_t gs, const float* scale,
                          const int32_t* zero_point, float* out);

  /// bitsandbytes 4-bit: code of x * (1 / max(absmax, 1e-38)), HIGH nibble first, an odd n
  /// padded with lut->zero_code. (ops.h codes a short last block by division, as bitsandbytes.)
  void (*quantize_lut4)(const void* x, DType dt, int64_t start, int64_t n, int64_t bs, const float* absmax,
                        const Lut4* lut, uint8_t* packed);

  /// out = code[q] * absmax.
  void (*dequantize_lut4)(const uint8_t* packed, int64_t start, int64_t n, int64_t bs, const float* absmax,
                          const float* code16, float* out);

  /// Blockwise 8-bit with a 256-entry codebook: q = code index nearest to x / absmax.
  void (*quantize_lut8)(const void* x, DType dt, int64_t start, int64_t n, int64_t bs, const float* absmax,
                        const Lut8* lut, uint8_t* q);

  /// out = code[q] * absmax.
  void (*dequantize_lut8)(const uint8_t* q, int64_t start, int64_t n, int64_t bs, const float* absmax,
                          const float* code256, float* out);

  /// Fused dequantize-matmul kernels (matmul.h); null entries fall back to scalar.
  MatmulKernels matmul;
};

/// True if this CPU can run `isa` (cpuid, and the OS saves the registers).
bool isa_supported(Isa isa);
/// Best ISA of this CPU, or the one forced by MSBNB_ISA=scalar|avx2|avx512 (throws
/// std::runtime_error naming the variable if the CPU lacks it or the value is unknown).
Isa active_isa();
/// The table of the active ISA, chosen once per process.
const KernelTable& active_kernels();
/// The table of `isa`, for tests and benchmarks; throws if the CPU lacks it.
const KernelTable& kernels_for(Isa isa);
/// Parses "scalar" | "avx2" | "avx512"; throws std::invalid_argument.
Isa isa_from_name(const char* name);

}  // namespace msbnb::kernels
