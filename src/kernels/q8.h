// The int8 view of a 4-bit weight for the int8-activation kernels (MatmulPath::int8), shared by
// the scalar reference and the SIMD folders (ISA-neutral, inline).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "msbnb/kernels/matmul.h"

namespace msbnb::kernels {
// In an unnamed namespace, as scalar_math.h: each per-ISA translation unit (compiled with its own
// flags) keeps its own copy, so no inline function is shared (and picked) across ISA objects.
namespace {

/// The weight's 16 values as int8 with one factor: value(idx) ~= T[idx] * f. Integral tables in
/// [-127, 127] (int4: q - 8, or q with a zero point) are kept exactly (f = 1); others (nf4, fp4)
/// scaled so that max |lut| becomes 127: T = rne(lut * 127 / m), f = m / 127 (error <= f / 2).
struct Q8Table {
  int8_t t[16] = {};
  float f = 0.0f;
};
inline Q8Table q8_table(const Lut4Matrix& w) {
  Q8Table q;
  bool integral = true;
  float m = 0.0f;
  for (float v : w.lut) {
    integral = integral && v == std::nearbyint(v) && std::fabs(v) <= 127.0f;
    m = std::isnan(v) || std::fabs(v) > m ? std::fabs(v) : m;
  }
  if (integral) {
    for (int i = 0; i < 16; ++i) q.t[i] = static_cast<int8_t>(w.lut[i]);
    q.f = 1.0f;
    return q;
  }
  if (!(m > 0.0f) || !std::isfinite(m)) {  // a table of zeros, or a hostile one: NaN outputs
    q.f = m == 0.0f ? 0.0f : std::nanf("");
    return q;
  }
  const float s = 127.0f / m;
  for (int i = 0; i < 16; ++i) q.t[i] = static_cast<int8_t>(std::nearbyint(w.lut[i] * s));
  q.f = m / 127.0f;
  return q;
}

/// Blocks of 64: the byte order of each 16-byte lane of a plane (new position p holds old byte
/// kQ8Pair[p]; it is its own inverse), so that int32 lane j of a dot product sums bytes of one
/// block: j even block 2c (s < 2), j odd block 2c + 1.
constexpr uint8_t kQ8Pair[16] = {0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15};

/// Byte offset of column j in a Lut4Q8Rows row (see matmul.h).
inline int64_t q8_offset(int64_t j, int64_t block) {
  const int64_t c = j / kLut4Chunk, e = j % kLut4Chunk;
  const int64_t s = e / 32, h = (e % 32) / 16, t = e % 16;
  if (block == 128) return c * 128 + 64 * h + 4 * t + s;
  return c * 128 + 64 * h + 16 * (t / 4) + kQ8Pair[4 * (t % 4) + s];
}

/// 127 / m as the int8 quantizers use it (m > 0 finite): in float, or in double when the float
/// quotient overflows (m < 127 / FLT_MAX); rne(x * scale) is taken in that precision.
struct Q8Inv {
  float f = 0.0f;
  double d = 0.0;
  bool wide = false;
};
inline Q8Inv q8_inv(float m) {
  Q8Inv v;
  v.f = 127.0f / m;
  v.wide = !std::isfinite(v.f);
  v.d = 127.0 / static_cast<double>(m);
  return v;
}
inline int32_t q8_round(float x, const Q8Inv& v) {
  return static_cast<int32_t>(v.wide ? std::nearbyint(static_cast<double>(x) * v.d)
                                     : std::nearbyint(x * v.f));
}

/// Chunk c (128 columns) of quantize_row_q8 the reference's way, for the SIMD quantizers' rare
/// chunks (a zero, NaN / Inf or tiny block): q and sum of its blocks (d is set by the caller).
inline void quantize_chunk_q8(const float* x, int64_t c, int64_t block, int8_t* q, int32_t* sum) {
  for (int64_t j = c * kLut4Chunk; j < (c + 1) * kLut4Chunk; ++j) q[q8_offset(j, block)] = 0;
  for (int64_t a = c * kLut4Chunk / block; a < (c + 1) * kLut4Chunk / block; ++a) {
    sum[a] = 0;
    float m = 0.0f;
    for (int64_t j = a * block; j < (a + 1) * block; ++j)
      if (std::isnan(x[j]) || std::fabs(x[j]) > m) m = std::isnan(m) ? m : std::fabs(x[j]);
    if (!(m > 0.0f) || !std::isfinite(m)) continue;
    const Q8Inv inv = q8_inv(m);
    for (int64_t j = a * block; j < (a + 1) * block; ++j) {
      const int32_t v = q8_round(x[j], inv);
      q[q8_offset(j, block)] = static_cast<int8_t>(v);
      sum[a] += v;
    }
  }
}

/// One dequantized weight row v[0, kpad) requantized per row (lut4_i8): q = rne(v * 127 / m),
/// m = max |v|; returns the row's scale fl(m / 127) (0 for a zero row; NaN, with q = 0, if the
/// row holds a NaN or Inf).
inline float requantize_row_i8(const float* v, int64_t kpad, int8_t* q) {
  float m = 0.0f;
  for (int64_t j = 0; j < kpad; ++j)
    if (std::isnan(v[j]) || std::fabs(v[j]) > m) m = std::isnan(m) ? m : std::fabs(v[j]);
  if (!(m > 0.0f) || !std::isfinite(m)) {
    for (int64_t j = 0; j < kpad; ++j) q[j] = 0;
    return m == 0.0f ? 0.0f : std::nanf("");
  }
  const Q8Inv inv = q8_inv(m);
  for (int64_t j = 0; j < kpad; ++j) q[j] = static_cast<int8_t>(q8_round(v[j], inv));
  return m / 127.0f;
}

/// The scales of one lut4_q8 call (ISA-neutral part of the SIMD kernels): f * d and -128 * sum
/// per activation block, and for the current weight row sc[i][a] = s(r, a) * f * d[i][a] (0 for
/// blocks past the row's groups).
struct Q8Scales {
  const Lut4Matrix& w;
  const Lut4Q8Rows& x;
  int64_t nb, valid, per_group, segs_per_row;
  std::vector<float> fd, sc;
  std::vector<int32_t> c128;

