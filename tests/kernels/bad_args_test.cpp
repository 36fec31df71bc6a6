// Hostile arguments to the torch-free kernels API (ops.h, the matmul.h drivers): each one is an
// std::invalid_argument naming the argument, the expected and the actual value, never a crash;
// a block size larger than the buffer is the whole buffer (up to INT64_MAX); an exception
// thrown by a kernel inside an OpenMP region reaches the caller instead of std::terminate.
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "msbnb/kernels/formats.h"
#include "msbnb/kernels/kernel_table.h"
#include "msbnb/kernels/matmul.h"
#include "msbnb/kernels/ops.h"
#include "test_util.h"

namespace msbnb::test {
namespace {

namespace K = kernels;
constexpr int64_t kMax = std::numeric_limits<int64_t>::max();

// Runs f, expects std::invalid_argument whose message holds every string of `parts`.
template <class F>
void expect_invalid(F&& f, std::initializer_list<const char*> parts, const char* ctx) {
  try {
    f();
    ADD_FAILURE() << ctx << ": no exception";
  } catch (const std::invalid_argument& e) {
    const std::string m = e.what();
    for (const char* p : parts)
      EXPECT_NE(m.find(p), std::string::npos) << ctx << ": \"" << m << "\" lacks " << p;
  }
}

class BadArgs : public testing::TestWithParam<Isa> {
 protected:
  void SetUp() override { MSBNB_SKIP_IF_UNSUPPORTED(GetParam()); }
  void TearDown() override { K::set_num_threads(0); }
  const K::KernelTable& kt() const { return K::kernels_for(GetParam()); }
};

// Block size 0 divided by zero (SIGFPE); negative sizes and null buffers read anywhere.
TEST_P(BadArgs, OpsRejectBadSizes) {
  std::vector<float> x(64, 1.0f), out(64), out2(64);
  std::vector<int8_t> q(64);
  std::vector<uint8_t> u(64);
  std::vector<int32_t> zp(64, 0);
  const K::Lut8 lut8 = K::make_lut8(K::create_dynamic_map().data());
  const K::Lut4 lut4 = K::make_lut4(K::kCodeNF4);
  const auto& k = kt();
  const DType f32 = DType::f32;
  expect_invalid([&] { K::absmax_blocks(x.data(), f32, 64, 0, out.data(), k); },
                 {"absmax_blocks", "bs", "> 0", "got 0"}, "absmax bs 0");
  expect_invalid([&] { K::absmax_blocks(x.data(), f32, 64, -3, out.data(), k); }, {"bs", "got -3"},
                 "absmax bs < 0");
  expect_invalid([&] { K::absmax_blocks(x.data(), f32, -1, 8, out.data(), k); }, {"n", "got -1"},
                 "absmax n < 0");
  expect_invalid([&] { K::absmax_blocks(nullptr, f32, 64, 8, out.data(), k); }, {"x", "null"},
                 "absmax null x");
  expect_invalid([&] { K::absmax_blocks(x.data(), static_cast<DType>(7), 64, 8, out.data(), k); },
                 {"dt", "DType(7)"}, "absmax dtype");
  expect_invalid([&] { K::minmax_blocks(x.data(), f32, 64, 0, out.data(), out2.data(), k); },
                 {"minmax_blocks", "bs"}, "minmax bs 0");
  expect_invalid([&] { K::quantize_int8(x.data(), f32, 64, 0, out.data(), nullptr, -127, 127, q.data(), k); },
                 {"quantize_int8", "bs"}, "quantize_int8 bs 0");
  expect_invalid([&] { K::quantize_int8(x.data(), f32, 64, 8, out.data(), nullptr, 5, -5, q.data(), k); },
                 {"quantize_int8", "[lo, hi]", "[5, -5]"}, "quantize_int8 lo > hi");
  expect_invalid([&] { K::quantize_int8(x.data(), f32, 64, 8, out.data(), nullptr, -300, 127, q.data(), k); },
                 {"[lo, hi]", "-300"}, "quantize_int8 lo < -128");
  expect_invalid([&] { K::dequantize_int8(q.data(), 64, 0, out.data(), nullptr, out2.data(), k); },
                 {"dequantize_int8", "bs"}, "dequantize_int8 bs 0");
  expect_invalid([&] { K::quantize_int4(x.data(), f32, 8, 8, 0, out.data(), nullptr, u.data(), k); },
                 {"quantize_int4", "gs", "got 0"}, "quantize_int4 gs 0");
  expect_invalid([&] { K::quantize_int4(x.data(), f32, kMax / 2, 4, 2, out.data(), nullptr, u.data(), k); },
                 {"quantize_int4", "rows"}, "quantize_int4 rows * cols overflow");
  expect_invalid([&] { K::dequantize_int4(u.data(), 4, -8, 2, out.data(), nullptr, out2.data(), k); },
                 {"dequantize_int4", "cols", "got -8"}, "dequantize_int4 cols < 0");
  expect_invalid([&] { K::quantize_lut4(x.data(), f32, 64, 0, out.data(), lut4, u.data(), k); },
                 {"quantize_lut4", "bs"}, "quantize_lut4 bs 0");
  expect_invalid([&] { K::dequantize_lut4(u.data(), 64, 0, out.data(), K::kCodeNF4, out2.data(), k); },
                 {"dequantize_lut4", "bs"}, "dequantize_lut4 bs 0");
  expect_invalid([&] { K::quantize_lut8(x.data(), f32, 64, 0, out.data(), lut8, u.data(), k); },
                 {"quantize_lut8", "bs"}, "quantize_lut8 bs 0");
  expect_invalid([&] { K::dequantize_lut8(u.data(), 64, 0, out.data(), lut8.code, out2.data(), k); },
                 {"dequantize_lut8", "bs"}, "dequantize_lut8 bs 0");
  expect_invalid([&] { K::quantize_lut8(x.data(), f32, kMax, 64, out.data(), lut8, u.data(), k); },
                 {"quantize_lut8", "n"}, "quantize_lut8 n huge");
  expect_invalid([&] { K::symmetric_scales(out.data(), -1, 127.0f, out2.data()); },
                 {"symmetric_scales", "count"}, "symmetric_scales count < 0");
  expect_invalid([&] { K::symmetric_scales(out.data(), 4, 0.0f, out2.data()); }, {"symmetric_scales", "qmax"},
                 "symmetric_scales qmax 0");
  expect_invalid([&] { K::asymmetric_scales(out.data(), out2.data(), 4, 7, 7, out.data(), zp.data()); },
                 {"asymmetric_scales", "qmin < qmax", "[7, 7]"}, "asymmetric_scales empty range");
  expect_invalid([] { K::set_num_threads(-2); }, {"set_num_threads", "got -2"}, "set_num_threads < 0");
}

// A block size beyond the buffer, up to INT64_MAX (which overflowed AVX-512's for_each_block),
// is one block of the whole buffer: the same results as bs = n.
TEST_P(BadArgs, HugeBlockIsTheWholeBuffer) {
  const int64_t n = 300;
  const Input in = make_input(n, DType::f32, Fill::randn, 3);
  const K::Lut8 lut8 = K::make_lut8(K::create_dynamic_map().data());
  const K::Lut4 lut4 = K::make_lut4(K::kCodeNF4);
  for (int64_t bs : {n + 1, int64_t{1} << 40, kMax - 1, kMax}) {
    const std::string ctx = "bs=" + std::to_string(bs);
    float a_huge = 0, a_n = 0, lo_h = 0, hi_h = 0, lo_n = 0, hi_n = 0;
    K::absmax_blocks(in.data(), DType::f32, n, bs, &a_huge, kt());
    K::absmax_blocks(in.data(), DType::f32, n, n, &a_n, kt());
    EXPECT_EQ(a_huge, a_n) << ctx;
    K::minmax_blocks(in.data(), DType::f32, n, bs, &lo_h, &hi_h, kt());
    K::minmax_blocks(in.data(), DType::f32, n, n, &lo_n, &hi_n, kt());
    EXPECT_EQ(lo_h, lo_n) << ctx;
    EXPECT_EQ(hi_h, hi_n) << ctx;
    std::vector<uint8_t> qh(n), qn(n);
    K::quantize_lut8(in.data(), DType::f32, n, bs, &a_n, lut8, qh.data(), kt());
    K::quantize_lut8(in.data(), DType::f32, n, n, &a_n, lut8, qn.data(), kt());
    EXPECT_EQ(qh, qn) << ctx;
    std::vector<float> dh(n), dn(n);
    K::dequantize_lut8(qn.data(), n, bs, &a_n, lut8.code, dh.data(), kt());
    K::dequantize_lut8(qn.data(), n, n, &a_n, lut8.code, dn.data(), kt());
    EXPECT_EQ(dh, dn) << ctx;
    std::vector<int8_t> ih(n), inn(n);
    const float s = a_n / 127;
    K::quantize_int8(in.data(), DType::f32, n, bs, &s, nullptr, -127, 127, ih.data(), kt());
    K::quantize_int8(in.data(), DType::f32, n, n, &s, nullptr, -127, 127, inn.data(), kt());
    EXPECT_EQ(ih, inn) << ctx;
    K::dequantize_int8(inn.data(), n, bs, &s, nullptr, dh.data(), kt());
    K::dequantize_int8(inn.data(), n, n, &s, nullptr, dn.data(), kt());
    EXPECT_EQ(dh, dn) << ctx;
    // 4-bit: a block longer than the buffer is bitsandbytes' short last block (coded by
    // division) either way, so bs = 2n is the comparison.
    std::vector<uint8_t> ph(n / 2), pn(n / 2);
    K::quantize_lut4(in.data(), DType::f32, n, bs, &a_n, lut4, ph.data(), kt());
    K::quantize_lut4(in.data(), DType::f32, n, 2 * n, &a_n, lut4, pn.data(), kt());
    EXPECT_EQ(ph, pn) << ctx;
    K::dequantize_lut4(pn.data(), n, bs, &a_n, K::kCodeNF4, dh.data(), kt());
    K::dequantize_lut4(pn.data(), n, n, &a_n, K::kCodeNF4, dn.data(), kt());
    EXPECT_EQ(dh, dn) << ctx;
    // int4: a group longer than the row is one group per row.
    const int64_t rows = 3, cols = 100;
    std::vector<float> sc(rows, 0.3f);
    std::vector<uint8_t> p4h(rows * cols / 2), p4n(rows * cols / 2);
    K::quantize_int4(in.data(), DType::f32, rows, cols, bs, sc.data(), nullptr, p4h.data(), kt());
    K::quantize_int4(in.data(), DType::f32, rows, cols, cols, sc.data(), nullptr, p4n.data(), kt());
    EXPECT_EQ(p4h, p4n) << ctx;
    K::dequantize_int4(p4n.data(), rows, cols, bs, sc.data(), nullptr, dh.data(), kt());
    K::dequantize_int4(p4n.data(), rows, cols, cols, sc.data(), nullptr, dn.data(), kt());
    EXPECT_EQ(dh, dn) << ctx;
  }
}

// The matmul drivers check the weight view (hand-built ones too) and the sizes of the batch.
TEST_P(BadArgs, MatmulRejectsBadViewsAndSizes) {
  const int64_t rows = 4, cols = 64;
  std::vector<int8_t> q(rows * cols, 1);
  std::vector<float> scale(rows, 0.1f), x(2 * cols, 1.0f), y(2 * rows);
  const K::PackedInt8 p8 = K::pack_int8(q.data(), rows, cols, scale.data(), nullptr);
  std::vector<uint8_t> packed(rows * cols / 2, 0x37);
  std::vector<float> absmax(rows * cols / 64, 1.0f);
  const K::PackedLut4 p4 = K::pack_lut4_bnb(packed.data(), rows, cols, 64, absmax.data(), K::kCodeNF4);
  K::MatmulIO io;
  io.x = x.data();
  io.n = 2;
  io.ldx = cols;
  io.y = y.data();
  io.ldy = rows;
  const auto& k = kt();
  K::Int8Matrix w8 = p8.view;
  w8.kpad = 65;
  expect_invalid([&] { K::matmul(w8, io, K::MatmulPath::exact, k); }, {"matmul", "w.kpad", "got 65"},
                 "int8 kpad");
  w8 = p8.view;
  w8.row_sum = nullptr;
  expect_invalid([&] { K::matmul(w8, io, K::MatmulPath::fast, k); }, {"w.row_sum", "null"}, "int8 row_sum");
  w8 = p8.view;
  w8.rows = -1;
  expect_invalid([&] { K::matmul_transposed(w8, io, k); }, {"matmul_transposed", "w.rows"}, "int8 rows < 0");
  K::Lut4Matrix w4 = p4.view;
  w4.group = 0;
  expect_invalid([&] { K::matmul(w4, io, K::MatmulPath::exact, k); }, {"w.group", "got 0"}, "lut4 group 0");
  w4 = p4.view;
  w4.row_stride = 3;
  expect_invalid([&] { K::matmul(w4, io, K::MatmulPath::exact, k); }, {"w.row_stride", "got 3"},
                 "lut4 row_stride");
  w4 = p4.view;
  w4.codes = nullptr;
  expect_invalid([&] { K::matmul(w4, io, K::MatmulPath::exact, k); }, {"w.codes", "null"}, "lut4 codes");
  K::MatmulIO big = io;
  big.n = kMax / 8;
  expect_invalid([&] { K::matmul(p8.view, big, K::MatmulPath::exact, k); }, {"matmul", "n * ldx"}, "n * ldx");
  expect_invalid(
      [&] { K::matmul_llm_int8(p8.view, io, std::numeric_limits<float>::quiet_NaN(), nullptr, k); },
      {"matmul_llm_int8", "threshold", "NaN"}, "llm threshold NaN");
  std::vector<int8_t> qx(2 * cols);
  std::vector<float> am(2);
  expect_invalid(
      [&] {
        K::quantize_rows_int8(x.data(), DType::f32, 2, cols, cols - 1, 0.0f, {}, qx.data(), cols, am.data());
      },
      {"quantize_rows_int8", "ldx", "got 63"}, "quantize_rows_int8 ldx");
  expect_invalid(
      [&] {
        K::quantize_rows_int8(x.data(), DType::f32, -2, cols, cols, 0.0f, {}, qx.data(), cols, am.data());
      },
      {"quantize_rows_int8", "got -2"}, "quantize_rows_int8 n < 0");
}

// A kernel entry that throws inside the OpenMP region of the ops and of the matmul drivers (as an
// allocation failure would): the exception reaches the caller.
void throwing_absmax(const void*, DType, int64_t, int64_t, float*) {
  throw std::runtime_error("kernel failed");
}
void throwing_lut4(const K::Lut4Matrix&, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t) {
  throw std::bad_alloc();
}
void throwing_i8(const K::Int8Matrix&, const uint8_t*, int64_t, int64_t, int64_t, int64_t, int32_t*,
                 int64_t) {
  throw std::bad_alloc();
}
void throwing_row(const float*, int64_t, float, uint8_t*) { throw std::runtime_error("row failed"); }

TEST_P(BadArgs, ExceptionsLeaveOpenMpRegions) {
  K::set_num_threads(2);
  K::KernelTable t = kt();
  t.absmax_blocks = throwing_absmax;
  t.matmul.lut4_f32 = throwing_lut4;
  t.matmul.int8_i8 = throwing_i8;
  t.matmul.quantize_row_u8 = throwing_row;
  const int64_t n = int64_t{1} << 18;  // several chunks: a parallel region with 2 threads
  const Input in = make_input(n, DType::f32, Fill::randn, 1);
  std::vector<float> out(n / 64);
  EXPECT_THROW(K::absmax_blocks(in.data(), DType::f32, n, 64, out.data(), t), std::runtime_error);

  const int64_t rows = 64, cols = 128;
  std::vector<uint8_t> packed(rows * cols / 2, 0x12);
  std::vector<float> absmax(rows * cols / 64, 1.0f), x(16 * cols, 0.5f), y(16 * rows);
  const K::PackedLut4 p4 = K::pack_lut4_bnb(packed.data(), rows, cols, 64, absmax.data(), K::kCodeNF4);
  std::vector<int8_t> q(rows * cols, 3);
  std::vector<float> scale(rows, 0.01f);
  const K::PackedInt8 p8 = K::pack_int8(q.data(), rows, cols, scale.data(), nullptr);
  K::MatmulIO io;
  io.x = x.data();
  io.n = 16;
  io.ldx = cols;
  io.y = y.data();
  io.ldy = rows;
  EXPECT_THROW(K::matmul(p4.view, io, K::MatmulPath::exact, t), std::bad_alloc);
  // The per-row activation quantization (parallel_rows) and the int8 products (parallel_split).
  EXPECT_THROW(K::matmul(p8.view, io, K::MatmulPath::fast, t), std::runtime_error);
  t.matmul.quantize_row_u8 = kt().matmul.quantize_row_u8;
  t.absmax_blocks = kt().absmax_blocks;
  EXPECT_THROW(K::matmul_llm_int8(p8.view, io, 0.0f, nullptr, t), std::bad_alloc);
}

INSTANTIATE_TEST_SUITE_P(AllIsas, BadArgs, testing::ValuesIn(all_isas()), isa_param_name);

}  // namespace
}  // namespace msbnb::test
