// How the CPU kernels split rows over OpenMP threads (gate_ops.cpp and fused_gate.cpp): serial for
// small inputs or inside an enclosing parallel region, else at::get_num_threads() threads over
// chunks of about 16K elements; and run_items, the work queue of gated_linear.cpp and gate_net.cpp.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace mmea {

constexpr int64_t kParallelMinElements = 1 << 15;

inline int num_threads_for(int64_t elements) {
#ifdef _OPENMP
  if (elements < kParallelMinElements || at::in_parallel_region()) return 1;
  return std::max(1, at::get_num_threads());
#else
  (void)elements;
  return 1;
#endif
}

// Rows per chunk of a parallel loop over rows of D columns (about 16K elements).
inline int64_t rows_per_chunk(int64_t D) { return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(D, 1)); }

// work(k, scratch) for k < n on up to nt threads taking items from a shared counter; scratch is
// the per-thread buffer make() returns. BLAS and ATen calls inside skip the autograd layers, and BLAS
// always runs on one thread, so the bits of a result depend on how the items are cut, never on the
// number of threads: MKL's GEMM gives rows other bits on two threads than on one (measured:
// [5, 7] x [7, 23], float64, 7e-16), and it runs on one thread inside an active OpenMP region. The
// serial case therefore runs on thread 0 of a two-thread region when more than one thread is set
// (one fork and join, about a microsecond; mkl_set_num_threads_local, the direct way, crashes in
// the MKL that torch links).
template <typename Make, typename Work>
void run_items(int64_t n, int nt, Make&& make, Work&& work) {
  if (n == 0) return;
  if (nt <= 1 || n == 1) {
    auto serial = [&] {
      at::AutoDispatchBelowADInplaceOrView guard;
      auto scratch = make();
      for (int64_t k = 0; k < n; ++k) work(k, scratch);
    };
#ifdef _OPENMP
    if (!at::in_parallel_region() && at::get_num_threads() > 1) {
      at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t) {
        if (begin == 0) serial();
      });
      return;
    }
#endif
    serial();
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto scratch = make();
    for (int64_t k = next++; k < n; k = next++) work(k, scratch);
  });
}

}  // namespace mmea