  Q8Scales(const Lut4Matrix& m, const Lut4Q8Rows& a, const Q8Table& t)
      : w(m),
        x(a),
        nb(a.blocks()),
        valid(std::min(a.blocks(), ceil_div(m.row_stride, a.block))),
        per_group(m.group / a.block),
        segs_per_row(m.row_stride / m.group),
        fd(static_cast<size_t>(a.n * a.blocks())),
        sc(static_cast<size_t>(a.n * a.blocks()), 0.0f),
        c128(static_cast<size_t>(a.n * a.blocks())) {
    for (int64_t i = 0; i < x.n * nb; ++i) {
      fd[i] = t.f * x.d[i];
      c128[i] = -128 * x.sum[i];
    }
  }
  // Fills sc for row r; zc[i]: the zero-point term sum_a sc * zp * sum (0 without zero points).
  template <int N>
  void row(int64_t r, float (&zc)[N]) {
    const float* s = w.scale + r * segs_per_row;
    // The statistics two rows on (a row's are a short run the hardware prefetcher can miss).
    for (int64_t b = 0; b < segs_per_row * 4; b += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(s + 2 * segs_per_row) + b);
    for (int i = 0; i < N; ++i) {
      float* o = sc.data() + i * nb;
      const float* f = fd.data() + i * nb;
      if (per_group == 1)
        for (int64_t a = 0; a < valid; ++a) o[a] = s[a] * f[a];
      else
        for (int64_t a = 0; a < valid; ++a) o[a] = s[a / per_group] * f[a];
      zc[i] = 0.0f;
      if (w.zero_point) {
        const float* zp = w.zero_point + r * segs_per_row;
        const int32_t* sm = x.sum + i * nb;
        for (int64_t a = 0; a < valid; ++a) zc[i] += o[a] * zp[a / per_group] * static_cast<float>(sm[a]);
      }
    }
  }
};

}  // namespace
}  // namespace msbnb::kernels
