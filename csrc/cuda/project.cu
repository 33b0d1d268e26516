// CUDA kernels of gradproj::project_bucket_ and gradproj::project_anchored_bucket_.
//
// Contract (gradproj/backends.py): every row x of every matrix in the bucket
// becomes x - U (w * U^T x); the anchored form uses a - c for a = U^T x and
// updates the anchor row c. U is (d x k) float32 contiguous.
//
// The kernels are the row-tile engine of cuda/tile.cuh with ProjectPolicy (load
// and store a gradient element), one launch (or one split launch) per layout:
//  * rows on tensor cores (cuda/mma_rows.cuh): contiguous, 16-byte aligned rows of
//    d <= 1280, every k: 16 rows a CTA in
//    registers, both GEMMs on mma.sync tf32 (3xTF32 for fp32), read once / written
//    once per launch; the basis in shared memory, a block of its columns a launch where
//    the whole does not fit (mma_rows.cuh [columns]);
//  * rows (side="input", or any strides): a CTA holds a tile of rows in
//    registers, U^T staged in shared memory, read once / written once when
//    d <= 4096 (4-element vector loads, 16 bytes of fp32, when every row allows them);
//  * transposed views (side="output": unit row stride) of d <= 1280 on tensor cores
//    too, as strided rows: a tile's 16 view rows are 16 consecutive
//    elements of each row of G, so a warp's loads are 32-byte runs; otherwise the
//    FMA engine with ProjectBlockPolicy, 4 view rows a group, one vector of G's row j
//    holding element j of all four; read once / written once when d <= 2048;
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
#include <type_traits>
#include <vector>

#include "bucket_checks.h"
#include "cuda/launch.cuh"
#include "cuda/mma_rows.cuh"
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
  static constexpr int kEpt = tile::kEpt;  // elements of a row per thread
  static constexpr bool kBlock = false;    // one row per vector (ProjectBlockPolicy: one column)
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
  // The row again for the stores (tile.cuh re-reads it after pass 2): the same Row.
  __device__ Row store_row(int64_t row) const { return this->row(row); }  // model-uniform
  __device__ float* anchor_row(int64_t row) const {  // model-uniform
    const MatrixEntry& m = entry(row);
    return m.anchor != 0 ? reinterpret_cast<float*>(m.anchor) + (row - m.first_row) * k : nullptr;
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
  // The tensor-core kernel's interface (cuda/mma_rows.cuh [policy]): a vector is one
  // load of raw bits (kVec; otherwise V strided element loads, as transposed views need),
  // converted when its tile starts; 16-bit values are tf32 numbers.
  using Bits = tile::PackBits<T>;
  static constexpr bool kExactTf32 = !std::is_same_v<T, float>;
  static constexpr bool kPrefetch = kExactTf32;
  static constexpr bool kUpdates = false;
  static constexpr bool kVector = kVec;
  // The raw bits of elements [j, j + V) (j + V <= d). Strided rows (transposed views):
  // 32-bit element offsets (mma_rows::load_strided), which launch_cols checks.
  __device__ __forceinline__ Bits load_bits(const Row& w, int64_t j) const {
    if constexpr (kVec) {
      return *reinterpret_cast<const Bits*>(w.x + j);
    } else {
      return mma_rows::load_strided(w.x, j, w.cs);
    }
  }
  __device__ __forceinline__ void finish(const Row&, int64_t, const Bits& b, float (&x)[V]) const {
    tile::unpack<T>(b, x);
  }
  // Stores elements [j, j + V) of the row that lie before d.
  __device__ __forceinline__ void store(const Row& w, int64_t j, int64_t d, const float (&x)[V]) const {
    if (kVec && j + V <= d) {
      store_vector(w, j, x);
    } else {  // model-cold-if: vec
#pragma unroll
      for (int v = 0; v < V; ++v) {
        if (j + v < d) w.x[(j + v) * w.cs] = static_cast<T>(x[v]);
      }
    }
  }
  // Stores elements [j, j + V) (j + V <= d): one vector (kVec rows), or V elements.
  __device__ __forceinline__ void store_vector(const Row& w, int64_t j, const float (&x)[V]) const {
    tile::Pack<T> p;
#pragma unroll
    for (int v = 0; v < V; ++v) p.v[v] = static_cast<T>(x[v]);
    if constexpr (kVec) {
      tile::store_pack(w.x + j, p);
    } else {
      mma_rows::store_strided(w.x, j, w.cs, p);  // as load_bits
    }
  }
};

