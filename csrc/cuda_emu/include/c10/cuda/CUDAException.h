// CUDA emulator (tests only): c10's CUDA error checks over the emulated runtime
// API of cuda_runtime.h. A failed call throws c10::Error (a RuntimeError in Python).
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(EXPR)                                                        \
  do {                                                                              \
    const cudaError_t gradproj_emu_err = (EXPR);                                    \
    TORCH_CHECK(                                                                    \
        gradproj_emu_err == cudaSuccess, "CUDA error (emulated): ",                 \
        cudaGetErrorString(gradproj_emu_err), " in ", #EXPR);                       \
  } while (0)

#define C10_CUDA_CHECK_WARN(EXPR) static_cast<void>(EXPR)

// Emulated launches throw from the launch itself (a kernel's error is never deferred).
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
