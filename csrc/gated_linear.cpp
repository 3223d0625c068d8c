// CPU kernels of the fused equivariant linear + MMEA gate (mmea_kernels/ops/gated_linear, kernel
// backend "cpp"), registered as ``torch.ops.mmea_kernels_ext.gated_linear_fwd`` and
// ``torch.ops.mmea_kernels_ext.gated_linear_wgrad``: the two primitives of the Triton kernels
// (triton_kernels.py), so that the closed autograd of function.py runs on either.
//
//   gated_linear_fwd(x [N, Din], weight [P], bias?, g_pre?, g_post?, additive?, tasks, instructions,
//                    path_weights, d_out, block_w) -> y [N, d_out]
//       y = G_post ⊙ L_W(G_pre ⊙ x) + bias + additive    (gates / additive per row [N, *] or shared [*])
//   gated_linear_fwd_u(same arguments) -> (y, u)
//       y as above and the pre-gate output u = L_W(G_pre ⊙ x) [N, d_out] (no gate, bias or additive),
//       written by the same epilogue (one more store per element, no more GEMM): the autograd saves
//       it for the gate gradient instead of recomputing it.
//   gated_linear_wgrad(a [N, Din], b [N, Dout], g_pre?, g_post?, wtasks, path_weights, numel, block_u,
//                      block_w) -> dW [numel]
//       dW_i[u, w] = pw_i Σ_{n, m} (G_pre ⊙ a)[n, in_i(u, m)] · (G_post ⊙ b)[n, out_i(w, m)]
//
// The int32 tables are those of ops/gated_linear/tables.py (columns named below, in its order), read
// through each block's channel and component strides: both layouts (mul_ir, ir_mul), and the
// transposed spec (W_i^T read from the same flat weight through swapped strides).
//
// Forward. A work item is (task = output block x channel tile, tile of R rows). For each instruction
// feeding the block, the tile's input block is packed (times G_pre) into A [(row, m), u], one GEMM row
// per (row, component m): an ir_mul row is d contiguous copies, a mul_ir row a [mul, 2l+1] -> [2l+1,
// mul] transpose. C [(row, m), w] (+)= pw · A · W_i is one BLAS GEMM (at::addmm_out on views; W_i is
// read in place through its strides). The epilogue writes C into the output block with the gate, bias
// and additive terms while the tile is in cache: every output element is written once, no separate
// gate pass. R is chosen per block so that A and C take about kTileBytes (a few hundred GEMM rows);
// an output block that no instruction feeds is written as zeros (+ bias + additive).
// Weight gradient. A work item is (task = instruction x channel tiles, split of kSplitRows rows); per
// tile of rows, A (G_pre ⊙ a) and B (G_post ⊙ b) are packed the same way and dW_i (+)= pw · Aᵀ B
// accumulates into the split's own partial (a row of an [S, P] buffer); the partials are added in
// split order, so the result does not depend on the number of threads.
// Work items run on at::parallel_for threads that take them from an atomic counter (blocks of larger
// 2l+1 cost more); the BLAS calls inside run single-threaded. Inputs of any strides are made
// contiguous first. float32 and float64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "interleave.h"
#include "parallel.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace mmea_gl {
namespace {

using mmea::check_device;
using mmea::check_features;
using mmea::check_table;
using mmea::num_threads_for;
using mmea::run_items;

// Columns of the tables (mmea_kernels/ops/gated_linear/tables.py, same order).
enum : int { T_COL0, T_COL_SU, T_COL_SM, T_W0, T_MUL_OUT, T_IR_DIM, T_GATE, T_SCALAR, T_BIAS, T_INS_LO, T_INS_HI,
             TASK_FIELDS };
enum : int { I_IN_OFF, I_IN_SU, I_IN_SM, I_MUL_IN, I_GATE_IN, I_W_OFF, I_W_SU, I_W_SW, INS_FIELDS };
enum : int { G_IN_OFF, G_IN_SU, G_IN_SM, G_MUL_IN, G_GATE_IN, G_OUT_OFF, G_OUT_SU, G_OUT_SM, G_MUL_OUT, G_GATE_OUT,
             G_IR_DIM, G_W_OFF, G_W_SU, G_W_SW, G_U0, G_W0, G_INS, WTASK_FIELDS };

constexpr int64_t kTileBytes = 384 * 1024;  // packed operand(s) + result of one GEMM: about L2
constexpr int64_t kMaxTileRows = 2048;
constexpr int64_t kSplitRows = 1024;  // rows per partial sum of the weight gradient (fixed: deterministic)

// A per-row [N, G] or shared [G] operand (gates, additive); absent when ptr is null.
template <typename T>
struct Rows {
  const T* ptr = nullptr;
  int64_t stride = 0;  // 0 when shared
  const T* row(int64_t n) const { return ptr + n * stride; }
};

// One irreps block of a feature matrix: element (channel c, component m) of row n at
// n * ld + off + c * su + m * sm; the gate of channel c is gate + c (gate < 0: not gated, 0e).
struct Block {
  int64_t off, su, sm, gate;
};

// Rows per tile so that `cols` values per GEMM row (operand + result) fill about kTileBytes.
int64_t tile_rows(int64_t d, int64_t cols, int64_t elem, int64_t rows) {
  const int64_t per_row = std::max<int64_t>(1, d * cols * elem);
  return std::clamp<int64_t>(kTileBytes / per_row, 1, std::clamp<int64_t>(rows, 1, kMaxTileRows));
}

// dst[(r*d + m)*C + c] = src(row n0 + r, channel c0 + c, component m) · g(row, gate + c0 + c), r < R.
template <typename T>
void pack(const T* src, int64_t ld, int64_t n0, int64_t R, const Block& b, int64_t c0, int64_t C, int64_t d,
          const Rows<T>& g, T* __restrict__ dst) {
  const bool gated = g.ptr != nullptr && b.gate >= 0;
  if (b.su == d && b.sm == 1 && d > 1 &&  // mul_ir, l = 1, 2, 3: the specialised transposes (interleave.h)
      mmea_il::pack_interleaved<T>(d, src + n0 * ld + b.off + c0 * b.su, ld, R, C,
                                   gated ? g.row(n0) + b.gate + c0 : nullptr, g.stride, dst))
    return;
  for (int64_t r = 0; r < R; ++r) {
    const T* __restrict__ s = src + (n0 + r) * ld + b.off + c0 * b.su;
    const T* __restrict__ gr = gated ? g.row(n0 + r) + b.gate + c0 : nullptr;
    T* __restrict__ o = dst + r * d * C;
    if (b.su == 1) {  // ir_mul (and every 0e block): C contiguous channels per component
      for (int64_t m = 0; m < d; ++m) {
        const T* __restrict__ sm = s + m * b.sm;
        T* __restrict__ om = o + m * C;
        if (gr != nullptr) {
          for (int64_t c = 0; c < C; ++c) om[c] = sm[c] * gr[c];
        } else {
          std::copy(sm, sm + C, om);
        }
      }
    } else {  // mul_ir: the 2l+1 components of a channel are adjacent
      for (int64_t c = 0; c < C; ++c) {
        const T gc = gr != nullptr ? gr[c] : T(1);
        const T* __restrict__ sc = s + c * b.su;
        for (int64_t m = 0; m < d; ++m) o[m * C + c] = sc[m * b.sm] * gc;
      }
    }
  }
}

// Epilogue: rows [n0, n0 + R), channels [c0, c0 + C) of output block b from the GEMM result
// acc[(r*d + m)*C + c], times the gate (non-0e blocks), plus bias (at c0, or null) and additive.
// uo (or null): the same elements of the pre-gate output, acc itself, written in the same pass
// (one read of the tile for both stores).
template <typename T>
void store(const T* acc, int64_t R, int64_t d, int64_t C, T* out, T* uo, int64_t ld, int64_t n0, const Block& b,
           int64_t c0, const Rows<T>& g, const T* bias, const Rows<T>& add, int64_t scal) {
  const bool gated = g.ptr != nullptr && b.gate >= 0;
  const bool added = add.ptr != nullptr && scal >= 0;
  if (b.su == d && b.sm == 1 && d > 1 && bias == nullptr && !added &&  // mul_ir, l = 1, 2, 3 (interleave.h)
      mmea_il::store_interleaved<T>(d, acc, R, C, out + n0 * ld + b.off + c0 * b.su,
                                    uo != nullptr ? uo + n0 * ld + b.off + c0 * b.su : nullptr, ld,
                                    gated ? g.row(n0) + b.gate + c0 : nullptr, g.stride))
    return;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
    const T* __restrict__ a = acc + r * d * C;
    T* __restrict__ o = out + n * ld + b.off + c0 * b.su;
    T* __restrict__ u = uo != nullptr ? uo + n * ld + b.off + c0 * b.su : nullptr;
    const T* __restrict__ gr = gated ? g.row(n) + b.gate + c0 : nullptr;
    const T* __restrict__ ar = added ? add.row(n) + scal + c0 : nullptr;
    if (b.su == 1) {
      for (int64_t m = 0; m < d; ++m) {
        const T* __restrict__ am = a + m * C;
        T* __restrict__ om = o + m * b.sm;
        if (u != nullptr) std::copy(am, am + C, u + m * b.sm);
        if (gr != nullptr) {
          for (int64_t c = 0; c < C; ++c) om[c] = am[c] * gr[c];
        } else {
          std::copy(am, am + C, om);
        }
        if (bias != nullptr) for (int64_t c = 0; c < C; ++c) om[c] += bias[c];
        if (ar != nullptr) for (int64_t c = 0; c < C; ++c) om[c] += ar[c];
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const T gc = gr != nullptr ? gr[c] : T(1);
        const T bc = bias != nullptr ? bias[c] : T(0);
        const T ac = ar != nullptr ? ar[c] : T(0);
        T* __restrict__ oc = o + c * b.su;
        if (u != nullptr) {
          T* __restrict__ uc = u + c * b.su;
          for (int64_t m = 0; m < d; ++m) {
            const T v = a[m * C + c];
            uc[m * b.sm] = v;
            oc[m * b.sm] = (v * gc + bc) + ac;
          }
        } else {
          for (int64_t m = 0; m < d; ++m) oc[m * b.sm] = (a[m * C + c] * gc + bc) + ac;
        }
      }
    }
  }
}

