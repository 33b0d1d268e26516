// CUDA kernel of gradproj::projected_adamw_bucket_.
//
// Contract (gradproj/backends.py, math in gradproj.reference.projected_adamw): one
// AdamW step of every param, with t its step count read on the device,
//   g <- -g if maximize;  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
//   v^ <- max(v^, v) if amsgrad else v
//   x' <- x (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v^) / sqrt(1 - b2^t) + eps)
// then, for every row x' of the param's row view with anchor row c:
//   a = U^T x';  x <- x' - U (w (a - c));  c <- c + (1 - w) (a - c)  (soft weights)
//
// Rows (side="input", contiguous, 16-byte aligned, d <= 1280 (fp32 1024), no amsgrad; fp32 from
// k = 9) run on tensor cores (cuda/mma_rows.cuh with AdamWPolicy): x' is formed from p,
// g, m, v as a 16-row tile is loaded (m, v stored then; 16-bit rows load the next tile's
// four streams during this one), projected in registers, and p stored: DRAM sees the
// bytes of a fused AdamW plus the anchors; so do transposed views (side="output"), as
// strided rows (fp32 at every k; 16-bit from k = 33). A basis too large for shared memory takes
// its columns a block a launch (mma_rows.cuh [columns]): the first with the AdamW step,
// the others project p (project.cu's anchored projection), reading and writing it once
// more each. Everything else runs the row-tile engine of cuda/tile.cuh with
// AdamWPolicy: loading a row element reads p, g, m, v (v^), stores the new m, v (v^)
// at once (they do not depend on the projection) and keeps x' in registers; the
// engine projects x' and stores p once. So when a row fits one segment (rows layout
// d <= 4096, cols layout d <= 128) DRAM sees exactly the bytes of a fused AdamW: p, g, m, v (v^) read
// once, p, m, v (v^) written once. Longer rows take the split launch: the
// partials pass computes x' without storing anything, the apply pass reads the
// four streams again and stores everything. side="output" (transposed views)
// runs in the cols layout (coalesced along G's rows); flat params are one row each.
// Numerics: bias corrections in fp64 from the step count (as the Triton kernel), fp32
// update with the SFU's square root and quotient ([fast update]), fp32 dot products, one
// rounding per stored element. No host synchronization.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "bucket_checks.h"
#include "cuda/launch.cuh"
#include "cuda/mma_rows.cuh"
#include "cuda/multi_tensor.cuh"
#include "cuda/tile.cuh"

