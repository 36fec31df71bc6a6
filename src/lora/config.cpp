// LoraConfig (msbnb/lora/lora.h).
#include <c10/util/Exception.h>

#include <cmath>

#include "msbnb/lora/lora.h"

namespace msbnb::lora {

double LoraConfig::scaling() const {
  const double r = static_cast<double>(r_);
  return use_rslora_ ? lora_alpha_ / std::sqrt(r) : lora_alpha_ / r;
}

void LoraConfig::validate() const {
  TORCH_CHECK(r_ > 0, "LoraConfig.r: expected a rank > 0, got ", r_);
  TORCH_CHECK(std::isfinite(lora_alpha_) && lora_alpha_ > 0,
              "LoraConfig.lora_alpha: expected a finite value > 0, got ", lora_alpha_);
  // p = 1 would drop every input (and torch's dropout scales by 1 / (1 - p)).
  TORCH_CHECK(std::isfinite(lora_dropout_) && lora_dropout_ >= 0 && lora_dropout_ < 1,
              "LoraConfig.lora_dropout: expected a probability in [0, 1), got ", lora_dropout_);
  TORCH_CHECK(init_ == "kaiming" || init_ == "gaussian",
              "LoraConfig.init: expected \"kaiming\" (PEFT's default) or \"gaussian\", got \"", init_, "\"");
  TORCH_CHECK(bias_ == "none" || bias_ == "lora_only" || bias_ == "all",
              "LoraConfig.bias: expected \"none\", \"lora_only\" or \"all\" (PEFT's values), got \"", bias_,
              "\"");
}

std::ostream& operator<<(std::ostream& os, const MergeResult& r) {
  os << "merge into " << r.base << ": ";
  if (!r.requantized) {
    os << "float, relative error " << r.relative_error << ", |delta|_F " << r.delta_norm;
  } else {
    os << "requantized, relative error " << r.relative_error << ", max abs error " << r.max_abs_error
       << ", delta relative error " << r.delta_relative_error << ", |delta|_F " << r.delta_norm;
  }
  return os;
}

}  // namespace msbnb::lora
