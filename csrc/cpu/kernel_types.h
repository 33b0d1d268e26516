// The types the CPU kernels of csrc/cpu/*.cpp share: a matrix of a bucket, the
// basis, the coefficient finish of the (anchored) projection and the table of
// projection kernels. Included before the per-ISA kernel headers
// (project_kernels.h, adamw_kernels.h), which use them.
#pragma once

#include <cstdint>

namespace gradproj::cpu {

// One matrix of the bucket as the kernels see it. For side="flat" rows == 1,
// row_stride is unused and col_stride is the vector's stride.
struct MatrixRef {
  void* data;
  int64_t rows;
  int64_t row_stride;
  int64_t col_stride;
  float* anchor;  // (rows x k) contiguous, or nullptr
};

struct BasisRef {
  const float* u;        // (d x k) contiguous
  const float* ut;       // (k x d) contiguous, for the row layout (else nullptr)
  const float* weights;  // (k,) or nullptr
  int64_t d;
  int64_t k;
};

// Turns the coefficients a = U^T x of one row into the multipliers of U:
//   plain:    a <- w * a
//   anchored: delta = a - c;  c <- c + (1 - w) * delta (with weights);  a <- w * delta
inline void finish_coeffs(float* a, int64_t k, const float* w, float* anchor) {
  if (anchor != nullptr) {
    for (int64_t i = 0; i < k; ++i) {
      float delta = a[i] - anchor[i];
      if (w != nullptr) {
        anchor[i] += (1.f - w[i]) * delta;
        delta *= w[i];
      }
      a[i] = delta;
    }
  } else if (w != nullptr) {
    for (int64_t i = 0; i < k; ++i) a[i] *= w[i];
  }
}

using RowsFn = void (*)(const MatrixRef&, int64_t, int64_t, const BasisRef&, float*, float*);
using ColsFn =
    void (*)(const MatrixRef&, int64_t, int64_t, const BasisRef&, float*, float*, float*);
using FlatPartialFn =
    void (*)(const void*, int64_t, int64_t, int64_t, const float*, int64_t, float*);
using FlatUpdateFn =
    void (*)(void*, int64_t, int64_t, int64_t, const float*, int64_t, const float*);

struct KernelSet {
  RowsFn rows;
  ColsFn cols;
  FlatPartialFn flat_partial;
  FlatUpdateFn flat_update;
};

}  // namespace gradproj::cpu
