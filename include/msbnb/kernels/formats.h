// Format table and codebooks.
//
// Layouts (DESIGN.md "Formats"):
//   int8      q = rne(x / scale) (+ zero point), scale per tensor / channel / block.
//   int4      per group of `group_size` along a row; qint4x2: element 2j in the LOW nibble,
//             2j+1 in the HIGH nibble, two's complement for symmetric [-7, 7], uint4 [0, 15]
//             with a zero point for asymmetric; each row has (cols + 1) / 2 bytes.
//   nf4, fp4  bitsandbytes: flat blocks of `blocksize`, absmax per block, nearest of 16 codes,
//             first element of a pair in the HIGH nibble: byte = q[2i] << 4 | q[2i+1];
//             an odd count is padded with the code of 0 (7 for nf4, 0 for fp4).
//   dynamic8  blockwise 8-bit with the signed dynamic map (256 codes), absmax per block.
#pragma once
#include <array>
#include <cstdint>

#include "msbnb/kernels/types.h"

namespace msbnb::kernels {

enum class NibbleOrder : uint8_t { none, low_first, high_first };

/// bitsandbytes' NF4 code values (float32 of the values in bitsandbytes.functional).
inline constexpr float kCodeNF4[16] = {-1.0f,
                                       -0.6961928009986877f,
                                       -0.5250730514526367f,
                                       -0.39491748809814453f,
                                       -0.28444138169288635f,
                                       -0.18477343022823334f,
                                       -0.09105003625154495f,
                                       0.0f,
                                       0.07958029955625534f,
                                       0.16093020141124725f,
                                       0.24611230194568634f,
                                       0.33791524171829224f,
                                       0.44070982933044434f,
                                       0.5626170039176941f,
                                       0.7229568362236023f,
                                       1.0f};

/// bitsandbytes' FP4 (e2m1 without inf/nan) code values. Index 8 is +0, as bitsandbytes'
/// quant_map (its table says `-0`, a Python int, so +0.0) and its CPU dequantize give it.
inline constexpr float kCodeFP4[16] = {
    0.0f, 0.005208333333f,  0.66666667f,  1.0f,  0.33333333f,  0.5f,  0.16666667f,  0.25f,
    0.0f, -0.005208333333f, -0.66666667f, -1.0f, -0.33333333f, -0.5f, -0.16666667f, -0.25f};

/// Formats, one per row of formats.def.
enum class Format : uint8_t {
#define MSBNB_FORMAT(id, bits, block, codebook, order) id,
#include "msbnb/kernels/formats.def"
#undef MSBNB_FORMAT
};

struct FormatInfo {
  Format format;
  const char* name;       // equal to checkpoint / CLI strings
  int bits;               // bits per stored code
  int default_block;      // default block or group size (0: none, e.g. per channel)
  const float* codebook;  // 16 code values for 4-bit codebook formats, else nullptr
  NibbleOrder nibble_order;
};

/// Row of the format table for `f`.
const FormatInfo& format_info(Format f);
/// All rows, in table order.
const FormatInfo* all_formats(int* count);
/// Format by name ("int8", "int4", "nf4", "fp4", "dynamic8"); throws std::invalid_argument.
Format format_from_name(const char* name);

/// A 16-entry codebook prepared for nearest-code search: values sorted ascending, the 15
/// midpoints between neighbours, and the code index of each sorted position. x is coded as the
/// sorted position p = #{i : x > mid[i]} (ties go to the lower code, as bitsandbytes' decision
/// tree compares x > midpoint), then index = sorted_to_code[p].
struct Lut4 {
  float code[16];
  float mid[16];  // mid[15] = +inf (padding so SIMD can compare 16 lanes)
  uint8_t sorted_to_code[16];
  uint8_t zero_code;  // code of x = 0: an odd count is padded with it (bitsandbytes pads x with 0)
};
Lut4 make_lut4(const float* code16);
/// True for the rows of formats.def with a 16-value codebook (nf4, fp4, ...).
inline bool has_codebook16(const FormatInfo& info) { return info.bits == 4 && info.codebook != nullptr; }
/// The prepared codebook of a codebook row, built once per format from its formats.def row;
/// throws std::invalid_argument (naming the format) for a format without one.
const Lut4& format_lut4(Format f);

/// A 256-entry codebook prepared the same way; mid[255] = +inf.
struct Lut8 {
  float code[256];
  float mid[256];
  int32_t sorted_to_code[256];
};
Lut8 make_lut8(const float* code256);

/// bitsandbytes' create_dynamic_map: signed = 127 negative values, 0, 128 positive up to 1.0
/// (max_exponent_bits = 7, total_bits = 8), computed in float32 as torch does; sorted.
std::array<float, 256> create_dynamic_map(bool is_signed = true, int max_exponent_bits = 7,
                                          int total_bits = 8);

}  // namespace msbnb::kernels
