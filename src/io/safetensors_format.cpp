// The safetensors byte format (no libtorch). Checks: msbnb/io/safetensors_format.h.
#include "msbnb/io/safetensors_format.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "json_strict.h"

namespace msbnb::io {
namespace {

using detail::quote_cut;
using detail::shown;
using detail::type_name;
using nlohmann::json;

// The reference implementation's limit; a larger header is a hostile or broken file.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
// Top object -> tensor entry -> shape / data_offsets array.
constexpr int kMaxDepth = 3;

struct DtypeRow {
  StDtype dtype;
  const char* name;
  int bits;
};
constexpr DtypeRow kDtypes[] = {
    {StDtype::BOOL, "BOOL", 8},
    {StDtype::U8, "U8", 8},
    {StDtype::I8, "I8", 8},
    {StDtype::I16, "I16", 16},
    {StDtype::U16, "U16", 16},
    {StDtype::F16, "F16", 16},
    {StDtype::BF16, "BF16", 16},
    {StDtype::I32, "I32", 32},
    {StDtype::U32, "U32", 32},
    {StDtype::F32, "F32", 32},
    {StDtype::C64, "C64", 64},
    {StDtype::F64, "F64", 64},
    {StDtype::I64, "I64", 64},
    {StDtype::U64, "U64", 64},
    {StDtype::F8_E4M3, "F8_E4M3", 8},
    {StDtype::F8_E5M2, "F8_E5M2", 8},
    {StDtype::F8_E4M3FNUZ, "F8_E4M3FNUZ", 8},
    {StDtype::F8_E5M2FNUZ, "F8_E5M2FNUZ", 8},
    {StDtype::F8_E8M0, "F8_E8M0", 8},
    {StDtype::F6_E2M3, "F6_E2M3", 6},
    {StDtype::F6_E3M2, "F6_E3M2", 6},
    {StDtype::F4, "F4", 4},
};

const DtypeRow& row(StDtype d) {
  for (const auto& r : kDtypes) {
    if (r.dtype == d) return r;
  }
  throw FormatError("dtype: expected a safetensors dtype, got enum value " +
                    std::to_string(static_cast<int>(d)));
}

std::string dtype_list() {
  std::string s;
  for (const auto& r : kDtypes) s += (s.empty() ? "" : " ") + std::string(r.name);
  return s;
}

bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_mul_overflow(a, b, out); }

// Prefix of every message about one tensor.
std::string at(const std::string& source, const std::string& name) {
  return source + ": tensor " + quote_cut(name) + ": ";
}

// Bytes of `shape` x `dtype`; FormatError (prefix `where`) on overflow or a partial byte.
uint64_t byte_size(const std::vector<int64_t>& shape, StDtype dtype, const std::string& where) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) throw FormatError(where + "shape: expected entries >= 0, got " + std::to_string(d));
    if (mul_overflows(n, static_cast<uint64_t>(d), &n) || n > static_cast<uint64_t>(INT64_MAX)) {
      throw FormatError(where + "shape: expected an element count below 2^63, got an overflowing product");
    }
  }
  uint64_t bits = 0;
  if (mul_overflows(n, static_cast<uint64_t>(dtype_bits(dtype)), &bits)) {
    throw FormatError(where + "shape: expected a byte size below 2^64, got an overflowing product (" +
                      std::to_string(n) + " elements of " + dtype_name(dtype) + ")");
  }
  if (bits % 8 != 0) {
    throw FormatError(where + "shape: expected a whole number of bytes, got " + std::to_string(n) +
                      " elements of " + std::to_string(dtype_bits(dtype)) + " bits");
  }
  return bits / 8;
}

