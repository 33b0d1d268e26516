// Which of the two builds of the CPU kernels to run (project.cpp, adamw.cpp and
// surgery.cpp each compile their kernels twice: baseline SSE2 and AVX2+FMA).
#pragma once

#include <cstdlib>
#include <cstring>

namespace gradproj::cpu {

// AVX2 when the CPU has it, unless ATEN_CPU_CAPABILITY=default asks (as it does
// for ATen's own kernels) for the baseline build, e.g. to test that path. The
// condition matches where the .cpp files compile an AVX2 build at all.
inline bool use_avx2() {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  static const bool enabled = [] {
    const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
    if (cap != nullptr && std::strcmp(cap, "default") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return enabled;
#else
  return false;
#endif
}

}  // namespace gradproj::cpu
