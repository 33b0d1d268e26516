// The schemas of gradproj's torch ops. Kernels are registered per device in
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

#include <Python.h>
#include <torch/library.h>

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

TORCH_LIBRARY(gradproj, m) {
  m.def(
      "project_bucket_(Tensor(a!)[] matrices, Tensor basis, Tensor? weights, str side) -> ()");
  m.def(
      "project_anchored_bucket_(Tensor(a!)[] matrices, Tensor(b!)[] anchors, Tensor basis, "
      "Tensor? weights, str side) -> ()");
}
