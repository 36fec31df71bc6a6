// libFuzzer target: bitsandbytes' quant_state JSON parser on arbitrary text. It must refuse with
// FormatError or accept; what it accepts, the writer writes, and that parses back equal (the
// nested_offset repr round-trips the double) and is written again identically.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "msbnb/io/quant_state.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  msbnb::io::QuantStateJson q;
  try {
    q = msbnb::io::parse_quant_state_json(text, "fuzz");
  } catch (const msbnb::io::FormatError&) {
    return 0;
  }
  if (q.numel() <= 0) std::abort();
  const std::string out = msbnb::io::quant_state_json(q);
  const msbnb::io::QuantStateJson back = msbnb::io::parse_quant_state_json(out, "fuzz2");
  if (back != q || msbnb::io::quant_state_json(back) != out) std::abort();
  return 0;
}
