#include "msbnb/train/checkpoint.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <mutex>
#include <utility>

namespace msbnb::train {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The block, kept in the autograd context until backward (saved_data holds IValues: a capsule
// carries any CustomClassHolder).
struct FnHolder : torch::CustomClassHolder {
  explicit FnHolder(CheckpointFn f) : fn(std::move(f)) {}
  CheckpointFn fn;
};

at::Tensor get_cpu_rng_state() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_cpu_rng_state(const at::Tensor& state) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

torch::Tensor run_checked(const CheckpointFn& fn, const torch::Tensor& x) {
  torch::Tensor y = fn(x);
  TORCH_CHECK(y.defined(),
              "checkpoint: fn returned an undefined tensor; expected fn(x) to return its output");
  TORCH_CHECK(!y.is_same(x),
              "checkpoint: fn returned its input x itself; expected a new tensor computed from x");
  return y;
}

struct CheckpointFunction : torch::autograd::Function<CheckpointFunction> {
  // `anchor`: a 0-dim tensor that requires grad when x does not, so the output gets a grad_fn
  // and backward reaches the parameters inside fn.
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& anchor,
                               const CheckpointFn& fn, bool preserve_rng_state) {
    (void)anchor;
    ctx->saved_data["fn"] = at::IValue::make_capsule(c10::make_intrusive<FnHolder>(fn));
    ctx->saved_data["x_requires_grad"] = x.requires_grad();
    if (preserve_rng_state) ctx->saved_data["rng_state"] = get_cpu_rng_state();
    ctx->save_for_backward({x});
    return run_checked(fn, x);  // grad mode is off here (Function::apply)
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    TORCH_CHECK(!torch::GradMode::is_enabled(),
                "checkpoint: double backward (create_graph=true) is not supported; expected "
                "backward without create_graph");
    const auto fn_holder = c10::static_intrusive_pointer_cast<FnHolder>(ctx->saved_data["fn"].toCapsule());
    const bool x_requires_grad = ctx->saved_data["x_requires_grad"].toBool();
    const torch::Tensor x = ctx->get_saved_variables()[0];
    torch::Tensor xd = x.detach();
    if (x_requires_grad) xd.requires_grad_(true);

    torch::Tensor y;
    {
      // Recompute with the forward's generator state; the caller's state is put back after.
      torch::Tensor caller_state;
      const auto rng = ctx->saved_data.find("rng_state");
      if (rng != ctx->saved_data.end()) {
        caller_state = get_cpu_rng_state();
        set_cpu_rng_state(rng->second.toTensor());
      }
      try {
        torch::AutoGradMode enable_grad(true);
        y = run_checked(fn_holder->fn, xd);
      } catch (...) {
        if (caller_state.defined()) set_cpu_rng_state(caller_state);
        throw;
      }
      if (caller_state.defined()) set_cpu_rng_state(caller_state);
    }
    // Nothing inside fn (nor x) requires grad: nothing to propagate.
    if (y.requires_grad() && grad_out[0].defined()) {
      torch::autograd::backward({y}, {grad_out[0]});
    }
    torch::Tensor grad_x = x_requires_grad ? xd.grad() : torch::Tensor();
    // One entry per forward input: x, anchor, fn, preserve_rng_state.
    return {grad_x, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor checkpoint(const CheckpointFn& fn, const torch::Tensor& x, const CheckpointOptions& options) {
  TORCH_CHECK(static_cast<bool>(fn), "checkpoint: fn is empty; expected a callable block x -> y");
  TORCH_CHECK(x.defined(), "checkpoint: x is undefined; expected the block's input tensor");
  if (!torch::GradMode::is_enabled()) return run_checked(fn, x);
  // Every input of a custom Function must be defined: the anchor always is, and requires grad
  // only when x does not.
  const torch::Tensor anchor = torch::zeros({}, torch::requires_grad(!x.requires_grad()));
  return CheckpointFunction::apply(x, anchor, fn, options.preserve_rng_state());
}

}  // namespace msbnb::train
