// The CPU kernels of gradproj::projected_adamw_bucket_, compiled once per
// instruction set.
//
// Like project_kernels.h, whose row / column-panel / flat projection kernels these
// reuse: no include guard and no #include; kernels_per_isa.h includes it (for
// csrc/cpu/adamw.cpp) inside namespace isa_default and, under
// `#pragma GCC target("avx2,fma")`, inside isa_avx2, after project_kernels.h.
//
// Each kernel computes the AdamW update x' of a few rows (or a chunk) in fp32 into
// a small per-thread buffer while writing m, v (and v-hat max), then projects the
// buffer with the kernels of project_kernels.h and writes p once.

// The AdamW update of n elements of p/m/v (first at o, stride s) and g (first at
// og, stride sg), in fp32, into out[0..n); stores m, v (and v-hat max) when STORE:
//   x' = p (1 - lr wd) - step_size m / (sqrt(v^) inv_sqrt_bias2 + eps).
// Pointers and scalars are copied into restrict locals first: otherwise a store
// to m could alias them and GCC vectorizes nothing. Measured with -fno-math-errno
// (setup.py): one step of 8 x 320 x 768 fp32 params, k = 1, one thread: 5.4 ms
// with a per-element function reading through the AdamWRef, 2.1 ms with this.
template <typename T, bool AMSGRAD, bool MAXIMIZE, bool STORE>
inline void adamw_span(
    const AdamWRef& t, int64_t o, int64_t og, int64_t n, int64_t s, int64_t sg,
    float* __restrict__ out) {
  const T* __restrict__ p = static_cast<const T*>(t.p) + o;
  const T* __restrict__ g = static_cast<const T*>(t.g) + og;
  T* __restrict__ m = static_cast<T*>(t.m) + o;
  T* __restrict__ v = static_cast<T*>(t.v) + o;
  T* __restrict__ vmax = AMSGRAD ? static_cast<T*>(t.vmax) + o : nullptr;
  const AdamWScalars c = t.scalars;
  const auto element = [&](int64_t j, int64_t js, int64_t jg) {
    float grad = to_f32(g[jg]);
    if constexpr (MAXIMIZE) grad = -grad;
    const float mj = c.beta1 * to_f32(m[js]) + c.one_minus_beta1 * grad;
    const float vj = c.beta2 * to_f32(v[js]) + c.one_minus_beta2 * grad * grad;
    float v_hat = vj;
    if constexpr (AMSGRAD) {
      v_hat = std::max(to_f32(vmax[js]), vj);
      if constexpr (STORE) vmax[js] = from_f32<T>(v_hat);
    }
    if constexpr (STORE) {
      m[js] = from_f32<T>(mj);
      v[js] = from_f32<T>(vj);
    }
    // std::sqrt is IEEE correctly rounded, as torch's AdamW and tl.sqrt_rn.
    const float den = std::sqrt(v_hat) * c.inv_sqrt_bias2 + c.eps;
    out[j] = to_f32(p[js]) * c.decay - c.step_size * mj / den;
  };
  if (s == 1 && sg == 1) {
    for (int64_t j = 0; j < n; ++j) element(j, j, j);
  } else {
    for (int64_t j = 0; j < n; ++j) element(j, j * s, j * sg);
  }
}

// Rows [r0, r1) of a param whose view rows are the vectors (side="input", or any
// strides): groups of kRowsPerGroup rows of x' in `buffer` (rows x d), projected by
// project_row_group (a = x' U, then x' - U (w (a - c))) and stored.
template <typename T, bool AMSGRAD, bool MAXIMIZE>
void adamw_rows(
    const AdamWRef& t, int64_t r0, int64_t r1, const BasisRef& basis, float* buffer, float* a) {
  const int64_t d = basis.d;
  T* p = static_cast<T*>(t.p);
  for (int64_t r = r0; r < r1; r += kRowsPerGroup) {
    const int rows = static_cast<int>(std::min<int64_t>(kRowsPerGroup, r1 - r));
    for (int i = 0; i < rows; ++i) {
      adamw_span<T, AMSGRAD, MAXIMIZE, true>(
          t, (r + i) * t.row_stride, (r + i) * t.g_row_stride, d, t.col_stride, t.g_col_stride,
          buffer + i * d);
    }
    float* anchor = t.anchor + r * basis.k;
    if (rows == kRowsPerGroup) {
      project_row_group<kRowsPerGroup>(buffer, d, basis, anchor, a);
    } else {
      for (int i = 0; i < rows; ++i) {
        project_row_group<1>(buffer + i * d, d, basis, anchor + i * basis.k, a);
      }
    }
    for (int i = 0; i < rows; ++i) {
      T* dst = p + (r + i) * t.row_stride;
      const float* src = buffer + i * d;
      for (int64_t j = 0; j < d; ++j) dst[j * t.col_stride] = from_f32<T>(src[j]);
    }
  }
}