// Transposed views (side="output") of 16-bit gradients whose rows come in aligned pairs
// (launch_cols: mma_rows::pair_rows): the tensor-core kernel's lane takes view rows 2 g and
// 2 g + 1, one 32-bit load or store holding both rows' element at a column (mma_rows.cuh
// [row pairs]). The element paths (a ragged row or tile) are ProjectPolicy's.
template <typename T>
struct ProjectPairPolicy : ProjectPolicy<T, false> {
  using Base = ProjectPolicy<T, false>;
  using Row = typename Base::Row;
  using Bits = typename Base::Bits;
  static constexpr bool kRowPairs = true;
  static_assert(sizeof(T) == 2, "pairs of 16-bit elements");

  // Elements [j, j + 4) of row w and the next, mma_rows::load_pair's words 0-1 and 2-3.
  __device__ __forceinline__ void load_pair_bits(const Row& w, int64_t j, Bits& lo, Bits& hi) const {
    mma_rows::split_pair(mma_rows::load_pair(w.x, j, w.cs), lo, hi);
  }
  __device__ __forceinline__ void finish_pair(const Row&, int64_t, const Bits& lo, const Bits& hi,
                                              float (&x0)[4], float (&x1)[4]) const {
    mma_rows::unpack_pair<T>(lo, hi, x0, x1);
  }
  __device__ __forceinline__ void store_pair(const Row& w, int64_t j, const float (&x0)[4],
                                             const float (&x1)[4]) const {
    mma_rows::store_pair(w.x, j, w.cs, x0, x1);
  }
};

// Transposed views (side="output"): the view's rows are consecutive elements of
// G's rows, so a group takes kRows = 4 view rows and a vector of G's row j holds
// element j of all four (16 bytes of fp32, 8 of bf16/fp16; the 2 groups of a CTA
// at d <= 1024 read 32 bytes of each row of G). Each thread holds 8 elements of
// each of its 4 rows (2 slots of 4 rows of G: a 4 x 4 block per slot), so the row
// tile stays at 32 values a thread; d <= 2048 is fused. A block whose rows are not
// 4 consecutive, 16-byte aligned elements of one memory row at every j (the
// matrix's last rows, a misaligned view) takes the element path.
template <typename T>
struct ProjectBlockPolicy : ProjectPolicy<T, false> {
  using Base = ProjectPolicy<T, false>;
  using Row = typename Base::Row;
  using P = tile::Pack<T>;
  static constexpr int kRows = 4;
  static constexpr int kEpt = 8;
  static constexpr bool kBlock = true;
  static constexpr int V = P::kSize;
  static_assert(kRows == V, "one vector of G's row j holds element j of every row of the block");

