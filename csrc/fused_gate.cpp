// CPU kernels of the fused equivariant gate (mmea_kernels.nn.FusedGate), registered as
// ``torch.ops.mmea_kernels_ext.fused_gate_fwd`` and ``torch.ops.mmea_kernels_ext.fused_gate_bwd``.
//
//   fused_gate_fwd(x [N, Din], segs int64 [R, 8], csts float64 [R], d_out, num_gates) -> y [N, Dout]
//   fused_gate_bwd(x [N, Din], dy [N, Dout], segs, csts, num_gates) -> dx [N, Din]
//   fused_gate_dbwd(x, dy, v [N, Din], segs, csts, num_gates) -> (gx [N, Din], gdy [N, Dout]): the
//     gradients of <fused_gate_bwd(x, dy), v> (second derivatives, the step of force training that
//     differentiates the forces; reference.double_backward is the same in torch ops)
//
// segs rows (kind, src, dst, n, dim, act, gate0, ir_mul) (mmea_kernels/ops/fused_gate/spec.py):
//   kind 0 scalars:  y[dst + i] = cst * act(x[src + i]),               i < n
//   kind 1 gates:    g[dst + i] = cst * act(x[src + i]),               i < n   (per-row buffer of G)
//   kind 2 gated:    y[dst + o] = x[src + o] * g[gate0 + u]   for copy u < n (= mul) of an irrep of
//                    dimension dim, o = u*dim + m (mul_ir) or m*n + u (ir_mul)
// One pass over the rows (OpenMP over row chunks; serial for small inputs or inside a parallel
// region): per row the gate activations go to a thread-local buffer, then every output column is
// written once. The backward recomputes the activations and their derivatives from x (nothing is
// saved but x) and writes every dx column once:
//   scalars dx = dy * cst * act'(x); gated dx = dy * g; gates dx = cst * act'(x) * sum(dy * x).
// fp16/bf16 compute in fp32 (at::opmath_type).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "parallel.h"

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

// The activation loops must be free of floating-point control flow to vectorise; GCC keeps the
// clamps / selects as branches under -ftrapping-math (its default). Nothing here reads the FP
// exception flags. The headers after this pragma (activations, gated blocks) are compiled under it.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#define MMEA_FG_FP_OPTIONS 1  // act_loops.h checks that it comes after the pragma

#include "activations.h"
#include "isa.h"
#include "blocks.h"
#include "act_loops.h"