// ----------------------------------------------------------------------------- checks
// An optional per-row or shared operand of the features x: contiguous, or undefined when absent.
at::Tensor operand(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x, const char* op) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), "mmea_kernels_ext::", op, ": ", name, " has dtype ",
              t->scalar_type(), " but the features have dtype ", x.scalar_type(), "; they must match");
  check_device(*t, name, op, at::kCPU);
  TORCH_CHECK(t->dim() == 1 || (t->dim() == 2 && t->size(0) == x.size(0)), "mmea_kernels_ext::", op, ": ", name,
              " must be [N, *] (per row) or [*] (shared) with N = ", x.size(0), ", got shape ", t->sizes());
  return t->contiguous();
}

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  if (!t.defined()) return {};
  return {t.const_data_ptr<T>(), t.dim() == 2 ? t.size(1) : 0};
}

int64_t width(const at::Tensor& t) { return t.defined() ? t.size(-1) : 0; }

// [first, first + count) inside [0, limit) (count 0 is always fine).
void check_span(int64_t first, int64_t count, int64_t limit, const char* op, const char* what, int64_t row) {
  TORCH_CHECK(count == 0 || (first >= 0 && count > 0 && first + count <= limit), "mmea_kernels_ext::", op,
              ": table row ", row, ": ", what, " [", first, ", ", first + count, ") is outside [0, ", limit, ")");
}

