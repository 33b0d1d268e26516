// CUDA kernel of gradproj::projected_adamw_bucket_.
//
// Contract (gradproj/backends.py, math in gradproj.reference.projected_adamw): one
// AdamW step of every param, with t its step count read on the device,
//   g <- -g if maximize;  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
//   v^ <- max(v^, v) if amsgrad else v
//   x' <- x (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v^) / sqrt(1 - b2^t) + eps)
// then, for every row x' of the param's row view with anchor row c:
//   a = U^T x';  x <- x' - U (w (a - c));  c <- c + (1 - w) (a - c)  (soft weights)
//
// One launch per bucket, the design of kernels/adamw.py: one warp per row of any
// param (row -> param by binary search over the device table), two passes over
// the row. Pass 1 computes x' (nothing stored) and a = U^T x', kCoefBlock
// coefficients per sweep, reduced across the warp by butterflies (deterministic);
// the coefficients are finished with the anchor; pass 2 recomputes x' from the
// same loads with the same arithmetic, stores m, v (v^) and x' - U coef. A row is a
// few KB, so the re-reads hit L1/L2 and DRAM sees one read of p, g, m, v and one
// write of p, m, v. U^T (k x dp, padded) is read from global memory (L1/L2).
// Numerics as the Triton kernel: bias corrections in fp64 from the step count,
// fp32 update with correctly rounded sqrt (__fsqrt_rn) and division, fp32 dot
// products, one rounding per stored element. No host synchronization.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "bucket_checks.h"
#include "cuda/multi_tensor.cuh"

namespace gradproj::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // 8 warps per block
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int kCoefBlock = 16;  // coefficients per sweep of pass 1 (x' recomputed per sweep)

// One param of the bucket in the device table, as int64 words. For side="flat"
// rows == 1 and the column strides are the vector's strides.
struct AdamWEntry {
  int64_t p, g, m, v, vmax;  // addresses (vmax: 0 unless amsgrad)
  int64_t anchor;            // (rows x k) float32
  int64_t step;              // float32 step count, already incremented
  int64_t rows;
  int64_t row_stride;  // p, m, v, v^ share strides
  int64_t col_stride;
  int64_t g_row_stride;
  int64_t g_col_stride;
  int64_t first_row;  // index of its first row among all rows of the launch
};
static_assert(sizeof(AdamWEntry) == 13 * sizeof(int64_t), "AdamWEntry must be packed int64s");

struct Hyper {
  double lr;
  double one_minus_beta1;  // formed in fp64 on the host
  double one_minus_beta2;
  float beta1;
  float beta2;
  float eps;
  float decay;  // 1 - lr wd
};

__device__ __forceinline__ const AdamWEntry& find_param(
    const AdamWEntry* table, int n, int64_t row) {
  int lo = 0;
  int hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table[mid].first_row <= row) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return table[lo];
}

// x' of element o (g's element og) in fp32; stores m, v (v^) when STORE.
template <typename T, bool AMSGRAD, bool MAXIMIZE, bool STORE>
__device__ __forceinline__ float adamw_element(
    const AdamWEntry& e, int64_t o, int64_t og, const Hyper& h, float step_size,
    float inv_sqrt_bias2) {
  T* m_ptr = reinterpret_cast<T*>(e.m);
  T* v_ptr = reinterpret_cast<T*>(e.v);
  float g = static_cast<float>(reinterpret_cast<const T*>(e.g)[og]);
  if (MAXIMIZE) g = -g;
  const float omb1 = static_cast<float>(h.one_minus_beta1);
  const float omb2 = static_cast<float>(h.one_minus_beta2);
  const float m = h.beta1 * static_cast<float>(m_ptr[o]) + omb1 * g;
  const float v = h.beta2 * static_cast<float>(v_ptr[o]) + omb2 * g * g;
  float v_hat = v;
  if (AMSGRAD) {
    T* vmax_ptr = reinterpret_cast<T*>(e.vmax);
    v_hat = fmaxf(static_cast<float>(vmax_ptr[o]), v);
    if (STORE) vmax_ptr[o] = static_cast<T>(v_hat);
  }
  if (STORE) {
    m_ptr[o] = static_cast<T>(m);
    v_ptr[o] = static_cast<T>(v);
  }
  const float p = static_cast<float>(reinterpret_cast<const T*>(e.p)[o]);
  return p * h.decay - step_size * m / (__fsqrt_rn(v_hat) * inv_sqrt_bias2 + h.eps);
}

