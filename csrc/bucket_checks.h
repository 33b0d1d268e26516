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

// surgery_bucket_: pairs of contiguous 1-D views, one dtype, one device.
enum class SurgeryVariant { kProjection, kCosine };

inline SurgeryVariant check_surgery_bucket(
    at::TensorList g_unlearn, at::TensorList g_retain, c10::string_view variant,
    c10::DeviceType device_type) {
  TORCH_CHECK(
      g_unlearn.size() == g_retain.size(), "got ", g_unlearn.size(), " g_unlearn but ",
      g_retain.size(), " g_retain; surgery works on pairs");
  SurgeryVariant v;
  if (variant == "projection") {
    v = SurgeryVariant::kProjection;
  } else if (variant == "cosine") {
    v = SurgeryVariant::kCosine;
  } else {
    TORCH_CHECK(
        false, "variant must be 'projection' or 'cosine', got '", std::string(variant), "'");
  }
  for (size_t i = 0; i < g_unlearn.size(); ++i) {
    const at::Tensor& u = g_unlearn[i];
    const at::Tensor& r = g_retain[i];
    const auto dt = u.scalar_type();
    TORCH_CHECK(
        dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "g_unlearn[", i,
        "] has dtype ", dt, "; the compiled kernels take float32, bfloat16 or float16");
    TORCH_CHECK(
        dt == g_unlearn[0].scalar_type() && r.scalar_type() == dt, "g_unlearn[", i, "] (", dt,
        ") and g_retain[", i, "] (", r.scalar_type(), ") must have the dtype of g_unlearn[0] (",
        g_unlearn[0].scalar_type(), "); a bucket has one dtype");
    TORCH_CHECK(
        u.dim() == 1 && r.dim() == 1 && u.is_contiguous() && r.is_contiguous(), "g_unlearn[", i,
        "] and g_retain[", i, "] must be contiguous 1-D views, got shapes ", u.sizes(), " and ",
        r.sizes());
    TORCH_CHECK(
        u.numel() == r.numel() && u.numel() > 0, "g_unlearn[", i, "] has ", u.numel(),
        " elements and g_retain[", i, "] ", r.numel(), "; a pair has one non-zero size");
    TORCH_CHECK(
        u.device().type() == device_type && u.device() == g_unlearn[0].device() &&
            r.device() == u.device(),
        "g_unlearn[", i, "] is on ", u.device(), " and g_retain[", i, "] on ", r.device(),
        ", expected one ", device_type, " device for the bucket");
  }
  return v;
}

// projected_adamw_bucket_: params as in check_bucket; grads, exp_avgs, exp_avg_sqs
// (and max_exp_avg_sqs, empty unless amsgrad) of the params' shapes and dtype; the
// moments share the params' strides (grads may not); steps are float32 one-element
// tensors on the params' device.
inline Side check_adamw_bucket(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
    at::TensorList anchors, const at::Tensor& basis, const std::optional<at::Tensor>& weights,
    c10::string_view side_name, c10::DeviceType device_type) {
  const Side side = check_bucket(params, basis, weights, side_name, device_type);
  check_anchors(params, anchors, basis, side);
  const size_t n = params.size();
  const auto check_list = [&](at::TensorList list, const char* name, bool same_strides) {
    TORCH_CHECK(
        list.size() == n, "got ", n, " params but ", list.size(), " ", name,
        "; give one per param");
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& t = list[i];
      const at::Tensor& p = params[i];
      TORCH_CHECK(
          t.sizes() == p.sizes(), name, "[", i, "] has shape ", t.sizes(), " but params[", i,
          "] has ", p.sizes());
      TORCH_CHECK(
          t.scalar_type() == p.scalar_type(), name, "[", i, "] has dtype ", t.scalar_type(),
          " but params[", i, "] has ", p.scalar_type());
      TORCH_CHECK(
          t.device() == p.device(), name, "[", i, "] is on ", t.device(), " but params[", i,
          "] on ", p.device());
      TORCH_CHECK(
          !same_strides || t.strides() == p.strides(), name, "[", i, "] has strides ",
          t.strides(), " but params[", i, "] has ", p.strides(), "; they must match");
    }
  };
  check_list(grads, "grads", false);
  check_list(exp_avgs, "exp_avgs", true);
  check_list(exp_avg_sqs, "exp_avg_sqs", true);
  if (!max_exp_avg_sqs.empty()) check_list(max_exp_avg_sqs, "max_exp_avg_sqs", true);
  TORCH_CHECK(
      steps.size() == n, "got ", n, " params but ", steps.size(), " steps; give one per param");
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(
        steps[i].scalar_type() == at::kFloat && steps[i].numel() == 1, "steps[", i,
        "] must be a one-element float32 tensor, got ", steps[i].scalar_type(), " of shape ",
        steps[i].sizes());
    TORCH_CHECK(
        steps[i].device() == params[i].device(), "steps[", i, "] is on ", steps[i].device(),
        " but params[", i, "] on ", params[i].device());
  }
  return side;
}

}  // namespace gradproj
