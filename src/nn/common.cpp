// Helpers shared by the nn modules: checks, the bitsandbytes quant-state JSON, 4-bit checkpoint
// entries (src/nn/common.h).
#include "common.h"

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "msbnb/io/quant_state.h"

namespace msbnb::nn::detail {

std::string dtype_name(torch::Dtype dt) {
  switch (dt) {
    case torch::kFloat32:
      return "float32";
    case torch::kFloat16:
      return "float16";
    case torch::kBFloat16:
      return "bfloat16";
    default:
      TORCH_CHECK(false, "dtype: expected float32, float16 or bfloat16, got ", dt);
  }
}

torch::Dtype dtype_from_name(const std::string& name, const std::string& arg) {
  if (name == "float32") return torch::kFloat32;
  if (name == "float16") return torch::kFloat16;
  if (name == "bfloat16") return torch::kBFloat16;
  TORCH_CHECK(false, arg, ": expected \"float32\", \"float16\" or \"bfloat16\", got \"", name, "\"");
}

void check_float_dtype(torch::Dtype dt, const std::string& arg) {
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kFloat16 || dt == torch::kBFloat16, arg,
              ": expected float32, float16 or bfloat16, got ", dt);
}

std::string python_float_repr(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  // Shortest round-trip digits (as Python's repr), then Python's choice of notation.
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  std::string s(buf, r.ptr);
  std::string sign;
  if (s[0] == '-') {
    sign = "-";
    s.erase(0, 1);
  }
  const size_t e = s.find('e');
  std::string digits = s.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  const int exp10 = std::atoi(s.c_str() + e + 1);
  const int decpt = exp10 + 1;  // value = 0.d1d2... * 10^decpt
  const int nd = static_cast<int>(digits.size());
  std::string out;
  if (decpt > -4 && decpt <= 16) {
    if (decpt <= 0)
      out = "0." + std::string(static_cast<size_t>(-decpt), '0') + digits;
    else if (decpt >= nd)
      out = digits + std::string(static_cast<size_t>(decpt - nd), '0') + ".0";
    else
      out = digits.substr(0, static_cast<size_t>(decpt)) + "." + digits.substr(static_cast<size_t>(decpt));
  } else {
    out = digits.substr(0, 1);
    if (nd > 1) out += "." + digits.substr(1);
    const int x = decpt - 1;
    std::string xs = std::to_string(std::abs(x));
    if (xs.size() < 2) xs = "0" + xs;
    out += std::string("e") + (x < 0 ? "-" : "+") + xs;
  }
  return sign + out;
}

void check_input(const torch::Tensor& x, int64_t in, const char* what) {
  TORCH_CHECK(x.defined(), "x: expected a tensor, got an undefined tensor");
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, got device ", x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kFloat16 || dt == torch::kBFloat16,
              "x: expected dtype float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, "x: expected last dimension ", in, " (", what,
              "), got shape ", shape_str(x.sizes()));
}

void check_weight(const torch::Tensor& w, int64_t rows, int64_t cols, const char* rows_name,
                  const char* cols_name) {
  TORCH_CHECK(w.defined(), "weight: expected a tensor, got an undefined tensor");
  TORCH_CHECK(w.device().is_cpu(), "weight: expected a CPU tensor, got device ", w.device());
  const auto dt = w.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kFloat16 || dt == torch::kBFloat16,
              "weight: expected dtype float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == rows && w.size(1) == cols, "weight: expected shape [", rows, ", ",
              cols, "] ([", rows_name, ", ", cols_name, "]), got ", shape_str(w.sizes()));
  TORCH_CHECK(torch::isfinite(w).all().item<bool>(), "weight: expected finite values, got NaN or Inf");
}

void check_to_device(const torch::Device& device, const char* module) {
  TORCH_CHECK(device.is_cpu(), module, "::to: expected device cpu, got ", device,
              " (msbnb runs on the CPU: CUDA kernels do not exist yet)");
}

