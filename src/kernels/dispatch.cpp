// The one dispatch point: only this file asks the CPU. Every row of isa.def has a table here when
// it is built for this architecture; a table's null entries are filled once from the completed
// table of the tier below, and one table is chosen per process.
#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include <cstdlib>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/isa_kernels.h"

namespace msbnb::kernels {

namespace {

// The table of a row, or null when the row is of another architecture (not built).
#define MSBNB_TABLE_any(id) &id::table
#if defined(__x86_64__)
#define MSBNB_TABLE_x86_64(id) &id::table
#else
#define MSBNB_TABLE_x86_64(id) nullptr
#endif
#if defined(__aarch64__)
#define MSBNB_TABLE_aarch64(id) &id::table
#else
#define MSBNB_TABLE_aarch64(id) nullptr
#endif

struct IsaRow {
  const char* name;
  const char* features;  // space-separated cpuid feature names
  const KernelTable* table;
};
const IsaRow kRows[] = {
#define MSBNB_ISA(id, arch, folder, features, flags) {#id, features, MSBNB_TABLE_##arch(id)},
#include "msbnb/kernels/isa.def"
#undef MSBNB_ISA
};
static_assert(sizeof(kRows) / sizeof(kRows[0]) == kNumIsas);

#undef MSBNB_TABLE_any
#undef MSBNB_TABLE_x86_64
#undef MSBNB_TABLE_aarch64

struct Feature {
  const char* name;
  bool present;
};

#if defined(__x86_64__)
std::vector<Feature> read_cpu_features() {
  bool avx2 = false, fma = false, f16c = false, avx512f = false, avx512bw = false, avx512vl = false,
       avx512dq = false, avx512vnni = false, avx512bf16 = false, avxvnni = false;
  unsigned a, b, c, d;
  if (__get_cpuid(1, &a, &b, &c, &d) && (c & bit_OSXSAVE)) {
    fma = c & bit_FMA;
    f16c = c & bit_F16C;
    // The OS must save the YMM (bits 1-2) and ZMM / opmask (bits 5-7) state.
    unsigned xcr0_lo, xcr0_hi;
    __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    const bool ymm = (xcr0_lo & 0x6) == 0x6, zmm = (xcr0_lo & 0xe6) == 0xe6;
    fma = fma && ymm;
    f16c = f16c && ymm;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
      avx2 = ymm && (b & bit_AVX2);
      avx512f = zmm && (b & bit_AVX512F);
      avx512bw = zmm && (b & bit_AVX512BW);
      avx512vl = zmm && (b & bit_AVX512VL);
      avx512dq = zmm && (b & bit_AVX512DQ);
      avx512vnni = zmm && (c & bit_AVX512VNNI);
    }
    if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) {
      avx512bf16 = zmm && (a & bit_AVX512BF16);
      avxvnni = ymm && (a & (1u << 4));  // AVX-VNNI (VEX-encoded, 256-bit)
    }
  }
  return {{"avx2", avx2},
          {"fma", fma},
          {"f16c", f16c},
          {"avx512f", avx512f},
          {"avx512bw", avx512bw},
          {"avx512vl", avx512vl},
          {"avx512dq", avx512dq},
          {"avx512vnni", avx512vnni},
          {"avx512bf16", avx512bf16},
          {"avxvnni", avxvnni}};
}
#else
std::vector<Feature> read_cpu_features() { return {}; }  // only rows without features run here
#endif

bool has_feature(const std::string& name) {
  static const std::vector<Feature> features = read_cpu_features();
  for (const Feature& f : features)
    if (name == f.name) return f.present;
  return false;  // a feature this architecture does not know
}

// The first feature of `row` the CPU lacks, or "" when it has them all.
std::string missing_feature(const IsaRow& row) {
  std::istringstream in(row.features);
  std::string name;
  while (in >> name)
    if (!has_feature(name)) return name;
  return "";
}

bool supported(Isa isa) {
  const IsaRow& row = kRows[static_cast<int>(isa)];
  return row.table && missing_feature(row).empty();
}

