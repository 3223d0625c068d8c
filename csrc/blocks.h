// The per-row loops over gated blocks shared by the CPU kernels (gate_ops.cpp, fused_gate.cpp): `count`
// gates of `w` consecutive columns each (gate i owns columns i*w .. i*w + w - 1; w = 1 is a run whose
// gate steps by one per column). The width is a std::integral_constant for the common irrep widths
// 2l+1 (with_width picks it, so that the loops over w unroll fully) or a plain int64_t.
//
// Unnamed namespace: every file gets its own copies, compiled under its own options (fused_gate.cpp
// builds without trapping math, and GCC does not inline across differing FP options).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>
#include <type_traits>

namespace mmea {
namespace {

// f(std::integral_constant<int, L>{}) when len is one of Ls, else f(len).
template <int... Ls, typename F>
inline void with_width(int64_t len, F&& f) {
  const bool fixed = ((len == Ls ? (f(std::integral_constant<int, Ls>{}), true) : false) || ...);
  if (!fixed) f(len);
}

// ys[i*w + m] = xs[i*w + m] * gs[i] (gates in scalar_t or already in the accumulation type).
template <typename W, typename scalar_t, typename gate_t>
inline void scale_blocks(const scalar_t* __restrict__ xs, const gate_t* __restrict__ gs, scalar_t* __restrict__ ys,
                         W width, int64_t count) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t w = width;  // a constant for the unrolled widths
  for (int64_t i = 0; i < count; ++i) {
    const acc_t s = static_cast<acc_t>(gs[i]);
#pragma GCC unroll 16
    for (int64_t m = 0; m < w; ++m) ys[i * w + m] = static_cast<scalar_t>(static_cast<acc_t>(xs[i * w + m]) * s);
  }
}

// acc[i] += sum_m as[i*w + m] * bs[i*w + m], summed in column order.
template <typename W, typename scalar_t>
inline void dot_blocks(const scalar_t* __restrict__ as, const scalar_t* __restrict__ bs,
                       at::opmath_type<scalar_t>* __restrict__ acc, W width, int64_t count) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t w = width;
  for (int64_t i = 0; i < count; ++i) {
    acc_t s = static_cast<acc_t>(as[i * w]) * static_cast<acc_t>(bs[i * w]);
#pragma GCC unroll 16
    for (int64_t m = 1; m < w; ++m) s += static_cast<acc_t>(as[i * w + m]) * static_cast<acc_t>(bs[i * w + m]);
    acc[i] += s;
  }
}

}  // namespace
}  // namespace mmea
