// CPU kernel of gradproj::projected_adamw_bucket_.
//
// Contract (gradproj/backends.py, math in gradproj.reference.projected_adamw): one
// AdamW step of every param, with t its step count (already incremented),
//   g <- -g if maximize;  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
//   v^ <- max(v^, v) if amsgrad else v
//   x' <- x (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v^) / sqrt(1 - b2^t) + eps)
// then, for every row x' of the param's row view with anchor row c:
//   a = U^T x';  x <- x' - U (w (a - c));  c <- c + (1 - w) (a - c)  (soft weights)
//
// The numerics of the Triton kernel (kernels/adamw.py): the bias corrections in
// fp64 from the step count (beta^t = exp(t log(1 - (1 - beta))), 1 - beta formed
// in fp64), the update in fp32 with a correctly rounded sqrt, a = U^T x' with fp32
// accumulation, and p, m, v (v^) rounded once on store.
//
// How it runs: work items of rows (side="input" and any strides), of column
// panels of W (side="output": transposed views) or of fixed chunks of a vector
// (side="flat") in at::parallel_for. A row item writes m, v while forming x' in a
// per-thread buffer of a few rows, projects the buffer with the kernels of
// project_kernels.h and writes p: p, g, m, v are read once and written once, with
// no full-size temporaries. side="flat" needs a = U^T x' over the whole vector
// before any element changes, so it takes two passes over fixed chunks (partial
// sums in parallel, added in chunk order, then the update, recomputing x' as the
// Triton kernel's second pass does). Deterministic whatever the thread count.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "../bucket_checks.h"
#include "dispatch.h"
#include "kernel_types.h"

namespace gradproj::cpu {

// The AdamW scalars of one param (the bias corrections depend on its step).
struct AdamWScalars {
  float beta1;
  float beta2;
  float one_minus_beta1;
  float one_minus_beta2;
  float eps;
  float decay;           // 1 - lr wd
  float step_size;       // lr / (1 - b1^t)
  float inv_sqrt_bias2;  // 1 / sqrt(1 - b2^t)
};

// One param of the bucket as the kernels see it: its row view and its state, in
// elements; p, m, v, v^ share strides, g has its own. For side="flat" rows == 1
// and the col strides are the vectors' strides.
struct AdamWRef {
  void* p;
  const void* g;
  void* m;
  void* v;
  void* vmax;  // nullptr unless amsgrad
  float* anchor;  // (rows x k) contiguous
  int64_t rows;
  int64_t row_stride;
  int64_t col_stride;
  int64_t g_row_stride;
  int64_t g_col_stride;
  AdamWScalars scalars;
};

using AdamWKernels = ProjectionKernels<AdamWRef>;

}  // namespace gradproj::cpu

#define GRADPROJ_CPU_OP_KERNELS "adamw_kernels.h"
#include "kernels_per_isa.h"

namespace gradproj::cpu {
namespace {

// As kernels/adamw.py: the bias corrections in fp64 from the step count, with
// beta^t = exp(t log(1 - (1 - beta))), then rounded to fp32 for the update.
AdamWScalars adamw_scalars(
    float step, double lr, double beta1, double beta2, double eps, double weight_decay) {
  const double one_minus_beta1 = 1.0 - beta1;
  const double one_minus_beta2 = 1.0 - beta2;
  const double t = static_cast<double>(step);
  const double bias1 = 1.0 - std::exp(t * std::log(1.0 - one_minus_beta1));
  const double bias2 = 1.0 - std::exp(t * std::log(1.0 - one_minus_beta2));
  return AdamWScalars{
      static_cast<float>(beta1),
      static_cast<float>(beta2),
      static_cast<float>(one_minus_beta1),
      static_cast<float>(one_minus_beta2),
      static_cast<float>(eps),
      static_cast<float>(1.0 - lr * weight_decay),
      static_cast<float>(lr / bias1),
      static_cast<float>(1.0 / std::sqrt(bias2)),
  };
}

void projected_adamw_bucket_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
    at::TensorList anchors, const at::Tensor& basis, const std::optional<at::Tensor>& weights,
    c10::string_view side, double lr, double beta1, double beta2, double eps,
    double weight_decay, bool maximize) {
  const Side s = check_adamw_bucket(
      params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, anchors, basis, weights,
      side, c10::DeviceType::CPU);
  if (params.empty()) return;
  const bool amsgrad = !max_exp_avg_sqs.empty();
  std::vector<AdamWRef> refs;
  refs.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const AdamWScalars scalars = adamw_scalars(
        steps[i].item<float>(), lr, beta1, beta2, eps, weight_decay);  // a CPU read, no sync
    const RowView pv = row_view(p, s);
    const RowView gv = row_view(g, s);
    refs.push_back(
        {p.data_ptr(), g.data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
         amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr, anchors[i].data_ptr<float>(),
         pv.rows, pv.row_stride, pv.col_stride, gv.row_stride, gv.col_stride, scalars});
  }
  const AdamWKernels kernels =
      dispatch_float_types(params[0].scalar_type(), "projected AdamW", [&](auto zero) {
        using T = decltype(zero);
        return for_this_cpu(
            isa_avx2::adamw_kernels<T>(amsgrad, maximize),
            isa_default::adamw_kernels<T>(amsgrad, maximize));
      });
  run_projection(refs, basis, weights, s, kernels);
}

}  // namespace
}  // namespace gradproj::cpu

TORCH_LIBRARY_IMPL(gradproj, CPU, m) {
  m.impl("projected_adamw_bucket_", &gradproj::cpu::projected_adamw_bucket_cpu);
}
