// The activations of the fused gate (fused_gate.cpp) and their derivatives, in the codes of
// mmea_kernels/ops/fused_gate/spec.py, on top of a branch-free exp so that the loops over them
// auto-vectorise. fused_gate.cpp includes this after its `GCC optimize("no-trapping-math")`, which
// the loops need to vectorise (and which GCC needs on both sides to inline them).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace mmea_fg {
namespace {

enum Act : int { kIdentity = 0, kSilu = 1, kSigmoid = 2, kTanh = 3, kAbs = 4, kSoftplus = 5, kSsp = 6 };
constexpr int kNumActs = 7;
constexpr double kLog2 = 0.693147180559945309417232121458176568;

// p = c0, then p = p * r + c for every further coefficient c (Horner's scheme, highest degree first).
template <typename T, typename... C>
inline T horner(T r, T p, C... cs) {
  ((p = p * r + cs), ...);
  return p;
}

// exp without libm calls, branch-free, so that the activation loops auto-vectorise (plain -O3,
// no -ffast-math): Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, Taylor polynomial of exp(r)
// (degree 13 for double, 7 for float: truncation below half an ulp), times 2^n as two factors
// 2^(n/2) built in the exponent bits (each a normal number, so the product rounds as exp does:
// inf above log(max), denormals, then 0, below). Accurate to a few ulp (tested against torch to
// 1e-12 relative in float64), inf/0/NaN where torch's exp gives them: inputs are clamped only
// beyond those limits (a review found the gate exp(γ) stuck at exp(88) ≈ 1.7e38 in float32, finite
// where the exact gate overflows).
template <typename T>
inline T fast_exp(T x) {
  static_assert(std::is_same_v<T, double> || std::is_same_v<T, float>, "fast_exp: double or float");
  constexpr bool kDouble = std::is_same_v<T, double>;
  using Bits = std::conditional_t<kDouble, int64_t, int32_t>;
  // exp(kHi) overflows, exp(kLo) rounds to 0: |n| <= 1076 (150), halves within the normal exponents
  constexpr T kLo = kDouble ? T(-746.0) : T(-104.0f), kHi = kDouble ? T(710.0) : T(89.0f);
  constexpr T kMagic = kDouble ? T(6755399441055744.0) : T(12582912.0f);  // 1.5 * 2^52, 1.5 * 2^23
  constexpr T kLog2e = kDouble ? T(1.4426950408889634074) : T(1.44269504088896341f);
  constexpr T kLn2Hi = kDouble ? T(6.93147180369123816490e-01) : T(0.693359375f);
  constexpr T kLn2Lo = kDouble ? T(1.90821492927058770002e-10) : T(-2.12194440e-4f);
  constexpr int kMantissa = kDouble ? 52 : 23, kBias = kDouble ? 1023 : 127;
  x = x < kLo ? kLo : x;
  x = x > kHi ? kHi : x;
  const T t = x * kLog2e + kMagic;
  const T n = t - kMagic;
  const T r = (x - n * kLn2Hi) - n * kLn2Lo;
  T p;
  if constexpr (kDouble) {
    p = horner(r, 1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0,
               1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0);
  } else {
    p = horner(r, 1.0f / 5040.0f, 1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f);
  }
  const Bits ni = __builtin_bit_cast(Bits, t) - __builtin_bit_cast(Bits, kMagic);
  // 2^n = 2^n1 * 2^n2, each factor normal; n1 = round(n / 2) by the same magic-number rounding (a 64-bit
  // arithmetic shift would not vectorise without AVX-512)
  const Bits n1 = __builtin_bit_cast(Bits, n * T(0.5) + kMagic) - __builtin_bit_cast(Bits, kMagic), n2 = ni - n1;
  return (p * __builtin_bit_cast(T, (n1 + kBias) << kMantissa)) * __builtin_bit_cast(T, (n2 + kBias) << kMantissa);
}

// f(x) and f'(x) as torch computes them (silu: x / (1 + exp(-x)); softplus: threshold 20).
template <int A, typename T>
inline T act_val(T x) {
  if constexpr (A == kIdentity) return x;
  if constexpr (A == kSilu) return x / (T(1) + fast_exp(-x));
  if constexpr (A == kSigmoid) return T(1) / (T(1) + fast_exp(-x));
  if constexpr (A == kTanh) return std::tanh(x);
  if constexpr (A == kAbs) return x < T(0) ? -x : x;
  if constexpr (A == kSoftplus) return x > T(20) ? x : std::log1p(std::exp(x));
  if constexpr (A == kSsp) return (x > T(20) ? x : std::log1p(std::exp(x))) - T(kLog2);
  return x;
}

template <int A, typename T>
inline T act_der(T x) {
  if constexpr (A == kIdentity) return T(1);
  if constexpr (A == kSilu) {
    const T s = T(1) / (T(1) + fast_exp(-x));
    return s * (T(1) + x * (T(1) - s));
  }
  if constexpr (A == kSigmoid) {
    const T s = T(1) / (T(1) + fast_exp(-x));
    return s * (T(1) - s);
  }
  if constexpr (A == kTanh) {
    const T t = std::tanh(x);
    return T(1) - t * t;
  }
  if constexpr (A == kAbs) return x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0));
  if constexpr (A == kSoftplus || A == kSsp) {
    if (x > T(20)) return T(1);
    const T z = std::exp(x);
    return z / (z + T(1));
  }
  return T(1);
}

// f and f' together (one exp for silu / sigmoid / softplus)
template <int A, typename T>
inline void act_val_der(T x, T& f, T& d) {
  if constexpr (A == kSilu || A == kSigmoid) {
    const T s = T(1) / (T(1) + fast_exp(-x));
    f = A == kSilu ? x * s : s;
    d = A == kSilu ? s * (T(1) + x * (T(1) - s)) : s * (T(1) - s);
  } else {
    f = act_val<A, T>(x);
    d = act_der<A, T>(x);
  }
}

// f, f' and f'' together (the double backward; f'' as reference.act_d2 writes it)
template <int A, typename T>
inline void act_val_der2(T x, T& f, T& d, T& dd) {
  if constexpr (A == kSilu || A == kSigmoid) {
    const T s = T(1) / (T(1) + fast_exp(-x));
    const T ds = s * (T(1) - s);
    f = A == kSilu ? x * s : s;
    d = A == kSilu ? s * (T(1) + x * (T(1) - s)) : ds;
    dd = A == kSilu ? ds * (T(2) + x * (T(1) - T(2) * s)) : ds * (T(1) - T(2) * s);
  } else if constexpr (A == kTanh) {
    const T t = std::tanh(x);
    f = t;
    d = T(1) - t * t;
    dd = T(-2) * t * d;
  } else if constexpr (A == kSoftplus || A == kSsp) {
    f = act_val<A, T>(x);
    d = act_der<A, T>(x);
    dd = x > T(20) ? T(0) : d * (T(1) - d);
  } else {  // identity, abs: f'' = 0
    f = act_val<A, T>(x);
    d = act_der<A, T>(x);
    dd = T(0);
  }
}

}  // namespace
}  // namespace mmea_fg
