// Tensor-core row tiles: x <- x - U f(U^T x) for every row x of a bucket, both
// small GEMMs on mma.sync m16n8k8 tf32 (cuda/mma.cuh), for rows of d <= 1280
// elements (AdamW's: 1024; [wide]) whose basis fits in shared memory: project.cu's
// gradient rows, and adamw.cu's rows, whose x is the AdamW-updated param x' formed as
// the tile is loaded.
//
// [policy] P says how a row's vector of 4 columns is read and what it becomes:
//   Bits, load_bits(row, j): the raw bits of the vector(s) at columns [j, j + 4), one
//     aligned load per stream (a gradient: 1; AdamW: p, g, m, v);
//   finish(row, j, bits, x): their fp32 values to project (AdamW: x', with m and v
//     stored then; its row() carries the bias corrections, so kUpdates asks for it);
//   kExactTf32: those values are tf32 numbers (16-bit gradients), pass 1 needs no split;
//   kPrefetch: 16-bit rows keep the next tile's Bits in registers ([prefetch]);
//   kVector: a row's vectors are contiguous (else strided: transposed views);
//   row / store_row (addresses only) / anchor_row, load<true> (the element path of a
//   ragged vector), store / store_vector (the result: the gradient, or p).
//
// Why: the FMA engine (cuda/tile.cuh) issues about 2k FMAs per element plus
// their shared-memory reads, so from k = 32 it is bound by instruction issue
// (predicted 49-56 % of copy fp32, 24-27 % bf16) and at k = 128 by latency.
// A tensor-core tile of 16 rows x 8 columns x 8 coefficients costs one
// instruction (three for fp32's [3xTF32] split), so the kernel stays memory-bound.
//
// [tile] A CTA of 8 warps ([16 warps]: 16) holds 16 rows in registers. Warp w owns the column
//   blocks [w NB, (w + 1) NB) of 16 columns; lane (g, t) = (lane / 4, lane % 4)
//   holds columns 16 b + 4 t + [0, 4) of rows g and g + 8 of each block b, one
//   vector load each (a quad of lanes reads 64 contiguous bytes of fp32 per row).
//   Every element is read once and written once.
// [pass 1] a = U^T x, chunks of 16 coefficients, computed transposed: per block,
//   8 columns (a k-step) and 8 rows h (an n8 tile), C = U^T X^T with A = U^T
//   (16 coefficients x 8 columns) and B = X^T (8 columns x 8 rows). The order of
//   the columns inside a block is free in a sum over columns, so k-step s takes
//   columns 4 t + s and 4 t + s + 2 as K indices t and t + 4: B's registers for
//   lane (g, t) are x[b][h][s] and x[b][h][s + 2] of row g + 8 h, the very pair
//   pass 2 accumulates into. (Pass 1 with x as A needed the rows interleaved in a
//   register quad, pass 2's accumulator the columns: ptxas copied 8 registers
//   in and 8 out around each pass-2 block, 0.23 of the 1.98 instructions per
//   element of bf16 k = 32 on sm_80.) The 8 warps' partial sums (16 x 16 a chunk)
//   are added in warp order through shared memory (deterministic, no atomics);
//   one thread per (row, coefficient) finishes it (as tile::finish_coef: weights,
//   anchors) into the coefficient tile cs (16 x kp, [coefficients]).
// [pass 2] x -= U c per block: the accumulator C of two n8 tiles is x itself. The
//   columns of an n8 tile are free too: tile X in {0, 1} takes columns
//   4 (p / 2) + 2 (p % 2) + X as its column p, so lane (g, t)'s accumulator
//   (D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1]) is its own x at columns
//   4 t + X and 4 t + 2 + X. A = -c (16 rows x 8 coefficients), B = U^T.
// [basis] U is staged once per CTA (the grid is persistent) in fragment order
//   (device_cache.cuh pack_basis, BasisLayout::kMmaFragments): 128 floats per
//   (8 coefficients j, block b of 16 basis rows), group major ([offsets]), a 16 x 8 sub-block whose
//   element (r, c) is float 4 unit(r / 4, c) + r % 4, unit(a, c) =
//   8 a + (c ^ f(a)), f(a) = 4 (a % 2) + 2 (a / 2). Pass 1's lane reads the
//   float4 unit(t, g) of groups 2c and 2c + 1 (U rows 4t..4t+3, coefficient g:
//   its A of both k-steps);
//   pass 2's reads the float2s at 4 unit(g / 2, t + 4 h) + 2 (g % 2), h = 0, 1
//   (U rows 4 (g / 2) + 2 (g % 2) + X, coefficients t and t + 4: its B of both
//   tiles). The swizzle f makes both conflict-free: each quarter-warp of the
//   128-bit reads and each half-warp of the 64-bit reads hits distinct banks.
// [precision] fp32 operands are split (cuda/mma.cuh [3xTF32]); 16-bit x is
//   exact in tf32, so pass 1 takes U_hi x + U_lo x. Accumulation is fp32. Where the
//   result is 16-bit (bf16/fp16 projection rows) the split truncates (mma.cuh
//   [truncated]: 2 instructions a value, not 3).
// [pairs] 16-bit rows (x exact in tf32; fp32: [fp32 pairs]) whose U fits shared memory twice
//   stage it split, hi beside lo ([3xTF32], BasisLayout::kMmaPairs; k padded to 16): neither
//   pass splits U. The split was 3 instructions a value, 0.39 of bf16 k = 32's 1.59 warp
//   instructions per element on sm_90. A unit (float4) of a block's chunk of 16
//   coefficients holds coefficients q and q + 8 of basis rows 4a + e and 4a + e + 2
//   (q < 8, a < 4, e < 2), at 8 q + ((4 e + a) ^ f(q)): pass 1's k-step s reads unit
//   (gq, s, tq), which is lane's A quad as it stands; pass 2's k-steps take coefficients
//   {0-3, 8-11} and {4-7, 12-15} of each chunk (K indices tq and tq + 4 are q and q + 8),
//   so its B pair for tile X is half gq % 2 of unit (4 (s % 2) + tq, X, gq / 2). (With U's
//   fragment layout the operand quads came from shared-memory vectors in the wrong order
//   and ptxas copied them: 0.33 instructions per element of moves.) f makes pass 1's
//   quarter-warps and pass 2's half-warps conflict-free. Not for anchored rows: with the
//   doubled staging their anchor loads made the kernel latency-bound (bf16 k = 32 on
//   H100: 84 % -> 72 % of copy, predicted).
// [raw pairs] The other 16-bit projection rows of k > 8 (U does not fit twice, as on an
//   A100 at k = 32, d = 768; or the rows are anchored) stage U once, unsplit, in the pairs'
//   order (BasisLayout::kMmaRawPairs: block b's 64 units on), and split each value where
//   they use it, truncated (mma.cuh [truncated]: 2 instructions, their error far below a
//   16-bit result's rounding). In the fragments' order the split's truncated hi, which
//   ptxas hands the tensor cores as the loaded value itself (they ignore its low 13 bits),
//   lay in the wrong registers for the operand quad: 63 moves a block and chunk of bf16
//   k = 32 on sm_80, which ate most of what the truncation saved. Only where k padded to
//   16 is k padded to 8 (k = 17-24 would take a fourth k-step in pass 2). AdamW's 16-bit
//   rows too (kRawPairsAt), x' split truncated as well: docs/gpu.md [adamw-raw-pairs].
// [stacked] 16-bit projection rows of a launch of k <= 8 columns (one group: pass 1's M of
//   16 coefficients half zero, [pass 1]) stage U split, hi as group 0 and lo as group 1 of
//   the fragment layout (BasisLayout::kMmaStacked, kp = 16): pass 1's A, rows gq and
//   gq + 8, is then U_hi and U_lo of coefficient gq, so one MMA a k-step and row half forms
//   both products (U_hi x in rows 0-7 of C, U_lo x in rows 8-15; the finishing thread of
//   coefficient q adds the sum of q + 8, a shuffle), where two MMAs and a split of U (3
//   instructions a value) did; pass 2 reads B hi and lo from the two groups instead of
//   splitting it, one k-step (steps: 1). The sums of U_hi x and U_lo x are kept apart until
//   then (fp32, as [sums] would have them). bf16 k = 8 at d = 768 (sm_90, --lines): the
//   split and the second MMA were 0.16 of 0.77 warp instructions an element. Its own
//   instantiation (kStacked): as a run-time flag of the fragment kernels, the branches cost
//   the 16-bit kernels of k > 8 0.3-0.4 warp instructions an element (sm_80, bf16 k = 32).
// [offsets] The staged basis is group major (fragments: group j of 8 coefficients, then
//   block) or chunk major (pairs: chunk c of 16, then block, then hi and lo), so the blocks
//   a warp reads in one chunk lie at fixed distances (fragments: a block 512 B on; pairs:
//   2 KiB, a block's lo 1 KiB after its hi): each pass takes one lane pointer a chunk and
//   immediate offsets, 32-bit. Block major, with the chunk count a run-time stride, every
//   load had computed its address, in 64 bits: at bf16 k = 32 (sm_90) the shared-memory
//   loads and their addresses were 0.37 of 1.39 warp instructions per element, of which the
//   loads were 0.09.
// [coefficients] The finishing thread stores -c split (hi, lo: [3xTF32]) in pass 2's A
//   fragment order (coef_slot), so a warp's k-step reads its A as two 16-byte loads, where
//   each of the CTA's warps had read 4 values, negated and split them. (Stored as (hi, lo)
//   pairs, the hi values came in the wrong registers for the MMA's operand quad and ptxas
//   copied them, 8 moves a block and k-step.)
// [columns] Where U does not fit shared memory (k = 128 at d = 768 needs 384 KiB), the
//   columns are taken a block at a time, one launch each (columns_per_launch: the fewest
//   launches): x <- (I - U_n W_n U_n^T) ... (I - U_1 W_1 U_1^T) x. U's columns are
//   orthonormal (the ops' contract), so U_j^T U_i = 0 for i != j and the product is
//   I - U W U^T: launch j's coefficients U_j^T x see x after the earlier launches,
//   which changed it only inside span(U_1 .. U_{j-1}), and equal U_j^T x of the input
//   (anchored: U_j^T x - C_j likewise; the anchors and weights of launch j are the
//   columns [c0, c0 + kc) of each row's). Each launch reads and writes the rows once
//   (16-bit rows: one more rounding each), against the FMA engine's issue- and
//   latency-bound k = 128 (tile.cuh; the Triton kernels take chunks of k the same way).
// [row pairs] Strided 16-bit rows (transposed views: view row i is column i of G, so rows
//   i and i + 1 are adjacent 2-byte elements at every column) whose rows come in aligned
//   pairs (P::kRowPairs; project.cu's launch_cols checks every view: an even number of
//   rows, 4-byte aligned, an even column stride) give lane (g, t) the tile rows 2 g and
//   2 g + 1 as its MMA rows g and g + 8: one 32-bit load holds both rows' element at a
//   column (load_pair), where each 2-byte load took a register and a PRMT to pack, and a
//   quad column's 8 lanes read one 32-byte sector. The MMAs, the partial sums and the
//   coefficient tile stay in MMA rows; only the rows' addresses (loads, stores, the
//   finishing thread's anchor row: tile_row) map them. Predicted at d = 768, bf16 k = 32
//   (A100 / H100): see docs/gpu.md.
// [wide] The projection's rows of 1024 < d <= 1280 (SD's 1280-channel blocks) take 10
//   blocks a warp (kMaxRowD): x is 80 registers a thread, no prefetch of the next tile
//   beside it (kPrefetchTile stops at 8 blocks; 16-bit rows load their own tile's bits
//   at once instead: kBatchLoad), no spills (sm_80, sm_90). The
//   FMA engine they took before restaged U^T a chunk per 4-row tile from d = 1025 at
//   k = 32 (U^T is 160 KiB at d = 1280, above tile::kResidentBytes). AdamW keeps 1024: its
//   kernels reach 255 registers at 8 blocks. Past 1280 x does not fit the registers of 8
//   warps beside the operands (fp32 at 12 blocks: 96 registers of x).
// [16 warps] 16-bit projection rows of 513-1024 columns (contiguous, strided, and in row
//   pairs to 768) take a CTA of 16 warps over the same 16 rows, 3 or 4 blocks a warp,
//   compiled for one CTA an SM (at most 128 registers: 100-128, no spills, sm_80 and sm_90).
//   On 8 warps those rows hold 6-8 blocks a warp and the next tile's vectors, 176-182
//   registers, one CTA of 8 warps an SM: each warp issues about once every 8 cycles
//   (measured on an H200), so 8 warps left the SM's schedulers idle (bf16 k <= 8 at
//   d = 768: 39-40 % of copy measured, 38 % predicted), and compiled for two such CTAs
//   (128 registers) they spilled 120-248 B. 16 warps hold half the tile each, so 16 warps
//   an SM fit, with one staged basis. The partial sums take 16 tiles (8 KiB more: a launch
//   takes 16 warps only where they fit beside its columns, else 8); lanes l and l + 16 of
//   warp r add 8 warps' sums each for coefficient l of row r, a shuffle adds the halves,
//   and lane l finishes it (each warp's share of the finishing). 5 blocks a warp (1025-1280
//   columns) spilled 36-124 B at 128 registers, so those rows keep 8 warps of 10 blocks
//   (row pairs: 4 blocks spilled 12 B on sm_80, so they take 16 warps up to 768 columns);
//   fp32 rows too: transposed views (140 registers on 8 warps: one CTA an SM) always, and
//   contiguous rows where two 8-warp CTAs of 128 registers do not fit the SM's shared
//   memory beside their staged bases (94-114 registers on 16 warps, no spills; predicted
//   fp32 k = 32 at d = 768 on an A100: side input 39 -> 67 %, transposed views 33 -> 57 %).
//   AdamW's rows too, without the [prefetch] (on 16 warps the next tile's four 16-bit
//   streams beside x' spilled 320-1744 B): each thread loads its own tile's p, g, m, v, a
//   row's 3 blocks at a time (4 blocks: two at a time, all 4 spilled 72 B on sm_90; fp32: a
//   block at a time; [row pairs]: a block of both rows at a time, all 3 spilled 84-100 B),
//   114-128 registers, no spills (sm_80, sm_90): contiguous and strided rows to 1024
//   columns, row pairs to 768 (their kMaxPairD), fp32 contiguous rows to 768 (4 blocks a
//   block at a time still spilled 4 B on sm_90). On 8 warps they take 244-255 registers,
//   one CTA of 8 warps an SM.
// [row cache] A tile's rows are looked up once a CTA: lanes of one warp find its 16
//   rows in the device table (a binary search over its entries, then the row's address;
//   AdamW: its [bias] pair too, P::row) and put each row's P::Row and anchor in
//   shared memory, ahead of the tile; every warp's loads, prefetch, stores and finishing
//   threads read them there. Every warp looked up its own rows before, twice a tile (the
//   prefetch, the stores; AdamW: fp64 bias corrections each time) and the finishing
//   threads their anchors a chunk: at 16 warps that was 0.12 of bf16 k = 8's 1.22 warp
//   instructions an element at d = 768 (sm_90, predicted). The warp that looks up is the
//   tile's straggler (docs/gpu.md [busiest-warp]: 135 warp instructions a tile on top of
//   the 590 of a warp of bf16 k = 8, 16 warps, sm_90; AdamW's fp64 bias corrections
//   more), so the projections' lookups are the last warp's, which holds the fewest blocks
//   (none at d = 320: warp 7), its 32 lanes two tiles at once, every other tile (16
//   lanes cost a warp the instructions 32 do; kLookupTiles, kLookupWarp: where that
//   spilled, one tile, AdamW's warp 0; the prologue's second tile the last warp's). Slots: tile t's rows are
//   written at the start of the iteration two before its own (its lookup's), read by the
//   prefetch one before and by its own iteration; a warp may still be storing the
//   previous tile, so a lookup writes no slot of tiles it - 1 .. it + 1: four for one tile
//   a lookup (AdamW's 64-byte rows), eight for two (tiles it + 2, it + 3 at even it; the
//   16-byte rows of the projections, in the bytes AdamW's four take). A slot is written
//   again only after a barrier that follows its last read (the pass-1 barriers of the
//   iterations between). (Two tiles after the first pass-1 barrier, four slots: x is live
//   there, and 54 kernels spilled 8-20 B.)
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cuda/device_cache.cuh"
#include "cuda/launch.cuh"
#include "cuda/mma.cuh"
#include "cuda/multi_tensor.cuh"
#include "cuda/tile.cuh"

