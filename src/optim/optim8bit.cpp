// Adam8bit, AdamW8bit, Lion8bit (msbnb/optim/optim8bit.h): option and parameter checks, the state
// layout, the float32 path of small parameters (torch's own update, op for op) and the call of
// the fused 8-bit kernels (msbnb/kernels/optim8.h).
#include "msbnb/optim/optim8bit.h"

#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>
#include <torch/torch.h>

#include <cmath>
#include <sstream>
#include <string>

#include "msbnb/kernels/optim8.h"

namespace msbnb::optim {
namespace {

using torch::optim::OptimizerParamGroup;

std::string shape_str(const torch::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

// The hyper-parameters every family shares, read from a group's options.
struct Hyper {
  double lr, beta1, beta2, eps, weight_decay;
  bool amsgrad;
  int64_t min_8bit_size;
};
Hyper hyper_of(const Adam8bitOptions& o) {
  return {o.lr(),      std::get<0>(o.betas()), std::get<1>(o.betas()), o.eps(), o.weight_decay(),
          o.amsgrad(), o.min_8bit_size()};
}
Hyper hyper_of(const AdamW8bitOptions& o) {
  return {o.lr(),      std::get<0>(o.betas()), std::get<1>(o.betas()), o.eps(), o.weight_decay(),
          o.amsgrad(), o.min_8bit_size()};
}
Hyper hyper_of(const Lion8bitOptions& o) {
  return {o.lr(), std::get<0>(o.betas()), std::get<1>(o.betas()), 0.0, o.weight_decay(),
          false,  o.min_8bit_size()};
}

void check_hyper(const char* who, const Hyper& h) {
  TORCH_CHECK(h.lr >= 0.0, who, ": lr: expected >= 0, got ", h.lr);
  TORCH_CHECK(h.eps >= 0.0, who, ": eps: expected >= 0, got ", h.eps);
  TORCH_CHECK(h.beta1 >= 0.0 && h.beta1 < 1.0, who, ": betas[0]: expected a value in [0, 1), got ", h.beta1);
  TORCH_CHECK(h.beta2 >= 0.0 && h.beta2 < 1.0, who, ": betas[1]: expected a value in [0, 1), got ", h.beta2);
  TORCH_CHECK(h.weight_decay >= 0.0, who, ": weight_decay: expected >= 0, got ", h.weight_decay);
  TORCH_CHECK(h.min_8bit_size >= 0, who, ": min_8bit_size: expected >= 0, got ", h.min_8bit_size);
  TORCH_CHECK(
      !h.amsgrad, who,
      ": amsgrad: expected false (the 8-bit optimizers, as bitsandbytes', have no AMSGrad), got true");
}

void check_param(const char* who, const torch::Tensor& p) {
  TORCH_CHECK(p.defined(), who, ": params: expected defined tensors, got an undefined one");
  TORCH_CHECK(p.device().is_cpu(), who,
              ": params: expected CPU tensors (the kernels run on the CPU), got one on ", p.device());
  TORCH_CHECK(p.layout() == torch::kStrided, who, ": params: expected dense (strided) tensors, got layout ",
              p.layout());
  TORCH_CHECK(p.scalar_type() == torch::kFloat32, who, ": params: expected float32 tensors, got ",
              p.scalar_type());
}

void check_grad(const char* who, const torch::Tensor& p, const torch::Tensor& g) {
  TORCH_CHECK(!g.is_sparse(), who,
              ": grad: expected a dense gradient (sparse gradients are not supported), got ", g.layout());
  TORCH_CHECK(g.device().is_cpu(), who, ": grad: expected a CPU tensor, got one on ", g.device());
  TORCH_CHECK(g.scalar_type() == torch::kFloat32, who, ": grad: expected float32, got ", g.scalar_type());
  TORCH_CHECK(g.sizes() == p.sizes(), who, ": grad: expected the parameter's shape ", shape_str(p), ", got ",
              shape_str(g));
}

template <class Options>
void check_groups(const char* who, const std::vector<OptimizerParamGroup>& groups, const Options& defaults) {
  check_hyper(who, hyper_of(defaults));
  for (const auto& group : groups) {
    if (group.has_options()) check_hyper(who, hyper_of(static_cast<const Options&>(group.options())));
    for (const auto& p : group.params()) check_param(who, p);
  }
}

enum class Family { adam, adamw, lion };

std::string key_of(const torch::Tensor& p) { return c10::guts::to_string(p.unsafeGetTensorImpl()); }

// A loaded (or user-made) state must fit the parameter before raw pointers go near it.
void check_state(const char* who, const Optim8bitParamState& s, const torch::Tensor& p, bool two_states) {
  const int64_t n = p.numel(), blocks = (n + kOptim8BlockSize - 1) / kOptim8BlockSize;
  auto check = [&](const torch::Tensor& st, const torch::Tensor& am, const char* name, const char* am_name) {
    TORCH_CHECK(st.defined(), who, ": state ", name, ": expected a tensor for a parameter of shape ",
                shape_str(p), ", got none");
    if (st.scalar_type() == torch::kUInt8) {
      TORCH_CHECK(st.numel() == n && st.is_contiguous(), who, ": state ", name,
                  ": expected contiguous uint8 codes of ", n, " elements, got ", shape_str(st));
      TORCH_CHECK(
          am.defined() && am.scalar_type() == torch::kFloat32 && am.numel() == blocks && am.is_contiguous(),
          who, ": state ", am_name, ": expected float32 [", blocks, "], got ",
          am.defined() ? shape_str(am) + " " + std::string(c10::toString(am.scalar_type())) : "none");
    } else {
      TORCH_CHECK(st.scalar_type() == torch::kFloat32 && st.sizes() == p.sizes(), who, ": state ", name,
                  ": expected uint8 codes [", n, "] or float32 of shape ", shape_str(p), ", got ",
                  c10::toString(st.scalar_type()), " ", shape_str(st));
    }
    TORCH_CHECK(st.device().is_cpu(), who, ": state ", name, ": expected a CPU tensor, got one on ",
                st.device());
  };
  check(s.state1(), s.absmax1(), "state1", "absmax1");
  if (two_states) {
    check(s.state2(), s.absmax2(), "state2", "absmax2");
    TORCH_CHECK(s.state1().scalar_type() == s.state2().scalar_type(), who,
                ": state: expected state1 and state2 of one dtype, got ",
                c10::toString(s.state1().scalar_type()), " and ", c10::toString(s.state2().scalar_type()));
  }
  TORCH_CHECK(s.step() >= 0, who, ": state step: expected >= 0, got ", s.step());
}

std::unique_ptr<Optim8bitParamState> fresh_state(const torch::Tensor& p, bool eight_bit, bool two_states) {
  auto s = std::make_unique<Optim8bitParamState>();
  if (eight_bit) {
    // Codes with absmax 0 are the state 0 whatever the code (code * 0).
    const int64_t blocks = (p.numel() + kOptim8BlockSize - 1) / kOptim8BlockSize;
    s->state1(torch::zeros({p.numel()}, torch::kUInt8));
    s->absmax1(torch::zeros({blocks}, torch::kFloat32));
    if (two_states) {
      s->state2(torch::zeros({p.numel()}, torch::kUInt8));
      s->absmax2(torch::zeros({blocks}, torch::kFloat32));
    }
  } else {
    s->state1(torch::zeros_like(p, torch::MemoryFormat::Preserve));
    if (two_states) s->state2(torch::zeros_like(p, torch::MemoryFormat::Preserve));
  }
  return s;
}

// torch::optim::Adam / AdamW's update (libtorch 1.13 adam.cpp / adamw.cpp), op for op, so small
// parameters match torch bit for bit. step is the count after this step.
void adam_fp32(torch::Tensor& p, torch::Tensor grad, Optim8bitParamState& s, const Hyper& h, bool decoupled) {
  if (decoupled && h.weight_decay != 0) p.mul_(1 - h.lr * h.weight_decay);
  if (!decoupled && h.weight_decay != 0) grad = grad.add(p, h.weight_decay);
  const double bias_correction1 = 1 - std::pow(h.beta1, s.step());
  const double bias_correction2 = 1 - std::pow(h.beta2, s.step());
  s.state1().mul_(h.beta1).add_(grad, 1 - h.beta1);
  s.state2().mul_(h.beta2).addcmul_(grad, grad, 1 - h.beta2);
  const torch::Tensor denom = (s.state2().sqrt() / std::sqrt(bias_correction2)).add_(h.eps);
  const double step_size = h.lr / bias_correction1;
  p.addcdiv_(s.state1(), denom, -step_size);
}

// Lion in torch ops (the reference the tests also write): decoupled decay, the sign of the
// interpolation, then the momentum.
void lion_fp32(torch::Tensor& p, const torch::Tensor& grad, Optim8bitParamState& s, const Hyper& h) {
  if (h.weight_decay != 0) p.mul_(1 - h.lr * h.weight_decay);
  const torch::Tensor update = (s.state1() * h.beta1).add_(grad, 1 - h.beta1).sign_();
  p.add_(update, -h.lr);
  s.state1().mul_(h.beta2).add_(grad, 1 - h.beta2);
}

template <class Options>
torch::Tensor step_impl(const char* who, Family family, torch::optim::Optimizer& opt,
                        torch::optim::Optimizer::LossClosure closure) {
  torch::NoGradGuard no_grad;
  torch::Tensor loss = {};
  if (closure != nullptr) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  const bool two_states = family != Family::lion;
  auto& states = opt.state();
  for (auto& group : opt.param_groups()) {
    const Hyper h = hyper_of(static_cast<const Options&>(group.options()));
    check_hyper(who, h);
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      check_param(who, p);
      const torch::Tensor& grad = p.grad();
      check_grad(who, p, grad);
      const std::string key = key_of(p);
      auto it = states.find(key);
      if (it == states.end())
        it = states.emplace(key, fresh_state(p, p.numel() >= h.min_8bit_size, two_states)).first;
      auto& s = static_cast<Optim8bitParamState&>(*it->second);
      check_state(who, s, p, two_states);
      s.step(s.step() + 1);
      if (!s.is_8bit()) {
        if (family == Family::lion)
          lion_fp32(p, grad, s, h);
        else
          adam_fp32(p, grad, s, h, family == Family::adamw);
        continue;
      }
      // The kernels write p in place: through a contiguous copy if p is not contiguous.
      torch::Tensor pc = p.is_contiguous() ? p : p.contiguous();
      const torch::Tensor g = grad.contiguous();
      namespace K = msbnb::kernels;
      if (family == Family::lion) {
        K::optim8_lion(pc.data_ptr<float>(), g.data_ptr<float>(), s.state1().data_ptr<uint8_t>(),
                       s.absmax1().data_ptr<float>(), p.numel(), kOptim8BlockSize,
                       K::optim8_lion_params(h.lr, h.beta1, h.beta2, h.weight_decay), K::optim8_signed_map());
      } else {
        K::optim8_adam(pc.data_ptr<float>(), g.data_ptr<float>(), s.state1().data_ptr<uint8_t>(),
                       s.state2().data_ptr<uint8_t>(), s.absmax1().data_ptr<float>(),
                       s.absmax2().data_ptr<float>(), p.numel(), kOptim8BlockSize,
                       K::optim8_adam_params(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay,
                                             family == Family::adamw, s.step()),
                       K::optim8_signed_map(), K::optim8_unsigned_map());
      }
      if (!pc.is_same(p))
        p.copy_(pc);
      else
        p.unsafeGetTensorImpl()->bump_version();  // written through a raw pointer, as an in-place op
    }
  }
  return loss;
}

}  // namespace

// ---- options and state serialization ------------------------------------------------------------

Adam8bitOptions::Adam8bitOptions(double lr) : lr_(lr) {}
AdamW8bitOptions::AdamW8bitOptions(double lr) : lr_(lr) {}
Lion8bitOptions::Lion8bitOptions(double lr) : lr_(lr) {}

#define MSBNB_ADAM_OPTIONS_SERIALIZE(Options)                               \
  void Options::serialize(torch::serialize::OutputArchive& archive) const { \
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);                                   \
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);                                \
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);                                  \
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);                         \
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(amsgrad);                              \
    _TORCH_OPTIM_SERIALIZE_TORCH_ARG(min_8bit_size);                        \
  }                                                                         \
  void Options::serialize(torch::serialize::InputArchive& archive) {        \
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);                         \
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, betas);                     \
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps);                        \
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);               \
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, amsgrad);                      \
    _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, min_8bit_size);             \
  }
