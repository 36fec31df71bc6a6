// libFuzzer target: the safetensors header parser on arbitrary bytes (a whole file). It must
// either refuse with FormatError or return a header whose every span lies inside the buffer and
// tiles the data section; a header it accepts must survive serialize -> parse unchanged.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "msbnb/io/safetensors_format.h"

using msbnb::io::FormatError;
using msbnb::io::SafetensorsHeader;
using msbnb::io::TensorEntry;

namespace {
void check(bool ok) {
  if (!ok) std::abort();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  SafetensorsHeader h;
  try {
    h = msbnb::io::parse_safetensors_header(data, size, "fuzz");
  } catch (const FormatError&) {
    return 0;
  }
  check(h.data_start + h.data_size == size);
  std::vector<TensorEntry> by_offset = h.tensors;
  std::sort(by_offset.begin(), by_offset.end(), [](const TensorEntry& a, const TensorEntry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t pos = 0;
  for (const auto& e : by_offset) {
    check(e.begin == pos && e.end <= h.data_size && e.numel() >= 0);
    check(h.find(e.name) != nullptr && h.find(e.name)->begin == e.begin);
    pos = e.end;
  }
  check(pos == h.data_size);
  // Round trip: our header over the same data section parses to the same entries.
  std::string file;
  try {
    file = msbnb::io::serialize_safetensors_header(by_offset, h.metadata);
  } catch (const FormatError&) {
    std::abort();  // anything the parser accepts, the writer must write
  }
  check(file.size() % 8 == 0);
  file.append(reinterpret_cast<const char*>(data) + h.data_start, h.data_size);
  const SafetensorsHeader h2 = msbnb::io::parse_safetensors_header(
      reinterpret_cast<const uint8_t*>(file.data()), file.size(), "fuzz2");
  check(h2.metadata == h.metadata && h2.tensors.size() == h.tensors.size() && h2.data_size == h.data_size);
  for (size_t i = 0; i < h.tensors.size(); ++i) {
    const auto &a = h.tensors[i], &b = h2.tensors[i];
    check(a.name == b.name && a.dtype == b.dtype && a.shape == b.shape && a.begin == b.begin &&
          a.end == b.end);
  }
  return 0;
}
