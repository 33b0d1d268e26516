// CUDA emulator (tests only): small kernels that check the emulator itself
// (tests/test_cuda_emulation.py): barriers, warp collectives, the scheduling
// orders, and that every way a kernel can go wrong ends the launch with an error.
// Called as torch.ops.gradproj_emu.selftest(name, x, blocks, threads, smem, arg).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "cuda/mma.cuh"

namespace gradproj_emu::selftest {
namespace {

// out[i] = x of the next thread of the block, through shared memory; `barrier`
// false drops the barrier between the writes and the reads (a race).
__global__ void exchange(const float* x, float* out, int64_t barrier) {
  __shared__ float buf[1024];
  const int n = static_cast<int>(blockDim.x);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * n + threadIdx.x;
  buf[threadIdx.x] = x[i];
  if (barrier != 0) __syncthreads();
  out[i] = buf[(threadIdx.x + 1) % n];
}

// out[i, m] for the modes m of the warp intrinsics, each lane's value x[i] (float)
// or its lane predicate; `width` for the shuffles.
__global__ void warp_ops(const float* x, float* out, int64_t width) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int w = static_cast<int>(width);
  const float v = x[i];
  float* o = out + i * 7;
  o[0] = __shfl_xor_sync(0xffffffffu, v, 5, w);
  o[1] = __shfl_sync(0xffffffffu, v, 3, w);
  o[2] = __shfl_up_sync(0xffffffffu, v, 2, w);
  o[3] = __shfl_down_sync(0xffffffffu, v, 2, w);
  o[4] = static_cast<float>(__ballot_sync(0xffffffffu, v > 0.f) & 0xffffu);
  o[5] = static_cast<float>(__any_sync(0xffffffffu, lane == 31 && v > 0.f));
  o[6] = static_cast<float>(__all_sync(0xffffffffu, v > -100.f));
}

// The butterfly of csrc/cuda/multi_tensor.cuh: every lane ends with the warp's sum.
__global__ void warp_sum(const float* x, float* out, int64_t) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float v = x[i];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  out[i] = v;
}

