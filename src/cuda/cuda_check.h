// Checked CUDA runtime calls: a failing call throws duo::Error naming the call and the error.
#pragma once

#include <cuda_runtime.h>

#include "core/error.h"

#define DUO_CUDA_CHECK(call)                                                                       \
  do {                                                                                             \
    cudaError_t duo_err_ = (call);                                                                 \
    if (duo_err_ != cudaSuccess)                                                                   \
      ::duo::fail(#call, " failed: ", cudaGetErrorString(duo_err_), " (", __FILE__, ":", __LINE__, \
                  ")");                                                                            \
  } while (0)

// Checked cuBLAS / cuBLASLt calls (include <cublasLt.h> first): a failing status throws duo::Error
// naming the call and the status.
#define DUO_CUBLAS_CHECK(call)                                                       \
  do {                                                                               \
    cublasStatus_t duo_st_ = (call);                                                 \
    if (duo_st_ != CUBLAS_STATUS_SUCCESS)                                            \
      ::duo::fail(#call, " failed: ", cublasLtGetStatusString(duo_st_), " (status ", \
                  static_cast<int>(duo_st_), ", ", __FILE__, ":", __LINE__, ")");    \
  } while (0)
