// The widest vector ISA that the CPU kernels' per-ISA clones use (fused_gate.cpp, gate_net.cpp,
// interleave.h): what the CPU supports, capped by the environment variable MMEA_CPU_ISA ("base",
// "avx2" or "avx512"; unset or empty: no cap), decided once per process. The cap lets one machine
// run every clone (tests/ops/test_cpu_isa.py runs the kernel tests under each) and compare them.
// An unknown value fails the extension's import with a message naming the variable
// (isa_error() is non-empty; gate_ops.cpp's module init raises it).
#pragma once

#include <cstdlib>
#include <cstring>
#include <string>

namespace mmea {

enum class Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "base";
}

struct IsaChoice {
  Isa isa = Isa::kBase;
  std::string error;  // non-empty: MMEA_CPU_ISA has an unknown value
};

inline IsaChoice decide_isa() {
  IsaChoice c;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    c.isa = Isa::kAvx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      c.isa = Isa::kAvx512;
  }
#endif
  const char* cap = std::getenv("MMEA_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return c;
  Isa limit;
  if (std::strcmp(cap, "base") == 0) {
    limit = Isa::kBase;
  } else if (std::strcmp(cap, "avx2") == 0) {
    limit = Isa::kAvx2;
  } else if (std::strcmp(cap, "avx512") == 0) {
    limit = Isa::kAvx512;
  } else {
    c.error = std::string("MMEA_CPU_ISA=") + cap + ": expected base, avx2 or avx512 (or unset: the CPU's widest)";
    return c;
  }
  if (static_cast<int>(limit) < static_cast<int>(c.isa)) c.isa = limit;
  return c;
}

inline const IsaChoice& isa_choice() {
  static const IsaChoice choice = decide_isa();
  return choice;
}

inline Isa cpu_isa() { return isa_choice().isa; }
inline bool isa_at_least(Isa isa) { return static_cast<int>(cpu_isa()) >= static_cast<int>(isa); }
// whether the AVX2 (AVX2 + FMA) / AVX-512 clones run
inline bool use_avx2() { return isa_at_least(Isa::kAvx2); }
inline bool use_avx512() { return isa_at_least(Isa::kAvx512); }

}  // namespace mmea