void check_to_dtype(torch::Dtype dtype, const char* module) {
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kFloat16 || dtype == torch::kBFloat16, module,
              "::to: expected dtype float32, float16 or bfloat16 (it converts the float parameters; the "
              "quantized weight keeps its bytes), got ",
              dtype);
}

void check_positive(int64_t v, const char* arg) { TORCH_CHECK(v > 0, arg, ": expected > 0, got ", v); }

void check_4bit_options(const std::string& quant_type, int64_t blocksize, bool symmetric) {
  TORCH_CHECK(quant_type == "nf4" || quant_type == "fp4" || quant_type == "int4",
              "quant_type: expected \"nf4\", \"fp4\" or \"int4\", got \"", quant_type, "\"");
  if (quant_type == "int4") {
    TORCH_CHECK(blocksize >= 2 && blocksize % 2 == 0,
                "blocksize: expected an even int4 group size >= 2, got ", blocksize);
  } else {
    TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
                "blocksize: expected a power of two in [32, 4096] for ", quant_type, ", got ", blocksize);
    TORCH_CHECK(symmetric, "symmetric: expected true with quant_type \"", quant_type,
                "\" (only int4 has an asymmetric form), got false");
  }
}

torch::Tensor codebook(const std::string& quant_type) {
  // quantize_4bit writes the format's table into state.code: take it from there, so the nn layer
  // never holds a second copy of formats.def.
  static const torch::Tensor nf4 =
      quantize_4bit(torch::zeros({2}), Quantize4bitOptions().quant_type("nf4")).state.code.clone();
  static const torch::Tensor fp4 =
      quantize_4bit(torch::zeros({2}), Quantize4bitOptions().quant_type("fp4")).state.code.clone();
  TORCH_CHECK(quant_type == "nf4" || quant_type == "fp4", "quant_type: expected \"nf4\" or \"fp4\", got \"",
              quant_type, "\"");
  return quant_type == "nf4" ? nf4 : fp4;
}

torch::Tensor dynamic_map() {
  static const torch::Tensor m = create_dynamic_map();
  return m;
}

int64_t checked_mul(int64_t a, int64_t b, const std::string& arg) {
  int64_t r = 0;
  TORCH_CHECK(a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, &r) && r <= (int64_t{1} << 59), arg,
              ": expected a product of sizes <= 2^59, got ", a, " x ", b);
  return r;
}

std::string quant_state_json_string(const QuantState& s, bool int4_symmetric) {
  if (s.quant_type != "int4") {
    // bitsandbytes' own JSON: msbnb::io's writer (the one the safetensors layer validates).
    io::QuantStateJson q;
    q.quant_type = s.quant_type;
    q.blocksize = s.blocksize;
    q.dtype = dtype_name(s.dtype);
    q.shape = s.shape;
    q.nested = s.nested();
    if (q.nested) {
      q.nested_blocksize = s.state2->blocksize;
      q.nested_dtype = dtype_name(s.state2->dtype);
      q.nested_offset = static_cast<double>(s.offset.item<float>());
    }
    return io::quant_state_json(q);
  }
  // msbnb's int4 JSON in the same dialect (json.dumps separators, as_dict key order), plus
  // "symmetric" after "shape".
  std::ostringstream o;
  o << "{\"quant_type\": \"" << s.quant_type << "\", \"blocksize\": " << s.blocksize << ", \"dtype\": \""
    << dtype_name(s.dtype) << "\", \"shape\": [";
  for (size_t i = 0; i < s.shape.size(); ++i) o << (i ? ", " : "") << s.shape[i];
  o << "]";
  if (s.quant_type == "int4") o << ", \"symmetric\": " << (int4_symmetric ? "true" : "false");
  if (s.nested()) {
    o << ", \"nested_blocksize\": " << s.state2->blocksize << ", \"nested_dtype\": \""
      << dtype_name(s.state2->dtype)
      << "\", \"nested_offset\": " << python_float_repr(static_cast<double>(s.offset.item<float>()));
  }
  o << "}";
  return o.str();
}

