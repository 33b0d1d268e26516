// Tensor-core primitives for csrc/cuda (sm_80 and newer): the split of an fp32
// value into two tf32 values, and mma.sync m16n8k8 tf32; [bf16] the split into two
// bf16 values, mma.sync m16n8k16 bf16 and ldmatrix.
//
// [3xTF32] An fp32 product a * b on tf32 tensor cores keeps fp32 accuracy when each
// operand is split into hi = tf32(x) (round to nearest) and lo = tf32(x - hi):
//   a * b ~= a_lo * b_hi + a_hi * b_lo + a_hi * b_hi
// (the dropped a_lo * b_lo is below 2^-22 |a b|, lo's low bits below 2^-21 |a b|;
// the partial products are exact in fp32, the accumulation is fp32). bf16 and fp16 values are tf32 values already
// (8 and 11 significant bits, exponents inside tf32's), so a 16-bit operand needs
// no split: two products instead of three.
//
// [sums] The tensor cores do not round an MMA's sum C + A B to nearest: they align the
// products and truncate (Fasi, Higham, Mikaitis, Pranesh 2021), half an fp32 ulp of
// bias an MMA on average. A chain of n MMAs into one accumulator drifts by about
// n 2^-24 of its magnitude: fp32 rows of d = 768 at k = 768, whose x was the accumulator
// of 288 MMAs, came out 1.6e-5 relative off the float64 reference on an H200 (measured,
// 2026-12-04). So where the result is stored in fp32, each short chain (one block's
// MMAs) starts from zero (mma_tf32_zero) and is added to its sum with an fp32 add,
// rounded to nearest: the sum's error is then an fp32 sum's.
#pragma once

#include <cstdint>

#ifndef GRADPROJ_CUDA_EMULATION
#include <cuda_runtime.h>
#endif

namespace gradproj::cuda::mma {

// [3xTF32] x = hi + lo: hi the tf32 value nearest to x (ties away from zero, as
// cvt.rna.tf32.f32: half a tf32 ulp added, the low 13 bits cleared; one IADD and one
// LOP, where ptxas expands cvt.rna.tf32.f32 into six instructions on sm_80 and sm_90),
// lo = x - hi exactly (fp32). lo goes to the tensor cores as it is: they read an
// operand's tf32 bits and ignore its low 13 (what CUTLASS's round_half_ulp_truncate
// relies on), within 2^-21 |x| of lo. A NaN x gives a NaN lo (hi may be anything), an
// infinite x a NaN lo: the products, and so the row, are not finite.
struct Split {
  uint32_t hi;
  uint32_t lo;
};
__device__ __forceinline__ Split split(float x) {
  const uint32_t hi = (__float_as_uint(x) + 0x1000u) & 0xffffe000u;
  return {hi, __float_as_uint(x - __uint_as_float(hi))};
}

// [3xTF32] An A fragment's four values split: hi[q] + lo[q] = v[q] (as split).
__device__ __forceinline__ void split4(const float (&v)[4], uint32_t (&hi)[4], uint32_t (&lo)[4]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const Split sp = split(v[q]);
    hi[q] = sp.hi;
    lo[q] = sp.lo;
  }
}

// d += A B for one m16n8k8 tile (fragments as in PTX's "Matrix Fragments for
// mma.m16n8k8", g = lane / 4, t = lane % 4): a = A[g][t], A[g+8][t], A[g][t+4],
// A[g+8][t+4]; b = B[t][g], B[t+4][g]; d = D[g][2t], D[g][2t+1], D[g+8][2t],
// D[g+8][2t+1]. A warp collective: every lane of the warp calls it, converged.
__device__ __forceinline__ void mma_tf32(
    float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef GRADPROJ_CUDA_EMULATION
  ::gradproj_emu::mma_m16n8k8_tf32(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  // tf32 MMAs need sm_80: a build that also targets older GPUs compiles, and the
  // launcher never runs a tensor-core kernel there (mma_rows::run declines).
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// d = A B for one m16n8k8 tile: mma_tf32 with C = 0 (ptxas takes RZ, no zeroing moves).
// [sums] A chain of MMAs that starts here and is added to its destination with one fp32
// add keeps the tensor cores' truncation to that chain (see below).
__device__ __forceinline__ void mma_tf32_zero(
    float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef GRADPROJ_CUDA_EMULATION
  d[0] = d[1] = d[2] = d[3] = 0.f;
  ::gradproj_emu::mma_m16n8k8_tf32(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(0.f));
#endif
}

// [bf16] bf16 operands on mma.sync m16n8k16 (16-bit inputs, fp32 accumulation): a 16 x 8
// x 16 tile an instruction where tf32 takes 16 x 8 x 8, at the same issue cost and twice
// tf32's rate on the tensor cores. An fp32 value v is split as [3xTF32] but into bf16:
// hi = bf16(v) (to nearest even), lo = bf16(v - hi) (v - hi exact in fp32), within
// 2^-17 |v| of v; a product's hi hi + hi lo + lo hi then within about 2^-16 |a b|, far
// below a bf16 result's rounding (2^-9). bf16 gradients are bf16 values already.

// The bf16 pair {lo, hi} (lo in the low half) of two fp32 values that are bf16 values
// (their low 16 bits zero): their high halves, one PRMT.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  return (__float_as_uint(lo) >> 16) | (__float_as_uint(hi) & 0xffff0000u);
}

// {bf16(lo), bf16(hi)} rounded to nearest even (cvt.rn.bf16x2.f32, one instruction).
__device__ __forceinline__ uint32_t round_bf16x2(float lo, float hi) {
#ifdef GRADPROJ_CUDA_EMULATION
  auto round = [](float v) -> uint32_t {
    const uint32_t bits = __float_as_uint(v);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (bits >> 16) | 0x40u;  // NaN stays NaN
    return (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  };
  return round(lo) | (round(hi) << 16);
#else
  uint32_t d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
#endif
}

// [bf16] v = hi + lo for two values, as bf16 pairs (lo's pair from v - hi).
__device__ __forceinline__ void split_bf16x2(float v0, float v1, uint32_t& hi, uint32_t& lo) {
  hi = round_bf16x2(v0, v1);
  lo = round_bf16x2(v0 - __uint_as_float(hi << 16), v1 - __uint_as_float(hi & 0xffff0000u));
}

// d += A B for one m16n8k16 bf16 tile (PTX's "Matrix Fragments for mma.m16n8k16", g = lane
// / 4, t = lane % 4, a register's low half the lower index): a = A[g][2t, 2t+1],
// A[g+8][2t, 2t+1], A[g][2t+8, 2t+9], A[g+8][2t+8, 2t+9]; b = B[2t, 2t+1][g],
// B[2t+8, 2t+9][g]; d as mma_tf32's. A warp collective.
__device__ __forceinline__ void mma_bf16(
    float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef GRADPROJ_CUDA_EMULATION
  ::gradproj_emu::mma_m16n8k16_bf16(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Four 8 x 8 matrices of 16-bit values from shared memory (ldmatrix .x4): lanes 8 i ..
// 8 i + 7 give `row`, the 16-byte aligned address of rows 0..7 of matrix i; r[i] of lane
// (g, t) is M_i[g][2t, 2t+1], with kTrans M_i[2t, 2t+1][g]. A warp collective.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#ifdef GRADPROJ_CUDA_EMULATION
  ::gradproj_emu::ldmatrix_x4(r, row, kTrans);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 750
  __trap();
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
#endif
}

}  // namespace gradproj::cuda::mma