namespace gradproj::cuda {
namespace {

// The SFU's operations by name: the PTX instruction on a GPU, the emulator's model of it
// (cuda_emu.h, at its documented bound) under GRADPROJ_CUDA_EMULATION.
#ifdef GRADPROJ_CUDA_EMULATION
#define GRADPROJ_SFU(name, ptx) \
  __device__ __forceinline__ float name(float x) { return ::gradproj_emu::name(x); }
#else
#define GRADPROJ_SFU(name, ptx)                         \
  __device__ __forceinline__ float name(float x) {      \
    float r;                                            \
    asm(ptx " %0, %1;" : "=f"(r) : "f"(x));             \
    return r;                                           \
  }
#endif
// [fast update] The update's square root and quotient, sqrt(v^) and m / den, from the
// SFU: sqrt.approx.f32 (1 ulp, the CUDA guide's bound from compute capability 5.2) and
// __fdividef (x times rcp.approx(y): 2 ulps for 2^-126 <= |y| <= 2^126; den >= eps, and
// sqrt(v^) / sqrt(1 - b2^t) stays below 2^70 for every finite v^). Correctly rounded
// (__fsqrt_rn, IEEE division) they took 28 of a bf16 element's 80 instructions in the
// tensor-core kernel, one MUFU each plus Newton steps, special-case branches and slow-path
// calls (benchmarks/perf_model_cuda.py --lines, sm_90). Both errors fall on the update
// lr m / den alone, a few 1e-7 of it, where the param's own rounding is 6e-8 of |x'|.
GRADPROJ_SFU(sqrt_approx, "sqrt.approx.f32")
// [flushed root] The same SFU operations with subnormals flushed (.ftz): a MUFU each
// (the quotient a MUFU and a multiply) where sqrt.approx.f32 took 5 instructions (a
// subnormal v^ scaled by 2^24, its root by 2^-12, under a compare and a select) and
// __fdividef 5 (the operands scaled where |den| < 2^-126): 7 of the 87 instructions an
// element of the bf16 tensor-core kernel issued at k = 32 (sm_80). They change nothing
// where fast_root(h) holds: den is then normal (>= eps), and a flushed v^ (< 2^-126, root
// < 2^-63) moves the exact root / sqrt(1 - b2^t) + eps by less than half an ulp of eps,
// so the FFMA rounds to the same den either way.
GRADPROJ_SFU(sqrt_approx_ftz, "sqrt.approx.ftz.f32")
GRADPROJ_SFU(rcp_approx_ftz, "rcp.approx.ftz.f32")
#undef GRADPROJ_SFU

// One param of the bucket in the device table, as int64 words. For side="flat"
// rows == 1 and the column strides are the vector's strides.
struct AdamWEntry {
  int64_t p, g, m, v, vmax;  // addresses (vmax: 0 unless amsgrad)
  int64_t anchor;            // (rows x k) float32
  int64_t step;              // float32 step count, already incremented
  int64_t rows;
  int64_t row_stride;  // p, m, v, v^ share strides
  int64_t col_stride;
  int64_t g_row_stride;
  int64_t g_col_stride;
  int64_t first_row;   // index of its first row among all rows of the launch
};

struct Hyper {
  double lr;
  double one_minus_beta1;  // formed in fp64 on the host
  double one_minus_beta2;
  float beta1;
  float beta2;
  float eps;
  float decay;  // 1 - lr wd
  float grad_sign;  // -1 if maximize, else 1
  bool amsgrad;
  float* bias = nullptr;  // [bias] (step_size, inv_sqrt_bias2) of each table entry, 2 floats
};

// A param row as its table entry and offsets (32 bytes).
struct AdamWEntryRow {
  const AdamWEntry* e;
  int64_t o;   // offset of the row's element 0 in p, m, v, v^
  int64_t og;  // in g
  float step_size;
  float inv_sqrt_bias2;
};
// [row addresses] A param row as its streams' addresses and column strides (64 bytes), so
// loading or storing its elements reads no table entry. The compiler cannot tell a store
// through p, m or v from a write to the table, and read the entry's fields again after
// each: in the tensor-core kernel's transposed 16-bit views, 6 fields (48 bytes of
// loads a lane) for every block of 4 columns and 2 rows, beside the block's 64 bytes of
// p, g, m, v, and the next block's loads waited on them. The row-tile engine's block
// policy (4 rows a group in registers) keeps the entry form: with addresses its kernels
// spilled 4-84 B.
template <typename T>
struct AdamWAddressRow {
  const AdamWEntry* e;  // the step count (bias corrections) and amsgrad's v^
  T* p;                 // the row's element 0 in p, m, v and g
  T* m;
  T* v;
  const T* g;
  int64_t cs;   // column stride of p, m, v, v^
  int64_t gcs;  // of g
  float step_size;
  float inv_sqrt_bias2;
};

// How the engine reads and writes one param row. kVec: p, g, m, v (v^) of every
// row of the launch are unit-stride and 16-byte aligned. kAddresses: rows as
// AdamWAddressRow ([row addresses]), else AdamWEntryRow. kFastRoot: the update's root and
// quotient with subnormals flushed ([flushed root]; launched only where fast_root(h)).
template <typename T, bool kVec, bool kAddresses, bool kFastRoot>
struct AdamWPolicyBase {
  using Scalar = T;
  // One row per group and 16 column elements per thread: with 2 rows / 32
  // elements the AdamW loads spilled 8-116 bytes at the 128-register cap.
  static constexpr int kRows = 1;
  static constexpr int kEpt = tile::kEpt;  // elements of a row per thread (rows layout)
  static constexpr bool kBlock = false;
  static constexpr int V = tile::Pack<T>::kSize;

  const AdamWEntry* table;
  int n;
  int64_t k;
  Hyper h;

  using Row = std::conditional_t<kAddresses, AdamWAddressRow<T>, AdamWEntryRow>;

  // A row's streams (element 0) and column strides, from either form of Row.
  static __device__ __forceinline__ T* p_of(const Row& w) {
    if constexpr (kAddresses) return w.p; else return reinterpret_cast<T*>(w.e->p) + w.o;
  }
  static __device__ __forceinline__ T* m_of(const Row& w) {
    if constexpr (kAddresses) return w.m; else return reinterpret_cast<T*>(w.e->m) + w.o;
  }
  static __device__ __forceinline__ T* v_of(const Row& w) {
    if constexpr (kAddresses) return w.v; else return reinterpret_cast<T*>(w.e->v) + w.o;
  }
  static __device__ __forceinline__ const T* g_of(const Row& w) {
    if constexpr (kAddresses) return w.g; else return reinterpret_cast<const T*>(w.e->g) + w.og;
  }
  static __device__ __forceinline__ int64_t cs_of(const Row& w) {
    if constexpr (kAddresses) return w.cs; else return w.e->col_stride;
  }
  static __device__ __forceinline__ int64_t gcs_of(const Row& w) {
    if constexpr (kAddresses) return w.gcs; else return w.e->g_col_stride;
  }

