// The schemas of gradproj's torch ops (op_schemas.h, shared with the CUDA
// emulator of the tests). Kernels are registered per device in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA); fake (meta) kernels for
// torch.compile are registered from Python in gradproj/_extension.py.
//
// The ops are the bucket-level contracts of gradproj/backends.py, with the same
// names, so the math, the reference (gradproj/reference.py), these kernels and
// their tests are found by one name:
//
//   project_bucket_(matrices, basis, weights, side)
//       every row x of every matrix: x <- x - U (w * U^T x)
//   project_anchored_bucket_(matrices, anchors, basis, weights, side)
//       every row x with anchor row c, a = U^T x:
//       x <- x - U (w * (a - c));  c <- c + (1 - w) * (a - c)  (only with weights)
//   projected_adamw_bucket_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
//                           anchors, basis, weights, side, *, lr, beta1, beta2, eps,
//                           weight_decay, maximize)
//       one AdamW step of every param, then the anchored projection of its rows;
//       max_exp_avg_sqs is empty unless amsgrad (as in torch's _fused_adamw_)
//   surgery_bucket_(g_unlearn, g_retain, strength, variant, symmetric)
//       per pair with d = u.r < 0: u <- u - c_u r (and r <- r - c_r u if symmetric)

#include <Python.h>
#include <torch/library.h>

#include "op_schemas.h"

// `import gradproj._C` only has to load this shared library so that the
// TORCH_LIBRARY blocks below run; the ops are reached through torch.ops.gradproj.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "gradproj's compiled kernels, registered as torch.ops.gradproj.*",
      -1,       // size of per-interpreter state (none)
      nullptr,  // no Python methods: the ops are torch ops
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(gradproj, m) { gradproj::define_ops(m); }
