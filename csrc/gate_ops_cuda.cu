// CUDA kernels of the two gate primitives (see gate_ops.cpp for the operator schemas and the
// CPU kernels). Compiled only when torch is a CUDA build and nvcc is found (setup.py).
//
// * gate_mul: one thread per element, grid-stride loop over N*D; the gate of column c comes from
//   gate_of_column[c], the gate value from gates (row stride 0 for shared gates).
// * seg_dot: one thread per (row, gate) reads the gate's columns from gate_cols [G, W] (-1 padded).
//   shared: one thread per (row chunk, gate) sums kRowsPerChunk rows into a partial buffer
//   [num_chunks, G] (accumulation type); the partials are summed over the chunks by a second
//   kernel, one thread per gate in chunk order. Deterministic; no atomics.
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

#include <algorithm>
#include <cstdint>

namespace mmea {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 8192;  // grid-stride loops cover the rest
constexpr int64_t kRowsPerChunk = 64;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned int grid_for(int64_t work) {
  return static_cast<unsigned int>(std::max<int64_t>(std::min<int64_t>(ceil_div(work, kThreads), kMaxBlocks), 1));
}

template <typename scalar_t>
__global__ void gate_mul_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ gates,
                                const int32_t* __restrict__ gate_of_column, scalar_t* __restrict__ y, int64_t N,
                                int64_t D, int64_t gate_row_stride, bool keep_ungated) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = N * D;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t n = i / D;
    const int64_t c = i - n * D;
    const int32_t g = gate_of_column[c];
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
  const int64_t total = N * G;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t n = i / G;
    const int64_t g = i - n * G;
    const int32_t* cols = gate_cols + g * W;
    const scalar_t* ar = a + n * D;
    const scalar_t* br = b + n * D;
    acc_t s = acc_t(0);
    for (int64_t k = 0; k < W; ++k) {
      const int32_t c = cols[k];
      if (c < 0) break;  // -1 padding comes last
      s += static_cast<acc_t>(ar[c]) * static_cast<acc_t>(br[c]);
    }
    out[i] = static_cast<scalar_t>(s);
  }
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
    for (int64_t n = n0; n < n1; ++n) {
      const scalar_t* ar = a + n * D;
      const scalar_t* br = b + n * D;
      for (int64_t k = 0; k < W; ++k) {
        const int32_t c = cols[k];
        if (c < 0) break;
        s += static_cast<acc_t>(ar[c]) * static_cast<acc_t>(br[c]);
      }
    }
    partial[i] = s;
  }
}

// res[g] = sum over chunks (in chunk order) of partial[ch, g]; one thread per gate.
template <typename acc_t>
__global__ void seg_dot_reduce_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ res, int64_t G,
                                      int64_t nchunks) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < G; g += step) {
    acc_t s = acc_t(0);
    for (int64_t ch = 0; ch < nchunks; ++ch) s += partial[ch * G + g];
    res[g] = s;
  }
}

void check_table(const at::Tensor& t, const char* name, const char* op, const at::Tensor& like, int64_t dims) {
  TORCH_CHECK(t.scalar_type() == at::kInt, "mmea_kernels_ext::", op, ": ", name,
              " must be an int32 tensor (LayoutTables.", name, "), got dtype ", t.scalar_type());
  TORCH_CHECK(t.dim() == dims, "mmea_kernels_ext::", op, ": ", name, " must be ", dims, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), "mmea_kernels_ext::", op, ": ", name, " is on ", t.device(),
              " but the features are on ", like.device());
}

void check_features(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 2, "mmea_kernels_ext::", op, ": ", name, " must be 2-D [N, D], got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "mmea_kernels_ext::", op, ": ", name,
              " must be a floating-point tensor, got dtype ", t.scalar_type());
  TORCH_CHECK(t.is_cuda(), "mmea_kernels_ext::", op, " (CUDA kernel): ", name, " must be a CUDA tensor, got ",
              t.device());
}

