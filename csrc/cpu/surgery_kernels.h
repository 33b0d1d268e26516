// The CPU kernels of gradproj::surgery_bucket_, compiled once per instruction set.
//
// Like project_kernels.h (whose Lanes, load_lanes, sum_lanes, to_f32 and from_f32
// these use): no include guard and no #include; kernels_per_isa.h includes it (for
// csrc/cpu/surgery.cpp) inside namespace isa_default and, under
// `#pragma GCC target("avx2,fma")`, inside isa_avx2, after project_kernels.h.

// kLanes elements of T as fp32 lanes.
template <typename T>
inline Lanes load_as_lanes(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return load_lanes(p);
  } else {
    float lanes[kLanes];
    for (int l = 0; l < kLanes; ++l) lanes[l] = to_f32(p[l]);
    return load_lanes(lanes);
  }
}

// sums[0..2] = (sum u*r, sum u*u, sum r*r) over [j0, j1), fp32, per-lane partials
// added in one fixed order (the result depends on the chunk, never on threads).
template <typename T>
void surgery_partial(const void* u_data, const void* r_data, int64_t j0, int64_t j1, float* sums) {
  const T* u = static_cast<const T*>(u_data);
  const T* r = static_cast<const T*>(r_data);
  Lanes ur = {}, uu = {}, rr = {};
  int64_t j = j0;
  for (; j + kLanes <= j1; j += kLanes) {
    const Lanes a = load_as_lanes(u + j);
    const Lanes b = load_as_lanes(r + j);
    ur += a * b;
    uu += a * a;
    rr += b * b;
  }
  float tail_ur = 0.f, tail_uu = 0.f, tail_rr = 0.f;
  for (; j < j1; ++j) {
    const float a = to_f32(u[j]);
    const float b = to_f32(r[j]);
    tail_ur += a * b;
    tail_uu += a * a;
    tail_rr += b * b;
  }
  sums[0] = sum_lanes(ur) + tail_ur;
  sums[1] = sum_lanes(uu) + tail_uu;
  sums[2] = sum_lanes(rr) + tail_rr;
}

// u <- u - c_u r and, when symmetric, r <- r - c_r u (u before its update), over
// [j0, j1); fp32 arithmetic, one rounding per stored element.
template <typename T>
void surgery_apply(
    void* u_data, void* r_data, int64_t j0, int64_t j1, float c_u, float c_r, bool symmetric) {
  T* u = static_cast<T*>(u_data);
  T* r = static_cast<T*>(r_data);
  if (symmetric) {
    for (int64_t j = j0; j < j1; ++j) {
      const float a = to_f32(u[j]);
      const float b = to_f32(r[j]);
      u[j] = from_f32<T>(a - c_u * b);
      r[j] = from_f32<T>(b - c_r * a);
    }
  } else {
    for (int64_t j = j0; j < j1; ++j) u[j] = from_f32<T>(to_f32(u[j]) - c_u * to_f32(r[j]));
  }
}

// The entry points surgery.cpp takes by address (SurgeryKernels: csrc/cpu/surgery.cpp).
template <typename T>
constexpr SurgeryKernels surgery_kernels() {
  return SurgeryKernels{&surgery_partial<T>, &surgery_apply<T>};
}
