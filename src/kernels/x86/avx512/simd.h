// Helpers shared by the AVX-512 kernels of this folder. Private to it: every file here is compiled
// with the AVX-512 flags, and everything is in an unnamed namespace so each translation unit keeps
// its own copy (see kernels/scalar_math.h). The AVX2 folder has its own simd.h.
#pragma once
// GCC 12 flags the intrinsics' own _mm512_undefined_*() as maybe-uninitialized once inlined
// (GCC bug 105593); the warning points into the header, so silence it there only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/walk.h"  // dispatch_dtype, for_each_block (shared by every ISA)
#include "msbnb/kernels/types.h"

namespace msbnb::kernels::MSBNB_ISA_NS {
namespace {

// Masks of the first k lanes (k < 16, k < 32), and of min(k, 16) lanes.
inline __mmask16 tail_mask16(int64_t k) { return static_cast<__mmask16>((1u << k) - 1u); }
inline __mmask32 tail_mask32(int64_t k) { return static_cast<__mmask32>((uint64_t{1} << k) - 1u); }
inline __mmask16 mask_upto16(int64_t k) { return k >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask16(k); }

// 16 elements from element i of x as float, exactly as load_elem (cvtph is exact for every half;
// a signalling NaN comes out quiet, which no quantized value depends on).
template <DType D>
inline __m512 load16(const void* x, int64_t i) {
  if constexpr (D == DType::f32) {
    return _mm512_loadu_ps(static_cast<const float*>(x) + i);
  } else {
    const __m256i h =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i));
    if constexpr (D == DType::f16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}
// The same for the lanes of m (the others are 0).
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

// quantize_affine on 16 lanes: same float ops in the same order. max_ps(t, lo) returns lo for a
// NaN t, as fmax does; t is a whole number in [lo, hi] afterwards, so the conversion is exact.
struct Affine {
  __m512 s, zp, lo, hi;
  __m512i operator()(__m512 x) const {
    __m512 t = _mm512_roundscale_ps(_mm512_div_ps(x, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    t = _mm512_add_ps(t, zp);
    t = _mm512_min_ps(_mm512_max_ps(t, lo), hi);
    return _mm512_cvtps_epi32(t);
  }
};

// float(q - zp) * s for 16 int32 lanes: the reference's operations.
inline __m512 dequant16(__m512i q, __m512i zp, __m512 s) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q, zp)), s);
}

// ---- 4-bit packing ----------------------------------------------------------------------------

// Which nibble of a packed byte holds the even element: qint4x2 (int4) puts it in the low one,
// the codebook formats (NF4 / FP4) in the high one.
enum class NibbleOrder { low_first, high_first };

// dst[j] = the codes q[2j], q[2j + 1] in one byte, for j < bytes. low_first keeps the low nibble
// of each code; high_first needs codes < 16.
template <NibbleOrder O>
inline void pack_nibbles(const uint8_t* q, int64_t bytes, uint8_t* dst) {
  for (int64_t j = 0; j < bytes; j += 32) {
    const __mmask32 m = tail_mask32(std::min<int64_t>(32, bytes - j));
    const __m512i w = _mm512_maskz_loadu_epi16(m, q + 2 * j);  // low byte: q[2j], high byte: q[2j + 1]
    __m512i p;
    if constexpr (O == NibbleOrder::low_first) {
      p = _mm512_or_si512(_mm512_and_si512(w, _mm512_set1_epi16(0x000f)),
                          _mm512_and_si512(_mm512_srli_epi16(w, 4), _mm512_set1_epi16(0x00f0)));
    } else {
      p = _mm512_or_si512(_mm512_slli_epi16(w, 4), _mm512_srli_epi16(w, 8));
    }
    _mm512_mask_cvtepi16_storeu_epi8(dst + j, m, p);
  }
}

