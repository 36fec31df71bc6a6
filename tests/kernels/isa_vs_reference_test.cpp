// Every ISA's kernel table against the scalar reference, bit for bit, over odd lengths, tails,
// block sizes, dtypes and edge values. One instantiation per ISA of isa.def; ISAs this CPU lacks
// are reported as SKIPPED.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <sstream>
#include <vector>

#include "msbnb/kernels/formats.h"
#include "msbnb/kernels/kernel_table.h"
#include "msbnb/kernels/ops.h"
#include "test_util.h"

namespace msbnb::test {
namespace {

using kernels::KernelTable;

const int64_t kLengths[] = {1,  2,  3,   7,   15,  16,  17,   31,   33,   63,
                            64, 65, 127, 129, 255, 257, 1000, 4097, 70001};
const DType kDTypes[] = {DType::f32, DType::f16, DType::bf16};
// NaN / Inf never reach quantization through the functional API, but the kernels must still
// agree on them bit for bit (specials).
const Fill kFills[] = {Fill::randn, Fill::zeros, Fill::constant, Fill::denormal,
                       Fill::huge,  Fill::tiny,  Fill::mixed,    Fill::specials};

std::string where(DType dt, Fill fill, int64_t n, int64_t bs) {
  std::ostringstream s;
  s << "dtype=" << kernels::dtype_name(dt) << " fill=" << fill_name(fill) << " n=" << n << " bs=" << bs;
  return s.str();
}

// First differing index of two buffers compared as raw bytes of T, or -1.
template <typename T>
int64_t first_mismatch(const std::vector<T>& a, const std::vector<T>& b) {
  for (size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) return static_cast<int64_t>(i);
  return -1;
}

#define EXPECT_SAME_BITS(ref, got, ctx)                                                                      \
  do {                                                                                                       \
    const int64_t bad = first_mismatch(ref, got);                                                            \
    EXPECT_EQ(bad, -1) << ctx << " index=" << bad << " ref=" << +ref[static_cast<size_t>(bad < 0 ? 0 : bad)] \
                       << " got=" << +got[static_cast<size_t>(bad < 0 ? 0 : bad)];                           \
  } while (0)

class IsaVsReference : public testing::TestWithParam<Isa> {
 protected:
  void SetUp() override {
    MSBNB_SKIP_IF_UNSUPPORTED(GetParam());
    k_ = &kernels::kernels_for(GetParam());
    ref_ = &kernels::kernels_for(Isa::scalar);
  }
  const KernelTable* k_ = nullptr;
  const KernelTable* ref_ = nullptr;
};

TEST_P(IsaVsReference, AbsmaxAndMinmax) {
  for (DType dt : kDTypes)
    for (Fill fill : kFills)
      for (int64_t n : kLengths)
        for (int64_t bs : {int64_t{1}, int64_t{7}, int64_t{32}, int64_t{64}, int64_t{4096}, n}) {
          const Input in = make_input(static_cast<size_t>(n), dt, fill, static_cast<uint32_t>(n * 31 + bs));
          const size_t nb = static_cast<size_t>((n + bs - 1) / bs);
          std::vector<float> a_ref(nb), a_got(nb), lo_ref(nb), lo_got(nb), hi_ref(nb), hi_got(nb);
          ref_->absmax_blocks(in.data(), dt, n, bs, a_ref.data());
          k_->absmax_blocks(in.data(), dt, n, bs, a_got.data());
          EXPECT_SAME_BITS(a_ref, a_got, "absmax " << where(dt, fill, n, bs));
          ref_->minmax_blocks(in.data(), dt, n, bs, lo_ref.data(), hi_ref.data());
          k_->minmax_blocks(in.data(), dt, n, bs, lo_got.data(), hi_got.data());
          EXPECT_SAME_BITS(lo_ref, lo_got, "min " << where(dt, fill, n, bs));
          EXPECT_SAME_BITS(hi_ref, hi_got, "max " << where(dt, fill, n, bs));
          if (HasFailure()) return;
        }
}

TEST_P(IsaVsReference, AbsmaxPropagatesNanAndInf) {
  for (DType dt : kDTypes)
    for (int64_t n : {int64_t{5}, int64_t{64}, int64_t{100}}) {
      for (float bad : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
        Input in = make_input(static_cast<size_t>(n), DType::f32, Fill::randn, 7);
        in.f32[static_cast<size_t>(n - 2)] = bad;
        if (dt != DType::f32) {
          in.u16.resize(static_cast<size_t>(n));
          for (int64_t i = 0; i < n; ++i)
            in.u16[static_cast<size_t>(i)] =
                dt == DType::bf16 ? static_cast<uint16_t>(bits_of(in.f32[static_cast<size_t>(i)]) >> 16)
                                  : float_to_half(in.f32[static_cast<size_t>(i)]);
        }
        in.dt = dt;
        float a = 0, lo = 0, hi = 0;
        k_->absmax_blocks(in.data(), dt, n, n, &a);
        k_->minmax_blocks(in.data(), dt, n, n, &lo, &hi);
        EXPECT_FALSE(std::isfinite(a)) << kernels::dtype_name(dt) << " n=" << n;
        EXPECT_FALSE(std::isfinite(lo) && std::isfinite(hi)) << kernels::dtype_name(dt) << " n=" << n;
      }
    }
}

TEST_P(IsaVsReference, Int8SymmetricAndAsymmetric) {
  for (DType dt : kDTypes)
    for (Fill fill : kFills)
      for (int64_t n : kLengths)
        for (int64_t bs : {int64_t{1}, int64_t{33}, int64_t{64}, int64_t{256}, n})
          for (bool asym : {false, true}) {
            const Input in = make_input(static_cast<size_t>(n), dt, fill, static_cast<uint32_t>(n + bs));
            const size_t nb = static_cast<size_t>((n + bs - 1) / bs);
            std::vector<float> scale(nb), lo(nb), hi(nb);
            std::vector<int32_t> zp(nb);
            if (asym) {
              ref_->minmax_blocks(in.data(), dt, n, bs, lo.data(), hi.data());
              kernels::asymmetric_scales(lo.data(), hi.data(), static_cast<int64_t>(nb), -128, 127,
                                         scale.data(), zp.data());
            } else {
              ref_->absmax_blocks(in.data(), dt, n, bs, lo.data());
              kernels::symmetric_scales(lo.data(), static_cast<int64_t>(nb), 127.0f, scale.data());
            }
            const int32_t* zpp = asym ? zp.data() : nullptr;
            const int32_t qlo = asym ? -128 : -127;
            std::vector<int8_t> q_ref(static_cast<size_t>(n)), q_got(static_cast<size_t>(n));
            ref_->quantize_int8(in.data(), dt, 0, n, bs, scale.data(), zpp, qlo, 127, q_ref.data());
            k_->quantize_int8(in.data(), dt, 0, n, bs, scale.data(), zpp, qlo, 127, q_got.data());
            EXPECT_SAME_BITS(q_ref, q_got, "quantize_int8 asym=" << asym << " " << where(dt, fill, n, bs));
            std::vector<float> d_ref(static_cast<size_t>(n)), d_got(static_cast<size_t>(n));
            ref_->dequantize_int8(q_ref.data(), 0, n, bs, scale.data(), zpp, d_ref.data());
            k_->dequantize_int8(q_ref.data(), 0, n, bs, scale.data(), zpp, d_got.data());
            EXPECT_SAME_BITS(d_ref, d_got, "dequantize_int8 asym=" << asym << " " << where(dt, fill, n, bs));
            // A range that starts inside a block (as a thread's chunk does).
            if (n > 5) {
              const int64_t s = 5;
              const char* xs =
                  static_cast<const char*>(in.data()) + s * static_cast<int64_t>(kernels::dtype_size(dt));
              k_->quantize_int8(xs, dt, s, n - s, bs, scale.data(), zpp, qlo, 127, q_got.data() + s);
              k_->dequantize_int8(q_ref.data() + s, s, n - s, bs, scale.data(), zpp, d_got.data() + s);
              EXPECT_SAME_BITS(q_ref, q_got,
                               "quantize_int8 start=5 asym=" << asym << " " << where(dt, fill, n, bs));
              EXPECT_SAME_BITS(d_ref, d_got,
                               "dequantize_int8 start=5 asym=" << asym << " " << where(dt, fill, n, bs));
            }
            if (HasFailure()) return;
          }
}

TEST_P(IsaVsReference, Int4PerGroup) {
  for (DType dt : kDTypes)
    for (Fill fill : kFills)
      for (int64_t cols : {1, 2, 7, 31, 32, 63, 65, 127, 128, 129, 300})
        for (int64_t gs : {1, 2, 7, 16, 32, 33, 64, 128})  // odd: pairs straddle groups
          for (bool asym : {false, true}) {
            const int64_t rows = 3, n = rows * cols, groups = (cols + gs - 1) / gs;
            const Input in =
                make_input(static_cast<size_t>(n), dt, fill, static_cast<uint32_t>(cols * 7 + gs));
            std::vector<float> scale(static_cast<size_t>(rows * groups)), lo(scale.size()), hi(scale.size());
            std::vector<int32_t> zp(scale.size());
            for (int64_t r = 0; r < rows; ++r) {
              const char* xr = static_cast<const char*>(in.data()) +
                               r * cols * static_cast<int64_t>(kernels::dtype_size(dt));
              ref_->minmax_blocks(xr, dt, cols, gs, lo.data() + r * groups, hi.data() + r * groups);
              ref_->absmax_blocks(xr, dt, cols, gs, scale.data() + r * groups);
            }
            if (asym)
              kernels::asymmetric_scales(lo.data(), hi.data(), rows * groups, 0, 15, scale.data(), zp.data());
            else
              kernels::symmetric_scales(scale.data(), rows * groups, 7.0f, scale.data());
            const int32_t* zpp = asym ? zp.data() : nullptr;
            const size_t bytes = static_cast<size_t>(rows * ((cols + 1) / 2));
            std::vector<uint8_t> p_ref(bytes, 0xAA), p_got(bytes, 0x55);
            ref_->quantize_int4(in.data(), dt, rows, cols, gs, scale.data(), zpp, p_ref.data());
            k_->quantize_int4(in.data(), dt, rows, cols, gs, scale.data(), zpp, p_got.data());
            EXPECT_SAME_BITS(
                p_ref, p_got,
                "quantize_int4 asym=" << asym << " cols=" << cols << " " << where(dt, fill, n, gs));
            std::vector<float> d_ref(static_cast<size_t>(n)), d_got(static_cast<size_t>(n));
            ref_->dequantize_int4(p_ref.data(), rows, cols, gs, scale.data(), zpp, d_ref.data());
            k_->dequantize_int4(p_ref.data(), rows, cols, gs, scale.data(), zpp, d_got.data());
            EXPECT_SAME_BITS(
                d_ref, d_got,
                "dequantize_int4 asym=" << asym << " cols=" << cols << " " << where(dt, fill, n, gs));
            if (HasFailure()) return;
          }
}

TEST_P(IsaVsReference, Lut4NF4AndFP4) {
  ASSERT_GE(codebook_formats().size(), 2u);  // nf4 and fp4 at least
  for (const kernels::FormatInfo& info : codebook_formats()) {
    const float* code = info.codebook;
    const kernels::Lut4& lut = kernels::format_lut4(info.format);
    for (DType dt : kDTypes)
      for (Fill fill : kFills)
        for (int64_t n : kLengths)
          for (int64_t bs : {7, 32, 33, 64, 128, 256, 4096}) {  // odd: blocks start mid-byte
            const Input in = make_input(static_cast<size_t>(n), dt, fill, static_cast<uint32_t>(n * 3 + bs));
            const size_t nb = static_cast<size_t>((n + bs - 1) / bs);
            std::vector<float> absmax(nb);
            ref_->absmax_blocks(in.data(), dt, n, bs, absmax.data());
            const size_t bytes = static_cast<size_t>((n + 1) / 2);
            std::vector<uint8_t> p_ref(bytes, 0xAA), p_got(bytes, 0x55);
            ref_->quantize_lut4(in.data(), dt, 0, n, bs, absmax.data(), &lut, p_ref.data());
            k_->quantize_lut4(in.data(), dt, 0, n, bs, absmax.data(), &lut, p_got.data());
            const std::string fmt = std::string(info.name) + " ";
            EXPECT_SAME_BITS(p_ref, p_got, "quantize_lut4 " << fmt << where(dt, fill, n, bs));
            std::vector<float> d_ref(static_cast<size_t>(n)), d_got(static_cast<size_t>(n));
            ref_->dequantize_lut4(p_ref.data(), 0, n, bs, absmax.data(), code, d_ref.data());
            k_->dequantize_lut4(p_ref.data(), 0, n, bs, absmax.data(), code, d_got.data());
            EXPECT_SAME_BITS(d_ref, d_got, "dequantize_lut4 " << fmt << where(dt, fill, n, bs));
            if (n > 6) {  // a range starting at an even element inside a block
              const int64_t s = 6;
              const char* xs =
                  static_cast<const char*>(in.data()) + s * static_cast<int64_t>(kernels::dtype_size(dt));
              k_->quantize_lut4(xs, dt, s, n - s, bs, absmax.data(), &lut, p_got.data() + s / 2);
              k_->dequantize_lut4(p_ref.data() + s / 2, s, n - s, bs, absmax.data(), code, d_got.data() + s);
              EXPECT_SAME_BITS(p_ref, p_got, "quantize_lut4 start=6 " << fmt << where(dt, fill, n, bs));
              EXPECT_SAME_BITS(d_ref, d_got, "dequantize_lut4 start=6 " << fmt << where(dt, fill, n, bs));
            }
            if (HasFailure()) return;
          }
  }
}

TEST_P(IsaVsReference, Lut8DynamicMap) {
  for (bool is_signed : {true, false}) {
    const auto code = kernels::create_dynamic_map(is_signed);
    const kernels::Lut8 lut = kernels::make_lut8(code.data());
    for (DType dt : kDTypes)
      for (Fill fill : kFills)
        for (int64_t n : kLengths)
          for (int64_t bs : {64, 256, 4096}) {
            const Input in = make_input(static_cast<size_t>(n), dt, fill, static_cast<uint32_t>(n * 5 + bs));
            const size_t nb = static_cast<size_t>((n + bs - 1) / bs);
            std::vector<float> absmax(nb);
            ref_->absmax_blocks(in.data(), dt, n, bs, absmax.data());
            std::vector<uint8_t> q_ref(static_cast<size_t>(n)), q_got(static_cast<size_t>(n));
            ref_->quantize_lut8(in.data(), dt, 0, n, bs, absmax.data(), &lut, q_ref.data());
            k_->quantize_lut8(in.data(), dt, 0, n, bs, absmax.data(), &lut, q_got.data());
            EXPECT_SAME_BITS(q_ref, q_got,
                             "quantize_lut8 signed=" << is_signed << " " << where(dt, fill, n, bs));
            std::vector<float> d_ref(static_cast<size_t>(n)), d_got(static_cast<size_t>(n));
            ref_->dequantize_lut8(q_ref.data(), 0, n, bs, absmax.data(), code.data(), d_ref.data());
            k_->dequantize_lut8(q_ref.data(), 0, n, bs, absmax.data(), code.data(), d_got.data());
            EXPECT_SAME_BITS(d_ref, d_got,
                             "dequantize_lut8 signed=" << is_signed << " " << where(dt, fill, n, bs));
            if (n > 5) {
              const int64_t s = 5;
              const char* xs =
                  static_cast<const char*>(in.data()) + s * static_cast<int64_t>(kernels::dtype_size(dt));
              k_->quantize_lut8(xs, dt, s, n - s, bs, absmax.data(), &lut, q_got.data() + s);
              EXPECT_SAME_BITS(q_ref, q_got, "quantize_lut8 start=5 " << where(dt, fill, n, bs));
              k_->dequantize_lut8(q_ref.data() + s, s, n - s, bs, absmax.data(), code.data(),
                                  d_got.data() + s);
              EXPECT_SAME_BITS(d_ref, d_got, "dequantize_lut8 start=5 " << where(dt, fill, n, bs));
            }
            if (HasFailure()) return;
          }
  }
}

// The threaded drivers give the same bits as one scalar call, for 1 and 2 threads, including a
// block longer than one reduction piece (per-tensor statistics of a large tensor).
TEST_P(IsaVsReference, ThreadedOpsMatchSingleCall) {
  const int64_t n = (int64_t{1} << 17) + 4096;  // whole blocks: ops code a short last block itself
  const Input in = make_input(static_cast<size_t>(n), DType::f32, Fill::mixed, 99);
  const kernels::Lut4 lut = kernels::make_lut4(kernels::kCodeNF4);
  for (int threads : {1, 2}) {
    kernels::set_num_threads(threads);
    for (int64_t bs : {int64_t{64}, int64_t{4096}, n}) {
      const size_t nb = static_cast<size_t>((n + bs - 1) / bs);
      std::vector<float> a_ref(nb), a_got(nb), lo_ref(nb), lo_got(nb), hi_ref(nb), hi_got(nb);
      ref_->absmax_blocks(in.data(), DType::f32, n, bs, a_ref.data());
      kernels::absmax_blocks(in.data(), DType::f32, n, bs, a_got.data(), *k_);
      EXPECT_SAME_BITS(a_ref, a_got, "ops::absmax threads=" << threads << " bs=" << bs);
      ref_->minmax_blocks(in.data(), DType::f32, n, bs, lo_ref.data(), hi_ref.data());
      kernels::minmax_blocks(in.data(), DType::f32, n, bs, lo_got.data(), hi_got.data(), *k_);
      EXPECT_SAME_BITS(lo_ref, lo_got, "ops::min threads=" << threads << " bs=" << bs);
      EXPECT_SAME_BITS(hi_ref, hi_got, "ops::max threads=" << threads << " bs=" << bs);
      std::vector<uint8_t> p_ref(static_cast<size_t>((n + 1) / 2)), p_got(p_ref.size());
      ref_->quantize_lut4(in.data(), DType::f32, 0, n, bs, a_ref.data(), &lut, p_ref.data());
      kernels::quantize_lut4(in.data(), DType::f32, n, bs, a_ref.data(), lut, p_got.data(), *k_);
      EXPECT_SAME_BITS(p_ref, p_got, "ops::quantize_lut4 threads=" << threads << " bs=" << bs);
      std::vector<float> d_ref(static_cast<size_t>(n)), d_got(d_ref.size());
      ref_->dequantize_lut4(p_ref.data(), 0, n, bs, a_ref.data(), lut.code, d_ref.data());
      kernels::dequantize_lut4(p_ref.data(), n, bs, a_ref.data(), lut.code, d_got.data(), *k_);
      EXPECT_SAME_BITS(d_ref, d_got, "ops::dequantize_lut4 threads=" << threads << " bs=" << bs);
    }
  }
  kernels::set_num_threads(0);
}

INSTANTIATE_TEST_SUITE_P(SimdIsas, IsaVsReference, testing::ValuesIn(simd_isas()), isa_param_name);

}  // namespace
}  // namespace msbnb::test
