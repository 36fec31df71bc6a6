// Helpers for kernel tests: inputs of every dtype with edge values, and per-ISA parameterisation.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "msbnb/kernels/formats.h"
#include "msbnb/kernels/kernel_table.h"

namespace msbnb::kernels {
// Test names and messages show the ISA's name.
inline void PrintTo(Isa isa, std::ostream* os) { *os << isa_name(isa); }
}  // namespace msbnb::kernels

namespace msbnb::test {

using kernels::DType;
using kernels::Isa;

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

/// Kinds of input data, named after the edge they hit.
enum class Fill { randn, zeros, constant, denormal, huge, tiny, mixed, specials };
inline const char* fill_name(Fill f) {
  static const char* names[] = {"randn", "zeros", "constant", "denormal",
                                "huge",  "tiny",  "mixed",    "specials"};
  return names[static_cast<int>(f)];
}

/// A buffer of n elements of dtype dt; `values` holds their exact float32 values.
struct Input {
  DType dt;
  std::vector<float> f32;
  std::vector<uint16_t> u16;
  std::vector<float> values;
  const void* data() const { return dt == DType::f32 ? static_cast<const void*>(f32.data()) : u16.data(); }
};

// Half with the nearest-even rounding of the float, for test inputs only.
inline uint16_t float_to_half(float f) {
  const uint32_t x = bits_of(f), sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (ax < 0x38800000u) {                                               // half denormal or zero
    const float d = from_bits(ax) * 16777216.0f;                        // / 2^-24
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(d)));
  }
  uint32_t h = ((ax - 0x38000000u) >> 13);
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}
inline float half_to_float_ref(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return from_bits(sign | 0x7f800000u | (m << 13));
  if (e == 0) return (sign ? -1.0f : 1.0f) * std::ldexp(static_cast<float>(m), -24);
  return from_bits(sign | ((e + 112u) << 23) | (m << 13));
}

inline Input make_input(size_t n, DType dt, Fill fill, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> pick(0, 9);
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    const float g = normal(rng);
    switch (fill) {
      case Fill::randn:
        v[i] = g;
        break;
      case Fill::zeros:
        v[i] = (i % 3 == 0) ? -0.0f : 0.0f;
        break;
      case Fill::constant:
        v[i] = 0.5f;
        break;
      case Fill::denormal:
        v[i] = g * 1e-39f;
        break;  // float denormals (bf16 keeps some)
      case Fill::huge:
        v[i] = g * 1e38f;
        break;
      case Fill::tiny:
        v[i] = g * 1e-30f;
        break;
      case Fill::mixed: {  // randn with zeros, ties of 0.5 and wide magnitudes sprinkled in
        const int k = pick(rng);
        v[i] = k == 0 ? 0.0f : k == 1 ? g * 1e4f : k == 2 ? g * 1e-4f : k == 3 ? 0.5f : g;
        break;
      }
      case Fill::specials:  // randn with NaN, +-Inf and signalling NaN; set as raw halves below
        v[i] = i % 7 == 1   ? std::numeric_limits<float>::quiet_NaN()
               : i % 7 == 3 ? -std::numeric_limits<float>::infinity()
               : i % 7 == 5 ? from_bits(0x7f800001u)
                            : g;
        break;
    }
  }
  Input in;
  in.dt = dt;
  in.values.resize(n);
  if (dt == DType::f32) {
    in.f32 = v;
    in.values = v;
  } else {
    in.u16.resize(n);
    for (size_t i = 0; i < n; ++i) {
      if (dt == DType::bf16) {
        // Random fills truncate; every bf16 pattern is a valid input.
        in.u16[i] = static_cast<uint16_t>(bits_of(v[i]) >> 16);
        in.values[i] = from_bits(static_cast<uint32_t>(in.u16[i]) << 16);
      } else {
        in.u16[i] = float_to_half(fill == Fill::huge       ? v[i] * 1e-34f
                                  : fill == Fill::denormal ? v[i] * 1e34f
                                                           : v[i]);
        if (fill == Fill::specials && i % 7 == 5) in.u16[i] = 0x7c01u;  // half signalling NaN
        in.values[i] = half_to_float_ref(in.u16[i]);
      }
    }
  }
  return in;
}

/// Every ISA of isa.def.
inline std::vector<Isa> all_isas() {
  std::vector<Isa> v;
  for (int i = 0; i < kernels::kNumIsas; ++i) v.push_back(static_cast<Isa>(i));
  return v;
}
/// The ISAs a test compares with the scalar reference: every row of isa.def but scalar (which
/// compared with itself would pass without testing anything). Tests over them skip (never pass)
/// the ones this CPU lacks or this architecture does not build.
inline std::vector<Isa> simd_isas() {
  std::vector<Isa> v;
  for (int i = 1; i < kernels::kNumIsas; ++i) v.push_back(static_cast<Isa>(i));
  return v;
}
/// The rows of formats.def with a 16-value codebook: tests of the 4-bit codebook kernels run
/// every one (a new codebook row is tested without editing the tests).
inline std::vector<kernels::FormatInfo> codebook_formats() {
  int count = 0;
  const kernels::FormatInfo* rows = kernels::all_formats(&count);
  std::vector<kernels::FormatInfo> v;
  for (int i = 0; i < count; ++i)
    if (kernels::has_codebook16(rows[i])) v.push_back(rows[i]);
  return v;
}
inline std::string isa_param_name(const testing::TestParamInfo<Isa>& info) {
  return kernels::isa_name(info.param);
}

#define MSBNB_SKIP_IF_UNSUPPORTED(isa)     \
  if (!msbnb::kernels::isa_supported(isa)) \
  GTEST_SKIP() << "this CPU lacks " << msbnb::kernels::isa_name(isa) << ": not tested"

}  // namespace msbnb::test
