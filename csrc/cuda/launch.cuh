// How every kernel of csrc/cuda is launched: one helper for the host side that
// the projection engine (tile.cuh), projected AdamW and surgery used to repeat.
//
//  * [launch config] occupancy is queried once per (device, kernel, threads,
//    dynamic smem); cudaFuncAttributeMaxDynamicSharedMemorySize is set once per
//    (device, kernel) to the kernel's largest size, never to one call's size, so
//    two threads launching with different bases cannot undo each other's setting.
//    Both caches are guarded by a mutex; nothing here synchronizes with the device.
//  * [grid] enough resident blocks to fill the device, never more than the work:
//    kernels loop grid-stride, so any grid size is correct. Of those, the fewest that
//    keep the most work items a block (balanced_grid): the last block finishes no later,
//    and each block's fixed costs (the staged basis, mma_rows.cuh [async staging]) are
//    paid fewer times (256 tiles on an A100's 108 resident blocks: 86 blocks of 2-3
//    tiles, where 108 ran 3 or 2); past one block an SM, whole blocks an SM.
//  * [dtype] the ops take float32, bfloat16 and float16 tensors; one switch
//    instantiates the launcher for each.
//  * [emulation] the tests also build these sources with g++ and run them on
//    CPU tensors (GRADPROJ_CUDA_EMULATION: csrc/cuda_emu, tests/cuda_emulation.py);
//    the lines that must differ there go through the macros below.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

// [emulation]: the device type the ops check tensors against, a kernel's dynamic
// shared memory, and whether tables are uploaded from pinned memory (the emulated
// device is the CPU, where torch has no pinned memory).
#ifdef GRADPROJ_CUDA_EMULATION
#define GRADPROJ_CUDA_DEVICE_TYPE c10::DeviceType::CPU
#define GRADPROJ_DYNAMIC_SMEM(T, name) T* name = ::gradproj_emu::dynamic_smem<T>()
#define GRADPROJ_PINNED_HOST_MEMORY false
#else
#define GRADPROJ_CUDA_DEVICE_TYPE c10::DeviceType::CUDA
#define GRADPROJ_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#define GRADPROJ_PINNED_HOST_MEMORY true
#endif

namespace gradproj::cuda {

// Blocks of `kernel` resident per SM at `threads` and `smem` bytes, queried once
// per (device, kernel, threads, smem) (see [launch config]).
inline int blocks_per_sm(const void* kernel, int threads, size_t smem) {
  using Key = std::tuple<int, const void*, int, size_t>;
  static std::mutex mutex;
  static std::map<Key, int> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  const Key key{device, kernel, threads, smem};
  auto found = known.find(key);
  if (found != known.end()) return found->second;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  known.emplace(key, std::max(per_sm, 1));
  return std::max(per_sm, 1);
}

// Sets `kernel`'s dynamic shared memory ceiling to `max_bytes` once per device
// (see [launch config]); returns the ceiling, min(max_bytes, the device's opt-in
// limit), which every launch of the kernel must respect.
inline size_t allow_dynamic_smem(const void* kernel, size_t max_bytes) {
  using Key = std::pair<int, const void*>;
  static std::mutex mutex;
  static std::map<Key, size_t> done;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = done.find({device, kernel});
  if (found != done.end()) return found->second;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const size_t ceiling = std::min<size_t>(max_bytes, prop->sharedMemPerBlockOptin);
  if (ceiling > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(ceiling)));
  }
  done.emplace(Key{device, kernel}, ceiling);
  return ceiling;
}

// [grid] The fewest blocks, at most `resident`, that run `work` items in as many rounds
// as min(resident, work) blocks do: ceil(work / rounds) of them, or, past one block an SM
// (`sms`), a whole number of blocks an SM, so that no SM holds more blocks than another
// (the SMs' schedulers are shared by their blocks).
inline int64_t balanced_grid(int64_t resident, int64_t work, int64_t sms) {
  const int64_t full = std::max<int64_t>(1, std::min(resident, work));
  if (work <= full) return full;
  const int64_t rounds = (work + full - 1) / full;
  const int64_t fewest = (work + rounds - 1) / rounds;
  return fewest <= sms ? fewest : std::min(full, (fewest + sms - 1) / sms * sms);
}

// Grid size for `work` blocks of work (see [grid]).
inline int resident_grid_for(const void* kernel, int threads, size_t smem, int64_t work) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t resident =
      static_cast<int64_t>(blocks_per_sm(kernel, threads, smem)) * prop->multiProcessorCount;
  return static_cast<int>(balanced_grid(resident, work, prop->multiProcessorCount));
}

// Launches `kernel(args...)` on the current stream: `threads` per block, `smem`
// bytes of dynamic shared memory, a grid for `work` blocks of work (see [grid]).
// kMaxSmem: the most dynamic shared memory any launch of this kernel uses (0 for
// kernels without any); the kernel's ceiling is set to it once per device and
// `smem` is checked against that ceiling.
template <size_t kMaxSmem = 0, typename Kernel, typename... Args>
void launch_kernel(Kernel kernel, int64_t work, int threads, size_t smem, Args&&... args) {
  const void* fn = reinterpret_cast<const void*>(kernel);
  if constexpr (kMaxSmem > 0) {
    const size_t ceiling = allow_dynamic_smem(fn, kMaxSmem);
    TORCH_CHECK(
        smem <= ceiling, "gradproj cuda: a launch needs ", smem,
        " bytes of shared memory, this device allows ", ceiling,
        " per block (sharedMemPerBlockOptin); sm_80 or newer is required");
  }
  const int grid = resident_grid_for(fn, threads, smem, work);
#ifdef GRADPROJ_CUDA_EMULATION
  ::gradproj_emu::launch(kernel, grid, threads, smem, std::forward<Args>(args)...);
#else
  kernel<<<grid, threads, smem, at::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
#endif
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The scalar type T of a launcher instantiated by dispatch_dtype.
template <typename T>
struct Dtype {
  using type = T;
};

// Calls f(Dtype<T>{}) for `dtype`'s T with `device` current (see [dtype]); `op`
// names the op in the error for any other dtype.
template <typename F>
void dispatch_dtype(const at::Device& device, at::ScalarType dtype, const char* op, F&& f) {
  const c10::cuda::CUDAGuard guard(device);
  switch (dtype) {
    case at::kFloat:
      f(Dtype<float>{});
      break;
    case at::kBFloat16:
      f(Dtype<at::BFloat16>{});
      break;
    case at::kHalf:
      f(Dtype<at::Half>{});
      break;
    default:
      TORCH_CHECK(false, "gradproj cuda ", op, ": unsupported dtype ", dtype);
  }
}

}  // namespace gradproj::cuda
