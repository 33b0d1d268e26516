// CUDA kernels of gradproj::project_bucket_ and gradproj::project_anchored_bucket_.
//
// Contract (gradproj/backends.py): every row x of every matrix in the bucket
// becomes x - U (w * U^T x); the anchored form uses a - c for a = U^T x and
// updates the anchor row c. U is (d x k) float32 contiguous.
//
// Three layouts, each one launch for all its matrices (a bucket normally has one):
//  * rows (side="input", or any strides): one warp per row. Pass 1 reads the row
//    with 128-bit loads (when the row is 16-byte aligned and unit-stride) and
//    forms a = U^T x with U^T (k x d) in shared memory, reduced across the warp
//    by a butterfly (deterministic); pass 2 re-reads the row (from L1/L2: a row
//    is a few KB) and writes x - U a. Each element is read from DRAM once and
//    written once.
//  * columns (side="output": transposed views with unit row stride): one warp
//    per 32 columns of G, one column per lane, so every access to a row of G is
//    coalesced; U (d x k) in shared memory is read as warp-wide broadcasts.
//  * flat: a = U^T x is a reduction over a whole (long) vector, which needs every
//    block's partial sum before any element changes: three stream-ordered
//    kernels (partial sums per fixed chunk; combine in chunk order; update).
// When U does not fit in shared memory it is read from global memory (L2).
// Accumulation is fp32 for every dtype; bf16/fp16 are rounded once on store.
// Coefficients go through a small (rows x k) fp32 workspace, so any k works.
// No host synchronization: tables are copied from pinned memory, non_blocking.

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
constexpr int kThreads = 256;               // 8 warps per block
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int kRowCoefBlock = 8;            // coefficients per pass over a row
constexpr int kColCoefBlock = 16;           // coefficients kept in registers per column
constexpr int64_t kFlatChunk = kThreads * 16;  // elements per block of a flat vector

// 128 bits of T: the unit of a vectorized load or store.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// The multiplier of U's column kk from the coefficient a = (U^T x)[kk]:
//   plain:    w * a
//   anchored: delta = a - c;  c <- c + (1 - w) delta (with weights);  w * delta
__device__ __forceinline__ float finish_coef(
    float a, int64_t kk, const float* weights, float* anchor_row) {
  if (anchor_row != nullptr) {
    float delta = a - anchor_row[kk];
    if (weights != nullptr) {
      anchor_row[kk] += (1.f - weights[kk]) * delta;
      delta *= weights[kk];
    }
    return delta;
  }
  return weights != nullptr ? a * weights[kk] : a;
}

// Copies `count` floats (count % 4 == 0, src 16-byte aligned) into shared memory.
__device__ __forceinline__ void stage_basis(float* smem, const float* src, int64_t count) {
  const float4* src4 = reinterpret_cast<const float4*>(src);
  float4* dst4 = reinterpret_cast<float4*>(smem);
  for (int64_t i = threadIdx.x; i < count / 4; i += blockDim.x) dst4[i] = src4[i];
  __syncthreads();
}

