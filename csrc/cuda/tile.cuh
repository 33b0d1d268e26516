// The row-tile engine shared by the projection and projected-AdamW kernels.
//
// Math, per row x (length d) of a bucket, U (d x k):  a = U^T x;  x <- x - U f(a),
// where f finishes the coefficients (weights, anchors: finish_coef). A Policy says
// how a row's elements are loaded (the projection reads x; projected AdamW reads
// p, g, m, v, stores m, v and returns the AdamW update x') and stored.
//
// One kernel, rows_kernel, in three modes, for every layout (side="input",
// "output", "flat", any strides). A CTA of 256 threads holds a tile of rows in
//    registers: it is split
//    into row groups of `wpr` warps (wpr in {1, 2, 4, 8}, the smallest whose
//    wpr * 32 * kEpt columns cover d); each group holds kRows rows, each thread
//    kEpt elements of each row (P::kEpt: 16 for row policies) as S = kEpt / 4
//    slots of V = 4 consecutive elements (one vector: 16 bytes of fp32, 8 of
//    bf16/fp16). [block policy] Transposed views (side="output": the view's row
//    i is column i of G, element j at G[j * ld + i]) take a block policy
//    (P::kBlock): kRows = 4 consecutive view rows, whose elements at column j are
//    one vector of G's row j, so a slot is a 4 x 4 block of G read as 4 vectors
//    along G's rows (coalesced), and kEpt = 8 keeps the tile at 32 values a
//    thread. Rows that are not such a block take the policy's element path.
//      [slot map] thread tg of a group, slot s: columns c0 + (s * tpr + tg) * V
//      + [0, V), tpr = wpr * 32 threads per group; so a warp's 32 lanes read 32
//      consecutive vectors (512 contiguous bytes of fp32, 256 of bf16) per slot.
//    U^T (k padded to kp, a multiple of kChunk = 8) is staged into shared memory
//    a chunk of KC = kChunk rows at a time (KC = 1, 2, 4 for smaller k: [small k]), or all of
//    it once per CTA when it fits in kResidentBytes: "resident". Pass 1, per chunk:
//    every thread forms kRows x KC partial dot products from its registers (fp32 FMA; a shared-memory float4
//    read of U^T feeds 4 * kRows FMAs), the warp reduces them with a
//    reduce-scatter (N - 1 shuffles for N sums: lane l ends with sum l % N), the warps
//    of a group add their sums in warp order through shared memory (no atomics,
//    deterministic), and one lane per (row, coefficient) finishes it into the
//    fp32 coefficient workspace coef (total_rows x kp). Pass 2, per chunk:
//    x -= coef . U^T from the same registers. Each element is stored once.
// Modes: kFused when a row fits one segment (d <= 256 kEpt: 4096, block policies 2048):
// one launch, every element read once and written once (HBM bytes of a copy).
// Otherwise a row is cut into fixed segments, one per CTA work item, and the
// launch is split in three (deterministic, no atomics): kPartials writes each
// segment's partial sums; combine_kernel adds them in segment order and
// finishes the coefficients; kApply re-reads the segment and writes x - U coef.
// Elements are then read twice (the second read usually from L2) and written once.
// All index arithmetic on rows, columns and workspaces is int64.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "cuda/device_cache.cuh"
#include "cuda/launch.cuh"
#include "cuda/multi_tensor.cuh"

