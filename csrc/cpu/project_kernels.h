// The CPU kernels of the bucket projections, compiled once per instruction set.
//
// No include guard and no #include on purpose: kernels_per_isa.h includes this
// file twice, inside namespace isa_default and inside isa_avx2 (under
// `#pragma GCC target("avx2,fma")`), after every header it needs. The same loops
// are thus vectorized for SSE2 and for AVX2+FMA, and one is picked at run time.
//
// The hot loops are written with GCC vector extensions (Lanes, 8 floats), so they
// vectorize in both builds; sums are kept in per-lane partials and combined in one
// fixed order, so a row's result never depends on threads (determinism), only on
// the instruction set.

constexpr int kLanes = 8;           // one AVX2 register of float
constexpr int kRowsPerGroup = 4;    // rows projected together (share each basis load)
constexpr int kColsPerPanel = 16;   // output side: columns of G per panel (two AVX2 registers)

template <typename T>
inline float to_f32(T v) {
  return static_cast<float>(v);
}

template <typename T>
inline T from_f32(float v) {
  return static_cast<T>(v);
}

// kLanes floats as one GCC/Clang vector: one AVX2 register, or two SSE2 registers
// in the baseline build. Values live in Lanes; memory is accessed through
// UnalignedLanes (aligned(4), may_alias), so rows need no 32-byte alignment.
// (Loading with memcpy instead made GCC keep every accumulator on the stack.)
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));
typedef float UnalignedLanes
    __attribute__((vector_size(kLanes * sizeof(float)), aligned(4), may_alias));

inline Lanes load_lanes(const float* p) {
  return *reinterpret_cast<const UnalignedLanes*>(p);
}

inline void store_lanes(float* p, Lanes v) {
  *reinterpret_cast<UnalignedLanes*>(p) = v;
}

// Fixed-order sum of the lanes.
inline float sum_lanes(const float* lanes) {
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
      ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

inline float sum_lanes(Lanes v) {
  float lanes[kLanes];
  store_lanes(lanes, v);
  return sum_lanes(lanes);
}

// ---------------------------------------------------------------------------
// Row layout: the vectors are rows x (length d, unit stride) of a fp32 block.
// ut is U^T (k x d, contiguous), so both passes run along j with unit stride.
// ---------------------------------------------------------------------------

// The row kernels name their accumulators one by one (no arrays of vectors) so
// that GCC keeps every one of them in a register.

// out[r * k + b] = sum_j x[r * ldx + j] * ut[b * d + j]   for r < RB (1 or 4), b < KB
// (1 or 2); ut points at row b = 0 of a block of U^T. With RB = 4, KB = 2 each
// 8-lane step loads 6 vectors for 8 FMAs.
template <int RB, int KB>
inline void row_dots(
    const float* x, int64_t ldx, const float* ut, int64_t d, float* out, int64_t k) {
  static_assert(RB == 1 || RB == 4, "row groups are 1 or 4 rows");
  static_assert(KB == 1 || KB == 2, "1 or 2 basis columns per pass");
  Lanes a00 = {}, a10 = {}, a20 = {}, a30 = {};  // column b = 0 of rows 0..3
  Lanes a01 = {}, a11 = {}, a21 = {}, a31 = {};  // column b = 1
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    const Lanes u0 = load_lanes(ut + j);
    const Lanes x0 = load_lanes(x + j);
    a00 += x0 * u0;
    if constexpr (KB == 2) {
      const Lanes u1 = load_lanes(ut + d + j);
      a01 += x0 * u1;
      if constexpr (RB == 4) {
        const Lanes x1 = load_lanes(x + ldx + j);
        const Lanes x2 = load_lanes(x + 2 * ldx + j);
        const Lanes x3 = load_lanes(x + 3 * ldx + j);
        a10 += x1 * u0;
        a20 += x2 * u0;
        a30 += x3 * u0;
        a11 += x1 * u1;
        a21 += x2 * u1;
        a31 += x3 * u1;
      }
    } else if constexpr (RB == 4) {
      a10 += load_lanes(x + ldx + j) * u0;
      a20 += load_lanes(x + 2 * ldx + j) * u0;
      a30 += load_lanes(x + 3 * ldx + j) * u0;
    }
  }
  const Lanes accs[2][4] = {{a00, a10, a20, a30}, {a01, a11, a21, a31}};
  for (int r = 0; r < RB; ++r) {
    for (int b = 0; b < KB; ++b) {
      float tail = 0.f;
      for (int64_t t = j; t < d; ++t) tail += x[r * ldx + t] * ut[b * d + t];
      out[r * k + b] = sum_lanes(accs[b][r]) + tail;
    }
  }
}

