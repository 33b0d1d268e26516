// Tensor-core primitives for csrc/cuda (sm_80 and newer): the split of an fp32
// value into two tf32 values, and mma.sync m16n8k8 tf32.
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

// [truncated] The split of an operand whose product ends in a 16-bit result (bf16/fp16
// projection rows): hi = x with its low 13 bits cleared (tf32 truncated) and lo = x - hi
// exactly: one LOP and one FADD where split takes three instructions. |lo| < 2^-10 |x|
// (truncation leaves up to a tf32 ulp, where rounding leaves half), so the low bits the
// tensor cores drop from lo bound the error by 2^-20 |x| (split: 2^-21), 2^11 below a
// bf16 result's rounding (2^-9). Not for fp32 results: their tests and the anchored
// guarantee are budgeted on split's bound. (hi as x's own bits, which the tensor cores
// read truncated anyway, saves the LOP but not an instruction: an MMA's operand pair must
// sit in adjacent registers, and ptxas moved x's there, 21 moves a k-step of bf16
// k = 32 on sm_80.) NaN and infinite x give a NaN lo, as split.
__device__ __forceinline__ Split split_truncated(float x) {
  const uint32_t hi = __float_as_uint(x) & 0xffffe000u;
  return {hi, __float_as_uint(x - __uint_as_float(hi))};
}

// [3xTF32] x split as split, or as split_truncated where kTruncated ([truncated]).
template <bool kTruncated>
__device__ __forceinline__ Split split_as(float x) {
  if constexpr (kTruncated) {
    return split_truncated(x);
  } else {
    return split(x);
  }
}

// [3xTF32] An A fragment's four values split: hi[q] + lo[q] = v[q] (as split_as).
template <bool kTruncated = false>
__device__ __forceinline__ void split4(const float (&v)[4], uint32_t (&hi)[4], uint32_t (&lo)[4]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const Split sp = split_as<kTruncated>(v[q]);
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

}  // namespace gradproj::cuda::mma
