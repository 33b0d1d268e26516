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

using AdamWRowsFn =
    void (*)(const AdamWRef&, int64_t, int64_t, const BasisRef&, float*, float*);
using AdamWColsFn =
    void (*)(const AdamWRef&, int64_t, int64_t, const BasisRef&, float*, float*, float*);
using AdamWFlatPartialFn =
    void (*)(const AdamWRef&, int64_t, int64_t, const BasisRef&, float*, float*);
using AdamWFlatUpdateFn =
    void (*)(const AdamWRef&, int64_t, int64_t, const BasisRef&, float*, const float*);

struct AdamWKernels {
  AdamWRowsFn rows;
  AdamWColsFn cols;
  AdamWFlatPartialFn flat_partial;
  AdamWFlatUpdateFn flat_update;
};

// See csrc/cpu/project.cpp: Lanes is only passed between inlined internal functions.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace isa_default {
namespace {
#include "project_kernels.h"
#include "adamw_kernels.h"
}  // namespace
}  // namespace isa_default

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define GRADPROJ_CPU_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
namespace {
#include "project_kernels.h"
#include "adamw_kernels.h"
}  // namespace
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

namespace {

template <typename T>
AdamWKernels kernels_for(bool amsgrad, bool maximize) {
#ifdef GRADPROJ_CPU_AVX2
  if (use_avx2()) return isa_avx2::adamw_kernels<T>(amsgrad, maximize);
#endif
  return isa_default::adamw_kernels<T>(amsgrad, maximize);
}

AdamWKernels kernels_for(at::ScalarType dtype, bool amsgrad, bool maximize) {
  switch (dtype) {
    case at::kFloat:
      return kernels_for<float>(amsgrad, maximize);
    case at::kBFloat16:
      return kernels_for<at::BFloat16>(amsgrad, maximize);
    case at::kHalf:
      return kernels_for<at::Half>(amsgrad, maximize);
    default:
      TORCH_CHECK(false, "gradproj cpu projected AdamW: unsupported dtype ", dtype);
  }
}

constexpr int64_t kRowsPerItem = 16;     // rows per parallel work item (row layout)
constexpr int64_t kColsPerItem = 64;     // columns of W per work item (column layout)
constexpr int64_t kFlatChunk = 1 << 14;  // elements per chunk of a flat vector; fixed, so
                                         // the reduction order never depends on threads

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

void run_rows(
    const std::vector<AdamWRef>& refs, const at::Tensor& basis, const float* weights,
    const AdamWKernels& kernels) {
  const int64_t d = basis.size(0);
  const int64_t k = basis.size(1);
  struct Item {
    int64_t param;
    int64_t begin;
    int64_t end;
    bool columns;  // a panel of W's columns (transposed view) rather than rows
  };
  std::vector<Item> items;
  bool any_rows = false;
  for (int64_t i = 0; i < static_cast<int64_t>(refs.size()); ++i) {
    const AdamWRef& t = refs[i];
    // As project.cpp's run_rows: a transposed view (unit row stride) by column panels.
    const bool columns = t.row_stride == 1 && t.col_stride != 1 && d > 1 && t.rows > 1;
    const int64_t step = columns ? kColsPerItem : kRowsPerItem;
    any_rows |= !columns;
    for (int64_t b = 0; b < t.rows; b += step) {
      items.push_back({i, b, std::min(t.rows, b + step), columns});
    }
  }
  const at::Tensor ut = any_rows ? basis.t().contiguous() : at::Tensor();
  const BasisRef ref{
      basis.data_ptr<float>(), any_rows ? ut.data_ptr<float>() : nullptr, weights, d, k};
  // Row groups: 4 x d rows of x' and 4 x k coefficients; column panels: d x 16
  // values of x', k x 16 coefficients and k more.
  const int64_t scratch_floats = std::max<int64_t>(4 * d + 4 * k, d * 16 + k * 16 + k);
  int64_t work = 0;  // multiply-adds: each element meets k basis columns twice
  for (const auto& m : refs) work += m.rows * d * std::max<int64_t>(k, 1);
  parallel_items(static_cast<int64_t>(items.size()), work, [&](int64_t first, int64_t last) {
    std::vector<float> scratch(static_cast<size_t>(scratch_floats));
    float* buffer = scratch.data();
    for (int64_t it = first; it < last; ++it) {
      const Item& item = items[it];
      const AdamWRef& t = refs[item.param];
      if (item.columns) {
        float* a = buffer + d * 16;
        kernels.cols(t, item.begin, item.end, ref, buffer, a, a + k * 16);
      } else {
        kernels.rows(t, item.begin, item.end, ref, buffer, buffer + 4 * d);
      }
    }
  });
}

void run_flat(
    const std::vector<AdamWRef>& refs, const at::Tensor& basis, const float* weights,
    const AdamWKernels& kernels) {
  const int64_t d = basis.size(0);
  const int64_t k = basis.size(1);
  const BasisRef ref{basis.data_ptr<float>(), nullptr, weights, d, k};
  const int64_t chunks_per_vector = std::max<int64_t>(1, (d + kFlatChunk - 1) / kFlatChunk);
  const int64_t chunks = chunks_per_vector * static_cast<int64_t>(refs.size());
  const int64_t work = static_cast<int64_t>(refs.size()) * d * std::max<int64_t>(k, 1);
  const auto chunk_range = [&](int64_t chunk) {
    const int64_t begin = (chunk % chunks_per_vector) * kFlatChunk;
    return std::make_pair(begin, std::min(d, begin + kFlatChunk));
  };
  const int64_t buffer_floats = std::min(d, kFlatChunk);
  std::vector<float> partials(static_cast<size_t>(chunks * k));
  parallel_items(chunks, work, [&](int64_t first, int64_t last) {
    std::vector<float> buffer(static_cast<size_t>(buffer_floats));
    for (int64_t chunk = first; chunk < last; ++chunk) {
      const auto [begin, end] = chunk_range(chunk);
      kernels.flat_partial(
          refs[chunk / chunks_per_vector], begin, end, ref, buffer.data(),
          partials.data() + chunk * k);
    }
  });
  std::vector<float> coefs(refs.size() * static_cast<size_t>(k), 0.f);
  for (size_t i = 0; i < refs.size(); ++i) {
    float* coef = coefs.data() + i * k;
    for (int64_t c = 0; c < chunks_per_vector; ++c) {
      const float* partial = partials.data() + (i * chunks_per_vector + c) * k;
      for (int64_t b = 0; b < k; ++b) coef[b] += partial[b];
    }
    finish_coeffs(coef, k, weights, refs[i].anchor);
  }
  parallel_items(chunks, work, [&](int64_t first, int64_t last) {
    std::vector<float> buffer(static_cast<size_t>(buffer_floats));
    for (int64_t chunk = first; chunk < last; ++chunk) {
      const int64_t i = chunk / chunks_per_vector;
      const auto [begin, end] = chunk_range(chunk);
      kernels.flat_update(refs[i], begin, end, ref, buffer.data(), coefs.data() + i * k);
    }
  });
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
    const bool flat = s == Side::kFlat;
    refs.push_back(
        {p.data_ptr(), g.data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
         amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr, anchors[i].data_ptr<float>(),
         flat ? 1 : p.size(0), flat ? 0 : p.stride(0), flat ? p.stride(0) : p.stride(1),
         flat ? 0 : g.stride(0), flat ? g.stride(0) : g.stride(1), scalars});
  }
  const AdamWKernels kernels = kernels_for(params[0].scalar_type(), amsgrad, maximize);
  const float* w = weights.has_value() ? weights->data_ptr<float>() : nullptr;
  if (s == Side::kFlat) {
    run_flat(refs, basis, w, kernels);
  } else {
    run_rows(refs, basis, w, kernels);
  }
}

}  // namespace
}  // namespace gradproj::cpu

TORCH_LIBRARY_IMPL(gradproj, CPU, m) {
  m.impl("projected_adamw_bucket_", &gradproj::cpu::projected_adamw_bucket_cpu);
}
