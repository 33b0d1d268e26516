// Host-side caches of the CUDA kernels: everything a call used to rebuild.
//
// A training step calls the same ops with the same basis and the same tensors
// again and again, so the per-call host work is kept to building a key:
//  * [packed basis] the layout the kernels read U in (U^T, zero padded)
//    is built once per (basis storage, data pointer, shape, strides, version counter,
//    layout, device) and reused until the basis is written in place (its version
//    changes) or freed. The entry holds a weak reference to the basis storage,
//    so it keeps no user memory alive and a freed-then-reused address can never
//    match a stale entry (the StorageImpl object outlives the weak reference).
//    Inference tensors have no version counter: their layouts are rebuilt per call.
//  * [device tables] a table is uploaded once per content (its int64 words):
//    the same bucket on the next step finds the device copy.
//  * [launch config] the occupancy and shared-memory attribute caches: launch.cuh.
// Every cache is guarded by a mutex; nothing here synchronizes with the device.
//
// [streams] a cached tensor is built on the stream current at the time. When a
// later call runs on another stream, that stream waits for an event recorded
// after the build (a device-side wait), and the tensor's block is marked as used
// on that stream so the caching allocator does not hand it out again while the
// kernel may still read it after eviction.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/Storage.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/intrusive_ptr.h>

#include <cuda_runtime.h>

#include "cuda/launch.cuh"

#include <algorithm>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

namespace gradproj::cuda {

// A device tensor built on `stream`, with an event recorded after its build.
class StreamedTensor {
 public:
  StreamedTensor(at::Tensor value, const c10::cuda::CUDAStream& stream)
      : value_(std::move(value)), stream_id_(stream.id()) {
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(ready_, stream.stream()));
  }
  StreamedTensor(const StreamedTensor&) = delete;
  StreamedTensor& operator=(const StreamedTensor&) = delete;
  ~StreamedTensor() {
    // Destroying an event with pending work is allowed: it is released when done.
    if (ready_ != nullptr) cudaEventDestroy(ready_);
  }

  // The tensor, ordered before the work about to be enqueued on `stream`.
  at::Tensor use_on(const c10::cuda::CUDAStream& stream) const {
    if (stream.id() != stream_id_) {
      C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), ready_, 0));
      c10::cuda::CUDACachingAllocator::recordStream(value_.storage().data_ptr(), stream);
    }
    return value_;
  }

 private:
  at::Tensor value_;
  c10::StreamId stream_id_;
  cudaEvent_t ready_ = nullptr;
};

// The layouts kernels read the basis in (see pack_basis).
enum class BasisLayout : int {
  kTransposed = 0,    // U^T, (kp x dp), zero padded (the rows kernel's, every layout's)
  kMmaFragments = 1,  // U in the tensor-core kernel's fragment order (mma_rows.cuh [basis])
  kMmaPairs = 2,      // U split, hi then lo, in coefficient pairs (mma_rows.cuh [pairs])
  kMmaStacked = 3,    // k <= 8: U split, hi as group 0, lo as group 1 of kMmaFragments ([stacked])
  kMmaRawPairs = 4,   // U in kMmaPairs' order, unsplit (mma_rows.cuh [raw pairs])
};

// Rounds n up to a multiple of m.
inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// [3xTF32] hi of x, elementwise, as mma::split forms it on the device: half a tf32 ulp
// added, the low 13 bits cleared (lo = x - hi exactly).
inline at::Tensor tf32_hi(const at::Tensor& x) {
  return at::bitwise_and(x.view(at::kInt) + 0x1000, static_cast<int32_t>(0xffffe000u)).view(at::kFloat);
}

