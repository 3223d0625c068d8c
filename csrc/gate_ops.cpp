// CPU kernels of the two gate primitives of mmea_kernels, registered as torch operators
// ``torch.ops.mmea_kernels_ext.gate_mul`` and ``torch.ops.mmea_kernels_ext.seg_dot``.
//
//   gate_mul(x [N,D], gates [N,G] or [G], gate_of_column int32 [D], keep_ungated) -> y [N,D]
//       y[n,c] = x[n,c] * gates[n, gate(c)]; columns with gate(c) == -1 (0e) are copied
//       (keep_ungated) or set to 0.
//   seg_dot(a [N,D], b [N,D], gate_of_column int32 [D], gate_cols int32 [G,W], shared) -> [N,G] or [G]
//       out[n,j] = sum_{c: gate(c)=j} a[n,c]*b[n,c]; shared also sums over n.
//       gate_cols (the -1 padded column list of every gate) gives G and is what the CUDA kernel
//       reads; the CPU kernel reads gate_of_column only.
//
// One pass over the features. The column -> gate table is compressed once per call (O(D)) into
// runs of consecutive columns: kBlock runs of `count` gates with `len` columns each (mul_ir: the
// 2l+1 columns of one multiplicity share a gate; len 1/3/5/7/9 get fully unrolled loops, blocks.h),
// kStep runs whose gate increases by one per column (ir_mul: one m-row of a block; unit-stride,
// vectorised) and ungated runs (0e columns). Rows are split into chunks that an OpenMP
// ``parallel for`` distributes (threads: at::get_num_threads(); serial for small inputs or inside
// a parallel region). fp16/bf16 accumulate in fp32 (at::opmath_type); the ops accept any strides
// (non-contiguous inputs are made contiguous first).
//
// * gate_mul with shared gates expands them once into a per-column scale: each row is then a
//   single vectorised multiply. Ungated columns are copied, or set to exact zeros.
// * seg_dot per row accumulates into a per-thread [G] buffer, in column order (mul_ir runs of
//   2l+1 = 3, 5, 7: the row's products first, then the per-gate sums; per-ISA clones, isa.h).
// * shared seg_dot is deterministic and independent of the thread count: every fixed chunk of
//   kSharedChunkRows rows sums a*b column by column (four rows per sweep, vectorised), folds the
//   column sums into its own row of gate partials, and the partials are added in chunk order.
//   No atomics.
#ifndef MMEA_NO_PYTHON  // the LAMMPS plugins' copy of the kernels (lammps_plugin/build.sh) has no Python
#include <Python.h>
#endif

