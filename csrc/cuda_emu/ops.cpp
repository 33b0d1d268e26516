// CUDA emulator (tests only): the schemas of gradproj's ops under the namespace
// `gradproj_emu`, which the emulated csrc/cuda/*.cu register their kernels in (as
// CPU kernels: the emulated device is the CPU). A separate namespace, so loading
// the emulator next to gradproj._C changes none of torch.ops.gradproj.
#include <torch/library.h>

#include "op_schemas.h"

TORCH_LIBRARY(gradproj_emu, m) { gradproj::define_ops(m); }
