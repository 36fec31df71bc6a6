// bitsandbytes' packed quant_state JSON (see msbnb/io/quant_state.h). No libtorch.
#include "msbnb/io/quant_state.h"

#include <charconv>
#include <cmath>
#include <cstdlib>

#include "json_strict.h"

namespace msbnb::io {
namespace {

using detail::quote_cut;
using detail::shown;
using detail::type_name;
using nlohmann::json;

const char* const kKeys[] = {"quant_type",       "blocksize",    "dtype",        "shape",
                             "nested_blocksize", "nested_dtype", "nested_offset"};
const char* const kDtypes[] = {"float32", "float16", "bfloat16"};

[[noreturn]] void fail(const std::string& source, const std::string& key, const std::string& msg) {
  throw FormatError(source + ": " + key + ": " + msg);
}

void check_blocksize(const std::string& source, const char* key, int64_t b) {
  if (b < 32 || b > 4096 || (b & (b - 1)) != 0) {
    fail(source, key, "expected a power of two in [32, 4096], got " + std::to_string(b));
  }
}

void check_dtype(const std::string& source, const char* key, const std::string& d) {
  for (const char* x : kDtypes) {
    if (d == x) return;
  }
  fail(source, key, "expected float32, float16 or bfloat16, got " + quote_cut(d));
}

void check_quant_type(const std::string& source, const std::string& q) {
  if (q != "nf4" && q != "fp4") fail(source, "quant_type", "expected nf4 or fp4, got " + quote_cut(q));
}

int64_t checked_numel(const std::string& source, const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d <= 0) fail(source, "shape", "expected positive entries, got " + std::to_string(d));
    if (__builtin_mul_overflow(n, d, &n))
      fail(source, "shape", "expected a product below 2^63, got an overflow");
  }
  return n;
}

void validate(const QuantStateJson& q, const std::string& source) {
  check_quant_type(source, q.quant_type);
  check_blocksize(source, "blocksize", q.blocksize);
  check_dtype(source, "dtype", q.dtype);
  checked_numel(source, q.shape);
  if (q.nested) {
    check_blocksize(source, "nested_blocksize", q.nested_blocksize);
    check_dtype(source, "nested_dtype", q.nested_dtype);
    if (!std::isfinite(q.nested_offset)) {
      fail(source, "nested_offset", "expected a finite number, got " + std::to_string(q.nested_offset));
    }
  }
}

const std::string& get_string(const json& j, const std::string& source, const char* key) {
  const json& v = j.at(key);
  if (!v.is_string())
    fail(source, key, std::string("expected a string, got ") + type_name(v) + " " + shown(v));
  return v.get_ref<const std::string&>();
}

int64_t get_int(const json& j, const std::string& source, const char* key) {
  const json& v = j.at(key);
  if (!v.is_number_integer() ||
      (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))) {
    fail(source, key,
         std::string("expected an integer in int64 range, got ") + type_name(v) + " " + shown(v));
  }
  return v.get<int64_t>();
}

// Python's repr(float): the shortest digits that round-trip, in fixed notation when the decimal
// exponent is in [-4, 16), else d.ddde[+-]XX; fixed notation always has a '.'.
std::string python_float_repr(double v) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  std::string s(buf, r.ptr);  // "-1.2345e-05", shortest round-trip digits
  std::string sign;
  if (s[0] == '-') {
    sign = "-";
    s.erase(0, 1);
  }
  const auto e = s.find('e');
  std::string digits = s.substr(0, e);
  if (digits.size() > 1) digits.erase(1, 1);  // drop the '.'
  const int exp10 = std::atoi(s.c_str() + e + 1);
  const int decpt = exp10 + 1;  // value = 0.<digits> x 10^decpt
  const int nd = static_cast<int>(digits.size());
  if (decpt <= -4 || decpt > 16) {
    std::string m = digits.substr(0, 1);
    if (nd > 1) m += "." + digits.substr(1);
    const int x = decpt - 1;
    std::string xs = std::to_string(x < 0 ? -x : x);
    if (xs.size() < 2) xs = "0" + xs;
    return sign + m + "e" + (x < 0 ? "-" : "+") + xs;
  }
  if (decpt <= 0) return sign + "0." + std::string(-decpt, '0') + digits;
  if (decpt >= nd) return sign + digits + std::string(decpt - nd, '0') + ".0";
  return sign + digits.substr(0, decpt) + "." + digits.substr(decpt);
}

}  // namespace

