// The schemas of gradproj's torch ops, in one place: csrc/ops.cpp defines them in
// the `gradproj` namespace; the CUDA emulator of the tests (csrc/cuda_emu/ops.cpp)
// defines the same schemas in `gradproj_emu`, so its kernels are called exactly as
// the real ones are. What each op does: csrc/ops.cpp.
#pragma once

#include <torch/library.h>

namespace gradproj {

inline void define_ops(torch::Library& m) {
  m.def(
      "project_bucket_(Tensor(a!)[] matrices, Tensor basis, Tensor? weights, str side) -> ()");
  m.def(
      "project_anchored_bucket_(Tensor(a!)[] matrices, Tensor(b!)[] anchors, Tensor basis, "
      "Tensor? weights, str side) -> ()");
  m.def(
      "projected_adamw_bucket_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor[] steps, "
      "Tensor(e!)[] anchors, Tensor basis, Tensor? weights, str side, *, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, bool maximize) -> ()");
  m.def(
      "surgery_bucket_(Tensor(a!)[] g_unlearn, Tensor(b!)[] g_retain, float strength, "
      "str variant, bool symmetric) -> ()");
}

}  // namespace gradproj