#include "checks.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "blocks.h"
#include "isa.h"
#include "parallel.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace mmea {
namespace {

// Rows per chunk of the partial sums of shared seg_dot. Fixed (never derived from the thread
// count) so that the result is bitwise reproducible across runs and thread counts.
constexpr int64_t kSharedChunkRows = 64;

// A run of consecutive columns with a regular column -> gate pattern.
enum class RunKind : int { kUngated, kBlock, kStep };
struct Run {
  RunKind kind;
  int64_t col;    // first column
  int64_t len;    // kBlock: columns per gate; kStep / kUngated: number of columns
  int64_t count;  // kBlock: number of gates (gate + i owns columns col + i*len .. col + (i+1)*len - 1)
  int64_t gate;   // first gate (-1 for kUngated)
  int64_t ncols() const { return kind == RunKind::kBlock ? len * count : len; }
};
// kBlock is the mul_ir pattern (the 2l+1 columns of one multiplicity share a gate);
// kStep is the ir_mul pattern (one m-row of a block: column col + k has gate + k).

// Compress gate_of_column (contiguous int32 on CPU) into runs, checking every entry.
std::vector<Run> make_runs(const at::Tensor& gate_of_column, int64_t num_gates, const char* op) {
  const int32_t* goc = gate_of_column.const_data_ptr<int32_t>();
  const int64_t D = gate_of_column.numel();
  // 1) maximal runs of one gate (kBlock with count 1), of gate + k (kStep) or of ungated columns
  std::vector<Run> runs;
  runs.reserve(64);
  for (int64_t c = 0; c < D; ++c) {
    const int64_t g = goc[c];
    TORCH_CHECK(g >= -1 && g < num_gates, "mmea_kernels_ext::", op, ": gate_of_column[", c, "] = ", g,
                " is out of range: expected -1 (ungated) or a gate index in [0, ", num_gates,
                ") (num_gates comes from the gates / gate_cols argument)");
    if (!runs.empty()) {
      Run& r = runs.back();
      if (g < 0) {
        if (r.kind == RunKind::kUngated) {
          ++r.len;
          continue;
        }
      } else if (r.kind == RunKind::kBlock && g == r.gate) {
        ++r.len;
        continue;
      } else if (r.len == 1 && g == r.gate + 1 && r.kind == RunKind::kBlock) {
        r.kind = RunKind::kStep;
        ++r.len;
        continue;
      } else if (r.kind == RunKind::kStep && g == r.gate + r.len) {
        ++r.len;
        continue;
      }
    }
    if (g < 0) {
      runs.push_back(Run{RunKind::kUngated, c, 1, 1, -1});
    } else {
      runs.push_back(Run{RunKind::kBlock, c, 1, 1, g});
    }
  }
  // 2) merge consecutive one-gate runs of equal width whose gates follow each other
  std::vector<Run> merged;
  merged.reserve(runs.size());
  for (const Run& r : runs) {
    if (!merged.empty() && r.kind == RunKind::kBlock) {
      Run& m = merged.back();
      if (m.kind == RunKind::kBlock && m.len == r.len && r.gate == m.gate + m.count && r.col == m.col + m.ncols()) {
        ++m.count;
        continue;
      }
    }
    merged.push_back(r);
  }
  return merged;
}


// ----------------------------------------------------------------------------- gate_mul
template <typename scalar_t>
void gate_mul_row(const scalar_t* __restrict__ xr, const scalar_t* __restrict__ gr, scalar_t* __restrict__ yr,
                  const std::vector<Run>& runs, bool keep_ungated) {
  for (const Run& r : runs) {
    const scalar_t* __restrict__ xs = xr + r.col;
    scalar_t* __restrict__ ys = yr + r.col;
    const int64_t len = r.len;
    switch (r.kind) {
      case RunKind::kUngated:
        if (keep_ungated) {
          std::copy(xs, xs + len, ys);
        } else {
          std::fill(ys, ys + len, scalar_t(0));
        }
        break;
      case RunKind::kBlock:
        with_width<1, 3, 5, 7, 9>(len, [&](auto w) { scale_blocks(xs, gr + r.gate, ys, w, r.count); });
        break;
      case RunKind::kStep:
        scale_blocks(xs, gr + r.gate, ys, std::integral_constant<int, 1>{}, len);
        break;
    }
  }
}

// Shared gates: expand them once into a per-column scale, then every row is one vectorised
// multiply; ungated columns are then overwritten with exact zeros when !keep_ungated.
template <typename scalar_t>
void gate_mul_shared_rows(const scalar_t* __restrict__ x, const std::vector<at::opmath_type<scalar_t>>& scale,
                          scalar_t* __restrict__ y, int64_t n0, int64_t n1, int64_t D,
                          const std::vector<Run>& zero_runs) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* __restrict__ sc = scale.data();
  for (int64_t n = n0; n < n1; ++n) {
    const scalar_t* __restrict__ xr = x + n * D;
    scalar_t* __restrict__ yr = y + n * D;
    for (int64_t c = 0; c < D; ++c) yr[c] = static_cast<scalar_t>(static_cast<acc_t>(xr[c]) * sc[c]);
    for (const Run& r : zero_runs) std::fill(yr + r.col, yr + r.col + r.ncols(), scalar_t(0));
  }
}


template <typename scalar_t>
void gate_mul_kernel(const scalar_t* xp, const scalar_t* gp, scalar_t* yp, int64_t N, int64_t D, int64_t G,
                     bool shared, const std::vector<Run>& runs, bool keep_ungated) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t chunk = rows_per_chunk(D);
  const int64_t nchunks = (N + chunk - 1) / chunk;
  const int nt = num_threads_for(N * D);
  if (shared) {
    std::vector<acc_t> scale(static_cast<size_t>(D));
    std::vector<Run> zero_runs;
    for (const Run& r : runs) {
      for (int64_t k = 0; k < r.ncols(); ++k) {
        const int64_t g = r.kind == RunKind::kUngated ? -1 : r.kind == RunKind::kBlock ? r.gate + k / r.len : r.gate + k;
        scale[r.col + k] = g < 0 ? acc_t(1) : static_cast<acc_t>(gp[g]);
      }
      if (r.kind == RunKind::kUngated && !keep_ungated) zero_runs.push_back(r);
    }
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const int64_t n0 = ch * chunk;
      const int64_t n1 = std::min(N, n0 + chunk);
      gate_mul_shared_rows<scalar_t>(xp, scale, yp, n0, n1, D, zero_runs);
    }
  } else {
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const int64_t n0 = ch * chunk;
      const int64_t n1 = std::min(N, n0 + chunk);
      for (int64_t n = n0; n < n1; ++n) gate_mul_row<scalar_t>(xp + n * D, gp + n * G, yp + n * D, runs, keep_ungated);
    }
  }
}

