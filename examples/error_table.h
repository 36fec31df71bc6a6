// Prints one row per format of quantization error on the same weights (shared by the examples).
#pragma once
#include <cstdio>
#include <string>

#include "msbnb/msbnb.h"

namespace example {

inline void print_header() {
  std::printf("%-22s %9s %11s %11s %9s %9s %10s\n", "format", "bits/w", "mean|err|", "max|err|", "rel err%",
              "SNR dB", "cosine");
}

inline void print_row(const std::string& name, double bits_per_weight, const torch::Tensor& original,
                      const torch::Tensor& restored) {
  const msbnb::QuantizationError e = msbnb::estimate_quantization_error(original, restored);
  std::printf("%-22s %9.3f %11.6f %11.6f %9.3f %9.2f %10.6f\n", name.c_str(), bits_per_weight, e.mean_error,
              e.max_error, e.relative_error, e.snr_db, e.cosine);
}

}  // namespace example
