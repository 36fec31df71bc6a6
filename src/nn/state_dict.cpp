// Quantized state dicts in the bitsandbytes / Hugging Face key layout (msbnb/nn/state_dict.h).
#include "msbnb/nn/state_dict.h"

#include <map>
#include <set>
#include <sstream>

#include "common.h"

namespace msbnb::nn {

namespace {

using Entries = std::map<std::string, torch::Tensor>;

void save_walk(const torch::nn::Module& m, const std::string& prefix, NamedTensors& out) {
  if (const auto* q = dynamic_cast<const QuantizedModule*>(&m)) {
    for (auto& [k, t] : q->quantized_state()) out.emplace_back(prefix + k, std::move(t));
    return;  // quantized modules have no children
  }
  for (const auto& p : m.named_parameters(/*recurse=*/false))
    out.emplace_back(prefix + p.key(), p.value().detach());
  for (const auto& b : m.named_buffers(/*recurse=*/false))
    out.emplace_back(prefix + b.key(), b.value().detach());
  for (const auto& c : m.named_children()) save_walk(*c.value(), prefix + c.key() + ".", out);
}

std::string module_label(const std::string& prefix) {
  return prefix.empty() ? std::string("(root)") : prefix.substr(0, prefix.size() - 1);
}

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

// Pass 1: which keys each module expects; refuses checkpoints of another format outright.
void key_walk(const torch::nn::Module& m, const std::string& prefix, const Entries& all,
              std::vector<std::string>& expected) {
  if (const auto* q = dynamic_cast<const QuantizedModule*>(&m)) {
    const std::vector<std::string> keys = q->quantized_state_keys();
    std::set<std::string> mine;
    for (const auto& k : keys) mine.insert(prefix + k);
    const std::string qt = q->quant_type();
    for (auto it = all.lower_bound(prefix); it != all.end() && starts_with(it->first, prefix); ++it) {
      const std::string& k = it->first;
      if (mine.count(k)) continue;
      const std::string qs = prefix + "weight.quant_state.";
      if (starts_with(k, qs)) {
        const std::string fmt = k.substr(qs.size());
        const size_t sep = fmt.find("__");
        TORCH_CHECK(false, k, ": the checkpoint holds a ",
                    sep == std::string::npos ? fmt : fmt.substr(sep + 2), " weight, expected ", qt,
                    " (module ", module_label(prefix), " is ", qt,
                    "): convert the model with that format, or quantize it again");
      }
      if (k == prefix + "SCB" && qt != "int8")
        TORCH_CHECK(false, k, ": the checkpoint holds an int8 (LLM.int8()) weight, expected ", qt,
                    " (module ", module_label(prefix), " is ", qt, ")");
    }
    for (const auto& k : keys) expected.push_back(prefix + k);
    return;
  }
  for (const auto& p : m.named_parameters(false)) expected.push_back(prefix + p.key());
  for (const auto& b : m.named_buffers(false)) expected.push_back(prefix + b.key());
  for (const auto& c : m.named_children()) key_walk(*c.value(), prefix + c.key() + ".", all, expected);
}

void copy_plain(torch::Tensor& dst, const torch::Tensor& src, const std::string& key) {
  TORCH_CHECK(src.defined(), key, ": expected a tensor, got an undefined tensor");
  TORCH_CHECK(src.device().is_cpu(), key, ": expected a CPU tensor, got device ", src.device());
  TORCH_CHECK(src.scalar_type() == dst.scalar_type(), key, ": expected dtype ", dst.scalar_type(), ", got ",
              src.scalar_type());
  TORCH_CHECK(src.sizes() == dst.sizes(), key, ": expected shape ", detail::shape_str(dst.sizes()), ", got ",
              detail::shape_str(src.sizes()));
  torch::NoGradGuard no_grad;
  dst.copy_(src);
}

// Pass 2: load what is there.
void load_walk(torch::nn::Module& m, const std::string& prefix, const Entries& all, LoadReport& rep) {
  if (auto* q = dynamic_cast<QuantizedModule*>(&m)) {
    Entries mine;
    bool complete = true;
    for (const auto& k : q->quantized_state_keys()) {
      const auto it = all.find(prefix + k);
      if (it == all.end())
        complete = false;
      else
        mine.emplace(k, it->second);
    }
    if (!complete) return;  // non-strict: left as it was, its keys reported missing
    q->load_quantized_state(mine, prefix);
    for (const auto& [k, t] : mine) rep.loaded_keys.push_back(prefix + k);
    return;
  }
  for (auto& p : m.named_parameters(false)) {
    const auto it = all.find(prefix + p.key());
    if (it == all.end()) continue;
    copy_plain(p.value(), it->second, it->first);
    rep.loaded_keys.push_back(it->first);
  }
  for (auto& b : m.named_buffers(false)) {
    const auto it = all.find(prefix + b.key());
    if (it == all.end()) continue;
    copy_plain(b.value(), it->second, it->first);
    rep.loaded_keys.push_back(it->first);
  }
  for (const auto& c : m.named_children()) load_walk(*c.value(), prefix + c.key() + ".", all, rep);
}

std::string join(const std::vector<std::string>& v) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < v.size(); ++i) o << (i ? ", " : "") << v[i];
  o << "]";
  return o.str();
}

}  // namespace

NamedTensors quantized_state_dict(const torch::nn::Module& model) {
  NamedTensors out;
  save_walk(model, "", out);
  return out;
}

LoadReport load_quantized_state_dict(torch::nn::Module& model, const NamedTensors& sd, bool strict) {
  Entries all;
  for (const auto& [k, t] : sd)
    TORCH_CHECK(all.emplace(k, t).second, "sd: expected each key once, got \"", k, "\" twice");
  std::vector<std::string> expected;
  key_walk(model, "", all, expected);
  LoadReport rep;
  const std::set<std::string> exp_set(expected.begin(), expected.end());
  for (const auto& k : expected)
    if (!all.count(k)) rep.missing_keys.push_back(k);
  for (const auto& [k, t] : sd)
    if (!exp_set.count(k)) rep.unexpected_keys.push_back(k);
  TORCH_CHECK(!strict || (rep.missing_keys.empty() && rep.unexpected_keys.empty()),
              "load_quantized_state_dict: expected the model's keys exactly (strict), got missing keys ",
              join(rep.missing_keys), " and unexpected keys ", join(rep.unexpected_keys));
  load_walk(model, "", all, rep);
  return rep;
}

}  // namespace msbnb::nn