namespace mmea_fg {
namespace {

using mmea::check_device;
using mmea::check_features;
using mmea::num_threads_for;
using mmea::rows_per_chunk;
using mmea::scale_blocks;
using mmea::with_width;

struct Seg {
  int64_t kind, src, dst, n, dim, act, gate0, ir_mul;
  double cst;
};

#define MMEA_FG_ACT_SWITCH(code, CALL)                 \
  switch (code) {                                      \
    case kIdentity: { constexpr int A = kIdentity; CALL; break; } \
    case kSilu: { constexpr int A = kSilu; CALL; break; }         \
    case kSigmoid: { constexpr int A = kSigmoid; CALL; break; }   \
    case kTanh: { constexpr int A = kTanh; CALL; break; }         \
    case kAbs: { constexpr int A = kAbs; CALL; break; }           \
    case kSoftplus: { constexpr int A = kSoftplus; CALL; break; } \
    default: { constexpr int A = kSsp; CALL; break; }             \
  }

// forward of one gated block: y = x * g[u] for copy u (mul_ir: blocks of dim columns; ir_mul: dim
// m-rows of mul columns, the gate stepping by one per column)
template <typename scalar_t, typename acc_t>
void gated_block_fwd(const Seg& s, const scalar_t* __restrict__ xr, const acc_t* __restrict__ g,
                     scalar_t* __restrict__ yr) {
  const scalar_t* __restrict__ xs = xr + s.src;
  scalar_t* __restrict__ ys = yr + s.dst;
  const acc_t* __restrict__ gs = g + s.gate0;
  const int64_t mul = s.n, dim = s.dim;
  if (s.ir_mul) {
    for (int64_t m = 0; m < dim; ++m)
      scale_blocks(xs + m * mul, gs, ys + m * mul, std::integral_constant<int, 1>{}, mul);
    return;
  }
  with_width<1, 3, 5, 7>(dim, [&](auto w) { scale_blocks(xs, gs, ys, w, mul); });
}

// backward of one mul_ir block: dx = dy * g; sg[u] += sum_m dy * x. The unrolled widths sum a
// copy's products locally and then add them to sg[u]; other widths add straight into sg[u].
template <typename W, typename scalar_t, typename acc_t>
inline void gated_bwd_mul_ir(const scalar_t* __restrict__ xs, const scalar_t* __restrict__ dys,
                             const acc_t* __restrict__ gs, scalar_t* __restrict__ dxs, acc_t* __restrict__ sg,
                             W width, int64_t mul) {
  constexpr bool kFixed = !std::is_same_v<W, int64_t>;
  const int64_t w = width;
  for (int64_t u = 0; u < mul; ++u) {
    const acc_t g = gs[u];
    acc_t s = kFixed ? acc_t(0) : sg[u];
#pragma GCC unroll 16
    for (int64_t m = 0; m < w; ++m) {
      const acc_t d = static_cast<acc_t>(dys[u * w + m]);
      s += d * static_cast<acc_t>(xs[u * w + m]);
      dxs[u * w + m] = static_cast<scalar_t>(d * g);
    }
    sg[u] = kFixed ? sg[u] + s : s;
  }
}

template <typename scalar_t, typename acc_t>
void gated_block_bwd(const Seg& s, const scalar_t* __restrict__ xr, const scalar_t* __restrict__ dyr,
                     const acc_t* __restrict__ g, scalar_t* __restrict__ dxr, acc_t* __restrict__ sgate) {
  const scalar_t* __restrict__ xs = xr + s.src;
  const scalar_t* __restrict__ dys = dyr + s.dst;
  scalar_t* __restrict__ dxs = dxr + s.src;
  const acc_t* __restrict__ gs = g + s.gate0;
  acc_t* __restrict__ sg = sgate + s.gate0;
  const int64_t mul = s.n, dim = s.dim;
  if (s.ir_mul) {
    for (int64_t m = 0; m < dim; ++m)
      for (int64_t u = 0; u < mul; ++u) {
        const acc_t d = static_cast<acc_t>(dys[m * mul + u]);
        sg[u] += d * static_cast<acc_t>(xs[m * mul + u]);
        dxs[m * mul + u] = static_cast<scalar_t>(d * gs[u]);
      }
    return;
  }
  with_width<1, 3, 5, 7>(dim, [&](auto w) { gated_bwd_mul_ir(xs, dys, gs, dxs, sg, w, mul); });
}

std::vector<Seg> read_segs(const at::Tensor& segs_in, const at::Tensor& csts_in, int64_t d_in, int64_t d_out,
                           int64_t G, const char* op) {
  TORCH_CHECK(segs_in.scalar_type() == at::kLong && segs_in.dim() == 2 && segs_in.size(1) == 8,
              "mmea_kernels_ext::", op, ": segs must be an int64 [R, 8] table, got ", segs_in.scalar_type(), " ",
              segs_in.sizes());
  TORCH_CHECK(csts_in.scalar_type() == at::kDouble && csts_in.dim() == 1 && csts_in.size(0) == segs_in.size(0),
              "mmea_kernels_ext::", op, ": csts must be float64 [R] with R = ", segs_in.size(0));
  const at::Tensor segs = segs_in.to(at::kCPU).contiguous();
  const at::Tensor csts = csts_in.to(at::kCPU).contiguous();
  const int64_t* p = segs.const_data_ptr<int64_t>();
  const double* c = csts.const_data_ptr<double>();
  std::vector<Seg> out;
  for (int64_t r = 0; r < segs.size(0); ++r) {
    const int64_t* q = p + 8 * r;
    Seg s{q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7], c[r]};
    const int64_t width = s.kind == 2 ? s.n * s.dim : s.n;
    const int64_t dst_lim = s.kind == 1 ? G : d_out;
    TORCH_CHECK(s.kind >= 0 && s.kind <= 2 && s.n >= 0 && s.dim >= 1 && s.act >= 0 && s.act < kNumActs &&
                    s.src >= 0 && s.src + width <= d_in && s.dst >= 0 && s.dst + width <= dst_lim &&
                    (s.kind != 2 || (s.gate0 >= 0 && s.gate0 + s.n <= G)),
                "mmea_kernels_ext::", op, ": segs row ", r, " is out of range for d_in = ", d_in, ", d_out = ", d_out,
                ", num_gates = ", G);
    out.push_back(s);
  }
  // every column of x and of y belongs to a segment: a wider x or dy would leave columns of dx / gdy
  // unwritten (at::empty), a wider y unwritten too
  int64_t in_end = 0, out_end = 0;
  for (const Seg& s : out) {
    const int64_t width = s.kind == 2 ? s.n * s.dim : s.n;
    in_end = std::max(in_end, s.src + width);
    if (s.kind != 1) out_end = std::max(out_end, s.dst + width);
  }
  TORCH_CHECK(in_end == d_in && out_end == d_out, "mmea_kernels_ext::", op, ": the gate's segments cover ", in_end,
              " input and ", out_end, " output columns, but the tensors have ", d_in, " and ", d_out);
  // every gate a gated block reads is written by a gate segment first (else the block would read the
  // scratch left by an earlier row)
  std::vector<char> written(static_cast<size_t>(G), 0);
  for (const Seg& s : out)
    if (s.kind == 1) std::fill(written.begin() + s.dst, written.begin() + s.dst + s.n, char(1));
  for (const Seg& s : out)
    for (int64_t k = s.gate0; s.kind == 2 && k < s.gate0 + s.n; ++k)
      TORCH_CHECK(written[k], "mmea_kernels_ext::", op, ": gate ", k, " is read by a gated block but no gate segment ",
                  "computes it");
  return out;
}

// body(n, scratch) for every row n: chunks of rows over the threads (serial for small inputs or
// inside a parallel region); scratch is a per-thread buffer of `scratch` acc_t values
template <typename acc_t, typename Body>
void for_rows(int64_t N, int64_t Din, size_t scratch, const Body& body) {
  const int64_t chunk = rows_per_chunk(Din);
  const int64_t nchunks = (N + chunk - 1) / chunk;
  const int nt = num_threads_for(N * Din);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<acc_t> buf(std::max<size_t>(scratch, 1));
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const int64_t n1 = std::min(N, (ch + 1) * chunk);
      for (int64_t n = ch * chunk; n < n1; ++n) body(n, buf.data());
    }
  }
}