namespace gradproj::cuda::tile {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
constexpr int kChunk = 8;                  // coefficients per chunk of k (kp's multiple)
// [small k] A launch of k < kChunk basis columns takes chunks of KC coefficients, the
// smallest power of two not below k (chunk_for): at k = 1 kChunk = 8 did 8x its FMAs,
// shared-memory reads and reduce-scatter sums (7 of 8 against zero padding) and staged 8
// rows of a segment (128 KiB at 4096 columns: one CTA an SM, where 16 KiB allow two).
template <int KC>
constexpr bool kChunkOk = KC == 1 || KC == 2 || KC == 4 || KC == kChunk;
inline int chunk_for(int64_t k) { return k <= 1 ? 1 : k <= 2 ? 2 : k <= 4 ? 4 : kChunk; }
constexpr int kEpt = 16;                   // rows kernel: elements of a row per thread
constexpr int kSegMax = kThreads * kEpt;   // rows kernel: widest segment (wpr = 8)
// The largest dynamic shared memory of any launch: rows_kernel staging a chunk
// of a 4096-wide segment (128 KiB; A100 allows 163 KiB, H100 227 KiB).
constexpr size_t kMaxDynamicSmem = static_cast<size_t>(kChunk) * kSegMax * sizeof(float);
// Stage all of U once per CTA when it fits here and in the device's per-block limit
// (resident_limit). 128 KiB holds U^T at k = 32 for d <= 1024 (96 KiB at d = 768), which
// 64 KiB did not: each 8-row tile then restaged every chunk of U^T, half of the
// instructions (benchmarks/perf_model_cuda.py, d = 768, k = 32, fp32, predicted: project_
// 28 -> 42 % of copy on A100, 22 -> 37 % on H100; projected AdamW 2.37x -> 1.33x and
// 3.42x -> 1.50x torch's fused AdamW; counted before model-scale), even at 1 CTA/SM on A100.
constexpr size_t kResidentBytes = kMaxDynamicSmem;
static_assert(kResidentBytes <= kMaxDynamicSmem, "resident staging must fit the ceiling");

enum class Mode { kFused, kPartials, kApply };

// What a launch covers; passed by value to every kernel of the launch.
struct Geometry {
  int64_t d;           // row length (basis rows)
  int64_t k;           // basis columns
  int64_t kp;          // k rounded up to kChunk (coef, partials and packed U use kp)
  int64_t total_rows;  // rows of all views in the launch
  int64_t n_tiles;     // rows kernel: row tiles; cols kernel: 32-column blocks
  int64_t nseg;        // segments per row (1 in kFused)
  int64_t seg_width;   // elements of a row per segment
  int64_t basis_ld;    // dp = round_up(d, 8): rows kernel U^T row length; cols kernel U rows
  int wpr;             // rows kernel: warps per row group
  int smem_ld;         // rows kernel: floats per staged U^T row (a multiple of 32)
  bool resident;       // the whole packed basis is staged once per CTA
};

// [small k] Chunks of KC coefficients a launch takes: ceil(k / KC) (kp / 8 for KC = 8).
template <int KC>
__host__ __device__ __forceinline__ int64_t chunks_of(const Geometry& g) {
  return (g.k + KC - 1) / KC;
}

// Four consecutive elements: the unit of a vectorized load or store (16 bytes
// of fp32, 8 of bf16/fp16). Four for every dtype, not 16 bytes: with 8 bf16 per
// vector the fused kernels spilled at the 128-register cap, and a lane's 4
// columns are one float4 of staged U^T, so a warp's shared-memory reads are 32
// consecutive float4s for every dtype (no bank conflicts).
template <typename T>
struct alignas(4 * sizeof(T)) Pack {
  static constexpr int kSize = 4;
  T v[kSize];
};

// A Pack's raw bits (two or four 32-bit registers), as loaded, and their fp32 values.
template <typename T>
using PackBits = std::conditional_t<sizeof(T) == 4, uint4, uint2>;
template <typename T>
__device__ __forceinline__ void unpack(const PackBits<T>& r, float (&x)[4]) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // bf16 is the high half of an fp32: one shift or mask per element (as a Pack of
    // c10::BFloat16, each element took a PRMT to its own register, then the shift)
    x[0] = __uint_as_float(r.x << 16);
    x[1] = __uint_as_float(r.x & 0xffff0000u);
    x[2] = __uint_as_float(r.y << 16);
    x[3] = __uint_as_float(r.y & 0xffff0000u);
  } else {
    Pack<T> p;
    memcpy(&p, &r, sizeof(p));
#pragma unroll
    for (int v = 0; v < 4; ++v) x[v] = static_cast<float>(p.v[v]);
  }
}

// *dst = p as one 8- or 16-byte store: assigning a Pack of c10::BFloat16 / Half copies
// it member by member, and nvcc sometimes left that as 4 two-byte stores.
template <typename T>
__device__ __forceinline__ void store_pack(T* dst, const Pack<T>& p) {
  using Raw = PackBits<T>;
  static_assert(sizeof(Raw) == sizeof(Pack<T>));
  Raw r;
  memcpy(&r, &p, sizeof(r));
  *reinterpret_cast<Raw*>(dst) = r;
}

