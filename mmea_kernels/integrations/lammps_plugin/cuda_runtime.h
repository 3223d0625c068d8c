// CPU-only stand-in for the CUDA runtime calls in sevenn's pair_e3gnn_parallel.cpp, used when torch
// is a CPU build (no CUDA toolkit needed). The pair's GPU paths need torch::cuda::is_available(),
// which a CPU build of torch never reports (and CUDA-aware OpenMPI, not mpich). Every call here
// fails with cudaErrorNoDevice (cudaFree(nullptr) succeeds); cudaMemGetInfo, which the pair calls
// for its SEVENN_PRINT_INFO report whatever the device, then reports 0 bytes.
#pragma once
#include <cstddef>

typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorNoDevice = 100 };
enum cudaMemcpyKind { cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2,
                      cudaMemcpyDeviceToDevice = 3 };

template <class T> inline cudaError_t cudaMalloc(T **ptr, size_t) { *ptr = nullptr; return cudaErrorNoDevice; }
inline cudaError_t cudaFree(void *ptr) { return ptr ? cudaErrorNoDevice : cudaSuccess; }
inline cudaError_t cudaMemcpy(void *, const void *, size_t, cudaMemcpyKind) { return cudaErrorNoDevice; }
inline cudaError_t cudaSetDevice(int) { return cudaErrorNoDevice; }
inline cudaError_t cudaMemGetInfo(size_t *free, size_t *total) { *free = *total = 0; return cudaErrorNoDevice; }
inline const char *cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "no CUDA device (CPU-only build of the e3gnn/parallel plugin)";
}