MSBNB_ADAM_OPTIONS_SERIALIZE(Adam8bitOptions)
MSBNB_ADAM_OPTIONS_SERIALIZE(AdamW8bitOptions)
#undef MSBNB_ADAM_OPTIONS_SERIALIZE

void Lion8bitOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(min_8bit_size);
}
void Lion8bitOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, betas);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, min_8bit_size);
}

void Optim8bitParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(state1);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(state2);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(absmax1);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(absmax2);
}
void Optim8bitParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, state1);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, state2);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, absmax1);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, absmax2);
}

// ---- the optimizers -------------------------------------------------------------------------------

Adam8bit::Adam8bit(std::vector<OptimizerParamGroup> param_groups, Adam8bitOptions defaults)
    : Optimizer(std::move(param_groups), std::make_unique<Adam8bitOptions>(defaults)) {
  check_groups("Adam8bit", param_groups_, defaults);
}
Adam8bit::Adam8bit(std::vector<torch::Tensor> params, Adam8bitOptions defaults)
    : Adam8bit(std::vector<OptimizerParamGroup>{OptimizerParamGroup(std::move(params))},
               std::move(defaults)) {}
torch::Tensor Adam8bit::step(LossClosure closure) {
  return step_impl<Adam8bitOptions>("Adam8bit", Family::adam, *this, std::move(closure));
}
void Adam8bit::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<Optim8bitParamState, Adam8bitOptions>(archive, *this);
}
void Adam8bit::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<Optim8bitParamState, Adam8bitOptions>(archive, *this);
}

