#include "layers.h"

#include <torch/nn/module.h>

#include "msbnb/nn/embedding.h"
#include "msbnb/nn/linear.h"

namespace msbnb::detail {

torch::nn::AnyModule quantize_linear(const torch::nn::Linear& linear, const QuantConfig& config) {
  const int64_t in = linear->options.in_features(), out = linear->options.out_features();
  const bool bias = linear->options.bias();
  if (config.is_int8()) {
    const Int8Config& c = config.int8();
    auto options = nn::Linear8bitOptions(in, out).bias(bias).threshold(c.threshold());
    if (!c.has_fp16_weights()) return torch::nn::AnyModule(nn::Linear8bit::from_linear(linear, options));
    // Float weights kept (trainable) until quantize_weights(): from_linear always quantizes, so
    // build the layer and copy the weights in.
    nn::Linear8bit layer(options.has_fp16_weights(true));
    torch::NoGradGuard no_grad;
    layer->weight.copy_(linear->weight);
    if (bias) layer->bias.copy_(linear->bias);
    return torch::nn::AnyModule(layer);
  }
  const Int4Config& c = config.int4();
  auto options = nn::Linear4bitOptions(in, out)
                     .bias(bias)
                     .quant_type(c.quant_type())
                     .blocksize(c.effective_blocksize())
                     .compress_statistics(c.compress_statistics());
  return torch::nn::AnyModule(nn::Linear4bit::from_linear(linear, options));
}

torch::nn::AnyModule quantize_embedding(const torch::nn::Embedding& embedding, const QuantConfig& config) {
  if (config.is_int8()) return torch::nn::AnyModule(nn::Embedding8bit::from_embedding(embedding));
  const Int4Config& c = config.int4();
  auto options =
      nn::Embedding4bitOptions(embedding->options.num_embeddings(), embedding->options.embedding_dim())
          .quant_type(c.quant_type())
          .blocksize(c.effective_blocksize())
          .compress_statistics(c.compress_statistics());
  return torch::nn::AnyModule(nn::Embedding4bit::from_embedding(embedding, options));
}

std::string quantized_format(const torch::nn::Module& module) {
  if (const auto* l = dynamic_cast<const nn::Linear8bitImpl*>(&module)) {
    return l->is_quantized() ? "int8" : "int8 (float weights kept)";
  }
  if (const auto* l = dynamic_cast<const nn::Linear4bitImpl*>(&module)) {
    return l->options.quant_type() + (l->options.compress_statistics() ? " +double_quant" : "");
  }
  if (const auto* e = dynamic_cast<const nn::Embedding4bitImpl*>(&module)) {
    return e->options.quant_type() + (e->options.compress_statistics() ? " +double_quant" : "");
  }
  if (const auto* q = dynamic_cast<const nn::QuantizedModule*>(&module)) return q->quant_type();
  return "";
}

}  // namespace msbnb::detail
