// Checked CUDA runtime calls: a failing call throws duo::Error naming the call and the error.
#pragma once

#include <cuda_runtime.h>

#include "core/error.h"

#define DUO_CUDA_CHECK(call)                                                               \
  do {                                                                                     \
    cudaError_t duo_err_ = (call);                                                         \
    if (duo_err_ != cudaSuccess)                                                           \
      ::duo::fail(#call, " failed: ", cudaGetErrorString(duo_err_), " (", __FILE__, ":", \
                  __LINE__, ")");                                                          \
  } while (0)