namespace gradproj::cuda::mma_rows {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// [16 warps] The CTA of 16-bit projection rows wider than 512 columns.
constexpr int kWideWarps = 16;
constexpr int kTileRows = 16;    // the mma's M
constexpr int kCoefChunk = 16;   // pass 1's coefficients per cross-warp reduction
constexpr int kMaxBlocks = 10;   // column blocks per warp: NB in {2, 4, 6, 8, 10}
constexpr int64_t kMaxD = static_cast<int64_t>(kWarps) * kMaxBlocks * 16;  // 1280
// [wide] Rows of up to 8 blocks a warp (1024 columns): AdamW's and the prefetching
// policies' widest (their registers); the projection takes 10 (kMaxRowD).
constexpr int kMaxPrefetchBlocks = 8;
constexpr int64_t kMaxAdamWD = static_cast<int64_t>(kWarps) * kMaxPrefetchBlocks * 16;  // 1024
// The largest dynamic shared memory of a launch (H100's per-block opt-in is 227 KiB);
// a launch whose basis needs more, or more than the device allows, takes tile.cuh.
constexpr size_t kMaxDynamicSmem = 224 * 1024;

struct Geometry {
  int64_t d;           // row length (basis rows)
  int64_t k;           // basis columns
  int64_t kp;          // k rounded up to 8
  int64_t total_rows;  // rows of all views in the launch
  int64_t n_tiles;     // 16-row tiles
  int nblk;            // 16-column blocks of a row (ceil(d / 16))
  int coef_ld;         // floats per row of the coefficient tile: coef_ld_for(kp)
  int c0;              // [columns] the launch's first basis column: its anchors' column
  bool row_data;       // anchors or weights to finish the coefficients with
  bool pairs;          // [pairs] U staged split, hi and lo (kp a multiple of 16)
  bool raw;            // [raw pairs] with pairs: U staged once in pairs' order, split where used
  bool stacked;        // [stacked] k <= 8, U staged split as two groups (hi, lo): kp = 16
  int warps;           // [16 warps] warps a CTA: kWarps or kWideWarps
  int row_bytes;       // [row cache] sizeof(P::Row): 16 (projections) or 64 (AdamW)
};

// [coefficients] The coefficient tile's floats over its 16 rows: -c split (hi, lo) in pass
// 2's A fragment order, 256 floats a k-step of 8 coefficients (kp a multiple of 8); AdamW's
// (`split` false) plain c, kp + 4 floats a row (conflict-free reads), never more.
constexpr int coef_ld_for(int64_t kp, bool split = true) {
  return static_cast<int>(split ? 2 * kp : kp + 4);
}
// [coefficients] The float of (MMA row m, coefficient kk) in the coefficient tile, hi (its lo
// 128 on): k-step st's A fragment, lane (m % 8, t) component m / 8 + 2 (K index / 4), where
// K index = t + 4 (K index / 4) takes coefficient 8 st + K index (fragments) or, with
// [pairs], 16 (st / 2) + 4 (st % 2) + t + 8 (K index / 4) (pass 2's k-steps of a chunk).
template <bool kPairs>
__device__ __forceinline__ int coef_slot(int m, int kk) {
  const int st = kPairs ? 2 * (kk / 16) + (kk % 8) / 4 : kk / 8;
  const int t = kk % 4;
  const int upper = kPairs ? (kk % 16) / 8 : (kk % 8) / 4;
  return 256 * st + 4 * (4 * (m % 8) + t) + m / 8 + 2 * upper;
}

// [row cache] Slots (tiles) of the cache, and its bytes: a P::Row (at most kMaxRowBytes)
// and an anchor address a row. Rows of at most 16 bytes (the projections') take eight slots,
// two tiles a lookup, in no more bytes than the four of kMaxRowBytes.
constexpr size_t kMaxRowBytes = 64;
constexpr int row_slots(size_t row_bytes) { return row_bytes <= 16 ? 8 : 4; }
constexpr size_t row_cache_bytes(size_t row_bytes) {
  return static_cast<size_t>(row_slots(row_bytes)) * kTileRows * (row_bytes + sizeof(float*));
}
static_assert(row_cache_bytes(16) <= row_cache_bytes(kMaxRowBytes), "the columns' room");

// [basis] the float4 unit of (basis rows 4a..4a+3, coefficient c) in a sub-block.
__device__ __forceinline__ int unit(int a, int c) { return 8 * a + (c ^ (4 * (a & 1) + 2 * (a >> 1))); }
// [held column] v kept in a register from here on: an empty asm that reads and writes it,
// so ptxas cannot rematerialize it from its operands at a later use.
__device__ __forceinline__ void hold(int& v) {
#ifdef GRADPROJ_CUDA_EMULATION
  (void)v;
#else
  asm volatile("" : "+r"(v));
#endif
}

// [async staging] U's `units` float4 from global memory into the shared memory at dst,
// published by stage_publish (which every thread calls, in place of the barrier that
// published the copy and the [row cache]):
// - sm_90 (GRADPROJ_STAGE_BULK): thread `leader` hands the whole copy to the TMA engine, one
//   cp.async.bulk completing on the mbarrier at `bar` (the expected bytes armed first);
//   stage_publish's barrier shows every thread the barrier's init, then each waits for its
//   phase, which makes the copy visible to it. No thread issues a copy per unit: the LDGSTS
//   loop below (19 instructions a trip, 3 NOPs beside its first LDGSTS on sm_90) was 0.09 of
//   bf16 k = 32's 1.17 warp instructions an element at d = 768 (sm_90, --lines).
// - sm_80 (GRADPROJ_STAGE_CP_ASYNC): thread t of `threads` takes units t, t + threads, ...
//   by cp.async (one LDGSTS a unit: no register round trip, where the copy took an LDG.128
//   and an STS.128 a unit, ptxas unrolling it 8-16 times), four units a trip; each thread
//   waits for its own, before the barrier.
// - the emulator (and a build for GPUs older than sm_80, which never runs the tensor-core
//   kernels) copies them plainly.
// Both asynchronous copies overlap the row cache's first lookups, between the two calls.
#if !defined(GRADPROJ_CUDA_EMULATION) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define GRADPROJ_STAGE_BULK 1
#elif !defined(GRADPROJ_CUDA_EMULATION) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define GRADPROJ_STAGE_CP_ASYNC 1
#endif
// The mbarrier's bytes in the launch's shared memory (smem_bytes; sm_90: at its start).
constexpr size_t kStageBarrierBytes = 16;
__device__ __forceinline__ void stage_async(float4* dst, const float4* __restrict__ src, int units, int t,
                                            int threads, uint64_t* bar, int leader) {
#if defined(GRADPROJ_STAGE_BULK)
  (void)threads;
  if (t == leader) {  // model-scale: lead (one warp's)
    const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
    const uint32_t bytes = 16u * static_cast<uint32_t>(units);  // at most kMaxDynamicSmem < 2^20
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(b) : "memory");
    // the init, to the async proxy that completes the transaction
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(b), "r"(bytes) : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
            static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
        "l"(src), "r"(bytes), "r"(b)
        : "memory");
  }
