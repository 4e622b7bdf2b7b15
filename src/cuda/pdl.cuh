// Programmatic dependent launch (Hopper, sm_90+). A kernel started with launch_pdl() may be
// scheduled while the kernel before it on the stream still drains, so its launch and prologue
// overlap the predecessor's tail; stream capture keeps this as a programmatic edge of the CUDA
// graph. The rule that keeps it correct: every kernel launched with launch_pdl() calls pdl_wait()
// first, unconditionally, in every block. pdl_wait() returns once the preceding grid has completed
// and its memory is visible, and since that grid waited for its own predecessor the same way,
// completion stays transitive along the stream. pdl_launch_dependents() only lets the next kernel
// be scheduled early (its own pdl_wait() still holds it back). Kernels launched plainly (cuBLASLt)
// after a launch_pdl() kernel wait for it as usual.
//
// DUO_PDL=0 launches plainly (A/B timing). Devices before compute capability 9.0 launch plainly
// and the device calls compile to nothing there.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <string_view>
#include <utility>

#include "cuda/cuda_check.h"

namespace duo::cuda {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Whether launch_pdl() sets the attribute: the current device is sm_90+ and DUO_PDL is not "0".
inline bool pdl_enabled() {
  static const bool env_on = [] {
    const char* e = std::getenv("DUO_PDL");
    return e == nullptr || std::string_view(e) != "0";
  }();
  if (!env_on) return false;
  int dev = 0;
  DUO_CUDA_CHECK(cudaGetDevice(&dev));
  // Cached per device as dev * 2 + (1 when compute capability >= 9.0).
  static std::atomic<int> cached{-1};
  int c = cached.load(std::memory_order_relaxed);
  if (c < 0 || c / 2 != dev) {
    int major = 0;
    DUO_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    c = dev * 2 + (major >= 9 ? 1 : 0);
    cached.store(c, std::memory_order_relaxed);
  }
  return (c & 1) != 0;
}

// kernel<<<grid, block, smem, stream>>>(args...) with programmatic stream serialization allowed
// (see above: the kernel must begin with pdl_wait()). Checks the launch.
template <typename... Params, typename... Args>
void launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_enabled() ? 1 : 0;
  DUO_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

}  // namespace duo::cuda