template <typename scalar_t>
void fwd_kernel(const scalar_t* xp, scalar_t* yp, int64_t N, int64_t Din, int64_t Dout, int64_t G,
                const std::vector<Seg>& segs) {
  using acc_t = at::opmath_type<scalar_t>;
  for_rows<acc_t>(N, Din, static_cast<size_t>(G), [&](int64_t n, acc_t* g) {  // g: the row's gate values
    const scalar_t* xr = xp + n * Din;
    scalar_t* yr = yp + n * Dout;
    for (const Seg& s : segs) {
      if (s.kind == 0) {
        MMEA_FG_ACT_SWITCH(s.act, (val_loop<A, scalar_t, scalar_t>(xr + s.src, yr + s.dst, s.n, s.cst)));
      } else if (s.kind == 1) {
        MMEA_FG_ACT_SWITCH(s.act, (val_loop<A, scalar_t, acc_t>(xr + s.src, g + s.dst, s.n, s.cst)));
      }
    }
    for (const Seg& s : segs)
      if (s.kind == 2) gated_block_fwd<scalar_t, acc_t>(s, xr, g, yr);
  });
}

template <typename scalar_t>
void bwd_kernel(const scalar_t* xp, const scalar_t* dyp, scalar_t* dxp, int64_t N, int64_t Din, int64_t Dout,
                int64_t G, const std::vector<Seg>& segs) {
  using acc_t = at::opmath_type<scalar_t>;
  for_rows<acc_t>(N, Din, 3 * static_cast<size_t>(G), [&](int64_t n, acc_t* g) {
    acc_t* dg = g + G;  // g = cst * f(x_gate), dg = cst * f'(x_gate)
    acc_t* sg = dg + G;  // sum over the gate's columns of dy * x
    const scalar_t* xr = xp + n * Din;
    const scalar_t* dyr = dyp + n * Dout;
    scalar_t* dxr = dxp + n * Din;
    std::fill(sg, sg + G, acc_t(0));
    for (const Seg& s : segs) {
      if (s.kind == 0) {
        MMEA_FG_ACT_SWITCH(s.act, (der_loop<A, scalar_t>(xr + s.src, dyr + s.dst, dxr + s.src, s.n, s.cst)));
      } else if (s.kind == 1) {
        MMEA_FG_ACT_SWITCH(s.act, (val_der_loop<A, scalar_t, acc_t>(xr + s.src, g + s.dst, dg + s.dst, s.n, s.cst)));
      }
    }
    for (const Seg& s : segs)
      if (s.kind == 2) gated_block_bwd<scalar_t, acc_t>(s, xr, dyr, g, dxr, sg);
    for (const Seg& s : segs)
      if (s.kind == 1)
        for (int64_t i = 0; i < s.n; ++i)
          dxr[s.src + i] = static_cast<scalar_t>(dg[s.dst + i] * sg[s.dst + i]);
  });
}