// x[r * ldx + j] -= sum_kk a[r * k + kk] * ut[kk * d + j]   for r < RB (1 or 4), all j.
// Two vectors per row: 8 accumulators, 2 basis vectors and 4 broadcasts fill the 16
// AVX2 registers, 6 loads per 8 FMAs.
template <int RB>
inline void row_update(float* x, int64_t ldx, const float* ut, int64_t d, const float* a, int64_t k) {
  static_assert(RB == 1 || RB == 4, "row groups are 1 or 4 rows");
  int64_t j = 0;
  for (; j + 2 * kLanes <= d; j += 2 * kLanes) {
    float* xj = x + j;
    Lanes lo0 = load_lanes(xj), hi0 = load_lanes(xj + kLanes);
    Lanes lo1 = lo0, hi1 = hi0, lo2 = lo0, hi2 = hi0, lo3 = lo0, hi3 = hi0;
    if constexpr (RB == 4) {
      lo1 = load_lanes(xj + ldx), hi1 = load_lanes(xj + ldx + kLanes);
      lo2 = load_lanes(xj + 2 * ldx), hi2 = load_lanes(xj + 2 * ldx + kLanes);
      lo3 = load_lanes(xj + 3 * ldx), hi3 = load_lanes(xj + 3 * ldx + kLanes);
    }
    for (int64_t kk = 0; kk < k; ++kk) {
      const Lanes u_lo = load_lanes(ut + kk * d + j);
      const Lanes u_hi = load_lanes(ut + kk * d + j + kLanes);
      const float a0 = a[kk];
      lo0 -= a0 * u_lo;
      hi0 -= a0 * u_hi;
      if constexpr (RB == 4) {
        const float a1 = a[k + kk], a2 = a[2 * k + kk], a3 = a[3 * k + kk];
        lo1 -= a1 * u_lo;
        hi1 -= a1 * u_hi;
        lo2 -= a2 * u_lo;
        hi2 -= a2 * u_hi;
        lo3 -= a3 * u_lo;
        hi3 -= a3 * u_hi;
      }
    }
    store_lanes(xj, lo0);
    store_lanes(xj + kLanes, hi0);
    if constexpr (RB == 4) {
      store_lanes(xj + ldx, lo1);
      store_lanes(xj + ldx + kLanes, hi1);
      store_lanes(xj + 2 * ldx, lo2);
      store_lanes(xj + 2 * ldx + kLanes, hi2);
      store_lanes(xj + 3 * ldx, lo3);
      store_lanes(xj + 3 * ldx + kLanes, hi3);
    }
  }
  for (; j < d; ++j) {
    for (int r = 0; r < RB; ++r) {
      float out = x[r * ldx + j];
      for (int64_t kk = 0; kk < k; ++kk) {
        out -= a[r * k + kk] * ut[kk * d + j];
      }
      x[r * ldx + j] = out;
    }
  }
}

// Projects RB rows held in fp32: a = x U, finish (weights, anchors), x -= a U^T.
// anchor: the RB anchor rows (row stride k) or nullptr; a: RB x k scratch.
template <int RB>
inline void project_row_group(
    float* x, int64_t ldx, const BasisRef& basis, float* anchor, float* a) {
  const int64_t d = basis.d;
  const int64_t k = basis.k;
  int64_t kk = 0;
  for (; kk + 2 <= k; kk += 2) {
    row_dots<RB, 2>(x, ldx, basis.ut + kk * d, d, a + kk, k);
  }
  for (; kk < k; ++kk) {
    row_dots<RB, 1>(x, ldx, basis.ut + kk * d, d, a + kk, k);
  }
  for (int r = 0; r < RB; ++r) {
    finish_coeffs(a + r * k, k, basis.weights, anchor ? anchor + r * k : nullptr);
  }
  row_update<RB>(x, ldx, basis.ut, d, a, k);
}

