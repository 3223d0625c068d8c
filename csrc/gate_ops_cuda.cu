// CUDA kernels of the two gate primitives (see gate_ops.cpp for the operator schemas and the
// CPU kernels). Compiled only when torch is a CUDA build and nvcc is found (setup.py).
//
// * gate_mul: a 2-D grid, columns over threads (blockIdx.y picks a tile of columns) and rows over
//   blockIdx.x (grid-stride); each thread reads the gate of its column once and then walks rows:
//   no division per element, coalesced row-major loads. The gate value comes from gates (row
//   stride 0 for shared gates).
// * seg_dot: the same 2-D grid over (rows, gates); one thread per (row, gate) reads the gate's
//   columns from gate_cols [G, W] (-1 padded). shared: one thread per (row chunk, gate) sums
//   kRowsPerChunk rows into a partial buffer [num_chunks, G] (accumulation type), then at::sum
//   over the chunks (a parallel tree reduction; deterministic). No atomics.
//
// fp16/bf16 accumulate in fp32 (at::opmath_type). Table values are not range-checked on the
// device (that would need a synchronisation): they come from LayoutTables.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"

#include <algorithm>
#include <cstdint>

namespace mmea {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxRowBlocks = 16384;  // blockIdx.x walks the rows (grid-stride)
constexpr int64_t kMaxBlocks = 8192;
constexpr int64_t kRowsPerChunk = 64;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned int grid_for(int64_t work) {
  return static_cast<unsigned int>(std::max<int64_t>(std::min<int64_t>(ceil_div(work, kThreads), kMaxBlocks), 1));
}

// Threads per block for `width` columns (a multiple of the warp size, at most kThreads), and the
// 2-D grid (row blocks, column tiles) of the row-walking kernels. Column tiles stay far below
// CUDA's 65,535 limit of grid dimension y (width / 256 tiles).
inline int threads_for(int64_t width) {
  return static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, ceil_div(width, 32) * 32)));
}

inline dim3 row_grid(int64_t rows, int64_t width, int threads) {
  return dim3(static_cast<unsigned int>(std::max<int64_t>(std::min<int64_t>(rows, kMaxRowBlocks), 1)),
              static_cast<unsigned int>(std::max<int64_t>(ceil_div(width, threads), 1)));
}

// The column (gate_mul) or gate (seg_dot) of this thread in the row-walking kernels (blockIdx.y
// picks a tile of them); the kernels then walk rows n = blockIdx.x, + gridDim.x, ...
__device__ __forceinline__ int64_t tile_index() { return static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; }

// s + the sum of a[c] * b[c] over the columns c of one gate (cols: its -1 padded list of W columns).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t add_gate_dot(acc_t s, const scalar_t* __restrict__ ar,
                                              const scalar_t* __restrict__ br, const int32_t* __restrict__ cols,
                                              int64_t W) {
  for (int64_t k = 0; k < W; ++k) {
    const int32_t c = cols[k];
    if (c < 0) break;  // -1 padding comes last
    s += static_cast<acc_t>(ar[c]) * static_cast<acc_t>(br[c]);
  }
  return s;
}

template <typename scalar_t>
__global__ void gate_mul_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ gates,
                                const int32_t* __restrict__ gate_of_column, scalar_t* __restrict__ y, int64_t N,
                                int64_t D, int64_t gate_row_stride, bool keep_ungated) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = tile_index();
  if (c >= D) return;
  const int32_t g = gate_of_column[c];
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const int64_t i = n * D + c;
    if (g >= 0) {
      y[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * static_cast<acc_t>(gates[n * gate_row_stride + g]));
    } else {
      y[i] = keep_ungated ? x[i] : static_cast<scalar_t>(0);
    }
  }
}

// out[n, g] = sum over the columns of gate g of a[n, c] * b[n, c]; one thread per (n, g).
template <typename scalar_t>
__global__ void seg_dot_rows_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                    const int32_t* __restrict__ gate_cols, scalar_t* __restrict__ out, int64_t N,
                                    int64_t D, int64_t G, int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t g = tile_index();
  if (g >= G) return;
  const int32_t* cols = gate_cols + g * W;
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x)
    out[n * G + g] = static_cast<scalar_t>(add_gate_dot(acc_t(0), a + n * D, b + n * D, cols, W));
}