#elif defined(GRADPROJ_STAGE_CP_ASYNC)
  (void)bar, (void)leader;
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  auto copy = [&](int i) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(base + 16u * static_cast<uint32_t>(i)),
                 "l"(src + i)
                 : "memory");
  };
  int i = t;
#pragma unroll 1
  for (; i + 3 * threads < units; i += 4 * threads) {  // model-trips: ceil(nblk * J * 32 * units / threads) // 4
    copy(i), copy(i + threads), copy(i + 2 * threads), copy(i + 3 * threads);
  }
#pragma unroll 1
  for (; i < units; i += threads) copy(i);  // model-trips: ceil(nblk * J * 32 * units / threads) % 4
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
  (void)bar, (void)leader;
  for (int i = t; i < units; i += threads) dst[i] = src[i];
#endif
}
__device__ __forceinline__ void stage_publish(uint64_t* bar) {
#if defined(GRADPROJ_STAGE_BULK)
  __syncthreads();
  // A spin on test_wait, in PTX (ptxas expands try_wait, in a C++ loop or in PTX, into a
  // retry past the tile loop, whose jump back made the tile loop a loop inside a loop in the
  // SASS; a C++ loop around test_wait spilled 8 B in AdamW's 16-bit rows of 10 blocks).
  asm volatile(  // model-trips: 1
      "{\n .reg .pred p;\n"
      "stage_wait:\n mbarrier.test_wait.parity.shared::cta.b64 p, [%0], 0;\n"
      " @!p bra stage_wait;\n}\n" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar)))
      : "memory");
#else
  (void)bar;
#if defined(GRADPROJ_STAGE_CP_ASYNC)
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
  __syncthreads();
#endif
}

// [pairs] the float4 unit of (coefficient q of 8, basis rows 4a + e and 4a + e + 2) in a
// block's chunk of 16 coefficients: 8 q + ((4 e + a) ^ f(q)), f as unit's.
__device__ __forceinline__ int pair_unit(int q, int e, int a) {
  return 8 * q + ((4 * e + a) ^ (4 * (q & 1) + 2 * ((q >> 1) & 1)));
}

// Shared memory of a launch: the staged basis (twice with pairs: hi and lo), the partial
// sums (a tile a warp), the coefficient tile, the [row cache], the [async staging] barrier.
inline size_t smem_bytes(const Geometry& g) {
  return (static_cast<size_t>(g.nblk) * (g.kp / 8) * 128 * (g.pairs && !g.raw ? 2 : 1) +
          static_cast<size_t>(g.warps) * kTileRows * kCoefChunk +
          static_cast<size_t>(kTileRows) * g.coef_ld) *
             sizeof(float) +
         row_cache_bytes(static_cast<size_t>(g.row_bytes)) + kStageBarrierBytes;
}

// Blocks per SM the kernel is compiled for (at most 65536 / (256 x blocks) registers a
// thread). fp32 rows of more than 768 columns (NB = 8: 64 registers of x) spilled at 2
// blocks (128 registers): 52 B on sm_80, and 4 B on sm_90 once pass 1 took x as its B
// operand; from k = 24 such a basis leaves room for one block anyway. 16-bit rows hold the
// next tile's vectors too ([prefetch]): from NB = 6 they spilled 24-360 B at 128
// registers, so they take one block of up to 255. AdamW's vectors are four streams (p, g,
// m, v): at 128 registers they spilled 184-1600 B for NB >= 4, so one block; so do fp32
// strided rows (transposed views), whose addresses took 32 B of spills at NB = 6. 16-bit
// strided rows and row pairs of NB <= 4 fit 128 without spills (the row-pair kernel took 136
// of its own accord on sm_90: one CTA of 8 warps an SM).
template <class P, int NB>
constexpr int kMinBlocks =
    P::kUpdates ? 1
    : std::is_same_v<typename P::Scalar, float> ? (!P::kVector || NB >= 8 ? 1 : 2)
                                                : (NB >= 6 ? 1 : 2);

// [prefetch] The next tile's vectors held in registers: at most 96 a thread (a projection's
// 16-bit NB = 8: 32; AdamW's 16-bit NB = 6: 96, NB = 8 spilled 1.4 KB at 255 registers),
// and not beside [wide] rows' 80 registers of x; [16 warps] not AdamW's (the next tile's
// four streams spilled at 128 registers: each thread loads its own tile).
template <class P, int NB, int W = kWarps>
constexpr bool kPrefetchTile = P::kPrefetch && NB <= kMaxPrefetchBlocks &&
                               NB * 2 * sizeof(typename P::Bits) <= 96 * 4 &&
                               !(P::kUpdates && W == kWideWarps);

// [row pairs] P::kRowPairs where the policy declares it (project.cu's ProjectPairPolicy,
// adamw.cu's AdamWPairPolicy).
template <class P, class = void>
struct RowPairs : std::false_type {};
template <class P>
struct RowPairs<P, std::void_t<decltype(P::kRowPairs)>> : std::bool_constant<P::kRowPairs> {};

// [row pairs] The widest rows a pair policy takes: on 8 warps its loads are always the
// prefetch's, and AdamW's four streams of the next tile fit the registers up to NB = 6 (768
// columns).
template <class P>
constexpr int64_t kMaxPairD = kPrefetchTile<P, kMaxPrefetchBlocks> ? kMaxAdamWD : 6 * 16 * kWarps;

// [wide] The widest rows policy P's kernel takes: the projection's 1280 (NB = 10); AdamW's
// 16-bit contiguous rows 1280 too (x' is 80 registers, their loads in batches of 5 blocks:
// no prefetch); its fp32 and strided rows 1024 (their NB = 8 kernels already reach 255
// registers; fp32 params take adamw.cu's step_then_project beyond); a pair policy's
// kMaxPairD.
template <class P>
constexpr int64_t kMaxUpdateD =
    std::is_same_v<typename P::Scalar, float> || !P::kVector ? kMaxAdamWD : kMaxD;
template <class P>
constexpr int64_t kMaxRowD = RowPairs<P>::value ? kMaxPairD<P> : P::kUpdates ? kMaxUpdateD<P> : kMaxD;

// [16 warps] Projection rows of 513-1024 columns (blocks in (kSixteenWarpsFrom,
// kSixteenWarpsTo<P>]; fp32 rows as run_columns decides) take a CTA of 16 warps, 3 or 4 blocks
// a warp, compiled for one CTA an SM (at most 128 registers); so do AdamW's. Row pairs stop
// at 768 columns (3 blocks): at 4 their kernel spilled 12 B on sm_80; so do AdamW's fp32
// rows (contiguous: 4 B on sm_90; strided: 16 B on sm_90 once the basis took [offsets]).
constexpr int kSixteenWarpsFrom = 4 * kWarps;
template <class P>
constexpr int kSixteenWarpsTo =
    (RowPairs<P>::value || (P::kUpdates && std::is_same_v<typename P::Scalar, float>) ? 3 : 4) *
    kWideWarps;

// [row pairs] The tile row of MMA row m (0..15): 2 (m % 8) + m / 8 with row pairs.
template <bool kRowPairs>
__device__ __forceinline__ int tile_row(int m) {
  return kRowPairs ? 2 * (m & 7) + (m >> 3) : m;
}

// [coefficients] Pass 2's A of a k-step, -c split (hi, lo), as the finishing threads stored
// it: `frag` is the k-step's fragments at lane's quad.
__device__ __forceinline__ void coefficients(const float* frag, uint32_t (&ch)[4], uint32_t (&cl)[4]) {
  const uint4 h = *reinterpret_cast<const uint4*>(frag);
  const uint4 l = *reinterpret_cast<const uint4*>(frag + 128);
  ch[0] = h.x;
  ch[1] = h.y;
  ch[2] = h.z;
  ch[3] = h.w;
  cl[0] = l.x;
  cl[1] = l.y;
  cl[2] = l.z;
  cl[3] = l.w;
}

// [pass 2] tile X of a block: x -= (c_hi + c_lo)(U_hi + U_lo) without c_lo U_lo ([3xTF32]),
// lane's own x at columns 4 tq + X and 4 tq + 2 + X of its two rows. kSums (fp32 rows,
// [sums]): the k-step's three MMAs start from zero and x takes their sum with fp32 adds
// (x as the accumulator of every k-step drifted by k / 8 x 3 truncations); 16-bit rows
// keep x as the accumulator, whose drift stays far below their rounding.
template <bool kSums>
__device__ __forceinline__ void pass2_tile(float (&xb)[2][4], int X, const uint32_t (&cl)[4],
                                           const uint32_t (&ch)[4], const uint32_t (&bh)[2],
                                           const uint32_t (&bl)[2]) {
  if constexpr (kSums) {
    float step[4];
    mma::mma_tf32_zero(step, cl, bh);
    mma::mma_tf32(step, ch, bl);
    mma::mma_tf32(step, ch, bh);
    xb[0][X] += step[0];
    xb[0][2 + X] += step[1];
    xb[1][X] += step[2];
    xb[1][2 + X] += step[3];
  } else {
    float acc[4] = {xb[0][X], xb[0][2 + X], xb[1][X], xb[1][2 + X]};
    mma::mma_tf32(acc, cl, bh);
    mma::mma_tf32(acc, ch, bl);
    mma::mma_tf32(acc, ch, bh);
    xb[0][X] = acc[0];
    xb[0][2 + X] = acc[1];
    xb[1][X] = acc[2];
    xb[1][2 + X] = acc[3];
  }
}

// [raw pairs] The kernels that take them: the 16-bit projections, and AdamW's 16-bit rows
// (x' split truncated in pass 1, the coefficients plain: docs/gpu.md [adamw-raw-pairs]) of
// at most 4 blocks a warp on 8 warps and row pairs on 16, where they compile without
// spills (on sm_90 the others spilled 4-12 B at 128 registers: rows at 3 and 4 blocks on
// 16 warps, rows and row pairs at 6 on 8). kRawPairsAt: the instantiation's own answer.
template <class P>
constexpr bool kRawPairs = !std::is_same_v<typename P::Scalar, float>;
template <class P, int NB, int W>
constexpr bool kRawPairsAt =
    kRawPairs<P> && (!P::kUpdates || (W == kWarps ? NB <= 4 : RowPairs<P>::value));

// [fp32 pairs] fp32 projection rows take [pairs] too (run_columns: where that keeps the
// SM's resident warps), x split in pass 1 as the fragments split it, each block's MMAs
// from zero ([sums]).
template <class P>
constexpr bool kFp32Pairs = std::is_same_v<typename P::Scalar, float> && !P::kUpdates;

