// CUDA emulator (tests only): <cuda_bf16.h>. csrc/cuda converts through c10's
// BFloat16 / Half, which need nothing from it on the host; see cuda_emu.h.
#pragma once

#include <cuda_runtime.h>
