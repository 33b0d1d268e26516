// CPU kernels of gradproj::project_bucket_ and gradproj::project_anchored_bucket_.
//
// Contract (gradproj/backends.py): every row x of every matrix in the bucket
// becomes x - U (w * U^T x); the anchored form uses a - c for a = U^T x and
// updates the anchor row c. Matrices are strided 2-D views (side input/output)
// or 1-D vectors (side flat) of one dtype; U is (d x k) float32 contiguous.
//
// How it runs:
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
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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

// Lanes (a GCC vector) is passed by value only between functions with internal
// linkage that are inlined, so GCC's note about its ABI does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // GCC reports it at the end of the file: no pop
#endif

namespace isa_default {
namespace {
#include "project_kernels.h"
}  // namespace
}  // namespace isa_default

// The same kernels compiled for AVX2+FMA (GCC on x86-64); the headers above were
// included before the pragma, so nothing outside these kernels changes ISA.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define GRADPROJ_CPU_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
namespace {
#include "project_kernels.h"
}  // namespace
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

namespace {

template <typename T>
KernelSet kernels_for() {
#ifdef GRADPROJ_CPU_AVX2
  if (use_avx2()) return isa_avx2::kernel_set<T>();
#endif
  return isa_default::kernel_set<T>();
}

KernelSet kernels_for(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return kernels_for<float>();
    case at::kBFloat16:
      return kernels_for<at::BFloat16>();
    case at::kHalf:
      return kernels_for<at::Half>();
    default:
      TORCH_CHECK(false, "gradproj cpu kernels: unsupported dtype ", dtype);
  }
}

constexpr int64_t kRowsPerItem = 16;     // rows per parallel work item (row layout)
constexpr int64_t kColsPerItem = 64;     // columns of G per work item (column layout)
constexpr int64_t kFlatChunk = 1 << 14;  // elements per chunk of a flat vector; fixed, so
                                         // the reduction order never depends on threads

// side="input"/"output": every matrix split into independent work items.
void run_rows(
    const std::vector<MatrixRef>& mats, const at::Tensor& basis, const float* weights,
    const KernelSet& kernels) {
  const int64_t d = basis.size(0);
  const int64_t k = basis.size(1);
  struct Item {
    int64_t matrix;
    int64_t begin;
    int64_t end;
    bool columns;  // a panel of G's columns (transposed view) rather than rows
  };
  std::vector<Item> items;
  bool any_rows = false;
  for (int64_t i = 0; i < static_cast<int64_t>(mats.size()); ++i) {
    const MatrixRef& m = mats[i];
    // A transposed view (unit row stride) is worked on as G; a matrix whose rows
    // are unit-stride (or d == 1) row by row; any other strides via the buffer.
    const bool columns = m.row_stride == 1 && m.col_stride != 1 && d > 1 && m.rows > 1;
    const int64_t step = columns ? kColsPerItem : kRowsPerItem;
    any_rows |= !columns;
    for (int64_t b = 0; b < m.rows; b += step) {
      items.push_back({i, b, std::min(m.rows, b + step), columns});
    }
  }
  // U^T (k x d) once per call: the row layout runs along d with unit stride.
  const at::Tensor ut = any_rows ? basis.t().contiguous() : at::Tensor();
  const BasisRef ref{
      basis.data_ptr<float>(), any_rows ? ut.data_ptr<float>() : nullptr, weights, d, k};
  const int64_t scratch_floats =
      std::max<int64_t>(4 * d + 4 * k, d * 16 + k * 16 + k);  // rows vs column panels
  int64_t work = 0;  // multiply-adds: each element meets k basis columns twice
  for (const auto& m : mats) work += m.rows * d * std::max<int64_t>(k, 1);
  parallel_items(static_cast<int64_t>(items.size()), work, [&](int64_t first, int64_t last) {
    std::vector<float> scratch(static_cast<size_t>(scratch_floats));
    float* buffer = scratch.data();
    for (int64_t it = first; it < last; ++it) {
      const Item& item = items[it];
      const MatrixRef& m = mats[item.matrix];
      if (item.columns) {
        float* a = buffer + d * 16;
        kernels.cols(m, item.begin, item.end, ref, buffer, a, a + k * 16);
      } else {
        kernels.rows(m, item.begin, item.end, ref, buffer, buffer + 4 * d);
      }
    }
  });
}

// side="flat": a = U^T x is a reduction over the whole vector. Pass 1 computes
// per-chunk partial sums in parallel; they are added in chunk order (fixed, so
// deterministic); pass 2 updates the chunks in parallel.
void run_flat(
    const std::vector<MatrixRef>& mats, const at::Tensor& basis, const float* weights,
    const KernelSet& kernels) {
  const int64_t d = basis.size(0);
  const int64_t k = basis.size(1);
  const float* u = basis.data_ptr<float>();
  const int64_t chunks_per_vector = std::max<int64_t>(1, (d + kFlatChunk - 1) / kFlatChunk);
  const int64_t chunks = chunks_per_vector * static_cast<int64_t>(mats.size());
  const int64_t work = static_cast<int64_t>(mats.size()) * d * std::max<int64_t>(k, 1);
  std::vector<float> partials(static_cast<size_t>(chunks * k));
  const auto chunk_range = [&](int64_t chunk) {
    const int64_t begin = (chunk % chunks_per_vector) * kFlatChunk;
    return std::make_pair(begin, std::min(d, begin + kFlatChunk));
  };
  parallel_items(chunks, work, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      const MatrixRef& m = mats[chunk / chunks_per_vector];
      const auto [begin, end] = chunk_range(chunk);
      kernels.flat_partial(m.data, m.col_stride, begin, end, u, k, partials.data() + chunk * k);
    }
  });
  std::vector<float> coefs(mats.size() * static_cast<size_t>(k), 0.f);
  for (size_t i = 0; i < mats.size(); ++i) {
    float* coef = coefs.data() + i * k;
    for (int64_t c = 0; c < chunks_per_vector; ++c) {
      const float* partial = partials.data() + (i * chunks_per_vector + c) * k;
      for (int64_t b = 0; b < k; ++b) coef[b] += partial[b];
    }
    finish_coeffs(coef, k, weights, mats[i].anchor);
  }
  parallel_items(chunks, work, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      const int64_t i = chunk / chunks_per_vector;
      const auto [begin, end] = chunk_range(chunk);
      kernels.flat_update(
          mats[i].data, mats[i].col_stride, begin, end, u, k, coefs.data() + i * k);
    }
  });
}

void run_bucket(
    at::TensorList matrices, at::TensorList anchors, const at::Tensor& basis,
    const std::optional<at::Tensor>& weights, Side side) {
  if (matrices.empty()) return;
  std::vector<MatrixRef> mats;
  mats.reserve(matrices.size());
  for (size_t i = 0; i < matrices.size(); ++i) {
    const at::Tensor& m = matrices[i];
    float* anchor = anchors.empty() ? nullptr : anchors[i].data_ptr<float>();
    if (side == Side::kFlat) {
      mats.push_back({m.data_ptr(), 1, 0, m.stride(0), anchor});
    } else {
      mats.push_back({m.data_ptr(), m.size(0), m.stride(0), m.stride(1), anchor});
    }
  }
  const KernelSet kernels = kernels_for(matrices[0].scalar_type());
  const float* w = weights.has_value() ? weights->data_ptr<float>() : nullptr;
  if (side == Side::kFlat) {
    run_flat(mats, basis, w, kernels);
  } else {
    run_rows(mats, basis, w, kernels);
  }
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
