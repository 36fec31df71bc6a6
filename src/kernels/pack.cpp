// qint4x2 packing (DESIGN.md "int4 per-group"): not on a hot path, so scalar only.
#include "msbnb/kernels/ops.h"

namespace msbnb::kernels {

void pack_qint4x2(const int8_t* values, int64_t rows, int64_t cols, uint8_t* packed) {
  const int64_t row_bytes = (cols + 1) / 2;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < row_bytes; ++j) {
      const int64_t c = 2 * j;
      const uint8_t lo = static_cast<uint8_t>(values[r * cols + c] & 0xf);
      const uint8_t hi = c + 1 < cols ? static_cast<uint8_t>(values[r * cols + c + 1] & 0xf) : 0;
      packed[r * row_bytes + j] = static_cast<uint8_t>(lo | hi << 4);
    }
}

void unpack_qint4x2(const uint8_t* packed, int64_t rows, int64_t cols, int8_t* values) {
  const int64_t row_bytes = (cols + 1) / 2;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const uint8_t byte = packed[r * row_bytes + c / 2];
      const int nib = c % 2 == 0 ? (byte & 0xf) : (byte >> 4);
      values[r * cols + c] = static_cast<int8_t>((nib ^ 8) - 8);
    }
}

}  // namespace msbnb::kernels
