// Transposes between a mul_ir irreps block and the GEMM layout of the fused linear's CPU kernels
// (gated_linear.cpp), for the common case: adjacent components (component stride 1, channel
// stride d) and d = 3, 5, 7 (l = 1, 2, 3).
//
//   pack:  dst[m * C + c] = src[c * d + m] · g[c]      (one row; g optional)
//   store: out[c * d + m] = acc[m * C + c] · g[c]      (one row; u[c * d + m] = acc[m * C + c] too)
//
// The generic loops of gated_linear.cpp read d from the tables at run time; with d a template
// constant the compiler unrolls the component loop and vectorises the channel loop with shuffles.
// Measured on the 2-core dev VM (AMD EPYC, AVX-512 capable; 2000 rows x 128 channels, float32):
// pack 262 -> 66 us (d = 3), 379 -> 217 (d = 5), 504 -> 302 (d = 7); store 144 -> 63 (d = 3). The
// loops are compiled twice, for the baseline ISA and for AVX2, chosen once at run time (as the
// activation loops of fused_gate.cpp and gate_net.cpp). Products only (no sums), so the AVX2 code
// gives the same bits as the baseline one.
#pragma once

#include <cstdint>

#include "isa.h"

namespace mmea_il {

template <typename T, int D>
__attribute__((always_inline)) inline void pack_rows(const T* src, int64_t ld, int64_t R, int64_t C, const T* g,
                                                     int64_t gld, T* dst) {
  for (int64_t r = 0; r < R; ++r) {
    const T* __restrict__ s = src + r * ld;
    T* __restrict__ o = dst + r * D * C;
    if (g != nullptr) {
      const T* __restrict__ gr = g + r * gld;
      for (int64_t c = 0; c < C; ++c) {
        const T gc = gr[c];
        for (int m = 0; m < D; ++m) o[m * C + c] = s[c * D + m] * gc;
      }
    } else {
      for (int64_t c = 0; c < C; ++c)
        for (int m = 0; m < D; ++m) o[m * C + c] = s[c * D + m];
    }
  }
}

template <typename T, int D>
__attribute__((always_inline)) inline void store_rows(const T* acc, int64_t R, int64_t C, T* out, T* uo, int64_t ld,
                                                      const T* g, int64_t gld) {
  for (int64_t r = 0; r < R; ++r) {
    const T* __restrict__ a = acc + r * D * C;
    T* __restrict__ o = out + r * ld;
    if (uo != nullptr) {
      T* __restrict__ u = uo + r * ld;
      for (int64_t c = 0; c < C; ++c)
        for (int m = 0; m < D; ++m) u[c * D + m] = a[m * C + c];
    }
    if (g != nullptr) {
      const T* __restrict__ gr = g + r * gld;
      for (int64_t c = 0; c < C; ++c) {
        const T gc = gr[c];
        for (int m = 0; m < D; ++m) o[c * D + m] = a[m * C + c] * gc;
      }
    } else {
      for (int64_t c = 0; c < C; ++c)
        for (int m = 0; m < D; ++m) o[c * D + m] = a[m * C + c];
    }
  }
}

#define MMEA_IL_CLONES(suffix, attr)                                                                         \
  template <typename T, int D>                                                                               \
  attr void pack_rows##suffix(const T* src, int64_t ld, int64_t R, int64_t C, const T* g, int64_t gld,       \
                              T* dst) {                                                                      \
    pack_rows<T, D>(src, ld, R, C, g, gld, dst);                                                             \
  }                                                                                                          \
  template <typename T, int D>                                                                               \
  attr void store_rows##suffix(const T* acc, int64_t R, int64_t C, T* out, T* uo, int64_t ld, const T* g,   \
                               int64_t gld) {                                                                \
    store_rows<T, D>(acc, R, C, out, uo, ld, g, gld);                                                        \
  }

MMEA_IL_CLONES(_base, )
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
MMEA_IL_CLONES(_avx2, __attribute__((target("avx2"))))
#else
#define pack_rows_avx2 pack_rows_base
#define store_rows_avx2 store_rows_base
#endif
#undef MMEA_IL_CLONES

template <typename T, int D>
void pack_d(const T* src, int64_t ld, int64_t R, int64_t C, const T* g, int64_t gld, T* dst) {
  if (::mmea::use_avx2()) return pack_rows_avx2<T, D>(src, ld, R, C, g, gld, dst);
  pack_rows_base<T, D>(src, ld, R, C, g, gld, dst);
}

template <typename T, int D>
void store_d(const T* acc, int64_t R, int64_t C, T* out, T* uo, int64_t ld, const T* g, int64_t gld) {
  if (::mmea::use_avx2()) return store_rows_avx2<T, D>(acc, R, C, out, uo, ld, g, gld);
  store_rows_base<T, D>(acc, R, C, out, uo, ld, g, gld);
}

// R rows of a block with adjacent components and d components per channel: true when d is one of
// the specialised sizes (and the rows were packed), false to leave them to the generic loop.
template <typename T>
bool pack_interleaved(int64_t d, const T* src, int64_t ld, int64_t R, int64_t C, const T* g, int64_t gld, T* dst) {
  switch (d) {
    case 3: pack_d<T, 3>(src, ld, R, C, g, gld, dst); return true;
    case 5: pack_d<T, 5>(src, ld, R, C, g, gld, dst); return true;
    case 7: pack_d<T, 7>(src, ld, R, C, g, gld, dst); return true;
    default: return false;
  }
}

template <typename T>
bool store_interleaved(int64_t d, const T* acc, int64_t R, int64_t C, T* out, T* uo, int64_t ld, const T* g,
                       int64_t gld) {
  switch (d) {
    case 3: store_d<T, 3>(acc, R, C, out, uo, ld, g, gld); return true;
    case 5: store_d<T, 5>(acc, R, C, out, uo, ld, g, gld); return true;
    case 7: store_d<T, 7>(acc, R, C, out, uo, ld, g, gld); return true;
    default: return false;
  }
}

}  // namespace mmea_il
