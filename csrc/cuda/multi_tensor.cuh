// A device table of the tensors in one bucket, so one launch covers them all.
//
// The idea is ATen's MultiTensorApply.cuh (addresses and sizes in a table the
// kernel indexes), with two differences that suit projection:
//  * [table in device memory] ATen passes the table by value as a kernel
//    argument and relaunches when it fills up (4 KB of arguments); a bucket here
//    can hold hundreds of tensors and must be one launch, so the table is built
//    on the host in pinned memory and copied with non_blocking=true. The copy is
//    ordered on the current stream before the kernel, and the caching host
//    allocator keeps the pinned block alive until the copy has run: no host sync.
//  * [tasks, not chunks] a task is a row (or a panel of 32 columns) of one
//    matrix; each entry stores the index of its first task, and a warp finds its
//    matrix by binary search over those prefixes. Grid-stride loops over tasks
//    make any grid size correct.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <vector>

namespace gradproj::cuda {

// One matrix of a bucket. All int64 so the host can fill one int64 tensor.
struct MatrixEntry {
  int64_t data;        // address of element (0, 0)
  int64_t rows;        // rows of the row view (vectors to project)
  int64_t row_stride;  // elements between rows
  int64_t col_stride;  // elements between entries of a row
  int64_t first_task;  // index of this matrix's first task in the launch
  int64_t first_row;   // index of its first row among all rows of the launch
  int64_t anchor;      // address of its (rows x k) float32 anchor, or 0
};
static_assert(sizeof(MatrixEntry) == 7 * sizeof(int64_t), "MatrixEntry must be packed int64s");

// The entry whose tasks contain `task` (entries sorted by first_task, the first is 0).
__device__ __forceinline__ const MatrixEntry& find_entry(
    const MatrixEntry* table, int n, int64_t task) {
  int lo = 0;
  int hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table[mid].first_task <= task) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return table[lo];
}

// Copies `entries` to `device` through pinned memory, ordered on the current
// stream. The returned tensor owns the device table; keep it alive until the
// kernel is enqueued (the caching allocator handles the rest).
inline at::Tensor upload_table(const std::vector<MatrixEntry>& entries, const at::Device& device) {
  const int64_t words = static_cast<int64_t>(entries.size()) * 7;
  at::Tensor host = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* out = host.data_ptr<int64_t>();
  for (const MatrixEntry& e : entries) {
    *out++ = e.data;
    *out++ = e.rows;
    *out++ = e.row_stride;
    *out++ = e.col_stride;
    *out++ = e.first_task;
    *out++ = e.first_row;
    *out++ = e.anchor;
  }
  return host.to(device, /*non_blocking=*/true);
}

}  // namespace gradproj::cuda
