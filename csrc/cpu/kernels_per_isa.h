// Compiles the kernel headers of one op twice: for baseline x86-64 (SSE2) in
// namespace isa_default and, where GCC can (GRADPROJ_CPU_AVX2, dispatch.h), for
// AVX2+FMA in isa_avx2; for_this_cpu (dispatch.h) picks one at run time. Without
// an AVX2 build isa_avx2 names isa_default, so callers need no #ifdef.
//
// An op file includes this once, after its own types, and names its kernel header
// (if any) beyond project_kernels.h, whose vector helpers every op uses:
//   #define GRADPROJ_CPU_OP_KERNELS "adamw_kernels.h"
//   #include "kernels_per_isa.h"
// The kernel headers have no include guard and no #include: everything they need
// is included here first, so that the target pragma applies to their code only.
// No include guard here either: a second include would define the kernels again.

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "dispatch.h"
#include "kernel_types.h"

// Lanes (a GCC vector) is passed by value only between functions with internal
// linkage that are inlined, so GCC's note about its ABI does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // GCC reports it at the end of the file: no pop
#endif

namespace gradproj::cpu {

namespace isa_default {
namespace {
#include "project_kernels.h"
#ifdef GRADPROJ_CPU_OP_KERNELS
#include GRADPROJ_CPU_OP_KERNELS
#endif
}  // namespace
}  // namespace isa_default

#ifdef GRADPROJ_CPU_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
namespace {
#include "project_kernels.h"
#ifdef GRADPROJ_CPU_OP_KERNELS
#include GRADPROJ_CPU_OP_KERNELS
#endif
}  // namespace
}  // namespace isa_avx2
#pragma GCC pop_options
#else
namespace isa_avx2 = isa_default;
#endif

}  // namespace gradproj::cpu
