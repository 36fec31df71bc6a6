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

}  // namespace msbnb::kernels
