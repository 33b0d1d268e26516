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
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

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

// Copies `words` to `device` through pinned memory, ordered on the current
// stream. The returned tensor owns the device copy; keep it alive until the
// kernel is enqueued (the caching allocator handles the rest).
inline at::Tensor upload_words(const std::vector<int64_t>& words, const at::Device& device) {
  at::Tensor host = at::empty(
      {static_cast<int64_t>(words.size())},
      at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(words.begin(), words.end(), host.data_ptr<int64_t>());
  return host.to(device, /*non_blocking=*/true);
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
// than the work (kernels loop grid-stride, so any size is correct).
template <typename Kernel>
int resident_grid(Kernel kernel, int threads, size_t smem_bytes, int64_t blocks_of_work) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  int per_sm = 0;
  C10_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem_bytes));
  const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) * prop->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min(resident, blocks_of_work)));
}

}  // namespace gradproj::cuda
