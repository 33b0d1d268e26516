// A device table of the tensors in one bucket, so one launch covers them all.
//
// The idea is ATen's MultiTensorApply.cuh (addresses and sizes in a table the
// kernel indexes), with two differences that suit projection:
//  * [table in device memory] ATen passes the table by value as a kernel
//    argument and relaunches when it fills up (4 KB of arguments); a bucket here
//    can hold hundreds of tensors and must be one launch, so the table lives in
//    device memory, uploaded once per content (device_cache.cuh) from pinned
//    memory with non_blocking=true: ordered on the stream, no host sync.
//  * [tasks, not chunks] a task is a row (or a panel of 32 columns) of one
//    matrix; each entry stores the index of its first task, and a warp finds its
//    matrix by binary search over those prefixes. Grid-stride loops over tasks
//    make any grid size correct.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

#include "cuda/device_cache.cuh"

#include <algorithm>
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

// `words` as a device table, uploaded once per content (device_cache.cuh:
// [device tables]); the first upload is copied from pinned memory, non_blocking.
inline at::Tensor upload_words(const std::vector<int64_t>& words, const at::Device& device) {
  return cached_words(words, device);
}

// `entries` as a device table (see upload_words).
inline at::Tensor upload_table(const std::vector<MatrixEntry>& entries, const at::Device& device) {
  std::vector<int64_t> words;
  words.reserve(entries.size() * 7);
  for (const MatrixEntry& e : entries) {
    words.insert(
        words.end(),
        {e.data, e.rows, e.row_stride, e.col_stride, e.first_task, e.first_row, e.anchor});
  }
  return upload_words(words, device);
}

// Butterfly sum across a warp: every lane ends with the same sum, added in the
// same order each run (deterministic).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Grid size: enough resident blocks of `threads` to fill the device, never more
// than the work (kernels loop grid-stride, so any size is correct). The
// occupancy query runs once per (device, kernel, threads, smem).
template <typename Kernel>
int resident_grid(Kernel kernel, int threads, size_t smem_bytes, int64_t blocks_of_work) {
  return resident_grid_for(
      reinterpret_cast<const void*>(kernel), threads, smem_bytes, blocks_of_work);
}

}  // namespace gradproj::cuda
