// CUDA kernels of gradproj::surgery_bucket_.
//
// Contract (gradproj/backends.py): per pair (u, r) of contiguous 1-D views with
// d = u.r, only when d < 0: u <- u - c_u r and, if symmetric, r <- r - c_r u (from
// the original pair); c_u, c_r as in gradproj.reference.surgery for the variant.
//
// The design of kernels/surgery.py: three stream-ordered launches for the whole
// bucket, none per pair, and no host sync (the conflict test stays on the device):
//  1. surgery_partials_kernel: a block per chunk of kChunk elements of one pair
//     (block -> pair by binary search over the pairs' first chunks in the device
//     table) reduces it to fp32 (sum u.r, sum u.u, sum r.r): warp butterflies, then
//     the warps' sums in warp order;
//  2. surgery_coefficients_kernel: a warp per pair adds its chunks' partials in a
//     fixed order (lane-strided, then a butterfly: deterministic, no atomics), tests
//     d < 0 and writes c_u, c_r (zero without a conflict, so nothing divides by a
//     zero norm);
//  3. surgery_apply_kernel: a block per chunk rewrites it; chunks of pairs without
//     a conflict are skipped (u - 0 r == u), a test made on the device.
// [packs] Both passes take a whole chunk of a pair whose views are aligned to tile::Pack
// as kPacks packs a thread, every load issued before the first is used: 8 loads, 64
// bytes (16-bit) or 128 (fp32) in flight a thread. One element a trip, a thread kept 4
// or 8 bytes in flight, and 16-bit surgery was bound by load latency (predicted 33% /
// 23% of copy on A100 / H100, benchmarks/perf_model_cuda.py). A pair's ragged last chunk,
// and views not aligned to a Pack (a slice's offset), take the element loop.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "bucket_checks.h"
#include "cuda/launch.cuh"
#include "cuda/multi_tensor.cuh"
#include "cuda/tile.cuh"

namespace gradproj::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // 8 warps per block
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int64_t kChunk = kThreads * 16;  // elements per block; fixed, so sums are deterministic
// [packs] a thread's packs of a whole chunk: pack p of thread t holds elements
// 4 (t + kThreads p) .. + 3, so a warp's loads of one p are consecutive
constexpr int kPacks = static_cast<int>(kChunk / (kThreads * 4));

// One pair of the bucket in the device table, as int64 words.
struct PairEntry {
  int64_t u;            // address of g_unlearn[i]
  int64_t r;            // address of g_retain[i]
  int64_t numel;        // elements of each
  int64_t first_chunk;  // index of its first chunk in the launch
};

