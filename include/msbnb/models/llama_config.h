// A LLaMA-family checkpoint's config.json as Hugging Face transformers writes it, and its
// bitsandbytes quantization_config.
//
// Both layouts in use are read: transformers 4 (rope_theta and rope_scaling at the top level,
// "torch_dtype") and transformers 5 (rope_theta and the rope type under "rope_parameters",
// "dtype"). RoPE types: "default" and "llama3" (Llama 3.1 / 3.2 frequency scaling); any other is
// refused, naming it. model_type must be "llama" (architectures, when present, must hold
// "LlamaForCausalLM"): the message names what came.
//
// quantization_config: quant_method "bitsandbytes" (transformers' BitsAndBytesConfig: 4-bit nf4 /
// fp4 with or without double quant, or LLM.int8()), or "msbnb" (msbnb's own int4 per-group
// format, which transformers cannot load). write_config_json writes what read_config parses.
//
// Every field is checked (type, range, consistency: hidden_size = heads · head_dim unless
// head_dim is given, heads divisible by key/value heads, sizes bounded so products cannot
// overflow); errors are c10::Error naming the file, the field, what was expected and what came.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace msbnb::models {

/// The quantization a checkpoint's weights are in (or should be put in when loading).
///  method        "bitsandbytes" or "msbnb"
///  format        "nf4" | "fp4" | "int8" (bitsandbytes), "int4" (msbnb)
///  double_quant  bnb_4bit_use_double_quant (nf4 / fp4), or int4's double-quantized scales
///  blocksize     nf4 / fp4 block size (bitsandbytes' 64), int4 group size (msbnb's 128)
///  compute_dtype bnb_4bit_compute_dtype: "float32", "float16" or "bfloat16"
///  threshold     llm_int8_threshold (LLM.int8() outlier threshold; bitsandbytes' 6.0)
///  skip_modules  llm_int8_skip_modules: modules kept in float (default {"lm_head"}); the
///                embeddings and norms are never quantized
struct QuantizationSpec {
  std::string method = "bitsandbytes";
  std::string format = "nf4";
  bool double_quant = false;
  int64_t blocksize = 64;
  std::string compute_dtype = "float32";
  double threshold = 6.0;
  std::vector<std::string> skip_modules = {"lm_head"};

  /// bitsandbytes nf4 / fp4 (blocksize 64, double quant as given), int8 (threshold 6) or msbnb
  /// int4 (group size 128). Throws for another format.
  static QuantizationSpec for_format(const std::string& format, bool double_quant = false);
  /// Checks the fields; throws c10::Error naming the first bad one.
  void validate() const;
  /// "nf4 + double quant (blocksize 64)", "int8 (LLM.int8(), threshold 6)", ...
  std::string describe() const;
};

/// config.json of a LlamaForCausalLM.
struct LlamaConfig {
  std::string model_type = "llama";
  std::vector<std::string> architectures = {"LlamaForCausalLM"};
  int64_t vocab_size = 32000;
  int64_t hidden_size = 4096;
  int64_t intermediate_size = 11008;
  int64_t num_hidden_layers = 32;
  int64_t num_attention_heads = 32;
  int64_t num_key_value_heads = 32;
  int64_t head_dim = 128;
  int64_t max_position_embeddings = 4096;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  /// "default" or "llama3" (then the four fields below are used).
  std::string rope_type = "default";
  double rope_factor = 1.0, rope_low_freq_factor = 1.0, rope_high_freq_factor = 4.0;
  int64_t rope_original_max_position_embeddings = 8192;
  bool attention_bias = false;
  bool mlp_bias = false;
  bool tie_word_embeddings = false;
  /// The dtype the weights were saved in ("float32", "float16", "bfloat16").
  std::string torch_dtype = "float32";
  std::optional<int64_t> bos_token_id, eos_token_id, pad_token_id;
  /// config.json's quantization_config, if it has one.
  std::optional<QuantizationSpec> quantization;

  /// Checks every field (see the top of this header); `source` names the file in messages.
  void validate(const std::string& source = "config.json") const;
  /// Parameters of the whole model (embeddings, linears, norms; a tied lm_head once).
  int64_t parameter_count() const;
  /// Parameters of the linear layers of the decoder (the ones that are quantized).
  int64_t linear_parameter_count() const;
};

/// Parses config.json text (strict JSON: duplicate keys refused); `source` names it in messages.
LlamaConfig parse_config(const std::string& json_text, const std::string& source = "config.json");
/// Reads `path`: a config.json file or a checkpoint folder holding one.
LlamaConfig read_config(const std::string& path);
/// config.json text in the transformers 5 layout (rope_parameters, dtype) with the
/// transformers 4 fields beside it (rope_theta, torch_dtype) so both read it; with a
/// quantization_config when `config.quantization` is set. Sorted keys, indent 2.
std::string config_json(const LlamaConfig& config);

}  // namespace msbnb::models
