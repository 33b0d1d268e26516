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
// Never inlined, so it is compiled once, for the baseline ISA: inlined into the
// AVX2+FMA kernels, GCC may fuse c + (1 - w) * delta into one FMA, so the anchors
// changed in the last bit with GCC's inlining choices (it had fused it in the
// column panels of project.cpp but not in its rows nor in adamw.cpp).
[[gnu::noinline]] inline void finish_coeffs(float* a, int64_t k, const float* w, float* anchor) {
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

// The kernels of a projection op on the row views of its tensors (Ref: MatrixRef
// for project_bucket_, AdamWRef for projected_adamw_bucket_), one table per dtype
// and instruction set; run_projection (dispatch.h) cuts the bucket into the work
// items they take.
template <typename Ref>
struct ProjectionKernels {
  // Rows [begin, end); scratch: buffer (4 x d), a (4 x k).
  void (*rows)(const Ref&, int64_t, int64_t, const BasisRef&, float*, float*);
  // Columns [begin, end) of G, a transposed view; scratch: buffer (d x 16), a (k x 16),
  // coef (k).
  void (*cols)(const Ref&, int64_t, int64_t, const BasisRef&, float*, float*, float*);
  // side="flat", elements [begin, end): partial[b] = sum_j x[j] u[j, b] ...
  void (*flat_partial)(const Ref&, int64_t, int64_t, const BasisRef&, float*, float*);
  // ... and x[j] -= sum_b u[j, b] coef[b].
  void (*flat_update)(const Ref&, int64_t, int64_t, const BasisRef&, float*, const float*);
  // Whether the flat kernels use their buffer (fp32, one chunk); else none is made.
  bool flat_buffer;
};

}  // namespace gradproj::cpu
