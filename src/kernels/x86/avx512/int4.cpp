// AVX-512: int4 per group, qint4x2 packing (LOW nibble first), bit-identical to ref/int4.cpp.
// GCC 12 flags the intrinsics' own _mm512_undefined_*() as maybe-uninitialized once inlined
// (GCC bug 105593); the warning points into the header, so silence it there only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>

#include "kernels/isa_kernels.h"
#include "kernels/scalar_math.h"

namespace msbnb::kernels::avx512 {

namespace {

// Columns quantized into a stack buffer of one code per byte before packing (even, so a byte's
// two nibbles never straddle tiles).
constexpr int64_t kTile = 1024;

inline __mmask16 tail_mask16(int64_t k) { return static_cast<__mmask16>((1u << k) - 1u); }

template <DType D>
inline __m512 load16(const void* x, int64_t i, __mmask16 m) {
  if constexpr (D == DType::f32) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(x) + i);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(x) + i);
    if constexpr (D == DType::f16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// quantize_affine of x elements [i, i + len) into one byte each (its low nibble is the code).
template <DType D>
void quantize_segment(const void* x, int64_t i, int64_t len, float s, float zp, float lo, float hi,
                      uint8_t* q) {
  if (s == 0.0f) {
    std::fill(q, q + len, static_cast<uint8_t>(static_cast<int32_t>(zp)));
    return;
  }
  const __m512 sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(zp), lov = _mm512_set1_ps(lo),
               hiv = _mm512_set1_ps(hi);
  for (int64_t k = 0; k < len; k += 16) {
    const __mmask16 m = len - k >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask16(len - k);
    __m512 t = _mm512_roundscale_ps(_mm512_div_ps(load16<D>(x, i + k, m), sv),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    t = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(t, zv), lov), hiv);  // max_ps(NaN, lo) = lo, as fmax
    _mm512_mask_cvtepi32_storeu_epi8(q + k, m, _mm512_cvtps_epi32(t));
  }
}

// dst[j] = q[2j] & 0xf | q[2j+1] << 4 for j < bytes.
void pack_low_first(const uint8_t* q, int64_t bytes, uint8_t* dst) {
  for (int64_t j = 0; j < bytes; j += 32) {
    const int64_t k = std::min<int64_t>(32, bytes - j);
    const __mmask32 m = static_cast<__mmask32>((uint64_t{1} << k) - 1u);
    const __m512i w = _mm512_maskz_loadu_epi16(m, q + 2 * j);
    const __m512i nib = _mm512_or_si512(_mm512_and_si512(w, _mm512_set1_epi16(0x000f)),
                                        _mm512_and_si512(_mm512_srli_epi16(w, 4), _mm512_set1_epi16(0x00f0)));
    _mm512_mask_cvtepi16_storeu_epi8(dst + j, m, nib);
  }
}

template <DType D>
void quantize_int4_t(const void* x, int64_t rows, int64_t cols, int64_t gs, const float* scale,
                     const int32_t* zero_point, uint8_t* packed) {
  const int64_t groups = (cols + gs - 1) / gs, row_bytes = (cols + 1) / 2;
  const float lo = zero_point ? 0.0f : -7.0f, hi = zero_point ? 15.0f : 7.0f;
  alignas(64) uint8_t buf[kTile];
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t t0 = 0; t0 < cols; t0 += kTile) {
      const int64_t t1 = std::min(cols, t0 + kTile);
      for (int64_t c = t0; c < t1;) {
        const int64_t g = r * groups + c / gs, end = std::min(t1, (c / gs + 1) * gs);
        const float zp = zero_point ? static_cast<float>(zero_point[g]) : 0.0f;
        quantize_segment<D>(x, r * cols + c, end - c, scale[g], zp, lo, hi, buf + (c - t0));
        c = end;
      }
      int64_t count = t1 - t0;
      if (count % 2) buf[count++] = 0;  // odd cols: the pad nibble is 0
      pack_low_first(buf, count / 2, packed + r * row_bytes + t0 / 2);
    }
  }
}

// 16 float lanes of tbl[nibble] for the nibbles of 8 bytes, low nibble first. vpermps reads
// only the low 4 bits of each index, so the high bits of a byte need no masking.
inline __m512 expand8(__m128i bytes8, __m512 tbl) {
  __m128i w = _mm_cvtepu8_epi16(bytes8);
  w = _mm_or_si128(w, _mm_slli_epi16(w, 4));  // byte 2j: b (low nibble), byte 2j+1: b >> 4
  return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(w), tbl);
}

// out[c] = tbl[nibble c] for c in [c, end) of one row; src is the row's first byte.
void dequant_segment(const uint8_t* src, int64_t c, int64_t end, __m512 tbl, float* out) {
  if (c % 2 && c < end) {  // odd start (odd group size): the high nibble of a shared byte
    alignas(64) float t[16];
    _mm512_store_ps(t, tbl);
    out[c] = t[src[c / 2] >> 4];
    ++c;
  }
  for (; c + 64 <= end; c += 64) {
    __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + c / 2)));
    w = _mm512_or_si512(w, _mm512_slli_epi16(w, 4));
    _mm512_storeu_ps(out + c, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm512_castsi512_si128(w)), tbl));
    _mm512_storeu_ps(out + c + 16,
                     _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(w, 1)), tbl));
    _mm512_storeu_ps(out + c + 32,
                     _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(w, 2)), tbl));
    _mm512_storeu_ps(out + c + 48,
                     _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(w, 3)), tbl));
  }
  for (; c < end; c += 16) {
    const int64_t k = std::min<int64_t>(16, end - c);
    const __mmask16 bytes = static_cast<__mmask16>((1u << ((k + 1) / 2)) - 1u);
    const __mmask16 m = k == 16 ? static_cast<__mmask16>(0xffff) : tail_mask16(k);
    _mm512_mask_storeu_ps(out + c, m, expand8(_mm_maskz_loadu_epi8(bytes, src + c / 2), tbl));
  }
}

}  // namespace

void quantize_int4(const void* x, DType dt, int64_t rows, int64_t cols, int64_t gs, const float* scale,
                   const int32_t* zero_point, uint8_t* packed) {
  switch (dt) {
    case DType::f32:
      return quantize_int4_t<DType::f32>(x, rows, cols, gs, scale, zero_point, packed);
    case DType::f16:
      return quantize_int4_t<DType::f16>(x, rows, cols, gs, scale, zero_point, packed);
    case DType::bf16:
      return quantize_int4_t<DType::bf16>(x, rows, cols, gs, scale, zero_point, packed);
  }
}

void dequantize_int4(const uint8_t* packed, int64_t rows, int64_t cols, int64_t gs, const float* scale,
                     const int32_t* zero_point, float* out) {
  const int64_t groups = (cols + gs - 1) / gs, row_bytes = (cols + 1) / 2;
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // Nibble value per code: two's complement (q ^ 8) - 8 when symmetric.
  const __m512i q =
      zero_point ? iota
                 : _mm512_sub_epi32(_mm512_xor_si512(iota, _mm512_set1_epi32(8)), _mm512_set1_epi32(8));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int64_t g = r * groups + gi;
      // The 16 possible outputs of this group, each (q - zp) * scale as the reference computes it.
      const __m512i zp = _mm512_set1_epi32(zero_point ? zero_point[g] : 0);
      const __m512 tbl = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q, zp)), _mm512_set1_ps(scale[g]));
      dequant_segment(packed + r * row_bytes, gi * gs, std::min(cols, (gi + 1) * gs), tbl, out + r * cols);
    }
  }
}

}  // namespace msbnb::kernels::avx512