// double backward of one mul_ir block of width w, with a = cst f'(x_gate) v_gate per gate:
// gdy = v g[u] + x a[u], gx = a[u] dy, and the per-gate sums s1[u] = sum_m dy x, s2[u] = sum_m v dy
// added to s1[u], s2[u] (zeroed per row; for the gates' own gx)
template <typename W, typename scalar_t, typename acc_t>
inline void gated_dbwd_mul_ir(const scalar_t* __restrict__ xs, const scalar_t* __restrict__ dys,
                              const scalar_t* __restrict__ vs, const acc_t* __restrict__ gs,
                              const acc_t* __restrict__ as, scalar_t* __restrict__ gxs, scalar_t* __restrict__ gdys,
                              acc_t* __restrict__ s1, acc_t* __restrict__ s2, W width, int64_t mul) {
  const int64_t w = width;
  for (int64_t u = 0; u < mul; ++u) {
    const acc_t gu = gs[u], au = as[u];
    acc_t t1 = 0, t2 = 0;
#pragma GCC unroll 16
    for (int64_t m = 0; m < w; ++m) {
      const int64_t o = u * w + m;
      const acc_t xv = static_cast<acc_t>(xs[o]), dv = static_cast<acc_t>(dys[o]), vv = static_cast<acc_t>(vs[o]);
      gdys[o] = static_cast<scalar_t>(vv * gu + xv * au);
      gxs[o] = static_cast<scalar_t>(au * dv);
      t1 += dv * xv;
      t2 += vv * dv;
    }
    s1[u] += t1;
    s2[u] += t2;
  }
}

// the same for either layout (ir_mul: dim m-rows of mul columns, the gate stepping by one per column,
// the sums taken over m in the same order)
template <typename scalar_t, typename acc_t>
void gated_block_dbwd(const Seg& s, const scalar_t* __restrict__ xr, const scalar_t* __restrict__ dyr,
                      const scalar_t* __restrict__ vr, const acc_t* __restrict__ g, const acc_t* __restrict__ a,
                      scalar_t* __restrict__ gxr, scalar_t* __restrict__ gdyr, acc_t* __restrict__ s1,
                      acc_t* __restrict__ s2) {
  const scalar_t *xs = xr + s.src, *dys = dyr + s.dst, *vs = vr + s.src;
  scalar_t *gxs = gxr + s.src, *gdys = gdyr + s.dst;
  const acc_t *gs = g + s.gate0, *as = a + s.gate0;
  acc_t *t1 = s1 + s.gate0, *t2 = s2 + s.gate0;
  const int64_t mul = s.n, dim = s.dim;
  if (!s.ir_mul) {
    with_width<1, 3, 5, 7>(dim, [&](auto w) { gated_dbwd_mul_ir(xs, dys, vs, gs, as, gxs, gdys, t1, t2, w, mul); });
    return;
  }
  for (int64_t m = 0; m < dim; ++m)
    for (int64_t u = 0; u < mul; ++u) {
      const int64_t o = m * mul + u;
      const acc_t xv = static_cast<acc_t>(xs[o]), dv = static_cast<acc_t>(dys[o]), vv = static_cast<acc_t>(vs[o]);
      gdys[o] = static_cast<scalar_t>(vv * gs[u] + xv * as[u]);
      gxs[o] = static_cast<scalar_t>(as[u] * dv);
      t1[u] += dv * xv;
      t2[u] += vv * dv;
    }
}