  // The row's addresses only: what the stores after pass 2 need (no bias corrections).
  __device__ Row store_row(int64_t row) const {  // model-uniform
    const AdamWEntry& e = tile::find_first(table, n, row, &AdamWEntry::first_row);
    const int64_t r = row - e.first_row;
    const int64_t o = r * e.row_stride;
    const int64_t og = r * e.g_row_stride;
    if constexpr (kAddresses) {
      return {&e, reinterpret_cast<T*>(e.p) + o, reinterpret_cast<T*>(e.m) + o,
              reinterpret_cast<T*>(e.v) + o, reinterpret_cast<const T*>(e.g) + og,
              e.col_stride, e.g_col_stride, 0.f, 0.f};
    } else {
      return {&e, o, og, 0.f, 0.f};
    }
  }
  // The row's bias corrections: its param's, as bias_kernel formed them this launch.
  __device__ void add_bias(Row& w) const {  // model-uniform
    const float2 b = reinterpret_cast<const float2*>(h.bias)[w.e - table];
    w.step_size = b.x;
    w.inv_sqrt_bias2 = b.y;
  }
  __device__ Row row(int64_t row) const {  // model-uniform
    Row w = store_row(row);
    add_bias(w);
    return w;
  }
  __device__ float* anchor_row(int64_t row) const {  // model-uniform
    const AdamWEntry& e = tile::find_first(table, n, row, &AdamWEntry::first_row);
    return reinterpret_cast<float*>(e.anchor) + (row - e.first_row) * k;
  }

  // x' of one element; m, v (kAmsgrad: v^) updated in place (fp32). maximize is a product
  // with -1 (exact), not a branch: a branch on a uniform flag let the compiler unswitch the
  // kernel's tile loop, one copy of its body for each value. The sign rides on (1 - b1),
  // formed once, not on g, an FMUL an element (1 of 80 in the bf16 tensor-core kernel):
  // (-(1 - b1)) g is -((1 - b1) g) exactly, and v's (1 - b2) g g does not see it.
  template <bool kAmsgrad>
  __device__ __forceinline__ float update(
      const Row& w, float p, float g, float& m, float& v, float& vmax) const {
    const float signed_omb1 = static_cast<float>(h.one_minus_beta1) * h.grad_sign;
    const float omb2 = static_cast<float>(h.one_minus_beta2);
    m = h.beta1 * m + signed_omb1 * g;
    v = h.beta2 * v + omb2 * g * g;
    float v_hat = v;
    if constexpr (kAmsgrad) {
      v_hat = fmaxf(vmax, v);
      vmax = v_hat;
    }
    if constexpr (kFastRoot) {  // [flushed root]: only where fast_root(h)
      return p * h.decay -
             w.step_size * m * rcp_approx_ftz(sqrt_approx_ftz(v_hat) * w.inv_sqrt_bias2 + h.eps);
    } else {
      return p * h.decay - __fdividef(w.step_size * m, sqrt_approx(v_hat) * w.inv_sqrt_bias2 + h.eps);
    }
  }

  // The tensor-core kernel's interface (cuda/mma_rows.cuh [policy]): a vector is the
  // raw bits of p, g, m, v at one column; finishing it forms x' (an fp32 value, so pass 1
  // splits it as fp32 rows) and stores m, v. 16-bit vectors of the next tile stay in
  // registers during this tile (8 registers each).
  struct Bits {
    tile::PackBits<T> p, g, m, v;
  };
  static constexpr bool kExactTf32 = false;
  static constexpr bool kPrefetch = !std::is_same_v<T, float>;
  static constexpr bool kUpdates = true;
  static constexpr bool kVector = kVec;
  // p, g, m, v at elements [j, j + V) (j + V <= d; any Row: only addresses read): one
  // vector each (kVec), or V strided elements each (transposed views).
  __device__ __forceinline__ Bits load_bits(const Row& w, int64_t j) const {
    using B = tile::PackBits<T>;
    const T *p = p_of(w), *g = g_of(w), *m = m_of(w), *v = v_of(w);
    if constexpr (kVec) {
      return {*reinterpret_cast<const B*>(p + j), *reinterpret_cast<const B*>(g + j),
              *reinterpret_cast<const B*>(m + j), *reinterpret_cast<const B*>(v + j)};
    } else {
      // 32-bit element offsets (mma_rows::load_strided), which Layout::narrow checks
      const int64_t cs = cs_of(w);
      return {mma_rows::load_strided(p, j, cs), mma_rows::load_strided(g, j, gcs_of(w)),
              mma_rows::load_strided(m, j, cs), mma_rows::load_strided(v, j, cs)};
    }
  }
  // Elements [j, j + V) of the row's stream x (p, m or v: their stride).
  __device__ __forceinline__ void put(T* x, const Row& w, int64_t j, const tile::Pack<T>& p) const {
    if constexpr (kVec) {
      tile::store_pack(x + j, p);
    } else {
      mma_rows::store_strided(x, j, cs_of(w), p);  // as load_bits
    }
  }
  // x' of those elements (w: row(), with its bias corrections); kStore: stores m, v.
  template <bool kStore = true>
  __device__ __forceinline__ void finish(const Row& w, int64_t j, const Bits& b, float (&x)[V]) const {
    float p[V], g[V], m[V], v[V];
    tile::unpack<T>(b.p, p);
    tile::unpack<T>(b.g, g);
    tile::unpack<T>(b.m, m);
    tile::unpack<T>(b.v, v);
    tile::Pack<T> pm, pv;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      float unused = 0.f;
      x[i] = update<false>(w, p[i], g[i], m[i], v[i], unused);
      pm.v[i] = static_cast<T>(m[i]);
      pv.v[i] = static_cast<T>(v[i]);
    }
    if (kStore) {
      put(m_of(w), w, j, pm);
      put(v_of(w), w, j, pv);
    }
  }

