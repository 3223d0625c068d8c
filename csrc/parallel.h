// How the CPU kernels split rows over OpenMP threads (gate_ops.cpp and fused_gate.cpp): serial for
// small inputs or inside an enclosing parallel region, else at::get_num_threads() threads over
// chunks of about 16K elements.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
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

}  // namespace mmea