// The columns of a block of `mul` channels and d components: inside [0, limit).
void check_block(const Block& b, int64_t mul, int64_t d, int64_t limit, const char* op, const char* what,
                 int64_t row) {
  TORCH_CHECK(b.su >= 0 && b.sm >= 0 && mul >= 0 && d >= 1, "mmea_kernels_ext::", op, ": table row ", row,
              ": bad ", what, " block strides or sizes");
  check_span(b.off, mul == 0 ? 0 : (mul - 1) * b.su + (d - 1) * b.sm + 1, limit, op, what, row);
}

void check_weight_block(int64_t off, int64_t su, int64_t sw, int64_t mi, int64_t mo, int64_t numel, const char* op,
                        int64_t row) {
  TORCH_CHECK(su >= 0 && sw >= 0, "mmea_kernels_ext::", op, ": table row ", row, ": negative weight strides");
  check_span(off, mi * mo == 0 ? 0 : (mi - 1) * su + (mo - 1) * sw + 1, numel, op, "weight block", row);
}

void check_fields(const at::Tensor& t, const char* name, int64_t fields, const char* op, const at::Tensor& like) {
  check_table(t, name, op, like, 2);
  TORCH_CHECK(t.size(1) == fields, "mmea_kernels_ext::", op, ": ", name, " must have ", fields,
              " columns (ops/gated_linear/tables.py), got shape ", t.sizes());
}

