// 8-bit optimizers for the PyTorch C++ frontend, as bitsandbytes' Adam8bit / AdamW8bit / Lion8bit:
// torch::optim::Optimizer subclasses whose states are stored blockwise in 8 bits (blocks of 256
// elements, absmax per block in float32; the first moment on the signed dynamic map, the second
// on the unsigned one; DESIGN.md "Dynamic 8-bit map"). A step dequantizes a block's states,
// updates them with the gradient, updates the parameters from the fp32 states, takes the block's
// new absmax and requantizes to the nearest code, in one fused, vectorized, multi-threaded kernel
// (msbnb/kernels/optim8.h; threads: msbnb::kernels::set_num_threads). docs/optim.md has the
// numerics, the memory and the measured speed.
//
// Parameters with fewer than min_8bit_size (default 4096) elements keep float32 states and the
// update of torch::optim::Adam / AdamW (bit for bit) or of the fp32 Lion written in torch ops.
//
// State per parameter (Optim8bitParamState, bitsandbytes' names): step; state1 (first moment)
// and state2 (second moment, Adam family): uint8 codes [numel] with absmax1 / absmax2 float32
// [ceil(numel / 256)], or float32 tensors of the parameter's shape (absmax undefined).
// torch::save(optimizer, path) / torch::load(optimizer, path) round-trip them exactly.
//
// Numerics of the 8-bit path (bitsandbytes' kOptimizerStatic8bit2StateBlockwise):
//   Adam:  step_size = lr * sqrt(1 - b2^t) / (1 - b1^t);  p -= step_size * m / (sqrt(v) + sqrt(1 - b2^t) *
//   eps),
//          i.e. torch's p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) in bitsandbytes'
//          association. Adam8bit's weight_decay adds wd * p to the gradient (torch Adam;
//          bitsandbytes' Adam8bit decays decoupled instead), AdamW8bit multiplies p by
//          1 - lr * wd first (torch AdamW; bitsandbytes multiplies after the update).
//   Lion:  p = p * (1 - lr * wd) - lr * sign(b1 * m + (1 - b1) * g);  m = b2 * m + (1 - b2) * g.
//   An element whose gradient is NaN or +-Inf is not updated and its states reset to 0
//   (bitsandbytes' 2-state kernel); the fp32 path keeps torch's behaviour (NaN propagates).
//
// Accepted: float32, dense, CPU parameters and gradients (a non-contiguous parameter is updated
// through a contiguous copy). Refused with c10::Error naming the argument, what was expected and
// what came: lr < 0, eps < 0, betas outside [0, 1), weight_decay < 0, min_8bit_size < 0, amsgrad
// = true (bitsandbytes' 8-bit optimizers have none), parameters or gradients of another dtype,
// sparse, or not on the CPU, a gradient of another shape, a loaded state of the wrong size.
//
// Example:
//   msbnb::optim::AdamW8bit opt(model->parameters(),
//   msbnb::optim::AdamW8bitOptions(1e-3).weight_decay(0.01)); loss.backward();  opt.step();  opt.zero_grad();
//   torch::save(opt, "opt.pt");  torch::load(opt, "opt.pt");
#pragma once
#include <torch/arg.h>
#include <torch/optim/optimizer.h>
#include <torch/optim/serialize.h>
#include <torch/serialize/archive.h>
#include <torch/types.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace msbnb::optim {

/// Elements per block of the 8-bit states (bitsandbytes' optimizers use 256).
inline constexpr int64_t kOptim8BlockSize = 256;