// per row: the scalars' columns (gdy = v cst f', gx = v dy cst f'') and the gates' activations
// (g, dg, ddg = cst (f, f', f''), a = dg v) in vectorised loops, then the gated blocks, then the
// gates' own gx = ddg v s1 + dg s2
template <typename scalar_t>
void dbwd_kernel(const scalar_t* xp, const scalar_t* dyp, const scalar_t* vp, scalar_t* gxp, scalar_t* gdyp,
                 int64_t N, int64_t Din, int64_t Dout, int64_t G, const std::vector<Seg>& segs) {
  using acc_t = at::opmath_type<scalar_t>;
  for_rows<acc_t>(N, Din, 6 * static_cast<size_t>(G), [&](int64_t n, acc_t* g) {
    acc_t *dg = g + G, *ddg = dg + G, *a = ddg + G, *s1 = a + G, *s2 = s1 + G;
    const scalar_t *xr = xp + n * Din, *dyr = dyp + n * Dout, *vr = vp + n * Din;
    scalar_t *gxr = gxp + n * Din, *gdyr = gdyp + n * Dout;
    std::fill(s1, s1 + G, acc_t(0));
    std::fill(s2, s2 + G, acc_t(0));
    for (const Seg& s : segs) {
      if (s.kind == 0) {
        MMEA_FG_ACT_SWITCH(s.act, (der2_loop<A, scalar_t>(xr + s.src, vr + s.src, dyr + s.dst, gxr + s.src,
                                                          gdyr + s.dst, s.n, s.cst)));
      } else if (s.kind == 1) {
        MMEA_FG_ACT_SWITCH(s.act, (val_der2_loop<A, scalar_t, acc_t>(xr + s.src, vr + s.src, g + s.dst, dg + s.dst,
                                                                     ddg + s.dst, a + s.dst, s.n, s.cst)));
      }
    }
    for (const Seg& s : segs)
      if (s.kind == 2) gated_block_dbwd<scalar_t, acc_t>(s, xr, dyr, vr, g, a, gxr, gdyr, s1, s2);
    for (const Seg& s : segs)
      if (s.kind == 1)
        for (int64_t i = 0; i < s.n; ++i) {
          const int64_t j = s.dst + i;
          gxr[s.src + i] = static_cast<scalar_t>(ddg[j] * static_cast<acc_t>(vr[s.src + i]) * s1[j] + dg[j] * s2[j]);
        }
  });
}

void check_x(const at::Tensor& t, const char* name, const char* op) {
  check_features(t, name, op);
  check_device(t, name, op, at::kCPU);
}

at::Tensor fused_gate_fwd_cpu(const at::Tensor& x_in, const at::Tensor& segs_t, const at::Tensor& csts_t,
                              int64_t d_out, int64_t num_gates) {
  const char* op = "fused_gate_fwd";
  check_x(x_in, "x", op);
  const int64_t N = x_in.size(0), Din = x_in.size(1);
  const std::vector<Seg> segs = read_segs(segs_t, csts_t, Din, d_out, num_gates, op);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({N, d_out}, x.options());
  if (N == 0 || d_out == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmea_fused_gate_fwd", [&] {
    fwd_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), N, Din, d_out, num_gates, segs);
  });
  return y;
}

