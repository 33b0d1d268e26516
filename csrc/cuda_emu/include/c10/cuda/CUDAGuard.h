// CUDA emulator (tests only): device guards. The emulated device is the CPU, and
// there is only one, so a guard has nothing to switch.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) {
    TORCH_CHECK(
        device.is_cpu(), "CUDA emulator: kernels run on CPU tensors, got a tensor on ", device);
  }
  explicit CUDAGuard(c10::DeviceIndex) {}
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
};

struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(std::optional<c10::Device>) {}
};

}  // namespace c10::cuda