  // x' of elements [j, j + V) (0 at or past d); kFinal: stores m, v (v^).
  template <bool kFinal>
  __device__ __forceinline__ void load(const Row& w, int64_t j, int64_t d, float (&x)[V]) const {
    // amsgrad takes the element path: a fifth vector stream per slot spills at
    // the 128-register cap, and amsgrad is the rare case.
    if (kVec && j + V <= d && !h.amsgrad) {
      finish<kFinal>(w, j, load_bits(w, j), x);
    } else {  // model-cold-if: vec and not amsgrad (then only a row's ragged end)
#pragma unroll
      for (int i = 0; i < V; ++i) x[i] = j + i < d ? load1<kFinal>(w, j + i) : 0.f;
    }
  }
  template <bool kFinal>
  __device__ __forceinline__ float load1(const Row& w, int64_t j) const {
    const int64_t o = j * cs_of(w);
    T* m_ptr = m_of(w) + o;
    T* v_ptr = v_of(w) + o;
    float m = static_cast<float>(*m_ptr);
    float v = static_cast<float>(*v_ptr);
    // v^ at the row's offset in p (the streams share offsets)
    T* vmax_ptr = h.amsgrad ? reinterpret_cast<T*>(w.e->vmax) + (p_of(w) - reinterpret_cast<T*>(w.e->p)) + o
                            : nullptr;
    float vmax = h.amsgrad ? static_cast<float>(*vmax_ptr) : 0.f;
    const float p = static_cast<float>(p_of(w)[o]);
    const float g = static_cast<float>(g_of(w)[j * gcs_of(w)]);
    const float x =
        h.amsgrad ? update<true>(w, p, g, m, v, vmax) : update<false>(w, p, g, m, v, vmax);
    if (kFinal) {
      *m_ptr = static_cast<T>(m);
      *v_ptr = static_cast<T>(v);
      if (h.amsgrad) *vmax_ptr = static_cast<T>(vmax);
    }
    return x;
  }
  // p's elements [j, j + V) (j + V <= d).
  __device__ __forceinline__ void store_vector(const Row& w, int64_t j, const float (&x)[V]) const {
    tile::Pack<T> out;
#pragma unroll
    for (int i = 0; i < V; ++i) out.v[i] = static_cast<T>(x[i]);
    put(p_of(w), w, j, out);
  }
  __device__ __forceinline__ void store(const Row& w, int64_t j, int64_t d, const float (&x)[V]) const {
    T* p = p_of(w);
    if (kVec && j + V <= d) {
      store_vector(w, j, x);
    } else {  // model-cold-if: vec
      const int64_t cs = cs_of(w);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        if (j + i < d) p[(j + i) * cs] = static_cast<T>(x[i]);
      }
    }
  }
};

// The tensor-core kernel's rows policy, rows by their addresses, the update's root and
// quotient flushed ([flushed root]: the kernel runs only where fast_root(h)). Its own
// name: the kernels' names, which the model and the tests read, keep it.
template <typename T, bool kVec>
struct AdamWPolicy : AdamWPolicyBase<T, kVec, true, true> {};
// The row-tile engine's rows policy: every eps, so subnormals kept.
template <typename T, bool kVec>
struct AdamWRowsPolicy : AdamWPolicyBase<T, kVec, true, false> {};

// Transposed views (side="output"), as project.cu's ProjectBlockPolicy: 4 view rows
// a group, one vector of each of p, g, m, v at G's row j holding element j of all
// four rows, 4 elements of each row a thread (one slot: with 2, ptxas spilled 8-16 B
// at the 128-register cap), so d <= 1024 is fused. A block whose rows are not 4
// consecutive, aligned elements of one param at every j (its last rows, a
// misaligned view), and amsgrad, take the element path.
template <typename T>
struct AdamWBlockPolicy : AdamWPolicyBase<T, false, false, false> {
  using Base = AdamWPolicyBase<T, false, false, false>;
  using Row = typename Base::Row;
  using P = tile::Pack<T>;
  static constexpr int kRows = 4;
  static constexpr int kEpt = 4;
  static constexpr bool kBlock = true;
  static constexpr int V = P::kSize;
  static_assert(kRows == V, "one vector of G's row j holds element j of every row of the block");

  // Addresses only: the bias corrections are formed in load_block, once for a block (its
  // rows are one param's) rather than once for each of its 4 rows.
  __device__ Row row(int64_t row) const { return this->store_row(row); }  // model-uniform