// Columns [c0, c1) of W for a transposed view (side="output": view row c is column
// c of W, unit row stride): panels of kColsPerPanel columns of x' in `buffer`
// (d x kColsPerPanel, read along W's rows), projected by project_col_panel.
template <typename T, bool AMSGRAD, bool MAXIMIZE>
void adamw_cols(
    const AdamWRef& t, int64_t c0, int64_t c1, const BasisRef& basis, float* buffer, float* a,
    float* coef) {
  const int64_t d = basis.d;
  T* p = static_cast<T*>(t.p);
  for (int64_t c = c0; c < c1; c += kColsPerPanel) {
    const int cols = static_cast<int>(std::min<int64_t>(kColsPerPanel, c1 - c));
    // A full panel as one d x 16 block; a partial one column by column (d x 1).
    const int ldb = cols == kColsPerPanel ? kColsPerPanel : 1;
    for (int i0 = 0; i0 < cols; i0 += ldb) {
      // Row j of the panel: ldb columns of W's row j, unit stride in p/m/v.
      for (int64_t j = 0; j < d; ++j) {
        const int64_t col = c + i0;
        adamw_span<T, AMSGRAD, MAXIMIZE, true>(
            t, col * t.row_stride + j * t.col_stride, col * t.g_row_stride + j * t.g_col_stride,
            ldb, t.row_stride, t.g_row_stride, buffer + j * ldb);
      }
      float* anchor = t.anchor + (c + i0) * basis.k;
      if (ldb == kColsPerPanel) {
        project_col_panel<kColsPerPanel>(buffer, ldb, basis, anchor, a, coef);
      } else {
        project_col_panel<1>(buffer, ldb, basis, anchor, a, coef);
      }
      for (int64_t j = 0; j < d; ++j) {
        for (int i = 0; i < ldb; ++i) {
          p[(c + i0 + i) * t.row_stride + j * t.col_stride] = from_f32<T>(buffer[j * ldb + i]);
        }
      }
    }
  }
}

// side="flat", pass 1: x' of elements [j0, j1) into `buffer` (nothing stored), and
// partial[b] = sum_j x'[j] u[j, b].
template <typename T, bool AMSGRAD, bool MAXIMIZE>
void adamw_flat_partial(
    const AdamWRef& t, int64_t j0, int64_t j1, const BasisRef& basis, float* buffer,
    float* partial) {
  adamw_span<T, AMSGRAD, MAXIMIZE, false>(
      t, j0 * t.col_stride, j0 * t.g_col_stride, j1 - j0, t.col_stride, t.g_col_stride, buffer);
  flat_partial<float>(buffer, 1, 0, j1 - j0, basis.u + j0 * basis.k, basis.k, partial);
}

// side="flat", pass 2: the same x' again (same arithmetic), m, v stored, then
// x' - U coef stored to p.
template <typename T, bool AMSGRAD, bool MAXIMIZE>
void adamw_flat_update(
    const AdamWRef& t, int64_t j0, int64_t j1, const BasisRef& basis, float* buffer,
    const float* coef) {
  adamw_span<T, AMSGRAD, MAXIMIZE, true>(
      t, j0 * t.col_stride, j0 * t.g_col_stride, j1 - j0, t.col_stride, t.g_col_stride, buffer);
  flat_update<float>(buffer, 1, 0, j1 - j0, basis.u + j0 * basis.k, basis.k, coef);
  T* p = static_cast<T*>(t.p);
  for (int64_t j = j0; j < j1; ++j) p[j * t.col_stride] = from_f32<T>(buffer[j - j0]);
}

template <typename T, bool AMSGRAD, bool MAXIMIZE>
constexpr AdamWKernels adamw_kernels() {
  return AdamWKernels{
      &adamw_rows<T, AMSGRAD, MAXIMIZE>, &adamw_cols<T, AMSGRAD, MAXIMIZE>,
      &adamw_flat_partial<T, AMSGRAD, MAXIMIZE>, &adamw_flat_update<T, AMSGRAD, MAXIMIZE>,
      true};  // the flat kernels form x' of a chunk in the buffer
}

template <typename T>
AdamWKernels adamw_kernels(bool amsgrad, bool maximize) {
  if (amsgrad) {
    return maximize ? adamw_kernels<T, true, true>() : adamw_kernels<T, true, false>();
  }
  return maximize ? adamw_kernels<T, false, true>() : adamw_kernels<T, false, false>();
}
