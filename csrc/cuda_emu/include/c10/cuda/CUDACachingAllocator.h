// CUDA emulator (tests only): the caching allocator's stream bookkeeping. Emulated
// tensors are CPU tensors and launches are synchronous: nothing to record.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/core/Allocator.h>

namespace c10::cuda::CUDACachingAllocator {

inline void recordStream(const c10::DataPtr&, c10::cuda::CUDAStream) {}

}  // namespace c10::cuda::CUDACachingAllocator
