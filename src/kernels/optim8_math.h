// Element operations of the 8-bit optimizer kernels (kernels.def: optim8_adam_blocks,
// optim8_lion_blocks), written once: the scalar reference runs them on every element, the SIMD
// kernels on their tails, and their vector code performs the same float operations in the same
// order (no FMA: the ISA objects are compiled with -ffp-contract=off), so every ISA gives the same
// bits. In an unnamed namespace, as scalar_math.h: each translation unit keeps its own copy.
#pragma once
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "kernels/scalar_math.h"
#include "msbnb/kernels/formats.h"
#include "msbnb/kernels/types.h"

namespace msbnb::kernels {
namespace {

// An element is updated only where its (effective) gradient is finite; NaN compares false.
inline bool optim8_finite(float g) { return std::fabs(g) < HUGE_VALF; }

// States stay finite, so a block's absmax (and every dequantized value) stays finite.
inline float optim8_clamp(float x) { return std::fmin(std::fmax(x, -FLT_MAX), FLT_MAX); }

// Number of negative codes of a map: for a sorted map, the sorted position of its smallest
// non-negative code. The sign rule needs it; 0 (no negative codes) turns the rule off.
inline int optim8_negative_codes(const Lut8* map) {
  int k = 0;
  for (float c : map->code) k += c < 0.0f;
  return k;
}

// True when sorted position == code index (the dynamic maps are sorted): the SIMD kernels skip
// the sorted_to_code lookup then.
inline bool optim8_identity(const Lut8* map) {
  for (int i = 0; i < 256; ++i)
    if (map->sorted_to_code[i] != i) return false;
  return true;
}

// The nearest code of state x in a block of absmax scale s (quantize_lut8's normalisation).
// `zneg` > 0 applies bitsandbytes' sign rule to the first moment: a negative x whose nearest
// code is 0 (sorted position zneg, the nearest code of a negative value is never positive)
// takes the code just below, so the momentum keeps its sign.
inline uint8_t optim8_code(float x, const Lut8Scale& s, const Lut8* map, int zneg) {
  const float xn = (x * s.pre) * s.inv;
  int pos = sorted_position256(xn, map->mid);
  if (zneg > 0 && x < 0.0f && pos >= zneg) pos -= 1;
  return static_cast<uint8_t>(map->sorted_to_code[pos]);
}

// The gradient the Adam update sees: g + l2 * p (torch Adam's weight decay) when l2 != 0.
inline float optim8_grad(float g, float p, const Optim8Params& k) { return k.l2 != 0.0f ? g + k.l2 * p : g; }

// Adam's new moments from the dequantized old ones; a non-finite gradient resets them to 0.
inline void optim8_adam_moments(float g, float m_old, float v_old, const Optim8Params& k, float* m,
                                float* v) {
  if (!optim8_finite(g)) {
    *m = 0.0f;
    *v = 0.0f;
    return;
  }
  *m = optim8_clamp(m_old * k.beta1 + k.one_minus_beta1 * g);
  *v = std::fmin(v_old * k.beta2 + (k.one_minus_beta2 * g) * g, FLT_MAX);
}

// p after one Adam step from the new moments (p itself where the gradient is not finite).
inline float optim8_adam_param(float p, float g, float m, float v, const Optim8Params& k) {
  if (!optim8_finite(g)) return p;
  return p * k.decay - k.step_size * (m / (std::sqrt(v) + k.eps));
}

// Lion: the update direction c and the new momentum.
inline float optim8_lion_direction(float g, float m_old, const Optim8Params& k) {
  return m_old * k.beta1 + k.one_minus_beta1 * g;
}
inline float optim8_lion_moment(float g, float m_old, const Optim8Params& k) {
  if (!optim8_finite(g)) return 0.0f;
  return optim8_clamp(m_old * k.beta2 + k.one_minus_beta2 * g);
}
inline float optim8_lion_param(float p, float g, float c, const Optim8Params& k) {
  if (!optim8_finite(g)) return p;
  const float sign = static_cast<float>((c > 0.0f) - (c < 0.0f));
  return p * k.decay - k.lr * sign;
}

}  // namespace
}  // namespace msbnb::kernels
