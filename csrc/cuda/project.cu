// CUDA kernels of gradproj::project_bucket_ and gradproj::project_anchored_bucket_.
//
// Contract (gradproj/backends.py): every row x of every matrix in the bucket
// becomes x - U (w * U^T x); the anchored form uses a - c for a = U^T x and
// updates the anchor row c. U is (d x k) float32 contiguous.
//
// The kernels are the row-tile engine of cuda/tile.cuh with ProjectPolicy (load
// and store a gradient element), one launch (or one split launch) per layout:
//  * rows (side="input", or any strides): a CTA holds a tile of rows in
//    registers, U^T staged in shared memory, read once / written once when
//    d <= 4096 (4-element vector loads, 16 bytes of fp32, when every row allows them);
//  * cols (side="output": transposed views with unit row stride): a CTA owns 32
//    columns of G, one per lane, and walks G's rows, so loads are coalesced;
//    read once / written once when d <= 256;
//  * flat: each 1-D view is one row of the rows layout (one launch for the whole
//    bucket); a view longer than 4096 is cut into fixed segments across CTAs
//    with the deterministic split (partials, combine in order, apply).
// Accumulation is fp32 for every dtype; bf16/fp16 are rounded once on store.
// The packed basis and the device tables are cached (cuda/device_cache.cuh);
// no host synchronization.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "bucket_checks.h"
#include "cuda/launch.cuh"
#include "cuda/multi_tensor.cuh"
#include "cuda/tile.cuh"

namespace gradproj::cuda {
namespace {

// How the engine reads and writes one gradient row (a row of a MatrixEntry's view).
// kVec: every row of the launch is unit-stride and 16-byte aligned.
template <typename T, bool kVec>
struct ProjectPolicy {
  using Scalar = T;
  // Rows per group: a thread holds 2 x 16 fp32 values. (4 rows spill at the
  // 128-register cap of 2 CTAs per SM.)
  static constexpr int kRows = 2;
  static constexpr int kColsEpt = tile::kColsEpt;  // cols layout: elements of a column per thread
  static constexpr int V = tile::Pack<T>::kSize;

  const MatrixEntry* table;
  int n;
  int64_t k;

  struct Row {
    T* x;        // element 0 of the row
    int64_t cs;  // elements between entries of the row
  };