void check_path_weights(const at::Tensor& pw, int64_t count, const char* op) {
  TORCH_CHECK(pw.scalar_type() == at::kDouble && pw.dim() == 1 && pw.size(0) >= count && pw.device().is_cpu(),
              "mmea_kernels_ext::", op, ": path_weights must be a float64 CPU vector with ", count,
              " entries, got ", pw.scalar_type(), " of shape ", pw.sizes());
}

// ----------------------------------------------------------------------------- forward
template <typename T>
struct Fwd {
  const T* x;
  int64_t din, dout, block_w;
  T* y;
  T* u;  // the pre-gate output L_W(G_pre ⊙ x) (no gate, bias or additive), or null when not asked for
  Rows<T> pre, post, add;
  const T* bias;
  const int32_t* tasks;
  const int32_t* ins;
  const double* pw;
  std::vector<at::Tensor> w;  // per instruction: W_i [mul_in, mul_out] through its strides
};

struct Tile {
  int64_t task, n0, rows;
};

template <typename T>
void forward_tile(const Fwd<T>& f, const Tile& tile, const at::Tensor& abuf, const at::Tensor& cbuf) {
  const int32_t* t = f.tasks + tile.task * TASK_FIELDS;
  const int64_t d = t[T_IR_DIM], w0 = t[T_W0], C = std::min<int64_t>(f.block_w, t[T_MUL_OUT] - w0);
  const int64_t M = tile.rows * d, lo = t[T_INS_LO], hi = t[T_INS_HI];
  at::Tensor acc = cbuf.as_strided({M, C}, {C, 1});
  if (lo == hi) std::fill_n(acc.mutable_data_ptr<T>(), M * C, T(0));
  for (int64_t i = lo; i < hi; ++i) {
    const int32_t* in = f.ins + i * INS_FIELDS;
    const int64_t K = in[I_MUL_IN];
    at::Tensor a = abuf.as_strided({M, K}, {K, 1});
    pack(f.x, f.din, tile.n0, tile.rows, Block{in[I_IN_OFF], in[I_IN_SU], in[I_IN_SM], in[I_GATE_IN]}, 0, K, d,
         f.pre, a.mutable_data_ptr<T>());
    at::addmm_out(acc, acc, a, f.w[i].narrow(1, w0, C), i == lo ? 0.0 : 1.0, f.pw[i]);
  }
  const int64_t b0 = t[T_BIAS];
  const Block out{t[T_COL0], t[T_COL_SU], t[T_COL_SM], t[T_GATE]};
  // y, and u when asked for (the same tile without gate, bias or additive), in one pass over acc
  store(acc.const_data_ptr<T>(), tile.rows, d, C, f.y, f.u, f.dout, tile.n0, out, w0, f.post,
        f.bias != nullptr && b0 >= 0 ? f.bias + b0 + w0 : nullptr, f.add, t[T_SCALAR]);
}