// The entry whose first `field` is the largest not above `key` (entries sorted
// by `field`, the first 0): the matrix a row or task belongs to.
template <typename Entry>
__device__ __forceinline__ const Entry& find_first(
    const Entry* table, int n, int64_t key, int64_t Entry::*field) {  // model-uniform
  int lo = 0;
  int hi = n - 1;
  while (lo < hi) {  // model-trips: ceil(log2(entries))
    const int mid = (lo + hi + 1) / 2;
    if (table[mid].*field <= key) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return table[lo];
}

// The multiplier of U's column kk from the coefficient a = (U^T x)[kk]:
//   plain:    w * a
//   anchored: delta = a - c;  c <- c + (1 - w) delta (with weights);  w * delta
// Called exactly once per (row, kk), so the anchor update happens once.
__device__ __forceinline__ float finish_coef(
    float a, int64_t kk, const float* weights, float* anchor_row) {
  if (anchor_row != nullptr) {
    float delta = a - anchor_row[kk];
    if (weights != nullptr) {
      anchor_row[kk] += (1.f - weights[kk]) * delta;
      delta *= weights[kk];
    }
    return delta;
  }
  return weights != nullptr ? a * weights[kk] : a;
}

// One halving step at offset M of reduce_scatter, then the next (M / 2). A
// template per step, so every index into v is a compile-time constant and v
// stays in registers (a runtime-bounded loop here put v in local memory).
template <int N, int M>
__device__ __forceinline__ void halve(float (&v)[N], int lane) {
  const bool upper = (lane & M) != 0;
#pragma unroll
  for (int i = 0; i < M; ++i) {
    const float send = upper ? v[i] : v[i + M];
    const float keep = upper ? v[i + M] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, M);
  }
  if constexpr (M > 1) halve<N, M / 2>(v, lane);
}

// Reduce-scatter of N partial sums across a warp: afterwards lane l holds the
// warp's total of v[l % N]. Each halving step at offset m keeps the half of the
// values picked by lane bit m and adds the partner's copy of that half (m
// shuffles); N - 1 shuffles in all instead of 5 N for N butterflies. Lanes that
// differ in bits >= log2(N) then add by butterfly. Fixed order: deterministic.
template <int N>
__device__ __forceinline__ float reduce_scatter(float (&v)[N], int lane) {
  static_assert(N >= 1 && N <= kWarp && (N & (N - 1)) == 0, "N must be a power of 2 <= 32");
  if constexpr (N > 1) halve<N, N / 2>(v, lane);
#pragma unroll
  for (int m = N; m < kWarp; m *= 2) v[0] += __shfl_xor_sync(0xffffffffu, v[0], m);
  return v[0];
}


// Stages rows [k0, k0 + nk) of U^T (kp x basis_ld, zero padded), columns
// [c0, c0 + smem_ld), into su (row kk at su + kk * smem_ld).
// Columns past basis_ld are written as zero.
__device__ __forceinline__ void stage_ut(
    float* su, const float* __restrict__ ut, const Geometry& g, int64_t k0, int nk, int64_t c0) {
  const int units = g.smem_ld / 4;
  float4* dst = reinterpret_cast<float4*>(su);
  // model-trips: ceil(nk * smem_ld / 1024)
  for (int i = threadIdx.x; i < nk * units; i += kThreads) {
    const int kk = i / units;
    const int q = i - kk * units;
    const int64_t col = c0 + 4 * static_cast<int64_t>(q);
    float4 val = make_float4(0.f, 0.f, 0.f, 0.f);
    // basis_ld % 8 == 0 and col % 4 == 0, so col < basis_ld covers all 4 floats.
    if (col < g.basis_ld) val = *reinterpret_cast<const float4*>(ut + (k0 + kk) * g.basis_ld + col);
    dst[kk * units + q] = val;
  }
}

