#include "kernels/isa_kernels.h"

namespace msbnb::kernels::avx512 {

// Null entries fall back to the scalar reference (dispatch.cpp).
const KernelTable table = {
    Isa::avx512, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
};

}  // namespace msbnb::kernels::avx512