// U (d x k float32) in `layout`, with d padded to dp = round_up(d, 8) and k to
// kp = round_up(k, 8); the padding is zero, so padded rows and coefficients add 0.
inline at::Tensor pack_basis(const at::Tensor& basis, BasisLayout layout) {
  const int64_t d = basis.size(0);
  const int64_t k = basis.size(1);
  const int64_t dp = round_up(d, layout == BasisLayout::kTransposed ? 8 : 16);
  const bool pairs = layout == BasisLayout::kMmaPairs || layout == BasisLayout::kMmaRawPairs;
  const int64_t kp = round_up(k, pairs ? 16 : 8);
  at::Tensor padded = at::zeros({dp, kp}, basis.options());
  padded.narrow(0, 0, d).narrow(1, 0, k).copy_(basis);
  if (layout == BasisLayout::kTransposed) return padded.t().contiguous();
  const at::TensorOptions index = basis.options().dtype(at::kLong);
  if (pairs) {
    // mma_rows.cuh [pairs]: unit (c, b, half, q, slot) with (4 e + a) = slot ^ f(q) holds
    // U[16 b + 4 a + e + {0, 0, 2, 2}][16 c + q + {0, 8, 0, 8}], its hi (half 0) or lo
    // (half 1) ([3xTF32]: hi rounded to tf32 as mma::split, lo = x - hi exactly). Chunk
    // major, hi beside lo ([offsets]).
    const at::Tensor c = at::arange(kp / 16, index).view({-1, 1, 1, 1, 1});
    const at::Tensor b = at::arange(dp / 16, index).view({1, -1, 1, 1, 1});
    const at::Tensor q = at::arange(8, index).view({1, 1, -1, 1, 1});
    const at::Tensor slot = at::arange(8, index).view({1, 1, 1, -1, 1});
    const at::Tensor comp = at::arange(4, index).view({1, 1, 1, 1, -1});
    const at::Tensor f = q.remainder(2) * 4 + at::floor_divide(q, 2).remainder(2) * 2;
    const at::Tensor ea = at::bitwise_xor(slot, f);
    const at::Tensor row = b * 16 + ea.remainder(4) * 4 + at::floor_divide(ea, 4) +
                           at::floor_divide(comp, 2) * 2;
    const at::Tensor col = c * 16 + q + comp.remainder(2) * 8;
    const at::Tensor x = padded.flatten().index_select(0, (row * kp + col).flatten());
    // [raw pairs]: U as it is, hi and lo formed on the device (mma::split_truncated)
    if (layout == BasisLayout::kMmaRawPairs) return x;
    const at::Tensor hi = tf32_hi(x);
    const at::Tensor lo = x - hi;
    return at::stack({hi.view({kp / 16, dp / 16, 256}), lo.view({kp / 16, dp / 16, 256})}, 2).flatten();
  }
  TORCH_CHECK(layout == BasisLayout::kMmaFragments || layout == BasisLayout::kMmaStacked,
              "gradproj cuda: unknown basis layout");
  int64_t kf = kp;  // the fragment layout's columns
  if (layout == BasisLayout::kMmaStacked) {
    // mma_rows.cuh [stacked]: the columns of U (k <= 8) split as mma::split, hi then lo
    TORCH_CHECK(kp == 8, "gradproj cuda: a stacked basis has at most 8 columns");
    const at::Tensor hi = tf32_hi(padded);
    padded = at::cat({hi, padded - hi}, 1).contiguous();
    kf = 16;
  }
  // mma_rows.cuh [basis]: element (j, b, a, p, e) = U[16 b + 4 a + e][8 j + (p ^ f(a))],
  // f(a) = 4 (a & 1) + 2 (a >> 1): group major ([offsets]). Index arithmetic on the
  // device: no host copy.
  const at::Tensor j = at::arange(kf / 8, index).view({-1, 1, 1, 1, 1});
  const at::Tensor b = at::arange(dp / 16, index).view({1, -1, 1, 1, 1});
  const at::Tensor a = at::arange(4, index).view({1, 1, -1, 1, 1});
  const at::Tensor p = at::arange(8, index).view({1, 1, 1, -1, 1});
  const at::Tensor e = at::arange(4, index).view({1, 1, 1, 1, -1});
  const at::Tensor f = (a * 4).remainder(8) + at::floor_divide(a, 2) * 2;
  const at::Tensor source = (b * 16 + a * 4 + e) * kf + j * 8 + at::bitwise_xor(p, f);
  return padded.flatten().index_select(0, source.flatten());
}