  // Rows rw[0..4) are 4 consecutive elements of every row of G (row r at rw[0].x + r,
  // one column stride), the first 16-byte aligned, the stride a whole number of
  // vectors: then the vector at G row j is (rows 0..3, element j), the very
  // elements the element path reads.
  __device__ bool block_ok(const Row (&rw)[kRows], const bool (&valid)[kRows]) const {
    if (!valid[kRows - 1]) return false;  // rows are consecutive: all valid
    bool ok = reinterpret_cast<uintptr_t>(rw[0].x) % sizeof(P) == 0 &&
              (rw[0].cs * static_cast<int64_t>(sizeof(T))) % static_cast<int64_t>(sizeof(P)) == 0;
#pragma unroll
    for (int r = 1; r < kRows; ++r) ok = ok && rw[r].x == rw[0].x + r && rw[r].cs == rw[0].cs;
    return ok;
  }
  // Elements [j, j + 4) of the block's rows as fp32 (x[r][v]: row r, element j + v);
  // those at or past d, and rows not valid, read as 0.
  template <bool kFinal>
  __device__ __forceinline__ void load_block(
      const Row (&rw)[kRows], const bool (&valid)[kRows], bool block, int64_t j, int64_t d,
      float (&x)[kRows][V]) const {
    if (block && j + V <= d) {
      P p[V];
#pragma unroll
      for (int v = 0; v < V; ++v) p[v] = *reinterpret_cast<const P*>(rw[0].x + (j + v) * rw[0].cs);
#pragma unroll
      for (int v = 0; v < V; ++v) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) x[r][v] = static_cast<float>(p[v].v[r]);
      }
    } else {  // model-cold-if: block (with vectors, only the rows' ragged end)
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          x[r][v] = valid[r] && j + v < d ? static_cast<float>(rw[r].x[(j + v) * rw[r].cs]) : 0.f;
        }
      }
    }
  }
  // Stores elements [j, j + 4) of the block's valid rows that lie before d.
  __device__ __forceinline__ void store_block(
      const Row (&rw)[kRows], const bool (&valid)[kRows], bool block, int64_t j, int64_t d,
      const float (&x)[kRows][V]) const {
    if (block && j + V <= d) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        P p;
#pragma unroll
        for (int r = 0; r < kRows; ++r) p.v[r] = static_cast<T>(x[r][v]);
        *reinterpret_cast<P*>(rw[0].x + (j + v) * rw[0].cs) = p;
      }
    } else {  // model-cold-if: block
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          if (valid[r] && j + v < d) rw[r].x[(j + v) * rw[r].cs] = static_cast<T>(x[r][v]);
        }
      }
    }
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
         reinterpret_cast<int64_t>(anchor_address(anchors, i))});
    total_rows += rows;
  }
  const DeviceTable<MatrixEntry> table(entries, basis.device());
  const int64_t k = basis.size(1);
  if (vec) {
    const ProjectPolicy<T, true> pol{table.data(), table.size(), k};
    // Tensor cores at every k (rows of d <= 1280: mma_rows::kMaxRowD).
    if (!flat && mma_rows::run(pol, total_rows, basis, weights, !anchors.empty())) {
      return;
    }
    tile::run_rows(pol, total_rows, basis, weights);
  } else {
    tile::run_rows(
        ProjectPolicy<T, false>{table.data(), table.size(), k}, total_rows, basis, weights);
  }
}

