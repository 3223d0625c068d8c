// The activation loops of the fused gate (fused_gate.cpp), compiled three times: for the baseline
// ISA, for AVX2+FMA and for AVX-512 (chosen at run time, isa.h). With the branch-free fast_exp
// (activations.h) they vectorise (4 doubles / 8 floats per instruction with AVX2, 8 / 16 with
// AVX-512). Included by fused_gate.cpp after its `GCC optimize("no-trapping-math")`.
//   val:        out[i] = cst f(in[i])
//   val_der:    out[i] = cst f(in[i]); der[i] = cst f'(in[i])
//   der:        dx[i] = dy[i] cst f'(x[i])
//   der2:       gdy[i] = v[i] cst f'(x[i]); gx[i] = v[i] dy[i] cst f''(x[i])   (scalars' double backward)
//   val_der2:   g, dg, ddg = cst (f, f', f'')(x[i]); a[i] = dg[i] v[i]         (gates' double backward)
#pragma once

// the loops vectorise only under the includer's floating-point options (see above)
#ifndef MMEA_FG_FP_OPTIONS
#error "act_loops.h: include it from fused_gate.cpp, after its GCC optimize(\"no-trapping-math\") pragma"
#endif

#include <ATen/OpMathType.h>

#include <cstdint>

#include "activations.h"
#include "isa.h"

namespace mmea_fg {
namespace {

#define MMEA_FG_LOOPS(SUFFIX, ATTR)                                                                            \
  template <int A, typename scalar_t, typename out_t>                                                          \
  ATTR void val_loop##SUFFIX(const scalar_t* __restrict__ in, out_t* __restrict__ out, int64_t n, double cst_d) { \
    using acc_t = at::opmath_type<scalar_t>;                                                                   \
    const acc_t cst = static_cast<acc_t>(cst_d);                                                               \
    for (int64_t i = 0; i < n; ++i)                                                                            \
      out[i] = static_cast<out_t>(cst * act_val<A, acc_t>(static_cast<acc_t>(in[i])));                         \
  }                                                                                                            \
  template <int A, typename scalar_t, typename acc_t>                                                          \
  ATTR void val_der_loop##SUFFIX(const scalar_t* __restrict__ in, acc_t* __restrict__ out,                     \
                                 acc_t* __restrict__ der, int64_t n, double cst_d) {                           \
    const acc_t cst = static_cast<acc_t>(cst_d);                                                               \
    for (int64_t i = 0; i < n; ++i) {                                                                          \
      acc_t f, d;                                                                                              \
      act_val_der<A, acc_t>(static_cast<acc_t>(in[i]), f, d);                                                  \
      out[i] = cst * f;                                                                                        \
      der[i] = cst * d;                                                                                        \
    }                                                                                                          \
  }                                                                                                            \
  template <int A, typename scalar_t>                                                                          \
  ATTR void der_loop##SUFFIX(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,                  \
                             scalar_t* __restrict__ dx, int64_t n, double cst_d) {                             \
    using acc_t = at::opmath_type<scalar_t>;                                                                   \
    const acc_t cst = static_cast<acc_t>(cst_d);                                                               \
    for (int64_t i = 0; i < n; ++i)                                                                            \
      dx[i] = static_cast<scalar_t>(static_cast<acc_t>(dy[i]) *                                                \
                                    (cst * act_der<A, acc_t>(static_cast<acc_t>(x[i]))));                      \
  }                                                                                                            \
  template <int A, typename scalar_t>                                                                          \
  ATTR void der2_loop##SUFFIX(const scalar_t* __restrict__ x, const scalar_t* __restrict__ v,                  \
                              const scalar_t* __restrict__ dy, scalar_t* __restrict__ gx,                      \
                              scalar_t* __restrict__ gdy, int64_t n, double cst_d) {                           \
    using acc_t = at::opmath_type<scalar_t>;                                                                   \
    const acc_t cst = static_cast<acc_t>(cst_d);                                                               \
    for (int64_t i = 0; i < n; ++i) {                                                                          \
      acc_t f, d, dd;                                                                                          \
      act_val_der2<A, acc_t>(static_cast<acc_t>(x[i]), f, d, dd);                                              \
      const acc_t vv = static_cast<acc_t>(v[i]);                                                               \
      gdy[i] = static_cast<scalar_t>(vv * (cst * d));                                                          \
      gx[i] = static_cast<scalar_t>(vv * static_cast<acc_t>(dy[i]) * (cst * dd));                              \
    }                                                                                                          \
  }                                                                                                            \
  template <int A, typename scalar_t, typename acc_t>                                                          \
  ATTR void val_der2_loop##SUFFIX(const scalar_t* __restrict__ x, const scalar_t* __restrict__ v,              \
                                  acc_t* __restrict__ g, acc_t* __restrict__ dg, acc_t* __restrict__ ddg,      \
                                  acc_t* __restrict__ a, int64_t n, double cst_d) {                            \
    const acc_t cst = static_cast<acc_t>(cst_d);                                                               \
    for (int64_t i = 0; i < n; ++i) {                                                                          \
      acc_t f, d, dd;                                                                                          \
      act_val_der2<A, acc_t>(static_cast<acc_t>(x[i]), f, d, dd);                                              \
      g[i] = cst * f;                                                                                          \
      dg[i] = cst * d;                                                                                         \
      ddg[i] = cst * dd;                                                                                       \
      a[i] = (cst * d) * static_cast<acc_t>(v[i]);                                                             \
    }                                                                                                          \
  }