template <class P, int NB, bool kPairs, int W, bool kStacked, bool kRaw>
__global__ void __launch_bounds__(W * 32, W == kWarps ? kMinBlocks<P, NB> : 1) mma_rows_kernel(
    P pol, Geometry g, const float4* __restrict__ frag, const float* __restrict__ weights) {
  using T = typename P::Scalar;
  constexpr int V = tile::Pack<T>::kSize;
  static_assert(V == 4, "a lane holds 4 columns of a block per row");
  static_assert(!kPairs || P::kExactTf32 || kRaw || kFp32Pairs<P>,
                "[pairs]: 16-bit rows, fp32 projection rows ([fp32 pairs]); AdamW's x' raw only");
  static_assert(!kRaw || kPairs, "[raw pairs] are pairs' order");
  // [raw pairs] U staged once (hi and lo formed where used), else twice with pairs
  constexpr int kStagings = kPairs && !kRaw ? 2 : 1;
  constexpr bool kSplitX = !P::kExactTf32;  // [precision]
  constexpr bool kSums = std::is_same_v<T, float>;  // [precision] fp32 rows: mma.cuh [sums]
  // [precision] 16-bit projection rows: U split truncated (mma.cuh [truncated]). AdamW's
  // fragment kernels keep split's rounding: on sm_90 ptxas copied the truncated operands
  // into place, bf16 k = 32 on transposed views 3.27 -> 3.46 warp instructions an element
  // (their [raw pairs] split U and x' truncated).
  constexpr bool kTruncated = !kSums && !P::kUpdates;
  constexpr bool kRowPairs = RowPairs<P>::value;
  constexpr int kCta = W * 32;  // threads
  // [16 warps] the partial sums of a (row, coefficient) of a chunk: 8 warps' a thread, by one
  // thread (8 warps) or two of one warp (16)
  constexpr bool kSplitSums = W == 2 * kWarps;
  constexpr int kSumWarps = kSplitSums ? W / 2 : W;
  static_assert(W == kWarps || kSplitSums, "8 or 16 warps");
  static_assert(kCta == kTileRows * kCoefChunk * (kSplitSums ? 2 : 1), "the finishing threads");
  GRADPROJ_DYNAMIC_SMEM(float4, smem_raw);
  const int J = static_cast<int>(g.kp / 8);            // coefficient groups of 8
  const int64_t basis_units = static_cast<int64_t>(g.nblk) * J * 32;
  // [async staging] the copy's mbarrier: on sm_90 first, its address a constant (after the
  // row cache, a register held from the copy to the wait spilled 4 B in AdamW's bf16 kernel
  // of 4 blocks on 16 warps); elsewhere unused, its bytes last (U at offset 16, row-pair
  // kernels of 4 blocks on 8 warps spilled 8 B on sm_80)
#if defined(GRADPROJ_STAGE_BULK)
  uint64_t* stage_bar = reinterpret_cast<uint64_t*>(smem_raw);
  float4* su = smem_raw + kStageBarrierBytes / sizeof(float4);  // [basis]: nblk x J x 32 float4
#else
  uint64_t* stage_bar = nullptr;
  float4* su = smem_raw;
#endif
  float* red = reinterpret_cast<float*>(su + basis_units * kStagings);
  float* cs = red + W * kTileRows * kCoefChunk;         // coefficient tile, 16 x coef_ld
  // [row cache] slot s holds rows_s[16 s + m] and anchors_s[16 s + m] of its tile's row m
  using Row = typename P::Row;
  static_assert(sizeof(Row) <= kMaxRowBytes && sizeof(Row) % 8 == 0 && alignof(Row) <= 8,
                "[row cache] a Row in at most kMaxRowBytes, 8-byte aligned");
  char* cache = reinterpret_cast<char*>(cs + kTileRows * g.coef_ld);  // 16-byte aligned
  Row* rows_s = reinterpret_cast<Row*>(cache);
  constexpr int kSlots = row_slots(sizeof(Row));
  // Tiles a lookup: two where there are eight slots, but for the 16-bit [stacked] rows of 4
  // blocks on 16 warps (8 B of spills on sm_80 with two); the warp that looks up: the last
  // with two, else warp 0 as before (AdamW's 16-bit rows of 6 blocks spilled 8-16 B on sm_90
  // with the last).
  constexpr int kLookupTiles = kSlots == 8 && !(kStacked && W == kWideWarps && NB == 4) ? 2 : 1;
  constexpr int kLookupWarp = kLookupTiles == 2 ? W - 1 : 0;
  float** anchors_s = reinterpret_cast<float**>(cache + kSlots * kTileRows * sizeof(Row));

  // [held column] Values formed once, held in registers (left free, ptxas recomputed them
  // from the thread index at their uses in the tile loop; docs/gpu.md [held-column]). The
  // projections on 16 warps hold the lane's indices and [offsets]; 16-bit ones the column and
  // [offsets] too, on 16 warps n_chunks and whole. Free: AdamW's (held, they spilled), fp32's
  // column (held, fp32 rows issued more), 8 warps' indices (row pairs of NB = 4 spilled).
  constexpr bool kHeld = !P::kUpdates && !std::is_same_v<typename P::Scalar, float>;
  int lane = threadIdx.x % 32;
  int warp = threadIdx.x / 32;
  int gq = lane / 4;
  int tq = lane % 4;
  constexpr bool kHeldWide = !P::kUpdates && W == kWideWarps;
  if constexpr (kHeldWide) hold(lane), hold(warp), hold(gq), hold(tq);
  // Blocks of this warp that hold columns before d (warp-uniform).
  const int left = g.nblk - warp * NB;
  const int nb = left < 0 ? 0 : (left < NB ? left : NB);
  int n_chunks = (J + 1) / 2;
  const int d = static_cast<int>(g.d);  // <= kMaxD: column arithmetic in 32 bits
  int col0 = warp * NB * 16 + 4 * tq;  // [tile] column of block b: col0 + 16 b
  if constexpr (kHeld) hold(col0);
  // Every block of this warp lies before d in whole vectors.
  int whole = d % V == 0 && (warp * NB + nb) * 16 <= d;
  if constexpr (kHeld && W == kWideWarps) hold(n_chunks), hold(whole);
  // [offsets] Units a chunk of 16 coefficients takes (all blocks), and a block in it.
  const int blk_units = kPairs ? 64 * kStagings : 32;
  const int chunk_units = (kPairs ? 64 * kStagings : 64) * g.nblk;
  // Pass 1's A: lane's unit in a block's chunk, per k-step s ([pairs]; the fragments' is s's
  // alike). Pass 2's B: float offset of lane's pair in a block's chunk ([pairs]: per k-step
  // sp and tile X, its hi; lo 256 floats on) or group (fragments: coefficients tq and
  // tq + 4, X = 0 and 1). Computed once for the projections; AdamW's kernels compute them
  // where used (held through the tile loop, they spilled 8-16 B at 16 warps' 128 registers
  // on sm_80, NB = 4).
  constexpr bool kHoistOffsets = !P::kUpdates;
  auto p1_unit_at = [&](int s) { return kPairs ? pair_unit(gq, s, tq) : unit(tq, gq); };
  auto pair_off_at = [&](int sp, int X) {
    return kPairs ? 4 * pair_unit(4 * sp + tq, X, gq >> 1) + 2 * (gq & 1)
                  : 4 * unit(gq >> 1, tq + 4 * X) + 2 * (gq & 1);
  };
  int p1_units[2] = {};
  int pair_offs[2][2] = {};
  if constexpr (kHoistOffsets) {
#pragma unroll
    for (int s = 0; s < 2; ++s) p1_units[s] = p1_unit_at(s);
#pragma unroll
    for (int sp = 0; sp < 2; ++sp) {
#pragma unroll
      for (int X = 0; X < 2; ++X) pair_offs[sp][X] = pair_off_at(sp, X);
    }
    if constexpr (kHeld || kHeldWide) {
      hold(p1_units[0]), hold(p1_units[1]);
      hold(pair_offs[0][0]), hold(pair_offs[0][1]), hold(pair_offs[1][0]), hold(pair_offs[1][1]);
    }
  }
  auto p1_unit = [&](int s) { return kHoistOffsets ? p1_units[s] : p1_unit_at(s); };
  auto pair_off = [&](int sp, int X) { return kHoistOffsets ? pair_offs[sp][X] : pair_off_at(sp, X); };
  // The coefficient tile's split values ([coefficients]): lane's quad of the first k-step.
  // ([coefficients] AdamW's kernels keep the coefficients plain, 16 x coef_ld: split in
  // the fragment order, their 16-warp kernels of NB = 4 spilled 4-140 B, sm_80 and sm_90.)
  constexpr bool kSplitCoefficients = !P::kUpdates;
  const float* cs_lane = cs + 4 * lane;
  // [stacked] 16-bit projections of k <= 8, the fragment layout (its own instantiation: as
  // a run-time branch it cost the other 16-bit kernels 0.3-0.4 warp instructions an element)
  static_assert(!kStacked || (P::kExactTf32 && !P::kUpdates && !kPairs), "[stacked]");

  // [row cache] Tile `tile` into slot `slot` (kLookupTiles 2: and `tile + gridDim.x` into
  // the next): lanes of warp kLookupWarp, one row each, P::row (AdamW's with its bias
  // corrections: any Row serves the stores, which read only its addresses; a projection's
  // P::row is its P::store_row).
  // A row's anchor where the launch has row data (anchors or weights); the plain
  // projections' lookups skip it.
  auto anchor_of = [&](int64_t row) -> float* {  // model-uniform
    float* anchor = nullptr;
    if (g.row_data) anchor = pol.anchor_row(row);  // model-cold-if: not anchored
    return anchor;
  };
  auto cache_rows = [&](int64_t tile, int slot, int by = 0) {  // model-uniform
    if constexpr (kLookupTiles == 1) {  // 16 threads of warp `by`: 0 (the prologue's second: the last)
      const int m = static_cast<int>(threadIdx.x) - 32 * by;
      const int64_t row = tile * kTileRows + m;
      if (m >= 0 && m < kTileRows && row < g.total_rows) {  // model-scale: cache (warp 0)
        rows_s[slot * kTileRows + m] = pol.row(row);
        anchors_s[slot * kTileRows + m] = anchor_of(row);
      }
    } else {  // the last warp's 32 lanes, tile + 16 m / 32 row m % 16
      const int m = static_cast<int>(threadIdx.x) - kLookupWarp * 32;
      if (m < 0) return;
      const int r = m % kTileRows;
      const int64_t row = (tile + (m < kTileRows ? 0 : gridDim.x)) * kTileRows + r;
      const int at = (slot + m / kTileRows) % kSlots * kTileRows + r;
      if (row < g.total_rows) {  // model-scale: cache (the last warp)
        rows_s[at] = pol.row(row);
        anchors_s[at] = anchor_of(row);
      }
    }
  };
  // Row m of slot `slot`'s tile.
  auto row_of = [&](int slot, int m) -> Row { return rows_s[slot * kTileRows + m]; };

  // [async staging] U, while the row cache takes the first tiles' rows
  // The copy's issue (sm_90) by a warp that makes no lookup here: warp 0 where the last warp
  // looks up, else warp 1 (warp 0 and the last make the prologue's).
  constexpr int kStageWarp = kLookupWarp == 0 ? 1 : 0;
  stage_async(su, frag, g.nblk * J * 32 * kStagings, static_cast<int>(threadIdx.x), kCta, stage_bar,
              32 * kStageWarp);
  cache_rows(blockIdx.x, 0);  // this CTA's first two tiles
  // One-tile lookups: the second tile's by the last warp, beside warp 0's first (warp 0 made
  // both, the CTA's busiest warp: 0.06 warp instructions an element of ProjectedAdamW's bf16
  // rows at d = 768, sm_90). Where the CTA has a second tile; not the busiest warp's.
  // model-scale: min(1.0, max(0.0, items - 1)) * aside
  if constexpr (kLookupTiles == 1) cache_rows(blockIdx.x + gridDim.x, 1, W - 1);
  stage_publish(stage_bar);  // U and the row cache

  // [prefetch] 16-bit rows: the next tile's whole vectors are loaded before this tile's
  // passes and converted when it starts, so loads stay in flight while the CTA computes.
  constexpr bool kPrefetch = kPrefetchTile<P, NB, W>;
  // [wide] 16-bit projection rows too wide to prefetch load their own tile's Bits the same
  // way, all before any is converted (loaded and converted a vector at a time, 32-40 bytes
  // were in flight a thread: latency-bound, bf16 k = 8 at d = 1280 57 % of copy on H100).
  // AdamW batches its own loads (below).
  constexpr bool kBatchLoad = P::kPrefetch && !P::kUpdates && !kPrefetch && !kRowPairs;
  using Bits = typename P::Bits;
  // [row pairs] nxt[b][0], nxt[b][1]: both rows' columns j, j + 1 and j + 2, j + 3 (the
  // words of load_pair_bits)
  Bits nxt[kPrefetch || kBatchLoad || kRowPairs ? NB : 1][2] = {};
  auto fetch = [&](int64_t tile, int slot) {  // model-uniform
    if constexpr (kRowPairs) {
      const int64_t row = tile * kTileRows + 2 * gq;
      if (row >= g.total_rows) return;  // rows come in pairs: row + 1 exists too
      const Row w = row_of(slot, 2 * gq);
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        const int j = col0 + 16 * b;
        if (j + V <= d) pol.load_pair_bits(w, j, nxt[b][0], nxt[b][1]);  // model-scale: blocks / NB
      }
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = tile * kTileRows + gq + 8 * h;
        if (row >= g.total_rows) continue;
        const Row w = row_of(slot, gq + 8 * h);  // its addresses
#pragma unroll
        for (int b = 0; b < (kPrefetch || kBatchLoad ? NB : 1); ++b) {
          const int j = col0 + 16 * b;
          if (j + V <= d) nxt[b][h] = pol.load_bits(w, j);  // model-scale: blocks / NB (past d: none)
        }
      }
    }
  };
  if constexpr (kPrefetch) {
    if (blockIdx.x < g.n_tiles) fetch(blockIdx.x, 0);
  }
  // A row's ragged last vector (d % V != 0), through the policy's element path.
  auto load_ragged = [&](int64_t row0, float (&x)[NB][2][V]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = row0 + tile_row<kRowPairs>(gq + 8 * h);
      if (row >= g.total_rows) continue;
      const Row w = pol.row(row);
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        const int j = col0 + 16 * b;
        if (j < d && j + V > d) pol.template load<true>(w, j, g.d, x[b][h]);
      }
    }
  };

  int it = 0;  // this CTA's tiles so far: the tile's [row cache] slot is it % kSlots
  for (int64_t tile = blockIdx.x; tile < g.n_tiles; tile += gridDim.x, ++it) {  // model-trips: items
    const int64_t row0 = tile * kTileRows;
    const int slot = it % kSlots;
    const int next_slot = (it + 1) % kSlots;
    // Lookups of tiles past the bucket's last look nothing up (none where a CTA has two
    // tiles or fewer).
    // model-scale: max(0.0, items - 2) / items / lookup (tiles a lookup)
    if (it % kLookupTiles == 0) {
      cache_rows(tile + 2 * static_cast<int64_t>(gridDim.x), (it + 2) % kSlots);
    }
    // [tile] x[b][h]: row row0 + gq + 8 h, columns 16 (warp NB + b) + 4 tq + [0, 4).
    float x[NB][2][V];
    // The tile's 16 rows exist and the warp's blocks are whole vectors (warp-uniform): its
    // loads and stores need no bounds checks. (Blocks past d, b >= nb, are never used.)
    const bool full = whole && row0 + kTileRows <= g.total_rows;
    if constexpr (kRowPairs) {  // [row pairs] both rows' vectors from one load's words
      const int64_t prow = row0 + 2 * gq;
      const bool valid = prow < g.total_rows;
      Row w{};
      if (P::kUpdates && valid) w = row_of(slot, 2 * gq);
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        const int j = col0 + 16 * b;
        // model-scale: blocks / NB if updates else 1 (past d: AdamW stores no m, v; a projection converts)
        if (full ? b < nb || !P::kUpdates : valid && j + V <= d) {
          if constexpr (kPrefetch) {
            pol.finish_pair(w, j, nxt[b][0], nxt[b][1], x[b][0], x[b][1]);
          } else {  // [16 warps] AdamW's: this tile's block, both rows
            Bits lo, hi;
            pol.load_pair_bits(w, j, lo, hi);
            pol.finish_pair(w, j, lo, hi, x[b][0], x[b][1]);
          }
        } else {  // model-cold-if: d % 16 == 0
#pragma unroll
          for (int v = 0; v < V; ++v) {
            x[b][0][v] = 0.f;
            x[b][1][v] = 0.f;
          }
        }
      }
      if (d % V != 0) load_ragged(row0, x);  // model-cold-if: d % 4 == 0
      if (kPrefetch && tile + gridDim.x < g.n_tiles) fetch(tile + gridDim.x, next_slot);
    } else if constexpr (kPrefetch || kBatchLoad) {
      if constexpr (kBatchLoad) fetch(tile, slot);
      if (full) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          Row w{};
          if constexpr (P::kUpdates) w = row_of(slot, gq + 8 * h);
#pragma unroll
          for (int b = 0; b < NB; ++b) {
            // model-scale: blocks / NB if updates else 1 (past d: a plain projection converts them anyway)
            if (b < nb || !P::kUpdates) pol.finish(w, col0 + 16 * b, nxt[b][h], x[b][h]);
          }
        }
      } else {  // model-cold-if: d % 16 == 0 (the bucket's last tile, or a ragged row)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t row = row0 + gq + 8 * h;
          const bool valid = row < g.total_rows;
          Row w{};
          if (valid && P::kUpdates) w = row_of(slot, gq + 8 * h);
#pragma unroll
          for (int b = 0; b < NB; ++b) {
            const int j = col0 + 16 * b;
            if (valid && j + V <= d) {
              pol.finish(w, j, nxt[b][h], x[b][h]);
            } else {
#pragma unroll
              for (int v = 0; v < V; ++v) x[b][h][v] = 0.f;
            }
          }
        }
      }
      if (d % V != 0) load_ragged(row0, x);  // model-cold-if: d % 4 == 0
      if (kPrefetch && tile + gridDim.x < g.n_tiles) fetch(tile + gridDim.x, next_slot);
    } else if constexpr (P::kUpdates) {
      // Every vector of a row loaded before any is finished: AdamW's finish stores m and v,
      // and a load after a store (which may alias, as far as the compiler knows) would wait
      // for it, one round trip to memory per vector. (A projection's loads need no such
      // order, and holding them all spilled fp32 rows at 128 registers.) One path for whole
      // and partial tiles: with a second, the compiler merged their finishing code.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = row0 + gq + 8 * h;
        const bool valid = row < g.total_rows;
        Row w{};
        if (valid) w = row_of(slot, gq + 8 * h);
        // in batches of at most 96 registers (fp32 NB = 8 held all 8 and spilled 32 B), of
        // half the blocks beside [wide] rows' 80 registers of x', and [16 warps] fp32's a
        // block at a time (all 3 at the 128-register cap spilled 136 B on sm_90), 16-bit
        // NB = 4 two at a time (all 4: 72 B)
        constexpr bool kFp32 = std::is_same_v<typename P::Scalar, float>;
        constexpr int kBatch = W == kWideWarps ? (kFp32 ? 1 : NB == 4 ? 2 : NB)
                               : NB * sizeof(Bits) <= 96 * 4 && NB <= kMaxPrefetchBlocks ? NB
                                                                                           : NB / 2;
#pragma unroll
        for (int b0 = 0; b0 < NB; b0 += kBatch) {
          Bits cur[kBatch];
#pragma unroll
          for (int b = b0; b < b0 + kBatch; ++b) {
            const int j = col0 + 16 * b;
            if (valid && j + V <= d) cur[b - b0] = pol.load_bits(w, j);  // model-scale: blocks / NB
          }
#pragma unroll
          for (int b = b0; b < b0 + kBatch; ++b) {
            const int j = col0 + 16 * b;
            if (valid && j + V <= d) {  // model-scale: blocks / NB (past d: zeros)
              pol.finish(w, j, cur[b - b0], x[b][h]);
            } else {
#pragma unroll
              for (int v = 0; v < V; ++v) x[b][h][v] = 0.f;
            }
          }
        }
      }
      if (d % V != 0) load_ragged(row0, x);  // model-cold-if: d % 4 == 0
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = row0 + gq + 8 * h;
        const bool valid = row < g.total_rows;
        Row w{};
        if (valid) w = row_of(slot, gq + 8 * h);
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          const int j = col0 + 16 * b;
          if (valid && j < d) {  // model-scale: blocks / NB (past d: zeros)
            pol.template load<true>(w, j, g.d, x[b][h]);
          } else {
#pragma unroll
            for (int v = 0; v < V; ++v) x[b][h][v] = 0.f;
          }
        }
      }
    }

    // [pass 1]
    for (int c = 0; c < n_chunks; ++c) {  // model-trips: ceil(kp / 16)
      // This thread finishes coefficient fkk of row fr of the chunk (after the reduction);
      // its anchor and weight are loaded now, so their latency hides behind the MMAs.
      // [16 warps] two threads a (row, coefficient), lanes l and l + 16 of warp fr, each
      // adding 8 warps' partial sums; lane l finishes it
      const bool finisher = !kSplitSums || lane < kCoefChunk;
      const int fr = kSplitSums ? warp : threadIdx.x / kCoefChunk;  // an MMA row
      const int64_t frow = row0 + tile_row<kRowPairs>(fr);
      const int64_t fkk = static_cast<int64_t>(c) * kCoefChunk + threadIdx.x % kCoefChunk;
      const bool fin = finisher && fkk < g.k && frow < g.total_rows;
      float* anchor = nullptr;
      float c_old = 0.f;
      float w_kk = 1.f;
      if (fin && g.row_data) {  // model-cold-if: not anchored
        anchor = anchors_s[slot * kTileRows + tile_row<kRowPairs>(fr)];
        if (anchor != nullptr) anchor += g.c0;  // [columns]
        if (anchor != nullptr) c_old = anchor[fkk];
        if (weights != nullptr) w_kk = weights[fkk];
      }
      // acc[h]: the chunk's 16 coefficients (M) of rows 8 h .. 8 h + 7 (N), C = U^T X^T.
      float acc[2][4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[h][q] = 0.f;
      }
      const bool second = 2 * c + 1 < J;  // the chunk's second group of 8 exists
      // [offsets] the chunk's units of the warp's first block (fragments: group 2c; 2c + 1
      // in chunk_u2)
      const float4* chunk_u = su + c * chunk_units + warp * NB * blk_units;
      const float4* chunk_u2 = chunk_u + 32 * g.nblk;
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        if (b >= nb) break;  // model-scale: blocks / NB (warp-uniform)
        if constexpr (kPairs) {
          // [pairs] k-step s: the unit (q = gq, e = s, a = tq) is lane's A quad, hi and lo
          // ([offsets]: block b's hi 128 units on, its lo 64 after that; [raw pairs]: U,
          // block b 64 units on, split here)
          [[maybe_unused]] float part[2][4];  // [sums] this block's MMAs, from zero ([fp32 pairs])
#pragma unroll
          for (int s = 0; s < 2; ++s) {
            const float4* q = chunk_u + p1_unit(s) + blk_units * b;
            uint32_t ah[4];
            uint32_t al[4];
            if constexpr (kRaw) {
              const float4 u = *q;
              mma::split4<true>({u.x, u.y, u.z, u.w}, ah, al);
            } else {
              const uint4 uh = *reinterpret_cast<const uint4*>(q);
              const uint4 ul = *reinterpret_cast<const uint4*>(q + 64);
              ah[0] = uh.x, ah[1] = uh.y, ah[2] = uh.z, ah[3] = uh.w;
              al[0] = ul.x, al[1] = ul.y, al[2] = ul.z, al[3] = ul.w;
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              if constexpr (kSums) {  // [fp32 pairs] x split as the fragments split it
                const mma::Split x0 = mma::split(x[b][h][s]);
                const mma::Split x1 = mma::split(x[b][h][s + 2]);
                const uint32_t bh[2] = {x0.hi, x1.hi};
                const uint32_t bl[2] = {x0.lo, x1.lo};
                if (s == 0) {  // unrolled: the block's first MMA
                  mma::mma_tf32_zero(part[h], ah, bl);
                } else {
                  mma::mma_tf32(part[h], ah, bl);
                }
                mma::mma_tf32(part[h], al, bh);
                mma::mma_tf32(part[h], ah, bh);
              } else if constexpr (kSplitX) {  // AdamW's x' (fp32): split truncated, as U
                const mma::Split x0 = mma::split_truncated(x[b][h][s]);
                const mma::Split x1 = mma::split_truncated(x[b][h][s + 2]);
                const uint32_t bh[2] = {x0.hi, x1.hi};
                const uint32_t bl[2] = {x0.lo, x1.lo};
                mma::mma_tf32(acc[h], ah, bl);
                mma::mma_tf32(acc[h], al, bh);
                mma::mma_tf32(acc[h], ah, bh);
              } else {
                const uint32_t bh[2] = {__float_as_uint(x[b][h][s]), __float_as_uint(x[b][h][s + 2])};
                mma::mma_tf32(acc[h], al, bh);
                mma::mma_tf32(acc[h], ah, bh);
              }
            }
          }
          if constexpr (kSums) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
#pragma unroll
              for (int q = 0; q < 4; ++q) acc[h][q] += part[h][q];
            }
          }
        } else {
          // U rows 4 tq .. 4 tq + 3 of the block, coefficient gq of groups 2c and 2c + 1
          // ([offsets]: block b 32 units on in each group; AdamW's from scratch, as its
          // lane offsets)
          const float4* g0 = kHoistOffsets ? chunk_u + p1_unit(0) + 32 * b
                                           : su + (2 * c * g.nblk + warp * NB + b) * 32 + unit(tq, gq);
          const float4* g1 = kHoistOffsets ? chunk_u2 + p1_unit(0) + 32 * b : g0 + 32 * g.nblk;
          const float4 u0 = *g0;
          float4 u1 = make_float4(0.f, 0.f, 0.f, 0.f);
          if (second) u1 = *g1;  // model-cold-if: not second
          float part[2][4];  // [sums] this block's MMAs, from zero (kSums)
          if constexpr (kStacked) {
            // [stacked] A = (U_hi; U_lo) of coefficient gq: groups 0 and 1 as they stand
#pragma unroll
            for (int s = 0; s < 2; ++s) {
              const uint32_t a[4] = {__float_as_uint(s == 0 ? u0.x : u0.y),
                                     __float_as_uint(s == 0 ? u1.x : u1.y),
                                     __float_as_uint(s == 0 ? u0.z : u0.w),
                                     __float_as_uint(s == 0 ? u1.z : u1.w)};
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const uint32_t bx[2] = {__float_as_uint(x[b][h][s]), __float_as_uint(x[b][h][s + 2])};
                mma::mma_tf32(acc[h], a, bx);
              }
            }
            continue;
          }
