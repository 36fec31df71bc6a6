// Embedding8bit and Embedding4bit (msbnb/nn/embedding.h).
#include "msbnb/nn/embedding.h"

#include <algorithm>
#include <cstring>

#include "common.h"
#include "msbnb/functional/matmul.h"
#include "msbnb/kernels/ops.h"

namespace msbnb::nn {

namespace {

// indices as a flat int64 tensor, every value in [0, num).
torch::Tensor checked_indices(const torch::Tensor& indices, int64_t num) {
  TORCH_CHECK(indices.defined(), "indices: expected a tensor, got an undefined tensor");
  TORCH_CHECK(indices.device().is_cpu(), "indices: expected a CPU tensor, got device ", indices.device());
  TORCH_CHECK(c10::isIntegralType(indices.scalar_type(), /*includeBool=*/false),
              "indices: expected an integer dtype (int64 or int32), got ", indices.scalar_type());
  const torch::Tensor idx = indices.to(torch::kLong).contiguous().reshape({-1});
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < num, "indices: expected values in [0, ", num, ") (num_embeddings), got ",
                p[i], " at flat position ", i);
  return idx;
}

std::vector<int64_t> out_shape(const torch::Tensor& indices, int64_t dim) {
  std::vector<int64_t> s = indices.sizes().vec();
  s.push_back(dim);
  return s;
}

void check_sizes(int64_t num, int64_t dim) {
  detail::check_positive(num, "num_embeddings");
  detail::check_positive(dim, "embedding_dim");
  detail::checked_mul(num, dim, "num_embeddings * embedding_dim");
}

void set_buffer(torch::Tensor& buffer, const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == buffer.scalar_type() && t.sizes() == buffer.sizes(),
              "internal error: ", name, " ", t.scalar_type(), detail::shape_str(t.sizes()),
              " does not match the buffer ", buffer.scalar_type(), detail::shape_str(buffer.sizes()));
  torch::NoGradGuard no_grad;
  buffer.set_data(t.detach().contiguous().clone());
}

int64_t module_bytes(const torch::nn::Module& m) {
  int64_t n = 0;
  for (const auto& p : m.parameters(false)) n += detail::tensor_bytes(p);
  for (const auto& b : m.buffers(false)) n += detail::tensor_bytes(b);
  return n;
}

