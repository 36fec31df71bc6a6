#include "msbnb/convert/size.h"

#include <c10/util/Exception.h>

#include <iomanip>
#include <map>
#include <set>
#include <sstream>

#include "layers.h"

namespace msbnb {

using torch::nn::Module;

namespace {

// Identity and size of the memory behind a tensor: its storage, or (no storage) its elements.
std::pair<const void*, int64_t> memory_of(const torch::Tensor& t) {
  if (t.has_storage()) {
    return {t.storage().unsafeGetStorageImpl(), static_cast<int64_t>(t.storage().nbytes())};
  }
  return {t.unsafeGetTensorImpl(), static_cast<int64_t>(t.numel() * t.element_size())};
}

std::string type_name(const Module& m) {
  std::string n = m.name();
  // "msbnb::nn::Linear4bitImpl" -> "msbnb::nn::Linear4bit", as torch names its own modules.
  const std::string impl = "Impl";
  if (n.size() > impl.size() && n.compare(n.size() - impl.size(), impl.size(), impl) == 0) {
    n.erase(n.size() - impl.size());
  }
  return n;
}

std::string dtype_name(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat32:
      return "float32";
    case torch::kFloat16:
      return "float16";
    case torch::kBFloat16:
      return "bfloat16";
    case torch::kFloat64:
      return "float64";
    default:
      return c10::toString(t);
  }
}

std::string format_of(const Module& m) {
  std::string q = detail::quantized_format(m);
  if (!q.empty()) return q;
  for (const auto& p : m.named_parameters(/*recurse=*/false)) {
    if (p.value().defined()) return dtype_name(p.value().scalar_type());
  }
  for (const auto& b : m.named_buffers(/*recurse=*/false)) {
    if (b.value().defined()) return dtype_name(b.value().scalar_type());
  }
  return "";
}

// Adds `t` to `seen` and returns the bytes it adds (0 if its memory was counted already).
int64_t count_once(const torch::Tensor& t, std::set<const void*>& seen) {
  if (!t.defined()) return 0;
  auto [id, bytes] = memory_of(t);
  return seen.insert(id).second ? bytes : 0;
}

}  // namespace

const LayerSize& ModelSize::layer(const std::string& name) const {
  for (const auto& l : layers) {
    if (l.name == name) return l;
  }
  TORCH_CHECK(false, "ModelSize::layer: name: expected the dotted name of a module holding tensors, got '",
              name, "'");
}

ModelSize get_model_size(const Module& model) {
  ModelSize out;
  std::set<const void*> seen_total;
  for (const auto& item : model.named_modules()) {
    const Module& m = *item.value();
    LayerSize l;
    l.name = item.key();
    std::set<const void*> seen_layer;
    bool any = false;
    const bool quantized = !detail::quantized_format(m).empty();
    for (const auto& p : m.named_parameters(/*recurse=*/false)) {
      if (!p.value().defined()) continue;
      any = true;
      l.parameter_bytes += count_once(p.value(), seen_layer);
      if (!quantized && p.value().is_floating_point()) l.parameter_count += p.value().numel();
      out.parameter_bytes += count_once(p.value(), seen_total);
    }
    for (const auto& b : m.named_buffers(/*recurse=*/false)) {
      if (!b.value().defined()) continue;
      any = true;
      l.buffer_bytes += count_once(b.value(), seen_layer);
      out.buffer_bytes += count_once(b.value(), seen_total);
    }
    if (!any) continue;
    l.type = type_name(m);
    l.format = format_of(m);
    out.layers.push_back(std::move(l));
  }
  out.total_bytes = out.parameter_bytes + out.buffer_bytes;
  return out;
}

SizeComparison compare_model_sizes(const Module& fp_model, const Module& quant_model) {
  SizeComparison c;
  c.fp_bytes = get_model_size(fp_model).total_bytes;
  c.quant_bytes = get_model_size(quant_model).total_bytes;
  TORCH_CHECK(c.quant_bytes > 0,
              "compare_model_sizes: quant_model: expected a model holding tensors, got 0 bytes");
  constexpr double mib = 1024.0 * 1024.0;
  c.fp_size_mb = static_cast<double>(c.fp_bytes) / mib;
  c.quant_size_mb = static_cast<double>(c.quant_bytes) / mib;
  c.memory_saved_mb = c.fp_size_mb - c.quant_size_mb;
  c.memory_saved_percent = c.fp_bytes > 0 ? 100.0 * static_cast<double>(c.fp_bytes - c.quant_bytes) /
                                                static_cast<double>(c.fp_bytes)
                                          : 0.0;
  c.compression_ratio = static_cast<double>(c.fp_bytes) / static_cast<double>(c.quant_bytes);
  return c;
}

namespace {

void print_tree(const Module& m, const std::string& key, const std::string& path, int depth,
                const std::map<std::string, const LayerSize*>& sizes, std::ostream& os) {
  std::ostringstream label;
  label << std::string(static_cast<size_t>(2 * depth), ' ') << (key.empty() ? "(root)" : key) << "  "
        << type_name(m);
  auto it = sizes.find(path);
  if (it == sizes.end()) {
    os << label.str();  // holds no tensors of its own
  } else {
    os << std::left << std::setw(56) << label.str() << "  " << std::setw(22) << it->second->format
       << std::right << std::setw(14) << it->second->bytes() << " B";
  }
  os << "\n";
  for (const auto& child : m.named_children()) {
    print_tree(*child.value(), child.key(), path.empty() ? child.key() : path + "." + child.key(), depth + 1,
               sizes, os);
  }
}

}  // namespace

void print_quantization_summary(const Module& model, std::ostream& os) {
  const ModelSize size = get_model_size(model);
  std::map<std::string, const LayerSize*> by_name;
  std::map<std::string, std::pair<int64_t, int64_t>> by_format;  // format -> (modules, bytes)
  for (const auto& l : size.layers) {
    by_name[l.name] = &l;
    auto& f = by_format[l.format];
    f.first += 1;
    f.second += l.bytes();
  }
  os << "quantization summary\n";
  print_tree(model, "", "", 0, by_name, os);
  os << "by format:\n";
  for (const auto& [format, v] : by_format) {
    os << "  " << std::left << std::setw(22) << format << std::right << std::setw(6) << v.first << " modules "
       << std::setw(14) << v.second << " B\n";
  }
  std::ostringstream mb;
  mb << std::fixed << std::setprecision(3) << size.total_mb();
  os << "total: " << size.total_bytes << " B (" << mb.str() << " MiB; parameters " << size.parameter_bytes
     << " B, buffers " << size.buffer_bytes << " B)\n";
}

}  // namespace msbnb
