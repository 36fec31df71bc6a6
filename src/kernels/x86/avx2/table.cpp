#include "kernels/isa_kernels.h"

namespace msbnb::kernels::avx2 {

// Null entries fall back to the scalar reference (dispatch.cpp).
const KernelTable table = {
    Isa::avx2, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
};

}  // namespace msbnb::kernels::avx2