at::Tensor gate_mul_cpu(const at::Tensor& x_in, const at::Tensor& gates_in, const at::Tensor& gate_of_column_in,
                        bool keep_ungated) {
  const GateMulShape shape = check_gate_mul(x_in, gates_in, gate_of_column_in, at::kCPU);
  const int64_t N = shape.N, D = shape.D, G = shape.G;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor gates = gates_in.contiguous();
  const at::Tensor goc = gate_of_column_in.contiguous();
  const std::vector<Run> runs = make_runs(goc, G, "gate_mul");
  at::Tensor y = at::empty({N, D}, x.options());
  if (N == 0 || D == 0) return y;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmea_gate_mul_cpu", [&] {
    gate_mul_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), gates.const_data_ptr<scalar_t>(),
                              y.mutable_data_ptr<scalar_t>(), N, D, G, shape.shared, runs, keep_ungated);
  });
  return y;
}

// ----------------------------------------------------------------------------- seg_dot
// acc[g] += sum of v over the columns of gate g (v: per-column values in the accumulation type).
template <typename acc_t>
void segment_sum_accumulate(const acc_t* __restrict__ v, acc_t* __restrict__ acc, const std::vector<Run>& runs) {
  for (const Run& r : runs) {
    const acc_t* __restrict__ vs = v + r.col;
    switch (r.kind) {
      case RunKind::kUngated:
        break;
      case RunKind::kBlock:
        for (int64_t i = 0; i < r.count; ++i) {
          acc_t s = vs[i * r.len];
          for (int64_t m = 1; m < r.len; ++m) s += vs[i * r.len + m];
          acc[r.gate + i] += s;
        }
        break;
      case RunKind::kStep:
        for (int64_t k = 0; k < r.len; ++k) acc[r.gate + k] += vs[k];
        break;
    }
  }
}

// Shared: every fixed chunk of kSharedChunkRows rows sums a*b over its rows column by column
// (unit-stride, vectorised), folds the column sums into its own row of gate partials, and the
// partials are then added in chunk order. Deterministic for any thread count; no atomics.
template <typename scalar_t>
void seg_dot_shared_kernel(const scalar_t* ap, const scalar_t* bp, at::opmath_type<scalar_t>* res, int64_t N,
                           int64_t D, int64_t G, const std::vector<Run>& runs) {
  using acc_t = at::opmath_type<scalar_t>;
  // contiguous spans of gated columns: the only columns whose products are needed
  std::vector<std::pair<int64_t, int64_t>> spans;
  for (const Run& r : runs) {
    if (r.kind == RunKind::kUngated) continue;
    if (!spans.empty() && spans.back().second == r.col) {
      spans.back().second = r.col + r.ncols();
    } else {
      spans.emplace_back(r.col, r.col + r.ncols());
    }
  }
  const int64_t nchunks = (N + kSharedChunkRows - 1) / kSharedChunkRows;
  std::vector<acc_t> partial(static_cast<size_t>(nchunks * G), acc_t(0));
  acc_t* pp = partial.data();
  const int nt = num_threads_for(N * D);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<acc_t> colsum(static_cast<size_t>(D), acc_t(0));
    acc_t* __restrict__ cs = colsum.data();
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const int64_t n0 = ch * kSharedChunkRows;
      const int64_t n1 = std::min(N, n0 + kSharedChunkRows);
      for (const auto& sp : spans) std::fill(cs + sp.first, cs + sp.second, acc_t(0));
      int64_t n = n0;
      // four rows per sweep: a quarter of the loads/stores of the column sums
      for (; n + 4 <= n1; n += 4) {
        const scalar_t* __restrict__ a0 = ap + n * D;
        const scalar_t* __restrict__ a1 = a0 + D;
        const scalar_t* __restrict__ a2 = a1 + D;
        const scalar_t* __restrict__ a3 = a2 + D;
        const scalar_t* __restrict__ b0 = bp + n * D;
        const scalar_t* __restrict__ b1 = b0 + D;
        const scalar_t* __restrict__ b2 = b1 + D;
        const scalar_t* __restrict__ b3 = b2 + D;
        for (const auto& sp : spans)
          for (int64_t c = sp.first; c < sp.second; ++c)
            cs[c] += ((static_cast<acc_t>(a0[c]) * static_cast<acc_t>(b0[c]) +
                       static_cast<acc_t>(a1[c]) * static_cast<acc_t>(b1[c])) +
                      static_cast<acc_t>(a2[c]) * static_cast<acc_t>(b2[c])) +
                     static_cast<acc_t>(a3[c]) * static_cast<acc_t>(b3[c]);
      }
      for (; n < n1; ++n) {
        const scalar_t* __restrict__ ar = ap + n * D;
        const scalar_t* __restrict__ br = bp + n * D;
        for (const auto& sp : spans)
          for (int64_t c = sp.first; c < sp.second; ++c) cs[c] += static_cast<acc_t>(ar[c]) * static_cast<acc_t>(br[c]);
      }
      segment_sum_accumulate<acc_t>(cs, pp + ch * G, runs);
    }
  }
  // the chunk partials added in double: in float32 a running sum over N/64 partials drifted to ~30 ulp
  // at 16M rows (a review), where torch's pairwise sum stays at ~1
  std::vector<double> total(static_cast<size_t>(G), 0.0);
  for (int64_t ch = 0; ch < nchunks; ++ch) {
    const acc_t* src = pp + ch * G;
    for (int64_t j = 0; j < G; ++j) total[j] += static_cast<double>(src[j]);
  }
  for (int64_t j = 0; j < G; ++j) res[j] = static_cast<acc_t>(total[j]);
}

