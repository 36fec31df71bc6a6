// Scalar element helpers shared by the reference kernels and the tails of the SIMD kernels.
// Everything is in an unnamed namespace so each translation unit (each compiled with its own ISA
// flags) keeps its own copy: the linker can never merge one into an AVX-512 build of another.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "msbnb/kernels/types.h"

namespace msbnb::kernels {
namespace {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE half -> float, exact for every value (denormals, Inf, NaN).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (mant << 13));
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_float(sign);
  // Denormal half: normalise into a float.
  int e = -1;
  do {
    ++e;
    mant <<= 1;
  } while ((mant & 0x400u) == 0);
  return bits_float(sign | static_cast<uint32_t>(112 - e) << 23 | ((mant & 0x3ffu) << 13));
}

// IEEE half of a float, rounded to nearest even (what vcvtps2ph with imm 0 does): overflow to
// Inf, NaN stays a quiet NaN, results below 2^-14 become half denormals.
inline uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: Inf
  if (a < 0x38800000u) {
    // Below 2^-14: a denormal half, mantissa = rne(|f| * 2^24), exact in float arithmetic.
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(bits_float(a) * 16777216.0f)));
  }
  // Normal: drop 13 mantissa bits with round-to-nearest-even; a carry moves into the exponent.
  const uint32_t r = a - 0x38000000u;  // rebias the exponent from 127 to 15
  return static_cast<uint16_t>(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
}

inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// bf16 of a finite float, rounded to nearest even (what vcvtneps2bf16 does for finite inputs).
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float load_elem(const void* x, DType dt, int64_t i) {
  switch (dt) {
    case DType::f32:
      return static_cast<const float*>(x)[i];
    case DType::f16:
      return half_to_float(static_cast<const uint16_t*>(x)[i]);
    case DType::bf16:
      return bf16_to_float(static_cast<const uint16_t*>(x)[i]);
  }
  return 0.0f;
}

// Signed-integer key with the same order as the float (for exact, order-free min / max).
inline int32_t order_key(float f) {
  const int32_t k = static_cast<int32_t>(float_bits(f));
  return k ^ ((k >> 31) & 0x7fffffff);
}
inline float key_float(int32_t k) { return bits_float(static_cast<uint32_t>(k ^ ((k >> 31) & 0x7fffffff))); }

// q = clamp(rne(x / s) + zp, lo, hi) in float, then to int (DESIGN.md int8 / int4).
inline int32_t quantize_affine(float x, float s, float zp, float lo, float hi) {
  if (s == 0.0f) return static_cast<int32_t>(zp);
  float t = std::nearbyint(x / s) + zp;
  t = std::fmin(std::fmax(t, lo), hi);
  return static_cast<int32_t>(t);
}

// bitsandbytes' absmax floor (backends/default/ops.py quantize_4bit: max(absmax, 1e-38)): an
// all-zero block codes as x = 0 and a denormal absmax cannot overflow the reciprocal.
inline constexpr float kAbsmaxFloor = 1e-38f;
// Full blocks multiply by this float32 reciprocal, as bitsandbytes does.
inline float inverse_absmax(float a) { return 1.0f / std::fmax(a, kAbsmaxFloor); }

// Blockwise 8-bit normalises x as fl(fl(x * pre) * inv). Below the floor the float reciprocal
// of absmax overflows (or the floor leaves x / absmax near 0, a 99 % error): x and absmax are
// scaled by 2^64 first, exactly, so x * pre * inv = fl(x * fl(1 / absmax)) where that reciprocal
// is finite (bitsandbytes' own value) and the correctly scaled value where it is not.
struct Lut8Scale {
  float pre, inv;
};
inline Lut8Scale lut8_scale(float a) {
  if (a > 0.0f && a < kAbsmaxFloor) return {0x1p64f, 1.0f / (a * 0x1p64f)};
  return {1.0f, inverse_absmax(a)};
}

// Sorted position of x among a codebook's midpoints: #{i < count : x > mid[i]}.
inline int sorted_position16(float x, const float* mid) {
  int p = 0;
  for (int i = 0; i < 15; ++i) p += x > mid[i];
  return p;
}
inline int sorted_position256(float x, const float* mid) {
  int p = 0;  // branch-free binary search; mid[255] = +inf
  for (int step = 128; step >= 1; step >>= 1) p += (mid[p + step - 1] < x) ? step : 0;
  return p;
}

}  // namespace
}  // namespace msbnb::kernels