// The staged U^T rows of chunk c (its KC rows, row kc at + kc * smem_ld).
// Every call is a barrier: it orders the previous chunk's shared-memory reads
// and the coefficient writes before what follows. Only the rows before k are
// staged (k = 1 read 8 rows of a flat basis, 7 of them padding: 8x the basis
// bytes); the rest hold zeros (zero_padding) or an earlier chunk's rows, finite
// values whose coefficients are 0 in pass 2 (pass 1's sums for them are discarded).
template <int KC>
__device__ __forceinline__ const float* rows_chunk(
    float* su, const float* __restrict__ ut, const Geometry& g, int64_t c, int64_t c0) {
  __syncthreads();
  if (g.resident) return su + c * KC * g.smem_ld;
  const int nk = static_cast<int>(g.k - c * KC < KC ? g.k - c * KC : KC);
  // model-cold-if: resident
  stage_ut(su, ut, g, c * KC, nk, c0);  // model-binds: nk = k / max(ceil(k / KC), 1)
  __syncthreads();
  return su;
}

// A chunk's staging rows zeroed once per CTA where k is not a multiple of KC, so the
// rows rows_chunk does not stage are finite (dynamic shared memory starts as anything:
// 0 x NaN in pass 2 would be NaN).
template <int KC>
__device__ __forceinline__ void zero_padding(float* su, const Geometry& g) {
  if (!g.resident && g.k % KC != 0) {  // model-cold-if: resident or k % KC == 0
    float4* dst = reinterpret_cast<float4*>(su);
    const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
    // model-trips: ceil(KC * smem_ld / 1024)
    for (int i = threadIdx.x; i < KC * g.smem_ld / 4; i += kThreads) dst[i] = zero;
  }
}

// V values of staged U^T row `kc` at columns [cs, cs + V) of the segment (cs % V == 0).
// Lane l of a warp reads float4 unit cs / 4 = (s * tpr + tg) (V = 4): 32
// consecutive units, so each 8-lane phase of the 128-bit read hits 8 distinct
// 16-byte bank groups (conflict-free).
template <int V>
__device__ __forceinline__ void read_ut(const float* sc, int smem_ld, int kc, int cs, float (&u)[V]) {
  const float4* row = reinterpret_cast<const float4*>(sc + kc * smem_ld);
#pragma unroll
  for (int h = 0; h < V / 4; ++h) {
    const float4 f = row[cs / 4 + h];
    u[4 * h] = f.x;
    u[4 * h + 1] = f.y;
    u[4 * h + 2] = f.z;
    u[4 * h + 3] = f.w;
  }
}