TensorEntry parse_entry(const std::string& source, const std::string& name, const json& v,
                        uint64_t data_size) {
  const std::string where = at(source, name);
  if (!v.is_object()) {
    throw FormatError(where + "expected an object {dtype, shape, data_offsets}, got " + type_name(v) + " " +
                      shown(v));
  }
  for (const auto& [k, unused] : v.items()) {
    (void)unused;
    if (k != "dtype" && k != "shape" && k != "data_offsets") {
      throw FormatError(where + "expected keys dtype, shape, data_offsets, got " + quote_cut(k));
    }
  }
  for (const char* k : {"dtype", "shape", "data_offsets"}) {
    if (!v.contains(k)) throw FormatError(where + "expected key " + k + ", got none");
  }
  TensorEntry e;
  e.name = name;
  const json& dt = v["dtype"];
  if (!dt.is_string())
    throw FormatError(where + "dtype: expected a string, got " + type_name(dt) + " " + shown(dt));
  const auto d = dtype_from_name(dt.get_ref<const std::string&>());
  if (!d) {
    throw FormatError(where + "dtype: expected one of " + dtype_list() + ", got " +
                      quote_cut(dt.get_ref<const std::string&>()));
  }
  e.dtype = *d;
  const json& sh = v["shape"];
  if (!sh.is_array())
    throw FormatError(where + "shape: expected a list, got " + type_name(sh) + " " + shown(sh));
  for (const json& x : sh) {
    if (!x.is_number_integer()) {
      throw FormatError(where + "shape: expected integers, got " + type_name(x) + " " + shown(x));
    }
    if (x.is_number_unsigned() ? x.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)
                               : x.get<int64_t>() < 0) {
      throw FormatError(where + "shape: expected entries in [0, 2^63), got " + shown(x));
    }
    e.shape.push_back(x.get<int64_t>());
  }
  const json& off = v["data_offsets"];
  if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned()) {
    throw FormatError(where + "data_offsets: expected [begin, end], two integers >= 0, got " + shown(off));
  }
  e.begin = off[0].get<uint64_t>();
  e.end = off[1].get<uint64_t>();
  if (e.begin > e.end) {
    throw FormatError(where + "data_offsets: expected begin <= end, got [" + std::to_string(e.begin) + ", " +
                      std::to_string(e.end) + "]");
  }
  if (e.end > data_size) {
    throw FormatError(where + "data_offsets: expected a span inside the data section of " +
                      std::to_string(data_size) + " bytes, got [" + std::to_string(e.begin) + ", " +
                      std::to_string(e.end) + "]");
  }
  const uint64_t bytes = byte_size(e.shape, e.dtype, where);
  if (bytes != e.nbytes()) {
    throw FormatError(where + "expected data_offsets spanning shape x dtype size = " + std::to_string(bytes) +
                      " bytes, got " + std::to_string(e.nbytes()) + " bytes [" + std::to_string(e.begin) +
                      ", " + std::to_string(e.end) + "]");
  }
  return e;
}

// Sorted by begin, the spans must tile [0, data_size): no overlap, no hole, nothing trailing.
void check_tiling(std::vector<const TensorEntry*> order, uint64_t data_size, const std::string& source,
                  bool sort) {
  if (sort) {
    std::sort(order.begin(), order.end(), [](const TensorEntry* a, const TensorEntry* b) {
      return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
    });
  }
  uint64_t pos = 0;
  const TensorEntry* prev = nullptr;
  for (const TensorEntry* e : order) {
    if (e->begin < pos) {
      throw FormatError(at(source, e->name) + "expected data_offsets not overlapping " +
                        (prev ? "tensor " + quote_cut(prev->name) : std::string("another tensor")) +
                        " (which ends at " + std::to_string(pos) + "), got [" + std::to_string(e->begin) +
                        ", " + std::to_string(e->end) + "]");
    }
    if (e->begin > pos) {
      throw FormatError(at(source, e->name) + "expected data_offsets starting at " + std::to_string(pos) +
                        " (no hole in the data section), got [" + std::to_string(e->begin) + ", " +
                        std::to_string(e->end) + "]");
    }
    pos = e->end;
    prev = e;
  }
  if (pos != data_size) {
    throw FormatError(source + ": expected tensors covering the whole data section of " +
                      std::to_string(data_size) + " bytes, got " + std::to_string(data_size - pos) +
                      " trailing bytes no tensor covers");
  }
}

}  // namespace

const char* dtype_name(StDtype d) { return row(d).name; }
int dtype_bits(StDtype d) { return row(d).bits; }

std::optional<StDtype> dtype_from_name(std::string_view name) {
  for (const auto& r : kDtypes) {
    if (name == r.name) return r.dtype;
  }
  return std::nullopt;
}

int64_t TensorEntry::numel() const {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0 || mul_overflows(n, static_cast<uint64_t>(d), &n) || n > static_cast<uint64_t>(INT64_MAX)) {
      throw FormatError("tensor " + quote_cut(name) +
                        ": shape: expected entries >= 0 with a product below 2^63");
    }
  }
  return static_cast<int64_t>(n);
}