template <typename T>
void forward_kernel(Fwd<T>& f, int64_t N, int64_t ntasks) {
  std::vector<Tile> tiles;
  int64_t max_a = 1, max_c = 1;
  for (int64_t k = 0; k < ntasks; ++k) {
    const int32_t* t = f.tasks + k * TASK_FIELDS;
    const int64_t d = t[T_IR_DIM], C = std::min<int64_t>(f.block_w, t[T_MUL_OUT] - t[T_W0]);
    int64_t K = 0;
    for (int64_t i = t[T_INS_LO]; i < t[T_INS_HI]; ++i) K = std::max<int64_t>(K, f.ins[i * INS_FIELDS + I_MUL_IN]);
    const int64_t R = tile_rows(d, K + C, sizeof(T), N);
    max_a = std::max(max_a, R * d * K);
    max_c = std::max(max_c, R * d * C);
    for (int64_t n0 = 0; n0 < N; n0 += R) tiles.push_back({k, n0, std::min(R, N - n0)});
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const int nt = static_cast<int>(std::min<int64_t>(num_threads_for(N * (f.din + f.dout)), tiles.size()));
  run_items(static_cast<int64_t>(tiles.size()), nt,
            [&] { return std::make_pair(at::empty({max_a}, opts), at::empty({max_c}, opts)); },
            [&](int64_t k, const auto& bufs) { forward_tile(f, tiles[k], bufs.first, bufs.second); });
}

// Checks every table entry against the tensors it indexes.
void check_forward_tables(const at::Tensor& tasks, const at::Tensor& ins, int64_t din, int64_t dout,
                          int64_t numel, int64_t block_w, const at::Tensor& bias, const at::Tensor& pre,
                          const at::Tensor& post, const at::Tensor& add) {
  const char* op = "gated_linear_fwd";
  const int32_t* tp = tasks.const_data_ptr<int32_t>();
  const int32_t* ip = ins.const_data_ptr<int32_t>();
  const int64_t I = ins.size(0);
  TORCH_CHECK(block_w >= 1, "mmea_kernels_ext::", op, ": block_w must be positive, got ", block_w);
  for (int64_t k = 0; k < tasks.size(0); ++k) {
    const int32_t* t = tp + k * TASK_FIELDS;
    const int64_t d = t[T_IR_DIM], w0 = t[T_W0], mo = t[T_MUL_OUT], C = std::min<int64_t>(block_w, mo - w0);
    TORCH_CHECK(w0 >= 0 && C >= 1 && t[T_INS_LO] >= 0 && t[T_INS_LO] <= t[T_INS_HI] && t[T_INS_HI] <= I,
                "mmea_kernels_ext::", op, ": task ", k, " has a bad channel tile or instruction range");
    check_block(Block{t[T_COL0], t[T_COL_SU], t[T_COL_SM], -1}, mo, d, dout, op, "output block", k);
    if (t[T_GATE] >= 0 && post.defined()) check_span(t[T_GATE], mo, width(post), op, "g_post gates", k);
    if (t[T_SCALAR] >= 0 && add.defined()) check_span(t[T_SCALAR], mo, width(add), op, "additive channels", k);
    if (t[T_BIAS] >= 0 && bias.defined()) check_span(t[T_BIAS], mo, bias.numel(), op, "bias elements", k);
    for (int64_t i = t[T_INS_LO]; i < t[T_INS_HI]; ++i) {
      const int32_t* in = ip + i * INS_FIELDS;
      const int64_t mi = in[I_MUL_IN];
      TORCH_CHECK(mi >= 1, "mmea_kernels_ext::", op, ": instruction ", i, " has no input channel");
      check_block(Block{in[I_IN_OFF], in[I_IN_SU], in[I_IN_SM], -1}, mi, d, din, op, "input block", i);
      if (in[I_GATE_IN] >= 0 && pre.defined()) check_span(in[I_GATE_IN], mi, width(pre), op, "g_pre gates", i);
      check_weight_block(in[I_W_OFF], in[I_W_SU], in[I_W_SW], mi, mo, numel, op, i);
    }
  }
}

// y (and u when with_u; else an undefined tensor) of gated_linear_fwd / gated_linear_fwd_u.
std::pair<at::Tensor, at::Tensor> forward_impl(const at::Tensor& x_in, const at::Tensor& weight_in,
                                               const std::optional<at::Tensor>& bias_in,
                                               const std::optional<at::Tensor>& pre_in,
                                               const std::optional<at::Tensor>& post_in,
                                               const std::optional<at::Tensor>& add_in, const at::Tensor& tasks_in,
                                               const at::Tensor& ins_in, const at::Tensor& pw_in, int64_t d_out,
                                               int64_t block_w, bool with_u, const char* op) {
  check_features(x_in, "x", op);
  check_device(x_in, "x", op, at::kCPU);
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble, "mmea_kernels_ext::", op,
              ": the cpp kernels support float32 and float64, got ", x_in.scalar_type());
  TORCH_CHECK(weight_in.scalar_type() == x_in.scalar_type() && weight_in.dim() == 1, "mmea_kernels_ext::", op,
              ": weight must be a flat vector of the dtype of x (", x_in.scalar_type(), "), got ",
              weight_in.scalar_type(), " of shape ", weight_in.sizes());
  check_device(weight_in, "weight", op, at::kCPU);
  TORCH_CHECK(d_out >= 0, "mmea_kernels_ext::", op, ": d_out must be >= 0, got ", d_out);
  const at::Tensor bias = operand(bias_in, "bias", x_in, op);
  TORCH_CHECK(!bias.defined() || bias.dim() == 1, "mmea_kernels_ext::", op, ": bias must be 1-D, got shape ",
              bias.sizes());
  const at::Tensor pre = operand(pre_in, "g_pre", x_in, op), post = operand(post_in, "g_post", x_in, op);
  const at::Tensor add = operand(add_in, "additive", x_in, op);
  check_fields(tasks_in, "tasks", TASK_FIELDS, op, x_in);
  check_fields(ins_in, "instructions", INS_FIELDS, op, x_in);
  const at::Tensor tasks = tasks_in.contiguous(), ins = ins_in.contiguous(), pw = pw_in.contiguous();
  check_path_weights(pw, ins.size(0), op);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t N = x.size(0), din = x.size(1);
  check_forward_tables(tasks, ins, din, d_out, weight.numel(), block_w, bias, pre, post, add);
  at::Tensor y = at::empty({N, d_out}, x.options());
  at::Tensor u = with_u ? at::empty({N, d_out}, x.options()) : at::Tensor();
  if (N == 0 || d_out == 0 || tasks.size(0) == 0) return {y, u};

  at::AutoDispatchBelowADInplaceOrView guard;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mmea_gated_linear_fwd_cpu", [&] {
    Fwd<scalar_t> f{x.const_data_ptr<scalar_t>(), din, d_out, block_w, y.mutable_data_ptr<scalar_t>(),
                    with_u ? u.mutable_data_ptr<scalar_t>() : nullptr, rows_of<scalar_t>(pre), rows_of<scalar_t>(post), rows_of<scalar_t>(add),
                    bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, tasks.const_data_ptr<int32_t>(),
                    ins.const_data_ptr<int32_t>(), pw.const_data_ptr<double>(), {}};
    for (int64_t i = 0; i < ins.size(0); ++i) {
      const int32_t* in = f.ins + i * INS_FIELDS;
      // the largest mul_out this instruction feeds is that of its task: the view is sliced per task
      int64_t mo = 0;
      for (int64_t k = 0; k < tasks.size(0); ++k) {
        const int32_t* t = f.tasks + k * TASK_FIELDS;
        if (t[T_INS_LO] <= i && i < t[T_INS_HI]) mo = std::max<int64_t>(mo, t[T_MUL_OUT]);
      }
      f.w.push_back(weight.as_strided({in[I_MUL_IN], mo}, {in[I_W_SU], in[I_W_SW]}, in[I_W_OFF]));
    }
    forward_kernel(f, N, tasks.size(0));
  });
  return {y, u};
}