#pragma unroll
          for (int s = 0; s < 2; ++s) {
            // K-step s takes columns 4 tq + s (K index tq) and 4 tq + s + 2 (tq + 4).
            // A = U^T: rows gq and gq + 8 are coefficient gq of groups 2c and 2c + 1.
            const float av[4] = {s == 0 ? u0.x : u0.y, s == 0 ? u1.x : u1.y,
                                 s == 0 ? u0.z : u0.w, s == 0 ? u1.z : u1.w};
            uint32_t ah[4];
            uint32_t al[4];
            mma::split4<kTruncated>(av, ah, al);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              // B = X^T: x of row gq + 8 h at those columns, the register pair that is
              // also pass 2's accumulator (x[b][h][X], x[b][h][2 + X]).
              const float bv[2] = {x[b][h][s], x[b][h][s + 2]};
              uint32_t bh[2];
              uint32_t bl[2];
#pragma unroll
              for (int q = 0; q < 2; ++q) {
                if constexpr (kSplitX) {
                  const mma::Split sp = mma::split(bv[q]);  // fp32 x, AdamW's x': not truncated
                  bh[q] = sp.hi;
                  bl[q] = sp.lo;
                } else {
                  bh[q] = __float_as_uint(bv[q]);  // exact in tf32
                  bl[q] = 0u;
                }
              }
              if constexpr (kSums) {
                if (s == 0) {  // unrolled: the block's first MMA
                  if constexpr (kSplitX) {
                    mma::mma_tf32_zero(part[h], ah, bl);
                    mma::mma_tf32(part[h], al, bh);
                  } else {
                    mma::mma_tf32_zero(part[h], al, bh);
                  }
                } else {
                  if constexpr (kSplitX) mma::mma_tf32(part[h], ah, bl);
                  mma::mma_tf32(part[h], al, bh);
                }
                mma::mma_tf32(part[h], ah, bh);
              } else {
                if constexpr (kSplitX) mma::mma_tf32(acc[h], ah, bl);
                mma::mma_tf32(acc[h], al, bh);
                mma::mma_tf32(acc[h], ah, bh);
              }
            }
          }
          if constexpr (kSums) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
