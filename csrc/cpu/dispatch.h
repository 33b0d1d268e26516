// How the CPU ops (project.cpp, adamw.cpp, surgery.cpp) run their kernels: which
// build of the kernels (instruction set) and which dtype, the work items a bucket
// is cut into, and how they run in parallel. The kernels are compiled once per
// instruction set by kernels_per_isa.h; an op file keeps only its arguments and
// its math.
//
// Every result depends only on the inputs and the instruction set, never on the
// thread count: items are cut by fixed sizes, and sums over a long vector are
// added chunk by chunk in chunk order.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "../bucket_checks.h"
#include "kernel_types.h"

// Where kernels_per_isa.h compiles an AVX2+FMA build of the kernels at all: GCC's
// `#pragma GCC target` on x86-64.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define GRADPROJ_CPU_AVX2 1
#endif

namespace gradproj::cpu {

// ---------------------------------------------------------------------------
// Which build, which dtype
// ---------------------------------------------------------------------------

// AVX2 when the CPU has it, unless ATEN_CPU_CAPABILITY=default asks (as it does
// for ATen's own kernels) for the baseline build, e.g. to test that path.
inline bool use_avx2() {
#ifdef GRADPROJ_CPU_AVX2
  static const bool enabled = [] {
    const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
    if (cap != nullptr && std::strcmp(cap, "default") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return enabled;
#else
  return false;
#endif
}

// The kernel table of the build this CPU runs: `avx2` from isa_avx2, `baseline`
// from isa_default. Both are tables of function pointers, built once per call.
template <typename Kernels>
Kernels for_this_cpu(const Kernels& avx2, const Kernels& baseline) {
  return use_avx2() ? avx2 : baseline;
}

// f(T{}) for the element type T of `dtype`: float, at::BFloat16 or at::Half, the
// dtypes bucket_checks.h lets through. `op` names the op in the error.
template <typename F>
auto dispatch_float_types(at::ScalarType dtype, const char* op, const F& f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(at::BFloat16{});
    case at::kHalf:
      return f(at::Half{});
    default:
      TORCH_CHECK(false, "gradproj cpu ", op, ": unsupported dtype ", dtype);
  }
}

// ---------------------------------------------------------------------------
// Running work items
// ---------------------------------------------------------------------------

// Below this many multiply-adds a parallel region costs more than it saves: an
// OpenMP fork/join is ~10 us on an idle machine, and milliseconds when the cores
// are oversubscribed (measured: surgery on 8 tensors of 32x32 took 47 us on one
// thread and 15-30 ms with two threads on a loaded 2-core machine). The items'
// results never depend on how they are split, so this changes speed only.
constexpr int64_t kSerialWork = int64_t{1} << 16;

// f(first, last) over items [0, n): inline when `work` is small, else at::parallel_for.
template <typename F>
void parallel_items(int64_t n, int64_t work, const F& f) {
  if (n <= 0) return;
  if (work < kSerialWork || n == 1 || at::get_num_threads() == 1) {
    f(0, n);
    return;
  }
  at::parallel_for(0, n, 1, f);
}

// f(item, scratch) for every item in [0, n), as parallel_items; scratch is a
// per-thread buffer of scratch_floats floats (none when 0).
template <typename F>
void for_each_item(int64_t n, int64_t work, int64_t scratch_floats, const F& f) {
  parallel_items(n, work, [&](int64_t first, int64_t last) {
    std::vector<float> scratch(static_cast<size_t>(scratch_floats));
    for (int64_t item = first; item < last; ++item) f(item, scratch.data());
  });
}

// ---------------------------------------------------------------------------
// Long vectors in fixed chunks (side="flat", surgery pairs)
// ---------------------------------------------------------------------------

// Elements per chunk; fixed, so the order of a sum over a vector never depends on
// the thread count.
constexpr int64_t kChunk = int64_t{1} << 14;

// The vectors of a bucket cut into chunks of kChunk elements (the last one of a
// vector shorter; an empty vector has one empty chunk), numbered vector by vector.
class Chunks {
 public:
  explicit Chunks(std::vector<int64_t> lengths)
      : lengths_(std::move(lengths)), first_(lengths_.size() + 1, 0) {
    for (int64_t i = 0; i < vectors(); ++i) {
      first_[i + 1] = first_[i] + std::max<int64_t>(1, (lengths_[i] + kChunk - 1) / kChunk);
    }
    vector_.resize(static_cast<size_t>(first_.back()));
    for (int64_t i = 0; i < vectors(); ++i) {
      std::fill(vector_.begin() + first_[i], vector_.begin() + first_[i + 1], i);
    }
  }

  int64_t size() const { return first_.back(); }
  int64_t vectors() const { return static_cast<int64_t>(lengths_.size()); }
  // Vector i owns chunks [first(i), first(i + 1)).
  int64_t first(int64_t i) const { return first_[i]; }
  int64_t vector_of(int64_t chunk) const { return vector_[chunk]; }
  // Elements [begin, end) of `chunk` in its vector.
  std::pair<int64_t, int64_t> range(int64_t chunk) const {
    const int64_t i = vector_[chunk];
    const int64_t begin = (chunk - first_[i]) * kChunk;
    return {begin, std::min(lengths_[i], begin + kChunk)};
  }

 private:
  std::vector<int64_t> lengths_;
  std::vector<int64_t> first_;
  std::vector<int64_t> vector_;
};

// Pass 1 of a chunked op: f(i, begin, end, scratch, out) writes `width` partial
// sums over elements [begin, end) of vector i to out, every chunk in parallel.
// Returns, per vector, `width` sums: its chunks' partials added in chunk order.
template <typename F>
std::vector<float> sum_chunks(
    const Chunks& chunks, int64_t width, int64_t work, int64_t scratch_floats, const F& f) {
  std::vector<float> partials(static_cast<size_t>(chunks.size() * width));
  for_each_item(chunks.size(), work, scratch_floats, [&](int64_t chunk, float* scratch) {
    const auto [begin, end] = chunks.range(chunk);
    f(chunks.vector_of(chunk), begin, end, scratch, partials.data() + chunk * width);
  });
  std::vector<float> sums(static_cast<size_t>(chunks.vectors() * width), 0.f);
  for (int64_t i = 0; i < chunks.vectors(); ++i) {
    float* sum = sums.data() + i * width;
    for (int64_t chunk = chunks.first(i); chunk < chunks.first(i + 1); ++chunk) {
      const float* partial = partials.data() + chunk * width;
      for (int64_t b = 0; b < width; ++b) sum[b] += partial[b];
    }
  }
  return sums;
}

// Pass 2: f(i, begin, end, scratch) over elements [begin, end) of vector i, every
// chunk in parallel.
template <typename F>
void for_each_chunk(const Chunks& chunks, int64_t work, int64_t scratch_floats, const F& f) {
  for_each_item(chunks.size(), work, scratch_floats, [&](int64_t chunk, float* scratch) {
    const auto [begin, end] = chunks.range(chunk);
    f(chunks.vector_of(chunk), begin, end, scratch);
  });
}

// ---------------------------------------------------------------------------
// The projection ops (project.cpp, adamw.cpp): every row of every tensor's row view
// ---------------------------------------------------------------------------

constexpr int64_t kRowsPerItem = 16;  // rows per work item (row layout)
constexpr int64_t kColsPerItem = 64;  // columns of G per work item (column layout)

// A tensor's row view as the kernels see it; side="flat" is one row whose col
// stride is the vector's stride.
struct RowView {
  int64_t rows;
  int64_t row_stride;
  int64_t col_stride;
};

inline RowView row_view(const at::Tensor& t, Side side) {
  if (side == Side::kFlat) return {1, 0, t.stride(0)};
  return {t.size(0), t.stride(0), t.stride(1)};
}

// side="input"/"output": every tensor cut into items of rows, or of column panels
// of G for a transposed view (unit row stride); any other strides go by rows
// through the kernels' buffer.
template <typename Ref>
void run_projection_rows(
    const std::vector<Ref>& refs, const at::Tensor& basis, const float* weights,
    const ProjectionKernels<Ref>& kernels) {
  const int64_t d = basis.size(0);
  const int64_t k = basis.size(1);
  struct Item {
    int64_t tensor;
    int64_t begin;
    int64_t end;
    bool columns;  // a panel of G's columns (transposed view) rather than rows
  };
  std::vector<Item> items;
  bool any_rows = false;
  for (int64_t i = 0; i < static_cast<int64_t>(refs.size()); ++i) {
    const Ref& t = refs[i];
    const bool columns = t.row_stride == 1 && t.col_stride != 1 && d > 1 && t.rows > 1;
    const int64_t step = columns ? kColsPerItem : kRowsPerItem;
    any_rows |= !columns;
    for (int64_t b = 0; b < t.rows; b += step) {
      items.push_back({i, b, std::min(t.rows, b + step), columns});
    }
  }
  // U^T (k x d) once per call: the row layout runs along d with unit stride.
  const at::Tensor ut = any_rows ? basis.t().contiguous() : at::Tensor();
  const BasisRef ref{
      basis.data_ptr<float>(), any_rows ? ut.data_ptr<float>() : nullptr, weights, d, k};
  // Row groups: 4 x d rows and 4 x k coefficients; column panels: d x 16 values,
  // k x 16 coefficients and k more.
  const int64_t scratch_floats = std::max<int64_t>(4 * d + 4 * k, d * 16 + k * 16 + k);
  int64_t work = 0;  // multiply-adds: each element meets k basis columns twice
  for (const Ref& t : refs) work += t.rows * d * std::max<int64_t>(k, 1);
  for_each_item(
      static_cast<int64_t>(items.size()), work, scratch_floats, [&](int64_t it, float* buffer) {
        const Item& item = items[it];
        const Ref& t = refs[item.tensor];
        if (item.columns) {
          float* a = buffer + d * 16;
          kernels.cols(t, item.begin, item.end, ref, buffer, a, a + k * 16);
        } else {
          kernels.rows(t, item.begin, item.end, ref, buffer, buffer + 4 * d);
        }
      });
}

// side="flat": a = U^T x is a sum over the whole vector, so two passes over fixed
// chunks: the coefficients (partial sums added in chunk order, then finished with
// weights and anchors), then the update.
template <typename Ref>
void run_projection_flat(
    const std::vector<Ref>& refs, const at::Tensor& basis, const float* weights,
    const ProjectionKernels<Ref>& kernels) {
  const int64_t d = basis.size(0);
  const int64_t k = basis.size(1);
  const BasisRef ref{basis.data_ptr<float>(), nullptr, weights, d, k};
  const int64_t n = static_cast<int64_t>(refs.size());
  const Chunks chunks(std::vector<int64_t>(refs.size(), d));
  const int64_t work = n * d * std::max<int64_t>(k, 1);
  const int64_t buffer_floats = kernels.flat_buffer ? std::min(d, kChunk) : 0;
  std::vector<float> coefs = sum_chunks(
      chunks, k, work, buffer_floats,
      [&](int64_t i, int64_t begin, int64_t end, float* buffer, float* partial) {
        kernels.flat_partial(refs[i], begin, end, ref, buffer, partial);
      });
  for (int64_t i = 0; i < n; ++i) finish_coeffs(coefs.data() + i * k, k, weights, refs[i].anchor);
  for_each_chunk(
      chunks, work, buffer_floats, [&](int64_t i, int64_t begin, int64_t end, float* buffer) {
        kernels.flat_update(refs[i], begin, end, ref, buffer, coefs.data() + i * k);
      });
}

// The anchored projection of every row of every tensor of the bucket (refs built
// with row_view), with the kernels of its dtype and instruction set.
template <typename Ref>
void run_projection(
    const std::vector<Ref>& refs, const at::Tensor& basis,
    const std::optional<at::Tensor>& weights, Side side, const ProjectionKernels<Ref>& kernels) {
  const float* w = weights.has_value() ? weights->data_ptr<float>() : nullptr;
  if (side == Side::kFlat) {
    run_projection_flat(refs, basis, w, kernels);
  } else {
    run_projection_rows(refs, basis, w, kernels);
  }
}

}  // namespace gradproj::cpu
