// CPU kernels of the MMEA gate network (mmea_kernels/ops/gate_net), registered as
// ``torch.ops.mmea_kernels_ext.gate_net_fwd`` and ``torch.ops.mmea_kernels_ext.gate_net_bwd``:
//
//   gate_net_fwd(x0 [N, S], w_down [r, S], b_down [r], w_up [A + G, r], b_up [A + G], A, phi)
//       -> (add [N, A], gates [N, G])
//       h = x0 W_downᵀ + b_down, z = SiLU(h), γ = z W_upᵀ + b_up; add = γ[:, :A], gates = φ(γ[:, A:])
//       with φ = exp (phi 0) or 1 + γ (phi 1).
//   gate_net_bwd(x0, w_down, b_down, w_up, gates, dadd?, dgates?, A, phi, need_x0, need_weights)
//       -> (dx0 [N, S], dw_down, db_down, dw_up, db_up)   (empty where not asked for)
//       the first-order gradients, with h and z recomputed from x0 (nothing but the outputs saved);
//       gates, dadd, dgates of any row stride (dadd is typically a column slice of the linear's dy).
//
// What the torch composition costs at MD sizes is not the arithmetic (two GEMMs of inner size 16)
// but six ATen calls, each its own allocation and parallel region, for a few hundred KB of data.
// Here a work item is a tile of rows, and every step of the net runs on the tile while it
// is in cache: one parallel region, per-thread scratch. The weight gradients are summed per split of
// rows (a function of N only) into the split's own partial and the partials added in split order, so results do
// not depend on the number of threads. x0 may have any row stride (a column slice of the features:
// no copy); float32 and float64. The second derivatives (force training) run through the torch
// formulas of ops/gate_net/function.py; these kernels serve the forward and every backward that
// builds no graph.
#pragma GCC optimize("no-trapping-math")  // the SiLU / exp loops vectorise (see activations.h)

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "isa.h"
#include "activations.h"
#include "checks.h"
#include "parallel.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