// t with each null entry taken from `below` (a completed table).
KernelTable complete(const KernelTable& t, const KernelTable& below) {
  KernelTable out = t;
#define MSBNB_KERNEL(name, params) \
  if (!out.name) out.name = below.name;
#define MSBNB_MATMUL_KERNEL(name, params) \
  if (!out.matmul.name) out.matmul.name = below.matmul.name;
#include "msbnb/kernels/kernels.def"
#undef MSBNB_KERNEL
#undef MSBNB_MATMUL_KERNEL
  return out;
}

struct Tables {
  KernelTable t[kNumIsas];
  Tables() : t{} {
    for (int i = 0; i < kNumIsas; ++i) {
      const KernelTable* own = kRows[i].table;
      if (!own) continue;
      t[i] = i == 0 ? *own : complete(*own, t[static_cast<int>(isa_base(static_cast<Isa>(i)))]);
      // Scalar implements every entry, so a null one left here is a row missing from ref/.
#define MSBNB_KERNEL(kernel, params) \
  if (!t[i].kernel) throw std::logic_error(std::string(kRows[i].name) + ": no kernel for " #kernel);
#define MSBNB_MATMUL_KERNEL(kernel, params) \
  if (!t[i].matmul.kernel)                  \
    throw std::logic_error(std::string(kRows[i].name) + ": no kernel for matmul." #kernel);
#include "msbnb/kernels/kernels.def"
#undef MSBNB_KERNEL
#undef MSBNB_MATMUL_KERNEL
    }
  }
};

const KernelTable& table_of(Isa isa) {
  static const Tables tables;
  return tables.t[static_cast<int>(isa)];
}

std::string supported_names() {
  std::string s;
  for (int i = 0; i < kNumIsas; ++i)
    if (supported(static_cast<Isa>(i))) s += std::string(s.empty() ? "" : ", ") + kRows[i].name;
  return s;
}

Isa choose_isa() {
  const char* forced = std::getenv("MSBNB_ISA");
  if (forced && *forced) {
    Isa isa;
    try {
      isa = isa_from_name(forced);
    } catch (const std::invalid_argument&) {
      throw std::runtime_error(std::string("MSBNB_ISA: expected one of ") + isa_names() + ", got '" + forced +
                               "'");
    }
    if (!supported(isa)) {
      const IsaRow& row = kRows[static_cast<int>(isa)];
      const std::string why =
          row.table ? "the CPU lacks " + missing_feature(row) : "not built for this architecture";
      throw std::runtime_error(std::string("MSBNB_ISA: expected one this CPU runs (") + supported_names() +
                               "), got '" + forced + "' (" + why + ")");
    }
    return isa;
  }
  Isa best = Isa::scalar;
  for (int i = 0; i < kNumIsas; ++i)
    if (supported(static_cast<Isa>(i))) best = static_cast<Isa>(i);
  return best;
}

}  // namespace

const char* isa_name(Isa isa) { return kRows[static_cast<int>(isa)].name; }

const char* isa_names() {
  static const std::string names = [] {
    std::string s;
    for (const IsaRow& row : kRows) s += std::string(s.empty() ? "" : ", ") + row.name;
    return s;
  }();
  return names.c_str();
}

Isa isa_from_name(const char* name) {
  for (int i = 0; i < kNumIsas; ++i)
    if (std::strcmp(kRows[i].name, name) == 0) return static_cast<Isa>(i);
  throw std::invalid_argument(std::string("isa: expected one of ") + isa_names() + ", got '" + name + "'");
}

Isa isa_base(Isa isa) {
  // Rows of other architectures have no table; the nearest row above with one is of this
  // architecture or `any`.
  for (int i = static_cast<int>(isa) - 1; i >= 0; --i)
    if (kRows[i].table) return static_cast<Isa>(i);
  return Isa::scalar;
}

bool isa_supported(Isa isa) { return supported(isa); }

Isa active_isa() {
  static const Isa isa = choose_isa();
  return isa;
}

const KernelTable& active_kernels() {
  static const KernelTable& table = table_of(active_isa());
  return table;
}

const KernelTable& kernels_for(Isa isa) {
  if (!supported(isa))
    throw std::runtime_error(std::string("kernels_for: expected an ISA this CPU runs (") + supported_names() +
                             "), got " + isa_name(isa));
  return table_of(isa);
}

}  // namespace msbnb::kernels