torch::Tensor quant_state_json(const QuantState& s, bool int4_symmetric) {
  const std::string j = quant_state_json_string(s, int4_symmetric);
  torch::Tensor t = torch::empty({static_cast<int64_t>(j.size())}, torch::kUInt8);
  std::copy(j.begin(), j.end(), reinterpret_cast<char*>(t.data_ptr<uint8_t>()));
  return t;
}

namespace {

int64_t json_int(const nlohmann::json& v, const std::string& name, int64_t lo, int64_t hi) {
  TORCH_CHECK(v.is_number_integer(), name, ": expected an integer, got ", v.dump());
  if (v.is_number_unsigned())
    TORCH_CHECK(v.get<uint64_t>() <= static_cast<uint64_t>(hi), name, ": expected an integer in [", lo, ", ",
                hi, "], got ", v.dump());
  const int64_t i = v.get<int64_t>();
  TORCH_CHECK(i >= lo && i <= hi, name, ": expected an integer in [", lo, ", ", hi, "], got ", v.dump());
  return i;
}

std::string json_str(const nlohmann::json& v, const std::string& name) {
  TORCH_CHECK(v.is_string(), name, ": expected a string, got ", v.dump());
  return v.get<std::string>();
}

}  // namespace

ParsedQuantState parse_quant_state(const torch::Tensor& t, const std::string& key) {
  TORCH_CHECK(t.defined() && t.scalar_type() == torch::kUInt8 && t.dim() == 1, key,
              ": expected a 1-D uint8 tensor of UTF-8 JSON, got ",
              t.defined() ? c10::toString(t.scalar_type()) : "undefined", " ",
              t.defined() ? shape_str(t.sizes()) : "");
  TORCH_CHECK(t.numel() <= (1 << 20), key, ": expected at most 1 MiB of JSON, got ", t.numel(), " bytes");
  const torch::Tensor c = t.contiguous();
  const std::string text(reinterpret_cast<const char*>(c.data_ptr<uint8_t>()),
                         static_cast<size_t>(c.numel()));
  if (key.find("bitsandbytes__") != std::string::npos) {
    // bitsandbytes' JSON: msbnb::io's validating parser.
    io::QuantStateJson q;
    try {
      q = io::parse_quant_state_json(text, key);
    } catch (const io::FormatError& e) {
      TORCH_CHECK(false, e.what());
    }
    ParsedQuantState p;
    p.quant_type = q.quant_type;
    p.blocksize = q.blocksize;
    p.dtype = dtype_from_name(q.dtype, key + " dtype");
    TORCH_CHECK(q.shape.size() == 2, key, " shape: expected [out_features, in_features], got ",
                shape_str(q.shape));
    p.shape = q.shape;
    checked_mul(p.shape[0], p.shape[1], key + " shape");
    p.nested = q.nested;
    if (q.nested) {
      p.nested_blocksize = q.nested_blocksize;
      TORCH_CHECK(q.nested_dtype == "float32", key, " nested_dtype: expected \"float32\", got \"",
                  q.nested_dtype, "\"");
      TORCH_CHECK(std::fabs(q.nested_offset) <= std::numeric_limits<float>::max(), key,
                  " nested_offset: expected a finite float32 value, got ", q.nested_offset);
      p.nested_offset = static_cast<float>(q.nested_offset);
    }
    return p;
  }
  // msbnb's int4 JSON.
  nlohmann::json j;
  std::set<std::string> seen;
  int depth = 0;
  std::string dup;
  // Duplicate keys would silently take the last value: refuse them.
  const nlohmann::json::parser_callback_t cb = [&](int d, nlohmann::json::parse_event_t ev,
                                                   nlohmann::json& v) {
    depth = d;
    if (ev == nlohmann::json::parse_event_t::key && d == 1 && v.is_string()) {
      if (!seen.insert(v.get<std::string>()).second) dup = v.get<std::string>();
    }
    return true;
  };
  try {
    j = nlohmann::json::parse(text, cb);
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, key, ": expected valid UTF-8 JSON, got a parse error: ", e.what());
  }
  (void)depth;
  TORCH_CHECK(dup.empty(), key, ": expected each key once, got \"", dup, "\" twice");
  TORCH_CHECK(j.is_object(), key, ": expected a JSON object, got ", j.type_name());
  ParsedQuantState p;
  const auto need = [&](const char* k) -> const nlohmann::json& {
    TORCH_CHECK(j.contains(k), key, ": expected the key \"", k, "\", got ", text);
    return j.at(k);
  };
  p.quant_type = json_str(need("quant_type"), key + " quant_type");
  TORCH_CHECK(p.quant_type == "nf4" || p.quant_type == "fp4" || p.quant_type == "int4", key,
              " quant_type: expected \"nf4\", \"fp4\" or \"int4\", got \"", p.quant_type, "\"");
  p.blocksize = json_int(need("blocksize"), key + " blocksize", 1, int64_t{1} << 30);
  p.dtype = dtype_from_name(json_str(need("dtype"), key + " dtype"), key + " dtype");
  const nlohmann::json& shape = need("shape");
  TORCH_CHECK(shape.is_array() && shape.size() == 2, key,
              " shape: expected [out_features, in_features], got ", shape.dump());
  for (const auto& d : shape) p.shape.push_back(json_int(d, key + " shape", 1, int64_t{1} << 40));
  checked_mul(p.shape[0], p.shape[1], key + " shape");
  std::set<std::string> allowed = {"quant_type", "blocksize", "dtype", "shape"};
  if (p.quant_type == "int4") {
    const nlohmann::json& s = need("symmetric");
    TORCH_CHECK(s.is_boolean(), key, " symmetric: expected true or false, got ", s.dump());
    p.symmetric = s.get<bool>();
    allowed.insert("symmetric");
  }
  const bool any_nested =
      j.contains("nested_blocksize") || j.contains("nested_dtype") || j.contains("nested_offset");
  if (any_nested) {
    p.nested = true;
    p.nested_blocksize = json_int(need("nested_blocksize"), key + " nested_blocksize", 1, 4096);
    const std::string nd = json_str(need("nested_dtype"), key + " nested_dtype");
    TORCH_CHECK(nd == "float32", key, " nested_dtype: expected \"float32\", got \"", nd, "\"");
    const nlohmann::json& off = need("nested_offset");
    TORCH_CHECK(off.is_number(), key, " nested_offset: expected a number, got ", off.dump());
    const double o = off.get<double>();
    TORCH_CHECK(std::isfinite(o) && std::fabs(o) <= std::numeric_limits<float>::max(), key,
                " nested_offset: expected a finite float32 value, got ", off.dump());
    p.nested_offset = static_cast<float>(o);
    allowed.insert({"nested_blocksize", "nested_dtype", "nested_offset"});
  }
  for (const auto& it : j.items())
    TORCH_CHECK(allowed.count(it.key()), key, ": expected only the keys bitsandbytes writes, got \"",
                it.key(), "\"");
  return p;
}