void check_weight_format(const std::map<std::string, torch::Tensor>& entries, const std::string& prefix) {
  const torch::Tensor& fmt = detail::entry(entries, "weight_format", prefix);
  TORCH_CHECK(fmt.defined() && fmt.numel() == 1 && fmt.dim() <= 1 && !fmt.is_floating_point(), prefix,
              "weight_format: expected an integer scalar (0: \"row\"), got ",
              fmt.defined() ? detail::shape_str(fmt.sizes()) : "undefined");
  TORCH_CHECK(fmt.item<int64_t>() == 0, prefix, "weight_format: expected 0 (\"row\"), got ",
              fmt.item<int64_t>());
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Embedding8bit

Embedding8bitOptions::Embedding8bitOptions(int64_t num_embeddings, int64_t embedding_dim)
    : num_embeddings_(num_embeddings), embedding_dim_(embedding_dim) {}

Embedding8bitImpl::Embedding8bitImpl(const Embedding8bitOptions& options_) : options(options_) {
  check_sizes(options.num_embeddings(), options.embedding_dim());
  detail::check_float_dtype(options.dtype(), "dtype");
  reset();
}

void Embedding8bitImpl::reset() {
  weight = register_buffer("weight",
                           torch::zeros({options.num_embeddings(), options.embedding_dim()}, torch::kInt8));
  SCB = register_buffer("SCB", torch::zeros({options.num_embeddings()}, torch::kFloat32));
}

void Embedding8bitImpl::pretty_print(std::ostream& stream) const {
  stream << "msbnb::nn::Embedding8bit(num_embeddings=" << options.num_embeddings()
         << ", embedding_dim=" << options.embedding_dim() << ")";
}

torch::Tensor Embedding8bitImpl::forward(const torch::Tensor& indices) {
  const torch::Tensor idx = checked_indices(indices, options.num_embeddings());
  // bitsandbytes' Embedding8bit: rows * (row_stats / 127), only the looked-up rows.
  const torch::Tensor rows = weight.index_select(0, idx).to(torch::kFloat32);
  const torch::Tensor stats = SCB.index_select(0, idx).unsqueeze(1);
  return (rows * (stats / 127.0)).reshape(out_shape(indices, options.embedding_dim())).to(options.dtype());
}

void Embedding8bitImpl::quantize_weights(const torch::Tensor& w) {
  detail::check_weight(w, options.num_embeddings(), options.embedding_dim(), "num_embeddings",
                       "embedding_dim");
  const Int8VectorwiseQuant q = int8_vectorwise_quant(w.detach(), 0.0);
  set_buffer(weight, q.CB, "CB");
  set_buffer(SCB, q.SCB, "SCB");
}

torch::Tensor Embedding8bitImpl::dequantize_weights() const {
  return weight.to(torch::kFloat32) * (SCB / 127.0).unsqueeze(1);
}

Embedding8bit Embedding8bitImpl::from_embedding(const torch::nn::Embedding& embedding) {
  TORCH_CHECK(!embedding.is_empty(), "embedding: expected a torch::nn::Embedding, got an empty holder");
  const torch::Tensor& w = embedding->weight;
  Embedding8bit m(Embedding8bitOptions(w.size(0), w.size(1)).dtype(w.scalar_type()));
  m->quantize_weights(w.detach());
  return m;
}

int64_t Embedding8bitImpl::memory_bytes() const { return module_bytes(*this); }

std::vector<std::string> Embedding8bitImpl::quantized_state_keys() const {
  return {"weight", "SCB", "weight_format"};
}

NamedTensors Embedding8bitImpl::quantized_state() const {
  return {{"weight", weight.detach().clone()},
          {"SCB", SCB.detach().clone()},
          {"weight_format", torch::zeros({}, torch::kUInt8)}};
}

void Embedding8bitImpl::load_quantized_state(const std::map<std::string, torch::Tensor>& entries,
                                             const std::string& prefix) {
  const int64_t num = options.num_embeddings(), dim = options.embedding_dim();
  const torch::Tensor& cb = detail::entry(entries, "weight", prefix);
  detail::check_entry(cb, prefix + "weight", torch::kInt8, {num, dim});
  const torch::Tensor& scb = detail::entry(entries, "SCB", prefix);
  detail::check_entry(scb, prefix + "SCB", torch::kFloat32, {num});
  detail::check_entry_finite(scb, prefix + "SCB");
  TORCH_CHECK(scb.min().item<float>() >= 0, prefix, "SCB: expected row absmax values >= 0, got ",
              scb.min().item<float>());
  check_weight_format(entries, prefix);
  set_buffer(weight, cb, "weight");
  set_buffer(SCB, scb, "SCB");
}

void Embedding8bitImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  detail::check_to_device(device, "msbnb::nn::Embedding8bit");
  to(dtype, non_blocking);
}
void Embedding8bitImpl::to(torch::Dtype dtype, bool non_blocking) {
  detail::check_to_dtype(dtype, "msbnb::nn::Embedding8bit");
}
void Embedding8bitImpl::to(torch::Device device, bool non_blocking) {
  detail::check_to_device(device, "msbnb::nn::Embedding8bit");
}

// ---------------------------------------------------------------------------------------------
// Embedding4bit

Embedding4bitOptions::Embedding4bitOptions(int64_t num_embeddings, int64_t embedding_dim)
    : num_embeddings_(num_embeddings), embedding_dim_(embedding_dim) {}

int64_t Embedding4bitOptions::effective_blocksize() const {
  return Quantize4bitOptions().quant_type(quant_type_).blocksize(blocksize_).effective_blocksize();
}

Embedding4bitImpl::Embedding4bitImpl(const Embedding4bitOptions& options_) : options(options_) {
  check_sizes(options.num_embeddings(), options.embedding_dim());
  detail::check_4bit_options(options.quant_type(), options.effective_blocksize(), options.symmetric());
  detail::check_float_dtype(options.dtype(), "dtype");
  reset();
}

void Embedding4bitImpl::reset() {
  const int64_t num = options.num_embeddings(), dim = options.embedding_dim(),
                bs = options.effective_blocksize();
  const bool nested = options.compress_statistics();
  const auto u8 = torch::kUInt8;
  data_ = absmax_ = quant_map_ = zero_point_ = nested_absmax_ = nested_quant_map_ = nested_offset_ =
      torch::Tensor();
  int64_t count = 0;
  if (options.quant_type() == "int4") {
    const int64_t groups = detail::ceil_div(dim, bs);
    count = num * groups;
    data_ = register_buffer("weight", torch::zeros({num, (dim + 1) / 2}, u8));
    absmax_ = register_buffer(
        "weight_absmax", nested ? torch::zeros({count}, u8) : torch::zeros({num, groups}, torch::kFloat32));
    if (!options.symmetric())
      zero_point_ = register_buffer("weight_zero_point", torch::zeros({num, groups}, u8));
  } else {
    const int64_t n = num * dim;
    count = detail::ceil_div(n, bs);
    data_ = register_buffer("weight", torch::zeros({(n + 1) / 2, 1}, u8));
    absmax_ = register_buffer("weight_absmax", torch::zeros({count}, nested ? u8 : torch::kFloat32));
    quant_map_ = register_buffer("weight_quant_map", detail::codebook(options.quant_type()).clone());
  }
  if (nested) {
    nested_absmax_ =
        register_buffer("weight_nested_absmax",
                        torch::zeros({detail::ceil_div(count, detail::kNestedBlocksize)}, torch::kFloat32));
    nested_quant_map_ = register_buffer("weight_nested_quant_map", detail::dynamic_map().clone());
    nested_offset_ = register_buffer("weight_nested_offset", torch::zeros({}, torch::kFloat32));
  }
}

