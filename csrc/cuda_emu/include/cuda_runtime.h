// CUDA emulator (tests only): the host runtime API csrc/cuda calls, and the
// built-in types nvcc provides (dim3, float4, ...). See csrc/cuda_emu/cuda_emu.h.
//
// The emulated device is one CPU "device" whose launches run synchronously on the
// calling thread, so streams and events have nothing to order: they are tokens.
// Its properties (multiProcessorCount, sharedMemPerBlockOptin) come from
// GRADPROJ_EMU_SMS and GRADPROJ_EMU_SMEM_OPTIN, read once per process.
#pragma once

#ifndef GRADPROJ_CUDA_EMULATION
#error "csrc/cuda_emu/include is only for the CUDA emulator build (-DGRADPROJ_CUDA_EMULATION)"
#endif

#include <cstddef>
#include <cstdint>

// ----------------------------------------------------------------- built-in types

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
};

// The vector types with CUDA's sizes and alignments: a misaligned vector access
// faults on the GPU, and here (movaps) as well, which the emulator reports.
#define GRADPROJ_EMU_VECTOR2(T, name, align)  \
  struct alignas(align) name {                \
    T x, y;                                   \
  };                                          \
  inline name make_##name(T x, T y) { return {x, y}; }
#define GRADPROJ_EMU_VECTOR4(T, name, align)  \
  struct alignas(align) name {                \
    T x, y, z, w;                             \
  };                                          \
  inline name make_##name(T x, T y, T z, T w) { return {x, y, z, w}; }

GRADPROJ_EMU_VECTOR2(float, float2, 8)
GRADPROJ_EMU_VECTOR4(float, float4, 16)
GRADPROJ_EMU_VECTOR2(int, int2, 8)
GRADPROJ_EMU_VECTOR4(int, int4, 16)
GRADPROJ_EMU_VECTOR2(unsigned int, uint2, 8)
GRADPROJ_EMU_VECTOR4(unsigned int, uint4, 16)
GRADPROJ_EMU_VECTOR2(double, double2, 16)
GRADPROJ_EMU_VECTOR2(long long, longlong2, 16)

#undef GRADPROJ_EMU_VECTOR2
#undef GRADPROJ_EMU_VECTOR4

// ----------------------------------------------------------------- runtime API

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
};

enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

constexpr unsigned int cudaEventDefault = 0x00;
constexpr unsigned int cudaEventDisableTiming = 0x02;

struct CUevent_st;
struct CUstream_st;
using cudaEvent_t = CUevent_st*;
using cudaStream_t = CUstream_st*;

// The fields csrc/cuda reads, and a few more a kernel's host code commonly does.
struct cudaDeviceProp {
  char name[256];
  int major;
  int minor;
  int multiProcessorCount;
  int warpSize;
  int maxThreadsPerBlock;
  int maxThreadsPerMultiProcessor;
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  size_t sharedMemPerMultiprocessor;
  int regsPerBlock;
  size_t totalGlobalMem;
};

namespace gradproj_emu {
// The emulated device's properties (see the file comment).
const cudaDeviceProp& device_properties();
}  // namespace gradproj_emu

const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
cudaError_t cudaDeviceSynchronize();
// Blocks of `func` per SM at `threads` and `smem` bytes: 2, or 1 when two would not
// fit the SM's shared memory (the kernels' __launch_bounds__(256, 2)).
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(
    int* blocks, const void* func, int threads, size_t smem);
// Records the ceiling that launches of `func` are then checked against (above 48 KiB
// a launch needs it, as on the GPU).
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value);
cudaError_t cudaEventCreate(cudaEvent_t* event);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int flags);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t event);
cudaError_t cudaEventDestroy(cudaEvent_t event);
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags = 0);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);

// The templated overloads of cuda_runtime.h, for kernels passed as function pointers.
template <typename T>
cudaError_t cudaFuncSetAttribute(T* func, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(func), attr, value);
}
template <typename T>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(
    int* blocks, T* func, int threads, size_t smem) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      blocks, reinterpret_cast<const void*>(func), threads, smem);
}