  static __device__ bool aligned(int64_t address, int64_t stride) {
    const int64_t pack = sizeof(P);
    return address % pack == 0 && (stride * static_cast<int64_t>(sizeof(T))) % pack == 0;
  }
  // Rows rw[0..4) are rows o0 + r of one param (p, m, v offsets o0 + r, g offsets og0 + r:
  // unit row strides), every stream's first element aligned to a vector and its column
  // stride a whole number of vectors: then the vectors at G's row j are the elements
  // the element path reads.
  __device__ bool block_ok(const Row (&rw)[kRows], const bool (&valid)[kRows]) const {
    if (!valid[kRows - 1] || this->h.amsgrad) return false;
    const AdamWEntry& e = *rw[0].e;
    const int64_t size = sizeof(T);
    bool ok = aligned(e.p + rw[0].o * size, e.col_stride) &&
              aligned(e.m + rw[0].o * size, e.col_stride) &&
              aligned(e.v + rw[0].o * size, e.col_stride) &&
              aligned(e.g + rw[0].og * size, e.g_col_stride);
#pragma unroll
    for (int r = 1; r < kRows; ++r) {
      ok = ok && rw[r].e == rw[0].e && rw[r].o == rw[0].o + r && rw[r].og == rw[0].og + r;
    }
    return ok;
  }
  // x' of elements [j, j + 4) of the block's rows (x[r][v]: row r, element j + v; 0 at
  // or past d and for rows not valid); kFinal: stores m, v.
  template <bool kFinal>
  __device__ __forceinline__ void load_block(
      const Row (&rw)[kRows], const bool (&valid)[kRows], bool block, int64_t j, int64_t d,
      float (&x)[kRows][V]) const {
    if (block && j + V <= d) {
      const AdamWEntry& e = *rw[0].e;
      Row w = rw[0];
      this->add_bias(w);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const int64_t o = rw[0].o + (j + v) * e.col_stride;
        const int64_t og = rw[0].og + (j + v) * e.g_col_stride;
        const P pp = *reinterpret_cast<const P*>(reinterpret_cast<const T*>(e.p) + o);
        const P pg = *reinterpret_cast<const P*>(reinterpret_cast<const T*>(e.g) + og);
        P pm = *reinterpret_cast<const P*>(reinterpret_cast<const T*>(e.m) + o);
        P pv = *reinterpret_cast<const P*>(reinterpret_cast<const T*>(e.v) + o);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          float m = static_cast<float>(pm.v[r]);
          float v2 = static_cast<float>(pv.v[r]);
          float unused = 0.f;
          x[r][v] = this->template update<false>(
              w, static_cast<float>(pp.v[r]), static_cast<float>(pg.v[r]), m, v2, unused);
          pm.v[r] = static_cast<T>(m);
          pv.v[r] = static_cast<T>(v2);
        }
        if (kFinal) {
          *reinterpret_cast<P*>(reinterpret_cast<T*>(e.m) + o) = pm;
          *reinterpret_cast<P*>(reinterpret_cast<T*>(e.v) + o) = pv;
        }
      }
    } else {  // model-cold-if: block (with vectors, only the rows' ragged end)
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        Row w = rw[r];
        if (valid[r]) this->add_bias(w);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          x[r][v] = valid[r] && j + v < d ? this->template load1<kFinal>(w, j + v) : 0.f;
        }
      }
    }
  }
  // Stores p's elements [j, j + 4) of the block's valid rows that lie before d.
  __device__ __forceinline__ void store_block(
      const Row (&rw)[kRows], const bool (&valid)[kRows], bool block, int64_t j, int64_t d,
      const float (&x)[kRows][V]) const {
    if (block && j + V <= d) {
      const AdamWEntry& e = *rw[0].e;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        P out;
#pragma unroll
        for (int r = 0; r < kRows; ++r) out.v[r] = static_cast<T>(x[r][v]);
        *reinterpret_cast<P*>(reinterpret_cast<T*>(e.p) + rw[0].o + (j + v) * e.col_stride) = out;
      }
    } else {  // model-cold-if: block
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const AdamWEntry& e = *rw[r].e;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          if (valid[r] && j + v < d) {
            reinterpret_cast<T*>(e.p)[rw[r].o + (j + v) * e.col_stride] = static_cast<T>(x[r][v]);
          }
        }
      }
    }
  }
};

// Transposed views (side="output") of 16-bit params whose rows come in aligned pairs
// (Layout::pairs): the tensor-core kernel's lane takes view rows 2 g and 2 g + 1, one
// 32-bit load or store of p, g, m or v holding both rows' element at a column
// (mma_rows.cuh [row pairs]); the element paths are AdamWPolicy's.
template <typename T>
struct AdamWPairPolicy : AdamWPolicy<T, false> {
  using Base = AdamWPolicy<T, false>;
  using Row = typename Base::Row;
  using Bits = typename Base::Bits;
  static constexpr bool kRowPairs = true;
  static_assert(sizeof(T) == 2, "pairs of 16-bit elements");