// Rows [r0, r1) of a matrix whose rows are the vectors (any strides). fp32 rows
// with unit column stride are projected where they lie; everything else goes
// through `buffer` (kRowsPerGroup x d floats), converted to fp32 and back.
template <typename T>
void project_matrix_rows(
    const MatrixRef& m, int64_t r0, int64_t r1, const BasisRef& basis, float* buffer, float* a) {
  T* data = static_cast<T*>(m.data);
  const int64_t d = basis.d;
  const bool in_place = std::is_same_v<T, float> && m.col_stride == 1;
  for (int64_t r = r0; r < r1; r += kRowsPerGroup) {
    const int rows = static_cast<int>(std::min<int64_t>(kRowsPerGroup, r1 - r));
    float* x = buffer;
    int64_t ldx = d;
    if (in_place) {
      x = reinterpret_cast<float*>(data + r * m.row_stride);
      ldx = m.row_stride;
    } else {
      for (int i = 0; i < rows; ++i) {
        const T* src = data + (r + i) * m.row_stride;
        float* dst = buffer + i * d;
        if (m.col_stride == 1) {
          for (int64_t j = 0; j < d; ++j) dst[j] = to_f32(src[j]);
        } else {
          for (int64_t j = 0; j < d; ++j) dst[j] = to_f32(src[j * m.col_stride]);
        }
      }
    }
    float* anchor = m.anchor ? m.anchor + r * basis.k : nullptr;
    if (rows == kRowsPerGroup) {
      project_row_group<kRowsPerGroup>(x, ldx, basis, anchor, a);
    } else {
      for (int i = 0; i < rows; ++i) {
        project_row_group<1>(x + i * ldx, ldx, basis, anchor ? anchor + i * basis.k : nullptr, a);
      }
    }
    if (!in_place) {
      for (int i = 0; i < rows; ++i) {
        T* dst = data + (r + i) * m.row_stride;
        const float* src = buffer + i * d;
        if (m.col_stride == 1) {
          for (int64_t j = 0; j < d; ++j) dst[j] = from_f32<T>(src[j]);
        } else {
          for (int64_t j = 0; j < d; ++j) dst[j * m.col_stride] = from_f32<T>(src[j]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Column layout (side="output"): the vectors are the columns of G (d x R, row
// stride ldy), i.e. the rows of the transposed view. Work on G itself:
// A = U^T G, then G -= U A, both vectorized along the columns.
// ---------------------------------------------------------------------------

// a[b * NC + c] = sum_j u[j * k + b] * y[j * ldy + c]   for b < KB, c < NC.
template <int NC, int KB>
inline void col_dots(const float* y, int64_t ldy, const float* u, int64_t k, int64_t d, float* a) {
  if constexpr (NC == 2 * kLanes) {
    Lanes lo[KB] = {}, hi[KB] = {};
    for (int64_t j = 0; j < d; ++j) {
      const Lanes y_lo = load_lanes(y + j * ldy);
      const Lanes y_hi = load_lanes(y + j * ldy + kLanes);
      for (int b = 0; b < KB; ++b) {
        const float ub = u[j * k + b];
        lo[b] += ub * y_lo;
        hi[b] += ub * y_hi;
      }
    }
    for (int b = 0; b < KB; ++b) {
      store_lanes(a + b * NC, lo[b]);
      store_lanes(a + b * NC + kLanes, hi[b]);
    }
  } else {
    float acc[KB][NC] = {};
    for (int64_t j = 0; j < d; ++j) {
      for (int b = 0; b < KB; ++b) {
        for (int c = 0; c < NC; ++c) acc[b][c] += u[j * k + b] * y[j * ldy + c];
      }
    }
    for (int b = 0; b < KB; ++b) {
      for (int c = 0; c < NC; ++c) a[b * NC + c] = acc[b][c];
    }
  }
}

// y[(j0 + jj) * ldy + c] -= sum_kk u[(j0 + jj) * k + kk] * a[kk * NC + c]   for jj < JB.
template <int NC, int JB>
inline void col_update(
    float* y, int64_t ldy, const float* u, int64_t k, const float* a, int64_t j0) {
  if constexpr (NC == 2 * kLanes) {
    Lanes lo[JB], hi[JB];
    for (int jj = 0; jj < JB; ++jj) {
      lo[jj] = load_lanes(y + (j0 + jj) * ldy);
      hi[jj] = load_lanes(y + (j0 + jj) * ldy + kLanes);
    }
    for (int64_t kk = 0; kk < k; ++kk) {
      const Lanes a_lo = load_lanes(a + kk * NC);
      const Lanes a_hi = load_lanes(a + kk * NC + kLanes);
      for (int jj = 0; jj < JB; ++jj) {
        const float coef = u[(j0 + jj) * k + kk];
        lo[jj] -= coef * a_lo;
        hi[jj] -= coef * a_hi;
      }
    }
    for (int jj = 0; jj < JB; ++jj) {
      store_lanes(y + (j0 + jj) * ldy, lo[jj]);
      store_lanes(y + (j0 + jj) * ldy + kLanes, hi[jj]);
    }
  } else {
    for (int jj = 0; jj < JB; ++jj) {
      for (int c = 0; c < NC; ++c) {
        float out = y[(j0 + jj) * ldy + c];
        for (int64_t kk = 0; kk < k; ++kk) out -= u[(j0 + jj) * k + kk] * a[kk * NC + c];
        y[(j0 + jj) * ldy + c] = out;
      }
    }
  }
}

// Projects NC columns of G held in fp32 (d x NC, row stride ldy).
// anchor: the NC anchor rows (row stride k) or nullptr; a: k x NC, coef: k scratch.
template <int NC>
inline void project_col_panel(
    float* y, int64_t ldy, const BasisRef& basis, float* anchor, float* a, float* coef) {
  const int64_t d = basis.d;
  const int64_t k = basis.k;
  int64_t kk = 0;
  for (; kk + 4 <= k; kk += 4) {
    col_dots<NC, 4>(y, ldy, basis.u + kk, k, d, a + kk * NC);
  }
  for (; kk < k; ++kk) {
    col_dots<NC, 1>(y, ldy, basis.u + kk, k, d, a + kk * NC);
  }
  if (basis.weights != nullptr || anchor != nullptr) {
    for (int c = 0; c < NC; ++c) {
      for (int64_t i = 0; i < k; ++i) coef[i] = a[i * NC + c];
      finish_coeffs(coef, k, basis.weights, anchor ? anchor + c * k : nullptr);
      for (int64_t i = 0; i < k; ++i) a[i * NC + c] = coef[i];
    }
  }
  int64_t j = 0;
  for (; j + 4 <= d; j += 4) {
    col_update<NC, 4>(y, ldy, basis.u, k, a, j);
  }
  for (; j < d; ++j) {
    col_update<NC, 1>(y, ldy, basis.u, k, a, j);
  }
}

// Columns [c0, c1) of G, where the matrix m is the transposed view (row stride 1,
// column stride = G's row stride). buffer: d x kColsPerPanel floats.
template <typename T>
void project_matrix_cols(
    const MatrixRef& m, int64_t c0, int64_t c1, const BasisRef& basis, float* buffer, float* a,
    float* coef) {
  T* data = static_cast<T*>(m.data);
  const int64_t d = basis.d;
  const int64_t ldg = m.col_stride;  // G's row stride
  for (int64_t c = c0; c < c1; c += kColsPerPanel) {
    const int cols = static_cast<int>(std::min<int64_t>(kColsPerPanel, c1 - c));
    float* anchor = m.anchor ? m.anchor + c * basis.k : nullptr;
    T* g = data + c;  // G[0, c]
    if constexpr (std::is_same_v<T, float>) {
      if (cols == kColsPerPanel) {
        project_col_panel<kColsPerPanel>(g, ldg, basis, anchor, a, coef);
      } else {
        for (int i = 0; i < cols; ++i) {
          project_col_panel<1>(g + i, ldg, basis, anchor ? anchor + i * basis.k : nullptr, a, coef);
        }
      }
    } else {
      const int ldb = cols == kColsPerPanel ? kColsPerPanel : 1;
      for (int i0 = 0; i0 < cols; i0 += ldb) {
        for (int64_t j = 0; j < d; ++j) {
          for (int i = 0; i < ldb; ++i) buffer[j * ldb + i] = to_f32(g[j * ldg + i0 + i]);
        }
        float* anchor_i = anchor ? anchor + i0 * basis.k : nullptr;
        if (ldb == kColsPerPanel) {
          project_col_panel<kColsPerPanel>(buffer, ldb, basis, anchor_i, a, coef);
        } else {
          project_col_panel<1>(buffer, ldb, basis, anchor_i, a, coef);
        }
        for (int64_t j = 0; j < d; ++j) {
          for (int i = 0; i < ldb; ++i) g[j * ldg + i0 + i] = from_f32<T>(buffer[j * ldb + i]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Flat layout: one long vector x (d elements, stride s) per matrix, U (d x k).
// The coefficients are a reduction over the whole vector, so the driver splits
// it into fixed chunks, sums per chunk here, and combines chunks in order.
// ---------------------------------------------------------------------------

// partial[b] = sum_{j in [j0, j1)} x[j * s] * u[j * k + b]   for all b < k.
template <typename T>
void flat_partial(
    const void* data, int64_t s, int64_t j0, int64_t j1, const float* u, int64_t k,
    float* partial) {
  const T* x = static_cast<const T*>(data);
  int64_t kk = 0;
  for (; kk + kLanes <= k; kk += kLanes) {
    float acc[kLanes] = {};
    for (int64_t j = j0; j < j1; ++j) {
      const float xj = to_f32(x[j * s]);
      const float* uj = u + j * k + kk;
      for (int l = 0; l < kLanes; ++l) acc[l] += xj * uj[l];
    }
    for (int l = 0; l < kLanes; ++l) partial[kk + l] = acc[l];
  }
  for (; kk < k; ++kk) {
    float acc = 0.f;
    for (int64_t j = j0; j < j1; ++j) acc += to_f32(x[j * s]) * u[j * k + kk];
    partial[kk] = acc;
  }
}

// x[j * s] -= sum_kk u[j * k + kk] * coef[kk]   for j in [j0, j1).
template <typename T>
void flat_update(
    void* data, int64_t s, int64_t j0, int64_t j1, const float* u, int64_t k, const float* coef) {
  T* x = static_cast<T*>(data);
  for (int64_t j = j0; j < j1; ++j) {
    const float* uj = u + j * k;
    float lanes[kLanes] = {};
    int64_t kk = 0;
    for (; kk + kLanes <= k; kk += kLanes) {
      for (int l = 0; l < kLanes; ++l) lanes[l] += uj[kk + l] * coef[kk + l];
    }
    float dot = sum_lanes(lanes);
    for (; kk < k; ++kk) dot += uj[kk] * coef[kk];
    x[j * s] = from_f32<T>(to_f32(x[j * s]) - dot);
  }
}

// The flat kernels in the shape of ProjectionKernels (no buffer: x is read where it lies).
template <typename T>
void project_flat_partial(
    const MatrixRef& m, int64_t j0, int64_t j1, const BasisRef& basis, float*, float* partial) {
  flat_partial<T>(m.data, m.col_stride, j0, j1, basis.u, basis.k, partial);
}

template <typename T>
void project_flat_update(
    const MatrixRef& m, int64_t j0, int64_t j1, const BasisRef& basis, float*, const float* coef) {
  flat_update<T>(m.data, m.col_stride, j0, j1, basis.u, basis.k, coef);
}

// The entry points run_projection (dispatch.h) takes by address, one table per dtype.
template <typename T>
constexpr ProjectionKernels<MatrixRef> projection_kernels() {
  return ProjectionKernels<MatrixRef>{
      &project_matrix_rows<T>, &project_matrix_cols<T>, &project_flat_partial<T>,
      &project_flat_update<T>, false};
}