// ---------------------------------------------------------------------------
// Rows: one warp per row. ut_global is U^T padded to (k x dp), dp % 4 == 0.
// coef: (total rows x k) workspace, row-major.
// ---------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) project_rows_kernel(
    const MatrixEntry* __restrict__ table, int n_matrices, int64_t total_rows,
    const float* __restrict__ ut_global, int64_t d, int64_t dp, int64_t k,
    const float* __restrict__ weights, float* __restrict__ coef_ws, bool basis_in_smem) {
  extern __shared__ float4 smem_raw[];
  const float* ut = ut_global;
  if (basis_in_smem) {
    float* smem = reinterpret_cast<float*>(smem_raw);
    stage_basis(smem, ut_global, k * dp);
    ut = smem;
  }
  constexpr int V = Pack<T>::kSize;
  static_assert(V % 4 == 0, "a pack is a whole number of float4 basis reads");
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = warp; row < total_rows; row += warps) {
    const MatrixEntry& m = find_entry(table, n_matrices, row);
    const int64_t r = row - m.first_row;
    T* x = reinterpret_cast<T*>(m.data) + r * m.row_stride;
    const int64_t cs = m.col_stride;
    float* coef = coef_ws + row * k;
    float* anchor_row = m.anchor != 0 ? reinterpret_cast<float*>(m.anchor) + r * k : nullptr;
    // 128-bit accesses need a unit stride and a 16-byte aligned row start;
    // the last d % V elements of a row are handled one by one.
    const bool packed = cs == 1 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
    const int64_t d_packed = packed ? d - d % V : 0;

    // Pass 1: coef = U^T x, kRowCoefBlock coefficients per pass over the row.
    for (int64_t k0 = 0; k0 < k; k0 += kRowCoefBlock) {
      float acc[kRowCoefBlock];
#pragma unroll
      for (int b = 0; b < kRowCoefBlock; ++b) acc[b] = 0.f;
      for (int64_t j = static_cast<int64_t>(lane) * V; j < d_packed; j += kWarp * V) {
        const Pack<T> p = *reinterpret_cast<const Pack<T>*>(x + j);
#pragma unroll
        for (int b = 0; b < kRowCoefBlock; ++b) {
          if (k0 + b < k) {
            // float4 reads: 16-byte aligned (dp % 4 == 0, j % 4 == 0), and a warp's
            // lanes read consecutive 16-byte words, free of bank conflicts.
            const float4* u4 = reinterpret_cast<const float4*>(ut + (k0 + b) * dp + j);
#pragma unroll
            for (int q = 0; q < V / 4; ++q) {
              const float4 u = u4[q];
              acc[b] += static_cast<float>(p.v[4 * q]) * u.x;
              acc[b] += static_cast<float>(p.v[4 * q + 1]) * u.y;
              acc[b] += static_cast<float>(p.v[4 * q + 2]) * u.z;
              acc[b] += static_cast<float>(p.v[4 * q + 3]) * u.w;
            }
          }
        }
      }
      for (int64_t j = d_packed + lane; j < d; j += kWarp) {
        const float xj = static_cast<float>(x[j * cs]);
#pragma unroll
        for (int b = 0; b < kRowCoefBlock; ++b) {
          if (k0 + b < k) acc[b] += xj * ut[(k0 + b) * dp + j];
        }
      }
#pragma unroll
      for (int b = 0; b < kRowCoefBlock; ++b) {
        if (k0 + b < k) {  // uniform across the warp, so the shuffles stay converged
          const float total = warp_sum(acc[b]);
          if (lane == 0) coef[k0 + b] = total;
        }
      }
    }
    __syncwarp();
    for (int64_t kk = lane; kk < k; kk += kWarp) {
      coef[kk] = finish_coef(coef[kk], kk, weights, anchor_row);
    }
    __syncwarp();

    // Pass 2: x -= U coef.
    for (int64_t j = static_cast<int64_t>(lane) * V; j < d_packed; j += kWarp * V) {
      Pack<T> p = *reinterpret_cast<const Pack<T>*>(x + j);
      float out[V];
#pragma unroll
      for (int v = 0; v < V; ++v) out[v] = static_cast<float>(p.v[v]);
      for (int64_t kk = 0; kk < k; ++kk) {
        const float c = coef[kk];
        const float4* u4 = reinterpret_cast<const float4*>(ut + kk * dp + j);
#pragma unroll
        for (int q = 0; q < V / 4; ++q) {
          const float4 u = u4[q];
          out[4 * q] -= c * u.x;
          out[4 * q + 1] -= c * u.y;
          out[4 * q + 2] -= c * u.z;
          out[4 * q + 3] -= c * u.w;
        }
      }
#pragma unroll
      for (int v = 0; v < V; ++v) p.v[v] = static_cast<T>(out[v]);
      *reinterpret_cast<Pack<T>*>(x + j) = p;
    }
    for (int64_t j = d_packed + lane; j < d; j += kWarp) {
      float out = static_cast<float>(x[j * cs]);
      for (int64_t kk = 0; kk < k; ++kk) out -= coef[kk] * ut[kk * dp + j];
      x[j * cs] = static_cast<T>(out);
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------
// Columns: the matrix is a transposed view (row stride 1), so its row c is
// column c of G (d x R, row stride ld = col_stride). One lane per column.
// u_global is U (d x k); coef: (k x total rows) workspace, so a warp's 32 lanes
// touch 32 consecutive words.
// ---------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) project_cols_kernel(
    const MatrixEntry* __restrict__ table, int n_matrices, int64_t total_tasks,
    int64_t total_rows, const float* __restrict__ u_global, int64_t d, int64_t k,
    const float* __restrict__ weights, float* __restrict__ coef_ws, bool basis_in_smem) {
  extern __shared__ float4 smem_raw[];
  const float* u = u_global;
  if (basis_in_smem) {
    // Element by element: the caller's basis may start at any 4-byte offset.
    float* smem = reinterpret_cast<float*>(smem_raw);
    for (int64_t i = threadIdx.x; i < d * k; i += blockDim.x) smem[i] = u_global[i];
    __syncthreads();
    u = smem;
  }
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t task = warp; task < total_tasks; task += warps) {
    const MatrixEntry& m = find_entry(table, n_matrices, task);
    const int64_t c = (task - m.first_task) * kWarp + lane;  // this lane's column of G
    if (c >= m.rows) continue;  // no warp-wide operations below, so lanes may leave
    T* g = reinterpret_cast<T*>(m.data) + c;
    const int64_t ld = m.col_stride;
    const int64_t row = m.first_row + c;
    float* anchor_row = m.anchor != 0 ? reinterpret_cast<float*>(m.anchor) + c * k : nullptr;

    // Pass 1: a = U^T g, kColCoefBlock coefficients per pass down the column.
    float head[kColCoefBlock];  // the first block stays in registers for pass 2
    for (int64_t k0 = 0; k0 < k; k0 += kColCoefBlock) {
      float acc[kColCoefBlock];
#pragma unroll
      for (int b = 0; b < kColCoefBlock; ++b) acc[b] = 0.f;
      for (int64_t j = 0; j < d; ++j) {
        const float gj = static_cast<float>(g[j * ld]);
        const float* uj = u + j * k + k0;
#pragma unroll
        for (int b = 0; b < kColCoefBlock; ++b) {
          if (k0 + b < k) acc[b] += uj[b] * gj;
        }
      }
#pragma unroll
      for (int b = 0; b < kColCoefBlock; ++b) {
        if (k0 + b < k) {
          const float a = finish_coef(acc[b], k0 + b, weights, anchor_row);
          if (k0 == 0) {
            head[b] = a;
          } else {
            coef_ws[(k0 + b) * total_rows + row] = a;
          }
        } else if (k0 == 0) {
          head[b] = 0.f;
        }
      }
    }

    // Pass 2: g -= U a, all k coefficients per element (one rounding per element).
    for (int64_t j = 0; j < d; ++j) {
      float out = static_cast<float>(g[j * ld]);
      const float* uj = u + j * k;
#pragma unroll
      for (int b = 0; b < kColCoefBlock; ++b) {
        if (b < k) out -= uj[b] * head[b];
      }
      for (int64_t kk = kColCoefBlock; kk < k; ++kk) out -= uj[kk] * coef_ws[kk * total_rows + row];
      g[j * ld] = static_cast<T>(out);
    }
  }
}

