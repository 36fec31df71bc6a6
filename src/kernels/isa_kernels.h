// Declarations of every ISA's kernels. Each ISA folder defines the same function names in its
// own namespace msbnb::kernels::<isa> and one `table`; an entry left null falls back to scalar.
#pragma once
#include "msbnb/kernels/kernel_table.h"

#define MSBNB_DECLARE_ISA_KERNELS(ns)                                                                     \
  namespace msbnb::kernels::ns {                                                                          \
  void absmax_blocks(const void* x, DType dt, int64_t n, int64_t bs, float* out);                         \
  void minmax_blocks(const void* x, DType dt, int64_t n, int64_t bs, float* mins, float* maxs);           \
  void quantize_int8(const void* x, DType dt, int64_t start, int64_t n, int64_t bs, const float* scale,   \
                     const int32_t* zero_point, int32_t lo, int32_t hi, int8_t* q);                       \
  void dequantize_int8(const int8_t* q, int64_t start, int64_t n, int64_t bs, const float* scale,         \
                       const int32_t* zero_point, float* out);                                            \
  void quantize_int4(const void* x, DType dt, int64_t rows, int64_t cols, int64_t gs, const float* scale, \
                     const int32_t* zero_point, uint8_t* packed);                                         \
  void dequantize_int4(const uint8_t* packed, int64_t rows, int64_t cols, int64_t gs, const float* scale, \
                       const int32_t* zero_point, float* out);                                            \
  void quantize_lut4(const void* x, DType dt, int64_t start, int64_t n, int64_t bs, const float* absmax,  \
                     const Lut4* lut, uint8_t* packed);                                                   \
  void dequantize_lut4(const uint8_t* packed, int64_t start, int64_t n, int64_t bs, const float* absmax,  \
                       const float* code16, float* out);                                                  \
  void quantize_lut8(const void* x, DType dt, int64_t start, int64_t n, int64_t bs, const float* absmax,  \
                     const Lut8* lut, uint8_t* q);                                                        \
  void dequantize_lut8(const uint8_t* q, int64_t start, int64_t n, int64_t bs, const float* absmax,       \
                       const float* code256, float* out);                                                 \
  void lut4_f32(const Lut4Matrix& w, const float* x, int64_t n, int64_t ldx, int64_t r0, int64_t r1,      \
                float* y, int64_t ldy);                                                                   \
  void int8_f32(const Int8Matrix& w, const float* x, int64_t n, int64_t ldx, int64_t r0, int64_t r1,      \
                float* y, int64_t ldy);                                                                   \
  void lut4_bf16(const Lut4Matrix& w, const uint16_t* x, int64_t n, int64_t ldx, int64_t r0, int64_t r1,  \
                 float* y, int64_t ldy);                                                                  \
  void int8_i8(const Int8Matrix& w, const uint8_t* xu, int64_t n, int64_t ldx, int64_t r0, int64_t r1,    \
               int32_t* acc, int64_t ldy);                                                                \
  void lut4_t_f32(const Lut4Matrix& w, const float* gy, int64_t n, int64_t ldy, int64_t c0, int64_t c1,   \
                  float* gx, int64_t ldx, bool accumulate);                                               \
  void int8_t_f32(const Int8Matrix& w, const float* gy, int64_t n, int64_t ldy, int64_t c0, int64_t c1,   \
                  float* gx, int64_t ldx, bool accumulate);                                               \
  void quantize_row_u8(const float* x, int64_t cols, float inv, uint8_t* xu);                             \
  extern const KernelTable table;                                                                         \
  }

MSBNB_DECLARE_ISA_KERNELS(scalar)
MSBNB_DECLARE_ISA_KERNELS(avx2)
MSBNB_DECLARE_ISA_KERNELS(avx512)
