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

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace gradproj::cuda {

// One matrix of a bucket. All int64 so the host can fill one int64 tensor.
struct MatrixEntry {
  int64_t data;        // address of element (0, 0)
  int64_t rows;        // rows of the row view (vectors to project)
  int64_t row_stride;  // elements between rows
  int64_t col_stride;  // elements between entries of a row
  int64_t first_row;   // index of its first row among all rows of the launch
  int64_t anchor;      // address of its (rows x k) float32 anchor, or 0
};

// A device table of `Entry`s (structs of int64 words, no padding), uploaded once
// per content (device_cache.cuh: [device tables]); the first upload is copied from
// pinned memory, non_blocking. Holds the device copy for the launches that read it.
template <typename Entry>
class DeviceTable {
  static_assert(
      std::is_trivially_copyable_v<Entry> && std::has_unique_object_representations_v<Entry> &&
          sizeof(Entry) % sizeof(int64_t) == 0,
      "a table entry must be packed int64s");

 public:
  DeviceTable(const std::vector<Entry>& entries, const at::Device& device)
      : words_(cached_words(as_words(entries), device)), size_(static_cast<int>(entries.size())) {}

  const Entry* data() const { return reinterpret_cast<const Entry*>(words_.data_ptr<int64_t>()); }
  int size() const { return size_; }

 private:
  static std::vector<int64_t> as_words(const std::vector<Entry>& entries) {
    std::vector<int64_t> words(entries.size() * (sizeof(Entry) / sizeof(int64_t)));
    if (!entries.empty()) std::memcpy(words.data(), entries.data(), entries.size() * sizeof(Entry));
    return words;
  }

  at::Tensor words_;
  int size_;
};

// Butterfly sum across a warp: every lane ends with the same sum, added in the
// same order each run (deterministic).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

}  // namespace gradproj::cuda