namespace mmea_gn {
namespace {

using mmea::check_device;
using mmea::num_threads_for;
using mmea::run_items;
using mmea_fg::fast_exp;

// Rows per work item, a function of N only (never of the thread count: MKL's GEMM gives a row other
// bits in a GEMM of another height, measured 7e-15 at N = 1025 when the forward cut rows per thread).
// The forward cuts N into kFwdItems items of kMinFwdRows to kMaxTileRows rows (8 items: 16 threads
// stay busy at N = 2000; on one thread 8 items cost the same as 1 within noise, 2026-11-30: N = 2000,
// 128 scalars, rank 16, 512 outputs, 560 us); the backward works on tiles of kTileRows. The weight
// gradients' partial sums are over splits of at least kTileRows rows and at most kMaxSplits of them
// (the partials stay small for any N), added in split order.
constexpr int64_t kFwdItems = 8;
constexpr int64_t kMinFwdRows = 64;
constexpr int64_t kMaxTileRows = 1024;
constexpr int64_t kTileRows = 512;
constexpr int64_t kMaxSplits = 64;

template <typename T>
inline T sigmoid(T h) {
  return T(1) / (T(1) + fast_exp(-h));
}

struct Net {
  int64_t N, S, r, A, G;
};

// The checks shared by both ops; returns the sizes.
Net check_net(const at::Tensor& x0, const at::Tensor& wd, const at::Tensor& bd, const at::Tensor& wu, int64_t A,
              const char* op) {
  // no rows: nothing is read (an empty column-strided view is "contiguous" to torch, so it arrives as is)
  TORCH_CHECK(x0.dim() == 2 && (x0.size(0) == 0 || x0.size(1) <= 1 || x0.stride(1) == 1), "mmea_kernels_ext::", op,
              ": x0 must be 2-D [N, S] with unit column stride, got shape ", x0.sizes(), " and strides ",
              x0.strides());
  TORCH_CHECK(x0.scalar_type() == at::kFloat || x0.scalar_type() == at::kDouble, "mmea_kernels_ext::", op,
              ": the cpp kernels support float32 and float64, got ", x0.scalar_type());
  const std::pair<const at::Tensor*, const char*> named[] = {{&x0, "x0"}, {&wd, "w_down"}, {&bd, "b_down"},
                                                             {&wu, "w_up"}};
  for (const auto& [t, name] : named) {
    check_device(*t, name, op, at::kCPU);
    TORCH_CHECK(t->scalar_type() == x0.scalar_type(), "mmea_kernels_ext::", op, ": ", name, " has dtype ",
                t->scalar_type(), " but x0 has ", x0.scalar_type(), "; they must match");
  }
  const int64_t N = x0.size(0), S = x0.size(1);
  TORCH_CHECK(wd.dim() == 2 && wd.size(1) == S && wd.size(0) >= 1, "mmea_kernels_ext::", op,
              ": w_down must be [rank, S] with S = ", S, " (the columns of x0), got shape ", wd.sizes());
  const int64_t r = wd.size(0);
  TORCH_CHECK(bd.dim() == 1 && bd.size(0) == r, "mmea_kernels_ext::", op, ": b_down must be [", r, "], got shape ",
              bd.sizes());
  TORCH_CHECK(wu.dim() == 2 && wu.size(1) == r, "mmea_kernels_ext::", op, ": w_up must be [A + G, ", r,
              "], got shape ", wu.sizes());
  TORCH_CHECK(A >= 0 && A <= wu.size(0), "mmea_kernels_ext::", op, ": num_additive ", A, " is outside [0, ",
              wu.size(0), "] (the rows of w_up)");
  return {N, S, r, A, wu.size(0) - A};
}

void check_phi(int64_t phi, const char* op) {
  TORCH_CHECK(phi == 0 || phi == 1, "mmea_kernels_ext::", op, ": phi must be 0 (exp) or 1 (residual), got ", phi);
}

// The elementwise steps, as plain loops over a tile's rows (they vectorise). The GEMMs run without
// their bias (at::mm_out), which is added here: addmm would first copy the expanded bias into its
// output, a separate pass per tile.

// The loops are compiled three times, for the baseline ISA, for AVX2 + FMA (8 floats a vector
// instead of 4: the exp of the gate head is most of this op's arithmetic) and for AVX-512 (16), and
// picked once at run time (2000 rows, rank 16, 128 gates, 1 thread on an AVX-512 EPYC: 370 -> 316 us
// for the whole op from AVX2 to AVX-512).
#if defined(__GNUC__) && defined(__x86_64__)
#define MMEA_GN_AVX2 1
#define MMEA_GN_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define MMEA_GN_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma")))
#else
#define MMEA_GN_AVX2 0
#define MMEA_GN_TARGET_AVX2
#endif
#define MMEA_GN_INLINE inline __attribute__((always_inline))

// h <- SiLU(h + b), h [R, r].
template <typename T>
MMEA_GN_INLINE void silu_bias_body(T* __restrict__ h, const T* __restrict__ b, int64_t R, int64_t r) {
  for (int64_t i = 0; i < R; ++i) {
    T* __restrict__ hi = h + i * r;
    for (int64_t j = 0; j < r; ++j) {
      const T v = hi[j] + b[j];
      hi[j] = v * sigmoid(v);
    }
  }
}

// g <- φ(g + b), g [R, C] (row stride C); phi 0: exp, 1: 1 + γ, 2: identity (the additive head).
template <typename T>
MMEA_GN_INLINE void head_bias_body(T* __restrict__ g, const T* __restrict__ b, int64_t R, int64_t C, int64_t phi) {
  for (int64_t i = 0; i < R; ++i) {
    T* __restrict__ gi = g + i * C;
    if (phi == 0) {
      for (int64_t c = 0; c < C; ++c) gi[c] = fast_exp(gi[c] + b[c]);
    } else {
      const T one = phi == 1 ? T(1) : T(0);
      for (int64_t c = 0; c < C; ++c) gi[c] = (gi[c] + b[c]) + one;
    }
  }
}

// From the pre-bias h [R, r]: z = SiLU(h + b) into z, and SiLU'(h + b) into h.
template <typename T>
MMEA_GN_INLINE void silu_grad_body(T* __restrict__ h, T* __restrict__ z, const T* __restrict__ b, int64_t R,
                                   int64_t r) {
  for (int64_t i = 0; i < R; ++i) {
    T* __restrict__ hi = h + i * r;
    T* __restrict__ zi = z + i * r;
    for (int64_t j = 0; j < r; ++j) {
      const T v = hi[j] + b[j], s = sigmoid(v);
      zi[j] = v * s;
      hi[j] = s * (T(1) + v * (T(1) - s));
    }
  }
}

// One clone of the three loops per ISA (ATTR: its target attribute).
#define MMEA_GN_CLONES(SUFFIX, ATTR)                                                                      \
  template <typename T>                                                                                   \
  ATTR void silu_bias##SUFFIX(T* h, const T* b, int64_t R, int64_t r) { silu_bias_body(h, b, R, r); }     \
  template <typename T>                                                                                   \
  ATTR void head_bias##SUFFIX(T* g, const T* b, int64_t R, int64_t C, int64_t phi) {                      \
    head_bias_body(g, b, R, C, phi);                                                                      \
  }                                                                                                       \
  template <typename T>                                                                                   \
  ATTR void silu_grad##SUFFIX(T* h, T* z, const T* b, int64_t R, int64_t r) { silu_grad_body(h, z, b, R, r); }

MMEA_GN_CLONES(_base, )
#if MMEA_GN_AVX2
MMEA_GN_CLONES(_avx2, MMEA_GN_TARGET_AVX2)
MMEA_GN_CLONES(_avx512, MMEA_GN_TARGET_AVX512)  // twice the lanes of AVX2; the same operations in the same order
#endif
#undef MMEA_GN_CLONES

using ::mmea::use_avx2;  // the CPU's widest ISA, capped by MMEA_CPU_ISA (isa.h)
using ::mmea::use_avx512;

template <typename T>
void silu_bias(T* h, const T* b, int64_t R, int64_t r) {
#if MMEA_GN_AVX2
  if (use_avx512()) return silu_bias_avx512(h, b, R, r);
  if (use_avx2()) return silu_bias_avx2(h, b, R, r);
#endif
  silu_bias_base(h, b, R, r);
}

template <typename T>
void head_bias(T* g, const T* b, int64_t R, int64_t C, int64_t phi) {
#if MMEA_GN_AVX2
  if (use_avx512()) return head_bias_avx512(g, b, R, C, phi);
  if (use_avx2()) return head_bias_avx2(g, b, R, C, phi);
#endif
  head_bias_base(g, b, R, C, phi);
}

template <typename T>
void silu_and_derivative(T* h, T* z, const T* b, int64_t R, int64_t r) {
#if MMEA_GN_AVX2
  if (use_avx512()) return silu_grad_avx512(h, z, b, R, r);
  if (use_avx2()) return silu_grad_avx2(h, z, b, R, r);
#endif
  silu_grad_base(h, z, b, R, r);
}

// ----------------------------------------------------------------------------- forward
std::tuple<at::Tensor, at::Tensor> gate_net_fwd_cpu(const at::Tensor& x0, const at::Tensor& wd_in,
                                                    const at::Tensor& bd_in, const at::Tensor& wu_in,
                                                    const at::Tensor& bu_in, int64_t A, int64_t phi) {
  const char* op = "gate_net_fwd";
  const Net n = check_net(x0, wd_in, bd_in, wu_in, A, op);
  check_phi(phi, op);
  check_device(bu_in, "b_up", op, at::kCPU);
  TORCH_CHECK(bu_in.scalar_type() == x0.scalar_type() && bu_in.dim() == 1 && bu_in.size(0) == n.A + n.G,
              "mmea_kernels_ext::", op, ": b_up must be [", n.A + n.G, "] of dtype ", x0.scalar_type(), ", got ",
              bu_in.scalar_type(), " of shape ", bu_in.sizes());
  const at::Tensor wd = wd_in.contiguous(), bd = bd_in.contiguous(), wu = wu_in.contiguous(), bu = bu_in.contiguous();
  at::Tensor add = at::empty({n.N, n.A}, x0.options()), gates = at::empty({n.N, n.G}, x0.options());
  if (n.N == 0) return {add, gates};
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::Tensor wd_t = wd.t(), wu_a = wu.narrow(0, 0, n.A).t(), wu_g = wu.narrow(0, n.A, n.G).t();
  const int nt = num_threads_for(n.N * (n.S + n.A + n.G));
  // rows per item from N alone: MKL's GEMM gives a row other bits in a GEMM of another height
  const int64_t rows = std::clamp<int64_t>((n.N + kFwdItems - 1) / kFwdItems, kMinFwdRows, kMaxTileRows);
  const int64_t tiles = (n.N + rows - 1) / rows;
  AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "mmea_gate_net_fwd_cpu", [&] {
    const scalar_t* bdp = bd.const_data_ptr<scalar_t>();
    const scalar_t* bup = bu.const_data_ptr<scalar_t>();
    run_items(tiles, nt, [&] { return at::empty({rows, n.r}, x0.options()); },
              [&](int64_t k, const at::Tensor& hbuf) {
                const int64_t n0 = k * rows, R = std::min(rows, n.N - n0);
                at::Tensor h = hbuf.narrow(0, 0, R);
                at::mm_out(h, x0.narrow(0, n0, R), wd_t);
                silu_bias(h.mutable_data_ptr<scalar_t>(), bdp, R, n.r);  // z = SiLU(h), in place
                if (n.A > 0) {
                  at::Tensor a = add.narrow(0, n0, R);
                  at::mm_out(a, h, wu_a);
                  head_bias(a.mutable_data_ptr<scalar_t>(), bup, R, n.A, 2);
                }
                if (n.G > 0) {
                  at::Tensor g = gates.narrow(0, n0, R);
                  at::mm_out(g, h, wu_g);
                  head_bias(g.mutable_data_ptr<scalar_t>(), bup + n.A, R, n.G, phi);
                }
              });
  });
  return {add, gates};
}