at::Tensor gated_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& pre, const std::optional<at::Tensor>& post,
                                const std::optional<at::Tensor>& add, const at::Tensor& tasks, const at::Tensor& ins,
                                const at::Tensor& pw, int64_t d_out, int64_t block_w) {
  return forward_impl(x, weight, bias, pre, post, add, tasks, ins, pw, d_out, block_w, false, "gated_linear_fwd")
      .first;
}

std::tuple<at::Tensor, at::Tensor> gated_linear_fwd_u_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& pre, const std::optional<at::Tensor>& post, const std::optional<at::Tensor>& add,
    const at::Tensor& tasks, const at::Tensor& ins, const at::Tensor& pw, int64_t d_out, int64_t block_w) {
  auto yu = forward_impl(x, weight, bias, pre, post, add, tasks, ins, pw, d_out, block_w, true, "gated_linear_fwd_u");
  return {yu.first, yu.second};
}

// ----------------------------------------------------------------------------- weight gradient
template <typename T>
void wgrad_item(const T* a, int64_t da, const T* b, int64_t db, const Rows<T>& pre, const Rows<T>& post,
                const int32_t* t, double pw, int64_t block_u, int64_t block_w, int64_t n_lo, int64_t n_hi,
                const at::Tensor& dst, int64_t dst_off, const at::Tensor& abuf, const at::Tensor& bbuf) {
  const int64_t d = t[G_IR_DIM], u0 = t[G_U0], w0 = t[G_W0];
  const int64_t U = std::min<int64_t>(block_u, t[G_MUL_IN] - u0), C = std::min<int64_t>(block_w, t[G_MUL_OUT] - w0);
  at::Tensor dw = dst.as_strided({U, C}, {t[G_W_SU], t[G_W_SW]},
                                 dst_off + t[G_W_OFF] + u0 * t[G_W_SU] + w0 * t[G_W_SW]);
  const Block in{t[G_IN_OFF], t[G_IN_SU], t[G_IN_SM], t[G_GATE_IN]};
  const Block out{t[G_OUT_OFF], t[G_OUT_SU], t[G_OUT_SM], t[G_GATE_OUT]};
  const int64_t R = tile_rows(d, U + C, sizeof(T), n_hi - n_lo);
  for (int64_t n0 = n_lo; n0 < n_hi; n0 += R) {
    const int64_t rows = std::min(R, n_hi - n0), M = rows * d;
    at::Tensor A = abuf.as_strided({M, U}, {U, 1}), B = bbuf.as_strided({M, C}, {C, 1});
    pack(a, da, n0, rows, in, u0, U, d, pre, A.mutable_data_ptr<T>());
    pack(b, db, n0, rows, out, w0, C, d, post, B.mutable_data_ptr<T>());
    at::addmm_out(dw, dw, A.t(), B, n0 == n_lo ? 0.0 : 1.0, pw);
  }
}