#pragma unroll
              for (int q = 0; q < 4; ++q) acc[h][q] += part[h][q];
            }
          }
        }
      }
      // The warp's partial sums of the chunk: red[warp][row][coefficient in chunk]; lane
      // (gq, tq) holds coefficients gq and gq + 8 of rows 2 tq + 8 h and 2 tq + 8 h + 1.
      float* mine = red + warp * kTileRows * kCoefChunk;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = 2 * tq + 8 * h;
        mine[r * kCoefChunk + gq] = acc[h][0];
        mine[(r + 1) * kCoefChunk + gq] = acc[h][1];
        mine[r * kCoefChunk + gq + 8] = acc[h][2];
        mine[(r + 1) * kCoefChunk + gq + 8] = acc[h][3];
      }
      __syncthreads();
      {  // a thread per (row, coefficient) of the chunk, 16 x 16 ([16 warps]: two)
        const int col = threadIdx.x % kCoefChunk;
        const int w0 = kSplitSums ? (lane / kCoefChunk) * kSumWarps : 0;
        float total = 0.f;
        for (int w = w0; w < w0 + kSumWarps; ++w) total += red[(w * kTileRows + fr) * kCoefChunk + col];  // model-trips: 8
        if constexpr (kSplitSums) total += __shfl_down_sync(0xffffffffu, total, kCoefChunk);
        // [stacked] coefficient q's U_lo x is column q + 8's sum, 8 lanes on
        if constexpr (kStacked) total += __shfl_down_sync(0xffffffffu, total, 8);
        if (finisher && fkk < g.kp) {
          // tile::finish_coef with the values loaded above
          float coef = total;
          if (anchor != nullptr) {
            coef = total - c_old;
            if (weights != nullptr) anchor[fkk] = c_old + (1.f - w_kk) * coef;
          }
          if (weights != nullptr) coef *= w_kk;
          // [coefficients] -coef, split once for every warp's pass 2
          if constexpr (kSplitCoefficients) {
            const mma::Split sp = mma::split(fin ? -coef : 0.f);
            float* slot = cs + coef_slot<kPairs>(fr, static_cast<int>(fkk));
            slot[0] = __uint_as_float(sp.hi);
            slot[128] = __uint_as_float(sp.lo);
          } else {
            cs[fr * g.coef_ld + fkk] = fin ? coef : 0.f;
          }
        }
      }
      __syncthreads();  // cs complete; red free for the next chunk
    }

    // [pass 2]
    if constexpr (kPairs) {
      // A chunk of 16 coefficients a trip, its two k-steps unrolled ([pairs]): K indices
      // tq and tq + 4 are coefficients 16 c + 4 sp + tq and + 8.
      for (int c = 0; c < J / 2; ++c) {  // model-trips: kp / 16
        // [offsets] the chunk's floats of the warp's first block: block b's hi 512 on
        // ([raw pairs]: its U 256 on)
        const float* chunk_f = reinterpret_cast<const float*>(su + c * chunk_units + warp * NB * blk_units);
#pragma unroll
        for (int sp = 0; sp < 2; ++sp) {
          uint32_t ch[4];
          uint32_t cl[4];
          if constexpr (kSplitCoefficients) {
            coefficients(cs_lane + 256 * (2 * c + sp), ch, cl);
          } else {  // AdamW's: -c read in pairs' K order and split by every warp
            const int kk = 16 * c + 4 * sp + tq;
            const float v[4] = {-cs[gq * g.coef_ld + kk], -cs[(gq + 8) * g.coef_ld + kk],
                                -cs[gq * g.coef_ld + kk + 8], -cs[(gq + 8) * g.coef_ld + kk + 8]};
            mma::split4(v, ch, cl);
          }
#pragma unroll
          for (int b = 0; b < NB; ++b) {
            if (b >= nb) break;  // model-scale: blocks / NB (warp-uniform)
#pragma unroll
            for (int X = 0; X < 2; ++X) {
              // tile X: half gq % 2 of the unit (4 sp + tq, X, gq / 2), U row
              // 4 (gq / 2) + 2 (gq % 2) + X at coefficients q and q + 8: lane's B
              const float* hi = chunk_f + 4 * blk_units * b + pair_off(sp, X);
              uint32_t bh[2];
              uint32_t bl[2];
              if constexpr (kRaw) {
                const float2 u = *reinterpret_cast<const float2*>(hi);
                const mma::Split u0 = mma::split_truncated(u.x);
                const mma::Split u1 = mma::split_truncated(u.y);
                bh[0] = u0.hi, bh[1] = u1.hi, bl[0] = u0.lo, bl[1] = u1.lo;
              } else {
                const uint2 wh = *reinterpret_cast<const uint2*>(hi);
                const uint2 wl = *reinterpret_cast<const uint2*>(hi + 256);
                bh[0] = wh.x, bh[1] = wh.y, bl[0] = wl.x, bl[1] = wl.y;
              }
              pass2_tile<kSums>(x[b], X, cl, ch, bh, bl);
            }
          }
        }
      }
    } else {
      // [stacked] one k-step, its B hi and lo from groups 0 and 1
      const int steps = kStacked ? 1 : J;
      for (int s = 0; s < steps; ++s) {  // model-trips: steps
        uint32_t ch[4];
        uint32_t cl[4];
        if constexpr (kSplitCoefficients) {
          coefficients(cs_lane + 256 * s, ch, cl);
        } else {  // AdamW's: -c read and split by every warp
          const float v[4] = {
              -cs[gq * g.coef_ld + 8 * s + tq], -cs[(gq + 8) * g.coef_ld + 8 * s + tq],
              -cs[gq * g.coef_ld + 8 * s + tq + 4], -cs[(gq + 8) * g.coef_ld + 8 * s + tq + 4]};
          mma::split4(v, ch, cl);
        }
        // [offsets] group s's floats of the warp's first block: block b's 128 on
        const float* group_f = reinterpret_cast<const float*>(su + (s * g.nblk + warp * NB) * 32);
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          if (b >= nb) break;  // model-scale: blocks / NB (warp-uniform)
          const float* sub = kHoistOffsets
                                 ? group_f + 128 * b
                                 : reinterpret_cast<const float*>(su + (s * g.nblk + warp * NB + b) * 32);
          const float2 w0 = *reinterpret_cast<const float2*>(sub + pair_off(0, 0));
          const float2 w1 = *reinterpret_cast<const float2*>(sub + pair_off(0, 1));
          if constexpr (kStacked) {
            // group 1 (lo) lies nblk sub-blocks of 128 floats after group 0 (hi)
            const float* lo = sub + 128 * g.nblk;
            const float2 l0 = *reinterpret_cast<const float2*>(lo + pair_off(0, 0));
            const float2 l1 = *reinterpret_cast<const float2*>(lo + pair_off(0, 1));
#pragma unroll
            for (int X = 0; X < 2; ++X) {
              const uint32_t bh[2] = {__float_as_uint(X == 0 ? w0.x : w0.y),
                                      __float_as_uint(X == 0 ? w1.x : w1.y)};
              const uint32_t bl[2] = {__float_as_uint(X == 0 ? l0.x : l0.y),
                                      __float_as_uint(X == 0 ? l1.x : l1.y)};
              pass2_tile<kSums>(x[b], X, cl, ch, bh, bl);
            }
            continue;
          }
#pragma unroll
          for (int X = 0; X < 2; ++X) {
            const mma::Split b0 = mma::split_as<kTruncated>(X == 0 ? w0.x : w0.y);
            const mma::Split b1 = mma::split_as<kTruncated>(X == 0 ? w1.x : w1.y);
            const uint32_t bh[2] = {b0.hi, b1.hi};
            const uint32_t bl[2] = {b0.lo, b1.lo};
            pass2_tile<kSums>(x[b], X, cl, ch, bh, bl);
          }
        }
      }
    }

    // Stores: the rows' addresses again, from the [row cache] (they are not kept live
    // through both passes).
    if (full) {
      if constexpr (kRowPairs) {  // both rows' vectors as one store's words
        const Row w = row_of(slot, 2 * gq);
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          if (b >= nb) break;  // model-scale: blocks / NB (warp-uniform)
          pol.store_pair(w, col0 + 16 * b, x[b][0], x[b][1]);
        }
      } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const Row w = row_of(slot, gq + 8 * h);
