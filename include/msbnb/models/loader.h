// Hugging Face checkpoint folders for LlamaForCausalLM: loading (float, or quantized while
// loading, or saved quantized by transformers + bitsandbytes / by msbnb), and quantizing a
// folder into a new one without ever holding the float model.
//
// A folder holds config.json and either model.safetensors or model.safetensors.index.json with
// the shards its weight_map names (file names only, in the folder). Float weights may be
// float32, float16 or bfloat16; the model computes in float32.
//
// Memory. load_pretrained builds the quantized layers directly (their packed buffers only) and
// fills them one tensor at a time from the memory-mapped files, releasing each tensor's pages
// once it is consumed: the peak is the quantized model plus one float tensor, never the float
// model. quantize_checkpoint streams the same way and writes its output in shards, so its peak
// is one output shard plus one float tensor.
//
// Output layout (quantize_checkpoint): what transformers' save_pretrained writes for a
// bitsandbytes model (nn::quantized_state_dict's keys, DESIGN.md "Checkpoint keys"): config.json
// with a quantization_config, model.safetensors or model-0000k-of-0000N.safetensors +
// model.safetensors.index.json ({"metadata": {"total_size"}, "weight_map"}); the tokenizer
// files are copied. transformers' from_pretrained loads nf4 / fp4 / int8 folders back; int4
// (quant_method "msbnb") is msbnb's own. Everything is first written in a temporary folder
// beside OUT_DIR, which is renamed to OUT_DIR at the end: OUT_DIR appears complete or not at all.
//
// Errors are c10::Error naming the file and the tensor or field: a corrupted or unsupported
// config.json, a missing shard, an index naming files outside the folder, a tensor missing,
// unexpected, or of the wrong shape or dtype, a non-finite weight.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "msbnb/functional/matmul.h"
#include "msbnb/io/safetensors.h"
#include "msbnb/models/llama.h"
#include "msbnb/models/llama_config.h"

namespace msbnb::models {

/// Progress of long work: `done` of `total` units (tensors), `what` the current one.
using Progress = std::function<void(int64_t done, int64_t total, const std::string& what)>;

/// The safetensors files of a checkpoint folder, opened (memory-mapped) and cross-checked
/// against the index: every tensor name maps to the one file that holds it.
class CheckpointFiles {
 public:
  /// Opens `dir`/model.safetensors, or the shards of `dir`/model.safetensors.index.json.
  static CheckpointFiles open(const std::string& dir);
  /// Tensor names, in the order to stream them (model.layers.<i> by i, then the others).
  const std::vector<std::string>& names() const { return names_; }
  bool has(const std::string& name) const { return where_.count(name) != 0; }
  const io::TensorEntry& info(const std::string& name) const;
  torch::Tensor get(const std::string& name) const;
  void release(const std::string& name) const;
  /// The files, in index order.
  std::vector<std::string> paths() const;
  /// Sum of the tensors' bytes.
  int64_t total_bytes() const;

 private:
  std::vector<io::SafetensorsFile> files_;
  std::map<std::string, size_t> where_;
  std::vector<std::string> names_;
  const io::SafetensorsFile& file_of(const std::string& name) const;
};

/// The factory that builds the layers of `spec` (Linear4bit nf4 / fp4 / int4, Linear8bit), and
/// torch::nn::Linear for the modules `spec.skip_modules` matches (convert.h's matching rules).
LinearFactory quantized_linear_factory(const QuantizationSpec& spec);

/// load_pretrained's options.
///  quantize   quantize float weights while loading (layer by layer); ignored for a checkpoint
///             that is already quantized (its own format is used)
///  adapter    a PEFT adapter folder to attach (msbnb::lora::load_adapter: injects the LoRA
///             layers its adapter_config.json targets and loads them)
///  progress   called after every tensor
///  matmul_path  the 4-bit layers' MatmulPath (set_matmul_path); automatic is exact
struct LoadOptions {
  std::optional<QuantizationSpec> quantize;
  MatmulPath matmul_path = MatmulPath::automatic;
  std::string adapter;
  Progress progress;
};

/// A loaded model and what it is.
///  quantization  the format of its linears (from the checkpoint or LoadOptions::quantize);
///                empty for float
///  file_bytes    bytes of the checkpoint's tensors on disk
///  model_bytes   bytes of the model's parameters and buffers in memory (a tied weight once)
///  linear_bytes  of which the decoder's and lm_head's linear layers (what decoding reads)
struct LoadedModel {
  LlamaForCausalLM model{nullptr};
  LlamaConfig config;
  std::string dir;
  std::optional<QuantizationSpec> quantization;
  int64_t file_bytes = 0, model_bytes = 0, linear_bytes = 0;
  double seconds = 0;
};

/// Loads the checkpoint folder `dir` (rules at the top of this header). The model is in eval().
LoadedModel load_pretrained(const std::string& dir, const LoadOptions& options = {});

/// Sets the forward MatmulPath of every nn::Linear4bit in `module` (docs/matmul.md): automatic /
/// exact, fast (bf16 operands), or int8 (int8 activations per block: the fastest decode, as
/// llama.cpp's q8 activations). Returns the number of layers changed. LLM.int8() layers keep theirs.
int64_t set_matmul_path(torch::nn::Module& module, MatmulPath path);

/// "auto" | "exact" | "fast" | "int8" -> MatmulPath (throws naming `what` for another value).
MatmulPath parse_matmul_path(const std::string& value, const std::string& what = "matmul_path");

/// Bytes of the weights a forward of one token reads: every parameter and buffer but the norms'
/// and, unless tied to lm_head, the embedding table (one row of it is read).
int64_t linear_bytes(const LlamaForCausalLMImpl& model);

/// Bytes of a module's parameters and buffers, each tensor counted once.
int64_t module_bytes(const torch::nn::Module& module);

/// One tensor of quantize_checkpoint's output.
struct QuantizedTensorReport {
  std::string name;    // the float tensor ("model.layers.0.self_attn.q_proj.weight")
  std::string format;  // "nf4", ..., or the dtype it was kept in ("bfloat16")
  std::vector<int64_t> shape;
  int64_t bytes_before = 0, bytes_after = 0;
};

/// What quantize_checkpoint did.
struct QuantizeReport {
  QuantizationSpec spec;
  std::vector<QuantizedTensorReport> tensors;
  std::vector<std::string> files;  // written, in OUT_DIR
  int64_t bytes_before = 0, bytes_after = 0;
  int64_t quantized_parameters = 0, kept_parameters = 0;
  double seconds = 0;
};

/// quantize_checkpoint's options.
///  spec            the format (QuantizationSpec::for_format)
///  max_shard_bytes output shards of at most about this size (one tensor may exceed it);
///                  everything fits in one: model.safetensors, no index
struct QuantizeOptions {
  QuantizationSpec spec;
  int64_t max_shard_bytes = int64_t{1} << 30;
  Progress progress;
};

/// Quantizes the float checkpoint folder `in_dir` into the new folder `out_dir` (which must not
/// exist, or be empty). The decoder's linear weights are quantized unless spec.skip_modules
/// matches them; every other tensor (embeddings, norms, biases, lm_head by default) is copied in
/// its dtype.
QuantizeReport quantize_checkpoint(const std::string& in_dir, const std::string& out_dir,
                                   const QuantizeOptions& options);

}  // namespace msbnb::models
