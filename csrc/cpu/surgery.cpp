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
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "../bucket_checks.h"
#include "dispatch.h"

namespace gradproj::cpu {

using SurgeryPartialFn = void (*)(const void*, const void*, int64_t, int64_t, float*);
using SurgeryApplyFn = void (*)(void*, void*, int64_t, int64_t, float, float, bool);

struct SurgeryKernels {
  SurgeryPartialFn partial;
  SurgeryApplyFn apply;
};

}  // namespace gradproj::cpu

#define GRADPROJ_CPU_OP_KERNELS "surgery_kernels.h"
#include "kernels_per_isa.h"

namespace gradproj::cpu {
namespace {

void surgery_bucket_cpu(
    at::TensorList g_unlearn, at::TensorList g_retain, double strength,
    c10::string_view variant, bool symmetric) {
  const SurgeryVariant v =
      check_surgery_bucket(g_unlearn, g_retain, variant, c10::DeviceType::CPU);
  if (g_unlearn.empty()) return;
  const int64_t n = static_cast<int64_t>(g_unlearn.size());
  std::vector<int64_t> lengths(n);
  std::vector<void*> u(n), r(n);
  int64_t work = 0;
  for (int64_t i = 0; i < n; ++i) {
    lengths[i] = g_unlearn[i].numel();
    work += lengths[i];
    u[i] = g_unlearn[i].data_ptr();
    r[i] = g_retain[i].data_ptr();
  }
  const Chunks chunks(std::move(lengths));
  const SurgeryKernels kernels =
      dispatch_float_types(g_unlearn[0].scalar_type(), "surgery", [](auto zero) {
        using T = decltype(zero);
        return for_this_cpu(isa_avx2::surgery_kernels<T>(), isa_default::surgery_kernels<T>());
      });

  // Per pair: (sum u.r, sum u.u, sum r.r), its chunks' sums added in chunk order.
  const std::vector<float> sums = sum_chunks(
      chunks, 3, work, 0, [&](int64_t i, int64_t begin, int64_t end, float*, float* out) {
        kernels.partial(u[i], r[i], begin, end, out);
      });

  // Per pair: the conflict test and the coefficients (fp32, as the Triton kernel:
  // lambda d / den with den = 1 without a conflict).
  const float lam = static_cast<float>(strength);
  std::vector<float> coef(static_cast<size_t>(n) * 2, 0.f);
  bool any = false;
  for (int64_t i = 0; i < n; ++i) {
    const float d = sums[i * 3], nu = sums[i * 3 + 1], nr = sums[i * 3 + 2];
    if (!(d < 0.f)) continue;  // no conflict (d = 0, a zero gradient, NaN): unchanged
    const bool cosine = v == SurgeryVariant::kCosine;
    const float den_u = cosine ? std::sqrt(nu) * nr : nr;
    const float den_r = cosine ? std::sqrt(nr) * nu : nu;
    coef[i * 2] = lam * d / den_u;
    coef[i * 2 + 1] = lam * d / den_r;
    any = true;
  }
  if (!any) return;

  for_each_chunk(chunks, work, 0, [&](int64_t i, int64_t begin, int64_t end, float*) {
    if (coef[i * 2] == 0.f && coef[i * 2 + 1] == 0.f) return;
    kernels.apply(u[i], r[i], begin, end, coef[i * 2], coef[i * 2 + 1], symmetric);
  });
}

}  // namespace
}  // namespace gradproj::cpu

TORCH_LIBRARY_IMPL(gradproj, CPU, m) {
  m.impl("surgery_bucket_", &gradproj::cpu::surgery_bucket_cpu);
}