// The pair whose chunks contain `chunk` (entries sorted by first_chunk, the first is 0).
// model-uniform: every lane of a warp looks up the same pair
__device__ __forceinline__ int find_pair(const PairEntry* table, int n, int64_t chunk) {
  int lo = 0;
  int hi = n - 1;
  while (lo < hi) {  // model-trips: ceil(log2(entries))
    const int mid = (lo + hi + 1) / 2;
    if (table[mid].first_chunk <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// [packs] Whether the chunk of `e` that starts at `begin` is whole and both views are
// aligned to a Pack (begin is a multiple of kChunk, so the chunk is then aligned too).
template <typename T>
__device__ __forceinline__ bool packed(const PairEntry& e, int64_t begin) {
  return begin + kChunk <= e.numel && ((e.u | e.r) % sizeof(tile::Pack<T>)) == 0;
}

// [packs] This thread's packs of the chunks at `u` and `r` as fp32, all loads issued
// before any is used.
template <typename T>
__device__ __forceinline__ void load_packs(
    const T* u, const T* r, float (&a)[kPacks][4], float (&b)[kPacks][4]) {
  using Bits = tile::PackBits<T>;
  const Bits* up = reinterpret_cast<const Bits*>(u) + threadIdx.x;
  const Bits* rp = reinterpret_cast<const Bits*>(r) + threadIdx.x;
  Bits ub[kPacks], rb[kPacks];
#pragma unroll
  for (int q = 0; q < kPacks; ++q) {
    ub[q] = up[q * kThreads];
    rb[q] = rp[q * kThreads];
  }
#pragma unroll
  for (int q = 0; q < kPacks; ++q) {
    tile::unpack<T>(ub[q], a[q]);
    tile::unpack<T>(rb[q], b[q]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) surgery_partials_kernel(
    const PairEntry* __restrict__ table, int n_pairs, int64_t total_chunks,
    float* __restrict__ partials) {
  __shared__ float warp_sums[kWarpsPerBlock][3];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  // model-trips: items
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const PairEntry& e = table[find_pair(table, n_pairs, chunk)];
    const T* u = reinterpret_cast<const T*>(e.u);
    const T* r = reinterpret_cast<const T*>(e.r);
    const int64_t begin = (chunk - e.first_chunk) * kChunk;
    const int64_t end = begin + kChunk < e.numel ? begin + kChunk : e.numel;
    float ur = 0.f, uu = 0.f, rr = 0.f;
    if (packed<T>(e, begin)) {
      float a[kPacks][4], b[kPacks][4];
      load_packs(u + begin, r + begin, a, b);
#pragma unroll
      for (int q = 0; q < kPacks; ++q) {
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          ur += a[q][v] * b[q][v];
          uu += a[q][v] * a[q][v];
          rr += b[q][v] * b[q][v];
        }
      }
    } else {  // model-cold-if: whole (a pair's ragged last chunk, or unaligned views)
      for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {  // model-trips: 16
        const float a = static_cast<float>(u[j]);
        const float b = static_cast<float>(r[j]);
        ur += a * b;
        uu += a * a;
        rr += b * b;
      }
    }
    ur = warp_sum(ur);
    uu = warp_sum(uu);
    rr = warp_sum(rr);
    if (lane == 0) {
      warp_sums[warp][0] = ur;
      warp_sums[warp][1] = uu;
      warp_sums[warp][2] = rr;
    }
    __syncthreads();
    if (threadIdx.x < 3) {
      float total = 0.f;
      // model-trips: 8
      for (int w = 0; w < kWarpsPerBlock; ++w) total += warp_sums[w][threadIdx.x];
      partials[chunk * 3 + threadIdx.x] = total;
    }
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kThreads) surgery_coefficients_kernel(
    const PairEntry* __restrict__ table, int n_pairs, const float* __restrict__ partials,
    float strength, bool cosine, float* __restrict__ coef) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  // model-trips: items
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
       i < n_pairs; i += warps) {  // uniform across the warp: the shuffles stay converged
    const PairEntry& e = table[i];
    const int64_t chunks = (e.numel + kChunk - 1) / kChunk;
    float d = 0.f, nu = 0.f, nr = 0.f;
    for (int64_t c = lane; c < chunks; c += kWarp) {  // model-trips: ceil(chunks_per_pair / 32)
      const float* s = partials + (e.first_chunk + c) * 3;
      d += s[0];
      nu += s[1];
      nr += s[2];
    }
    d = warp_sum(d);
    nu = warp_sum(nu);
    nr = warp_sum(nr);
    if (lane == 0) {
      const bool conflict = d < 0.f;  // implies nu > 0 and nr > 0
      // Safe denominators: without a conflict the coefficient is zero anyway.
      float den_u = 1.f, den_r = 1.f;
      if (conflict) {
        den_u = cosine ? __fsqrt_rn(nu) * nr : nr;
        den_r = cosine ? __fsqrt_rn(nr) * nu : nu;
      }
      coef[i * 2] = conflict ? strength * d / den_u : 0.f;
      coef[i * 2 + 1] = conflict ? strength * d / den_r : 0.f;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) surgery_apply_kernel(
    const PairEntry* __restrict__ table, int n_pairs, int64_t total_chunks,
    const float* __restrict__ coef, bool symmetric) {
  // model-trips: items
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const int i = find_pair(table, n_pairs, chunk);
    const float c_u = coef[i * 2];
    const float c_r = coef[i * 2 + 1];
    if (c_u == 0.f && (!symmetric || c_r == 0.f)) continue;  // no conflict: nothing changes
    const PairEntry& e = table[i];
    T* u = reinterpret_cast<T*>(e.u);
    T* r = reinterpret_cast<T*>(e.r);
    const int64_t begin = (chunk - e.first_chunk) * kChunk;
    const int64_t end = begin + kChunk < e.numel ? begin + kChunk : e.numel;
    if (packed<T>(e, begin)) {
      float a[kPacks][4], b[kPacks][4];
      load_packs(u + begin, r + begin, a, b);
#pragma unroll
      for (int q = 0; q < kPacks; ++q) {
        const int64_t j = begin + 4 * (threadIdx.x + q * kThreads);
        tile::Pack<T> pu;
#pragma unroll
        for (int v = 0; v < 4; ++v) pu.v[v] = static_cast<T>(a[q][v] - c_u * b[q][v]);
        tile::store_pack(u + j, pu);
        if (symmetric) {
          tile::Pack<T> pr;
#pragma unroll
          for (int v = 0; v < 4; ++v) pr.v[v] = static_cast<T>(b[q][v] - c_r * a[q][v]);
          tile::store_pack(r + j, pr);
        }
      }
    } else {  // model-cold-if: whole (a pair's ragged last chunk, or unaligned views)
      for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {  // model-trips: 16
        const float a = static_cast<float>(u[j]);
        const float b = static_cast<float>(r[j]);
        u[j] = static_cast<T>(a - c_u * b);
        if (symmetric) r[j] = static_cast<T>(b - c_r * a);
      }
    }
  }
}

template <typename T>
void launch(
    at::TensorList g_unlearn, at::TensorList g_retain, float strength, bool cosine,
    bool symmetric) {
  const int n = static_cast<int>(g_unlearn.size());
  std::vector<PairEntry> entries;
  entries.reserve(static_cast<size_t>(n));
  int64_t total_chunks = 0;
  for (int i = 0; i < n; ++i) {
    const int64_t numel = g_unlearn[i].numel();
    entries.push_back(
        {reinterpret_cast<int64_t>(g_unlearn[i].data_ptr()),
         reinterpret_cast<int64_t>(g_retain[i].data_ptr()), numel, total_chunks});
    total_chunks += (numel + kChunk - 1) / kChunk;
  }
  const at::Device device = g_unlearn[0].device();
  const auto options = at::TensorOptions().dtype(at::kFloat).device(device);
  at::Tensor partials = at::empty({total_chunks, 3}, options);
  at::Tensor coef = at::empty({n, 2}, options);
  const DeviceTable<PairEntry> table(entries, device);

  launch_kernel(
      surgery_partials_kernel<T>, total_chunks, kThreads, 0, table.data(), n, total_chunks,
      partials.data_ptr<float>());
  launch_kernel(
      surgery_coefficients_kernel, (n + kWarpsPerBlock - 1) / kWarpsPerBlock, kThreads, 0,
      table.data(), n, partials.data_ptr<float>(), strength, cosine, coef.data_ptr<float>());
  launch_kernel(
      surgery_apply_kernel<T>, total_chunks, kThreads, 0, table.data(), n, total_chunks,
      coef.data_ptr<float>(), symmetric);
}

void surgery_bucket_cuda(
    at::TensorList g_unlearn, at::TensorList g_retain, double strength,
    c10::string_view variant, bool symmetric) {
  const SurgeryVariant v =
      check_surgery_bucket(g_unlearn, g_retain, variant, GRADPROJ_CUDA_DEVICE_TYPE);
  if (g_unlearn.empty()) return;
  const bool cosine = v == SurgeryVariant::kCosine;
  const float lam = static_cast<float>(strength);
  dispatch_dtype(g_unlearn[0].device(), g_unlearn[0].scalar_type(), "surgery", [&](auto dtype) {
    launch<typename decltype(dtype)::type>(g_unlearn, g_retain, lam, cosine, symmetric);
  });
}

}  // namespace
}  // namespace gradproj::cuda

#ifdef GRADPROJ_CUDA_EMULATION
TORCH_LIBRARY_IMPL(gradproj_emu, CPU, m) {
#else
TORCH_LIBRARY_IMPL(gradproj, CUDA, m) {
#endif
  m.impl("surgery_bucket_", &gradproj::cuda::surgery_bucket_cuda);
}