// ---------------------------------------------------------------------------
// Flat: vectors of d elements (stride col_stride), U (d x k) read from global.
// Chunk q of vector i is global chunk i * chunks_per_vector + q.
// ---------------------------------------------------------------------------

// partials[chunk * k + kk] = sum over the chunk's elements of x[j] u[j, kk].
template <typename T>
__global__ void __launch_bounds__(kThreads) flat_partials_kernel(
    const MatrixEntry* __restrict__ table, int64_t chunks_per_vector, int64_t total_chunks,
    const float* __restrict__ u, int64_t d, int64_t k, float* __restrict__ partials) {
  __shared__ float warp_sums[kWarpsPerBlock][kRowCoefBlock];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const MatrixEntry& m = table[chunk / chunks_per_vector];
    const T* x = reinterpret_cast<const T*>(m.data);
    const int64_t begin = (chunk % chunks_per_vector) * kFlatChunk;
    const int64_t end = begin + kFlatChunk < d ? begin + kFlatChunk : d;
    for (int64_t k0 = 0; k0 < k; k0 += kRowCoefBlock) {
      float acc[kRowCoefBlock];
#pragma unroll
      for (int b = 0; b < kRowCoefBlock; ++b) acc[b] = 0.f;
      for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
        const float xj = static_cast<float>(x[j * m.col_stride]);
#pragma unroll
        for (int b = 0; b < kRowCoefBlock; ++b) {
          if (k0 + b < k) acc[b] += xj * u[j * k + k0 + b];
        }
      }
#pragma unroll
      for (int b = 0; b < kRowCoefBlock; ++b) {
        const float s = warp_sum(acc[b]);
        if (lane == 0) warp_sums[warp][b] = s;
      }
      __syncthreads();
      if (threadIdx.x < kRowCoefBlock && k0 + threadIdx.x < k) {
        float total = 0.f;
        for (int w = 0; w < kWarpsPerBlock; ++w) total += warp_sums[w][threadIdx.x];
        partials[chunk * k + k0 + threadIdx.x] = total;
      }
      __syncthreads();
    }
  }
}