int64_t QuantStateJson::numel() const { return checked_numel("quant_state", shape); }

bool QuantStateJson::operator==(const QuantStateJson& o) const {
  if (quant_type != o.quant_type || blocksize != o.blocksize || dtype != o.dtype || shape != o.shape ||
      nested != o.nested) {
    return false;
  }
  return !nested || (nested_blocksize == o.nested_blocksize && nested_dtype == o.nested_dtype &&
                     nested_offset == o.nested_offset);
}

QuantStateJson parse_quant_state_json(const std::string& text, const std::string& source) {
  // Object -> shape list.
  const json j = detail::parse_json_strict(text, 2, source);
  if (!j.is_object())
    throw FormatError(source + ": expected a JSON object, got " + type_name(j) + " " + shown(j));
  for (const auto& [k, unused] : j.items()) {
    (void)unused;
    bool known = false;
    for (const char* x : kKeys) known = known || k == x;
    if (!known) {
      throw FormatError(source +
                        ": expected keys quant_type, blocksize, dtype, shape[, nested_blocksize, "
                        "nested_dtype, nested_offset], got " +
                        quote_cut(k));
    }
  }
  for (const char* k : {"quant_type", "blocksize", "dtype", "shape"}) {
    if (!j.contains(k)) fail(source, k, "expected the key, got none");
  }
  QuantStateJson q;
  q.quant_type = get_string(j, source, "quant_type");
  check_quant_type(source, q.quant_type);
  q.blocksize = get_int(j, source, "blocksize");
  check_blocksize(source, "blocksize", q.blocksize);
  q.dtype = get_string(j, source, "dtype");
  check_dtype(source, "dtype", q.dtype);
  const json& sh = j.at("shape");
  if (!sh.is_array())
    fail(source, "shape", std::string("expected a list, got ") + type_name(sh) + " " + shown(sh));
  for (const json& x : sh) {
    if (!x.is_number_integer() ||
        (x.is_number_unsigned() && x.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))) {
      fail(source, "shape", std::string("expected integers, got ") + type_name(x) + " " + shown(x));
    }
    q.shape.push_back(x.get<int64_t>());
  }
  checked_numel(source, q.shape);
  const int nested =
      j.contains("nested_blocksize") + j.contains("nested_dtype") + j.contains("nested_offset");
  if (nested != 0 && nested != 3) {
    throw FormatError(source +
                      ": expected nested_blocksize, nested_dtype and nested_offset all present or all "
                      "absent, got " +
                      std::to_string(nested) + " of them");
  }
  q.nested = nested == 3;
  if (q.nested) {
    q.nested_blocksize = get_int(j, source, "nested_blocksize");
    check_blocksize(source, "nested_blocksize", q.nested_blocksize);
    q.nested_dtype = get_string(j, source, "nested_dtype");
    check_dtype(source, "nested_dtype", q.nested_dtype);
    const json& off = j.at("nested_offset");
    if (!off.is_number()) {
      fail(source, "nested_offset",
           std::string("expected a number, got ") + type_name(off) + " " + shown(off));
    }
    q.nested_offset = off.get<double>();
    if (!std::isfinite(q.nested_offset))
      fail(source, "nested_offset", "expected a finite number, got " + shown(off));
  }
  return q;
}

std::string quant_state_json(const QuantStateJson& q) {
  validate(q, "quant_state_json");
  // json.dumps(dict) of QuantState.as_dict: insertion order, ", " and ": ".
  std::string s = "{\"quant_type\": \"" + q.quant_type + "\", \"blocksize\": " + std::to_string(q.blocksize) +
                  ", \"dtype\": \"" + q.dtype + "\", \"shape\": [";
  for (size_t i = 0; i < q.shape.size(); ++i) s += (i ? ", " : "") + std::to_string(q.shape[i]);
  s += "]";
  if (q.nested) {
    s += ", \"nested_blocksize\": " + std::to_string(q.nested_blocksize) + ", \"nested_dtype\": \"" +
         q.nested_dtype + "\", \"nested_offset\": " + python_float_repr(q.nested_offset);
  }
  return s + "}";
}

std::string quant_state_key_suffix(const std::string& quant_type) {
  check_quant_type("quant_state_key_suffix", quant_type);
  return "quant_state.bitsandbytes__" + quant_type;
}

}  // namespace msbnb::io
