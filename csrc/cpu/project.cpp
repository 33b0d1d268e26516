// CPU kernels of gradproj::project_bucket_ and gradproj::project_anchored_bucket_.
//
// Contract (gradproj/backends.py): every row x of every matrix in the bucket
// becomes x - U (w * U^T x); the anchored form uses a - c for a = U^T x and
// updates the anchor row c. Matrices are strided 2-D views (side input/output)
// or 1-D vectors (side flat) of one dtype; U is (d x k) float32 contiguous.
//
// How it runs (the work items: run_projection in dispatch.h; the kernels:
// project_kernels.h):
//  * rows with unit column stride (side="input"): groups of 4 rows, two passes
//    along the row with U^T (k x d), each basis load shared by the 4 rows;
//  * transposed views with unit row stride (side="output"): panels of 16
//    columns of G itself, A = U^T G then G -= U A, vectorized along the columns;
//  * any other strides: rows gathered into a small fp32 buffer and back;
//  * side="flat": one vector per matrix, split into fixed chunks; per-chunk
//    partial sums run in parallel and are combined in chunk order.
// All arithmetic is in fp32 (bf16/fp16 converted on load and rounded once on
// store). Every output depends only on its inputs and the instruction set, never
// on the thread count, so repeated calls give the same bits. Scratch memory is
// per thread and O(d * 16 + k * 16) floats: no full-size temporaries.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../bucket_checks.h"
#include "dispatch.h"
#include "kernel_types.h"

// project_kernels.h, once per instruction set.
#include "kernels_per_isa.h"

namespace gradproj::cpu {
namespace {

void run_bucket(
    at::TensorList matrices, at::TensorList anchors, const at::Tensor& basis,
    const std::optional<at::Tensor>& weights, Side side) {
  if (matrices.empty()) return;
  std::vector<MatrixRef> mats;
  mats.reserve(matrices.size());
  for (size_t i = 0; i < matrices.size(); ++i) {
    const at::Tensor& m = matrices[i];
    const RowView view = row_view(m, side);
    float* anchor = anchors.empty() ? nullptr : anchors[i].data_ptr<float>();
    mats.push_back({m.data_ptr(), view.rows, view.row_stride, view.col_stride, anchor});
  }
  const ProjectionKernels<MatrixRef> kernels =
      dispatch_float_types(matrices[0].scalar_type(), "projection", [](auto zero) {
        using T = decltype(zero);
        return for_this_cpu(
            isa_avx2::projection_kernels<T>(), isa_default::projection_kernels<T>());
      });
  run_projection(mats, basis, weights, side, kernels);
}

void project_bucket_cpu(
    at::TensorList matrices, const at::Tensor& basis, const std::optional<at::Tensor>& weights,
    c10::string_view side) {
  const Side s = check_bucket(matrices, basis, weights, side, c10::DeviceType::CPU);
  run_bucket(matrices, {}, basis, weights, s);
}

void project_anchored_bucket_cpu(
    at::TensorList matrices, at::TensorList anchors, const at::Tensor& basis,
    const std::optional<at::Tensor>& weights, c10::string_view side) {
  const Side s = check_bucket(matrices, basis, weights, side, c10::DeviceType::CPU);
  check_anchors(matrices, anchors, basis, s);
  run_bucket(matrices, anchors, basis, weights, s);
}

}  // namespace
}  // namespace gradproj::cpu

TORCH_LIBRARY_IMPL(gradproj, CPU, m) {
  m.impl("project_bucket_", &gradproj::cpu::project_bucket_cpu);
  m.impl("project_anchored_bucket_", &gradproj::cpu::project_anchored_bucket_cpu);
}
