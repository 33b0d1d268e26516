// CUDA emulator (tests only): what csrc/cuda needs from nvcc, for g++ on CPU tensors.
//
// tests/cuda_emulation.py compiles every csrc/cuda/*.cu as C++ with
// -DGRADPROJ_CUDA_EMULATION, this file force-included (-include) and
// csrc/cuda_emu/include ahead of torch's headers, whose shims take the real
// names (cuda_runtime.h, ATen/cuda/CUDAContext.h, c10/cuda/*.h). The .cu sources
// are the ones nvcc builds; the few lines that must differ are #ifdef'd in
// csrc/cuda/launch.cuh (the launch, dynamic shared memory, the registration's
// device type, pinned memory).
//
// Execution model (runtime.cpp):
//  * [launch] a launch runs its grid's blocks one after another, synchronously,
//    on the calling thread (launches are serialized process-wide);
//  * [threads] a block's threads are cooperative fibers on that one OS thread;
//    a thread runs until it reaches a barrier (__syncthreads, a warp shuffle,
//    __syncwarp) or returns; then the next runnable thread runs, in the order
//    GRADPROJ_EMU_SCHEDULE gives: rounds of every runnable thread, "forward"
//    (thread 0 first, the default), "reverse" or "shuffle" (a random order each
//    round, GRADPROJ_EMU_SEED); or at every switch the runnable thread of the
//    "lowest", "highest" or a "random" index (one warp runs ahead of the others).
//    A missing barrier then shows up as a wrong result in at least one order;
//  * [shared memory] __shared__ variables are function statics (one block runs
//    at a time); dynamic shared memory is a buffer poisoned with NaN bytes before
//    each block and followed by an inaccessible page;
//  * [errors] a deadlock (every live thread waits and none can go on: a barrier
//    skipped by some threads, a full-mask shuffle called by part of a warp), a
//    thread returning while others wait at a barrier, an exception thrown in a
//    kernel and a memory fault (SIGSEGV / SIGBUS: out of bounds, misaligned
//    vector access, fiber stack overflow) all end the launch with a c10::Error
//    (a Python RuntimeError) naming the kernel, block and thread. Never a hang.
// Not emulated: memory ordering between threads of a block other than through
// barriers (every interleaving here is sequentially consistent), warp-synchronous
// execution without __syncwarp / *_sync (never assumed by csrc/cuda), static
// __shared__ contents at block start (kept from the previous block, not poisoned).
#pragma once

#ifndef GRADPROJ_CUDA_EMULATION
#error "cuda_emu.h is only for the CUDA emulator build (-DGRADPROJ_CUDA_EMULATION)"
#endif

#include <cuda_runtime.h>
#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

// ----------------------------------------------------------------- keywords

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block runs at a time (see [shared memory]), so a block's shared variables
// can be the kernel function's statics.
#define __shared__ static

constexpr int warpSize = 32;

#define GRADPROJ_EMU_HIDDEN __attribute__((visibility("hidden")))

