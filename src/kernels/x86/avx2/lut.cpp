// AVX2 codebook formats: 4-bit (NF4 / FP4, HIGH nibble first) and 8-bit (dynamic map).
// Quantize: x * inverse_absmax, then the reference's sorted position (15 compares, or the
// 8-step branch-free search with permutes and gathers), then sorted_to_code. Dequantize: code[q] * absmax,
// with the 16 products of a block computed once (the same multiplications) and looked up by
// permutes, or a gather of the 256 codes.
#include <cstring>

#include "kernels/isa_kernels.h"
#include "kernels/lut_walk.h"
#include "kernels/scalar_math.h"
#include "kernels/x86/avx2/lut8_search.h"
#include "kernels/x86/avx2/simd.h"

namespace msbnb::kernels::MSBNB_ISA_NS {
namespace {

// #{k < 15 : xn > mid[k]} per lane; a compare mask is -1, so subtracting it counts.
inline __m256i position16(__m256 xn, const __m256* mid) {
  __m256i p0 = _mm256_setzero_si256(), p1 = p0;
  for (int k = 0; k < 14; k += 2) {
    p0 = _mm256_sub_epi32(p0, _mm256_castps_si256(_mm256_cmp_ps(xn, mid[k], _CMP_GT_OQ)));
    p1 = _mm256_sub_epi32(p1, _mm256_castps_si256(_mm256_cmp_ps(xn, mid[k + 1], _CMP_GT_OQ)));
  }
  p0 = _mm256_sub_epi32(p0, _mm256_castps_si256(_mm256_cmp_ps(xn, mid[14], _CMP_GT_OQ)));
  return _mm256_add_epi32(p0, p1);
}

template <DType DT>
void quantize_lut4_t(const void* x, int64_t start, int64_t n, int64_t bs, const float* absmax,
                     const Lut4* lut, uint8_t* packed) {
  __m256 mid[15];
  for (int k = 0; k < 15; ++k) mid[k] = _mm256_set1_ps(lut->mid[k]);
  const __m128i s2c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lut->sorted_to_code));
  auto code = [&](int64_t j) -> int {   // scalar, element j of the range
    if (j >= n) return lut->zero_code;  // odd n: pad with the code of 0
    const float xn = load_elem(x, DT, j) * inverse_absmax(absmax[(start + j) / bs]);
    return lut->sorted_to_code[sorted_position16(xn, lut->mid)];
  };
  // i is always even (a byte boundary); a scalar pair may step one past the block's end (odd bs).
  for (int64_t i = 0, b = start / bs; i < n;) {
    const int64_t end = block_end(start, b, n, bs);
    const __m256 inv = _mm256_set1_ps(inverse_absmax(absmax[b]));
    for (; i + 16 <= end; i += 16) {
      const __m256i p0 = position16(_mm256_mul_ps(load8<DT>(x, i), inv), mid);
      const __m256i p1 = position16(_mm256_mul_ps(load8<DT>(x, i + 8), inv), mid);
      // Positions 0..15 to bytes in element order, then to codes, two per byte.
      const __m128i c = _mm_shuffle_epi8(s2c, bytes16(p0, p1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(packed + i / 2), pack_nibbles<NibbleOrder::high_first>(c));
    }
    // Rest of the block by pairs; a pair may reach into the next block (odd bs) or the pad.
    for (; i < end; i += 2) packed[i / 2] = static_cast<uint8_t>(code(i) << 4 | code(i + 1));
    b = i == end ? b + 1 : (start + i) / bs;
  }
}

template <DType DT>
void quantize_lut8_t(const void* x, int64_t start, int64_t n, int64_t bs, const float* absmax,
                     const Lut8* lut, uint8_t* q) {
  const Lut8Search search(lut);
  quantize_lut8_walk<DT>(x, start, n, bs, absmax, lut, q, [&](int64_t i, int64_t end, float inv_s) {
    const __m256 inv = _mm256_set1_ps(inv_s);
    for (; i + 16 <= end; i += 16) {  // two independent searches overlap their gather latencies
      const __m256i c0 = search.codes(_mm256_mul_ps(load8<DT>(x, i), inv));
      const __m256i c1 = search.codes(_mm256_mul_ps(load8<DT>(x, i + 8), inv));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), low_bytes8(c0));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i + 8), low_bytes8(c1));
    }
    for (; i + 8 <= end; i += 8) {
      const __m256i c = search.codes(_mm256_mul_ps(load8<DT>(x, i), inv));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), low_bytes8(c));
    }
    for (; i < end; ++i) {
      const float xn = load_elem(x, DT, i) * inv_s;
      q[i] = static_cast<uint8_t>(lut->sorted_to_code[sorted_position256(xn, lut->mid)]);
    }
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
  const __m256 c_lo = _mm256_loadu_ps(code16), c_hi = _mm256_loadu_ps(code16 + 8);
  // 8 elements come from one 32-bit word broadcast to all lanes; byte k holds element 2k in its
  // high nibble and 2k + 1 in its low one. Lane j shifts its nibble down to bits 0-3 (permps reads
  // only bits 0-2) and, separately, its bit 3 up to the sign bit for blendv.
  const __m256i shr = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
  const __m256i shl = _mm256_setr_epi32(24, 28, 16, 20, 8, 12, 0, 4);
  for_each_block(start, n, bs, [&](int64_t b, int64_t i, int64_t end) {
    const float a = absmax[b];
    auto scalar = [&](int64_t j) {
      const uint8_t byte = packed[j / 2];
      out[j] = code16[(j % 2 == 0) ? (byte >> 4) : (byte & 0xf)] * a;
    };
    if (i % 2 != 0) scalar(i++);  // odd bs: the block starts in a byte's low nibble
    // code16[q] * absmax for the 16 codes: the same products the reference forms per element.
    const __m256 va = _mm256_set1_ps(a);
    const __m256 t_lo = _mm256_mul_ps(c_lo, va), t_hi = _mm256_mul_ps(c_hi, va);
    auto step8 = [&](const uint8_t* src, float* dst) {
      int32_t word;
      std::memcpy(&word, src, 4);
      const __m256i w = _mm256_set1_epi32(word);
      const __m256i idx = _mm256_srlv_epi32(w, shr);
      const __m256 sel = _mm256_castsi256_ps(_mm256_sllv_epi32(w, shl));
      _mm256_storeu_ps(dst, _mm256_blendv_ps(_mm256_permutevar8x32_ps(t_lo, idx),
                                             _mm256_permutevar8x32_ps(t_hi, idx), sel));
    };
    const uint8_t* src = packed + i / 2;  // i is even here
    for (; i + 32 <= end; i += 32, src += 16) {
      step8(src, out + i);
      step8(src + 4, out + i + 8);
      step8(src + 8, out + i + 16);
      step8(src + 12, out + i + 24);
    }
    for (; i + 8 <= end; i += 8, src += 4) step8(src, out + i);
    for (; i < end; ++i) scalar(i);
  });
}

void quantize_lut8(const void* x, DType dt, int64_t start, int64_t n, int64_t bs, const float* absmax,
                   const Lut8* lut, uint8_t* q) {
  dispatch_dtype(dt, [&](auto d) { quantize_lut8_t<decltype(d)::value>(x, start, n, bs, absmax, lut, q); });
}

void dequantize_lut8(const uint8_t* q, int64_t start, int64_t n, int64_t bs, const float* absmax,
                     const float* code256, float* out) {
  for_each_block(start, n, bs, [&](int64_t b, int64_t i, int64_t end) {
    const float a = absmax[b];
    const __m256 va = _mm256_set1_ps(a);
    auto step8 = [&](int64_t j) {
      const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j)));
      _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_i32gather_ps(code256, idx, 4), va));
    };
    for (; i + 32 <= end; i += 32) {
      step8(i);
      step8(i + 8);
      step8(i + 16);
      step8(i + 24);
    }
    for (; i + 8 <= end; i += 8) step8(i);
    for (; i < end; ++i) out[i] = code256[q[i]] * a;
  });
}

}  // namespace msbnb::kernels::MSBNB_ISA_NS