const TensorEntry* SafetensorsHeader::find(std::string_view name) const {
  auto it = std::lower_bound(tensors.begin(), tensors.end(), name,
                             [](const TensorEntry& e, std::string_view n) { return e.name < n; });
  return it != tensors.end() && it->name == name ? &*it : nullptr;
}

SafetensorsHeader parse_safetensors_header(const uint8_t* data, size_t size, const std::string& source) {
  if (size < 8) {
    throw FormatError(source + ": expected at least 8 bytes (the header length), got a file of " +
                      std::to_string(size) + " bytes");
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];  // little-endian on every host
  if (n > kMaxHeaderBytes) {
    throw FormatError(source + ": expected a header length <= " + std::to_string(kMaxHeaderBytes) +
                      " bytes, got " + std::to_string(n));
  }
  if (n > size - 8) {
    throw FormatError(source + ": expected a header length <= " + std::to_string(size - 8) +
                      " (the file's size - 8), got " + std::to_string(n) + " (truncated file?)");
  }
  if (n == 0 || data[8] != '{') {
    throw FormatError(source + ": header: expected a JSON object starting with '{', got " +
                      (n == 0 ? std::string("an empty header") : "byte " + std::to_string(data[8])));
  }
  SafetensorsHeader h;
  h.data_start = 8 + n;
  h.data_size = size - h.data_start;
  const std::string_view text(reinterpret_cast<const char*>(data + 8), n);
  const json j = detail::parse_json_strict(text, kMaxDepth, source + ": header");
  if (!j.is_object()) throw FormatError(source + ": header: expected a JSON object, got " + type_name(j));
  h.tensors.reserve(j.size());
  for (const auto& [name, v] : j.items()) {  // std::map: sorted by name
    if (name == "__metadata__") {
      if (!v.is_object()) {
        throw FormatError(source + ": __metadata__: expected an object of strings, got " + type_name(v) +
                          " " + shown(v));
      }
      for (const auto& [k, s] : v.items()) {
        if (!s.is_string()) {
          throw FormatError(source + ": __metadata__: " + quote_cut(k) + ": expected a string, got " +
                            type_name(s) + " " + shown(s));
        }
        h.metadata.emplace(k, s.get<std::string>());
      }
      continue;
    }
    h.tensors.push_back(parse_entry(source, name, v, h.data_size));
  }
  std::vector<const TensorEntry*> order;
  order.reserve(h.tensors.size());
  for (const auto& e : h.tensors) order.push_back(&e);
  check_tiling(std::move(order), h.data_size, source, /*sort=*/true);
  return h;
}

std::string serialize_safetensors_header(const std::vector<TensorEntry>& tensors,
                                         const std::map<std::string, std::string>& metadata) {
  const std::string source = "serialize_safetensors_header";
  json j = json::object();
  uint64_t data_size = 0;
  std::vector<const TensorEntry*> order;
  for (const auto& e : tensors) {
    if (e.name == "__metadata__") {
      throw FormatError(source + ": tensor names: expected anything but the reserved '__metadata__', got it");
    }
    if (j.contains(e.name))
      throw FormatError(source + ": tensor names: expected unique names, got " + quote_cut(e.name) +
                        " twice");
    const uint64_t bytes = byte_size(e.shape, e.dtype, at(source, e.name));
    if (e.begin > e.end || bytes != e.nbytes()) {
      throw FormatError(at(source, e.name) + "expected data_offsets spanning " + std::to_string(bytes) +
                        " bytes, got [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "]");
    }
    j[e.name] = json{{"dtype", dtype_name(e.dtype)}, {"shape", e.shape}, {"data_offsets", {e.begin, e.end}}};
    data_size = std::max(data_size, e.end);
    order.push_back(&e);
  }
  check_tiling(std::move(order), data_size, source, /*sort=*/false);
  if (!metadata.empty()) j["__metadata__"] = metadata;
  std::string text;
  try {
    text = j.dump(-1, ' ', false, json::error_handler_t::strict);
  } catch (const json::exception& e) {
    throw FormatError(source + ": names and metadata: expected UTF-8 strings, got " + e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');  // the data section starts at a multiple of 8
  std::string out(8, '\0');
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + text;
}

}  // namespace msbnb::io