// ----------------------------------------------------------------------------- backward
at::Tensor grad_operand(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x0, int64_t cols,
                        const char* op) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_device(*t, name, op, at::kCPU);
  TORCH_CHECK(t->scalar_type() == x0.scalar_type() && t->dim() == 2 && t->size(0) == x0.size(0) &&
                  t->size(1) == cols,
              "mmea_kernels_ext::", op, ": ", name, " must be [", x0.size(0), ", ", cols, "] of dtype ",
              x0.scalar_type(), ", got ", t->scalar_type(), " of shape ", t->sizes());
  // any row stride (e.g. dadd: a column slice of the linear's dy), unit column stride
  return cols <= 1 || t->stride(1) == 1 ? *t : t->contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_net_bwd_cpu(
    const at::Tensor& x0, const at::Tensor& wd_in, const at::Tensor& bd_in, const at::Tensor& wu_in,
    const at::Tensor& gates_in, const std::optional<at::Tensor>& dadd_in, const std::optional<at::Tensor>& dgates_in,
    int64_t A, int64_t phi, bool need_x0, bool need_weights) {
  const char* op = "gate_net_bwd";
  const Net n = check_net(x0, wd_in, bd_in, wu_in, A, op);
  check_phi(phi, op);
  const at::Tensor gates = grad_operand(gates_in, "gates", x0, n.G, op);
  TORCH_CHECK(gates.defined(), "mmea_kernels_ext::", op, ": gates must be given");
  const at::Tensor dadd = grad_operand(dadd_in, "dadd", x0, n.A, op);
  const at::Tensor dgates = grad_operand(dgates_in, "dgates", x0, n.G, op);
  const at::Tensor wd = wd_in.contiguous(), bd = bd_in.contiguous(), wu = wu_in.contiguous();
  const int64_t P = n.r * n.S + n.r + (n.A + n.G) * n.r + (n.A + n.G);  // one partial: dWd, dbd, dWu, dbu
  const int64_t splits = std::clamp<int64_t>((n.N + kTileRows - 1) / kTileRows, 1, kMaxSplits);
  const int64_t split_rows = (n.N + splits - 1) / splits;
  at::Tensor dx0 = at::empty({need_x0 ? n.N : 0, n.S}, x0.options());
  at::Tensor partial = need_weights ? at::zeros({splits, P}, x0.options()) : at::Tensor();
  const bool any = n.N > 0 && (dadd.defined() || dgates.defined());
  if (need_x0 && !any) dx0.zero_();
  if (any && (need_x0 || need_weights)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const int64_t items = need_weights ? splits : (n.N + kTileRows - 1) / kTileRows;
    const int64_t rows_per_item = need_weights ? split_rows : kTileRows;
    const int nt = static_cast<int>(std::min<int64_t>(num_threads_for(n.N * (n.S + n.A + n.G)), items));
    const int64_t C = n.A + n.G;
    const at::Tensor wd_t = wd.t();
    AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "mmea_gate_net_bwd_cpu", [&] {
      const scalar_t* bdp = bd.const_data_ptr<scalar_t>();
      run_items(
          items, nt,
          [&] {  // h, s·(1 + h(1 - s)) then dh, z, dγ, dz
            const int64_t tr = std::min(kTileRows, n.N);
            return std::make_tuple(at::empty({tr, n.r}, x0.options()), at::empty({tr, n.r}, x0.options()),
                                   at::empty({tr, C}, x0.options()), at::empty({tr, n.r}, x0.options()));
          },
          [&](int64_t k, const auto& bufs) {
            const int64_t lo = k * rows_per_item, hi = std::min(n.N, lo + rows_per_item);
            at::Tensor part = need_weights ? partial.select(0, k) : at::Tensor();
            for (int64_t n0 = lo; n0 < hi; n0 += kTileRows) {
              const int64_t R = std::min(kTileRows, hi - n0);
              const at::Tensor x0t = x0.narrow(0, n0, R);
              at::Tensor h = std::get<0>(bufs).narrow(0, 0, R), z = std::get<1>(bufs).narrow(0, 0, R);
              at::Tensor dg = std::get<2>(bufs).narrow(0, 0, R), dz = std::get<3>(bufs).narrow(0, 0, R);
              at::mm_out(h, x0t, wd_t);
              scalar_t* hp = h.mutable_data_ptr<scalar_t>();
              silu_and_derivative(hp, z.mutable_data_ptr<scalar_t>(), bdp, R, n.r);  // z; h <- SiLU'(h)
              // dγ = [dadd, dgates · φ'(γ)] with φ'(γ) = gates (exp) or 1 (residual)
              scalar_t* dgp = dg.mutable_data_ptr<scalar_t>();
              for (int64_t r = 0; r < R; ++r) {
                scalar_t* o = dgp + r * C;
                if (dadd.defined()) {
                  const scalar_t* a = dadd.const_data_ptr<scalar_t>() + (n0 + r) * dadd.stride(0);
                  std::copy(a, a + n.A, o);
                } else {
                  std::fill_n(o, n.A, scalar_t(0));
                }
                if (dgates.defined()) {
                  const scalar_t* d = dgates.const_data_ptr<scalar_t>() + (n0 + r) * dgates.stride(0);
                  if (phi == 0) {
                    const scalar_t* g = gates.const_data_ptr<scalar_t>() + (n0 + r) * gates.stride(0);
                    for (int64_t c = 0; c < n.G; ++c) o[n.A + c] = d[c] * g[c];
                  } else {
                    std::copy(d, d + n.G, o + n.A);
                  }
                } else {
                  std::fill_n(o + n.A, n.G, scalar_t(0));
                }
              }
              at::mm_out(dz, dg, wu);  // dz = dγ W_up
              scalar_t* dzp = dz.mutable_data_ptr<scalar_t>();
              for (int64_t i = 0; i < R * n.r; ++i) dzp[i] *= hp[i];  // dh = dz · SiLU'(h)
              if (need_x0) {
                at::Tensor o = dx0.narrow(0, n0, R);
                at::mm_out(o, dz, wd);
              }
              if (need_weights) {
                at::Tensor dwd = part.narrow(0, 0, n.r * n.S).view({n.r, n.S});
                at::Tensor dbd = part.narrow(0, n.r * n.S, n.r);
                at::Tensor dwu = part.narrow(0, n.r * n.S + n.r, C * n.r).view({C, n.r});
                at::Tensor dbu = part.narrow(0, n.r * n.S + n.r + C * n.r, C);
                at::addmm_out(dwd, dwd, dz.t(), x0t);  // the partial starts at zero
                at::addmm_out(dwu, dwu, dg.t(), z);
                scalar_t* bdp = dbd.mutable_data_ptr<scalar_t>();
                scalar_t* bup = dbu.mutable_data_ptr<scalar_t>();
                for (int64_t r = 0; r < R; ++r) {
                  for (int64_t j = 0; j < n.r; ++j) bdp[j] += dzp[r * n.r + j];
                  for (int64_t c = 0; c < C; ++c) bup[c] += dgp[r * C + c];
                }
              }
            }
          });
    });
  }
  // what was not asked for comes back empty (0 elements)
  at::Tensor dwd = at::empty({0}, x0.options()), dbd = dwd, dwu = dwd, dbu = dwd;
  if (need_weights) {
    at::Tensor total = partial.select(0, 0).clone();  // the partials in split order: thread-count independent
    for (int64_t s = 1; s < splits; ++s) total.add_(partial.select(0, s));
    const int64_t C = n.A + n.G;
    dwd = total.narrow(0, 0, n.r * n.S).view({n.r, n.S});
    dbd = total.narrow(0, n.r * n.S, n.r);
    dwu = total.narrow(0, n.r * n.S + n.r, C * n.r).view({C, n.r});
    dbu = total.narrow(0, n.r * n.S + n.r + C * n.r, C);
  }
  return {dx0, dwd, dbd, dwu, dbu};
}

}  // namespace
}  // namespace mmea_gn

TORCH_LIBRARY_FRAGMENT(mmea_kernels_ext, m) {
  m.def("gate_net_fwd(Tensor x0, Tensor w_down, Tensor b_down, Tensor w_up, Tensor b_up, int num_additive, "
        "int phi) -> (Tensor, Tensor)");
  m.def("gate_net_bwd(Tensor x0, Tensor w_down, Tensor b_down, Tensor w_up, Tensor gates, Tensor? dadd, "
        "Tensor? dgates, int num_additive, int phi, bool need_x0, bool need_weights) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmea_kernels_ext, CPU, m) {
  m.impl("gate_net_fwd", &mmea_gn::gate_net_fwd_cpu);
  m.impl("gate_net_bwd", &mmea_gn::gate_net_bwd_cpu);
}