// The packed basis for this call (see [packed basis]).
inline at::Tensor packed_basis(const at::Tensor& basis, BasisLayout layout) {
  const c10::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();
  if (basis.is_inference()) return pack_basis(basis, layout);
  struct Entry {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    const void* data;
    int64_t d, k, row_stride, col_stride;  // a block of columns (mma_rows.cuh [columns]) is a view
    uint32_t version;
    BasisLayout layout;
    c10::DeviceIndex device;
    std::shared_ptr<StreamedTensor> packed;
  };
  constexpr size_t kMaxEntries = 64;  // a basis of many column blocks takes one entry each
  static std::mutex mutex;
  // Most recently used first. Never destroyed: tensors freed during static
  // destruction, after the CUDA context is gone, would fail.
  static auto& entries = *new std::list<Entry>();
  const std::lock_guard<std::mutex> lock(mutex);
  const c10::StorageImpl* storage = basis.storage().unsafeGetStorageImpl();
  const uint32_t version = basis.unsafeGetTensorImpl()->version_counter().current_version();
  for (auto it = entries.begin(); it != entries.end();) {
    if (it->storage.expired()) {  // the basis was freed: its entries can never match again
      it = entries.erase(it);
      continue;
    }
    if (it->storage._unsafe_get_target() == storage && it->data == basis.data_ptr() &&
        it->d == basis.size(0) && it->k == basis.size(1) && it->row_stride == basis.stride(0) &&
        it->col_stride == basis.stride(1) && it->version == version &&
        it->layout == layout && it->device == basis.device().index()) {
      entries.splice(entries.begin(), entries, it);
      return entries.front().packed->use_on(stream);
    }
    ++it;
  }
  auto packed = std::make_shared<StreamedTensor>(pack_basis(basis, layout), stream);
  entries.push_front(
      {basis.storage().getWeakStorageImpl(), basis.data_ptr(), basis.size(0), basis.size(1),
       basis.stride(0), basis.stride(1), version, layout, basis.device().index(), packed});
  if (entries.size() > kMaxEntries) entries.pop_back();
  return entries.front().packed->use_on(stream);
}

// `words` as an int64 device tensor, uploaded once per content and device (see
// [device tables]). The first upload goes through pinned memory, non_blocking.
inline at::Tensor cached_words(const std::vector<int64_t>& words, const at::Device& device) {
  const c10::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();
  using Key = std::pair<c10::DeviceIndex, std::vector<int64_t>>;
  constexpr size_t kMaxEntries = 64;
  static std::mutex mutex;
  static auto& tables = *new std::map<Key, std::shared_ptr<StreamedTensor>>();  // never destroyed
  static auto& order = *new std::list<Key>();  // most recently used first
  const std::lock_guard<std::mutex> lock(mutex);
  Key key{device.index(), words};
  auto found = tables.find(key);
  if (found != tables.end()) {
    order.remove(key);
    order.push_front(key);
    return found->second->use_on(stream);
  }
  at::Tensor host = at::empty(
      {static_cast<int64_t>(words.size())},
      at::TensorOptions().dtype(at::kLong).pinned_memory(GRADPROJ_PINNED_HOST_MEMORY));
  std::copy(words.begin(), words.end(), host.data_ptr<int64_t>());
  auto table = std::make_shared<StreamedTensor>(host.to(device, /*non_blocking=*/true), stream);
  tables.emplace(key, table);
  order.push_front(key);
  if (order.size() > kMaxEntries) {
    tables.erase(order.back());
    order.pop_back();
  }
  return table->use_on(stream);
}

}  // namespace gradproj::cuda