  // p, g, m, v at elements [j, j + 4) of row w and the next: words 0-1 (lo) and 2-3 (hi)
  // of mma_rows::load_pair for each.
  __device__ __forceinline__ void load_pair_bits(const Row& w, int64_t j, Bits& lo, Bits& hi) const {
    mma_rows::split_pair(mma_rows::load_pair(w.p, j, w.cs), lo.p, hi.p);
    mma_rows::split_pair(mma_rows::load_pair(w.g, j, w.gcs), lo.g, hi.g);
    mma_rows::split_pair(mma_rows::load_pair(w.m, j, w.cs), lo.m, hi.m);
    mma_rows::split_pair(mma_rows::load_pair(w.v, j, w.cs), lo.v, hi.v);
  }
  // x' of both rows (w: row(), with its bias corrections; the rows share a param), m and v
  // stored as pairs.
  __device__ __forceinline__ void finish_pair(const Row& w, int64_t j, const Bits& lo, const Bits& hi,
                                              float (&x0)[4], float (&x1)[4]) const {
    float p[2][4], g[2][4], m[2][4], v[2][4];
    mma_rows::unpack_pair<T>(lo.p, hi.p, p[0], p[1]);
    mma_rows::unpack_pair<T>(lo.g, hi.g, g[0], g[1]);
    mma_rows::unpack_pair<T>(lo.m, hi.m, m[0], m[1]);
    mma_rows::unpack_pair<T>(lo.v, hi.v, v[0], v[1]);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float unused = 0.f;
      x0[i] = this->template update<false>(w, p[0][i], g[0][i], m[0][i], v[0][i], unused);
      x1[i] = this->template update<false>(w, p[1][i], g[1][i], m[1][i], v[1][i], unused);
    }
    mma_rows::store_pair(w.m, j, w.cs, m[0], m[1]);
    mma_rows::store_pair(w.v, j, w.cs, v[0], v[1]);
  }
  // p's elements [j, j + 4) of row w and the next.
  __device__ __forceinline__ void store_pair(const Row& w, int64_t j, const float (&x0)[4],
                                             const float (&x1)[4]) const {
    mma_rows::store_pair(w.p, j, w.cs, x0, x1);
  }
};

// One layout's params: their table entries and what the launch needs to know.
struct Layout {
  std::vector<AdamWEntry> entries;
  int64_t total_rows = 0;
  bool vec = true;
  bool narrow = true;  // every element offset within a row fits 32 bits (strided load_bits)
  bool pairs = true;   // transposed 16-bit views whose rows pair up (AdamWPairPolicy)
};

// 16-bit transposed views (side="output") take the block policy up to this many basis
// columns, the tensor cores beyond (see launch).
constexpr int64_t kBlockPolicyMaxK16 = 32;

// [flushed root] Whether the tensor-core kernel's update (AdamWPolicy: the SFU's root and
// quotient with subnormals flushed) forms the den the unflushed one does. A subnormal v^
// flushed to 0 (its root r < 2^-63) leaves den = FFMA(r, c, eps) = eps where r c is less
// than half an ulp of eps (which is more than eps 2^-25); c = 1 / sqrt(1 - b2^t) <=
// 1 / sqrt(1 - b2), so eps >= 2^-38 / sqrt(1 - b2) suffices, and 2^-37 leaves a factor 2
// for the roundings of c and of r. At b2 = 0.999 that is eps >= 2.3e-10 (torch's default
// is 1e-8). A smaller eps, and b2 = 1, take the row-tile engine, as amsgrad does.
bool fast_root(const Hyper& h) {
  return h.one_minus_beta2 > 0.0 &&
         static_cast<double>(h.eps) >= std::ldexp(1.0, -37) / std::sqrt(h.one_minus_beta2);
}

// The tensor-core kernel with AdamWPolicy<T, kVec> (mma_rows.cuh) on the basis columns
// [0, kc), then, where the basis takes more than one launch ([columns]), project.cu's
// anchored projection of the stepped params on the rest: the AdamW step is taken once.
// False, having done nothing, where the kernel does not take these rows.
template <typename T, bool kVec, class Policy = AdamWPolicy<T, kVec>>
bool run_tensor_cores(
    const Layout& l, const AdamWEntry* t, int n, const at::Tensor& basis, const float* weights,
    const Hyper& h) {
  const int64_t k = basis.size(1);
  const int64_t kc = mma_rows::columns_per_launch<Policy>(basis.size(0), k);
  // contiguous rows: fp32 from k = 9 (mma_rows::kMinAdamWRowsK); strided rows at every k
  if (h.amsgrad || !fast_root(h) || (kVec && k < mma_rows::kMinAdamWRowsK<T>) || kc == 0) {
    return false;
  }
  const AdamWPolicy<T, kVec> base{t, n, k, h};
  mma_rows::run_columns(Policy{base}, l.total_rows, basis, weights, /*anchored=*/true, 0, kc);
  if (kc < k) {
    std::vector<MatrixEntry> params;
    for (const AdamWEntry& e : l.entries) {
      params.push_back({e.p, e.rows, e.row_stride, e.col_stride, e.first_row, e.anchor});
    }
    mma_rows::project_anchored_from<T>(params, l.total_rows, kVec, mma_rows::RowPairs<Policy>::value,
                                       basis, weights, kc, kc);
  }
  return true;
}