// ---------------------------------------------------------------------------
// rows_kernel: see the file comment. Work item = (row tile, segment). KC: coefficients
// per chunk ([small k]).
// ---------------------------------------------------------------------------
template <class P, Mode kMode, int KC>
__global__ void __launch_bounds__(kThreads, 2) rows_kernel(
    P pol, Geometry g, const float* __restrict__ ut, const float* __restrict__ weights,
    float* __restrict__ coef, float* __restrict__ partials) {
  using T = typename P::Scalar;
  constexpr int V = Pack<T>::kSize;  // elements per vector (4)
  constexpr int S = P::kEpt / V;     // slots per row per thread
  constexpr int R = P::kRows;        // rows per group
  static_assert(!P::kBlock || R == V, "a block policy's vector holds one element of each row");
  static_assert(kChunkOk<KC>, "chunks of 1, 2, 4 or kChunk coefficients");
  constexpr int N = R * KC;          // partial sums per thread per chunk
  static_assert(N <= kWarp, "a warp reduce-scatters at most 32 sums");
  GRADPROJ_DYNAMIC_SMEM(float4, smem_raw);
  float* su = reinterpret_cast<float*>(smem_raw);
  __shared__ float red[kWarps][kWarp];

  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int tpr = g.wpr * kWarp;        // threads per row group
  const int group = threadIdx.x / tpr;  // row group of this thread
  const int tg = threadIdx.x % tpr;     // thread within its group
  const int64_t tile_rows = static_cast<int64_t>(R) * (kWarps / g.wpr);
  const int64_t n_chunks = chunks_of<KC>(g);

  // the rows its chunks read: kp (KC = 8), k rounded up to KC below; read by rows_chunk's barrier;
  // model-binds: nk = KC * ceil(k / KC)
  if (g.resident) stage_ut(su, ut, g, 0, static_cast<int>(n_chunks * KC), 0);  // model-cold-if: not resident
  zero_padding<KC>(su, g);  // ordered before the first chunk's staging by rows_chunk's barrier

  const int64_t work = g.n_tiles * g.nseg;
  for (int64_t item = blockIdx.x; item < work; item += gridDim.x) {  // model-trips: items
    const int64_t tile = item / g.nseg;
    const int64_t seg = item - tile * g.nseg;
    const int64_t c0 = seg * g.seg_width;                // first column of the segment
    const int64_t row0 = tile * tile_rows + group * R;  // first row of this group

    typename P::Row rw[R];
    bool valid[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      valid[r] = row0 + r < g.total_rows;
      if (valid[r]) rw[r] = pol.row(row0 + r);
    }
    // All R * S vector loads are issued before any use: R * kEpt elements in
    // flight per thread. Columns past d load as zero. x[s][r]: slot s of row r.
    float x[S][R][V];
    bool block = false;  // [block policy] the R rows' elements at column j are one vector
    if constexpr (P::kBlock) block = pol.block_ok(rw, valid);
#pragma unroll
    for (int s = 0; s < S; ++s) {  // model-scale: slots / S (a slot past d is skipped)
      const int64_t j = c0 + static_cast<int64_t>(s * tpr + tg) * V;  // [slot map]
      if constexpr (P::kBlock) {
        pol.template load_block<kMode != Mode::kPartials>(rw, valid, block, j, g.d, x[s]);
      } else {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (valid[r]) {
            pol.template load<kMode != Mode::kPartials>(rw[r], j, g.d, x[s][r]);
          } else {
#pragma unroll
            for (int v = 0; v < V; ++v) x[s][r][v] = 0.f;
          }
        }
      }
    }

    if (kMode != Mode::kApply) {  // pass 1: a = U^T x, one chunk of KC coefficients at a time
      for (int64_t c = 0; c < n_chunks; ++c) {  // model-trips: ceil(k / KC)
        const float* sc = rows_chunk<KC>(su, ut, g, c, c0);
        float acc[N];
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] = 0.f;
#pragma unroll
        for (int s = 0; s < S; ++s) {  // model-scale: slots / S (a slot past d is skipped)
          const int cs = (s * tpr + tg) * V;  // column within the segment
          if (c0 + cs >= g.d) continue;       // all zeros; and past the staged row
#pragma unroll
          for (int kc = 0; kc < KC; ++kc) {
            float u[V];
            read_ut<V>(sc, g.smem_ld, kc, cs, u);
#pragma unroll
            for (int r = 0; r < R; ++r) {
#pragma unroll
              for (int v = 0; v < V; ++v) acc[r * KC + kc] = fmaf(x[s][r][v], u[v], acc[r * KC + kc]);
            }
          }
        }
        // Lane l of each warp: the warp's sum for row l / KC, coefficient l % KC.
        red[warp][lane] = reduce_scatter<N>(acc, lane);
        __syncthreads();
        // Lanes < N of the group's first warp, one per (row, coef) (N <= 32: the
        // group's other warps skip it); model-uniform; model-scale: 1 / wpr
        if (tg < N) {
          float total = 0.f;
          for (int w = 0; w < g.wpr; ++w) total += red[group * g.wpr + w][tg];  // model-trips: wpr
          const int64_t row = row0 + tg / KC;
          const int64_t kk = c * KC + tg % KC;
          if (row < g.total_rows) {
            // (KC < kChunk: coefficients past round_up(k, KC) are neither written nor
            // read, here or in partials; combine_kernel discards its sums for them)
            if (kMode == Mode::kFused) {
              coef[row * g.kp + kk] =
                  kk < g.k ? finish_coef(total, kk, weights, pol.anchor_row(row)) : 0.f;
            } else {
              partials[(seg * g.total_rows + row) * g.kp + kk] = total;
            }
          }
        }
      }
    }

    if (kMode != Mode::kPartials) {  // pass 2: x -= U coef, from the same registers
      for (int64_t c = 0; c < n_chunks; ++c) {  // model-trips: ceil(k / KC)
        const float* sc = rows_chunk<KC>(su, ut, g, c, c0);  // its barrier publishes coef
        float cf[R][KC];
#pragma unroll
        for (int r = 0; r < R; ++r) {  // model-uniform: one row's coefficients per group
          // coef rows are kp floats (kp % 8 == 0) from a 256-byte aligned allocation.
          const int64_t row = valid[r] ? row0 + r : 0;  // never form an address past coef
          // (chunk c's KC floats start KC c floats into the row: aligned to KC floats)
          const float* src = coef + row * g.kp + c * KC;
          if constexpr (KC >= 4) {
#pragma unroll
            for (int q = 0; q < KC / 4; ++q) {
              const float4 f = valid[r] ? reinterpret_cast<const float4*>(src)[q]
                                        : make_float4(0.f, 0.f, 0.f, 0.f);
              cf[r][4 * q] = f.x;
              cf[r][4 * q + 1] = f.y;
              cf[r][4 * q + 2] = f.z;
              cf[r][4 * q + 3] = f.w;
            }
          } else if constexpr (KC == 2) {
            const float2 f = valid[r] ? *reinterpret_cast<const float2*>(src) : make_float2(0.f, 0.f);
            cf[r][0] = f.x;
            cf[r][1] = f.y;
          } else {
            cf[r][0] = valid[r] ? src[0] : 0.f;
          }
        }
#pragma unroll
        for (int s = 0; s < S; ++s) {  // model-scale: slots / S (a slot past d is skipped)
          const int cs = (s * tpr + tg) * V;
          if (c0 + cs >= g.d) continue;
#pragma unroll
          for (int kc = 0; kc < KC; ++kc) {
            float u[V];
            read_ut<V>(sc, g.smem_ld, kc, cs, u);
#pragma unroll
            for (int r = 0; r < R; ++r) {
#pragma unroll
              for (int v = 0; v < V; ++v) x[s][r][v] = fmaf(-cf[r][kc], u[v], x[s][r][v]);
            }
          }
        }
      }
      // Rows looked up again (the table is re-read after the coef stores), so
      // the load addresses are not kept live through both passes (bf16 spilled on
      // sm_80 when they were); store_row forms only what a store needs (AdamW's
      // per-row bias corrections, fp64 exp and log, are not formed twice).
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (valid[r]) rw[r] = pol.store_row(row0 + r);
      }
