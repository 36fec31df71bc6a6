// Scalar reference of the fused dequantize-matmul kernels (kernels/matmul.h): one weight at a
// time, decoded exactly as dequantize() does, then multiplied. The SIMD kernels are tested
// against these.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/isa_kernels.h"
#include "kernels/q8.h"
#include "kernels/scalar_math.h"

namespace msbnb::kernels::MSBNB_ISA_NS {

namespace {

// Row r of w decoded to floats (kpad values; the padding decodes to 0 times its scale, unused).
void decode_lut4_row(const Lut4Matrix& w, int64_t r, float* out) {
  const uint8_t* row = w.codes + r * (w.kpad / 2);
  for (int64_t j = 0; j < w.cols; ++j) {
    const int64_t s = (r * w.row_stride + j) / w.group;
    const float zp = w.zero_point ? w.zero_point[s] : 0.0f;
    out[j] = (w.lut[lut4_index(row, j)] - zp) * w.scale[s];
  }
  std::fill(out + w.cols, out + w.kpad, 0.0f);
}

void decode_int8_row(const Int8Matrix& w, int64_t r, float* out) {
  const int8_t* q = w.codes + r * w.kpad;
  const float off = w.offset ? w.offset[r] : 0.0f;
  for (int64_t j = 0; j < w.cols; ++j) out[j] = (static_cast<float>(q[j]) + off) * w.scale[r];
  std::fill(out + w.cols, out + w.kpad, 0.0f);
}

template <class Decode>
void rows_f32(Decode decode, int64_t kpad, const float* x, int64_t n, int64_t ldx, int64_t r0, int64_t r1,
              float* y, int64_t ldy) {
  std::vector<float> wrow(kpad);
  for (int64_t r = r0; r < r1; ++r) {
    decode(r, wrow.data());
    for (int64_t i = 0; i < n; ++i) {
      float acc = 0.0f;
      for (int64_t j = 0; j < kpad; ++j) acc += x[i * ldx + j] * wrow[j];
      y[i * ldy + r] = acc;
    }
  }
}

template <class Decode>
void transposed_f32(Decode decode, int64_t rows, int64_t kpad, const float* gy, int64_t n, int64_t ldy,
                    int64_t c0, int64_t c1, float* gx, int64_t ldx, bool accumulate) {
  if (!accumulate)
    for (int64_t i = 0; i < n; ++i) std::fill(gx + i * ldx + c0, gx + i * ldx + c1, 0.0f);
  std::vector<float> wrow(kpad);
  for (int64_t r = 0; r < rows; ++r) {
    decode(r, wrow.data());
    for (int64_t i = 0; i < n; ++i) {
      const float g = gy[i * ldy + r];
      for (int64_t j = c0; j < c1; ++j) gx[i * ldx + j] += g * wrow[j];
    }
  }
}

// gx[i][0, kpad) (+)= sum over rows [r0, r1) in order; the padding decodes to 0 here.
template <class Decode>
void transposed_rows_f32(Decode decode, int64_t kpad, const float* gy, int64_t n, int64_t ldy, int64_t r0,
                         int64_t r1, float* gx, int64_t ldx, bool accumulate) {
  if (!accumulate)
    for (int64_t i = 0; i < n; ++i) std::fill(gx + i * ldx, gx + i * ldx + kpad, 0.0f);
  std::vector<float> wrow(kpad);
  for (int64_t r = r0; r < r1; ++r) {
    decode(r, wrow.data());
    for (int64_t i = 0; i < n; ++i) {
      const float g = gy[i * ldy + r];
      for (int64_t j = 0; j < kpad; ++j) gx[i * ldx + j] += g * wrow[j];
    }
  }
}

}  // namespace

void lut4_f32(const Lut4Matrix& w, const float* x, int64_t n, int64_t ldx, int64_t r0, int64_t r1, float* y,
              int64_t ldy) {
  rows_f32([&](int64_t r, float* out) { decode_lut4_row(w, r, out); }, w.kpad, x, n, ldx, r0, r1, y, ldy);
}

void int8_f32(const Int8Matrix& w, const float* x, int64_t n, int64_t ldx, int64_t r0, int64_t r1, float* y,
              int64_t ldy) {
  rows_f32([&](int64_t r, float* out) { decode_int8_row(w, r, out); }, w.kpad, x, n, ldx, r0, r1, y, ldy);
}

void lut4_bf16(const Lut4Matrix& w, const uint16_t* x, int64_t n, int64_t ldx, int64_t r0, int64_t r1,
               float* y, int64_t ldy) {
  std::vector<float> wrow(w.kpad);
  for (int64_t r = r0; r < r1; ++r) {
    decode_lut4_row(w, r, wrow.data());
    for (float& v : wrow) v = bf16_to_float(float_to_bf16(v));
    for (int64_t i = 0; i < n; ++i) {
      float acc = 0.0f;
      for (int64_t j = 0; j < w.kpad; ++j) acc += bf16_to_float(x[i * ldx + j]) * wrow[j];
      y[i * ldy + r] = acc;
    }
  }
}

void int8_i8(const Int8Matrix& w, const uint8_t* xu, int64_t n, int64_t ldx, int64_t r0, int64_t r1,
             int32_t* acc, int64_t ldy) {
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* q = w.codes + r * w.kpad;
    for (int64_t i = 0; i < n; ++i) {
      int64_t sum = 0;  // fits int32 for k <= 2^17 (the driver's chunks); no signed overflow inside
      for (int64_t j = 0; j < w.kpad; ++j) sum += (static_cast<int32_t>(xu[i * ldx + j]) - 128) * q[j];
      acc[i * ldy + r] = static_cast<int32_t>(sum);
    }
  }
}