// The 4-bit quantizers code the elements [0, n) of a range into buf, one code per byte, a tile
// at a time, then pack the tile's pairs in order O into packed (kTile is even, so a byte's two
// nibbles never straddle tiles); an odd n is padded with the code `pad`. segment(b, i, len, q)
// codes the elements [i, i + len) of block b into q[0, len); the range starts at element `start`
// of blocks of bs elements. buf is the caller's: a 1 KiB array here would keep GCC from inlining
// the helper (its stack-frame growth limit).
constexpr int64_t kTile = 1024;
template <NibbleOrder O, class Segment>
inline void code_and_pack(int64_t start, int64_t n, int64_t bs, uint8_t pad, uint8_t (&buf)[kTile],
                          uint8_t* packed, Segment&& segment) {
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int64_t t1 = std::min(n, t0 + kTile);
    for (int64_t i = t0; i < t1;) {
      const int64_t b = (start + i) / bs, end = std::min(t1, (b + 1) * bs - start);
      segment(b, i, end - i, buf + (i - t0));
      i = end;
    }
    int64_t count = t1 - t0;
    if (count % 2) buf[count++] = pad;
    pack_nibbles<O>(buf, count / 2, packed + t0 / 2);
  }
}

// Packed bytes, zero-extended to 16-bit words -> the low 4 bits of byte 2j: the nibble of
// element 2j, of byte 2j + 1: that of element 2j + 1 (the high bits are left over).
template <NibbleOrder O>
inline __m128i nibbles_in_order(__m128i w) {
  if constexpr (O == NibbleOrder::low_first) return _mm_or_si128(w, _mm_slli_epi16(w, 4));
  return _mm_or_si128(_mm_srli_epi16(w, 4), _mm_slli_epi16(w, 8));
}
template <NibbleOrder O>
inline __m512i nibbles_in_order(__m512i w) {
  if constexpr (O == NibbleOrder::low_first) return _mm512_or_si512(w, _mm512_slli_epi16(w, 4));
  return _mm512_or_si512(_mm512_srli_epi16(w, 4), _mm512_slli_epi16(w, 8));
}

// out[j] = tbl[nibble j] for j in [i, end), i even; packed holds element 0. vpermps reads only
// the low 4 bits of each index, so the left-over high bits need no masking.
template <NibbleOrder O>
inline void lookup_nibbles(const uint8_t* packed, int64_t i, int64_t end, __m512 tbl, float* out) {
  for (; i + 64 <= end; i += 64) {
    const __m512i w = nibbles_in_order<O>(
        _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + i / 2))));
    _mm512_storeu_ps(out + i, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm512_castsi512_si128(w)), tbl));
    _mm512_storeu_ps(out + i + 16,
                     _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(w, 1)), tbl));
    _mm512_storeu_ps(out + i + 32,
                     _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(w, 2)), tbl));
    _mm512_storeu_ps(out + i + 48,
                     _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(w, 3)), tbl));
  }
  for (; i < end; i += 16) {
    const int64_t k = std::min<int64_t>(16, end - i);
    const __m128i bytes = _mm_maskz_loadu_epi8(tail_mask16((k + 1) / 2), packed + i / 2);
    const __m128i w = nibbles_in_order<O>(_mm_cvtepu8_epi16(bytes));
    _mm512_mask_storeu_ps(out + i, mask_upto16(k), _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(w), tbl));
  }
}

// max |x| over x[0, n) (n a multiple of the vector width), on the magnitude bits: exact, and NaN if
// any element is NaN (the int8 quantizers' absmax).
inline float max_abs(const float* x, int64_t n) {
  __m512i m = _mm512_setzero_si512();
  const __m512i abs = _mm512_set1_epi32(0x7fffffff);
  for (int64_t j = 0; j < n; j += 16)
    m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_loadu_si512(x + j), abs));
  const uint32_t bits = static_cast<uint32_t>(_mm512_reduce_max_epu32(m));
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace
}  // namespace msbnb::kernels::MSBNB_ISA_NS