  __device__ const MatrixEntry& entry(int64_t row) const {
    return tile::find_first(table, n, row, &MatrixEntry::first_row);
  }
  __device__ Row row(int64_t row) const {  // model-uniform
    const MatrixEntry& m = entry(row);
    return {reinterpret_cast<T*>(m.data) + (row - m.first_row) * m.row_stride, m.col_stride};
  }
  __device__ float* anchor_row(int64_t row) const {  // model-uniform
    const MatrixEntry& m = entry(row);
    return m.anchor != 0 ? reinterpret_cast<float*>(m.anchor) + (row - m.first_row) * k : nullptr;
  }
  // Cols layout: the view row of `lane` in 32-row block `task`, or -1 past the matrix.
  __device__ int64_t task_row(int64_t task, int lane) const {  // model-uniform
    const MatrixEntry& m = tile::find_first(table, n, task, &MatrixEntry::first_task);
    const int64_t i = (task - m.first_task) * tile::kWarp + lane;
    return i < m.rows ? m.first_row + i : -1;
  }
  // Elements [j, j + V) of the row as fp32; those at or past d read as 0.
  template <bool kFinal>
  __device__ __forceinline__ void load(const Row& w, int64_t j, int64_t d, float (&x)[V]) const {
    if (kVec && j + V <= d) {
      const tile::Pack<T> p = *reinterpret_cast<const tile::Pack<T>*>(w.x + j);
#pragma unroll
      for (int v = 0; v < V; ++v) x[v] = static_cast<float>(p.v[v]);
    } else {  // model-cold-if: vec (with vectors, only a row's ragged end)
#pragma unroll
      for (int v = 0; v < V; ++v) x[v] = j + v < d ? static_cast<float>(w.x[(j + v) * w.cs]) : 0.f;
    }
  }
  // Stores elements [j, j + V) of the row that lie before d.
  __device__ __forceinline__ void store(const Row& w, int64_t j, int64_t d, const float (&x)[V]) const {
    if (kVec && j + V <= d) {
      tile::Pack<T> p;
#pragma unroll
      for (int v = 0; v < V; ++v) p.v[v] = static_cast<T>(x[v]);
      *reinterpret_cast<tile::Pack<T>*>(w.x + j) = p;
    } else {  // model-cold-if: vec
#pragma unroll
      for (int v = 0; v < V; ++v) {
        if (j + v < d) w.x[(j + v) * w.cs] = static_cast<T>(x[v]);
      }
    }
  }
  template <bool kFinal>
  __device__ __forceinline__ float load1(const Row& w, int64_t j) const {
    return static_cast<float>(w.x[j * w.cs]);
  }
  __device__ __forceinline__ void store1(const Row& w, int64_t j, float x) const {
    w.x[j * w.cs] = static_cast<T>(x);
  }
};

float* anchor_address(at::TensorList anchors, size_t i) {
  return anchors.empty() ? nullptr : anchors[i].data_ptr<float>();
}

// Rows layout (and flat: each view one row of d elements).
template <typename T>
void launch_rows(
    const std::vector<size_t>& which, at::TensorList matrices, at::TensorList anchors,
    const at::Tensor& basis, const float* weights, bool flat) {
  std::vector<MatrixEntry> entries;
  int64_t total_rows = 0;
  bool vec = true;
  for (size_t i : which) {
    const at::Tensor& m = matrices[i];
    const int64_t rows = flat ? 1 : m.size(0);
    const int64_t row_stride = flat ? 0 : m.stride(0);
    const int64_t col_stride = flat ? m.stride(0) : m.stride(1);
    vec = vec && tile::vector_rows(m, row_stride, col_stride, rows);
    entries.push_back(
        {reinterpret_cast<int64_t>(m.data_ptr()), rows, row_stride, col_stride, total_rows,
         total_rows, reinterpret_cast<int64_t>(anchor_address(anchors, i))});
    total_rows += rows;
  }
  const DeviceTable<MatrixEntry> table(entries, basis.device());
  const int64_t k = basis.size(1);
  if (vec) {
    tile::run_rows(
        ProjectPolicy<T, true>{table.data(), table.size(), k}, total_rows, basis, weights);
  } else {
    tile::run_rows(
        ProjectPolicy<T, false>{table.data(), table.size(), k}, total_rows, basis, weights);
  }
}

// Cols layout: transposed views, one task per 32 view rows (columns of G).
template <typename T>
void launch_cols(
    const std::vector<size_t>& which, at::TensorList matrices, at::TensorList anchors,
    const at::Tensor& basis, const float* weights) {
  std::vector<MatrixEntry> entries;
  int64_t total_rows = 0;
  int64_t total_tasks = 0;
  for (size_t i : which) {
    const at::Tensor& m = matrices[i];
    entries.push_back(
        {reinterpret_cast<int64_t>(m.data_ptr()), m.size(0), m.stride(0), m.stride(1),
         total_tasks, total_rows, reinterpret_cast<int64_t>(anchor_address(anchors, i))});
    total_rows += m.size(0);
    total_tasks += (m.size(0) + tile::kWarp - 1) / tile::kWarp;
  }
  const DeviceTable<MatrixEntry> table(entries, basis.device());
  tile::run_cols(
      ProjectPolicy<T, false>{table.data(), table.size(), basis.size(1)}, total_rows, total_tasks,
      basis, weights);
}

template <typename T>
void run_bucket(
    at::TensorList matrices, at::TensorList anchors, const at::Tensor& basis,
    const float* weights, Side side) {
  std::vector<size_t> rows;
  std::vector<size_t> cols;
  if (side == Side::kFlat) {
    for (size_t i = 0; i < matrices.size(); ++i) rows.push_back(i);
    launch_rows<T>(rows, matrices, anchors, basis, weights, /*flat=*/true);
    return;
  }
  // Transposed views (side="output") run in the column layout, everything else
  // in the row layout; a bucket mixing both (rare) takes one launch per layout.
  const int64_t d = basis.size(0);
  for (size_t i = 0; i < matrices.size(); ++i) {
    const at::Tensor& m = matrices[i];
    const bool transposed = m.stride(0) == 1 && m.stride(1) != 1 && m.size(0) > 1 && d > 1;
    (transposed ? cols : rows).push_back(i);
  }
  if (!rows.empty()) launch_rows<T>(rows, matrices, anchors, basis, weights, /*flat=*/false);
  if (!cols.empty()) launch_cols<T>(cols, matrices, anchors, basis, weights);
}

void dispatch(
    at::TensorList matrices, at::TensorList anchors, const at::Tensor& basis,
    const std::optional<at::Tensor>& weights, Side side) {
  if (matrices.empty()) return;
  const float* w = weights.has_value() ? weights->data_ptr<float>() : nullptr;
  dispatch_dtype(basis.device(), matrices[0].scalar_type(), "kernels", [&](auto dtype) {
    run_bucket<typename decltype(dtype)::type>(matrices, anchors, basis, w, side);
  });
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
