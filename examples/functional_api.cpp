// The functional API tour: every format on the same weights, with an error table, plus
// packing, scales and code maps.
#include <cstdio>

#include "error_table.h"
#include "msbnb/msbnb.h"

int main() {
  torch::manual_seed(0);
  const torch::Tensor w = torch::randn({1024, 1024});  // Gaussian weights, as in bitsandbytes' tests
  std::printf("msbnb functional API on randn(1024, 1024) (kernels: %s)\n\n",
              msbnb::kernels::isa_name(msbnb::kernels::active_isa()));
  example::print_header();

  using msbnb::Granularity;
  using msbnb::Int8Options;
  struct Int8Case {
    const char* name;
    Int8Options options;
  };
  const Int8Case int8_cases[] = {
      {"int8 sym per tensor", Int8Options().granularity(Granularity::per_tensor)},
      {"int8 sym per channel", Int8Options()},
      {"int8 sym block 64", Int8Options().granularity(Granularity::per_block).blocksize(64)},
      {"int8 asym per channel", Int8Options().symmetric(false)},
  };
  for (const Int8Case& c : int8_cases) {
    const auto q = msbnb::quantize_8bit(w, c.options);
    example::print_row(c.name, msbnb::get_quantization_info(q).bits_per_weight, w, msbnb::dequantize_8bit(q));
  }

  using msbnb::Quantize4bitOptions;
  struct FourBitCase {
    const char* name;
    Quantize4bitOptions options;
  };
  const FourBitCase four_bit_cases[] = {
      {"int4 sym group 128", Quantize4bitOptions().quant_type("int4").blocksize(128)},
      {"int4 asym group 128", Quantize4bitOptions().quant_type("int4").blocksize(128).symmetric(false)},
      {"int4 sym group 32", Quantize4bitOptions().quant_type("int4").blocksize(32)},
      {"fp4 block 64", Quantize4bitOptions().quant_type("fp4")},
      {"nf4 block 64", Quantize4bitOptions().quant_type("nf4")},
      {"nf4 block 64 dq", Quantize4bitOptions().quant_type("nf4").compress_statistics(true)},
      {"nf4 block 128 dq", Quantize4bitOptions().quant_type("nf4").blocksize(128).compress_statistics(true)},
  };
  for (const FourBitCase& c : four_bit_cases) {
    const auto q = msbnb::quantize_4bit(w, c.options);
    example::print_row(c.name, msbnb::get_quantization_info(q.data, q.state).bits_per_weight, w,
                       msbnb::dequantize_4bit(q.data, q.state));
  }
  for (int64_t bs : {256, 4096}) {
    const auto q = msbnb::quantize_blockwise(w, bs);
    example::print_row("dynamic8 block " + std::to_string(bs),
                       msbnb::get_quantization_info(q.data, q.state).bits_per_weight, w,
                       msbnb::dequantize_blockwise(q.data, q.state));
  }

  // Generic front end and the pieces under it.
  const msbnb::QuantizedTensor qt = msbnb::quantize_tensor(w, 4, /*symmetric=*/true, /*per_channel=*/true);
  example::print_row("quantize_tensor 4-bit", 4.0 + 32.0 / 1024, w, msbnb::dequantize_tensor(qt));

  const torch::Tensor values = torch::tensor({-8, 7, 0, -1, 5}, torch::kInt8);
  const torch::Tensor packed = msbnb::pack_int4_to_qint4x2(values);
  std::printf("\nqint4x2: [-8, 7, 0, -1, 5] packs to bytes [0x%02x, 0x%02x, 0x%02x] and unpacks to %s\n",
              packed[0].item<uint8_t>(), packed[1].item<uint8_t>(), packed[2].item<uint8_t>(),
              msbnb::unpack_qint4x2_to_int8(packed, 5).equal(values) ? "the same values" : "SOMETHING ELSE");
  const msbnb::ScaleOffset so = msbnb::compute_scale_offset(w.slice(0, 0, 2), 8, /*symmetric=*/false);
  std::printf("compute_scale_offset (int8 asymmetric, rows 0-1): scale %.6f %.6f, offset %.0f %.0f\n",
              so.scale[0].item<float>(), so.scale[1].item<float>(), so.offset[0].item<float>(),
              so.offset[1].item<float>());
  const torch::Tensor dyn = msbnb::create_dynamic_map(), nf = msbnb::create_normal_map();
  std::printf("dynamic map: %lld values in [%.6f, %.1f]; normal map: %lld non-zero values\n",
              static_cast<long long>(dyn.numel()), dyn.min().item<float>(), dyn.max().item<float>(),
              static_cast<long long>((nf != 0).sum().item<int64_t>()));
  const auto nf4 = msbnb::quantize_4bit(w, Quantize4bitOptions().quant_type("nf4").compress_statistics(true));
  const auto info = msbnb::get_quantization_info(nf4.data, nf4.state);
  std::printf("nf4 + double quant: %.4f bits/weight, %.2fx smaller than float32, absmax in [%.4f, %.4f]\n",
              info.bits_per_weight, info.compression_ratio, info.scale_min, info.scale_max);
  return 0;
}