// [wide] fp32 rows (contiguous, 16-byte aligned) wider than the AdamW tensor-core kernel
// takes (mma_rows::kMaxAdamWD, 1024) whose projection the tensor cores do take (up to
// mma_rows::kMaxD, 1280: SD's 1280-channel blocks): the AdamW step alone (the rows engine
// with none of the basis columns: p, g, m, v (v^) read once, p, m, v (v^) written once, a
// fused AdamW), then project.cu's anchored projection of p on tensor cores, which reads
// and writes p once more: 9 streams against a fused AdamW's 7, where the FMA engine
// restaged U^T a chunk per 4-row tile (k = 32 at d = 1280 3.46x / 4.99x torch's fused
// AdamW, A100 / H100, predicted). fp32 only: p holds x' exactly, so the projection sees
// the x' the fused kernel would (a 16-bit p would be rounded once more before it).
// Amsgrad's fifth stream is the step's. False, having done nothing, elsewhere.
template <typename T>
bool step_then_project(const Layout& l, const AdamWEntry* t, int n, const at::Tensor& basis,
                       const float* weights, const Hyper& h) {
  if constexpr (!std::is_same_v<T, float>) {
    return false;
  } else {
    const int64_t d = basis.size(0);
    const int64_t k = basis.size(1);
    if (d <= mma_rows::kMaxAdamWD || k < mma_rows::kMinAdamWRowsK<T>) return false;
    const int64_t kc = mma_rows::columns_per_launch(d, k, mma_rows::kMaxD);
    if (kc == 0) return false;
    const at::Tensor none = basis.narrow(1, 0, 0);  // the step: no basis columns
    tile::run_rows(AdamWRowsPolicy<T, true>{t, n, k, h}, l.total_rows, none, nullptr);
    std::vector<MatrixEntry> params;
    for (const AdamWEntry& e : l.entries) {
      params.push_back({e.p, e.rows, e.row_stride, e.col_stride, e.first_row, e.anchor});
    }
    mma_rows::project_anchored_from<T>(params, l.total_rows, /*vector_rows=*/true,
                                       /*pairs=*/false, basis, weights, kc, 0);
    return true;
  }
}

// [bias] Each param's bias corrections for this step, once a launch, in fp64 from its
// step count on the device (as kernels/adamw.py): beta^t = exp(t log(1 - (1 - beta)));
// 1 - b2^t is 1e-3 at t = 1. Every row's lookup formed them before (P::row, the [row
// cache]'s warp 0): about 630 warp instructions a tile on that warp beside the 1900 of each
// warp, which then waited for it at the tile's barriers (bf16 k = 32, sm_80, predicted;
// docs/gpu.md [busiest-warp]).
__global__ void bias_kernel(const AdamWEntry* table, int n, Hyper h) {
  const int stride = static_cast<int>(gridDim.x * blockDim.x);
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {  // model-trips: 1
    const double t = static_cast<double>(*reinterpret_cast<const float*>(table[i].step));
    const double bias1 = 1.0 - exp(t * log(1.0 - h.one_minus_beta1));
    const double bias2 = 1.0 - exp(t * log(1.0 - h.one_minus_beta2));
    h.bias[2 * i] = static_cast<float>(h.lr / bias1);
    h.bias[2 * i + 1] = static_cast<float>(1.0 / sqrt(bias2));
  }
}

template <typename T>
void launch(
    const Layout& l, bool cols, bool flat, const at::Tensor& basis, const float* weights,
    const Hyper& step) {
  if (l.entries.empty()) return;
  const DeviceTable<AdamWEntry> table(l.entries, basis.device());
  const AdamWEntry* t = table.data();
  const int n = table.size();
  const int64_t k = basis.size(1);
  // [bias] this step's bias corrections, 8 bytes a param, before any row reads them
  const at::Tensor bias =
      at::empty({2 * static_cast<int64_t>(n)}, basis.options().dtype(at::kFloat));
  Hyper h = step;
  h.bias = bias.data_ptr<float>();
  launch_kernel(bias_kernel, (n + 255) / 256, 256, 0, t, n, h);
  if (cols) {
    // fp32 on tensor cores with strided rows (as project.cu's transposed views); 16-bit
    // rows too where they pair up ([row pairs]: one 32-bit word holds two rows' element).
    // Other 16-bit rows up to k = kBlockPolicyMaxK16 stay on the block policy: their
    // strided form packs each pair of 2-byte loads into a register as soon as they arrive
    // (255 registers), so few loads are in flight (latency-bound: 1.03x -> 1.47x torch's
    // AdamW at k = 1 on an A100, predicted). Beyond, the block policy's FMA projection
    // costs more (issue-bound, and U^T restaged per tile where it does not fit: k = 128
    // 13.85x / 20.00x against 2.52x / 3.11x on tensor cores, A100 / H100; at k = 32 1.91x
    // / 2.15x against 1.53x / 2.25x, so it stays).
    if constexpr (sizeof(T) == 2) {
      if (l.narrow && l.pairs && basis.size(0) <= mma_rows::kMaxPairD<AdamWPairPolicy<T>> &&
          run_tensor_cores<T, false, AdamWPairPolicy<T>>(l, t, n, basis, weights, h)) {
        return;
      }
    }
    if (std::is_same_v<T, float> || k > kBlockPolicyMaxK16) {
      if (l.narrow && run_tensor_cores<T, false>(l, t, n, basis, weights, h)) return;
    }
    tile::run_rows(AdamWBlockPolicy<T>{{t, n, k, h}}, l.total_rows, basis, weights);
  } else if (l.vec) {
    // Tensor cores for rows (not flat vectors; d <= 1280, fp32 1024); amsgrad (a fifth stream)
    // stays on the FMA engine.
    if (!flat && run_tensor_cores<T, true>(l, t, n, basis, weights, h)) return;
    if (!flat && step_then_project<T>(l, t, n, basis, weights, h)) return;
    tile::run_rows(AdamWRowsPolicy<T, true>{t, n, k, h}, l.total_rows, basis, weights);
  } else {
    tile::run_rows(AdamWRowsPolicy<T, false>{t, n, k, h}, l.total_rows, basis, weights);
  }
}

