// The one dispatch point: only this file asks cpuid. The table is chosen once per process.
#include <cpuid.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels/isa_kernels.h"

namespace msbnb::kernels {

namespace {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, avx512vnni = false,
       avx512bf16 = false;
};

CpuFeatures read_cpu_features() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & bit_OSXSAVE;
  f.fma = c & bit_FMA;
  f.f16c = c & bit_F16C;
  if (!osxsave) return f;
  // The OS must save the YMM (bits 1-2) and ZMM / opmask (bits 5-7) state.
  unsigned xcr0_lo, xcr0_hi;
  __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool ymm = (xcr0_lo & 0x6) == 0x6, zmm = (xcr0_lo & 0xe6) == 0xe6;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  f.avx2 = ymm && (b & bit_AVX2);
  f.avx512f = zmm && (b & bit_AVX512F);
  f.avx512bw = zmm && (b & bit_AVX512BW);
  f.avx512vl = zmm && (b & bit_AVX512VL);
  f.avx512dq = zmm && (b & bit_AVX512DQ);
  f.avx512vnni = zmm && (c & bit_AVX512VNNI);
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512bf16 = zmm && (a & bit_AVX512BF16);
  return f;
}

const CpuFeatures& cpu() {
  static const CpuFeatures features = read_cpu_features();
  return features;
}

// A table with every null entry filled from the scalar table.
KernelTable complete(const KernelTable& t) {
  KernelTable out = t;
  const KernelTable& s = scalar::table;
#define MSBNB_FILL(entry) \
  if (!out.entry) out.entry = s.entry;
  MSBNB_FILL(absmax_blocks)
  MSBNB_FILL(minmax_blocks)
  MSBNB_FILL(quantize_int8)
  MSBNB_FILL(dequantize_int8)
  MSBNB_FILL(quantize_int4)
  MSBNB_FILL(dequantize_int4)
  MSBNB_FILL(quantize_lut4)
  MSBNB_FILL(dequantize_lut4)
  MSBNB_FILL(quantize_lut8)
  MSBNB_FILL(dequantize_lut8)
  MSBNB_FILL(matmul.lut4_f32)
  MSBNB_FILL(matmul.int8_f32)
  MSBNB_FILL(matmul.lut4_bf16)
  MSBNB_FILL(matmul.int8_i8)
  MSBNB_FILL(matmul.lut4_t_f32)
  MSBNB_FILL(matmul.int8_t_f32)
  MSBNB_FILL(matmul.quantize_row_u8)
#undef MSBNB_FILL
  return out;
}

const KernelTable& table_of(Isa isa) {
  static const KernelTable tables[] = {complete(scalar::table), complete(avx2::table),
                                       complete(avx512::table)};
  return tables[static_cast<int>(isa)];
}

Isa choose_isa() {
  const char* forced = std::getenv("MSBNB_ISA");
  if (forced && *forced) {
    Isa isa;
    try {
      isa = isa_from_name(forced);
    } catch (const std::invalid_argument&) {
      throw std::runtime_error(std::string("MSBNB_ISA: expected scalar, avx2 or avx512, got '") + forced +
                               "'");
    }
    if (!isa_supported(isa))
      throw std::runtime_error(std::string("MSBNB_ISA=") + forced + ": this CPU does not support " + forced);
    return isa;
  }
  Isa best = Isa::scalar;
  for (int i = 0; i < kNumIsas; ++i)
    if (isa_supported(static_cast<Isa>(i))) best = static_cast<Isa>(i);
  return best;
}

}  // namespace

const char* isa_name(Isa isa) {
  static const char* const names[] = {
#define MSBNB_ISA(id, folder, features, flags) #id,
#include "msbnb/kernels/isa.def"
#undef MSBNB_ISA
  };
  return names[static_cast<int>(isa)];
}

Isa isa_from_name(const char* name) {
  for (int i = 0; i < kNumIsas; ++i)
    if (std::strcmp(isa_name(static_cast<Isa>(i)), name) == 0) return static_cast<Isa>(i);
  throw std::invalid_argument(std::string("isa: expected scalar, avx2 or avx512, got '") + name + "'");
}

bool isa_supported(Isa isa) {
  const CpuFeatures& f = cpu();
  switch (isa) {
    case Isa::scalar:
      return true;
    case Isa::avx2:
      return f.avx2 && f.fma && f.f16c;
    case Isa::avx512:
      return f.avx2 && f.fma && f.f16c && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq &&
             f.avx512vnni && f.avx512bf16;
  }
  return false;
}

Isa active_isa() {
  static const Isa isa = choose_isa();
  return isa;
}

const KernelTable& active_kernels() {
  static const KernelTable& table = table_of(active_isa());
  return table;
}

const KernelTable& kernels_for(Isa isa) {
  if (!isa_supported(isa))
    throw std::runtime_error(std::string("kernels_for: this CPU does not support ") + isa_name(isa));
  return table_of(isa);
}

}  // namespace msbnb::kernels