void lut4_i8(const Lut4Matrix& w, const uint8_t* xu, int64_t n, int64_t ldx, int64_t r0, int64_t r1,
             int32_t* acc, int64_t ldy, float* wscale) {
  std::vector<float> v(w.kpad);
  std::vector<int8_t> q(w.kpad);
  for (int64_t r = r0; r < r1; ++r) {
    decode_lut4_row(w, r, v.data());
    wscale[r] = requantize_row_i8(v.data(), w.kpad, q.data());
    for (int64_t i = 0; i < n; ++i) {
      int64_t sum = 0;
      for (int64_t j = 0; j < w.kpad; ++j) sum += (static_cast<int32_t>(xu[i * ldx + j]) - 128) * q[j];
      acc[i * ldy + r] = static_cast<int32_t>(sum);
    }
  }
}

void lut4_t_f32(const Lut4Matrix& w, const float* gy, int64_t n, int64_t ldy, int64_t c0, int64_t c1,
                float* gx, int64_t ldx, bool accumulate) {
  transposed_f32([&](int64_t r, float* out) { decode_lut4_row(w, r, out); }, w.rows, w.kpad, gy, n, ldy, c0,
                 c1, gx, ldx, accumulate);
}

void int8_t_f32(const Int8Matrix& w, const float* gy, int64_t n, int64_t ldy, int64_t c0, int64_t c1,
                float* gx, int64_t ldx, bool accumulate) {
  transposed_f32([&](int64_t r, float* out) { decode_int8_row(w, r, out); }, w.rows, w.kpad, gy, n, ldy, c0,
                 c1, gx, ldx, accumulate);
}

void lut4_t_rows_f32(const Lut4Matrix& w, const float* gy, int64_t n, int64_t ldy, int64_t r0, int64_t r1,
                     float* gx, int64_t ldx, bool accumulate) {
  transposed_rows_f32([&](int64_t r, float* out) { decode_lut4_row(w, r, out); }, w.kpad, gy, n, ldy, r0, r1,
                      gx, ldx, accumulate);
}

void int8_t_rows_f32(const Int8Matrix& w, const float* gy, int64_t n, int64_t ldy, int64_t r0, int64_t r1,
                     float* gx, int64_t ldx, bool accumulate) {
  transposed_rows_f32([&](int64_t r, float* out) { decode_int8_row(w, r, out); }, w.kpad, gy, n, ldy, r0, r1,
                      gx, ldx, accumulate);
}

void quantize_row_u8(const float* x, int64_t cols, float inv, uint8_t* xu) {
  for (int64_t j = 0; j < cols; ++j)
    xu[j] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(x[j] * inv)) + 128);
}

}  // namespace msbnb::kernels::MSBNB_ISA_NS