at::Tensor fused_gate_bwd_cpu(const at::Tensor& x_in, const at::Tensor& dy_in, const at::Tensor& segs_t,
                              const at::Tensor& csts_t, int64_t num_gates) {
  const char* op = "fused_gate_bwd";
  check_x(x_in, "x", op);
  check_x(dy_in, "dy", op);
  TORCH_CHECK(dy_in.scalar_type() == x_in.scalar_type(), "mmea_kernels_ext::", op, ": dy has dtype ",
              dy_in.scalar_type(), " but x has dtype ", x_in.scalar_type());
  TORCH_CHECK(dy_in.size(0) == x_in.size(0), "mmea_kernels_ext::", op, ": dy has ", dy_in.size(0), " rows but x has ",
              x_in.size(0));
  const int64_t N = x_in.size(0), Din = x_in.size(1), Dout = dy_in.size(1);
  const std::vector<Seg> segs = read_segs(segs_t, csts_t, Din, Dout, num_gates, op);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = dy_in.contiguous();
  at::Tensor dx = at::empty({N, Din}, x.options());
  if (N == 0 || Din == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmea_fused_gate_bwd", [&] {
    bwd_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
                         N, Din, Dout, num_gates, segs);
  });
  return dx;
}

std::tuple<at::Tensor, at::Tensor> fused_gate_dbwd_cpu(const at::Tensor& x_in, const at::Tensor& dy_in,
                                                       const at::Tensor& v_in, const at::Tensor& segs_t,
                                                       const at::Tensor& csts_t, int64_t num_gates) {
  const char* op = "fused_gate_dbwd";
  check_x(x_in, "x", op);
  check_x(dy_in, "dy", op);
  check_x(v_in, "v", op);
  TORCH_CHECK(dy_in.scalar_type() == x_in.scalar_type() && v_in.scalar_type() == x_in.scalar_type(),
              "mmea_kernels_ext::", op, ": x, dy and v must share a dtype, got ", x_in.scalar_type(), ", ",
              dy_in.scalar_type(), ", ", v_in.scalar_type());
  TORCH_CHECK(dy_in.size(0) == x_in.size(0) && v_in.sizes() == x_in.sizes(), "mmea_kernels_ext::", op,
              ": x ", x_in.sizes(), ", dy ", dy_in.sizes(), ", v ", v_in.sizes(),
              ": dy needs x's rows and v x's shape");
  const int64_t N = x_in.size(0), Din = x_in.size(1), Dout = dy_in.size(1);
  const std::vector<Seg> segs = read_segs(segs_t, csts_t, Din, Dout, num_gates, op);
  const at::Tensor x = x_in.contiguous(), dy = dy_in.contiguous(), v = v_in.contiguous();
  at::Tensor gx = at::empty({N, Din}, x.options());
  at::Tensor gdy = at::empty({N, Dout}, x.options());
  if (N == 0 || (Din == 0 && Dout == 0)) return {gx, gdy};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mmea_fused_gate_dbwd", [&] {
    dbwd_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                          gx.mutable_data_ptr<scalar_t>(), gdy.mutable_data_ptr<scalar_t>(), N, Din, Dout, num_gates,
                          segs);
  });
  return {gx, gdy};
}

}  // namespace
}  // namespace mmea_fg

TORCH_LIBRARY_FRAGMENT(mmea_kernels_ext, m) {
  m.def("fused_gate_fwd(Tensor x, Tensor segs, Tensor csts, int d_out, int num_gates) -> Tensor");
  m.def("fused_gate_bwd(Tensor x, Tensor dy, Tensor segs, Tensor csts, int num_gates) -> Tensor");
  m.def("fused_gate_dbwd(Tensor x, Tensor dy, Tensor v, Tensor segs, Tensor csts, int num_gates) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mmea_kernels_ext, CPU, m) {
  m.impl("fused_gate_fwd", &mmea_fg::fused_gate_fwd_cpu);
  m.impl("fused_gate_bwd", &mmea_fg::fused_gate_bwd_cpu);
  m.impl("fused_gate_dbwd", &mmea_fg::fused_gate_dbwd_cpu);
}