at::Tensor gate_mul_cuda(const at::Tensor& x_in, const at::Tensor& gates_in, const at::Tensor& gate_of_column_in,
                         bool keep_ungated) {
  const char* op = "gate_mul";
  check_features(x_in, "x", op);
  check_table(gate_of_column_in, "gate_of_column", op, x_in, 1);
  TORCH_CHECK(gates_in.scalar_type() == x_in.scalar_type(), "mmea_kernels_ext::gate_mul: gates have dtype ",
              gates_in.scalar_type(), " but x has dtype ", x_in.scalar_type(), "; they must match");
  TORCH_CHECK(gates_in.device() == x_in.device(), "mmea_kernels_ext::gate_mul: gates are on ", gates_in.device(),
              " but x is on ", x_in.device());
  const int64_t N = x_in.size(0);
  const int64_t D = x_in.size(1);
  TORCH_CHECK(gate_of_column_in.numel() == D, "mmea_kernels_ext::gate_mul: gate_of_column has ",
              gate_of_column_in.numel(), " entries but x has ", D, " columns");
  const bool shared = gates_in.dim() == 1;
  TORCH_CHECK(shared || (gates_in.dim() == 2 && gates_in.size(0) == N),
              "mmea_kernels_ext::gate_mul: gates must be [N, G] (per row) or [G] (shared) with N = ", N,
              ", got shape ", gates_in.sizes());
  const int64_t G = gates_in.size(-1);

  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor gates = gates_in.contiguous();
  const at::Tensor goc = gate_of_column_in.contiguous();
  at::Tensor y = at::empty({N, D}, x.options());
  if (N == 0 || D == 0) return y;
  const int64_t gate_row_stride = shared ? 0 : G;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmea_gate_mul_cuda", [&] {
    gate_mul_kernel<scalar_t><<<grid_for(N * D), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), gates.const_data_ptr<scalar_t>(), goc.const_data_ptr<int32_t>(),
        y.mutable_data_ptr<scalar_t>(), N, D, gate_row_stride, keep_ungated);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor seg_dot_cuda(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& gate_of_column,
                        const at::Tensor& gate_cols_in, bool shared) {
  const char* op = "seg_dot";
  check_features(a_in, "a", op);
  check_features(b_in, "b", op);
  check_table(gate_of_column, "gate_of_column", op, a_in, 1);
  check_table(gate_cols_in, "gate_cols_padded", op, a_in, 2);
  TORCH_CHECK(b_in.scalar_type() == a_in.scalar_type(), "mmea_kernels_ext::seg_dot: a has dtype ",
              a_in.scalar_type(), " but b has dtype ", b_in.scalar_type(), "; they must match");
  TORCH_CHECK(b_in.device() == a_in.device(), "mmea_kernels_ext::seg_dot: a is on ", a_in.device(),
              " but b is on ", b_in.device());
  TORCH_CHECK(a_in.sizes() == b_in.sizes(), "mmea_kernels_ext::seg_dot: a has shape ", a_in.sizes(),
              " but b has shape ", b_in.sizes(), "; they must match");
  const int64_t N = a_in.size(0);
  const int64_t D = a_in.size(1);
  const int64_t G = gate_cols_in.size(0);
  const int64_t W = gate_cols_in.size(1);
  TORCH_CHECK(gate_of_column.numel() == D, "mmea_kernels_ext::seg_dot: gate_of_column has ", gate_of_column.numel(),
              " entries but a has ", D, " columns");

  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous();
  const at::Tensor b = b_in.contiguous();
  const at::Tensor gate_cols = gate_cols_in.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  if (shared) {
    if (N == 0 || G == 0) return at::zeros({G}, a.options());
    const auto acc_type = at::toOpMathType(a.scalar_type());
    const int64_t nchunks = ceil_div(N, kRowsPerChunk);
    at::Tensor partial = at::empty({nchunks, G}, a.options().dtype(acc_type));
    at::Tensor res = at::empty({G}, a.options().dtype(acc_type));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "mmea_seg_dot_shared_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      seg_dot_partial_kernel<scalar_t><<<grid_for(nchunks * G), kThreads, 0, stream>>>(
          a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), gate_cols.const_data_ptr<int32_t>(),
          partial.mutable_data_ptr<acc_t>(), N, D, G, W, nchunks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      seg_dot_reduce_kernel<acc_t><<<grid_for(G), kThreads, 0, stream>>>(
          partial.const_data_ptr<acc_t>(), res.mutable_data_ptr<acc_t>(), G, nchunks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return res.to(a.scalar_type());
  }

  at::Tensor out = at::empty({N, G}, a.options());
  if (N == 0 || G == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "mmea_seg_dot_cuda", [&] {
    seg_dot_rows_kernel<scalar_t><<<grid_for(N * G), kThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), gate_cols.const_data_ptr<int32_t>(),
        out.mutable_data_ptr<scalar_t>(), N, D, G, W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace mmea

TORCH_LIBRARY_IMPL(mmea_kernels_ext, CUDA, m) {
  m.impl("gate_mul", &mmea::gate_mul_cuda);
  m.impl("seg_dot", &mmea::seg_dot_cuda);
}
