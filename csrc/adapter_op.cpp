// The whole fused MMEA adapter of an e3nn linear layer as one dispatcher op with a C++ autograd
// formula, for TorchScript files (mmea-kernels export --kernels cpp) that run where Python does not:
// libtorch in LAMMPS (pair_style mace / e3gnn built by mmea-kernels lammps-build), torch.jit.load.
//
//   x0 = x[:, start:start + count],  (add, G) = gate_net(x0),
//   u = L_W(x),  y = G ⊙ u + bias + add.
//
// The same kernels as the eager one-node adapter (mmea_kernels/ops/gated_linear/adapter.py), reached
// through the dispatcher: forward gate_net_fwd + gated_linear_fwd_u (gated_linear_fwd without gated
// columns, or when no graph is recorded); backward the transposed op with G as its prologue gate (dx), seg_dot(dy, u) (dG), the 0e
// columns of dy (dadd), gate_net_bwd (dx0, added into dx's columns in place).
//
// First derivatives with respect to x only: what molecular dynamics needs (forces, virials). The
// eager adapters keep the closed, any-order autograd for training; here a backward that builds a
// graph (create_graph, e.g. force training on the scripted file) and gradients for the weights are
// refused with an error that says so, never returned silently wrong.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace mmea_ad {
namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const char* kOp = "mmea_kernels_ext::mmea_linear";
// where such a file comes from: TorchScript export, or torch.export / AOTInductor after export_forms
#define MMEA_FORM \
  "this C++ adapter op (export --kernels cpp; export_forms(model, 'cpp'); NequIP's mmea_kernels_cpp_ops)"

std::tuple<Tensor, Tensor> gate_net_fwd(const Tensor& x0, const Tensor& wd, const Tensor& bd, const Tensor& wu,
                                        const Tensor& bu, int64_t num_additive, int64_t phi) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmea_kernels_ext::gate_net_fwd", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                         const Tensor&, int64_t, int64_t)>();
  return op.call(x0, wd, bd, wu, bu, num_additive, phi);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gate_net_bwd(const Tensor& x0, const Tensor& wd, const Tensor& bd,
                                                                const Tensor& wu, const Tensor& gates,
                                                                const OptT& dadd, const OptT& dgates,
                                                                int64_t num_additive, int64_t phi) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mmea_kernels_ext::gate_net_bwd", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                    const Tensor&, const Tensor&, const OptT&,
                                                                    const OptT&, int64_t, int64_t, bool, bool)>();
  return op.call(x0, wd, bd, wu, gates, dadd, dgates, num_additive, phi, true, false);
}

using FwdSig = Tensor(const Tensor&, const Tensor&, const OptT&, const OptT&, const OptT&, const OptT&, const Tensor&,
                      const Tensor&, const Tensor&, int64_t, int64_t);
using FwdUSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptT&, const OptT&, const OptT&,
                                           const OptT&, const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t);

Tensor linear_fwd(const Tensor& x, const Tensor& w, const OptT& bias, const OptT& g_pre, const OptT& g_post,
                  const OptT& add, const Tensor& tasks, const Tensor& ins, const Tensor& pw, int64_t d_out,
                  int64_t block_w) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmea_kernels_ext::gated_linear_fwd", "")
                       .typed<FwdSig>();
  return op.call(x, w, bias, g_pre, g_post, add, tasks, ins, pw, d_out, block_w);
}

std::tuple<Tensor, Tensor> linear_fwd_u(const Tensor& x, const Tensor& w, const OptT& bias, const OptT& g_post,
                                        const OptT& add, const Tensor& tasks, const Tensor& ins, const Tensor& pw,
                                        int64_t d_out, int64_t block_w) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmea_kernels_ext::gated_linear_fwd_u", "")
                       .typed<FwdUSig>();
  return op.call(x, w, bias, std::nullopt, g_post, add, tasks, ins, pw, d_out, block_w);
}

Tensor seg_dot(const Tensor& a, const Tensor& b, const Tensor& gate_of_column, const Tensor& gate_cols) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmea_kernels_ext::seg_dot", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool)>();
  return op.call(a, b, gate_of_column, gate_cols, false);
}

// A column count, through sym_size: size(d) and stride(d) of a symbolic-shape
// tensor (torch.export / make_fx tracing, as nequip-compile does) read every dimension as an int and
// fix the row count to the traced one. Columns are static; rows stay symbolic.
int64_t cols(const Tensor& t, int64_t d = 1) { return t.sym_size(d).guard_int(__FILE__, __LINE__); }

OptT nonempty(const Tensor& t) { return cols(t, -1) > 0 ? OptT(t) : OptT(); }

