// Threaded 8-bit blockwise optimizer steps on raw buffers (no torch): bitsandbytes'
// optimizer_update_8bit_blockwise for Adam / AdamW and Lion. The kernels' contract (per-block
// arithmetic, NaN / Inf gradients, the sign rule) is documented at their rows of kernels.def;
// docs/optim.md has the numerics. Whole blocks are split across threads (the kernels' pool,
// ops.h num_threads()); every block is independent, so results do not depend on the thread count.
#pragma once
#include <cstdint>

#include "msbnb/kernels/formats.h"
#include "msbnb/kernels/kernel_table.h"

namespace msbnb::kernels {

/// Maps of the 8-bit states: the signed dynamic map (first moment) and the unsigned one (second
/// moment), bitsandbytes' create_dynamic_map(signed=True / False), prepared once per process.
const Lut8& optim8_signed_map();
const Lut8& optim8_unsigned_map();

/// Per-step scalars of Adam at step t >= 1 (the count after this step), in bitsandbytes' form:
/// step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t), eps' = sqrt(1 - beta2^t) * eps, both
/// formed in double from the float betas the kernels use, and rounded once. decoupled (AdamW): decay = 1 - lr
/// * weight_decay; else (Adam) l2 = weight_decay, the gradient gets + weight_decay * p.
Optim8Params optim8_adam_params(double lr, double beta1, double beta2, double eps, double weight_decay,
                                bool decoupled, int64_t t);
/// Per-step scalars of Lion: lr, decay = 1 - lr * weight_decay.
Optim8Params optim8_lion_params(double lr, double beta1, double beta2, double weight_decay);

/// One Adam / AdamW step over n elements in blocks of bs (1 <= bs <= kOptim8MaxBlock; the last
/// block may be short): p, g float32 [n]; s1, s2 uint8 codes [n] of map1 / map2; absmax1,
/// absmax2 float32 [ceil(n / bs)], updated in place. Fresh states are codes of 0 with absmax 0.
/// Throws std::invalid_argument naming the argument on bad sizes or null buffers.
void optim8_adam(float* p, const float* g, uint8_t* s1, uint8_t* s2, float* absmax1, float* absmax2,
                 int64_t n, int64_t bs, const Optim8Params& prm, const Lut8& map1, const Lut8& map2,
                 const KernelTable& k = active_kernels());
/// One Lion step: s1 / absmax1 the momentum as above.
void optim8_lion(float* p, const float* g, uint8_t* s1, float* absmax1, int64_t n, int64_t bs,
                 const Optim8Params& prm, const Lut8& map1, const KernelTable& k = active_kernels());

}  // namespace msbnb::kernels