template <typename T, bool AMSGRAD, bool MAXIMIZE>
__global__ void __launch_bounds__(kThreads) projected_adamw_kernel(
    const AdamWEntry* __restrict__ table, int n_params, int64_t total_rows,
    const float* __restrict__ ut, int64_t d, int64_t dp, int64_t k,
    const float* __restrict__ weights, float* __restrict__ coef_ws, Hyper h) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = warp; row < total_rows; row += warps) {
    const AdamWEntry& e = find_param(table, n_params, row);
    const int64_t r = row - e.first_row;
    // Bias corrections in fp64 from the step count on the device (as kernels/adamw.py):
    // beta^t = exp(t log(1 - (1 - beta))); 1 - b2^t is 1e-3 at t = 1.
    const double t = static_cast<double>(*reinterpret_cast<const float*>(e.step));
    const double bias1 = 1.0 - exp(t * log(1.0 - h.one_minus_beta1));
    const double bias2 = 1.0 - exp(t * log(1.0 - h.one_minus_beta2));
    const float step_size = static_cast<float>(h.lr / bias1);
    const float inv_sqrt_bias2 = static_cast<float>(1.0 / sqrt(bias2));
    const int64_t base = r * e.row_stride;
    const int64_t g_base = r * e.g_row_stride;
    float* coef = coef_ws + row * k;
    float* anchor_row = reinterpret_cast<float*>(e.anchor) + r * k;

    // Pass 1: coef = U^T x', kCoefBlock coefficients per sweep along the row.
    for (int64_t k0 = 0; k0 < k; k0 += kCoefBlock) {
      float acc[kCoefBlock];
#pragma unroll
      for (int b = 0; b < kCoefBlock; ++b) acc[b] = 0.f;
      for (int64_t j = lane; j < d; j += kWarp) {
        const float x = adamw_element<T, AMSGRAD, MAXIMIZE, false>(
            e, base + j * e.col_stride, g_base + j * e.g_col_stride, h, step_size,
            inv_sqrt_bias2);
#pragma unroll
        for (int b = 0; b < kCoefBlock; ++b) {
          if (k0 + b < k) acc[b] += x * __ldg(ut + (k0 + b) * dp + j);
        }
      }
#pragma unroll
      for (int b = 0; b < kCoefBlock; ++b) {
        if (k0 + b < k) {  // uniform across the warp, so the shuffles stay converged
          const float total = warp_sum(acc[b]);
          if (lane == 0) coef[k0 + b] = total;
        }
      }
    }
    __syncwarp();
    // coef <- w (a - c), and c <- c + (1 - w)(a - c) for soft weights.
    for (int64_t kk = lane; kk < k; kk += kWarp) {
      float delta = coef[kk] - anchor_row[kk];
      if (weights != nullptr) {
        anchor_row[kk] += (1.f - weights[kk]) * delta;
        delta *= weights[kk];
      }
      coef[kk] = delta;
    }
    __syncwarp();

    // Pass 2: x' again, m, v (v^) stored, x = x' - U coef stored.
    T* p = reinterpret_cast<T*>(e.p);
    for (int64_t j = lane; j < d; j += kWarp) {
      const int64_t o = base + j * e.col_stride;
      float x = adamw_element<T, AMSGRAD, MAXIMIZE, true>(
          e, o, g_base + j * e.g_col_stride, h, step_size, inv_sqrt_bias2);
      for (int64_t kk = 0; kk < k; ++kk) x -= coef[kk] * __ldg(ut + kk * dp + j);
      p[o] = static_cast<T>(x);
    }
    __syncwarp();
  }
}