void Embedding4bitImpl::pretty_print(std::ostream& stream) const {
  stream << "msbnb::nn::Embedding4bit(num_embeddings=" << options.num_embeddings()
         << ", embedding_dim=" << options.embedding_dim() << ", quant_type=" << options.quant_type()
         << ", blocksize=" << options.effective_blocksize();
  if (!options.symmetric()) stream << ", symmetric=false";
  stream << ")";
}

QuantState Embedding4bitImpl::state() const {
  QuantState s;
  s.quant_type = options.quant_type();
  s.shape = {options.num_embeddings(), options.embedding_dim()};
  s.dtype = torch::kFloat32;
  s.blocksize = options.effective_blocksize();
  s.absmax = absmax_;
  s.code = quant_map_;
  s.zero_point = zero_point_;
  if (options.compress_statistics()) {
    s.offset = nested_offset_;
    auto s2 = std::make_shared<QuantState>();
    s2->quant_type = "dynamic8";
    s2->shape = {absmax_.numel()};
    s2->dtype = torch::kFloat32;
    s2->blocksize = detail::kNestedBlocksize;
    s2->absmax = nested_absmax_;
    s2->code = nested_quant_map_;
    s.state2 = std::move(s2);
  }
  return s;
}

void Embedding4bitImpl::set_quantized(const Quantized4bit& q) {
  const QuantState& s = q.state;
  TORCH_CHECK(s.nested() == options.compress_statistics(), "internal error: double quantization mismatch");
  // Validate every shape before changing anything.
  const std::vector<std::pair<torch::Tensor*, torch::Tensor>> pairs = [&] {
    std::vector<std::pair<torch::Tensor*, torch::Tensor>> v = {{&data_, q.data}, {&absmax_, s.absmax}};
    if (quant_map_.defined()) v.emplace_back(&quant_map_, s.code);
    if (zero_point_.defined()) v.emplace_back(&zero_point_, s.zero_point);
    if (s.nested()) {
      v.emplace_back(&nested_absmax_, s.state2->absmax);
      v.emplace_back(&nested_quant_map_, s.state2->code);
      v.emplace_back(&nested_offset_, s.offset.reshape({}));
    }
    return v;
  }();
  for (const auto& [buf, t] : pairs)
    TORCH_CHECK(t.defined() && t.scalar_type() == buf->scalar_type() && t.sizes() == buf->sizes(),
                "Embedding4bit: internal error: quantized tensor ",
                t.defined() ? detail::shape_str(t.sizes()) : "undefined", " does not match the buffer ",
                detail::shape_str(buf->sizes()));
  for (const auto& [buf, t] : pairs) set_buffer(*buf, t, "tensor");
}

