#pragma once
// One rule for when the CPU kernels fork: only when there is enough work.

#include <ATen/Parallel.h>

#include <cstdint>

namespace gradproj::cpu {

// Below this many multiply-adds a parallel region costs more than it saves: an
// OpenMP fork/join is ~10 us on an idle machine, and milliseconds when the cores
// are oversubscribed (measured: surgery on 8 tensors of 32x32 took 47 us on one
// thread and 15-30 ms with two threads on a loaded 2-core machine). The items'
// results never depend on how they are split, so this changes speed only.
constexpr int64_t kSerialWork = int64_t{1} << 16;

// f(first, last) over items [0, n): inline when `work` is small, else at::parallel_for.
template <typename F>
void parallel_items(int64_t n, int64_t work, const F& f) {
  if (n <= 0) return;
  if (work < kSerialWork || n == 1 || at::get_num_threads() == 1) {
    f(0, n);
    return;
  }
  at::parallel_for(0, n, 1, f);
}

}  // namespace gradproj::cpu