namespace gradproj_emu {
namespace detail {

// The built-in variables of the thread running now, set by the scheduler at each switch.
struct Registers {
  dim3 thread_idx;
  dim3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  int lane;  // threadIdx.x % 32 for 1-D blocks: the linear thread index % 32
};
extern Registers regs GRADPROJ_EMU_HIDDEN;

// Block barrier.
void syncthreads();
// A warp collective of the lanes in `mask` (the calling lane among them): deposits
// `bits` and returns, once every lane of `mask` has called it, the 32 lanes'
// deposits (entries of lanes outside `mask` are stale). The array stays valid
// until the caller's next collective. `what` names the intrinsic in errors.
const uint64_t* warp_collective(unsigned mask, uint64_t bits, const char* what);
// Fails the launch: the lane read `src`, which is not in `mask`.
[[noreturn]] void bad_lane(const char* what, unsigned mask, int src);
// The current launch's dynamic shared memory.
void* dynamic_smem();

struct LaunchConfig {
  const void* kernel;
  dim3 grid;
  dim3 block;
  size_t smem;
};
// Runs `body(arg)` as every thread of every block of `config` (see [launch]).
void run_grid(const LaunchConfig& config, void (*body)(void*), void* arg);

enum class ShflMode { kIdx, kUp, kDown, kXor };

// PTX shfl.sync's source lane: the calling lane's own when the source falls
// outside its segment of `width` lanes (CUDA's documented behaviour).
inline int shfl_source(ShflMode mode, int lane, int b, int width) {
  const int seg_mask = (32 - width) & 31;  // lane bits that pick the segment
  const int min_lane = lane & seg_mask;
  const int max_lane = mode == ShflMode::kUp ? min_lane : (min_lane | (31 & ~seg_mask));
  int j = lane;
  bool ok = true;
  switch (mode) {
    case ShflMode::kUp:
      j = lane - b;
      ok = j >= max_lane;
      break;
    case ShflMode::kDown:
      j = lane + b;
      ok = j <= max_lane;
      break;
    case ShflMode::kXor:
      j = lane ^ b;
      ok = j <= max_lane;
      break;
    case ShflMode::kIdx:
      j = min_lane | (b & 31 & ~seg_mask);
      ok = j <= max_lane;
      break;
  }
  return ok ? j : lane;
}

template <typename T>
inline T shfl(ShflMode mode, unsigned mask, T var, int b, int width, const char* what) {
  static_assert(
      std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t),
      "the emulator shuffles values of up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  const uint64_t* lanes = warp_collective(mask, bits, what);
  const int src = shfl_source(mode, regs.lane, b, width);
  if (((mask >> src) & 1u) == 0) bad_lane(what, mask, src);
  T out;
  std::memcpy(&out, &lanes[src], sizeof(T));
  return out;
}

inline unsigned vote(unsigned mask, bool pred, const char* what) {
  const uint64_t* lanes = warp_collective(mask, pred ? 1 : 0, what);
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l) {
    if (((mask >> l) & 1u) != 0 && lanes[l] != 0) ballot |= 1u << l;
  }
  return ballot;
}

}  // namespace detail

// Launches `kernel<<<grid, block, smem>>>(args...)`: the arguments are converted to
// the kernel's parameter types once, and every thread gets its own copy, as on the GPU.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  using Stored = std::tuple<std::decay_t<Params>...>;
  struct Call {
    void (*kernel)(Params...);
    Stored params;
  };
  Call call{kernel, Stored(std::forward<Args>(args)...)};
  detail::run_grid(
      {reinterpret_cast<const void*>(kernel), grid, block, smem},
      [](void* arg) {
        const Call& c = *static_cast<const Call*>(arg);
        std::apply(c.kernel, c.params);
      },
      &call);
}

// `extern __shared__ T name[]` of the kernel running now.
template <typename T>
T* dynamic_smem() {
  return static_cast<T*>(detail::dynamic_smem());
}

}  // namespace gradproj_emu

// ----------------------------------------------------------------- built-in variables

#define threadIdx (static_cast<const ::dim3&>(::gradproj_emu::detail::regs.thread_idx))
#define blockIdx (static_cast<const ::dim3&>(::gradproj_emu::detail::regs.block_idx))
#define blockDim (static_cast<const ::dim3&>(::gradproj_emu::detail::regs.block_dim))
#define gridDim (static_cast<const ::dim3&>(::gradproj_emu::detail::regs.grid_dim))

// ----------------------------------------------------------------- synchronization

