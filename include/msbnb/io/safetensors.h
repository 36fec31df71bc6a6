// safetensors files for libtorch: reading (memory-mapped, zero-copy) and writing (atomic).
//
// Reading maps the file (MAP_PRIVATE, copy-on-write) and validates its header completely before
// any tensor is made (msbnb/io/safetensors_format.h lists every check). A tensor whose data is
// aligned for its dtype is a view of the mapping (torch::from_blob), and keeps the mapping
// alive: the SafetensorsFile may be destroyed before its tensors. Writing into such a tensor
// changes private pages only, never the file; but every get() of that tensor from the same
// SafetensorsFile (or load_safetensors call) views the same pages: clone() for an independent
// copy. Misaligned data (a foreign writer that did not pad its header) is copied. BOOL data is
// checked to be 0 / 1.
//
// Every error (malformed file, I/O, bad arguments) is a c10::Error naming the file and, where
// one is concerned, the tensor: what was expected and what came.
//
// A file replaced while mapped is harmless when the writer renames a new file over it (as
// save_safetensors does); a file truncated in place while mapped makes access to the lost pages
// raise SIGBUS, as with every mmap reader.
#pragma once
#include <torch/ordered_dict.h>
#include <torch/types.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "msbnb/io/safetensors_format.h"

namespace msbnb::io {

/// The torch dtype of a safetensors dtype; throws c10::Error for those libtorch 1.13 lacks
/// (U16, U32, U64, F8_*, F6_*, F4).
torch::ScalarType to_scalar_type(StDtype d);
/// The safetensors dtype of a torch dtype (bool, uint8, int8, int16, int32, int64, float16,
/// bfloat16, float32, float64, complex64); throws c10::Error for the others.
StDtype from_scalar_type(torch::ScalarType t);

/// An open, validated safetensors file. Copies share the mapping.
class SafetensorsFile {
 public:
  /// Maps `path` and validates it. Throws c10::Error (missing file, malformed header, ...).
  static SafetensorsFile open(const std::string& path);
  /// The same over bytes in memory (a copy is kept); `source` names them in messages.
  static SafetensorsFile from_bytes(std::string bytes, const std::string& source = "<memory>");

  const std::string& path() const;
  /// Tensor names, sorted.
  std::vector<std::string> names() const;
  size_t size() const;
  bool has(const std::string& name) const;
  /// dtype, shape and byte span (relative to the data section); throws if `name` is absent.
  const TensorEntry& info(const std::string& name) const;
  /// The tensor `name` on the CPU, contiguous: a view of the mapping when its data is aligned
  /// for its dtype, else a copy. Throws if `name` is absent or its dtype unsupported.
  torch::Tensor get(const std::string& name) const;
  /// Drops this process's resident pages of tensor `name`'s data (madvise MADV_DONTNEED on the
  /// whole pages inside its span; a no-op for from_bytes). Streaming readers call it once a
  /// tensor is consumed, so memory stays at one tensor however large the file. Views from get()
  /// stay valid (they read the file again); what was written into them is lost.
  void release(const std::string& name) const;
  /// __metadata__ (empty if the file has none).
  const std::map<std::string, std::string>& metadata() const;
  const SafetensorsHeader& header() const;

 private:
  struct Impl;
  explicit SafetensorsFile(std::shared_ptr<const Impl> impl);
  std::shared_ptr<const Impl> impl_;
};

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

/// Every tensor of `path`, sorted by name (views of the mapping, see SafetensorsFile::get);
/// its __metadata__ into `*metadata` when given.
NamedTensors load_safetensors(const std::string& path,
                              std::map<std::string, std::string>* metadata = nullptr);

/// Writes `tensors` and `metadata` to `path` atomically (msbnb/io/atomic_file.h: the previous
/// file stays intact on any failure or crash). Tensors must be on the CPU with a dtype
/// safetensors and libtorch share; non-contiguous ones are written as if made contiguous.
/// Names must be unique, non-empty and not "__metadata__". As the Python writer does, data are
/// laid out by element size, largest first, then by name: with the header padded to 8, every
/// tensor's data is aligned for its dtype and the data section has no holes.
void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {});
/// module->named_parameters() / named_buffers() as NamedTensors, for save_safetensors (an
/// overload taking the OrderedDict would make a braced list of pairs ambiguous).
NamedTensors to_named_tensors(const torch::OrderedDict<std::string, torch::Tensor>& tensors);
/// The bytes save_safetensors writes, in memory.
std::string serialize_safetensors(const NamedTensors& tensors,
                                  const std::map<std::string, std::string>& metadata = {});

}  // namespace msbnb::io
