// AVX-512: codebook formats, bit-identical to ref/lut.cpp. 4-bit (NF4, FP4, HIGH nibble first)
// and 8-bit (dynamic map).
#include <algorithm>
#include <cstring>

#include "kernels/isa_kernels.h"
#include "kernels/lut_walk.h"
#include "kernels/scalar_math.h"
#include "kernels/x86/avx512/lut8_search.h"
#include "kernels/x86/avx512/simd.h"

namespace msbnb::kernels::MSBNB_ISA_NS {

namespace {

// dequantize_lut8 builds a 256-entry product table for blocks at least this long.
constexpr int64_t kLut8TableMin = 256;

// ---- 4-bit ----------------------------------------------------------------------------------

// Codes of x elements [i, i + len) of one block, one per byte. The position is the count of
// midpoints below x (as sorted_position16: exact for any midpoints, NaN counts none).
template <DType D>
void code_segment4(const void* x, int64_t i, int64_t len, float inv, const __m512* mid, __m512i s2c,
                   uint8_t* q) {
  const __m512 iv = _mm512_set1_ps(inv);
  const __m512i one = _mm512_set1_epi32(1);
  for (int64_t k = 0; k < len; k += 16) {
    const __mmask16 m = mask_upto16(len - k);
    const __m512 xn = _mm512_mul_ps(load16<D>(x, i + k, m), iv);
    __m512i p0 = _mm512_setzero_si512(), p1 = p0;  // two chains for latency
    for (int j = 0; j < 14; j += 2) {
      p0 = _mm512_mask_add_epi32(p0, _mm512_cmp_ps_mask(xn, mid[j], _CMP_GT_OQ), p0, one);
      p1 = _mm512_mask_add_epi32(p1, _mm512_cmp_ps_mask(xn, mid[j + 1], _CMP_GT_OQ), p1, one);
    }
    p0 = _mm512_mask_add_epi32(p0, _mm512_cmp_ps_mask(xn, mid[14], _CMP_GT_OQ), p0, one);
    _mm512_mask_cvtepi32_storeu_epi8(q + k, m, _mm512_permutexvar_epi32(_mm512_add_epi32(p0, p1), s2c));
  }
}

template <DType D>
void quantize_lut4_t(const void* x, int64_t start, int64_t n, int64_t bs, const float* absmax,
                     const Lut4* lut, uint8_t* packed) {
  __m512 mid[15];
  for (int j = 0; j < 15; ++j) mid[j] = _mm512_set1_ps(lut->mid[j]);
  const __m512i s2c =
      _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut->sorted_to_code)));
  alignas(64) uint8_t buf[kTile];
  // An odd n is padded with the code of 0.
  code_and_pack<NibbleOrder::high_first>(
      start, n, bs, lut->zero_code, buf, packed, [&](int64_t b, int64_t i, int64_t len, uint8_t* q) {
        code_segment4<D>(x, i, len, inverse_absmax(absmax[b]), mid, s2c, q);
      });
}

// ---- 8-bit ----------------------------------------------------------------------------------

template <DType D>
void code_segment8(const void* x, int64_t i, int64_t len, float inv, const Search8& search, const Lut8* lut,
                   uint8_t* q) {
  const __m512 iv = _mm512_set1_ps(inv);
  for (int64_t k = 0; k < len; k += 16) {
    const __mmask16 m = mask_upto16(len - k);
    const __m512i p = search.position(_mm512_mul_ps(load16<D>(x, i + k, m), iv));
    _mm512_mask_cvtepi32_storeu_epi8(q + k, m, _mm512_i32gather_epi32(p, lut->sorted_to_code, 4));
  }
}

template <DType D>
void quantize_lut8_t(const void* x, int64_t start, int64_t n, int64_t bs, const float* absmax,
                     const Lut8* lut, uint8_t* q) {
  const Search8 search(lut->mid);
  quantize_lut8_walk<D>(x, start, n, bs, absmax, lut, q, [&](int64_t i, int64_t end, float inv) {
    code_segment8<D>(x, i, end - i, inv, search, lut, q + i);
  });
}

}  // namespace

void quantize_lut4(const void* x, DType dt, int64_t start, int64_t n, int64_t bs, const float* absmax,
                   const Lut4* lut, uint8_t* packed) {
  dispatch_dtype(dt,
                 [&](auto d) { quantize_lut4_t<decltype(d)::value>(x, start, n, bs, absmax, lut, packed); });
}

void dequantize_lut4(const uint8_t* packed, int64_t start, int64_t n, int64_t bs, const float* absmax,
                     const float* code16, float* out) {
  const __m512 code = _mm512_loadu_ps(code16);
  for_each_block(start, n, bs, [&](int64_t b, int64_t i, int64_t end) {
    // code[q] * absmax for all 16 q at once: the same products the reference computes.
    const __m512 tbl = _mm512_mul_ps(code, _mm512_set1_ps(absmax[b]));
    if (i % 2) {  // odd start (odd block size): the low nibble of a shared byte
      out[i] = code16[packed[i / 2] & 0xf] * absmax[b];
      ++i;
    }
    lookup_nibbles<NibbleOrder::high_first>(packed, i, end, tbl, out);
  });
}

void quantize_lut8(const void* x, DType dt, int64_t start, int64_t n, int64_t bs, const float* absmax,
                   const Lut8* lut, uint8_t* q) {
  dispatch_dtype(dt, [&](auto d) { quantize_lut8_t<decltype(d)::value>(x, start, n, bs, absmax, lut, q); });
}

void dequantize_lut8(const uint8_t* q, int64_t start, int64_t n, int64_t bs, const float* absmax,
                     const float* code256, float* out) {
  alignas(64) float t[256];  // the product table of a long block
  for_each_block(start, n, bs, [&](int64_t b, int64_t i, int64_t end) {
    const __m512 a = _mm512_set1_ps(absmax[b]);
    if (end - i >= kLut8TableMin) {
      // Long block: a table of the 256 products code[q] * absmax (the reference's products), then
      // one scalar load + store per element, which beats vpgatherdps by ~1.4x.
      for (int k = 0; k < 256; k += 16)
        _mm512_store_ps(t + k, _mm512_mul_ps(_mm512_loadu_ps(code256 + k), a));
      for (; i + 8 <= end; i += 8) {
        uint64_t w;
        std::memcpy(&w, q + i, 8);
        for (int k = 0; k < 8; ++k) out[i + k] = t[(w >> (8 * k)) & 0xff];
      }
      for (; i < end; ++i) out[i] = t[q[i]];
      return;
    }
    for (; i + 64 <= end; i += 64) {
      const __m512i v = _mm512_loadu_si512(q + i);
      const __m512i i0 = _mm512_cvtepu8_epi32(_mm512_castsi512_si128(v)),
                    i1 = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(v, 1));
      const __m512i i2 = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(v, 2)),
                    i3 = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(v, 3));
      _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_i32gather_ps(i0, code256, 4), a));
      _mm512_storeu_ps(out + i + 16, _mm512_mul_ps(_mm512_i32gather_ps(i1, code256, 4), a));
      _mm512_storeu_ps(out + i + 32, _mm512_mul_ps(_mm512_i32gather_ps(i2, code256, 4), a));
      _mm512_storeu_ps(out + i + 48, _mm512_mul_ps(_mm512_i32gather_ps(i3, code256, 4), a));
    }
    for (; i < end; i += 16) {
      const __mmask16 m = mask_upto16(end - i);
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, q + i));
      _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_i32gather_ps(idx, code256, 4), a));
    }
  });
}

}  // namespace msbnb::kernels::MSBNB_ISA_NS