#pragma unroll
      for (int s = 0; s < S; ++s) {  // model-scale: slots / S (a slot past d is skipped)
        const int64_t j = c0 + static_cast<int64_t>(s * tpr + tg) * V;
        if (j >= g.d) continue;
        if constexpr (P::kBlock) {
          pol.store_block(rw, valid, block, j, g.d, x[s]);
        } else {
#pragma unroll
          for (int r = 0; r < R; ++r) {
            if (valid[r]) pol.store(rw[r], j, g.d, x[s][r]);
          }
        }
      }
    }
  }
}

// Split launches: coef[row, kk] = finish(sum over segments, in order, of the partials).
template <class P>
__global__ void __launch_bounds__(kThreads) combine_kernel(
    P pol, Geometry g, const float* __restrict__ partials, const float* __restrict__ weights,
    float* __restrict__ coef) {
  const int64_t total = g.total_rows * g.kp;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {  // model-trips: items
    const int64_t row = i / g.kp;
    const int64_t kk = i - row * g.kp;
    float sum = 0.f;
    // model-trips: nseg
    for (int64_t seg = 0; seg < g.nseg; ++seg) sum += partials[seg * total + i];
    coef[i] = kk < g.k ? finish_coef(sum, kk, weights, pol.anchor_row(row)) : 0.f;
  }
}

// ---------------------------------------------------------------------------
// Host: one launch (rows or cols layout) of the projection engine.
// ---------------------------------------------------------------------------

// What both layouts' geometry starts from: the basis and the rows of the launch.
inline Geometry base_geometry(const at::Tensor& basis, int64_t total_rows) {
  Geometry g{};
  g.d = basis.size(0);
  g.k = basis.size(1);
  g.kp = round_up(g.k, kChunk);
  g.total_rows = total_rows;
  g.basis_ld = round_up(g.d, 8);
  return g;
}

// Split launches, between the partials and the apply pass: coef from partials.
template <class P>
void combine(
    const P& pol, const Geometry& g, const at::Tensor& partials, const float* weights,
    const at::Tensor& coef) {
  launch_kernel(
      combine_kernel<P>, (g.total_rows * g.kp + kThreads - 1) / kThreads, kThreads, 0, pol, g,
      partials.data_ptr<float>(), weights, coef.data_ptr<float>());
}