/// Options of Adam8bit (bitsandbytes' Adam8bit arguments; defaults as torch::optim::Adam).
struct Adam8bitOptions : public torch::optim::OptimizerCloneableOptions<Adam8bitOptions> {
  Adam8bitOptions(double lr = 1e-3);  // NOLINT: implicit as torch's options
  TORCH_ARG(double, lr) = 1e-3;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
  TORCH_ARG(double, eps) = 1e-8;
  /// L2: the gradient gets + weight_decay * p (torch Adam).
  TORCH_ARG(double, weight_decay) = 0.0;
  /// Refused (true throws at construction and at step).
  TORCH_ARG(bool, amsgrad) = false;
  /// Parameters with fewer elements keep float32 states.
  TORCH_ARG(int64_t, min_8bit_size) = 4096;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override { return lr(); }
  void set_lr(const double lr) override { this->lr(lr); }
};

/// Options of AdamW8bit (weight_decay default 1e-2, decoupled: p *= 1 - lr * weight_decay).
struct AdamW8bitOptions : public torch::optim::OptimizerCloneableOptions<AdamW8bitOptions> {
  AdamW8bitOptions(double lr = 1e-3);  // NOLINT
  TORCH_ARG(double, lr) = 1e-3;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
  TORCH_ARG(double, eps) = 1e-8;
  TORCH_ARG(double, weight_decay) = 1e-2;
  TORCH_ARG(bool, amsgrad) = false;
  TORCH_ARG(int64_t, min_8bit_size) = 4096;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override { return lr(); }
  void set_lr(const double lr) override { this->lr(lr); }
};

/// Options of Lion8bit (bitsandbytes' Lion defaults: lr 1e-4, betas (0.9, 0.99), decoupled
/// weight decay).
struct Lion8bitOptions : public torch::optim::OptimizerCloneableOptions<Lion8bitOptions> {
  Lion8bitOptions(double lr = 1e-4);  // NOLINT
  TORCH_ARG(double, lr) = 1e-4;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.99);
  TORCH_ARG(double, weight_decay) = 0.0;
  TORCH_ARG(int64_t, min_8bit_size) = 4096;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override { return lr(); }
  void set_lr(const double lr) override { this->lr(lr); }
};

/// The state of one parameter (bitsandbytes' state names). is_8bit(): state1 holds uint8 codes.
struct Optim8bitParamState : public torch::optim::OptimizerCloneableParamState<Optim8bitParamState> {
  TORCH_ARG(int64_t, step) = 0;
  TORCH_ARG(torch::Tensor, state1);
  TORCH_ARG(torch::Tensor, state2) = {};
  TORCH_ARG(torch::Tensor, absmax1) = {};
  TORCH_ARG(torch::Tensor, absmax2) = {};

 public:
  bool is_8bit() const { return state1().defined() && state1().scalar_type() == torch::kUInt8; }
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

/// Adam with 8-bit states. Throws c10::Error on bad options or parameters (see the top).
class Adam8bit : public torch::optim::Optimizer {
 public:
  explicit Adam8bit(std::vector<torch::optim::OptimizerParamGroup> param_groups,
                    Adam8bitOptions defaults = {});
  explicit Adam8bit(std::vector<torch::Tensor> params, Adam8bitOptions defaults = {});
  torch::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;
};

/// AdamW with 8-bit states.
class AdamW8bit : public torch::optim::Optimizer {
 public:
  explicit AdamW8bit(std::vector<torch::optim::OptimizerParamGroup> param_groups,
                     AdamW8bitOptions defaults = {});
  explicit AdamW8bit(std::vector<torch::Tensor> params, AdamW8bitOptions defaults = {});
  torch::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;
};

/// Lion with an 8-bit momentum.
class Lion8bit : public torch::optim::Optimizer {
 public:
  explicit Lion8bit(std::vector<torch::optim::OptimizerParamGroup> param_groups,
                    Lion8bitOptions defaults = {});
  explicit Lion8bit(std::vector<torch::Tensor> params, Lion8bitOptions defaults = {});
  torch::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;
};

/// Bytes of every tensor in an optimizer's state: what the states cost in memory. Knows the
/// 8-bit optimizers' states and torch's Adam, AdamW and SGD ones; throws c10::Error for another.
int64_t optimizer_state_bytes(const torch::optim::Optimizer& optimizer);

}  // namespace msbnb::optim