AdamW8bit::AdamW8bit(std::vector<OptimizerParamGroup> param_groups, AdamW8bitOptions defaults)
    : Optimizer(std::move(param_groups), std::make_unique<AdamW8bitOptions>(defaults)) {
  check_groups("AdamW8bit", param_groups_, defaults);
}
AdamW8bit::AdamW8bit(std::vector<torch::Tensor> params, AdamW8bitOptions defaults)
    : AdamW8bit(std::vector<OptimizerParamGroup>{OptimizerParamGroup(std::move(params))},
                std::move(defaults)) {}
torch::Tensor AdamW8bit::step(LossClosure closure) {
  return step_impl<AdamW8bitOptions>("AdamW8bit", Family::adamw, *this, std::move(closure));
}
void AdamW8bit::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<Optim8bitParamState, AdamW8bitOptions>(archive, *this);
}
void AdamW8bit::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<Optim8bitParamState, AdamW8bitOptions>(archive, *this);
}

Lion8bit::Lion8bit(std::vector<OptimizerParamGroup> param_groups, Lion8bitOptions defaults)
    : Optimizer(std::move(param_groups), std::make_unique<Lion8bitOptions>(defaults)) {
  check_groups("Lion8bit", param_groups_, defaults);
}
Lion8bit::Lion8bit(std::vector<torch::Tensor> params, Lion8bitOptions defaults)
    : Lion8bit(std::vector<OptimizerParamGroup>{OptimizerParamGroup(std::move(params))},
               std::move(defaults)) {}