void check_wgrad_tables(const at::Tensor& wtasks, int64_t din, int64_t dout, int64_t numel, int64_t block_u,
                        int64_t block_w, int64_t npw, const at::Tensor& pre, const at::Tensor& post) {
  const char* op = "gated_linear_wgrad";
  TORCH_CHECK(block_u >= 1 && block_w >= 1, "mmea_kernels_ext::", op, ": block_u and block_w must be positive");
  const int32_t* tp = wtasks.const_data_ptr<int32_t>();
  for (int64_t k = 0; k < wtasks.size(0); ++k) {
    const int32_t* t = tp + k * WTASK_FIELDS;
    const int64_t d = t[G_IR_DIM], mi = t[G_MUL_IN], mo = t[G_MUL_OUT];
    TORCH_CHECK(t[G_U0] >= 0 && t[G_U0] < mi && t[G_W0] >= 0 && t[G_W0] < mo && t[G_INS] >= 0 && t[G_INS] < npw,
                "mmea_kernels_ext::", op, ": task ", k, " has a bad channel tile or instruction index");
    check_block(Block{t[G_IN_OFF], t[G_IN_SU], t[G_IN_SM], -1}, mi, d, din, op, "input block", k);
    check_block(Block{t[G_OUT_OFF], t[G_OUT_SU], t[G_OUT_SM], -1}, mo, d, dout, op, "output block", k);
    if (t[G_GATE_IN] >= 0 && pre.defined()) check_span(t[G_GATE_IN], mi, width(pre), op, "g_pre gates", k);
    if (t[G_GATE_OUT] >= 0 && post.defined()) check_span(t[G_GATE_OUT], mo, width(post), op, "g_post gates", k);
    check_weight_block(t[G_W_OFF], t[G_W_SU], t[G_W_SW], mi, mo, numel, op, k);
  }
}

