// CUDA emulator (tests only): the parts of ATen's CUDA context csrc/cuda uses, for
// the emulated device of cuda_runtime.h (one device, one stream; see cuda_emu.h).
#pragma once

#include <c10/core/Stream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

namespace c10::cuda {

// A stream of the emulated device: launches run synchronously, so every stream
// is the default stream (id 0) and orders nothing.
class CUDAStream {
 public:
  c10::StreamId id() const { return 0; }
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return stream(); }
  c10::DeviceIndex device_index() const { return 0; }
  bool operator==(const CUDAStream&) const { return true; }
  bool operator!=(const CUDAStream&) const { return false; }
  void synchronize() const {}
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
inline CUDAStream getDefaultCUDAStream(c10::DeviceIndex = -1) { return {}; }

}  // namespace c10::cuda

namespace at::cuda {

using c10::cuda::CUDAStream;
using c10::cuda::getCurrentCUDAStream;
using c10::cuda::getDefaultCUDAStream;

inline cudaDeviceProp* getCurrentDeviceProperties() {
  return const_cast<cudaDeviceProp*>(&::gradproj_emu::device_properties());
}
inline cudaDeviceProp* getDeviceProperties(c10::DeviceIndex) {
  return getCurrentDeviceProperties();
}

}  // namespace at::cuda
