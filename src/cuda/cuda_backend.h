// The CUDA backend: every Backend op on one GPU, bf16 storage for weights, activations and the KV
// cache, fp32 accumulation everywhere (cuBLASLt for linear layers, own kernels for the rest, the
// DuoAttention kernels of cuda/attention.h). Logits are downloaded as fp32 (converted from bf16).
// Plain C++ header (no CUDA includes), so CLI code can include it under DUO_HAVE_CUDA.
//
// Environment: DUO_ATTENTION=naive makes attention() use the naive kernels of
// cuda/attention_naive.h instead of the contract's fast ones; head dims other than 64 and 128
// always use the naive kernels.
//
// Memory accounting: every device allocation of the backend (weights, scratch, KV stores, token
// buffers, the cuBLASLt workspace, attention workspace) goes through one counter;
// device_memory_in_use() / device_memory_peak() report it (the CUDA context itself and cuBLASLt's
// internal allocations are not included; device_memory_used() reports total - free from the
// driver).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "engine/backend.h"

namespace duo {

// Throws duo::Error when there is no usable CUDA device `device`.
std::unique_ptr<Backend> make_cuda_backend(int device = 0);

namespace cuda {

// Number of CUDA devices the driver reports (0 when none or no driver; never throws).
int device_count();
// cudaGetDeviceProperties(device).name; throws duo::Error when there is no such device.
std::string device_name(int device = 0);
// Bytes the driver reports as used on `device` (total - free), or -1 on error.
int64_t device_memory_used(int device = 0);

}  // namespace cuda
}  // namespace duo