// Thread `arg` skips the barrier and returns.
__global__ void skip_barrier(const float*, float* out, int64_t arg) {
  if (threadIdx.x == arg) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

// Half of warp 0 calls a full-mask shuffle; the rest of the block waits at a
// barrier: nobody returns, nobody can go on.
__global__ void deadlock(const float* x, float* out, int64_t) {
  float v = x[threadIdx.x];
  if (threadIdx.x < 16) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = v;
}

// Lanes >= 16 of warp 0 return while lanes < 16 shuffle with a full mask.
__global__ void partial_shuffle(const float* x, float* out, int64_t) {
  float v = x[threadIdx.x];
  if (threadIdx.x >= 16 && threadIdx.x < 32) return;
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Warp 0's lanes name different masks.
__global__ void mask_mismatch(const float* x, float* out, int64_t) {
  const unsigned mask = threadIdx.x % 2 == 0 ? 0xffffffffu : 0x0000ffffu;
  float v = x[threadIdx.x];
  if (threadIdx.x < 16 || threadIdx.x % 2 == 0) v = __shfl_xor_sync(mask, v, 2);
  out[threadIdx.x] = v;
}

// Thread `arg` throws (after the first barrier, so others wait for it).
__global__ void throws(const float*, float* out, int64_t arg) {
  __syncthreads();
  TORCH_CHECK(threadIdx.x != arg, "thread ", threadIdx.x, " refuses");
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

__attribute__((noinline)) float recurse(int depth) {
  volatile char frame[4096];
  frame[0] = static_cast<char>(depth);
  return depth <= 0 ? frame[0] : recurse(depth - 1) + frame[0];
}

// arg 0: a store to address 16 (volatile: g++ drops a plain store it can prove
// wrong); 1: a read 2 KiB into a launch's dynamic shared memory, launched with
// less (1000 bytes); 2: a fiber stack overflow.
__global__ void faults(const float*, float* out, int64_t arg) {
  if (threadIdx.x != 3) return;
  if (arg == 0) {
    *reinterpret_cast<volatile float*>(static_cast<uintptr_t>(16)) = 1.f;
  } else if (arg == 1) {
    const volatile float* smem = ::gradproj_emu::dynamic_smem<float>();
    out[0] = smem[2048 / sizeof(float)];
  } else {
    out[0] = recurse(1 << 20);
  }
}

// out[i] = the dynamic shared memory word i reads before any write: poisoned.
__global__ void poison(const float*, float* out, int64_t) {
  const float* smem = ::gradproj_emu::dynamic_smem<float>();
  out[threadIdx.x] = smem[threadIdx.x];
  __syncthreads();
}

// Grid-stride: out[i] = i + 1 for i < n, whatever the grid (one block's items in sequence).
__global__ void grid_stride(const float*, float* out, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<float>(i + 1);
  }
}

// One mma.sync m16n8k8 tf32 per warp, fragments loaded as PTX documents them (g =
// lane / 4, t = lane % 4): x = A (16 x 8), B (8 x 8), C (16 x 8), row-major; out = D
// = C + A B. arg 1: csrc/cuda/mma.cuh's split of each x[i] instead (one thread):
// out[2 i] = hi, out[2 i + 1] = lo; arg 2: its split_truncated, alike.
__global__ void mma_tile(const float* x, float* out, int64_t arg) {
  if (arg == 1 || arg == 2) {
    if (threadIdx.x != 0) return;
    for (int i = 0; i < 320; ++i) {
      const gradproj::cuda::mma::Split sp = arg == 1 ? gradproj::cuda::mma::split(x[i])
                                                     : gradproj::cuda::mma::split_truncated(x[i]);
      out[2 * i] = __uint_as_float(sp.hi);
      out[2 * i + 1] = __uint_as_float(sp.lo);
    }
    return;
  }
  const float* A = x;
  const float* B = x + 128;
  const float* C = x + 192;
  const int g = static_cast<int>(threadIdx.x % 32) / 4;
  const int t = static_cast<int>(threadIdx.x % 4);
  auto bits = [](float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    return u;
  };
  const uint32_t a[4] = {
      bits(A[g * 8 + t]), bits(A[(g + 8) * 8 + t]), bits(A[g * 8 + t + 4]),
      bits(A[(g + 8) * 8 + t + 4])};
  const uint32_t b[2] = {bits(B[t * 8 + g]), bits(B[(t + 4) * 8 + g])};
  float d[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t],
                C[(g + 8) * 8 + 2 * t + 1]};
  ::gradproj_emu::mma_m16n8k8_tf32(d, a, b);
  out[g * 8 + 2 * t] = d[0];
  out[g * 8 + 2 * t + 1] = d[1];
  out[(g + 8) * 8 + 2 * t] = d[2];
  out[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// The SFU's approximations as the emulator models them (cuda_emu.h): out[2 i] =
// sqrt.approx(x[i]), out[2 i + 1] = __fdividef(x[i], x[i + n]), n = threads / 2 (the
// first half of the threads).
__global__ void sfu(const float* x, float* out, int64_t) {
  const int n = static_cast<int>(blockDim.x) / 2;
  const int i = static_cast<int>(threadIdx.x);
  if (i >= n) return;
  out[2 * i] = ::gradproj_emu::sqrt_approx(x[i]);
  out[2 * i + 1] = __fdividef(x[i], x[i + n]);
}

// The flushed forms (adamw.cu [flushed root]): out[2 i] = sqrt.approx.ftz(x[i]),
// out[2 i + 1] = x[i] rcp.approx.ftz(x[i + n]), the tensor-core AdamW's quotient.
__global__ void sfu_ftz(const float* x, float* out, int64_t) {
  const int n = static_cast<int>(blockDim.x) / 2;
  const int i = static_cast<int>(threadIdx.x);
  if (i >= n) return;
  out[2 * i] = ::gradproj_emu::sqrt_approx_ftz(x[i]);
  out[2 * i + 1] = x[i] * ::gradproj_emu::rcp_approx_ftz(x[i + n]);
}

using Kernel = void (*)(const float*, float*, int64_t);

Kernel kernel_named(const std::string& name) {
  if (name == "exchange") return exchange;
  if (name == "warp_ops") return warp_ops;
  if (name == "warp_sum") return warp_sum;
  if (name == "skip_barrier") return skip_barrier;
  if (name == "deadlock") return deadlock;
  if (name == "partial_shuffle") return partial_shuffle;
  if (name == "mask_mismatch") return mask_mismatch;
  if (name == "throws") return throws;
  if (name == "faults") return faults;
  if (name == "poison") return poison;
  if (name == "grid_stride") return grid_stride;
  if (name == "mma_tile") return mma_tile;
  if (name == "sfu") return sfu;
  if (name == "sfu_ftz") return sfu_ftz;
  TORCH_CHECK(false, "no selftest kernel '", name, "'");
}

// `out` has `out_numel` float32 zeros; the kernel runs <<<blocks, threads, |smem|>>>,
// after raising its dynamic shared memory attribute to smem when smem > 48 KiB
// (smem < 0: launched without).
at::Tensor selftest(
    c10::string_view name, const at::Tensor& x, int64_t blocks, int64_t threads, int64_t smem,
    int64_t arg, int64_t out_numel) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(), "x: CPU float32");
  at::Tensor out = at::zeros({out_numel}, x.options());
  const Kernel kernel = kernel_named(std::string(name));
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    TORCH_CHECK(err == cudaSuccess, "cudaFuncSetAttribute: ", cudaGetErrorString(err));
  }
  ::gradproj_emu::launch(
      kernel, dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(threads)),
      static_cast<size_t>(smem < 0 ? -smem : smem), x.data_ptr<float>(), out.data_ptr<float>(),
      arg);
  return out;
}

}  // namespace
}  // namespace gradproj_emu::selftest

TORCH_LIBRARY_FRAGMENT(gradproj_emu, m) {
  m.def(
      "selftest(str name, Tensor x, int blocks, int threads, int smem, int arg, int out_numel) "
      "-> Tensor",
      &gradproj_emu::selftest::selftest);
}