// The most bytes `kernel` may stage U in at once on this device: kResidentBytes, or the
// device's per-block limit where that is lower (GPUs before sm_80 allow 48-99 KiB).
template <typename Kernel>
size_t resident_limit(Kernel kernel) {
  const size_t ceiling =
      allow_dynamic_smem(reinterpret_cast<const void*>(kernel), kMaxDynamicSmem);
  return ceiling < kResidentBytes ? ceiling : kResidentBytes;
}

// Rows layout: every row of the `total_rows` rows the policy's table describes, in chunks
// of KC coefficients ([small k]).
template <class P, int KC>
void run_rows_chunked(const P& pol, int64_t total_rows, const at::Tensor& basis, const float* weights) {
  Geometry g = base_geometry(basis, total_rows);
  g.wpr = 1;  // the smallest group whose segment covers the row
  while (g.wpr < kWarps && static_cast<int64_t>(g.wpr) * kWarp * P::kEpt < g.d) g.wpr *= 2;
  g.seg_width = static_cast<int64_t>(g.wpr) * kWarp * P::kEpt;
  g.nseg = (g.d + g.seg_width - 1) / g.seg_width;
  const int64_t tile_rows = static_cast<int64_t>(P::kRows) * (kWarps / g.wpr);
  g.n_tiles = (total_rows + tile_rows - 1) / tile_rows;
  const at::Tensor ut = packed_basis(basis, BasisLayout::kTransposed);
  at::Tensor coef = at::empty({total_rows, g.kp}, basis.options());
  if (g.nseg == 1) {
    g.smem_ld = static_cast<int>(round_up(g.d, 32));
    // the rows the chunks read: kp, or k rounded up to KC < kChunk
    const size_t all = static_cast<size_t>(chunks_of<KC>(g) * KC) * g.smem_ld * sizeof(float);
    g.resident = all <= resident_limit(rows_kernel<P, Mode::kFused, KC>);
    const size_t smem = g.resident ? all : static_cast<size_t>(KC) * g.smem_ld * sizeof(float);
    launch_kernel<kMaxDynamicSmem>(
        rows_kernel<P, Mode::kFused, KC>, g.n_tiles, kThreads, smem, pol, g, ut.data_ptr<float>(),
        weights, coef.data_ptr<float>(), nullptr);
    return;
  }
  g.smem_ld = static_cast<int>(g.seg_width);
  g.resident = false;
  const size_t smem = static_cast<size_t>(KC) * g.smem_ld * sizeof(float);
  at::Tensor partials = at::empty({g.nseg, total_rows, g.kp}, basis.options());
  launch_kernel<kMaxDynamicSmem>(
      rows_kernel<P, Mode::kPartials, KC>, g.n_tiles * g.nseg, kThreads, smem, pol, g,
      ut.data_ptr<float>(), weights, nullptr, partials.data_ptr<float>());
  combine(pol, g, partials, weights, coef);
  launch_kernel<kMaxDynamicSmem>(
      rows_kernel<P, Mode::kApply, KC>, g.n_tiles * g.nseg, kThreads, smem, pol, g,
      ut.data_ptr<float>(), weights, coef.data_ptr<float>(), nullptr);
}

template <class P>
void run_rows(const P& pol, int64_t total_rows, const at::Tensor& basis, const float* weights) {
  if (total_rows == 0) return;
  switch (chunk_for(basis.size(1))) {
    case 1:
      return run_rows_chunked<P, 1>(pol, total_rows, basis, weights);
    case 2:
      return run_rows_chunked<P, 2>(pol, total_rows, basis, weights);
    case 4:
      return run_rows_chunked<P, 4>(pol, total_rows, basis, weights);
    default:
      return run_rows_chunked<P, kChunk>(pol, total_rows, basis, weights);
  }
}

// True when `t`'s rows can be read as Packs (4 elements): unit stride along a
// row, the first element and every row start aligned to a Pack.
inline bool vector_rows(const at::Tensor& t, int64_t row_stride, int64_t col_stride, int64_t rows) {
  const int64_t pack = 4 * static_cast<int64_t>(t.element_size());
  return col_stride == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % pack == 0 &&
         (rows <= 1 || (row_stride * static_cast<int64_t>(t.element_size())) % pack == 0);
}

}  // namespace gradproj::cuda::tile