torch::Tensor Lion8bit::step(LossClosure closure) {
  return step_impl<Lion8bitOptions>("Lion8bit", Family::lion, *this, std::move(closure));
}
void Lion8bit::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<Optim8bitParamState, Lion8bitOptions>(archive, *this);
}
void Lion8bit::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<Optim8bitParamState, Lion8bitOptions>(archive, *this);
}

int64_t optimizer_state_bytes(const torch::optim::Optimizer& optimizer) {
  auto bytes = [](const torch::Tensor& t) {
    return t.defined() ? static_cast<int64_t>(t.nbytes()) : int64_t{0};
  };
  int64_t total = 0;
  for (const auto& kv : optimizer.state()) {
    const torch::optim::OptimizerParamState* s = kv.second.get();
    if (const auto* e = dynamic_cast<const Optim8bitParamState*>(s)) {
      total += bytes(e->state1()) + bytes(e->state2()) + bytes(e->absmax1()) + bytes(e->absmax2());
    } else if (const auto* a = dynamic_cast<const torch::optim::AdamParamState*>(s)) {
      total += bytes(a->exp_avg()) + bytes(a->exp_avg_sq()) + bytes(a->max_exp_avg_sq());
    } else if (const auto* w = dynamic_cast<const torch::optim::AdamWParamState*>(s)) {
      total += bytes(w->exp_avg()) + bytes(w->exp_avg_sq()) + bytes(w->max_exp_avg_sq());
    } else if (const auto* m = dynamic_cast<const torch::optim::SGDParamState*>(s)) {
      total += bytes(m->momentum_buffer());
    } else {
      TORCH_CHECK(false,
                  "optimizer_state_bytes: optimizer: expected the state of an 8-bit optimizer or of torch's ",
                  "Adam, AdamW or SGD, got another state type");
    }
  }
  return total;
}

}  // namespace msbnb::optim