void projected_adamw_bucket_cuda(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
    at::TensorList anchors, const at::Tensor& basis, const std::optional<at::Tensor>& weights,
    c10::string_view side, double lr, double beta1, double beta2, double eps,
    double weight_decay, bool maximize) {
  const Side s = check_adamw_bucket(
      params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, anchors, basis, weights,
      side, GRADPROJ_CUDA_DEVICE_TYPE);
  if (params.empty()) return;
  const bool amsgrad = !max_exp_avg_sqs.empty();
  const bool flat = s == Side::kFlat;
  const int64_t d = basis.size(0);
  // Transposed views (side="output") run in the cols layout, the rest in the rows
  // layout (as project.cu); one launch per layout present.
  Layout by_rows;
  Layout by_cols;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const int64_t rows = flat ? 1 : p.size(0);
    const int64_t row_stride = flat ? 0 : p.stride(0);
    const int64_t col_stride = flat ? p.stride(0) : p.stride(1);
    const int64_t g_row_stride = flat ? 0 : g.stride(0);
    const int64_t g_col_stride = flat ? g.stride(0) : g.stride(1);
    const bool transposed = !flat && row_stride == 1 && col_stride != 1 && rows > 1 && d > 1;
    Layout& l = transposed ? by_cols : by_rows;
    const int64_t d_view = p.size(flat ? 0 : 1);
    l.narrow = l.narrow && mma_rows::narrow_offsets(d_view, col_stride) &&
               mma_rows::narrow_offsets(d_view, g_col_stride);
    l.vec = l.vec && tile::vector_rows(p, row_stride, col_stride, rows) &&
            tile::vector_rows(g, g_row_stride, g_col_stride, rows) &&
            tile::vector_rows(exp_avgs[i], row_stride, col_stride, rows) &&
            tile::vector_rows(exp_avg_sqs[i], row_stride, col_stride, rows) &&
            (!amsgrad || tile::vector_rows(max_exp_avg_sqs[i], row_stride, col_stride, rows));
    l.pairs = l.pairs && !amsgrad && mma_rows::pair_rows(p, row_stride, col_stride, rows) &&
              mma_rows::pair_rows(g, g_row_stride, g_col_stride, rows) &&
              mma_rows::pair_rows(exp_avgs[i], row_stride, col_stride, rows) &&
              mma_rows::pair_rows(exp_avg_sqs[i], row_stride, col_stride, rows);
    l.entries.push_back(
        {reinterpret_cast<int64_t>(p.data_ptr()), reinterpret_cast<int64_t>(g.data_ptr()),
         reinterpret_cast<int64_t>(exp_avgs[i].data_ptr()),
         reinterpret_cast<int64_t>(exp_avg_sqs[i].data_ptr()),
         amsgrad ? reinterpret_cast<int64_t>(max_exp_avg_sqs[i].data_ptr()) : 0,
         reinterpret_cast<int64_t>(anchors[i].data_ptr<float>()),
         reinterpret_cast<int64_t>(steps[i].data_ptr<float>()), rows, row_stride, col_stride,
         g_row_stride, g_col_stride, l.total_rows});
    l.total_rows += rows;
  }
  const Hyper h{
      lr,
      1.0 - beta1,
      1.0 - beta2,
      static_cast<float>(beta1),
      static_cast<float>(beta2),
      static_cast<float>(eps),
      static_cast<float>(1.0 - lr * weight_decay),
      maximize ? -1.f : 1.f,
      amsgrad};
  const float* w = weights.has_value() ? weights->data_ptr<float>() : nullptr;
  dispatch_dtype(basis.device(), params[0].scalar_type(), "projected AdamW", [&](auto dtype) {
    using T = typename decltype(dtype)::type;
    launch<T>(by_rows, /*cols=*/false, flat, basis, w, h);
    launch<T>(by_cols, /*cols=*/true, flat, basis, w, h);
  });
}

}  // namespace
}  // namespace gradproj::cuda

#ifdef GRADPROJ_CUDA_EMULATION
TORCH_LIBRARY_IMPL(gradproj_emu, CPU, m) {
#else
TORCH_LIBRARY_IMPL(gradproj, CUDA, m) {
#endif
  m.impl("projected_adamw_bucket_", &gradproj::cuda::projected_adamw_bucket_cuda);
}