inline void __syncthreads() { ::gradproj_emu::detail::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::gradproj_emu::detail::warp_collective(mask, 0, "__syncwarp");
}
// Every interleaving the emulator runs is sequentially consistent.
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  using ::gradproj_emu::detail::ShflMode;
  return ::gradproj_emu::detail::shfl(ShflMode::kIdx, mask, var, src_lane, width, "__shfl_sync");
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  using ::gradproj_emu::detail::ShflMode;
  return ::gradproj_emu::detail::shfl(
      ShflMode::kUp, mask, var, static_cast<int>(delta), width, "__shfl_up_sync");
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  using ::gradproj_emu::detail::ShflMode;
  return ::gradproj_emu::detail::shfl(
      ShflMode::kDown, mask, var, static_cast<int>(delta), width, "__shfl_down_sync");
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  using ::gradproj_emu::detail::ShflMode;
  return ::gradproj_emu::detail::shfl(
      ShflMode::kXor, mask, var, lane_mask, width, "__shfl_xor_sync");
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return ::gradproj_emu::detail::vote(mask, pred != 0, "__ballot_sync");
}
inline int __any_sync(unsigned mask, int pred) {
  return ::gradproj_emu::detail::vote(mask, pred != 0, "__any_sync") != 0;
}
inline int __all_sync(unsigned mask, int pred) {
  return ::gradproj_emu::detail::vote(mask, pred != 0, "__all_sync") == mask;
}

// Threads switch only at barriers, so a read-modify-write is atomic as written.
template <typename T>
inline T atomicAdd(T* address, T val) {
  const T old = *address;
  *address = old + val;
  return old;
}
template <typename T>
inline T atomicExch(T* address, T val) {
  const T old = *address;
  *address = val;
  return old;
}
template <typename T>
inline T atomicMax(T* address, T val) {
  const T old = *address;
  *address = old < val ? val : old;
  return old;
}
template <typename T>
inline T atomicMin(T* address, T val) {
  const T old = *address;
  *address = val < old ? val : old;
  return old;
}
template <typename T>
inline T atomicCAS(T* address, T compare, T val) {
  const T old = *address;
  if (old == compare) *address = val;
  return old;
}

// ----------------------------------------------------------------- tensor cores

namespace gradproj_emu {

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 with D = C (d += A B), a warp
// collective of all 32 lanes. Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k8",
// g = lane / 4, t = lane % 4): a[0..3] = A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4];
// b[0..1] = B[t][g], B[t+4][g]; d[0..3] = D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1].
// The tensor cores read only an operand's tf32 bits (the low 13 are ignored); the
// products of tf32 values are exact. Their sum with C is rounded toward zero, not to
// nearest: measured on an H200 (2026-12-04), fp32 rows of d = 768 at k = 768, whose
// x took 288 MMAs as their accumulator, came out up to 1.6e-5 relative off the float64
// reference, which is 288 x 2^-24 (half an fp32 ulp of bias an MMA), where round to
// nearest's errors would cancel to ~1e-7; NVIDIA's tensor cores align the products
// and truncate (Fasi, Higham, Mikaitis, Pranesh 2021, "Numerical behavior of NVIDIA
// tensor cores"). Modelled here as the exact sum (in double: 8 products of 11-bit
// significands and C) truncated once to fp32, so a kernel that leans on the
// accumulator's rounding fails here as it does on the GPU.
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  uint64_t lanes[3][32];
  const uint64_t mine[3] = {
      a[0] | (static_cast<uint64_t>(a[1]) << 32), a[2] | (static_cast<uint64_t>(a[3]) << 32),
      b[0] | (static_cast<uint64_t>(b[1]) << 32)};
  for (int i = 0; i < 3; ++i) {
    const uint64_t* all = detail::warp_collective(0xffffffffu, mine[i], "mma.sync");
    std::memcpy(lanes[i], all, sizeof(lanes[i]));
  }
  auto tf32 = [](uint32_t bits) {
    bits &= 0xffffe000u;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  };
  // A[r][c]: lane (r % 8) * 4 + c % 4, register (r >= 8) + 2 (c >= 4)
  auto A = [&](int r, int c) {
    const int reg = (r >= 8 ? 1 : 0) + (c >= 4 ? 2 : 0);
    const uint64_t w = lanes[reg / 2][(r % 8) * 4 + c % 4];
    return tf32(static_cast<uint32_t>(reg % 2 == 0 ? w : w >> 32));
  };
  // B[r][c]: lane c * 4 + r % 4, register (r >= 4)
  auto B = [&](int r, int c) {
    const uint64_t w = lanes[2][c * 4 + r % 4];
    return tf32(static_cast<uint32_t>(r < 4 ? w : w >> 32));
  };
  const int g = detail::regs.lane / 4;
  const int t = detail::regs.lane % 4;
  for (int q = 0; q < 4; ++q) {
    const int row = g + (q >= 2 ? 8 : 0);
    const int col = 2 * t + q % 2;
    double acc = d[q];
    for (int kk = 0; kk < 8; ++kk) acc += static_cast<double>(A(row, kk)) * B(kk, col);
    float rounded = static_cast<float>(acc);  // to nearest; then toward zero
    if (std::isfinite(rounded) && std::fabs(static_cast<double>(rounded)) > std::fabs(acc))
      rounded = std::nextafter(rounded, 0.f);
    d[q] = rounded;
  }
}

}  // namespace gradproj_emu