const torch::Tensor& entry(const std::map<std::string, torch::Tensor>& entries, const std::string& key,
                           const std::string& prefix) {
  const auto it = entries.find(key);
  TORCH_CHECK(it != entries.end(), prefix, key, ": expected in the state dict, got no such key");
  return it->second;
}

void check_entry(const torch::Tensor& t, const std::string& name, torch::Dtype dtype,
                 const std::vector<int64_t>& shape) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got an undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes().vec() == shape, name, ": expected shape ", shape_str(shape), ", got ",
              shape_str(t.sizes()));
}

void check_entry_finite(const torch::Tensor& t, const std::string& name) {
  TORCH_CHECK(torch::isfinite(t).all().item<bool>(), name, ": expected finite values, got NaN or Inf");
}

int64_t tensor_bytes(const torch::Tensor& t) {
  return t.defined() ? t.numel() * static_cast<int64_t>(t.element_size()) : 0;
}

namespace {
std::string json_key(const std::string& quant_type) {
  return quant_type == "int4" ? "weight.quant_state.msbnb__int4"
                              : "weight.quant_state.bitsandbytes__" + quant_type;
}
}  // namespace

std::vector<std::string> keys_4bit(const std::string& quant_type, bool nested, bool asymmetric) {
  std::vector<std::string> k = {"weight"};
  if (quant_type == "int4") {
    k.push_back("weight.scale");
    if (asymmetric) k.push_back("weight.zero_point");
  } else {
    k.push_back("weight.absmax");
    k.push_back("weight.quant_map");
  }
  if (nested) {
    k.push_back("weight.nested_absmax");
    k.push_back("weight.nested_quant_map");
  }
  k.push_back(json_key(quant_type));
  return k;
}