// Transposed views (side="output"): the rows engine with ProjectBlockPolicy.
template <typename T>
void launch_cols(
    const std::vector<size_t>& which, at::TensorList matrices, at::TensorList anchors,
    const at::Tensor& basis, const float* weights) {
  std::vector<MatrixEntry> entries;
  int64_t total_rows = 0;
  bool narrow = true;  // every element offset within a row fits 32 bits (load_bits)
  bool pairs = true;   // 16-bit views whose rows pair up ([row pairs])
  for (size_t i : which) {
    const at::Tensor& m = matrices[i];
    entries.push_back(
        {reinterpret_cast<int64_t>(m.data_ptr()), m.size(0), m.stride(0), m.stride(1),
         total_rows, reinterpret_cast<int64_t>(anchor_address(anchors, i))});
    total_rows += m.size(0);
    narrow = narrow && mma_rows::narrow_offsets(m.size(1), m.stride(1));
    pairs = pairs && mma_rows::pair_rows(m, m.stride(0), m.stride(1), m.size(0));
  }
  const DeviceTable<MatrixEntry> table(entries, basis.device());
  const int64_t k = basis.size(1);
  // Tensor cores (d <= 1280, the basis in shared memory) with strided rows: a lane's view
  // rows g and g + 8 of a tile are consecutive elements of G's rows, so the 8 lanes of a
  // quad column read 8 consecutive elements of one G row (16 B of bf16, 32 of fp32) and
  // the tile's two halves the two halves of a 32-byte sector (bf16).
  // With row pairs a lane's rows g and g + 8 are view rows 2 g and 2 g + 1 instead, one
  // 32-bit word at each column.
  if (narrow) {
    const ProjectPolicy<T, false> pol{table.data(), table.size(), k};
    if constexpr (sizeof(T) == 2) {
      if (pairs && mma_rows::run(ProjectPairPolicy<T>{pol}, total_rows, basis, weights,
                                 !anchors.empty())) {
        return;
      }
    }
    if (mma_rows::run(pol, total_rows, basis, weights, !anchors.empty())) return;
  }
  tile::run_rows(ProjectBlockPolicy<T>{{table.data(), table.size(), k}}, total_rows, basis, weights);
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
  const Side s = check_bucket(matrices, basis, weights, side, GRADPROJ_CUDA_DEVICE_TYPE);
  dispatch(matrices, {}, basis, weights, s);
}

void project_anchored_bucket_cuda(
    at::TensorList matrices, at::TensorList anchors, const at::Tensor& basis,
    const std::optional<at::Tensor>& weights, c10::string_view side) {
  const Side s = check_bucket(matrices, basis, weights, side, GRADPROJ_CUDA_DEVICE_TYPE);
  check_anchors(matrices, anchors, basis, s);
  dispatch(matrices, anchors, basis, weights, s);
}

}  // namespace

template <typename T>
void mma_rows::project_anchored_from(
    const std::vector<MatrixEntry>& entries, int64_t total_rows, bool vector_rows,
    bool pairs, const at::Tensor& basis, const float* weights, int64_t kc, int64_t c0) {
  const DeviceTable<MatrixEntry> table(entries, basis.device());
  const int64_t k = basis.size(1);
  if constexpr (sizeof(T) == 2) {
    if (pairs) {
      const ProjectPolicy<T, false> pol{table.data(), table.size(), k};
      mma_rows::run_from(ProjectPairPolicy<T>{pol}, total_rows, basis, weights,
                         /*anchored=*/true, kc, c0);
      return;
    }
  }
  if (vector_rows) {
    mma_rows::run_from(ProjectPolicy<T, true>{table.data(), table.size(), k}, total_rows, basis,
                       weights, /*anchored=*/true, kc, c0);
  } else {
    mma_rows::run_from(ProjectPolicy<T, false>{table.data(), table.size(), k}, total_rows, basis,
                       weights, /*anchored=*/true, kc, c0);
  }
}
template void mma_rows::project_anchored_from<float>(
    const std::vector<MatrixEntry>&, int64_t, bool, bool, const at::Tensor&, const float*,
    int64_t, int64_t);
template void mma_rows::project_anchored_from<at::BFloat16>(
    const std::vector<MatrixEntry>&, int64_t, bool, bool, const at::Tensor&, const float*,
    int64_t, int64_t);
template void mma_rows::project_anchored_from<at::Half>(
    const std::vector<MatrixEntry>&, int64_t, bool, bool, const at::Tensor&, const float*,
    int64_t, int64_t);

}  // namespace gradproj::cuda

#ifdef GRADPROJ_CUDA_EMULATION
TORCH_LIBRARY_IMPL(gradproj_emu, CPU, m) {
#else
TORCH_LIBRARY_IMPL(gradproj, CUDA, m) {
#endif
  m.impl("project_bucket_", &gradproj::cuda::project_bucket_cuda);
  m.impl("project_anchored_bucket_", &gradproj::cuda::project_anchored_bucket_cuda);
}
