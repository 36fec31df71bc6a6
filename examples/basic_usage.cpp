// Basic usage: quantize the weight of a torch::nn::Linear to int8 and to 4 bits, dequantize it,
// and see what each costs in memory and in error.
#include <torch/nn/modules/linear.h>

#include <cstdio>

#include "error_table.h"
#include "msbnb/msbnb.h"

int main() {
  torch::manual_seed(42);
  torch::nn::Linear layer(torch::nn::LinearOptions(1024, 1024));
  const torch::Tensor w = layer->weight.detach();
  std::printf("msbnb basic usage: Linear(1024, 1024) weight, %zu KiB in float32 (kernels: %s)\n\n",
              static_cast<size_t>(w.numel() * 4 / 1024),
              msbnb::kernels::isa_name(msbnb::kernels::active_isa()));

  // int8, one scale per output channel (symmetric): w ~ q * scale.
  const msbnb::Int8Quantized q8 = msbnb::quantize_8bit(w);
  const torch::Tensor w8 = msbnb::dequantize_8bit(q8);

  // NF4 with double-quantized absmax, bitsandbytes' QLoRA storage format.
  const msbnb::Quantized4bit nf4 = msbnb::quantize_4bit(
      w, msbnb::Quantize4bitOptions().quant_type("nf4").blocksize(64).compress_statistics(true));
  const torch::Tensor w4 = msbnb::dequantize_4bit(nf4.data, nf4.state);

  // int4 per group of 128 (MindSpore qint4x2; 128 is int4's default group, blocksize(n) changes it).
  const msbnb::Quantized4bit i4 = msbnb::quantize_4bit(w, msbnb::Quantize4bitOptions().quant_type("int4"));
  const torch::Tensor wi4 = msbnb::dequantize_4bit(i4.data, i4.state);

  example::print_header();
  const auto info8 = msbnb::get_quantization_info(q8),
             info4 = msbnb::get_quantization_info(nf4.data, nf4.state);
  const auto infoi4 = msbnb::get_quantization_info(i4.data, i4.state);
  example::print_row("int8 per channel", info8.bits_per_weight, w, w8);
  example::print_row("nf4 (double quant)", info4.bits_per_weight, w, w4);
  example::print_row("int4 group 128", infoi4.bits_per_weight, w, wi4);

  std::printf("\nstorage: float32 %lld B, int8 %lld B (%.2fx), nf4 %lld B (%.2fx), int4 %lld B (%.2fx)\n",
              static_cast<long long>(w.numel() * 4), static_cast<long long>(info8.storage_bytes),
              info8.compression_ratio, static_cast<long long>(info4.storage_bytes), info4.compression_ratio,
              static_cast<long long>(infoi4.storage_bytes), infoi4.compression_ratio);

  // The layer still works with the restored weight: compare outputs on a batch.
  const torch::Tensor x = torch::randn({8, 1024});
  const torch::Tensor y = layer->forward(x);
  const torch::Tensor y4 = torch::nn::functional::linear(x, w4, layer->bias);
  std::printf("Linear output with nf4 weights: relative error %.3f %%\n",
              msbnb::estimate_quantization_error(y, y4).relative_error);
  return 0;
}