// Rows [n0, n1) of per-row seg_dot (acc: the [G] sums, then a scratch row of D products), compiled
// per ISA (isa.h). A mul_ir run of 2l+1 = 3, 5, 7 columns per gate is done in two vectorised passes
// (the products, then each gate's sum of its 2l+1 consecutive products) instead of one gate at a
// time. 2000 rows, float32, 1 thread on an AVX-512 EPYC, before -> after (three alternating runs):
// 128x0e+128x1o 202-209 -> 144-153 us, 128x0e+128x1o+128x2e+128x3o 2.82-3.03 -> 1.91-2.02 ms
// (a plain a*b of the same tensors: 0.1 and 0.9 ms).
// One mul_ir run of a row: the products into p (one vectorised pass), then each gate's sum of its W
// consecutive products.
template <int W, typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void dot_block_run(const scalar_t* __restrict__ as,
                                                         const scalar_t* __restrict__ bs, acc_t* __restrict__ acc,
                                                         int64_t count, acc_t* __restrict__ p) {
  for (int64_t k = 0; k < count * W; ++k) p[k] = static_cast<acc_t>(as[k]) * static_cast<acc_t>(bs[k]);
  for (int64_t i = 0; i < count; ++i) {
    acc_t s = p[i * W];
    for (int m = 1; m < W; ++m) s += p[i * W + m];
    acc[i] += s;
  }
}

template <typename scalar_t>
__attribute__((always_inline)) inline void seg_dot_rows_body(const scalar_t* ap, const scalar_t* bp, scalar_t* op,
                                                             int64_t n0, int64_t n1, int64_t D, int64_t G,
                                                             const std::vector<Run>& runs,
                                                             at::opmath_type<scalar_t>* acc) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* p = acc + G;  // scratch of D products after the G sums
  for (int64_t n = n0; n < n1; ++n) {
    const scalar_t* ar = ap + n * D;
    const scalar_t* br = bp + n * D;
    std::fill(acc, acc + G, acc_t(0));
    for (const Run& r : runs) {
      const scalar_t* as = ar + r.col;
      const scalar_t* bs = br + r.col;
      if (r.kind == RunKind::kUngated) continue;
      if (r.kind == RunKind::kStep) {
        dot_blocks(as, bs, acc + r.gate, std::integral_constant<int, 1>{}, r.len);
      } else if (r.len == 3) {
        dot_block_run<3>(as, bs, acc + r.gate, r.count, p);
      } else if (r.len == 5) {
        dot_block_run<5>(as, bs, acc + r.gate, r.count, p);
      } else if (r.len == 7) {
        dot_block_run<7>(as, bs, acc + r.gate, r.count, p);
      } else {
        with_width<1, 9>(r.len, [&](auto w) { dot_blocks(as, bs, acc + r.gate, w, r.count); });
      }
    }
    scalar_t* orow = op + n * G;
    for (int64_t j = 0; j < G; ++j) orow[j] = static_cast<scalar_t>(acc[j]);
  }
}

#define MMEA_SEG_DOT_ROWS(SUFFIX, ATTR)                                                                       \
  template <typename scalar_t>                                                                                \
  ATTR void seg_dot_rows##SUFFIX(const scalar_t* ap, const scalar_t* bp, scalar_t* op, int64_t n0, int64_t n1, \
                                 int64_t D, int64_t G, const std::vector<Run>& runs,                          \
                                 at::opmath_type<scalar_t>* acc) {                                            \
    seg_dot_rows_body<scalar_t>(ap, bp, op, n0, n1, D, G, runs, acc);                                         \
  }