// Every argument after the tensors the gradient flows to; kept on the context for the backward.
struct Consts {
  Tensor tasks, ins, pw, t_tasks, t_ins, t_pw, gate_of_column, gate_cols, out_scalars;
  int64_t num_additive, phi, start, count, out_first, block_w, t_block_w;
};

void check_args(const Tensor& x, const Tensor& w, const OptT& bias, const Tensor& wd, const Tensor& bd,
                const Tensor& wu, const Tensor& bu, const Consts& c) {
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be 2-D [rows, D_in], got ", x.sym_sizes());
  TORCH_CHECK(x.device().is_cpu(), kOp, ": runs on CPU tensors, x is on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, kOp,
              ": float32 or float64 only, x is ", x.scalar_type());
  for (const Tensor* t : {&w, &wd, &bd, &wu, &bu})
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(), kOp,
                ": weights must match x's dtype and device (", x.scalar_type(), ", ", x.device(), "), got ",
                t->scalar_type(), " on ", t->device());
  if (bias)
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(), kOp,
                ": bias must match x's dtype and device");
  TORCH_CHECK(c.start >= 0 && c.count > 0 && c.start + c.count <= cols(x), kOp, ": 0e input columns [", c.start,
              ", ", c.start + c.count, ") outside x's ", cols(x), " columns");
}

// x with unit column stride (what the kernels read; a column-major or column-strided view is copied)
Tensor unit_columns(const Tensor& x) {
  // a symbolic comparison: a column-major view's column stride is the (symbolic) row count
  return x.dim() == 2 && cols(x) > 1 && x.sym_stride(1).sym_ne(1).guard_bool(__FILE__, __LINE__) ? x.contiguous() : x;
}

std::tuple<Tensor, Tensor, Tensor> forward_impl(const Tensor& x, const Tensor& w, const OptT& bias, const Tensor& wd,
                                                const Tensor& bd, const Tensor& wu, const Tensor& bu,
                                                const Consts& c, bool keep_u) {
  check_args(x, w, bias, wd, bd, wu, bu, c);
  auto [add, gates] = gate_net_fwd(x.narrow(1, c.start, c.count), wd, bd, wu, bu, c.num_additive, c.phi);
  OptT add_in = c.num_additive > 0 ? OptT(add) : OptT();
  const int64_t d_out = c.gate_of_column.size(0);
  if (keep_u && cols(gates) > 0) {
    auto [y, u] = linear_fwd_u(x, w, bias, gates, add_in, c.tasks, c.ins, c.pw, d_out, c.block_w);
    return {y, u, gates};
  }
  Tensor y = linear_fwd(x, w, bias, std::nullopt, nonempty(gates), add_in, c.tasks, c.ins, c.pw, d_out, c.block_w);
  return {y, x.new_empty_symint({x.sym_size(0), c10::SymInt(0)}), gates};
}

class MMEALinearFn : public torch::autograd::Function<MMEALinearFn> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x_in, const Tensor& w, const OptT& bias, const Tensor& wd,
                        const Tensor& bd, const Tensor& wu, const Tensor& bu, const Consts& c) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const Tensor x = unit_columns(x_in);
    auto [y, u, gates] = forward_impl(x, w, bias, wd, bd, wu, bu, c, true);
    ctx->save_for_backward({x, w, wd, bd, wu, gates, u, c.tasks, c.ins, c.pw, c.t_tasks, c.t_ins, c.t_pw,
                            c.gate_of_column, c.gate_cols, c.out_scalars});
    ctx->saved_data["ints"] = std::vector<int64_t>{c.num_additive, c.phi, c.start, c.count, c.out_first,
                                                   c.block_w, c.t_block_w, bias.has_value() ? 7 : 6};
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(), kOp,
                ": " MMEA_FORM " gives first derivatives only; a backward that builds a graph (create_graph=True: "
                "force training, Hessians) needs the eager model or the aten form (export --kernels aten, aten_forms)");
    auto ints = ctx->saved_data["ints"].toIntVector();
    // edges: x, weight, [bias,] w_down, b_down, w_up, b_up
    for (int64_t i = 1; i < ints[7]; ++i)
      TORCH_CHECK(!ctx->needs_input_grad(i), kOp,
                  ": " MMEA_FORM " differentiates with respect to its input only, not its weights; train the eager "
                  "model, or use the aten form (export --kernels aten, aten_forms)");
    const Tensor& dy_in = grads[0];
    variable_list out(8);
    if (!dy_in.defined() || !ctx->needs_input_grad(0)) return out;
    auto s = ctx->get_saved_variables();
    const Tensor &x = s[0], &w = s[1], &wd = s[2], &bd = s[3], &wu = s[4], &gates = s[5], &u = s[6];
    const int64_t num_additive = ints[0], phi = ints[1], start = ints[2], count = ints[3], out_first = ints[4];
    const Tensor dy = dy_in.contiguous();
    const bool gated = cols(gates) > 0;
    Tensor dx = linear_fwd(dy, w, std::nullopt, gated ? OptT(gates) : OptT(), std::nullopt, std::nullopt, s[10], s[11],
                           s[12], cols(x), ints[6]);
    OptT dgates = gated ? OptT(seg_dot(dy, u, s[13], s[14])) : OptT();
    OptT dadd;
    if (num_additive > 0)
      dadd = out_first >= 0 ? dy.narrow(1, out_first, num_additive) : dy.index_select(1, s[15]);
    auto net = gate_net_bwd(x.narrow(1, start, count), wd, bd, wu, gates, dadd, dgates, num_additive, phi);
    dx.narrow(1, start, count).add_(std::get<0>(net));
    out[0] = dx;
    return out;
  }
};

