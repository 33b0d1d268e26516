// CPU kernel of gradproj::surgery_bucket_.
//
// Contract (gradproj/backends.py): per pair (u, r) of contiguous 1-D views with
// d = u.r, only when d < 0: u <- u - c_u r and, if symmetric, r <- r - c_r u (from
// the original pair), with (gradproj.reference.surgery, lambda = strength)
//   "projection":  c_u = lambda d / |r|^2,          c_r = lambda d / |u|^2
//   "cosine":      c_u = lambda d / (|u| |r|^2),    c_r = lambda d / (|r| |u|^2)
//
// The numerics of the Triton kernel (kernels/surgery.py): every pair is split into
// fixed chunks of kChunk elements; pass 1 reduces each chunk to fp32
// (sum u.r, sum u.u, sum r.r) in parallel; the chunks of a pair are added in chunk
// order (deterministic whatever the thread count); the conflict test d < 0 picks
// the coefficients (zero without a conflict, so no norm is ever divided by when it
// may be zero); pass 2 rewrites the chunks of the conflicting pairs in parallel.
// A pair without a conflict is not rewritten: u - 0 r == u.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../bucket_checks.h"
#include "parallel.h"
#include "cpu_capability.h"
#include "kernel_types.h"

namespace gradproj::cpu {

using SurgeryPartialFn = void (*)(const void*, const void*, int64_t, int64_t, float*);
using SurgeryApplyFn = void (*)(void*, void*, int64_t, int64_t, float, float, bool);

struct SurgeryKernels {
  SurgeryPartialFn partial;
  SurgeryApplyFn apply;
};

// See csrc/cpu/project.cpp: Lanes is only passed between inlined internal functions.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace isa_default {
namespace {
#include "project_kernels.h"
#include "surgery_kernels.h"
}  // namespace
}  // namespace isa_default

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define GRADPROJ_CPU_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
namespace {
#include "project_kernels.h"
#include "surgery_kernels.h"
}  // namespace
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

namespace {

template <typename T>
SurgeryKernels kernels_for() {
#ifdef GRADPROJ_CPU_AVX2
  if (use_avx2()) return isa_avx2::surgery_kernels<T>();
#endif
  return isa_default::surgery_kernels<T>();
}

SurgeryKernels kernels_for(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return kernels_for<float>();
    case at::kBFloat16:
      return kernels_for<at::BFloat16>();
    case at::kHalf:
      return kernels_for<at::Half>();
    default:
      TORCH_CHECK(false, "gradproj cpu surgery: unsupported dtype ", dtype);
  }
}

// Elements per chunk: fixed (as kernels/surgery.py's _CHUNK), so the order of the
// fp32 sums never depends on the thread count.
constexpr int64_t kChunk = 1 << 14;

void surgery_bucket_cpu(
    at::TensorList g_unlearn, at::TensorList g_retain, double strength,
    c10::string_view variant, bool symmetric) {
  const SurgeryVariant v =
      check_surgery_bucket(g_unlearn, g_retain, variant, c10::DeviceType::CPU);
  if (g_unlearn.empty()) return;
  const int64_t n = static_cast<int64_t>(g_unlearn.size());
  // Chunk c of the bucket belongs to pair `owner[c]` and starts at `begin[c]`.
  std::vector<int64_t> first(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    first[i + 1] = first[i] + (g_unlearn[i].numel() + kChunk - 1) / kChunk;
  }
  const int64_t chunks = first[n];
  int64_t work = 0;
  for (int64_t i = 0; i < n; ++i) work += g_unlearn[i].numel();
  std::vector<int64_t> owner(chunks);
  for (int64_t i = 0; i < n; ++i) {
    std::fill(owner.begin() + first[i], owner.begin() + first[i + 1], i);
  }
  std::vector<void*> u(n), r(n);
  for (int64_t i = 0; i < n; ++i) {
    u[i] = g_unlearn[i].data_ptr();
    r[i] = g_retain[i].data_ptr();
  }
  const auto range = [&](int64_t c) {
    const int64_t i = owner[c];
    const int64_t begin = (c - first[i]) * kChunk;
    return std::make_pair(begin, std::min(g_unlearn[i].numel(), begin + kChunk));
  };
  const SurgeryKernels kernels = kernels_for(g_unlearn[0].scalar_type());

  std::vector<float> partials(static_cast<size_t>(chunks) * 3);
  parallel_items(chunks, work, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const auto [begin, end] = range(c);
      kernels.partial(u[owner[c]], r[owner[c]], begin, end, partials.data() + c * 3);
    }
  });

  // Per pair, in chunk order: the sums, the conflict test, the coefficients (fp32,
  // as the Triton kernel: lambda d / den with den = 1 without a conflict).
  const float lam = static_cast<float>(strength);
  std::vector<float> coef(static_cast<size_t>(n) * 2, 0.f);
  bool any = false;
  for (int64_t i = 0; i < n; ++i) {
    float d = 0.f, nu = 0.f, nr = 0.f;
    for (int64_t c = first[i]; c < first[i + 1]; ++c) {
      d += partials[c * 3];
      nu += partials[c * 3 + 1];
      nr += partials[c * 3 + 2];
    }
    if (!(d < 0.f)) continue;  // no conflict (d = 0, a zero gradient, NaN): unchanged
    const bool cosine = v == SurgeryVariant::kCosine;
    const float den_u = cosine ? std::sqrt(nu) * nr : nr;
    const float den_r = cosine ? std::sqrt(nr) * nu : nu;
    coef[i * 2] = lam * d / den_u;
    coef[i * 2 + 1] = lam * d / den_r;
    any = true;
  }
  if (!any) return;

  parallel_items(chunks, work, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const int64_t i = owner[c];
      if (coef[i * 2] == 0.f && coef[i * 2 + 1] == 0.f) continue;
      const auto [begin, end] = range(c);
      kernels.apply(u[i], r[i], begin, end, coef[i * 2], coef[i * 2 + 1], symmetric);
    }
  });
}

}  // namespace
}  // namespace gradproj::cpu

TORCH_LIBRARY_IMPL(gradproj, CPU, m) {
  m.impl("surgery_bucket_", &gradproj::cpu::surgery_bucket_cpu);
}
