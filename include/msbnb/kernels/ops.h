// Multi-threaded quantize / dequantize on raw buffers (OpenMP). Each call splits its range into
// chunks that start on block boundaries and hands them to one KernelTable (the active one unless
// given). Results do not depend on the thread count: every op is elementwise or an exact max.
#pragma once
#include <cstdint>

#include "msbnb/kernels/kernel_table.h"

namespace msbnb::kernels {

/// Per-block absmax of a flat buffer of n elements in blocks of bs (last block short).
void absmax_blocks(const void* x, DType dt, int64_t n, int64_t bs, float* out,
                   const KernelTable& k = active_kernels());
/// Per-block min and max.
void minmax_blocks(const void* x, DType dt, int64_t n, int64_t bs, float* mins, float* maxs,
                   const KernelTable& k = active_kernels());

void quantize_int8(const void* x, DType dt, int64_t n, int64_t bs, const float* scale,
                   const int32_t* zero_point, int32_t lo, int32_t hi, int8_t* q,
                   const KernelTable& k = active_kernels());
void dequantize_int8(const int8_t* q, int64_t n, int64_t bs, const float* scale, const int32_t* zero_point,
                     float* out, const KernelTable& k = active_kernels());

void quantize_int4(const void* x, DType dt, int64_t rows, int64_t cols, int64_t gs, const float* scale,
                   const int32_t* zero_point, uint8_t* packed, const KernelTable& k = active_kernels());
void dequantize_int4(const uint8_t* packed, int64_t rows, int64_t cols, int64_t gs, const float* scale,
                     const int32_t* zero_point, float* out, const KernelTable& k = active_kernels());

void quantize_lut4(const void* x, DType dt, int64_t n, int64_t bs, const float* absmax, const Lut4& lut,
                   uint8_t* packed, const KernelTable& k = active_kernels());
void dequantize_lut4(const uint8_t* packed, int64_t n, int64_t bs, const float* absmax, const float* code16,
                     float* out, const KernelTable& k = active_kernels());

void quantize_lut8(const void* x, DType dt, int64_t n, int64_t bs, const float* absmax, const Lut8& lut,
                   uint8_t* q, const KernelTable& k = active_kernels());
void dequantize_lut8(const uint8_t* q, int64_t n, int64_t bs, const float* absmax, const float* code256,
                     float* out, const KernelTable& k = active_kernels());

/// Scale / zero point from statistics (DESIGN.md "int8" and "int4"), one per block.
/// Symmetric: scale = absmax / qmax. Asymmetric over [min(lo_v, 0), max(hi_v, 0)] onto
/// [qmin, qmax]: scale = (max - min) / (qmax - qmin), zero point = clamp(rne(qmin - min / scale)).
/// A zero range gives scale 0 and zero point 0.
void symmetric_scales(const float* absmax, int64_t count, float qmax, float* scale);
void asymmetric_scales(const float* mins, const float* maxs, int64_t count, int32_t qmin, int32_t qmax,
                       float* scale, int32_t* zero_point);

/// Threads the ops use (omp_get_max_threads unless set); set_num_threads(0) restores that.
int num_threads();
void set_num_threads(int n);

}  // namespace msbnb::kernels

namespace msbnb::kernels {
/// MindSpore qint4x2 packing of int8 values (low nibble first, two's complement, odd cols padded
/// with 0): rows of cols values -> rows of (cols + 1) / 2 bytes. Values outside [-8, 7] are the
/// caller's to reject.
void pack_qint4x2(const int8_t* values, int64_t rows, int64_t cols, uint8_t* packed);
/// Inverse of pack_qint4x2 (sign-extends each nibble).
void unpack_qint4x2(const uint8_t* packed, int64_t rows, int64_t cols, int8_t* values);
}  // namespace msbnb::kernels