MMEA_FG_LOOPS(_base, )
#if defined(__GNUC__) && defined(__x86_64__)
#define MMEA_FG_HAVE_AVX2 1
MMEA_FG_LOOPS(_avx2, __attribute__((target("avx2,fma"))))
// AVX-512: twice the lanes of AVX2 for the exp polynomial (the activations are compute-bound); the
// same operations in the same order as the AVX2 clone (IEEE, FMA contracted alike)
MMEA_FG_LOOPS(_avx512, __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))))
#else
#define MMEA_FG_HAVE_AVX2 0
#endif
#undef MMEA_FG_LOOPS

// run-time choice of the ISA (the CPU's widest, capped by MMEA_CPU_ISA): NAME<TARGS>(ARGS) of the
// AVX-512, AVX2 or baseline clone
#if MMEA_FG_HAVE_AVX2
#define MMEA_FG_ISA_CALL(NAME, TARGS, ARGS)                                  \
  do {                                                                       \
    if (::mmea::use_avx512()) NAME##_avx512<MMEA_FG_UNPAREN TARGS> ARGS;     \
    else if (::mmea::use_avx2()) NAME##_avx2<MMEA_FG_UNPAREN TARGS> ARGS;    \
    else NAME##_base<MMEA_FG_UNPAREN TARGS> ARGS;                            \
  } while (0)
#else
#define MMEA_FG_ISA_CALL(NAME, TARGS, ARGS) NAME##_base<MMEA_FG_UNPAREN TARGS> ARGS
#endif
#undef MMEA_FG_HAVE_AVX2
#define MMEA_FG_UNPAREN(...) __VA_ARGS__

template <int A, typename scalar_t, typename out_t>
inline void val_loop(const scalar_t* in, out_t* out, int64_t n, double cst) {
  MMEA_FG_ISA_CALL(val_loop, (A, scalar_t, out_t), (in, out, n, cst));
}
template <int A, typename scalar_t, typename acc_t>
inline void val_der_loop(const scalar_t* in, acc_t* out, acc_t* der, int64_t n, double cst) {
  MMEA_FG_ISA_CALL(val_der_loop, (A, scalar_t, acc_t), (in, out, der, n, cst));
}
template <int A, typename scalar_t>
inline void der_loop(const scalar_t* x, const scalar_t* dy, scalar_t* dx, int64_t n, double cst) {
  MMEA_FG_ISA_CALL(der_loop, (A, scalar_t), (x, dy, dx, n, cst));
}
template <int A, typename scalar_t>
inline void der2_loop(const scalar_t* x, const scalar_t* v, const scalar_t* dy, scalar_t* gx, scalar_t* gdy,
                      int64_t n, double cst) {
  MMEA_FG_ISA_CALL(der2_loop, (A, scalar_t), (x, v, dy, gx, gdy, n, cst));
}
template <int A, typename scalar_t, typename acc_t>
inline void val_der2_loop(const scalar_t* x, const scalar_t* v, acc_t* g, acc_t* dg, acc_t* ddg, acc_t* a, int64_t n,
                          double cst) {
  MMEA_FG_ISA_CALL(val_der2_loop, (A, scalar_t, acc_t), (x, v, g, dg, ddg, a, n, cst));
}
#undef MMEA_FG_ISA_CALL
#undef MMEA_FG_UNPAREN

}  // namespace
}  // namespace mmea_fg