// ----------------------------------------------------------------- math and loads

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
// The correctly rounded intrinsics are the IEEE operations.
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline double __dsqrt_rn(double x) { return std::sqrt(x); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
// Approximate on the GPU; exact here (tolerances written for the GPU cover both).
// __fdividef is modelled at its bound (below).
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __uint_as_float(unsigned x) {
  float f;
  std::memcpy(&f, &x, sizeof(f));
  return f;
}
inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

namespace gradproj_emu {
// The SFU's approximate operations, modelled at their documented worst: the correctly
// rounded result moved by up to `ulps` units in the last place, in a direction and by a
// count that a hash of the operands picks (deterministic, so every schedule agrees), so a
// kernel that needs more than the approximation gives fails here as on the GPU.
inline float approx_within(float exact, uint32_t a, uint32_t b, int ulps) {
  if (!std::isfinite(exact) || exact == 0.f) return exact;  // as the SFU: 0, inf, NaN exact
  uint32_t h = a * 0x9e3779b1u ^ (b + 0x7f4a7c15u) * 0x85ebca77u;
  h ^= h >> 15;
  h *= 0x2c1b3c6du;
  h ^= h >> 12;
  const int steps = static_cast<int>(h % static_cast<uint32_t>(2 * ulps + 1)) - ulps;
  float r = exact;
  for (int i = 0; i < (steps < 0 ? -steps : steps); ++i) {
    r = std::nextafter(r, steps < 0 ? 0.f : std::numeric_limits<float>::infinity() * r);
  }
  return r;
}
// sqrt.approx.f32: the CUDA guide's bound for sqrtf without -prec-sqrt is 1 ulp from
// compute capability 5.2 (3 before); modelled at 2.
inline float sqrt_approx(float x) {
  return x < 0.f ? std::numeric_limits<float>::quiet_NaN()
                 : approx_within(std::sqrt(x), __float_as_uint(x), 0x51u, 2);
}
// .ftz: a subnormal operand or result is 0 of its sign.
inline float flush_subnormal(float x) {
  return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.f, x) : x;
}
// sqrt.approx.ftz.f32: sqrt.approx of the flushed operand (a root of a normal is normal).
inline float sqrt_approx_ftz(float x) { return sqrt_approx(flush_subnormal(x)); }
// rcp.approx.ftz.f32: 1 ulp (the PTX ISA), modelled at 1; the flushed operand's
// reciprocal (+-0: +-inf), flushed (|x| > 2^126: 0).
inline float rcp_approx_ftz(float x) {
  const float y = flush_subnormal(x);
  return flush_subnormal(approx_within(1.f / y, __float_as_uint(y), 0x52u, 1));
}
}  // namespace gradproj_emu

// __fdividef(x, y): 2 ulps for 2^-126 <= |y| <= 2^126 (the CUDA guide); 0 for larger |y|.
inline float __fdividef(float x, float y) {
  if (std::fabs(y) > 0x1p126f && std::isfinite(y)) return 0.f * x;
  return gradproj_emu::approx_within(x / y, __float_as_uint(x), __float_as_uint(y), 2);
}
