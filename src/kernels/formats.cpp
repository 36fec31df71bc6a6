// Format table rows, codebook preparation and bitsandbytes' dynamic map.
#include "msbnb/kernels/formats.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace msbnb::kernels {

namespace {
const FormatInfo kFormats[] = {
#define MSBNB_FORMAT(id, bits, block, codebook, order) \
  {Format::id, #id, bits, block, codebook, NibbleOrder::order},
#include "msbnb/kernels/formats.def"
#undef MSBNB_FORMAT
};
constexpr int kNumFormats = sizeof(kFormats) / sizeof(kFormats[0]);

// Sorts `count` codes (ties keep index order, as torch.argsort did for bitsandbytes' FP4 +0 at
// index 0 and 0 at index 8), fills the midpoints and the sorted-position -> code-index map.
// Coding x as #{i : x > mid[i]} is torch.bucketize(x, mid, right=False): a value on a midpoint
// goes to the lower code, x <= 0 to FP4 index 0 and tiny positive x to index 8.
template <typename Index>
void prepare_codebook(const float* code, int count, float* mid, Index* sorted_to_code) {
  std::vector<int> order(static_cast<size_t>(count));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return code[a] < code[b]; });
  for (int p = 0; p < count; ++p) sorted_to_code[p] = static_cast<Index>(order[static_cast<size_t>(p)]);
  for (int p = 0; p + 1 < count; ++p) {
    // (lo + hi) / 2 in float32, as bitsandbytes computes its bounds.
    const float lo = code[order[static_cast<size_t>(p)]], hi = code[order[static_cast<size_t>(p + 1)]];
    mid[p] = (lo + hi) / 2.0f;
  }
  mid[count - 1] = std::numeric_limits<float>::infinity();
}
}  // namespace

const FormatInfo& format_info(Format f) { return kFormats[static_cast<int>(f)]; }

const FormatInfo* all_formats(int* count) {
  *count = kNumFormats;
  return kFormats;
}

Format format_from_name(const char* name) {
  for (const FormatInfo& info : kFormats)
    if (std::strcmp(info.name, name) == 0) return info.format;
  std::string known;
  for (const FormatInfo& info : kFormats) known += std::string(known.empty() ? "" : ", ") + info.name;
  throw std::invalid_argument(std::string("format: expected one of ") + known + ", got '" + name + "'");
}

Lut4 make_lut4(const float* code16) {
  Lut4 lut{};
  std::copy(code16, code16 + 16, lut.code);
  prepare_codebook(code16, 16, lut.mid, lut.sorted_to_code);
  int p = 0;
  while (p < 15 && 0.0f > lut.mid[p]) ++p;
  lut.zero_code = lut.sorted_to_code[p];
  return lut;
}

const Lut4& format_lut4(Format f) {
  static const auto luts = [] {
    std::array<Lut4, kNumFormats> out{};
    for (int i = 0; i < kNumFormats; ++i)
      if (has_codebook16(kFormats[i])) out[static_cast<size_t>(i)] = make_lut4(kFormats[i].codebook);
    return out;
  }();
  const FormatInfo& info = format_info(f);
  if (!has_codebook16(info))
    throw std::invalid_argument(std::string("format: expected a format with a 16-value codebook, got '") +
                                info.name + "'");
  return luts[static_cast<size_t>(f)];
}

Lut8 make_lut8(const float* code256) {
  Lut8 lut{};
  std::copy(code256, code256 + 256, lut.code);
  prepare_codebook(code256, 256, lut.mid, lut.sorted_to_code);
  return lut;
}

std::array<float, 256> create_dynamic_map(bool is_signed, int max_exponent_bits, int total_bits) {
  if (max_exponent_bits < 1 || total_bits < 2 || total_bits > 8 || max_exponent_bits >= total_bits)
    throw std::invalid_argument(
        "create_dynamic_map: expected 1 <= max_exponent_bits < total_bits <= 8, got max_exponent_bits=" +
        std::to_string(max_exponent_bits) + ", total_bits=" + std::to_string(total_bits));
  // bitsandbytes.functional.create_dynamic_map, with torch's float32 linspace and arithmetic.
  auto linspace_means = [](int items, std::vector<double>& means) {
    const float start = 0.1f, end = 1.0f;
    const float step = (end - start) / static_cast<float>(items - 1);
    const int halfway = items / 2;
    std::vector<float> b(static_cast<size_t>(items));
    // torch's vectorised linspace (AVX2 / AVX-512 builds) rounds start + step * i once (an FMA).
    for (int i = 0; i < items; ++i)
      b[static_cast<size_t>(i)] = i < halfway ? std::fma(step, static_cast<float>(i), start)
                                              : std::fma(-step, static_cast<float>(items - i - 1), end);
    for (int i = 0; i + 1 < items; ++i)
      means.push_back((b[static_cast<size_t>(i)] + b[static_cast<size_t>(i + 1)]) / 2.0f);
  };
  const int non_sign_bits = total_bits - 1;
  const int additional_items = (1 << (non_sign_bits - max_exponent_bits)) - 1;
  std::vector<double> data;
  auto push_scaled = [&](const std::vector<double>& means, int i) {
    const float scale = static_cast<float>(std::pow(10.0, -(max_exponent_bits - 1) + i));
    for (double m : means) data.push_back(scale * static_cast<float>(m));
    if (is_signed)
      for (double m : means) data.push_back(-scale * static_cast<float>(m));
  };
  int last_i = 0;
  for (int i = 0; i < max_exponent_bits; ++i) {
    const int shift = i + non_sign_bits - max_exponent_bits + (is_signed ? 0 : 1);
    std::vector<double> means;
    linspace_means((1 << shift) + 1, means);
    push_scaled(means, i);
    last_i = i;
  }
  if (additional_items > 0) {
    std::vector<double> means;
    linspace_means(additional_items + 1, means);
    push_scaled(means, last_i);
  }
  data.push_back(0.0);
  data.push_back(1.0);
  while (data.size() < 256) data.push_back(0.0);
  std::sort(data.begin(), data.end());
  std::array<float, 256> out{};
  for (size_t i = 0; i < 256 && i < data.size(); ++i) out[i] = static_cast<float>(data[i]);
  return out;
}

const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::f32:
      return "float32";
    case DType::f16:
      return "float16";
    case DType::bf16:
      return "bfloat16";
  }
  return "?";
}

}  // namespace msbnb::kernels
