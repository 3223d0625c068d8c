// Input checks shared by the CPU (gate_ops.cpp, fused_gate.cpp) and CUDA (gate_ops_cuda.cu) kernels:
// one message per problem, naming the op, the argument, and what was expected.
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

// t is on the device type of the kernel that runs (at::kCPU or at::kCUDA).
inline void check_device(const at::Tensor& t, const char* name, const char* op, at::DeviceType kernel) {
  const std::string kind = c10::DeviceTypeName(kernel);
  TORCH_CHECK(t.device().type() == kernel, "mmea_kernels_ext::", op, " (", kind, " kernel): ", name, " must be a ",
              kind, " tensor, got ", t.device());
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

// gate_of_column has one entry per column of the features (`name`: x or a).
inline void check_columns(const at::Tensor& gate_of_column, const at::Tensor& features, const char* name,
                          const char* op) {
  TORCH_CHECK(gate_of_column.numel() == features.size(1), "mmea_kernels_ext::", op, ": gate_of_column has ",
              gate_of_column.numel(), " entries but ", name, " has ", features.size(1), " columns");
}

// All checks of gate_mul(x, gates, gate_of_column, keep_ungated) for the kernel of device type
// `kernel`; G is the number of gates.
struct GateMulShape {
  int64_t N, D, G;
  bool shared;
};

inline GateMulShape check_gate_mul(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& gate_of_column,
                                   at::DeviceType kernel) {
  const char* op = "gate_mul";
  check_features(x, "x", op);
  check_device(x, "x", op, kernel);
  check_table(gate_of_column, "gate_of_column", op, x, 1);
  check_gates(gates, x, op);
  check_columns(gate_of_column, x, "x", op);
  return {x.size(0), x.size(1), gates.size(-1), gates.dim() == 1};
}

// All checks of seg_dot(a, b, gate_of_column, gate_cols, shared); G (the number of gates) and W
// (the padded width of a gate) come from gate_cols [G, W].
struct SegDotShape {
  int64_t N, D, G, W;
};

inline SegDotShape check_seg_dot(const at::Tensor& a, const at::Tensor& b, const at::Tensor& gate_of_column,
                                 const at::Tensor& gate_cols, at::DeviceType kernel) {
  const char* op = "seg_dot";
  check_features(a, "a", op);
  check_features(b, "b", op);
  check_device(a, "a", op, kernel);
  check_table(gate_of_column, "gate_of_column", op, a, 1);
  check_table(gate_cols, "gate_cols_padded", op, a, 2);
  check_pair(a, b, op);
  check_columns(gate_of_column, a, "a", op);
  return {a.size(0), a.size(1), gate_cols.size(0), gate_cols.size(1)};
}

}  // namespace mmea