torch::Tensor Embedding4bitImpl::forward(const torch::Tensor& indices) {
  const torch::Tensor idx = checked_indices(indices, options.num_embeddings());
  const int64_t dim = options.embedding_dim(), bs = options.effective_blocksize();
  const QuantState s = state();
  // Float32 statistics of the blocks [b0, b1) a row needs. Double quantization is undone for the
  // nested blocks that cover them only, exactly as dequantize_4bit does it (the dynamic-map
  // kernel, then + offset in float32).
  const int64_t nstats = absmax_.numel();
  std::vector<float> nested_tmp;
  const auto stats_for = [&](int64_t b0, int64_t b1) -> const float* {
    if (!s.nested()) return absmax_.data_ptr<float>() + b0;
    const int64_t nb = detail::kNestedBlocksize, n0 = b0 / nb * nb,
                  n1 = std::min(detail::ceil_div(b1, nb) * nb, nstats);
    nested_tmp.resize(static_cast<size_t>(n1 - n0));
    kernels::dequantize_lut8(absmax_.data_ptr<uint8_t>() + n0, n1 - n0, nb,
                             nested_absmax_.data_ptr<float>() + n0 / nb, nested_quant_map_.data_ptr<float>(),
                             nested_tmp.data());
    const float offset = nested_offset_.item<float>();
    for (float& v : nested_tmp) v = v + offset;
    return nested_tmp.data() + (b0 - n0);
  };
  const uint8_t* data = data_.data_ptr<uint8_t>();
  const int64_t count = idx.numel();
  torch::Tensor out = torch::empty({count, dim}, torch::kFloat32);
  float* po = out.data_ptr<float>();
  const int64_t* pi = idx.data_ptr<int64_t>();
  if (options.quant_type() == "int4") {
    const int64_t groups = detail::ceil_div(dim, bs), row_bytes = (dim + 1) / 2;
    std::vector<int32_t> zp(static_cast<size_t>(groups));
    for (int64_t i = 0; i < count; ++i) {
      const int64_t r = pi[i];
      if (zero_point_.defined()) {
        const uint8_t* z = zero_point_.data_ptr<uint8_t>() + r * groups;
        for (int64_t g = 0; g < groups; ++g) zp[static_cast<size_t>(g)] = z[g];
      }
      kernels::dequantize_int4(data + r * row_bytes, 1, dim, bs, stats_for(r * groups, (r + 1) * groups),
                               zero_point_.defined() ? zp.data() : nullptr, po + i * dim);
    }
  } else {
    // A row is a range of the flattened table; decode the whole blocks that cover it (their first
    // element is even, so they start on a byte) and copy the row out.
    const int64_t n = options.num_embeddings() * dim;
    const float* code = quant_map_.data_ptr<float>();
    std::vector<float> tmp;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t e0 = pi[i] * dim, e1 = e0 + dim;
      const int64_t b0 = e0 / bs, start = b0 * bs, stop = std::min(detail::ceil_div(e1, bs) * bs, n);
      tmp.resize(static_cast<size_t>(stop - start));
      kernels::dequantize_lut4(data + start / 2, stop - start, bs, stats_for(b0, detail::ceil_div(stop, bs)),
                               code, tmp.data());
      std::memcpy(po + i * dim, tmp.data() + (e0 - start), static_cast<size_t>(dim) * sizeof(float));
    }
  }
  return out.reshape(out_shape(indices, dim)).to(options.dtype());
}

void Embedding4bitImpl::quantize_weights(const torch::Tensor& w) {
  detail::check_weight(w, options.num_embeddings(), options.embedding_dim(), "num_embeddings",
                       "embedding_dim");
  set_quantized(quantize_4bit(w.detach(), Quantize4bitOptions()
                                              .quant_type(options.quant_type())
                                              .blocksize(options.effective_blocksize())
                                              .compress_statistics(options.compress_statistics())
                                              .symmetric(options.symmetric())));
  weight_dtype_ = w.scalar_type();
}

torch::Tensor Embedding4bitImpl::dequantize_weights() const { return dequantize_4bit(data_, state()); }

Embedding4bit Embedding4bitImpl::from_embedding(const torch::nn::Embedding& embedding,
                                                std::optional<Embedding4bitOptions> options_) {
  TORCH_CHECK(!embedding.is_empty(), "embedding: expected a torch::nn::Embedding, got an empty holder");
  const torch::Tensor& w = embedding->weight;
  Embedding4bitOptions o = options_.value_or(Embedding4bitOptions(w.size(0), w.size(1)));
  o.num_embeddings(w.size(0)).embedding_dim(w.size(1)).dtype(w.scalar_type());
  Embedding4bit m(o);
  m->quantize_weights(w.detach());
  return m;
}

int64_t Embedding4bitImpl::memory_bytes() const { return module_bytes(*this); }

std::vector<std::string> Embedding4bitImpl::quantized_state_keys() const {
  return detail::keys_4bit(options.quant_type(), options.compress_statistics(), !options.symmetric());
}

NamedTensors Embedding4bitImpl::quantized_state() const {
  Quantized4bit q;
  q.data = data_;
  q.state = state();
  return detail::state_4bit(q, weight_dtype_, options.symmetric());
}

void Embedding4bitImpl::load_quantized_state(const std::map<std::string, torch::Tensor>& entries,
                                             const std::string& prefix) {
  torch::Dtype wdt = torch::kFloat32;
  const Quantized4bit q = detail::load_4bit(
      entries, prefix, options.quant_type(), options.effective_blocksize(), options.compress_statistics(),
      options.symmetric(), options.num_embeddings(), options.embedding_dim(), &wdt);
  set_quantized(q);
  weight_dtype_ = wdt;
}

void Embedding4bitImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  detail::check_to_device(device, "msbnb::nn::Embedding4bit");
  to(dtype, non_blocking);
}
void Embedding4bitImpl::to(torch::Dtype dtype, bool non_blocking) {
  detail::check_to_dtype(dtype, "msbnb::nn::Embedding4bit");
}
void Embedding4bitImpl::to(torch::Device device, bool non_blocking) {
  detail::check_to_device(device, "msbnb::nn::Embedding4bit");
}

}  // namespace msbnb::nn