// coef[i * k + kk] = finish(sum over vector i's chunks, in order, of partials).
__global__ void flat_combine_kernel(
    const MatrixEntry* __restrict__ table, int n_vectors, int64_t chunks_per_vector, int64_t k,
    const float* __restrict__ partials, const float* __restrict__ weights,
    float* __restrict__ coef) {
  for (int64_t i = blockIdx.x; i < n_vectors; i += gridDim.x) {
    const MatrixEntry& m = table[i];
    float* anchor_row = m.anchor != 0 ? reinterpret_cast<float*>(m.anchor) : nullptr;
    for (int64_t kk = threadIdx.x; kk < k; kk += blockDim.x) {
      float total = 0.f;
      for (int64_t q = 0; q < chunks_per_vector; ++q) {
        total += partials[(i * chunks_per_vector + q) * k + kk];
      }
      coef[i * k + kk] = finish_coef(total, kk, weights, anchor_row);
    }
  }
}

// x[j] -= sum_kk u[j, kk] coef[kk].
template <typename T>
__global__ void __launch_bounds__(kThreads) flat_update_kernel(
    const MatrixEntry* __restrict__ table, int64_t chunks_per_vector, int64_t total_chunks,
    const float* __restrict__ u, int64_t d, int64_t k, const float* __restrict__ coef_ws) {
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const int64_t i = chunk / chunks_per_vector;
    const MatrixEntry& m = table[i];
    T* x = reinterpret_cast<T*>(m.data);
    const float* coef = coef_ws + i * k;
    const int64_t begin = (chunk % chunks_per_vector) * kFlatChunk;
    const int64_t end = begin + kFlatChunk < d ? begin + kFlatChunk : d;
    for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
      float out = static_cast<float>(x[j * m.col_stride]);
      for (int64_t kk = 0; kk < k; ++kk) out -= u[j * k + kk] * coef[kk];
      x[j * m.col_stride] = static_cast<T>(out);
    }
  }
}

// ---------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------

// Grid size: enough resident blocks to fill the device, never more than the work.
template <typename Kernel>
int grid_for(Kernel kernel, size_t smem_bytes, int64_t blocks_of_work) {
  return resident_grid(kernel, kThreads, smem_bytes, blocks_of_work);
}

// Dynamic shared memory for `floats` basis values, or 0 when they do not fit
// (the kernel then reads the basis from global memory).
template <typename Kernel>
size_t basis_smem_bytes(Kernel kernel, int64_t floats) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const size_t bytes = static_cast<size_t>(((floats + 3) / 4) * 4) * sizeof(float);
  if (bytes > prop->sharedMemPerBlockOptin) return 0;
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  return bytes;
}

