// Plain types shared by every kernel: element types and instruction sets. No torch here.
#pragma once
#include <cstddef>
#include <cstdint>

namespace msbnb::kernels {

/// Element type of a floating-point input buffer.
enum class DType : uint8_t { f32, f16, bf16 };

/// ceil(n / d) for n >= 0, d > 0, without the overflow of (n + d - 1) / d for huge d.
inline constexpr int64_t ceil_div(int64_t n, int64_t d) { return n / d + (n % d != 0); }

inline constexpr size_t dtype_size(DType dt) { return dt == DType::f32 ? 4 : 2; }
const char* dtype_name(DType dt);

/// Instruction sets with a kernel table, from isa.def (order: worst to best). Every row is an
/// enumerator on every architecture; isa_supported() is false for rows of another one.
enum class Isa : uint8_t {
#define MSBNB_ISA(id, arch, folder, features, flags) id,
#include "msbnb/kernels/isa.def"
#undef MSBNB_ISA
};
inline constexpr int kNumIsas = 0
#define MSBNB_ISA(id, arch, folder, features, flags) +1
#include "msbnb/kernels/isa.def"
#undef MSBNB_ISA
    ;

const char* isa_name(Isa isa);

/// The per-step scalars of one 8-bit optimizer step (kernels.def: optim8_adam_blocks,
/// optim8_lion_blocks), float32 as the kernels use them. The caller (optim8.h) forms them from
/// the hyper-parameters once per step, so every ISA and thread sees the same bits.
///   beta1, beta2        the moments' decay rates; one_minus_beta1 / 2 = fl(1 - beta)
///   step_size, eps      Adam: lr * sqrt(1 - beta2^t) / (1 - beta1^t) and sqrt(1 - beta2^t) * eps
///                       (bitsandbytes' kOptimizerStatic8bit2StateBlockwise form)
///   lr                  Lion: the step length
///   decay               decoupled weight decay factor fl(1 - lr * wd), applied to p before the
///                       update (1: none; AdamW, Lion)
///   l2                  L2 weight decay added to the gradient, g + l2 * p (0: none; Adam)
/// The longest block the 8-bit optimizer kernels take (bitsandbytes' largest blocksize).
inline constexpr int64_t kOptim8MaxBlock = 4096;

struct Optim8Params {
  float beta1 = 0.9f, beta2 = 0.999f;
  float one_minus_beta1 = 0.1f, one_minus_beta2 = 0.001f;
  float step_size = 0.0f, eps = 0.0f;
  float lr = 0.0f;
  float decay = 1.0f;
  float l2 = 0.0f;
};

}  // namespace msbnb::kernels
