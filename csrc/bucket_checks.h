// Argument checks shared by the CPU and CUDA kernels of the bucket ops.
//
// gradproj.ops validates user input with friendly messages before it reaches a
// kernel; these checks guard the torch ops themselves (they are public through
// torch.ops.gradproj) so that no kernel ever reads memory it was not given.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>

namespace gradproj {

enum class Side { kInput, kOutput, kFlat };

inline Side parse_side(c10::string_view side) {
  if (side == "input") return Side::kInput;
  if (side == "output") return Side::kOutput;
  if (side == "flat") return Side::kFlat;
  TORCH_CHECK(false, "side must be 'input', 'output' or 'flat', got '", std::string(side), "'");
}

// The checks of the contract in gradproj/backends.py. Returns the parsed side.
inline Side check_bucket(
    at::TensorList matrices,
    const at::Tensor& basis,
    const std::optional<at::Tensor>& weights,
    c10::string_view side_name,
    c10::DeviceType device_type) {
  const Side side = parse_side(side_name);
  TORCH_CHECK(
      basis.dim() == 2 && basis.size(1) >= 1,
      "basis must be 2-D (D x k) with k >= 1, got shape ", basis.sizes());
  TORCH_CHECK(
      basis.scalar_type() == at::kFloat && basis.is_contiguous(),
      "basis must be contiguous float32, got ", basis.scalar_type(),
      basis.is_contiguous() ? "" : " (non-contiguous)");
  TORCH_CHECK(
      basis.device().type() == device_type, "basis is on ", basis.device(), ", expected ",
      device_type);
  const int64_t d = basis.size(0);
  const int64_t k = basis.size(1);
  if (weights.has_value()) {
    const at::Tensor& w = *weights;
    TORCH_CHECK(
        w.dim() == 1 && w.size(0) == k, "weights must have shape (", k,
        ",) to match the basis of shape ", basis.sizes(), ", got ", w.sizes());
    TORCH_CHECK(
        w.scalar_type() == at::kFloat && w.is_contiguous(),
        "weights must be contiguous float32, got ", w.scalar_type());
    TORCH_CHECK(
        w.device() == basis.device(), "weights are on ", w.device(), ", the basis on ",
        basis.device());
  }
  for (size_t i = 0; i < matrices.size(); ++i) {
    const at::Tensor& m = matrices[i];
    const auto dt = m.scalar_type();
    TORCH_CHECK(
        dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "matrices[", i,
        "] has dtype ", dt, "; the compiled kernels take float32, bfloat16 or float16");
    TORCH_CHECK(
        dt == matrices[0].scalar_type(), "matrices[", i, "] has dtype ", dt,
        " but matrices[0] has ", matrices[0].scalar_type(), "; a bucket has one dtype");
    TORCH_CHECK(
        m.device() == basis.device(), "matrices[", i, "] is on ", m.device(),
        ", the basis on ", basis.device());
    if (side == Side::kFlat) {
      TORCH_CHECK(
          m.dim() == 1 && m.size(0) == d, "side='flat': matrices[", i,
          "] must be 1-D with ", d, " elements (basis rows), got shape ", m.sizes());
    } else {
      TORCH_CHECK(
          m.dim() == 2 && m.size(1) == d, "matrices[", i, "] must be 2-D (rows x ", d,
          ") to match the basis of shape ", basis.sizes(), ", got shape ", m.sizes());
    }
  }
  return side;
}

inline void check_anchors(
    at::TensorList matrices, at::TensorList anchors, const at::Tensor& basis, Side side) {
  TORCH_CHECK(
      anchors.size() == matrices.size(), "got ", matrices.size(), " matrices but ",
      anchors.size(), " anchors; give one (rows x k) anchor per matrix");
  const int64_t k = basis.size(1);
  for (size_t i = 0; i < anchors.size(); ++i) {
    const at::Tensor& c = anchors[i];
    const int64_t rows = side == Side::kFlat ? 1 : matrices[i].size(0);
    TORCH_CHECK(
        c.dim() == 2 && c.size(0) == rows && c.size(1) == k, "anchors[", i,
        "] must have shape (", rows, ", ", k, "), got ", c.sizes());
    TORCH_CHECK(
        c.scalar_type() == at::kFloat && c.is_contiguous(), "anchors[", i,
        "] must be contiguous float32, got ", c.scalar_type(),
        c.is_contiguous() ? "" : " (non-contiguous)");
    TORCH_CHECK(
        c.device() == basis.device(), "anchors[", i, "] is on ", c.device(), ", the basis on ",
        basis.device());
  }
}

}  // namespace gradproj
