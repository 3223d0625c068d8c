// Input checks shared by the CPU (gate_ops.cpp) and CUDA (gate_ops_cuda.cu) kernels of the gate
// primitives: one message per problem, naming the op, the argument, and what was expected.
#pragma once

#include <ATen/ATen.h>

namespace mmea {

inline void check_table(const at::Tensor& t, const char* name, const char* op, const at::Tensor& like,
                        int64_t dims) {
  TORCH_CHECK(t.scalar_type() == at::kInt, "mmea_kernels_ext::", op, ": ", name,
              " must be an int32 tensor (LayoutTables.", name, "), got dtype ", t.scalar_type());
  TORCH_CHECK(t.dim() == dims, "mmea_kernels_ext::", op, ": ", name, " must be ", dims, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), "mmea_kernels_ext::", op, ": ", name, " is on ", t.device(),
              " but the features are on ", like.device());
}

inline void check_features(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 2, "mmea_kernels_ext::", op, ": ", name, " must be 2-D [N, D], got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "mmea_kernels_ext::", op, ": ", name,
              " must be a floating-point tensor, got dtype ", t.scalar_type());
}

// gates [N, G] (per row) or [G] (shared) of the same dtype and device as x.
inline void check_gates(const at::Tensor& gates, const at::Tensor& x, const char* op) {
  TORCH_CHECK(gates.scalar_type() == x.scalar_type(), "mmea_kernels_ext::", op, ": gates have dtype ",
              gates.scalar_type(), " but x has dtype ", x.scalar_type(), "; they must match");
  TORCH_CHECK(gates.device() == x.device(), "mmea_kernels_ext::", op, ": gates are on ", gates.device(),
              " but x is on ", x.device());
  TORCH_CHECK(gates.dim() == 1 || (gates.dim() == 2 && gates.size(0) == x.size(0)), "mmea_kernels_ext::", op,
              ": gates must be [N, G] (per row) or [G] (shared) with N = ", x.size(0), ", got shape ",
              gates.sizes());
}

// a and b of seg_dot: same dtype, device and shape.
inline void check_pair(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), "mmea_kernels_ext::", op, ": a has dtype ", a.scalar_type(),
              " but b has dtype ", b.scalar_type(), "; they must match");
  TORCH_CHECK(b.device() == a.device(), "mmea_kernels_ext::", op, ": a is on ", a.device(), " but b is on ",
              b.device());
  TORCH_CHECK(a.sizes() == b.sizes(), "mmea_kernels_ext::", op, ": a has shape ", a.sizes(), " but b has shape ",
              b.sizes(), "; they must match");
}

}  // namespace mmea