NamedTensors state_4bit(const Quantized4bit& q, torch::Dtype weight_dtype, bool symmetric) {
  QuantState s = q.state;
  s.dtype = weight_dtype;
  NamedTensors v;
  v.emplace_back("weight", q.data);
  if (s.quant_type == "int4") {
    v.emplace_back("weight.scale", s.absmax);
    if (s.zero_point.defined()) v.emplace_back("weight.zero_point", s.zero_point);
  } else {
    v.emplace_back("weight.absmax", s.absmax);
    v.emplace_back("weight.quant_map", s.code);
  }
  if (s.nested()) {
    v.emplace_back("weight.nested_absmax", s.state2->absmax);
    v.emplace_back("weight.nested_quant_map", s.state2->code);
  }
  v.emplace_back(json_key(s.quant_type), quant_state_json(s, symmetric));
  for (auto& [name, t] : v) t = t.detach().contiguous().clone();
  return v;
}

Quantized4bit load_4bit(const std::map<std::string, torch::Tensor>& entries, const std::string& prefix,
                        const std::string& quant_type, int64_t blocksize, bool nested, bool symmetric,
                        int64_t rows, int64_t cols, torch::Dtype* weight_dtype) {
  const std::string jk = json_key(quant_type);
  const ParsedQuantState p = parse_quant_state(entry(entries, jk, prefix), prefix + jk);
  const std::string jn = prefix + jk;
  TORCH_CHECK(p.quant_type == quant_type, jn, " quant_type: expected \"", quant_type,
              "\" (the layer's), got \"", p.quant_type, "\"");
  TORCH_CHECK(p.blocksize == blocksize, jn, " blocksize: expected ", blocksize, " (the layer's), got ",
              p.blocksize);
  TORCH_CHECK(p.shape[0] == rows && p.shape[1] == cols, jn, " shape: expected [", rows, ", ", cols,
              "] (the layer's), got [", p.shape[0], ", ", p.shape[1], "]");
  TORCH_CHECK(p.nested == nested, jn, ": expected ", nested ? "" : "no ",
              "double quantization (the layer's compress_statistics=", nested ? "true" : "false", "), got ",
              p.nested ? "nested statistics" : "none");
  if (quant_type == "int4")
    TORCH_CHECK(*p.symmetric == symmetric, jn, " symmetric: expected ", symmetric ? "true" : "false",
                " (the layer's), got ", *p.symmetric ? "true" : "false");
  if (nested)
    TORCH_CHECK(p.nested_blocksize == kNestedBlocksize, jn, " nested_blocksize: expected ", kNestedBlocksize,
                ", got ", p.nested_blocksize);
  const int64_t n = checked_mul(rows, cols, prefix + "weight shape");
  Quantized4bit q;
  QuantState& s = q.state;
  s.quant_type = quant_type;
  s.shape = {rows, cols};
  s.dtype = p.dtype;  // the original weight's dtype (the JSON "dtype"), kept for saving
  s.blocksize = blocksize;
  // Statistics: int4 [rows, groups], nf4 / fp4 [blocks]; double-quantized codes are flat
  // [count] (bitsandbytes' quantize_blockwise of the flattened absmax).
  std::vector<int64_t> stats_shape;
  if (quant_type == "int4") {
    const int64_t groups = ceil_div(cols, blocksize);
    stats_shape = {rows, groups};
    if (nested) stats_shape = {checked_mul(rows, groups, prefix + "weight.scale")};
    check_entry(entry(entries, "weight", prefix), prefix + "weight", torch::kUInt8, {rows, (cols + 1) / 2});
    if (!symmetric) {
      const torch::Tensor& z = entry(entries, "weight.zero_point", prefix);
      check_entry(z, prefix + "weight.zero_point", torch::kUInt8, {rows, groups});
      TORCH_CHECK(z.max().item<int64_t>() <= 15, prefix,
                  "weight.zero_point: expected values in [0, 15], got ", z.max().item<int64_t>());
      s.zero_point = z.contiguous().clone();
    }
  } else {
    stats_shape = {ceil_div(n, blocksize)};
    check_entry(entry(entries, "weight", prefix), prefix + "weight", torch::kUInt8, {(n + 1) / 2, 1});
    const torch::Tensor& code = entry(entries, "weight.quant_map", prefix);
    check_entry(code, prefix + "weight.quant_map", torch::kFloat32, {16});
    TORCH_CHECK(torch::equal(code, codebook(quant_type)), prefix, "weight.quant_map: expected the ",
                quant_type, " code table (msbnb decodes with the standard table), got different values");
    s.code = code.contiguous().clone();
  }
  q.data = entry(entries, "weight", prefix).contiguous().clone();
  const std::string sk = prefix + (quant_type == "int4" ? "weight.scale" : "weight.absmax");
  const torch::Tensor& stats =
      entry(entries, quant_type == "int4" ? "weight.scale" : "weight.absmax", prefix);
  if (nested) {
    check_entry(stats, sk, torch::kUInt8, stats_shape);
    const int64_t count = stats_shape[0];
    const torch::Tensor& na = entry(entries, "weight.nested_absmax", prefix);
    check_entry(na, prefix + "weight.nested_absmax", torch::kFloat32, {ceil_div(count, kNestedBlocksize)});
    check_entry_finite(na, prefix + "weight.nested_absmax");
    const torch::Tensor& nm = entry(entries, "weight.nested_quant_map", prefix);
    check_entry(nm, prefix + "weight.nested_quant_map", torch::kFloat32, {256});
    TORCH_CHECK(torch::equal(nm, dynamic_map()), prefix,
                "weight.nested_quant_map: expected the signed dynamic 8-bit map (bitsandbytes' "
                "create_dynamic_map()), got different values");
    s.absmax = stats.contiguous().clone();
    s.offset = torch::full({}, p.nested_offset, torch::kFloat32);
    auto s2 = std::make_shared<QuantState>();
    s2->quant_type = "dynamic8";
    s2->shape = stats_shape;
    s2->dtype = torch::kFloat32;
    s2->blocksize = kNestedBlocksize;
    s2->absmax = na.contiguous().clone();
    s2->code = nm.contiguous().clone();
    s.state2 = std::move(s2);
  } else {
    check_entry(stats, sk, torch::kFloat32, stats_shape);
    check_entry_finite(stats, sk);
    s.absmax = stats.contiguous().clone();
  }
  if (weight_dtype) *weight_dtype = p.dtype;
  return q;
}

torch::Tensor load_bias(const std::map<std::string, torch::Tensor>& entries, const std::string& prefix,
                        int64_t n) {
  const torch::Tensor& b = entry(entries, "bias", prefix);
  TORCH_CHECK(b.defined() && b.device().is_cpu(), prefix, "bias: expected a CPU tensor");
  check_float_dtype(b.scalar_type(), prefix + "bias dtype");
  check_entry(b, prefix + "bias", b.scalar_type(), {n});
  check_entry_finite(b, prefix + "bias");
  return b.detach().contiguous().clone();
}

}  // namespace msbnb::nn::detail