#pragma unroll
          for (int b = 0; b < NB; ++b) {
            if (b >= nb) break;  // model-scale: blocks / NB (warp-uniform)
            pol.store_vector(w, col0 + 16 * b, x[b][h]);
          }
        }
      }
    } else {  // model-cold-if: d % 16 == 0 (the bucket's last tile, or a ragged row)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = row0 + tile_row<kRowPairs>(gq + 8 * h);
        if (row >= g.total_rows) continue;
        const Row w = row_of(slot, tile_row<kRowPairs>(gq + 8 * h));
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          const int j = col0 + 16 * b;
          if (j < d) pol.store(w, j, g.d, x[b][h]);
        }
      }
    }
  }
}

// The projections (project.cu: rows and transposed views) run on this kernel at every k.
// fp32 at k <= 8 took the FMA engine, memory-bound when this was chosen; the occupancy
// bound calibrated on the H200 put it at 69-75 % of copy at d = 768 (1.85-1.96 warp
// instructions an element), where this kernel issues 0.87-0.89 (100 %, predicted).
// AdamW's contiguous rows (adamw.cu) still start at fp32 k = 9: its FMA engine keeps
// 1.00x torch's fused AdamW at d = 768 there, and this kernel was predicted slower at
// d = 320 (0.90 -> 0.66 of the fused AdamW's speed, A100) and 1280 (0.998 -> 0.76,
// benchmarks/perf_model_cuda.py). 16-bit: every k.
template <typename T>
constexpr int64_t kMinAdamWRowsK = std::is_same_v<T, float> ? 9 : 1;

// Strided rows (transposed views): a policy's load_bits / store_vector form element
// offsets in 32 bits (one IMAD.WIDE an address; 64-bit products took 22 instructions a
// vector), which holds where (d + 3) |stride| < 2^31; the launchers check it per row view.
inline bool narrow_offsets(int64_t d, int64_t stride) {
  return (d + 3) * (stride < 0 ? -stride : stride) < (int64_t{1} << 31);
}
// [row pairs] True when view rows 2 i and 2 i + 1 of t lie in one 32-bit word at every
// column: 16-bit, unit row stride, an even column stride, a 4-byte aligned start, an even
// number of rows (so a bucket's rows pair up within each view). The launchers check every
// view (and every stream of AdamW's) of a launch.
inline bool pair_rows(const at::Tensor& t, int64_t row_stride, int64_t col_stride, int64_t rows) {
  return t.element_size() == 2 && row_stride == 1 && col_stride % 2 == 0 && rows % 2 == 0 &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 4 == 0;
}
// Elements [j, j + 4) of the strided row at x as raw bits (narrow_offsets holds).
template <typename T>
__device__ __forceinline__ tile::PackBits<T> load_strided(const T* x, int64_t j, int64_t stride) {
  const int cs = static_cast<int>(stride);
  const int o = static_cast<int>(j) * cs;
  tile::Pack<T> p;
#pragma unroll
  for (int v = 0; v < tile::Pack<T>::kSize; ++v) p.v[v] = x[o + v * cs];
  tile::PackBits<T> b;
  memcpy(&b, &p, sizeof(b));
  return b;
}
// Stores p at elements [j, j + 4) of the strided row at x (narrow_offsets holds).
template <typename T>
__device__ __forceinline__ void store_strided(T* x, int64_t j, int64_t stride, const tile::Pack<T>& p) {
  const int cs = static_cast<int>(stride);
  const int o = static_cast<int>(j) * cs;
#pragma unroll
  for (int v = 0; v < tile::Pack<T>::kSize; ++v) x[o + v * cs] = p.v[v];
}

// [row pairs] Elements [j, j + 4) of the strided 16-bit rows at x and x + 1 (x 4-byte
// aligned, an even stride; narrow_offsets holds): word v holds both rows' element j + v,
// the row at x in its low half.
template <typename T>
__device__ __forceinline__ uint4 load_pair(const T* x, int64_t j, int64_t stride) {
  static_assert(sizeof(T) == 2, "pairs of 16-bit elements");
  const int ws = static_cast<int>(stride) / 2;  // the stride in 32-bit words
  const uint32_t* p = reinterpret_cast<const uint32_t*>(x) + static_cast<int>(j) * ws;
  return make_uint4(p[0], p[ws], p[2 * ws], p[3 * ws]);
}
// [row pairs] load_pair's words 0-1 (lo) and 2-3 (hi): the halves the kernel keeps.
__device__ __forceinline__ void split_pair(const uint4& r, uint2& lo, uint2& hi) {
  lo = make_uint2(r.x, r.y);
  hi = make_uint2(r.z, r.w);
}
// [row pairs] load_pair's words (lo: words 0-1, hi: 2-3) as both rows' fp32 values.
template <typename T>
__device__ __forceinline__ void unpack_pair(const uint2& lo, const uint2& hi, float (&x0)[4],
                                            float (&x1)[4]) {
  const uint32_t w[4] = {lo.x, lo.y, hi.x, hi.y};
#pragma unroll
  for (int v = 0; v < 4; ++v) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {  // bf16 is the high half of an fp32
      x0[v] = __uint_as_float(w[v] << 16);
      x1[v] = __uint_as_float(w[v] & 0xffff0000u);
    } else {
      T e[2];
      memcpy(e, &w[v], sizeof(e));
      x0[v] = static_cast<float>(e[0]);
      x1[v] = static_cast<float>(e[1]);
    }
  }
}
// [row pairs] Stores x0 and x1 at elements [j, j + 4) of the rows at x and x + 1, as
// load_pair reads them: four 32-bit stores.
template <typename T>
__device__ __forceinline__ void store_pair(T* x, int64_t j, int64_t stride, const float (&x0)[4],
                                           const float (&x1)[4]) {
  const int ws = static_cast<int>(stride) / 2;
  uint32_t* p = reinterpret_cast<uint32_t*>(x) + static_cast<int>(j) * ws;
#pragma unroll
  for (int v = 0; v < 4; ++v) {
    const T e[2] = {static_cast<T>(x0[v]), static_cast<T>(x1[v])};
    uint32_t w;
    memcpy(&w, e, sizeof(w));
    p[v * ws] = w;
  }
}