// partial[ch, g] = sum over rows ch*kRowsPerChunk .. of the gate-g sums; one thread per (ch, g).
template <typename scalar_t>
__global__ void seg_dot_partial_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                       const int32_t* __restrict__ gate_cols,
                                       at::opmath_type<scalar_t>* __restrict__ partial, int64_t N, int64_t D,
                                       int64_t G, int64_t W, int64_t nchunks) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = nchunks * G;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t ch = i / G;
    const int64_t g = i - ch * G;
    const int32_t* cols = gate_cols + g * W;
    const int64_t n0 = ch * kRowsPerChunk;
    const int64_t n1 = (n0 + kRowsPerChunk < N) ? n0 + kRowsPerChunk : N;
    acc_t s = acc_t(0);
    for (int64_t n = n0; n < n1; ++n) s = add_gate_dot(s, a + n * D, b + n * D, cols, W);
    partial[i] = s;
  }
}

// kernel<<<grid, threads>>>(args...) on the current stream, then the launch check.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, int threads, Args... args) {
  kernel<<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A row-walking kernel over `width` columns (or gates) of N rows.
template <typename Kernel, typename... Args>
void launch_rows(Kernel kernel, int64_t N, int64_t width, Args... args) {
  const int threads = threads_for(width);
  launch(kernel, row_grid(N, width, threads), threads, args...);
}

at::Tensor gate_mul_cuda(const at::Tensor& x_in, const at::Tensor& gates_in, const at::Tensor& gate_of_column_in,
                         bool keep_ungated) {
  const GateMulShape shape = check_gate_mul(x_in, gates_in, gate_of_column_in, at::kCUDA);
  const int64_t N = shape.N, D = shape.D;
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor gates = gates_in.contiguous();
  const at::Tensor goc = gate_of_column_in.contiguous();
  at::Tensor y = at::empty({N, D}, x.options());
  if (N == 0 || D == 0) return y;
  const int64_t gate_row_stride = shape.shared ? 0 : shape.G;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmea_gate_mul_cuda", [&] {
    launch_rows(gate_mul_kernel<scalar_t>, N, D, x.const_data_ptr<scalar_t>(), gates.const_data_ptr<scalar_t>(),
                goc.const_data_ptr<int32_t>(), y.mutable_data_ptr<scalar_t>(), N, D, gate_row_stride, keep_ungated);
  });
  return y;
}

at::Tensor seg_dot_cuda(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& gate_of_column,
                        const at::Tensor& gate_cols_in, bool shared) {
  const SegDotShape shape = check_seg_dot(a_in, b_in, gate_of_column, gate_cols_in, at::kCUDA);
  const int64_t N = shape.N, D = shape.D, G = shape.G, W = shape.W;
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous();
  const at::Tensor b = b_in.contiguous();
  const at::Tensor gate_cols = gate_cols_in.contiguous();

  if (shared) {
    if (N == 0 || G == 0) return at::zeros({G}, a.options());
    const auto acc_type = at::toOpMathType(a.scalar_type());
    const int64_t nchunks = ceil_div(N, kRowsPerChunk);
    at::Tensor partial = at::empty({nchunks, G}, a.options().dtype(acc_type));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "mmea_seg_dot_shared_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      launch(seg_dot_partial_kernel<scalar_t>, dim3(grid_for(nchunks * G)), kThreads, a.const_data_ptr<scalar_t>(),
             b.const_data_ptr<scalar_t>(), gate_cols.const_data_ptr<int32_t>(), partial.mutable_data_ptr<acc_t>(), N,
             D, G, W, nchunks);
    });
    return partial.sum(0).to(a.scalar_type());  // parallel tree reduction over the chunks
  }

  at::Tensor out = at::empty({N, G}, a.options());
  if (N == 0 || G == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "mmea_seg_dot_cuda", [&] {
    launch_rows(seg_dot_rows_kernel<scalar_t>, N, G, a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                gate_cols.const_data_ptr<int32_t>(), out.mutable_data_ptr<scalar_t>(), N, D, G, W);
  });
  return out;
}

}  // namespace
}  // namespace mmea

TORCH_LIBRARY_IMPL(mmea_kernels_ext, CUDA, m) {
  m.impl("gate_mul", &mmea::gate_mul_cuda);
  m.impl("seg_dot", &mmea::seg_dot_cuda);
}