MMEA_SEG_DOT_ROWS(_base, )
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
MMEA_SEG_DOT_ROWS(_avx2, __attribute__((target("avx2,fma"))))
MMEA_SEG_DOT_ROWS(_avx512, __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))))
#else
#define seg_dot_rows_avx2 seg_dot_rows_base
#define seg_dot_rows_avx512 seg_dot_rows_base
#endif
#undef MMEA_SEG_DOT_ROWS

template <typename scalar_t>
void seg_dot_rows_kernel(const scalar_t* ap, const scalar_t* bp, scalar_t* op, int64_t N, int64_t D, int64_t G,
                         const std::vector<Run>& runs) {
  using acc_t = at::opmath_type<scalar_t>;
  auto rows = use_avx512() ? &seg_dot_rows_avx512<scalar_t>
              : use_avx2()  ? &seg_dot_rows_avx2<scalar_t>
                            : &seg_dot_rows_base<scalar_t>;
  const int64_t chunk = rows_per_chunk(D);
  const int64_t nchunks = (N + chunk - 1) / chunk;
  const int nt = num_threads_for(N * D);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<acc_t> acc(static_cast<size_t>(G + D));  // the [G] sums, then a row of products
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const int64_t n0 = ch * chunk;
      rows(ap, bp, op, n0, std::min(N, n0 + chunk), D, G, runs, acc.data());
    }
  }
}

at::Tensor seg_dot_cpu(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& gate_of_column_in,
                       const at::Tensor& gate_cols, bool shared) {
  const SegDotShape shape = check_seg_dot(a_in, b_in, gate_of_column_in, gate_cols, at::kCPU);
  const int64_t N = shape.N, D = shape.D, G = shape.G;
  const at::Tensor a = a_in.contiguous();
  const at::Tensor b = b_in.contiguous();
  const std::vector<Run> runs = make_runs(gate_of_column_in.contiguous(), G, "seg_dot");
  const auto acc_type = at::toOpMathType(a.scalar_type());

  if (shared) {
    at::Tensor out = at::zeros({G}, a.options());
    if (N == 0 || G == 0) return out;
    at::Tensor res = at::empty({G}, a.options().dtype(acc_type));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "mmea_seg_dot_shared_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      seg_dot_shared_kernel<scalar_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                                      res.mutable_data_ptr<acc_t>(), N, D, G, runs);
    });
    out.copy_(res);
    return out;
  }

  at::Tensor out = at::empty({N, G}, a.options());
  if (N == 0 || G == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "mmea_seg_dot_cpu", [&] {
    seg_dot_rows_kernel<scalar_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                                  out.mutable_data_ptr<scalar_t>(), N, D, G, runs);
  });
  return out;
}

}  // namespace
}  // namespace mmea

TORCH_LIBRARY(mmea_kernels_ext, m) {
  m.def("gate_mul(Tensor x, Tensor gates, Tensor gate_of_column, bool keep_ungated) -> Tensor");
  m.def("seg_dot(Tensor a, Tensor b, Tensor gate_of_column, Tensor gate_cols, bool shared) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmea_kernels_ext, CPU, m) {
  m.impl("gate_mul", &mmea::gate_mul_cpu);
  m.impl("seg_dot", &mmea::seg_dot_cpu);
}

// `import mmea_kernels._C` loads this library (and so runs the registrations above); the module
// itself only says whether the CUDA kernels were compiled in.
#ifndef MMEA_WITH_CUDA
#define MMEA_WITH_CUDA 0
#endif

#ifdef _OPENMP
#define MMEA_WITH_OPENMP 1
#else
#define MMEA_WITH_OPENMP 0
#endif

#ifndef MMEA_NO_PYTHON
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "mmea_kernels C++/CUDA kernels (torch.ops.mmea_kernels_ext)", -1,
                                          nullptr};
  const mmea::IsaChoice& isa = mmea::isa_choice();
  if (!isa.error.empty()) {  // a bad MMEA_CPU_ISA: the import fails with its name
    PyErr_SetString(PyExc_ValueError, isa.error.c_str());
    return nullptr;
  }
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
  if (PyModule_AddIntConstant(mod, "WITH_CUDA", MMEA_WITH_CUDA) < 0 ||
      PyModule_AddIntConstant(mod, "WITH_OPENMP", MMEA_WITH_OPENMP) < 0 ||
      PyModule_AddStringConstant(mod, "CPU_ISA", mmea::isa_name(isa.isa)) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
}
#endif  // MMEA_NO_PYTHON
