// Memory accounting for training on the CPU: a counting CPU allocator (libtorch's CPU allocator
// keeps no statistics) and byte counts of a model's and an optimizer's tensors.
//
// CpuMemoryCounter installs, for its lifetime, a counting CPU allocator (c10::SetCPUAllocator;
// it allocates with c10::alloc_cpu as libtorch's default allocator does) that counts the bytes
// of every tensor storage allocated while it is installed, and subtracts them when that storage is freed
// (even after the counter is gone: the counting deleter stays with the storage). It reports the live bytes
// and the peak since it was installed (or since reset_peak()), relative to what was live at that moment.
// Storage allocated before it was installed is not seen (its later frees do not count either), so measure the
// tensors that already exist (weights, optimizer state) with module_bytes / optimizer_state_bytes and the
// rest (activations, gradients, temporaries) with the counter. Not counted: memory that does not come from
// torch's CPU allocator (the BLAS library's and msbnb's kernels' scratch buffers, std::vector inside ops, the
// autograd graph's nodes).
//
// One counter at a time (a second one throws); installing is not thread-safe against threads
// allocating at that moment (as c10::SetCPUAllocator), counting is.
#pragma once
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/types.h>

#include <cstdint>

namespace c10 {
struct Allocator;
}

namespace msbnb::train {

/// RAII: counts CPU tensor allocations while alive (rules at the top of this header).
/// Example:
///   msbnb::train::CpuMemoryCounter counter;
///   loss = model->forward(x).sum(); loss.backward();
///   std::cout << counter.peak_bytes() << " bytes at the peak\n";
class CpuMemoryCounter {
 public:
  /// Installs the counting allocator. Throws c10::Error if another counter is installed.
  CpuMemoryCounter();
  /// Puts the previous CPU allocator back.
  ~CpuMemoryCounter();
  CpuMemoryCounter(const CpuMemoryCounter&) = delete;
  CpuMemoryCounter& operator=(const CpuMemoryCounter&) = delete;

  /// Bytes allocated since construction and not yet freed (may go below 0 when storage counted
  /// by an earlier counter is freed).
  int64_t live_bytes() const;
  /// The largest live_bytes() since construction or the last reset_peak().
  int64_t peak_bytes() const;
  /// Sets the peak to the current live bytes.
  void reset_peak();
  /// Number of allocations since construction.
  int64_t allocations() const;

 private:
  c10::Allocator* previous_ = nullptr;
  int64_t base_live_ = 0, base_allocations_ = 0;
};

/// Bytes of a tensor's elements (numel · element size; 0 for an undefined tensor).
int64_t tensor_bytes(const torch::Tensor& t);

/// Bytes of a model's tensors, split by role: parameters that require grad, parameters that
/// do not (frozen), and buffers (quantized codes and statistics, norms' running stats).
struct ModuleBytes {
  int64_t trainable = 0, frozen = 0, buffers = 0;
  int64_t total() const { return trainable + frozen + buffers; }
};
ModuleBytes module_bytes(const torch::nn::Module& module);

/// Bytes of the state tensors an optimizer keeps (moments, their quantization statistics,
/// step counters stored as tensors), found by serializing each parameter's state
/// (OptimizerParamState::serialize) and adding up the tensors written. 0 before the first step.
int64_t optimizer_state_bytes(const torch::optim::Optimizer& optimizer);

}  // namespace msbnb::train