template <typename T, bool AMSGRAD, bool MAXIMIZE>
void launch(
    const std::vector<AdamWEntry>& entries, int64_t total_rows, const at::Tensor& basis,
    const float* weights, const Hyper& h) {
  const int64_t d = basis.size(0);
  const int64_t k = basis.size(1);
  const int64_t dp = ((d + 3) / 4) * 4;
  // U^T padded to (k x dp): lane j of a warp reads word j of a row, coalesced.
  at::Tensor ut = at::zeros({k, dp}, basis.options());
  ut.narrow(1, 0, d).copy_(basis.t());
  at::Tensor coef = at::empty({total_rows, k}, basis.options());
  std::vector<int64_t> words;
  words.reserve(entries.size() * 13);
  for (const AdamWEntry& e : entries) {
    words.insert(
        words.end(),
        {e.p, e.g, e.m, e.v, e.vmax, e.anchor, e.step, e.rows, e.row_stride, e.col_stride,
         e.g_row_stride, e.g_col_stride, e.first_row});
  }
  at::Tensor table = upload_words(words, basis.device());
  auto kernel = projected_adamw_kernel<T, AMSGRAD, MAXIMIZE>;
  const int grid =
      resident_grid(kernel, kThreads, 0, (total_rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const AdamWEntry*>(table.data_ptr<int64_t>()),
      static_cast<int>(entries.size()), total_rows, ut.data_ptr<float>(), d, dp, k, weights,
      coef.data_ptr<float>(), h);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch(
    const std::vector<AdamWEntry>& entries, int64_t total_rows, const at::Tensor& basis,
    const float* weights, const Hyper& h, bool amsgrad, bool maximize) {
  if (amsgrad) {
    if (maximize) {
      launch<T, true, true>(entries, total_rows, basis, weights, h);
    } else {
      launch<T, true, false>(entries, total_rows, basis, weights, h);
    }
  } else if (maximize) {
    launch<T, false, true>(entries, total_rows, basis, weights, h);
  } else {
    launch<T, false, false>(entries, total_rows, basis, weights, h);
  }
}

void projected_adamw_bucket_cuda(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
    at::TensorList anchors, const at::Tensor& basis, const std::optional<at::Tensor>& weights,
    c10::string_view side, double lr, double beta1, double beta2, double eps,
    double weight_decay, bool maximize) {
  const Side s = check_adamw_bucket(
      params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, anchors, basis, weights,
      side, c10::DeviceType::CUDA);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(basis.device());
  const bool amsgrad = !max_exp_avg_sqs.empty();
  const bool flat = s == Side::kFlat;
  std::vector<AdamWEntry> entries;
  int64_t total_rows = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const int64_t rows = flat ? 1 : p.size(0);
    entries.push_back(
        {reinterpret_cast<int64_t>(p.data_ptr()), reinterpret_cast<int64_t>(g.data_ptr()),
         reinterpret_cast<int64_t>(exp_avgs[i].data_ptr()),
         reinterpret_cast<int64_t>(exp_avg_sqs[i].data_ptr()),
         amsgrad ? reinterpret_cast<int64_t>(max_exp_avg_sqs[i].data_ptr()) : 0,
         reinterpret_cast<int64_t>(anchors[i].data_ptr<float>()),
         reinterpret_cast<int64_t>(steps[i].data_ptr<float>()), rows, flat ? 0 : p.stride(0),
         flat ? p.stride(0) : p.stride(1), flat ? 0 : g.stride(0),
         flat ? g.stride(0) : g.stride(1), total_rows});
    total_rows += rows;
  }
  const Hyper h{
      lr,
      1.0 - beta1,
      1.0 - beta2,
      static_cast<float>(beta1),
      static_cast<float>(beta2),
      static_cast<float>(eps),
      static_cast<float>(1.0 - lr * weight_decay)};
  const float* w = weights.has_value() ? weights->data_ptr<float>() : nullptr;
  switch (params[0].scalar_type()) {
    case at::kFloat:
      launch<float>(entries, total_rows, basis, w, h, amsgrad, maximize);
      break;
    case at::kBFloat16:
      launch<at::BFloat16>(entries, total_rows, basis, w, h, amsgrad, maximize);
      break;
    case at::kHalf:
      launch<at::Half>(entries, total_rows, basis, w, h, amsgrad, maximize);
      break;
    default:
      TORCH_CHECK(
          false, "gradproj cuda projected AdamW: unsupported dtype ", params[0].scalar_type());
  }
}

}  // namespace
}  // namespace gradproj::cuda

TORCH_LIBRARY_IMPL(gradproj, CUDA, m) {
  m.impl("projected_adamw_bucket_", &gradproj::cuda::projected_adamw_bucket_cuda);
}