Consts consts(const Tensor& tasks, const Tensor& ins, const Tensor& pw, const Tensor& t_tasks, const Tensor& t_ins,
              const Tensor& t_pw, const Tensor& gate_of_column, const Tensor& gate_cols, const Tensor& out_scalars,
              int64_t num_additive, int64_t phi, int64_t start, int64_t count, int64_t out_first, int64_t block_w,
              int64_t t_block_w) {
  return Consts{tasks, ins, pw, t_tasks, t_ins, t_pw, gate_of_column, gate_cols, out_scalars,
                num_additive, phi, start, count, out_first, block_w, t_block_w};
}

#define MMEA_LINEAR_ARGS                                                                                         \
  const Tensor &x, const Tensor &w, const OptT &bias, const Tensor &wd, const Tensor &bd, const Tensor &wu,      \
      const Tensor &bu, const Tensor &tasks, const Tensor &ins, const Tensor &pw, const Tensor &t_tasks,         \
      const Tensor &t_ins, const Tensor &t_pw, const Tensor &gate_of_column, const Tensor &gate_cols,            \
      const Tensor &out_scalars, int64_t num_additive, int64_t phi, int64_t start, int64_t count, int64_t out_first, \
      int64_t block_w, int64_t t_block_w
#define MMEA_CONSTS                                                                                        \
  consts(tasks, ins, pw, t_tasks, t_ins, t_pw, gate_of_column, gate_cols, out_scalars, num_additive, phi, start, \
         count, out_first, block_w, t_block_w)

Tensor mmea_linear_cpu(MMEA_LINEAR_ARGS) {  // below autograd: no graph, nothing saved
  return std::get<0>(forward_impl(unit_columns(x), w, bias, wd, bd, wu, bu, MMEA_CONSTS, false));
}

Tensor mmea_linear_autograd(MMEA_LINEAR_ARGS) {
  for (const Tensor* t : {&x, &w, &wd, &bd, &wu, &bu})
    TORCH_CHECK(!t->_fw_grad(/*level=*/0).defined(), kOp,
                ": forward-mode derivatives (dual tensors) are not implemented for " MMEA_FORM "; use the eager model "
                "or the aten form (export --kernels aten, aten_forms)");
  bool graph = at::GradMode::is_enabled();
  if (graph) {
    graph = false;
    for (const Tensor* t : {&x, &w, &wd, &bd, &wu, &bu}) graph = graph || t->requires_grad();
    graph = graph || (bias.has_value() && bias->requires_grad());
  }
  if (!graph) {  // no graph to record: the forward kernels only (u not kept)
    at::AutoDispatchBelowADInplaceOrView guard;
    return mmea_linear_cpu(x, w, bias, wd, bd, wu, bu, tasks, ins, pw, t_tasks, t_ins, t_pw, gate_of_column, gate_cols,
                           out_scalars, num_additive, phi, start, count, out_first, block_w, t_block_w);
  }
  return MMEALinearFn::apply(x, w, bias, wd, bd, wu, bu, MMEA_CONSTS);
}

}  // namespace
}  // namespace mmea_ad

TORCH_LIBRARY_FRAGMENT(mmea_kernels_ext, m) {
  m.def("mmea_linear(Tensor x, Tensor weight, Tensor? bias, Tensor w_down, Tensor b_down, Tensor w_up, Tensor b_up, "
        "Tensor tasks, Tensor instructions, Tensor path_weights, Tensor t_tasks, Tensor t_instructions, "
        "Tensor t_path_weights, Tensor gate_of_column, Tensor gate_cols, Tensor out_scalar_columns, int num_additive, "
        "int phi, int start, int count, int out_first, int block_w, int t_block_w) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmea_kernels_ext, CPU, m) { m.impl("mmea_linear", &mmea_ad::mmea_linear_cpu); }

TORCH_LIBRARY_IMPL(mmea_kernels_ext, Autograd, m) { m.impl("mmea_linear", &mmea_ad::mmea_linear_autograd); }
