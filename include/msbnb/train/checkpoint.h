// Activation (gradient) checkpointing: run a block of a model without keeping its activations,
// and recompute them in backward. Per decoder block, training memory becomes the weights +
// adapters + optimizer state + the block inputs + ONE block's activations (during its
// recomputation) instead of every block's activations.
//
// How it works (PyTorch's reentrant torch.utils.checkpoint, in C++). checkpoint(fn, x) is a
// torch::autograd::Function:
//  - forward runs fn(x) with grad mode off and saves only x (and the CPU generator's state);
//  - backward restores that generator state, re-runs fn on x.detach() (requiring grad when x
//    did) with grad mode on, backpropagates grad_out through the recomputed graph
//    (torch::autograd::backward, reentrant in the engine) and returns x's gradient. The
//    parameters used inside fn get their .grad accumulated by that inner backward, exactly as
//    without checkpointing; frozen parameters and the quantized layers' buffers (which never
//    require grad) get none. Gradients flow into x through frozen quantized layers by their own
//    backward (msbnb::nn::Linear4bit's fused transposed product).
//
// Equality. The recomputation runs the same ops on the same inputs, so its values, and the
// gradients, are bit-identical to those without checkpointing when the ops are deterministic
// (CPU ops at a fixed thread count are). Randomness inside fn (dropout): the default CPU
// generator's state is saved before fn and restored for the recomputation (and put back
// afterwards), so the recomputed dropout masks are the forward's (preserve_rng_state, default
// true). With preserve_rng_state(false) dropout inside fn must be 0 or the gradients are wrong.
// Other generators (a torch::Generator passed explicitly) are not saved.
//
// Rules for fn:
//  - it must return a new tensor computed from x (not x itself or a view of it), and must not
//    modify x in place;
//  - it must not depend on state that changes between forward and backward (train() / eval()
//    of its modules, weights updated before backward);
//  - it is called twice (forward and backward); side effects happen twice.
// When x does not require grad (the first block's input when the embeddings are frozen, as in
// QLoRA), the output still gets a grad_fn (through an internal anchor tensor), so parameters
// inside fn receive gradients. When grad mode is off (evaluation), checkpoint(fn, x) is fn(x).
// Double backward (create_graph = true) through a checkpoint throws.
//
// Errors: c10::Error for an empty fn, an undefined x, fn returning an undefined tensor or x
// itself, and for double backward.
#pragma once
#include <torch/arg.h>
#include <torch/types.h>

#include <functional>

namespace msbnb::train {

/// A block to checkpoint: x -> y.
using CheckpointFn = std::function<torch::Tensor(const torch::Tensor&)>;

/// Options of checkpoint().
///  preserve_rng_state  save the default CPU generator's state before fn and restore it for the
///                      recomputation (dropout masks identical); costs one copy of the
///                      generator state (about 5 KB) per call. Default true (as PyTorch).
struct CheckpointOptions {
  TORCH_ARG(bool, preserve_rng_state) = true;
};

/// fn(x), keeping only x for backward and recomputing fn's activations there (rules at the top
/// of this header). Any shape and dtype; the result is fn's.
/// Example (a decoder's blocks):
///   for (auto& block : blocks)
///     h = msbnb::train::checkpoint([&](const torch::Tensor& t) { return block->forward(t); }, h);
torch::Tensor checkpoint(const CheckpointFn& fn, const torch::Tensor& x,
                         const CheckpointOptions& options = {});

}  // namespace msbnb::train
