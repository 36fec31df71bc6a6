// AVX2 int4 per group along rows, qint4x2 packing (LOW nibble first). Vectors cover 16 (or 32)
// columns that start at an even column and lie in one group; the rest of a group (and a pair
// that straddles two groups when gs is odd) goes through the scalar helpers.
#include <algorithm>

#include "kernels/isa_kernels.h"
#include "kernels/scalar_math.h"
#include "kernels/x86/avx2/simd.h"

namespace msbnb::kernels::MSBNB_ISA_NS {
namespace {

// 16 int32 codes (elements 0-7 in a, 8-15 in b) -> 8 bytes, element 2j in the low nibble.
inline __m128i pack_low_first(__m256i a, __m256i b) {
  const __m256i m = _mm256_set1_epi32(0xf);
  return pack_nibbles<NibbleOrder::low_first>(bytes16(_mm256_and_si256(a, m), _mm256_and_si256(b, m)));
}

template <DType DT>
void quantize_int4_t(const void* x, int64_t rows, int64_t cols, int64_t gs, const float* scale,
                     const int32_t* zero_point, uint8_t* packed) {
  const int64_t groups = ceil_div(cols, gs), row_bytes = (cols + 1) / 2;
  const float lo = zero_point ? 0.0f : -7.0f, hi = zero_point ? 15.0f : 7.0f;
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* dst = packed + r * row_bytes;
    const int64_t base = r * cols;
    // Code of column c (any group), for the scalar pairs.
    auto code = [&](int64_t c) -> uint8_t {
      const int64_t g = r * groups + c / gs;
      const float zp = zero_point ? static_cast<float>(zero_point[g]) : 0.0f;
      return static_cast<uint8_t>(quantize_affine(load_elem(x, DT, base + c), scale[g], zp, lo, hi) & 0xf);
    };
    // c is always even (a byte boundary); a scalar pair may step one past the group (odd gs).
    for (int64_t c = 0, g = 0; c < cols;) {
      const int64_t gend = std::min(cols, (g + 1) * gs);
      const float s = scale[r * groups + g];
      const float zp = zero_point ? static_cast<float>(zero_point[r * groups + g]) : 0.0f;
      if (c + 16 <= gend) {
        if (s == 0.0f) {  // every element codes as zp
          const __m256i z = _mm256_set1_epi32(quantize_affine(0.0f, s, zp, lo, hi));
          const __m128i bytes = pack_low_first(z, z);
          for (; c + 16 <= gend; c += 16) _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + c / 2), bytes);
        } else {
          const AffineParams p = {_mm256_set1_ps(s), _mm256_set1_ps(zp), vlo, vhi};
          for (; c + 16 <= gend; c += 16) {
            const __m256i a = quantize8(load8<DT>(x, base + c), p);
            const __m256i b = quantize8(load8<DT>(x, base + c + 8), p);
            _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + c / 2), pack_low_first(a, b));
          }
        }
      }
      // Rest of the group by pairs; a pair may reach into the next group (odd gs) or the pad.
      for (; c < gend; c += 2)
        dst[c / 2] = static_cast<uint8_t>(code(c) | (c + 1 < cols ? code(c + 1) << 4 : 0));
      g = c == gend ? g + 1 : c / gs;
    }
  }
}

}  // namespace

void quantize_int4(const void* x, DType dt, int64_t rows, int64_t cols, int64_t gs, const float* scale,
                   const int32_t* zero_point, uint8_t* packed) {
  dispatch_dtype(
      dt, [&](auto d) { quantize_int4_t<decltype(d)::value>(x, rows, cols, gs, scale, zero_point, packed); });
}

void dequantize_int4(const uint8_t* packed, int64_t rows, int64_t cols, int64_t gs, const float* scale,
                     const int32_t* zero_point, float* out) {
  const int64_t groups = ceil_div(cols, gs), row_bytes = (cols + 1) / 2;
  const __m128i nib = _mm_set1_epi8(0x0f);
  // Symmetric codes are two's-complement nibbles: (q ^ 8) - 8 sign-extends them.
  const __m128i sx = _mm_set1_epi8(zero_point ? 0 : 8);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* src = packed + r * row_bytes;
    float* dst = out + r * cols;
    for (int64_t c = 0, gi = 0; c < cols; ++gi) {
      const int64_t g = r * groups + gi, gend = std::min(cols, (gi + 1) * gs);
      const float s = scale[g];
      const int32_t zp = zero_point ? zero_point[g] : 0;
      auto scalar = [&](int64_t j) {
        const uint8_t byte = src[j / 2];
        int32_t q = (j % 2 == 0) ? (byte & 0xf) : (byte >> 4);
        if (!zero_point) q = (q ^ 8) - 8;
        dst[j] = static_cast<float>(q - zp) * s;
      };
      if (c % 2 != 0) scalar(c++);  // odd gs: the group starts in a byte's high nibble
      const __m256 vs = _mm256_set1_ps(s);
      const __m256i vz = _mm256_set1_epi32(zp);
      // 16 codes, one per byte in element order -> (q - zp) * s, as the reference computes it.
      auto emit16 = [&](__m128i e, float* o) {
        e = _mm_sub_epi8(_mm_xor_si128(e, sx), sx);
        _mm256_storeu_ps(o, dequant8(_mm256_cvtepi8_epi32(e), vz, vs));
        _mm256_storeu_ps(o + 8, dequant8(_mm256_cvtepi8_epi32(_mm_srli_si128(e, 8)), vz, vs));
      };
      for (; c + 32 <= gend; c += 32) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + (c >> 1)));
        const __m128i lo = _mm_and_si128(b, nib), hi = _mm_and_si128(_mm_srli_epi16(b, 4), nib);
        emit16(_mm_unpacklo_epi8(lo, hi), dst + c);
        emit16(_mm_unpackhi_epi8(lo, hi), dst + c + 16);
      }
      for (; c + 16 <= gend; c += 16) {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + (c >> 1)));
        emit16(_mm_unpacklo_epi8(_mm_and_si128(b, nib), _mm_and_si128(_mm_srli_epi16(b, 4), nib)), dst + c);
      }
      for (; c < gend; ++c) scalar(c);
    }
  }
}

}  // namespace msbnb::kernels::MSBNB_ISA_NS