at::Tensor gated_linear_wgrad_cpu(const at::Tensor& a_in, const at::Tensor& b_in,
                                  const std::optional<at::Tensor>& pre_in, const std::optional<at::Tensor>& post_in,
                                  const at::Tensor& wtasks_in, const at::Tensor& pw_in, int64_t numel,
                                  int64_t block_u, int64_t block_w) {
  const char* op = "gated_linear_wgrad";
  check_features(a_in, "a", op);
  check_features(b_in, "b", op);
  check_device(a_in, "a", op, at::kCPU);
  check_device(b_in, "b", op, at::kCPU);
  TORCH_CHECK(a_in.scalar_type() == at::kFloat || a_in.scalar_type() == at::kDouble, "mmea_kernels_ext::", op,
              ": the cpp kernels support float32 and float64, got ", a_in.scalar_type());
  TORCH_CHECK(b_in.scalar_type() == a_in.scalar_type() && b_in.size(0) == a_in.size(0), "mmea_kernels_ext::", op,
              ": b must have the dtype and row count of a, got ", b_in.scalar_type(), " ", b_in.sizes(), " vs ",
              a_in.scalar_type(), " ", a_in.sizes());
  TORCH_CHECK(numel >= 0, "mmea_kernels_ext::", op, ": numel must be >= 0, got ", numel);
  const at::Tensor pre = operand(pre_in, "g_pre", a_in, op), post = operand(post_in, "g_post", a_in, op);
  check_fields(wtasks_in, "wtasks", WTASK_FIELDS, op, a_in);
  const at::Tensor wtasks = wtasks_in.contiguous(), pw = pw_in.contiguous();
  TORCH_CHECK(pw.scalar_type() == at::kDouble && pw.dim() == 1, "mmea_kernels_ext::", op,
              ": path_weights must be a float64 vector, got ", pw.scalar_type(), " of shape ", pw.sizes());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t N = a.size(0), T = wtasks.size(0);
  check_wgrad_tables(wtasks, a.size(1), b.size(1), numel, block_u, block_w, pw.size(0), pre, post);
  const int64_t S = std::max<int64_t>(1, (N + kSplitRows - 1) / kSplitRows);
  const std::vector<int64_t> shape = S == 1 ? std::vector<int64_t>{numel} : std::vector<int64_t>{S, numel};
  at::Tensor partial = at::zeros(shape, a.options());
  if (N == 0 || T == 0 || numel == 0) return S == 1 ? partial : partial.sum(0);

  at::AutoDispatchBelowADInplaceOrView guard;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "mmea_gated_linear_wgrad_cpu", [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    const Rows<scalar_t> gpre = rows_of<scalar_t>(pre), gpost = rows_of<scalar_t>(post);
    const int32_t* tp = wtasks.const_data_ptr<int32_t>();
    const double* pwp = pw.const_data_ptr<double>();
    int64_t max_a = 1, max_b = 1;
    for (int64_t k = 0; k < T; ++k) {
      const int32_t* t = tp + k * WTASK_FIELDS;
      const int64_t d = t[G_IR_DIM], U = std::min<int64_t>(block_u, t[G_MUL_IN] - t[G_U0]);
      const int64_t C = std::min<int64_t>(block_w, t[G_MUL_OUT] - t[G_W0]);
      const int64_t R = tile_rows(d, U + C, sizeof(scalar_t), std::min(N, kSplitRows));
      max_a = std::max(max_a, R * d * U);
      max_b = std::max(max_b, R * d * C);
    }
    const auto opts = a.options();
    const int nt = static_cast<int>(std::min<int64_t>(num_threads_for(N * (a.size(1) + b.size(1))), T * S));
    run_items(T * S, nt, [&] { return std::make_pair(at::empty({max_a}, opts), at::empty({max_b}, opts)); },
              [&](int64_t k, const auto& bufs) {
                const int64_t task = k / S, s = k % S;
                const int32_t* t = tp + task * WTASK_FIELDS;
                wgrad_item(ap, a.size(1), bp, b.size(1), gpre, gpost, t, pwp[t[G_INS]], block_u, block_w,
                           s * kSplitRows, std::min(N, (s + 1) * kSplitRows), partial, s * numel, bufs.first,
                           bufs.second);
              });
  });
  if (S == 1) return partial;
  // the partials in split order: the same sum for any number of threads
  at::Tensor out = partial.select(0, 0).clone();
  for (int64_t s = 1; s < S; ++s) out.add_(partial.select(0, s));
  return out;
}

}  // namespace
}  // namespace mmea_gl

TORCH_LIBRARY_FRAGMENT(mmea_kernels_ext, m) {
  m.def("gated_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? g_pre, Tensor? g_post, Tensor? additive, "
        "Tensor tasks, Tensor instructions, Tensor path_weights, int d_out, int block_w) -> Tensor");
  m.def("gated_linear_fwd_u(Tensor x, Tensor weight, Tensor? bias, Tensor? g_pre, Tensor? g_post, Tensor? additive, "
        "Tensor tasks, Tensor instructions, Tensor path_weights, int d_out, int block_w) -> (Tensor, Tensor)");
  m.def("gated_linear_wgrad(Tensor a, Tensor b, Tensor? g_pre, Tensor? g_post, Tensor wtasks, Tensor path_weights, "
        "int numel, int block_u, int block_w) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmea_kernels_ext, CPU, m) {
  m.impl("gated_linear_fwd", &mmea_gl::gated_linear_fwd_cpu);
  m.impl("gated_linear_fwd_u", &mmea_gl::gated_linear_fwd_u_cpu);
  m.impl("gated_linear_wgrad", &mmea_gl::gated_linear_wgrad_cpu);
}