float* anchor_address(at::TensorList anchors, size_t i) {
  return anchors.empty() ? nullptr : anchors[i].data_ptr<float>();
}

template <typename T>
void launch_rows(
    const std::vector<size_t>& which, at::TensorList matrices, at::TensorList anchors,
    const at::Tensor& basis, const float* weights) {
  const int64_t d = basis.size(0);
  const int64_t k = basis.size(1);
  const int64_t dp = ((d + 3) / 4) * 4;
  std::vector<MatrixEntry> entries;
  int64_t total_rows = 0;
  for (size_t i : which) {
    const at::Tensor& m = matrices[i];
    entries.push_back(
        {reinterpret_cast<int64_t>(m.data_ptr()), m.size(0), m.stride(0), m.stride(1),
         total_rows, total_rows, reinterpret_cast<int64_t>(anchor_address(anchors, i))});
    total_rows += m.size(0);
  }
  // U^T padded to (k x dp) so rows of it are 16-byte aligned for float4 reads.
  at::Tensor ut = at::zeros({k, dp}, basis.options());
  ut.narrow(1, 0, d).copy_(basis.t());
  at::Tensor coef = at::empty({total_rows, k}, basis.options());
  at::Tensor table = upload_table(entries, basis.device());
  auto kernel = project_rows_kernel<T>;
  const size_t smem = basis_smem_bytes(kernel, k * dp);
  const int grid = grid_for(kernel, smem, (total_rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  kernel<<<grid, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const MatrixEntry*>(table.data_ptr<int64_t>()),
      static_cast<int>(entries.size()), total_rows, ut.data_ptr<float>(), d, dp, k, weights,
      coef.data_ptr<float>(), smem > 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_cols(
    const std::vector<size_t>& which, at::TensorList matrices, at::TensorList anchors,
    const at::Tensor& basis, const float* weights) {
  const int64_t d = basis.size(0);
  const int64_t k = basis.size(1);
  std::vector<MatrixEntry> entries;
  int64_t total_rows = 0;
  int64_t total_tasks = 0;
  for (size_t i : which) {
    const at::Tensor& m = matrices[i];
    entries.push_back(
        {reinterpret_cast<int64_t>(m.data_ptr()), m.size(0), m.stride(0), m.stride(1),
         total_tasks, total_rows, reinterpret_cast<int64_t>(anchor_address(anchors, i))});
    total_rows += m.size(0);
    total_tasks += (m.size(0) + kWarp - 1) / kWarp;
  }
  at::Tensor coef = at::empty({k, total_rows}, basis.options());
  at::Tensor table = upload_table(entries, basis.device());
  auto kernel = project_cols_kernel<T>;
  const size_t smem = basis_smem_bytes(kernel, d * k);
  const int grid = grid_for(kernel, smem, (total_tasks + kWarpsPerBlock - 1) / kWarpsPerBlock);
  kernel<<<grid, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const MatrixEntry*>(table.data_ptr<int64_t>()),
      static_cast<int>(entries.size()), total_tasks, total_rows, basis.data_ptr<float>(), d, k,
      weights, coef.data_ptr<float>(), smem > 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_flat(
    at::TensorList matrices, at::TensorList anchors, const at::Tensor& basis,
    const float* weights) {
  const int64_t d = basis.size(0);
  const int64_t k = basis.size(1);
  const int64_t n = static_cast<int64_t>(matrices.size());
  std::vector<MatrixEntry> entries;
  for (size_t i = 0; i < matrices.size(); ++i) {
    entries.push_back(
        {reinterpret_cast<int64_t>(matrices[i].data_ptr()), 1, 0, matrices[i].stride(0),
         static_cast<int64_t>(i), static_cast<int64_t>(i),
         reinterpret_cast<int64_t>(anchor_address(anchors, i))});
  }
  const int64_t chunks_per_vector = std::max<int64_t>(1, (d + kFlatChunk - 1) / kFlatChunk);
  const int64_t total_chunks = chunks_per_vector * n;
  at::Tensor partials = at::empty({total_chunks, k}, basis.options());
  at::Tensor coef = at::empty({n, k}, basis.options());
  at::Tensor table = upload_table(entries, basis.device());
  const auto* table_ptr = reinterpret_cast<const MatrixEntry*>(table.data_ptr<int64_t>());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float* u = basis.data_ptr<float>();

  auto partials_kernel = flat_partials_kernel<T>;
  flat_partials_kernel<T><<<grid_for(partials_kernel, 0, total_chunks), kThreads, 0, stream>>>(
      table_ptr, chunks_per_vector, total_chunks, u, d, k, partials.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int combine_grid = static_cast<int>(std::min<int64_t>(n, 65535));
  flat_combine_kernel<<<combine_grid, kThreads, 0, stream>>>(
      table_ptr, static_cast<int>(n), chunks_per_vector, k, partials.data_ptr<float>(), weights,
      coef.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto update_kernel = flat_update_kernel<T>;
  flat_update_kernel<T><<<grid_for(update_kernel, 0, total_chunks), kThreads, 0, stream>>>(
      table_ptr, chunks_per_vector, total_chunks, u, d, k, coef.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run_bucket(
    at::TensorList matrices, at::TensorList anchors, const at::Tensor& basis,
    const float* weights, Side side) {
  if (side == Side::kFlat) {
    launch_flat<T>(matrices, anchors, basis, weights);
    return;
  }
  // Transposed views (side="output") run in the column layout, everything else
  // in the row layout; a bucket mixing both (rare) takes one launch per layout.
  const int64_t d = basis.size(0);
  std::vector<size_t> rows;
  std::vector<size_t> cols;
  for (size_t i = 0; i < matrices.size(); ++i) {
    const at::Tensor& m = matrices[i];
    const bool transposed = m.stride(0) == 1 && m.stride(1) != 1 && m.size(0) > 1 && d > 1;
    (transposed ? cols : rows).push_back(i);
  }
  if (!rows.empty()) launch_rows<T>(rows, matrices, anchors, basis, weights);
  if (!cols.empty()) launch_cols<T>(cols, matrices, anchors, basis, weights);
}

void dispatch(
    at::TensorList matrices, at::TensorList anchors, const at::Tensor& basis,
    const std::optional<at::Tensor>& weights, Side side) {
  if (matrices.empty()) return;
  const c10::cuda::CUDAGuard guard(basis.device());
  const float* w = weights.has_value() ? weights->data_ptr<float>() : nullptr;
  switch (matrices[0].scalar_type()) {
    case at::kFloat:
      run_bucket<float>(matrices, anchors, basis, w, side);
      break;
    case at::kBFloat16:
      run_bucket<at::BFloat16>(matrices, anchors, basis, w, side);
      break;
    case at::kHalf:
      run_bucket<at::Half>(matrices, anchors, basis, w, side);
      break;
    default:
      TORCH_CHECK(false, "gradproj cuda kernels: unsupported dtype ", matrices[0].scalar_type());
  }
}

void project_bucket_cuda(
    at::TensorList matrices, const at::Tensor& basis, const std::optional<at::Tensor>& weights,
    c10::string_view side) {
  const Side s = check_bucket(matrices, basis, weights, side, c10::DeviceType::CUDA);
  dispatch(matrices, {}, basis, weights, s);
}

void project_anchored_bucket_cuda(
    at::TensorList matrices, at::TensorList anchors, const at::Tensor& basis,
    const std::optional<at::Tensor>& weights, c10::string_view side) {
  const Side s = check_bucket(matrices, basis, weights, side, c10::DeviceType::CUDA);
  check_anchors(matrices, anchors, basis, s);
  dispatch(matrices, anchors, basis, weights, s);
}

}  // namespace
}  // namespace gradproj::cuda

TORCH_LIBRARY_IMPL(gradproj, CUDA, m) {
  m.impl("project_bucket_", &gradproj::cuda::project_bucket_cuda);
  m.impl("project_anchored_bucket_", &gradproj::cuda::project_anchored_bucket_cuda);
}
