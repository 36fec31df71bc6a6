#include "msbnb/convert/config.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>

namespace msbnb {

void Int8Config::validate() const {
  // LLM.int8() weights are symmetric row-wise absmax codes; an asymmetric variant would need a
  // zero point the matmul does not take.
  TORCH_CHECK(symmetric_,
              "Int8Config.symmetric: expected true (LLM.int8() weights are symmetric), got false");
  TORCH_CHECK(per_channel_,
              "Int8Config.per_channel: expected true (Linear8bit keeps one absmax scale per output row, as "
              "LLM.int8()), got false");
  TORCH_CHECK(std::isfinite(threshold_) && threshold_ >= 0.0,
              "Int8Config.threshold: expected a finite value >= 0 (0 = no outlier columns), got ",
              threshold_);
}

void Int4Config::validate() const {
  TORCH_CHECK(quant_type_ == "int4" || quant_type_ == "nf4" || quant_type_ == "fp4",
              "Int4Config.quant_type: expected \"int4\", \"nf4\" or \"fp4\", got \"", quant_type_, "\"");
  if (quant_type_ == "int4") {
    TORCH_CHECK(group_size_ >= 2 && group_size_ % 2 == 0,
                "Int4Config.group_size: expected an even number >= 2 (int4 groups along in_features), got ",
                group_size_);
  } else {
    const bool pow2 = blocksize_ > 0 && (blocksize_ & (blocksize_ - 1)) == 0;
    TORCH_CHECK(pow2 && blocksize_ >= 32 && blocksize_ <= 4096,
                "Int4Config.blocksize: expected a power of two in [32, 4096] for ", quant_type_, ", got ",
                blocksize_);
  }
}

const Int8Config& QuantConfig::int8() const {
  TORCH_CHECK(is_int8(), "QuantConfig::int8(): expected a config holding Int8Config, got Int4Config");
  return std::get<Int8Config>(config_);
}

const Int4Config& QuantConfig::int4() const {
  TORCH_CHECK(is_int4(), "QuantConfig::int4(): expected a config holding Int4Config, got Int8Config");
  return std::get<Int4Config>(config_);
}

std::string QuantConfig::quant_type() const { return is_int8() ? std::string("int8") : int4().quant_type(); }

bool QuantConfig::convert_embeddings() const {
  return is_int8() ? int8().convert_embeddings() : int4().convert_embeddings();
}

std::string QuantConfig::describe() const {
  std::ostringstream o;
  if (is_int8()) {
    const auto& c = int8();
    o << "int8 " << (c.per_channel() ? "per_channel" : "per_tensor") << " threshold=" << c.threshold();
    if (c.has_fp16_weights()) o << " +fp16_weights";
  } else {
    const auto& c = int4();
    o << c.quant_type() << (c.quant_type() == "int4" ? " group_size=" : " blocksize=")
      << c.effective_blocksize();
    if (c.compress_statistics()) o << " +double_quant";
  }
  if (convert_embeddings()) o << " +embeddings";
  return o.str();
}

void QuantConfig::validate() const {
  if (is_int8()) {
    int8().validate();
  } else {
    int4().validate();
  }
}

}  // namespace msbnb