// The shared memory the runtime keeps for itself in every CTA (sm_80 and sm_90).
constexpr size_t kReservedSmemPerBlock = 1024;
// [columns] The basis columns one launch takes: all k where the staged basis fits the
// device's per-block shared memory, else the fewest launches of at most `kc` columns
// (a multiple of 8: k = 128 at d = 768 takes 64 on an H100, 48 on an A100); 0 where
// the kernel does not take these rows at all (d above P's kMaxRowD, a GPU before sm_80,
// not even 8 columns fit), and the caller runs tile::run_rows.
inline size_t smem_limit() {
  return std::min<size_t>(kMaxDynamicSmem, at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
}
// GRADPROJ_CUDA_TENSOR_CORES=0 in the environment: no launch takes the tensor cores, every
// row the FMA engine (tile.cuh): an escape hatch, and how a GPU run times the two engines
// against each other. Read at every launch decision (a getenv), so it can be changed
// between calls.
inline bool tensor_cores_enabled() {
  const char* v = std::getenv("GRADPROJ_CUDA_TENSOR_CORES");
  return v == nullptr || std::strcmp(v, "0") != 0;
}
// `max_d`: the policy's kMaxRowD. The columns leave room for the largest [row cache]
// (AdamW's), whatever the policy: AdamW's later column blocks are projection launches of
// the same columns.
inline int64_t columns_per_launch(int64_t d, int64_t k, int64_t max_d) {
  if (d > max_d || k < 1 || !tensor_cores_enabled()) return 0;
  if (at::cuda::getCurrentDeviceProperties()->major < 8) return 0;  // no tf32 MMAs
  const size_t limit = smem_limit();
  Geometry g{};
  g.d = d;
  g.nblk = static_cast<int>((d + 15) / 16);
  g.warps = kWarps;  // ([16 warps] run_columns takes them where they fit beside these columns)
  g.row_bytes = static_cast<int>(kMaxRowBytes);
  for (int64_t launches = 1;; ++launches) {
    const int64_t kc = round_up((k + launches - 1) / launches, 8);
    g.kp = kc;
    g.coef_ld = coef_ld_for(kc);
    if (smem_bytes(g) <= limit) return std::min(kc, k);
    if (kc == 8) return 0;
  }
}
template <class P>
int64_t columns_per_launch(int64_t d, int64_t k) {
  return columns_per_launch(d, k, kMaxRowD<P>);
}

template <class P, int NB, bool kPairs, int W, bool kStacked = false, bool kRaw = false>
void launch(const P& pol, const Geometry& g, const at::Tensor& basis, const float* weights) {
  const void* fn = reinterpret_cast<const void*>(mma_rows_kernel<P, NB, kPairs, W, kStacked, kRaw>);
  // columns_per_launch and run_columns chose the columns and layout to fit this very limit;
  // smem_bytes sizes the layout by g.pairs, g.stacked, g.warps and g.row_bytes, the kernel
  // by kPairs, kStacked, W and sizeof(P::Row)
  TORCH_INTERNAL_ASSERT(g.pairs == kPairs && g.raw == kRaw && g.stacked == kStacked && g.warps == W &&
                        g.row_bytes == sizeof(typename P::Row));
  TORCH_INTERNAL_ASSERT(smem_bytes(g) <= allow_dynamic_smem(fn, kMaxDynamicSmem));
  const at::Tensor frag = packed_basis(
      basis, kRaw     ? BasisLayout::kMmaRawPairs
             : kPairs ? BasisLayout::kMmaPairs
             : g.stacked ? BasisLayout::kMmaStacked : BasisLayout::kMmaFragments);
  launch_kernel<kMaxDynamicSmem>(
      mma_rows_kernel<P, NB, kPairs, W, kStacked, kRaw>, g.n_tiles, W * 32, smem_bytes(g), pol, g,
      reinterpret_cast<const float4*>(frag.data_ptr<float>()), weights);
}

template <class P, int NB, int W = kWarps>
void launch_layout(const P& pol, Geometry g, const at::Tensor& basis, const float* weights) {
  if constexpr (kRawPairsAt<P, NB, W>) {
    if (g.pairs && g.raw) return launch<P, NB, true, W, false, true>(pol, g, basis, weights);
  } else if (g.raw) {
    // [raw pairs] AdamW's rows where they spilled: the fragments, whose k padded to 8 is
    // raw's (run_columns takes raw only then), and whose plain coefficient tile is AdamW's
    g.pairs = false;
    g.raw = false;
  }
  if constexpr (P::kExactTf32 || kFp32Pairs<P>) {
    if (g.pairs) return launch<P, NB, true, W>(pol, g, basis, weights);
  }
  if constexpr (P::kExactTf32 && !P::kUpdates) {  // [stacked]
    if (g.stacked) return launch<P, NB, false, W, true>(pol, g, basis, weights);
  }
  launch<P, NB, false, W>(pol, g, basis, weights);
}

// One launch: the projection of `total_rows` rows (the policy's table) on the basis columns
// [c0, c0 + kc) (kc at most columns_per_launch), with their weights and anchors.
template <class P>
void run_columns(const P& pol, int64_t total_rows, const at::Tensor& basis, const float* weights,
                 bool anchored, int64_t c0, int64_t kc) {
  Geometry g{};
  g.d = basis.size(0);
  g.k = kc;
  g.kp = round_up(kc, 8);
  g.total_rows = total_rows;
  g.n_tiles = (total_rows + kTileRows - 1) / kTileRows;
  g.nblk = static_cast<int>((g.d + 15) / 16);
  g.coef_ld = coef_ld_for(g.kp, !P::kUpdates);
  g.row_data = anchored || weights != nullptr;
  g.c0 = static_cast<int>(c0);  // c0 < k <= d <= kMaxD
  g.pairs = false;
  g.raw = false;
  g.stacked = false;
  g.warps = kWarps;
  g.row_bytes = static_cast<int>(sizeof(typename P::Row));
  {
    // [16 warps] where their partial sums fit beside the launch's columns (kc was sized for
    // 8 warps' partial sums: 8 KiB fewer). fp32 contiguous projection rows run two CTAs of 8
    // warps an SM where two staged bases fit its shared memory (128 registers), so they take
    // 16 only where two do not (an A100 from k = 17 at d = 768, an H100 past 32).
    Geometry wide = g;
    wide.warps = kWideWarps;
    bool width = g.nblk > kSixteenWarpsFrom && g.nblk <= kSixteenWarpsTo<P>;
    if constexpr (!P::kUpdates && !P::kExactTf32 && P::kVector) {  // fp32 projection rows
      const size_t per_sm = at::cuda::getCurrentDeviceProperties()->sharedMemPerMultiprocessor;
      width = width && 2 * (smem_bytes(g) + kReservedSmemPerBlock) > per_sm;
    }
    if (width && smem_bytes(wide) <= smem_limit()) g = wide;
  }
  if constexpr (kRawPairs<P>) {  // [pairs] where U fits twice, from k = 9, no anchors
    Geometry split = g;
    split.pairs = true;
    split.kp = round_up(kc, 16);
    split.coef_ld = coef_ld_for(split.kp, !P::kUpdates);
    // [raw pairs] elsewhere from k = 9: U once, in pairs' order, where pairs' k padded to 16
    // adds no k-step to the fragments' k padded to 8
    Geometry raw = split;
    raw.raw = true;
    if (P::kExactTf32 && kc > 8 && !anchored && smem_bytes(split) <= smem_limit()) {
      g = split;
    } else if (kc > 8 && raw.kp == g.kp && smem_bytes(raw) <= smem_limit()) {
      g = raw;
    }
  }
  if constexpr (kFp32Pairs<P>) {
    // [fp32 pairs] U staged split where k > 8, the rows have no anchors (as [pairs]), k
    // padded to 16 adds no k-step to the fragments' k padded to 8 (as [raw pairs]; at
    // d = 768, k = 24 on an H100 the fourth k-step cost more than the splits saved:
    // predicted 83 -> 80 % of copy), and shared memory leaves the SM as many resident
    // warps: two CTAs of 8 warps, or one of 16 ([16 warps] rows). Two of 8 are counted
    // wherever shared memory holds them (as registers do, 128 or fewer): by kMinBlocks,
    // strided rows of 320 columns lost their second CTA on an A100 (38 -> 23 %, k = 32).
    const size_t per_sm = at::cuda::getCurrentDeviceProperties()->sharedMemPerMultiprocessor;
    auto resident = [&](const Geometry& x) -> size_t {
      const size_t bytes = smem_bytes(x);
      if (bytes > smem_limit()) return 0;
      const size_t by_smem = per_sm / (bytes + kReservedSmemPerBlock);
      return std::min<size_t>(x.warps == kWarps ? 2 : 1, by_smem) * x.warps;
    };
    Geometry split = g;
    split.pairs = true;
    split.warps = kWarps;
    split.kp = round_up(kc, 16);
    split.coef_ld = coef_ld_for(split.kp, true);
    Geometry wide = split;
    wide.warps = kWideWarps;
    const bool width = g.nblk > kSixteenWarpsFrom && g.nblk <= kSixteenWarpsTo<P>;
    if (kc > 8 && !anchored && split.kp == g.kp) {
      const size_t now = resident(g);
      if (resident(split) >= now) {
        g = split;
      } else if (width && resident(wide) >= now) {
        g = wide;
      }
    }
  }
  if constexpr (P::kExactTf32 && !P::kUpdates) {  // [stacked] one group of columns
    Geometry stack = g;
    stack.stacked = true;
    stack.kp = 16;
    stack.coef_ld = coef_ld_for(stack.kp);
    if (kc <= 8 && smem_bytes(stack) <= smem_limit()) g = stack;
  }
  if (total_rows == 0) return;
  const at::Tensor cols = basis.narrow(1, c0, kc);
  const float* w = weights != nullptr ? weights + c0 : nullptr;
  // Blocks per warp: the fewest of {2, 3, 4, 6, 8, 10} whose 8 warps cover d (at most P's
  // kMaxRowD: columns_per_launch declines wider rows, and only those NB are compiled).
  TORCH_INTERNAL_ASSERT(g.d <= kMaxRowD<P>, "rows wider than the policy's kMaxRowD");
  if (g.warps == kWideWarps) {  // [16 warps] 3 or 4 blocks a warp
    if (g.nblk <= 3 * kWideWarps) return launch_layout<P, 3, kWideWarps>(pol, g, cols, w);
    if constexpr (kSixteenWarpsTo<P> > 3 * kWideWarps) {
      return launch_layout<P, 4, kWideWarps>(pol, g, cols, w);
    }
  }
  const int per_warp = (g.nblk + kWarps - 1) / kWarps;
  if (per_warp <= 2) return launch_layout<P, 2>(pol, g, cols, w);
  if (per_warp <= 3) return launch_layout<P, 3>(pol, g, cols, w);
  if (per_warp <= 4) return launch_layout<P, 4>(pol, g, cols, w);
  if (per_warp <= 6) return launch_layout<P, 6>(pol, g, cols, w);
  if constexpr (kMaxRowD<P> >= 8 * 16 * kWarps) {
    if (per_warp <= 8) return launch_layout<P, 8>(pol, g, cols, w);
  }
  if constexpr (kMaxRowD<P> > 8 * 16 * kWarps) return launch_layout<P, 10>(pol, g, cols, w);
}

// The projection of `total_rows` rows on the basis columns [c0, k), launches of
// `kc` = columns_per_launch columns ([columns]).
template <class P>
void run_from(const P& pol, int64_t total_rows, const at::Tensor& basis, const float* weights,
              bool anchored, int64_t kc, int64_t c0) {
  const int64_t k = basis.size(1);
  for (; c0 < k; c0 += kc) {
    run_columns(pol, total_rows, basis, weights, anchored, c0, std::min(kc, k - c0));
  }
}

// Runs the projection of `total_rows` rows (the policy's table) on tensor cores and
// returns true, or returns false, having done nothing, where columns_per_launch is 0
// (the caller then runs tile::run_rows).
template <class P>
bool run(const P& pol, int64_t total_rows, const at::Tensor& basis, const float* weights,
         bool anchored) {
  const int64_t kc = columns_per_launch<P>(basis.size(0), basis.size(1));
  if (kc == 0) return false;
  run_from(pol, total_rows, basis, weights, anchored, kc, 0);
  return true;
}

// project.cu's anchored projection (ProjectPolicy over `entries`, contiguous 16-byte rows
// where vector_rows, else strided; ProjectPairPolicy where pairs, [row pairs]) on the
// basis columns [c0, k), launches of `kc` (columns_per_launch) columns: how adamw.cu
// projects a param's later column blocks once its first launch, on columns [0, kc), has
// taken the AdamW step (c0 = kc), and [wide] rows whose step ran alone (c0 = 0).
template <typename T>
void project_anchored_from(const std::vector<MatrixEntry>& entries, int64_t total_rows,
                           bool vector_rows, bool pairs, const at::Tensor& basis,
                           const float* weights, int64_t kc, int64_t c0);

}  // namespace gradproj::cuda::mma_rows
